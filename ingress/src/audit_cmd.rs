//! `keel audit`: runs the integrity audit of [`keel_sequencer::audit`] on a store, prints a
//! summary for people (last line `INTEGRITY_OK` or `INTEGRITY_FAILED`), optionally writes a JSON
//! report, shows progress on stderr, optionally compares the MongoDB projection with the log
//! ([`crate::audit_projection`]) and checks that a running server serves exactly the audited
//! log. Exit codes: 0 intact, 1 divergences found, 2 no verdict (usage or I/O).

use crate::audit_projection::{ProjectionSummary, ProjectionTarget};
use crate::wire;
use anyhow::{Context, anyhow, bail};
use clap::Args;
use keel_projection::nats::Published;
use keel_sequencer::audit::{
    self, AuditError, AuditOptions, AuditReport, Check, Divergence, Phase, Progress, Snapshot,
    SnapshotMode,
};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct AuditArgs {
    /// Data directory of the store to audit, stopped or served by a live `keel serve`.
    #[arg(long, env = "KEEL_DATA")]
    pub data: Option<PathBuf>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Most divergences listed in the summary and the report (all are counted).
    #[arg(long, default_value_t = 20)]
    pub max_divergences: usize,
    /// After the audit, check that the server at this `http://host:port` serves exactly the
    /// audited log on `GET /v1/events` (needs --data: the server's own data directory).
    #[arg(long)]
    pub url: Option<String>,
    /// Also compare the MongoDB projection at this `mongodb://` URL with the audited log.
    #[arg(long)]
    pub mongo_url: Option<String>,
    /// MongoDB database of the projection (`keel project --mongo-db`).
    #[arg(long, default_value = "keel")]
    pub mongo_db: String,
    /// The projector whose checkpoint places the projection (`keel project --durable`).
    #[arg(long, default_value = "keel-projector")]
    pub mongo_durable: String,
    /// How long to wait for the projection to reach the snapshot's tip before comparing it
    /// at its checkpoint instead.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub mongo_wait: Duration,
    /// Also compare the store's tip with the last batch of the JetStream stream at this NATS
    /// URL (a witness of the store's history: a store behind it lost committed batches).
    #[arg(long)]
    pub nats_url: Option<String>,
    /// The stream `keel serve --nats-stream` publishes to.
    #[arg(long, default_value = "KEEL")]
    pub nats_stream: String,
    /// The subject `keel serve --nats-subject` publishes on.
    #[arg(long, default_value = "keel.batches")]
    pub nats_subject: String,
}

/// Runs `keel audit` and returns its exit code.
pub fn run(args: &AuditArgs) -> ExitCode {
    match audit(args) {
        Ok(true) => {
            println!("INTEGRITY_OK");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("INTEGRITY_FAILED");
            ExitCode::from(1)
        }
        // Damage RocksDB or the write-ahead log check found while opening or reading is a
        // verdict, not a failure to reach one.
        Err(error) if is_storage_damage(&error) => {
            eprintln!("keel audit: {error:#}");
            println!("storage damaged: {error:#}");
            println!("INTEGRITY_FAILED");
            ExitCode::from(1)
        }
        Err(error) => {
            eprintln!("keel audit: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn is_storage_damage(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(cause.downcast_ref::<AuditError>(), Some(AuditError::Storage(e)) if e.is_corruption())
    })
}

/// The JetStream stream's last batch, read before the snapshot is opened: every batch in the
/// stream then was committed before the snapshot, so the snapshot must hold it.
fn read_stream_witness(args: &AuditArgs) -> anyhow::Result<Option<Published>> {
    let Some(url) = &args.nats_url else {
        return Ok(None);
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let read =
            keel_projection::nats::last_published_at(url, &args.nats_stream, &args.nats_subject);
        let found = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .map_err(|_| anyhow!("--nats-url {url}: no answer from JetStream within 10 s"))?;
        Ok(found?)
    })
}

/// Records a divergence when the store is behind (or beside) the stream's last batch.
fn compare_stream_witness(
    published: Option<Published>,
    args: &AuditArgs,
    snapshot: &Snapshot,
    report: &mut AuditReport,
) -> anyhow::Result<()> {
    let Some(published) = published else {
        return Ok(());
    };
    let tip = report.tip.last_batch;
    let stream = &args.nats_stream;
    if published.batch > tip {
        let detail = format!(
            "the store is behind its published history: data loss: JetStream stream `{stream}` holds batch {}, the store ends at batch {tip}",
            published.batch
        );
        report.record(Divergence::new(Check::Storage, detail).at_batch(Some(published.batch)));
    } else if let Some(header) = published.header {
        let stored = snapshot.batch_header(header.seq)?;
        if stored.map(|h| h.hash) != Some(header.hash) {
            let detail = format!(
                "the store's batch {} is not the one JetStream stream `{stream}` holds: the store's history forked",
                header.seq
            );
            report.record(Divergence::new(Check::Storage, detail).at_batch(Some(header.seq)));
        }
    }
    Ok(())
}

/// The audit; `Ok(intact)` is a verdict, `Err` means none could be reached.
fn audit(args: &AuditArgs) -> anyhow::Result<bool> {
    let Some(data) = args.data.as_deref() else {
        bail!(
            "--data DIR is required: the server has no endpoint that takes a snapshot, so the audit \
             opens the store itself (a live server's store is opened as a RocksDB secondary); \
             --url then checks that the server serves the audited log"
        );
    };
    // Parse the projection's URL before opening anything: a usage error comes first.
    let target = match &args.mongo_url {
        Some(url) => Some(ProjectionTarget::connect(
            url,
            &args.mongo_db,
            &args.mongo_durable,
        )?),
        None => None,
    };
    let published = read_stream_witness(args)?;
    let opening = Instant::now();
    let snapshot = Snapshot::open(data).with_context(|| format!("opening {}", data.display()))?;
    let open_elapsed = opening.elapsed();
    eprintln!(
        "keel audit: {} opened {}",
        data.display(),
        snapshot.mode().describe()
    );
    let projection = match target {
        Some(target) => {
            let tip = snapshot.tip()?.last_event;
            let summary = target.wait_for(tip, args.mongo_wait)?;
            Some((target, summary))
        }
        None => None,
    };
    let options = AuditOptions {
        max_divergences: args.max_divergences,
        point: projection.as_ref().map(|(_, summary)| summary.point),
        ..AuditOptions::default()
    };
    let mut printer = ProgressPrinter::new();
    let (mut report, log) =
        audit::audit_snapshot_with_log(&snapshot, &options, &mut |p| printer.show(p))
            .with_context(|| format!("auditing {}", data.display()))?;
    let projection = match projection {
        Some((target, mut summary)) => {
            target
                .compare(&snapshot, &log, &mut summary, &mut report)
                .context("comparing the MongoDB projection")?;
            Some(summary)
        }
        None => None,
    };
    drop(log);
    compare_stream_witness(published, args, &snapshot, &mut report)?;
    let served = match &args.url {
        Some(url) => Some(compare_served_log(url, &snapshot, &mut report)?),
        None => None,
    };
    let outcome = Outcome {
        data,
        mode: snapshot.mode(),
        open_elapsed,
        report: &report,
        url: args.url.as_deref(),
        served,
        projection: projection.as_ref(),
    };
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report_json(&outcome))?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    print_summary(&outcome);
    Ok(report.ok())
}

/// Everything the summary and the JSON report show.
struct Outcome<'a> {
    data: &'a Path,
    mode: SnapshotMode,
    /// Opening the snapshot (a read-only open replays the write-ahead log into memory).
    open_elapsed: Duration,
    report: &'a AuditReport,
    /// `--url`, and how many events were compared with it.
    url: Option<&'a str>,
    served: Option<u64>,
    /// `--mongo-url`: what the projection comparison covered.
    projection: Option<&'a ProjectionSummary>,
}

/// Progress on stderr about once a second: rate and, where the total is known, the ETA.
struct ProgressPrinter {
    last_print: Instant,
}

impl ProgressPrinter {
    fn new() -> Self {
        Self {
            last_print: Instant::now(),
        }
    }

    fn show(&mut self, p: &Progress) {
        if self.last_print.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_print = Instant::now();
        let rate = p.done as f64 / p.elapsed.as_secs_f64().max(1e-3);
        let unit = match p.phase {
            Phase::Chain => "events",
            Phase::State => "aggregates",
            Phase::CommandIds => "entries",
        };
        let line = if p.total > 0 {
            let left_seconds = p.total.saturating_sub(p.done) as f64 / rate.max(1.0);
            let percent = 100.0 * p.done as f64 / p.total as f64;
            format!(
                "keel audit: {} {} of {} {unit} ({percent:.0}%), {rate:.0} {unit}/s, ETA {left_seconds:.1} s",
                p.phase.as_str(),
                p.done,
                p.total
            )
        } else {
            format!(
                "keel audit: {} {} {unit}, {rate:.0} {unit}/s",
                p.phase.as_str(),
                p.done
            )
        };
        eprintln!("{line}");
    }
}

/// Most events asked of the server per request: small enough that a page of events with
/// 4 KiB memos stays a few megabytes.
const SERVED_PAGE_EVENTS: usize = 2000;

/// Pages through the server's `GET /v1/events` up to the audited tip and records every event
/// it serves differently from the snapshot. Returns how many events were compared.
fn compare_served_log(
    url: &str,
    snapshot: &Snapshot,
    report: &mut AuditReport,
) -> anyhow::Result<u64> {
    let server = Http::parse(url)?;
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
            let expected = wire::event_json(event);
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
fn served_page(server: &Http, after: u64, last: u64) -> anyhow::Result<Value> {
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
const RESPONSE_BYTES_MAX: u64 = 64 << 20;

/// A minimal HTTP/1.1 GET over a plain TCP connection. Enough to page through a Keel
/// server's JSON; it adds no HTTP client to the binary's dependencies.
struct Http {
    authority: String,
}

impl Http {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("--url {url}: only http://host:port is supported"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.is_empty() {
            bail!("--url {url}: no host");
        }
        Ok(Self {
            authority: authority.to_owned(),
        })
    }

    fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let mut stream = TcpStream::connect(&self.authority)
            .with_context(|| format!("connecting to {}", self.authority))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
            self.authority
        );
        stream.write_all(request.as_bytes())?;
        let mut bytes = Vec::new();
        stream.take(RESPONSE_BYTES_MAX).read_to_end(&mut bytes)?;
        let split = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| anyhow!("GET {path}: no HTTP header in the answer"))?;
        let head = String::from_utf8_lossy(&bytes[..split]).to_ascii_lowercase();
        let body = &bytes[split + 4..];
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let body = if head.contains("transfer-encoding: chunked") {
            dechunk(body)?
        } else {
            body.to_vec()
        };
        if status != 200 {
            bail!(
                "GET {path}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        serde_json::from_slice(&body).with_context(|| format!("GET {path}: the answer is not JSON"))
    }
}

/// Decodes a chunked HTTP body.
fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len());
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunk"))?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| anyhow!("bad chunk size {size_hex:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = body.get(..size).ok_or_else(|| anyhow!("truncated chunk"))?;
        out.extend_from_slice(chunk);
        body = body.get(size + 2..).unwrap_or_default();
    }
}

/// The checks every audit of a store runs, in the order of issue 4 (5, the projection, has a
/// line of its own).
const PRIMARY_CHECKS: [Check; 5] = [
    Check::Chain,
    Check::State,
    Check::Invariant,
    Check::CommandIndex,
    Check::Conservation,
];

const PROJECTION_NOT_CHECKED: &str = "not checked (no --mongo-url)";

fn print_summary(o: &Outcome) {
    let (report, tip) = (o.report, &o.report.tip);
    println!("keel audit of {}", o.data.display());
    println!(
        "  snapshot    {}, opened in {:.3} s",
        o.mode.describe(),
        o.open_elapsed.as_secs_f64()
    );
    if report.attempts > 1 {
        println!(
            "  attempts    {} (divergences in earlier live snapshots: {:?}; caught up and audited again)",
            report.attempts, report.earlier_attempts
        );
    }
    println!(
        "  tip         batch {}, event {}, committed {}, hash {}",
        tip.last_batch,
        tip.last_event,
        committed_at(tip.last_committed_at_us).unwrap_or_else(|| "never".into()),
        hex(&tip.last_hash)
    );
    println!(
        "  checked     {} batches, {} events, {} aggregates, {} command ids ({} committed, {} rejected)",
        report.batches,
        report.events,
        report.aggregates,
        report.command_ids,
        report.command_ids_committed,
        report.command_ids_rejected
    );
    println!(
        "  time        {:.3} s; chain and replay {:.3} s, {:.0} events/s",
        report.elapsed.as_secs_f64(),
        report.replay_elapsed.as_secs_f64(),
        report.events_per_second()
    );
    let mut checks: Vec<String> = PRIMARY_CHECKS
        .iter()
        .map(|c| check_status(report, *c))
        .collect();
    for check in [Check::Snapshot, Check::Storage] {
        if report.count(check) > 0 {
            checks.push(check_status(report, check));
        }
    }
    println!("  checks      {}", checks.join(", "));
    println!("  laws        {}", law_names(report));
    match o.projection {
        Some(p) => print_projection(report, p),
        None => println!("  projection  {PROJECTION_NOT_CHECKED}"),
    }
    if let (Some(url), Some(compared)) = (o.url, o.served) {
        println!(
            "  served log  {} ({compared} events compared with {url})",
            check_status(report, Check::ServedLog)
        );
    }
    print_divergences(report);
}

fn law_names(report: &AuditReport) -> String {
    let names: Vec<&str> = report.laws.iter().map(|law| law.name()).collect();
    names.join(", ")
}

fn print_projection(report: &AuditReport, p: &ProjectionSummary) {
    println!(
        "  projection  {}: {} database {}, checkpoint {}",
        match report.count(Check::Projection) {
            0 => "ok".to_owned(),
            n => format!("FAILED ({n})"),
        },
        p.url,
        p.db,
        p.checkpoint.map_or_else(
            || format!("`{}` absent", p.durable),
            |c| format!(
                "`{}` at batch {} event {}",
                p.durable, c.last_batch, c.last_seq
            )
        )
    );
    let at = if p.point == p.tip {
        format!("compared at event {} (the snapshot's tip)", p.point)
    } else if p.behind() == 0 {
        format!(
            "compared at event {}, the live snapshot's tip when the audit began (a re-audit caught up to event {})",
            p.point, p.tip
        )
    } else {
        format!(
            "compared at event {}: the projection's checkpoint is {} events behind the snapshot's tip {} after waiting {:.1} s",
            p.point,
            p.behind(),
            p.tip,
            p.waited.as_secs_f64()
        )
    };
    println!(
        "              {at}; {} aggregate and {} event documents compared in {:.3} s",
        p.aggregates_compared,
        p.events_compared,
        p.elapsed.as_secs_f64()
    );
    if p.aggregates_newer + p.events_not_yet_projected + p.events_past_tip > 0 {
        println!(
            "              not compared: {} aggregate documents moved past that point, {} events not projected yet, {} event documents past the snapshot",
            p.aggregates_newer, p.events_not_yet_projected, p.events_past_tip
        );
    }
}

fn check_status(report: &AuditReport, check: Check) -> String {
    match report.count(check) {
        0 => format!("{} ok", check.as_str()),
        n => format!("{} FAILED ({n})", check.as_str()),
    }
}

fn print_divergences(report: &AuditReport) {
    let total = report.divergences_total();
    if total == 0 {
        return;
    }
    println!(
        "divergences: {total} (the first {} follow)",
        report.divergences.len()
    );
    for (n, d) in report.divergences.iter().enumerate() {
        let mut place = Vec::new();
        if let Some(aggregate) = &d.aggregate {
            place.push(format!("aggregate {aggregate}"));
        }
        if let Some(batch) = d.batch {
            place.push(format!("batch {batch}"));
        }
        if let Some(seq) = d.seq {
            place.push(format!("seq {seq}"));
        }
        println!(
            "  {}. [{}] {}: {}",
            n + 1,
            d.check.as_str(),
            place.join(", "),
            d.detail
        );
        if let (Some(expected), Some(found)) = (&d.expected, &d.found) {
            println!("     expected: {expected}");
            println!("     found:    {found}");
        }
    }
}

fn report_json(o: &Outcome) -> Value {
    let report = o.report;
    let holder_pid = match o.mode {
        SnapshotMode::Secondary { holder_pid } => holder_pid,
        SnapshotMode::ReadOnly => None,
    };
    let checks: serde_json::Map<String, Value> = Check::ALL
        .iter()
        .map(|c| (c.as_str().to_owned(), json!(report.count(*c))))
        .collect();
    let divergences: Vec<Value> = report.divergences.iter().map(divergence_json).collect();
    json!({
        "ok": report.ok(),
        "verdict": if report.ok() { "INTEGRITY_OK" } else { "INTEGRITY_FAILED" },
        "store": o.data.display().to_string(),
        "snapshot": {"mode": o.mode.as_str(), "holder_pid": holder_pid, "attempts": report.attempts,
                     "earlier_attempts_divergences": report.earlier_attempts},
        "tip": {"batch": report.tip.last_batch, "event": report.tip.last_event, "hash": hex(&report.tip.last_hash),
                "committed_at": committed_at(report.tip.last_committed_at_us)},
        "counts": {"batches": report.batches, "events": report.events, "aggregates": report.aggregates,
                   "command_ids": report.command_ids, "command_ids_committed": report.command_ids_committed,
                   "command_ids_rejected": report.command_ids_rejected},
        "timing": {"open_seconds": o.open_elapsed.as_secs_f64(), "elapsed_seconds": report.elapsed.as_secs_f64(),
                   "replay_seconds": report.replay_elapsed.as_secs_f64(), "events_per_second": report.events_per_second()},
        "checks": checks,
        "conservation_laws": report.laws.iter().map(|law| json!({
            "name": law.name(), "statement": law.statement(), "scope": law.scope().as_str(),
        })).collect::<Vec<_>>(),
        "projection": o.projection.map_or_else(
            || json!({"checked": false, "reason": PROJECTION_NOT_CHECKED}),
            |p| p.json(report.count(Check::Projection)),
        ),
        "served_log": o.url.map(|u| json!({"url": u, "events_compared": o.served})),
        "divergences_total": report.divergences_total(),
        "divergences": divergences,
    })
}

fn divergence_json(d: &Divergence) -> Value {
    json!({"check": d.check.as_str(), "batch": d.batch, "seq": d.seq, "aggregate": d.aggregate,
           "expected": d.expected, "found": d.found, "detail": d.detail})
}

fn committed_at(us: u64) -> Option<String> {
    (us > 0).then(|| wire::timestamp(us))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
