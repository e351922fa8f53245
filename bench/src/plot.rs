//! Plots drawn by the tool itself (plotters), each as PNG and SVG:
//! `timeline` (committed items/s and p50/p99 latency per second), `latency` (the distribution
//! of request latencies with p50/p99/p999 marked) and, when the sampler ran, `server` (queue
//! depth, fsync p99, items per fsync and CPU of the server process).
//!
//! Text needs a TrueType font. plotters' pure-Rust `ab_glyph` text backend is used (no
//! fontconfig or freetype to build); the font file is found at run time: `$KEEL_BENCH_FONT`,
//! else DejaVu Sans or another sans font in the usual places (Debian/Ubuntu: package
//! `fonts-dejavu-core`).

use crate::report::TimelinePoint;
use crate::sampler::SampleRow;
use crate::stats::LatencyHistogram;
use anyhow::{Context, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const FONT: &str = "sans-serif";

/// One line of a panel: its legend, colour and the value it plots for a record.
type Series<'a, T> = (&'a str, RGBColor, fn(&T) -> f64);
/// One panel of the server plot: caption, unit, colour and the optional value of a row.
type ServerPanel<'a> = (&'a str, &'a str, RGBColor, fn(&SampleRow) -> Option<f64>);
const WIDTH: u32 = 1200;
const PANEL_HEIGHT: u32 = 380;

/// Well-known places of a sans TrueType font, most wanted first.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Registers a font for plot text once per process.
fn ensure_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = REGISTERED.get_or_init(|| {
        let path = find_font().ok_or_else(|| {
            "no TrueType font found for plot text: install `fonts-dejavu-core` (Debian/Ubuntu) or set \
             KEEL_BENCH_FONT=/path/to/font.ttf"
                .to_owned()
        })?;
        let bytes = std::fs::read(&path).map_err(|e| format!("reading font {}: {e}", path.display()))?;
        // plotters keeps fonts for the life of the process; this happens once.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FONT, FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a usable TrueType font", path.display()))?;
        Ok(path)
    });
    result.as_ref().map(|_| ()).map_err(|e| anyhow!("{e}"))
}

fn find_font() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KEEL_BENCH_FONT").map(PathBuf::from) {
        return Some(path);
    }
    FONT_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| first_ttf(Path::new("/usr/share/fonts"), 4))
}

/// The first `*.ttf` under `dir`, at most `depth` levels down (bounded: font trees are small).
fn first_ttf(dir: &Path, depth: u32) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .take(10_000)
        .collect();
    entries.sort();
    let is_ttf = |p: &PathBuf| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("ttf"));
    entries
        .iter()
        .find(|p| p.is_file() && is_ttf(p))
        .cloned()
        .or_else(|| {
            if depth == 0 {
                return None;
            }
            entries
                .iter()
                .filter(|p| p.is_dir())
                .find_map(|p| first_ttf(p, depth - 1))
        })
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

/// Draws `$body` once into `<stem>.png` and once into `<stem>.svg`; yields both paths.
macro_rules! write_png_and_svg {
    ($stem:expr, $height:expr, |$root:ident| $body:expr) => {{
        ensure_font()?;
        let png = $stem.with_extension("png");
        let svg = $stem.with_extension("svg");
        {
            let $root = BitMapBackend::new(&png, (WIDTH, $height)).into_drawing_area();
            $body;
            $root
                .present()
                .map_err(plot_err)
                .with_context(|| format!("writing {}", png.display()))?;
        }
        {
            let $root = SVGBackend::new(&svg, (WIDTH, $height)).into_drawing_area();
            $body;
            $root
                .present()
                .map_err(plot_err)
                .with_context(|| format!("writing {}", svg.display()))?;
        }
        Ok::<Vec<PathBuf>, anyhow::Error>(vec![png, svg])
    }};
}

/// The timeline plot: throughput on top, latency below.
pub fn write_timeline(
    stem: &Path,
    title: &str,
    points: &[TimelinePoint],
) -> anyhow::Result<Vec<PathBuf>> {
    write_png_and_svg!(stem, PANEL_HEIGHT * 2, |root| draw_timeline(
        &root, title, points
    )?)
}

/// The latency distribution plot.
pub fn write_latency(
    stem: &Path,
    title: &str,
    latency: &LatencyHistogram,
) -> anyhow::Result<Vec<PathBuf>> {
    write_png_and_svg!(stem, PANEL_HEIGHT + 120, |root| draw_latency(
        &root, title, latency
    )?)
}

/// The server plot from the sampler's rows.
pub fn write_server(stem: &Path, title: &str, rows: &[SampleRow]) -> anyhow::Result<Vec<PathBuf>> {
    write_png_and_svg!(stem, PANEL_HEIGHT * 2, |root| draw_server(
        &root, title, rows
    )?)
}

/// Axis labels: `250,000` for large values, `12.5` for small ones (no `60000.0`).
fn axis_label(v: &f64) -> String {
    if v.abs() >= 100.0 {
        crate::report::group(*v)
    } else {
        format!("{v:.1}")
    }
}

/// Upper end of an axis: a little above the largest value, never an empty range.
fn axis_max(values: impl Iterator<Item = f64>) -> f64 {
    let max = values.filter(|v| v.is_finite()).fold(0.0, f64::max);
    if max <= 0.0 { 1.0 } else { max * 1.1 }
}

fn draw_timeline<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    points: &[TimelinePoint],
) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(plot_err)?;
    let root = root.titled(title, (FONT, 24)).map_err(plot_err)?;
    let (upper, lower) = root.split_vertically(PANEL_HEIGHT - 20);
    let t_max = axis_max(points.iter().map(|p| p.t_s));
    let series_throughput: [Series<'_, TimelinePoint>; 2] = [
        ("committed items/s", BLUE, |p| p.items_per_sec),
        ("rejected items/s", RED, |p| p.rejected_per_sec),
    ];
    let y_max = axis_max(
        points
            .iter()
            .map(|p| p.items_per_sec.max(p.rejected_per_sec)),
    );
    line_panel(
        &upper,
        "items per second",
        t_max,
        y_max,
        "items/s",
        points,
        &series_throughput,
    )?;
    let series_latency: [Series<'_, TimelinePoint>; 2] = [
        ("p99 ms", MAGENTA, |p| p.p99_ms),
        ("p50 ms", GREEN, |p| p.p50_ms),
    ];
    let y_max = axis_max(points.iter().map(|p| p.p99_ms));
    line_panel(
        &lower,
        "request latency per second",
        t_max,
        y_max,
        "ms",
        points,
        &series_latency,
    )
}

fn line_panel<DB: DrawingBackend, T: Elapsed>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    x_max: f64,
    y_max: f64,
    y_desc: &str,
    data: &[T],
    series: &[Series<'_, T>],
) -> anyhow::Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the load started")
        .y_desc(y_desc)
        .y_label_formatter(&axis_label)
        .label_style((FONT, 13))
        .draw()
        .map_err(plot_err)?;
    for &(name, color, value) in series {
        chart
            .draw_series(LineSeries::new(
                data.iter().map(|d| (d.elapsed_s(), value(d))),
                color.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// The x value of a plotted record: seconds since the start.
trait Elapsed {
    fn elapsed_s(&self) -> f64;
}

impl Elapsed for TimelinePoint {
    fn elapsed_s(&self) -> f64 {
        self.t_s
    }
}

impl Elapsed for SampleRow {
    fn elapsed_s(&self) -> f64 {
        self.elapsed_s
    }
}

fn draw_latency<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    latency: &LatencyHistogram,
) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(plot_err)?;
    let bins = latency_bins(latency, 60);
    let summary = latency.summary_ms();
    let x_max = bins.last().map_or(1.0, |b| b.1).max(1e-3);
    let y_max = axis_max(bins.iter().map(|b| b.2 as f64));
    let hidden = latency.len().saturating_sub(bins.iter().map(|b| b.2).sum());
    let caption = format!(
        "{title}: {} requests, p50 {:.3} ms, p99 {:.3} ms, p999 {:.3} ms, max {:.3} ms{}",
        latency.len(),
        summary.p50,
        summary.p99,
        summary.p999,
        summary.max,
        if hidden > 0 {
            format!(" ({hidden} above the axis)")
        } else {
            String::new()
        }
    );
    let mut chart = ChartBuilder::on(root)
        .caption(caption, (FONT, 18))
        .margin(14)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("request latency, ms")
        .y_desc("requests")
        .y_label_formatter(&axis_label)
        .label_style((FONT, 13))
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(bins.iter().map(|&(lo, hi, n)| {
            Rectangle::new([(lo, 0.0), (hi, n as f64)], BLUE.mix(0.6).filled())
        }))
        .map_err(plot_err)?;
    for (name, value, color) in [
        ("p50", summary.p50, GREEN),
        ("p99", summary.p99, MAGENTA),
        ("p999", summary.p999, RED),
    ] {
        if value <= x_max {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(value, 0.0), (value, y_max)],
                    color.stroke_width(2),
                )))
                .map_err(plot_err)?
                .label(format!("{name} {value:.3} ms"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// `bins` equal bins from 0 to a little above p999 (so that one outlier does not squash the
/// picture): `(from_ms, to_ms, requests)`. Requests above the last bin are not counted.
pub fn latency_bins(latency: &LatencyHistogram, bins: usize) -> Vec<(f64, f64, u64)> {
    if latency.is_empty() || bins == 0 {
        return Vec::new();
    }
    let top_ms = (latency.quantile_us(0.999) as f64 * 1.25 / 1000.0).max(0.01);
    let width = top_ms / bins as f64;
    let mut out: Vec<(f64, f64, u64)> = (0..bins)
        .map(|i| (i as f64 * width, (i + 1) as f64 * width, 0))
        .collect();
    for (value_us, count) in latency.recorded() {
        let ms = value_us as f64 / 1000.0;
        let index = (ms / width).floor() as usize;
        if let Some(bin) = out.get_mut(index) {
            bin.2 += count;
        }
    }
    out
}

fn draw_server<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    rows: &[SampleRow],
) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(plot_err)?;
    let root = root.titled(title, (FONT, 24)).map_err(plot_err)?;
    let panels = root.split_evenly((2, 2));
    let t_max = axis_max(rows.iter().map(|r| r.elapsed_s));
    let specs: [ServerPanel<'_>; 4] = [
        ("queue depth (items waiting)", "items", BLUE, |r| {
            r.queue_items
        }),
        ("fsync p99 per interval", "ms", MAGENTA, |r| r.fsync_p99_ms),
        ("items per fsync (mean)", "items", GREEN, |r| {
            r.batch_items_mean
        }),
        ("server CPU (100% = one core)", "%", RED, |r| {
            r.server_cpu_percent
        }),
    ];
    for (area, (caption, unit, color, value)) in panels.iter().zip(specs) {
        let points: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|r| value(r).map(|v| (r.elapsed_s, v)))
            .collect();
        let y_max = axis_max(points.iter().map(|p| p.1));
        let mut chart = ChartBuilder::on(area)
            .caption(caption, (FONT, 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..t_max, 0f64..y_max)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(unit)
            .y_label_formatter(&axis_label)
            .label_style((FONT, 12))
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(plot_err)?;
    }
    Ok(())
}
