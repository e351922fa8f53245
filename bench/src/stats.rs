//! Latency statistics: an HDR histogram at microsecond resolution and the percentiles the
//! reports print.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Highest latency the histogram tracks exactly: one hour. Longer values are clamped to it
/// (and a one-hour batch latency is a finding in itself).
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

/// Request latencies in microseconds, three significant digits (0.1% relative error).
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    histogram: Histogram<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        // Bounds 1 us .. 1 h with 3 significant figures are valid constants: `new_with_bounds`
        // only fails for low < 1, high < 2 * low or sigfig > 5.
        let histogram = Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
            .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid"));
        Self { histogram }
    }

    /// Records one latency; below 1 us counts as 1 us, above [`LATENCY_US_MAX`] as the max.
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.record_us(us);
    }

    pub fn record_us(&mut self, us: u64) {
        self.histogram
            .saturating_record(us.clamp(1, LATENCY_US_MAX));
    }

    /// Records `count` latencies of `us` each.
    pub fn record_us_n(&mut self, us: u64, count: u64) {
        self.histogram
            .saturating_record_n(us.clamp(1, LATENCY_US_MAX), count);
    }

    pub fn add(&mut self, other: &LatencyHistogram) {
        // Same bounds on both sides, so adding cannot fail; saturate rather than panic anyway.
        if self.histogram.add(&other.histogram).is_err() {
            for v in other.histogram.iter_recorded() {
                self.histogram
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    pub fn len(&self) -> u64 {
        self.histogram.len()
    }

    pub fn is_empty(&self) -> bool {
        self.histogram.is_empty()
    }

    pub fn reset(&mut self) {
        self.histogram.reset();
    }

    /// The value at `quantile` (0..=1) in microseconds; 0 when empty.
    pub fn quantile_us(&self, quantile: f64) -> u64 {
        if self.histogram.is_empty() {
            return 0;
        }
        self.histogram.value_at_quantile(quantile)
    }

    pub fn max_us(&self) -> u64 {
        self.histogram.max()
    }

    pub fn mean_us(&self) -> f64 {
        self.histogram.mean()
    }

    /// The recorded values as (value_us, count), ascending, for plotting.
    pub fn recorded(&self) -> Vec<(u64, u64)> {
        self.histogram
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }

    pub fn summary_ms(&self) -> LatencySummaryMs {
        LatencySummaryMs {
            count: self.len(),
            mean: us_to_ms(self.mean_us()),
            p50: us_to_ms(self.quantile_us(0.50) as f64),
            p90: us_to_ms(self.quantile_us(0.90) as f64),
            p99: us_to_ms(self.quantile_us(0.99) as f64),
            p999: us_to_ms(self.quantile_us(0.999) as f64),
            max: us_to_ms(if self.is_empty() {
                0.0
            } else {
                self.max_us() as f64
            }),
        }
    }
}

/// Microseconds to milliseconds, rounded to the microsecond (3 decimals).
pub fn us_to_ms(us: f64) -> f64 {
    (us.round()) / 1000.0
}

/// Latency percentiles in milliseconds, as written to the result JSON (`latency_ms`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummaryMs {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_one_to_ten_thousand() {
        let mut h = LatencyHistogram::new();
        for us in 1..=10_000u64 {
            h.record_us(us);
        }
        let s = h.summary_ms();
        assert_eq!(s.count, 10_000);
        // Three significant digits: each value within 0.1% of the exact rank.
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(close(s.p50, 5.0), "p50 {}", s.p50);
        assert!(close(s.p90, 9.0), "p90 {}", s.p90);
        assert!(close(s.p99, 9.9), "p99 {}", s.p99);
        assert!(close(s.p999, 9.99), "p999 {}", s.p999);
        assert!(close(s.max, 10.0), "max {}", s.max);
        assert!(close(s.mean, 5.0005), "mean {}", s.mean);
    }

    #[test]
    fn one_slow_request_in_a_thousand_shows_at_p999_not_p99() {
        let mut h = LatencyHistogram::new();
        for _ in 0..999 {
            h.record(Duration::from_millis(2));
        }
        h.record(Duration::from_millis(800));
        let s = h.summary_ms();
        assert!((s.p99 - 2.0).abs() < 0.01, "p99 {}", s.p99);
        assert!(s.max > 799.0 && s.max < 801.0, "max {}", s.max);
        assert!(s.p999 <= 2.01, "p999 is the 999th value: {}", s.p999);
    }

    #[test]
    fn empty_histogram_reports_zeros() {
        let s = LatencyHistogram::new().summary_ms();
        assert_eq!(s, LatencySummaryMs::default());
    }

    #[test]
    fn out_of_range_values_are_clamped_not_lost() {
        let mut h = LatencyHistogram::new();
        h.record(Duration::ZERO);
        h.record(Duration::from_secs(10 * 3600));
        assert_eq!(h.len(), 2);
        assert!(h.max_us() >= LATENCY_US_MAX);
        assert_eq!(h.quantile_us(0.0), 1);
    }

    #[test]
    fn adding_histograms_keeps_every_count() {
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        a.record_us(100);
        b.record_us(200);
        b.record_us(300);
        a.add(&b);
        assert_eq!(a.len(), 3);
        assert_eq!(a.recorded().iter().map(|(_, n)| n).sum::<u64>(), 3);
    }
}
