//! The subscription lane: a second tokio runtime, whose threads run at a lower CPU priority,
//! for everything live subscriptions do (the hub's reads, encoding and fan-out, and serving the
//! subscription connections).
//!
//! A committed batch wakes every subscriber that wants some of it. With a thousand subscribers
//! on the same workers as the write path, those wake-ups and socket writes queue in front of
//! the writer's next request, and the write throughput fell by 80% or more (docs/BENCHMARKS.md,
//! "Live subscriptions"). On the lane, the kernel runs the write path's threads first whenever
//! both want the CPU; subscribers get the rest, and when that is little the hub falls behind
//! and hands out several batches per wake-up, which is cheaper per event. A subscriber that
//! falls too far behind is ended (`too_slow`) and resumes, as before.

use std::io;
use tokio::runtime::{Handle, Runtime};

/// The lane's runtime; shut down (without waiting for its tasks) when dropped.
pub struct Lane {
    runtime: Option<Runtime>,
}

impl Lane {
    /// Starts `threads` worker threads named `keel-subscribe` at niceness `nice` (0: the
    /// process's own priority, 19: the lowest; at 10, a lane thread gets about a tenth of the
    /// CPU time of a write-path thread when both want it). Its blocking threads (store reads)
    /// run at `nice` too.
    pub fn start(threads: usize, nice: i32) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("keel-subscribe")
            .on_thread_start(move || lower_priority(nice))
            .enable_all()
            .build()?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    pub fn handle(&self) -> Option<&Handle> {
        self.runtime.as_ref().map(Runtime::handle)
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Allowed inside an async context, unlike dropping the runtime.
            runtime.shutdown_background();
        }
    }
}

/// Sets the calling thread's niceness (Linux: per thread). Lowering the priority needs no
/// privilege; if it fails anyway, the thread runs at normal priority and says so.
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    let thread = rustix::thread::gettid();
    if let Err(error) = rustix::process::setpriority_process(Some(thread), nice) {
        tracing::warn!(%error, "subscription lane: cannot lower the thread's CPU priority");
    }
}
