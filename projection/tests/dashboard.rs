//! No dead panels (issue 13): every metric that a panel of the Grafana dashboard
//! (deploy/grafana/dashboards/keel.json) queries exists in the `/metrics` output of the real
//! processes the compose file runs: `keel serve` publishing to a real nats-server, and
//! `keel project --metrics-listen` writing to a real MongoDB wire-protocol server, after a load
//! that commits, rejects, publishes and projects.

mod harness;

use anyhow::{Context, ensure};
use harness::{
    Keel, Mongo, Names, Nats, ProjectorProcess, Shape, Workload, http, load, wait_converged,
    wait_published,
};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// Series Prometheus makes itself for every scrape target; no process exports them.
const PROMETHEUS_SYNTHETIC: &[&str] = &["up"];

fn dashboard() -> anyhow::Result<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/dashboards/keel.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

/// Every panel's title and the PromQL expressions of its targets.
fn panel_queries(dashboard: &Value) -> Vec<(String, Vec<String>)> {
    let panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
    panels
        .iter()
        .map(|panel| {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            let exprs = panel["targets"]
                .as_array()
                .map(|targets| {
                    targets
                        .iter()
                        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            (title, exprs)
        })
        .collect()
}

/// The metric names a PromQL expression selects: identifiers that are not functions or
/// aggregations (followed by `(`), keywords, label names (inside `{}` or a `by (...)` list),
/// durations (inside `[]`), strings or numbers. Histogram series keep their `_bucket`, `_sum`
/// and `_count` suffix: that is the name the exposition must show.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Operators and the aggregations, which may be followed by `by (...)` instead of `(`.
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_until = |from: usize, close: char| {
        let mut j = from;
        while j < chars.len() && chars[j] != close {
            if chars[j] == '"' {
                j += 1;
                while j < chars.len() && chars[j] != '"' {
                    j += usize::from(chars[j] == '\\') + 1;
                }
            }
            j += 1;
        }
        j + 1
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_until(i + 1, '}');
        } else if c == '[' {
            i = skip_until(i + 1, ']');
        } else if c == '"' || c == '\'' {
            i = skip_until(i + 1, c);
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let called = chars.get(next) == Some(&'(');
            if LABEL_LISTS.contains(&word.as_str()) && called {
                i = skip_until(next + 1, ')');
            } else if !called && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The sample names of a Prometheus text exposition.
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect()
}

#[test]
fn the_parser_finds_metric_names_and_nothing_else() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            "histogram_quantile(0.99, sum by (le, outcome) (rate(keel_request_seconds_bucket{route=\"/v1/batches\"}[$__rate_interval])))"
        ),
        ["keel_request_seconds_bucket"]
    );
    assert_eq!(
        names("sum(rate(a_sum[5m])) / sum(rate(a_count[5m])) > bool 1e3"),
        ["a_count", "a_sum"]
    );
    assert_eq!(
        names("max(keel_poisoned) or on (job) up{job=~\"keel|x\"}"),
        ["keel_poisoned", "up"]
    );
    assert_eq!(
        names("sum by (code) (rate(keel_items_rejected_total[1m])) + count without (x) (b)"),
        ["b", "keel_items_rejected_total"]
    );
}

async fn scrape(url: &str) -> anyhow::Result<String> {
    Ok(http()
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_a_dashboard_panel_queries_is_exported() -> anyhow::Result<()> {
    let dashboard = dashboard()?;
    let panels = panel_queries(&dashboard);
    ensure!(panels.len() >= 9, "the dashboard lost panels: {panels:?}");
    let mut wanted: Vec<(String, String)> = Vec::new();
    for (title, exprs) in &panels {
        ensure!(!exprs.is_empty(), "panel {title:?} has no query");
        for expr in exprs {
            let names = metric_names(expr);
            ensure!(!names.is_empty(), "panel {title:?}: no metric in {expr}");
            wanted.extend(names.into_iter().map(|n| (title.clone(), n)));
        }
    }

    let names = Names::new("dashboard");
    let (nats, mongo) = (Nats::start(), Mongo::start_memory());
    let data = tempfile::tempdir()?;
    let keel = Keel::start(data.path(), &nats.url(), &names, &[]);
    let metrics_address = format!("127.0.0.1:{}", harness::free_port());
    let projector = ProjectorProcess::start(
        &nats.url(),
        &mongo.url(),
        &keel.url,
        &names,
        &["--metrics-listen", &metrics_address],
    );
    let workload = Workload {
        accounts: 10,
        skus: 5,
    };
    workload.setup(&http(), &keel.url).await?;
    // Random commands over few aggregates: commits and rejections (unknown orders, overdrafts).
    let report = load(
        &keel.url,
        &workload,
        7,
        Shape {
            workers: 2,
            requests: 40,
            items: 20,
            pace: Duration::ZERO,
            deadline: Duration::from_secs(60),
        },
    )
    .await?;
    ensure!(
        report.committed > 0 && report.rejected > 0,
        "the load must commit and reject: {report:?}"
    );
    let db = mongo.database(&names.db).await;
    wait_converged(&db, &names.durable, &keel.url, Duration::from_secs(120)).await?;
    wait_published(&http(), &keel.url, Duration::from_secs(30)).await?;

    // Gauges that a periodic task sets may lag a scrape: ask again, bounded, before failing.
    let projector_url = format!("http://{metrics_address}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let missing = loop {
        let mut series = exposed(&scrape(&keel.url).await?);
        series.extend(exposed(&scrape(&projector_url).await?));
        let missing: Vec<&(String, String)> = wanted
            .iter()
            .filter(|(_, name)| {
                !series.contains(name) && !PROMETHEUS_SYNTHETIC.contains(&name.as_str())
            })
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing
                .iter()
                .map(|(panel, name)| format!("{name} (panel {panel:?})"))
                .collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    ensure!(
        missing.is_empty(),
        "dead panels: these metrics are not on /metrics of keel serve or keel project:\n  {}",
        missing.join("\n  ")
    );
    let status = projector.terminate();
    ensure!(status.success(), "keel project exited with {status}");
    keel.terminate();
    Ok(())
}
