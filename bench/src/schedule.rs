//! When each request is meant to be sent.
//!
//! Closed loop: a worker sends its next request when the previous answer arrived, and latency
//! is measured from the actual send. Open loop (`--rate`): request number `k` (counted over all
//! workers) is due at `start + k * batch / rate`, whatever happened before. Worker `w` of `W`
//! sends requests `w, w + W, w + 2W, ...`. A worker that falls behind sends at once, but the
//! latency is still measured from the intended send time, so a stalled server shows up as
//! latency instead of silently lowering the offered load (no coordinated omission).

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    Closed,
    Open(OpenLoop),
}

/// A fixed-rate schedule of requests of `batch` items each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OpenLoop {
    /// Time between two consecutive requests (over all workers).
    interval: Duration,
    workers: u64,
}

impl OpenLoop {
    /// `rate_items_per_sec` over all workers; each request carries `batch` items.
    /// `None` when the rate is not a positive finite number or the interval would round to 0.
    pub fn new(rate_items_per_sec: f64, batch: usize, workers: usize) -> Option<Self> {
        if !(rate_items_per_sec.is_finite() && rate_items_per_sec > 0.0)
            || batch == 0
            || workers == 0
        {
            return None;
        }
        let interval_secs = batch as f64 / rate_items_per_sec;
        let interval = Duration::try_from_secs_f64(interval_secs).ok()?;
        if interval.is_zero() {
            return None;
        }
        Some(Self {
            interval,
            workers: workers as u64,
        })
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Global request number of worker `worker`'s `n`-th request (both from 0).
    pub fn request_index(&self, worker: usize, n: u64) -> u64 {
        n.saturating_mul(self.workers).saturating_add(worker as u64)
    }

    /// Offset from the start of the load at which global request `k` is due.
    pub fn intended_offset(&self, k: u64) -> Duration {
        // Multiply in nanoseconds as u128 so a long run does not accumulate rounding drift.
        let nanos = self.interval.as_nanos().saturating_mul(u128::from(k));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Requests the schedule holds within `duration` (those due strictly before its end).
    pub fn requests_within(&self, duration: Duration) -> u64 {
        let n = duration
            .as_nanos()
            .div_ceil(self.interval.as_nanos().max(1));
        u64::try_from(n).unwrap_or(u64::MAX)
    }
}

/// The latency of a request due at `intended` (offset from the start) whose answer arrived at
/// `answered`; a request sent early (never happens) counts from its answer, i.e. zero.
pub fn latency_from_intended(intended: Duration, answered: Duration) -> Duration {
    answered.saturating_sub(intended)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_batch_give_the_interval() {
        let s = OpenLoop::new(100_000.0, 1000, 4).unwrap();
        assert_eq!(s.interval(), Duration::from_millis(10));
        assert_eq!(s.intended_offset(0), Duration::ZERO);
        assert_eq!(s.intended_offset(250), Duration::from_millis(2500));
    }

    #[test]
    fn workers_interleave_over_one_global_schedule() {
        let s = OpenLoop::new(1000.0, 10, 3).unwrap(); // one request every 10 ms
        let due: Vec<u64> = (0..3u64)
            .flat_map(|n| (0..3).map(move |w| (w, n)))
            .map(|(w, n)| s.request_index(w, n))
            .collect();
        assert_eq!(due, vec![0, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            s.intended_offset(s.request_index(2, 1)),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn schedule_does_not_drift_over_a_long_run() {
        // 3 requests per second: 333.333... ms apart; after 3 million requests, exactly 1e6 s
        // within a microsecond (the interval is rounded to a nanosecond once, not per step).
        let s = OpenLoop::new(3.0, 1, 1).unwrap();
        let at = s.intended_offset(3_000_000);
        let expected = Duration::from_secs(1_000_000);
        let diff = at.abs_diff(expected);
        assert!(diff < Duration::from_millis(2), "drift {diff:?}");
    }

    #[test]
    fn a_late_answer_counts_from_the_intended_time_not_the_send() {
        // Due at 100 ms; the worker was stuck until 900 ms, sent then, answer at 905 ms.
        let latency = latency_from_intended(Duration::from_millis(100), Duration::from_millis(905));
        assert_eq!(latency, Duration::from_millis(805));
        assert_eq!(
            latency_from_intended(Duration::from_millis(5), Duration::from_millis(1)),
            Duration::ZERO
        );
    }

    #[test]
    fn requests_within_a_duration() {
        let s = OpenLoop::new(1000.0, 100, 1).unwrap(); // 10 requests/s
        assert_eq!(s.requests_within(Duration::from_secs(2)), 20);
        assert_eq!(s.requests_within(Duration::from_millis(2050)), 21);
    }

    #[test]
    fn nonsense_rates_are_refused() {
        assert!(OpenLoop::new(0.0, 10, 1).is_none());
        assert!(OpenLoop::new(-5.0, 10, 1).is_none());
        assert!(OpenLoop::new(f64::NAN, 10, 1).is_none());
        assert!(OpenLoop::new(f64::INFINITY, 10, 1).is_none());
        assert!(OpenLoop::new(1e30, 1, 1).is_none());
        assert!(OpenLoop::new(10.0, 0, 1).is_none());
    }
}
