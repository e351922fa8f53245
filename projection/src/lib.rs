//! Keel's publication and read projection.
//!
//! The **publisher** ([`publisher`]) runs inside `keel serve`: it follows the outbox cursor over
//! the committed log and sends every committed batch as one JetStream message. The
//! **projector** ([`projector`], `keel project`) is a durable JetStream consumer that applies
//! those batches, in order and exactly once in effect, to MongoDB collections analysts query
//! ([`documents`], [`store`]), and repairs gaps from Keel's own HTTP API ([`source`]).
//!
//! This crate reads only what was committed: the publisher holds a [`keel_engine::Reader`], the
//! projector sees batch messages. It never reaches into the write path, and nothing here can
//! slow the writer. docs/PROJECTION.md describes the collections, the batch message and the
//! guarantees.

pub mod backoff;
pub mod documents;
pub mod nats;
pub mod projector;
pub mod publisher;
pub mod source;
pub mod store;

pub use backoff::{Shutdown, ShutdownTrigger, shutdown_channel};
pub use projector::{ProjectError, ProjectorConfig};
pub use publisher::{PublishError, PublisherConfig, PublisherHandle};

/// Runs the projector until SIGTERM or Ctrl-C (for `keel project`).
pub async fn project_until_signal(config: ProjectorConfig) -> Result<(), ProjectError> {
    let (trigger, shutdown) = shutdown_channel();
    tokio::spawn(async move {
        terminate_signal().await;
        trigger.trigger();
    });
    projector::run(config, shutdown).await
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminate_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received; stopping"),
        () = terminate => tracing::info!("SIGTERM received; stopping"),
    }
}
