//! The `served_log` check of `keel audit --url`: a running server serves exactly the audited
//! log on `GET /v1/events`, event by event, rendered as the server renders it.

use crate::{AuditReport, Check, Divergence, Snapshot};
use anyhow::{Context, anyhow, bail};
use keel_sequencer::CommittedEvent;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Most events asked of the server per request: small enough that a page of events with
/// 4 KiB memos stays a few megabytes.
const SERVED_PAGE_EVENTS: usize = 2000;

/// Pages through the server's `GET /v1/events` up to the audited tip and records every event
/// it serves differently from the snapshot. Returns how many events were compared.
pub fn compare(
    url: &str,
    client: &keel_projection::http_client::ClientOptions,
    served_event_json: fn(&CommittedEvent) -> Value,
    snapshot: &Snapshot,
    report: &mut AuditReport,
) -> anyhow::Result<u64> {
    let server = Server::new(url, client)?;
    let last = report.tip.last_event;
    let mut after = 0;
    let mut compared = 0;
    let mut last_print = Instant::now();
    while after < last {
        let page = served_page(&server, after, last)?;
        let served = page["events"]
            .as_array()
            .ok_or_else(|| anyhow!("{url}: no `events` array"))?;
        let ours = snapshot.events(after, SERVED_PAGE_EVENTS)?;
        let ours: Vec<_> = ours.iter().filter(|e| e.seq <= last).collect();
        for (event, served) in ours.iter().zip(served) {
            let expected = served_event_json(event);
            if &expected != served {
                let d = Divergence::new(
                    Check::ServedLog,
                    format!("{url} serves event {} differently", event.seq),
                )
                .at_seq(Some(event.seq))
                .at_batch(Some(event.batch))
                .expected_found(expected.to_string(), served.to_string());
                report.record(d);
            }
        }
        compared += ours.len().min(served.len()) as u64;
        if served.len() < ours.len() || ours.is_empty() {
            let detail = format!(
                "{url} serves {} events after {after}; the snapshot has them up to {last}",
                served.len()
            );
            report.record(Divergence::new(Check::ServedLog, detail).at_seq(Some(after + 1)));
            break;
        }
        after = ours.last().map_or(last, |e| e.seq);
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!("keel audit: compared {compared} of {last} events with {url}");
        }
    }
    Ok(compared)
}

/// How long the server may take to serve the snapshot's tip (see [`served_page`]).
const SERVED_TIP_WAIT: Duration = Duration::from_secs(10);

/// The server's page of events after `after`, once the server serves up to the snapshot's
/// tip `last`. A secondary instance reads the write-ahead log, so the snapshot can hold the
/// batch the server is fsyncing at that instant, which the server serves only once the fsync
/// returns; a server still behind after [`SERVED_TIP_WAIT`] is reported by the caller.
fn served_page(server: &Server, after: u64, last: u64) -> anyhow::Result<Value> {
    let deadline = Instant::now() + SERVED_TIP_WAIT;
    loop {
        let page = server.get_json(&format!(
            "/v1/events?after={after}&limit={SERVED_PAGE_EVENTS}"
        ))?;
        let served_last = page["last_seq"].as_u64().unwrap_or(0);
        if served_last >= last || Instant::now() > deadline {
            return Ok(page);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Largest HTTP response read from the server.
const RESPONSE_BYTES_MAX: usize = 64 << 20;

/// The server at `--url`, asked with reqwest (already the projector's client) on a runtime of
/// its own: the audit runs on a plain thread.
struct Server {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
    /// `http(s)://host:port`, without a trailing slash.
    base: String,
}

impl Server {
    fn new(
        url: &str,
        options: &keel_projection::http_client::ClientOptions,
    ) -> anyhow::Result<Self> {
        let (scheme, rest) = url
            .split_once("://")
            .filter(|(scheme, _)| matches!(*scheme, "http" | "https"))
            .ok_or_else(|| anyhow!("--url {url}: must be http://host:port or https://host:port"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.is_empty() {
            bail!("--url {url}: no host");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime for --url")?;
        let client = keel_projection::http_client::builder(options)
            .with_context(|| format!("--url {url}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .with_context(|| format!("--url {url}"))?;
        Ok(Self {
            runtime,
            client,
            base: format!("{scheme}://{authority}"),
        })
    }

    /// `GET path` as JSON; any status but 200, or a body over [`RESPONSE_BYTES_MAX`], is an
    /// error.
    fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let body = self.runtime.block_on(async {
            let mut response = self
                .client
                .get(&url)
                .header("accept", "application/json")
                .send()
                .await
                .with_context(|| format!("GET {url}"))?;
            let status = response.status().as_u16();
            let mut body = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .with_context(|| format!("GET {url}: reading the answer"))?
            {
                if body.len() + chunk.len() > RESPONSE_BYTES_MAX {
                    bail!("GET {url}: the answer is over {RESPONSE_BYTES_MAX} bytes");
                }
                body.extend_from_slice(&chunk);
            }
            if status != 200 {
                bail!(
                    "GET {path}: HTTP {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            Ok(body)
        })?;
        serde_json::from_slice(&body).with_context(|| format!("GET {path}: the answer is not JSON"))
    }
}
