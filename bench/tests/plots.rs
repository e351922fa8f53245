//! The plots are real PNG and SVG files with the expected size and labels.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use common::{is_png, png_size};
use keel_bench::plot;
use keel_bench::report::TimelinePoint;
use keel_bench::sampler::SampleRow;
use keel_bench::stats::LatencyHistogram;

#[test]
fn timeline_latency_and_server_plots_are_valid_images() {
    let dir = tempfile::tempdir().unwrap();
    let points: Vec<TimelinePoint> = (1..=30)
        .map(|t| TimelinePoint {
            t_s: t as f64,
            items_per_sec: 200_000.0 + (t as f64 * 1000.0),
            rejected_per_sec: 100.0,
            batches_per_sec: 200.0,
            p50_ms: 3.0,
            p99_ms: 8.0 + (t % 5) as f64,
            max_ms: 20.0,
            errors: 0,
            http_503: 0,
        })
        .collect();
    let files = plot::write_timeline(&dir.path().join("timeline"), "plot-test", &points).unwrap();
    assert_eq!(files.len(), 2);
    let png = std::fs::read(dir.path().join("timeline.png")).unwrap();
    assert!(is_png(&png));
    assert_eq!(png_size(&png), (1200, 760));
    let svg = std::fs::read_to_string(dir.path().join("timeline.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("plot-test") && svg.contains("committed items/s")
    );

    let mut latency = LatencyHistogram::new();
    for i in 0..10_000u64 {
        latency.record_us(2000 + (i % 500) * 10);
    }
    plot::write_latency(&dir.path().join("latency"), "plot-test", &latency).unwrap();
    assert!(is_png(
        &std::fs::read(dir.path().join("latency.png")).unwrap()
    ));
    let svg = std::fs::read_to_string(dir.path().join("latency.svg")).unwrap();
    assert!(svg.contains("p99"), "the percentile markers are labelled");

    let rows: Vec<SampleRow> = (0..10)
        .map(|i| SampleRow {
            elapsed_s: i as f64 * 2.0,
            queue_items: Some(1000.0),
            fsync_p99_ms: Some(2.5),
            batch_items_mean: Some(1000.0),
            server_cpu_percent: Some(80.0),
            ..SampleRow::default()
        })
        .collect();
    plot::write_server(&dir.path().join("server"), "plot-test", &rows).unwrap();
    assert!(is_png(
        &std::fs::read(dir.path().join("server.png")).unwrap()
    ));
}

#[test]
fn empty_runs_still_plot() {
    let dir = tempfile::tempdir().unwrap();
    plot::write_timeline(&dir.path().join("t"), "empty", &[]).unwrap();
    plot::write_latency(&dir.path().join("l"), "empty", &LatencyHistogram::new()).unwrap();
    assert!(is_png(&std::fs::read(dir.path().join("t.png")).unwrap()));
    assert!(is_png(&std::fs::read(dir.path().join("l.png")).unwrap()));
}

#[test]
fn latency_bins_cover_up_to_past_p999_and_count_everything_below() {
    let mut latency = LatencyHistogram::new();
    for us in 1..=1000u64 {
        latency.record_us(us * 10); // 0.01 .. 10 ms
    }
    latency.record_us(5_000_000); // one 5 s outlier, beyond the axis
    let bins = plot::latency_bins(&latency, 50);
    assert_eq!(bins.len(), 50);
    let counted: u64 = bins.iter().map(|b| b.2).sum();
    assert_eq!(counted, 1000, "everything but the outlier is in a bin");
    assert!(bins.last().unwrap().1 >= 10.0 && bins.last().unwrap().1 < 20.0);
}
