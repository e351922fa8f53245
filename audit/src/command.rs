//! `keel audit` as a whole: opens the snapshot, audits the store
//! ([`crate::audit_snapshot_with_log`]), optionally compares the MongoDB projection with the log
//! ([`crate::projection`]) and checks that a running server serves exactly the audited log,
//! writes the JSON report and the summary for people, and shows progress on stderr. The `keel`
//! binary (ingress) parses the flags into a [`Request`], prints the verdict line and turns it
//! into the exit code.

use crate::projection::{ProjectionSummary, ProjectionTarget};
use crate::served_log;
use crate::{
    AuditError, AuditOptions, AuditReport, Check, Divergence, Phase, Progress, Snapshot,
    SnapshotMode, audit_snapshot_with_log,
};
use anyhow::{Context, anyhow, bail};
use keel_engine::format::hex;
use keel_projection::nats::Published;
use keel_sequencer::CommittedEvent;
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

/// What `keel audit` was asked to do (its flags, parsed).
#[derive(Clone)]
pub struct Request {
    /// The store's data directory (`--data`); required, but checked here so that its absence
    /// is explained.
    pub data: Option<PathBuf>,
    /// Also write the JSON report to this file.
    pub json: Option<PathBuf>,
    /// Most divergences listed (all are counted).
    pub max_divergences: usize,
    /// A running server's `http://host:port`, whose `GET /v1/events` must serve the audited log.
    pub url: Option<String>,
    /// How `url` is reached: https CA certificate, API key (scope `read`).
    pub client: keel_projection::http_client::ClientOptions,
    /// How that server renders one event on `GET /v1/events` (the audit knows no wire format).
    pub served_event_json: fn(&CommittedEvent) -> Value,
    /// The MongoDB projection to compare with the log.
    pub mongo: Option<MongoRequest>,
    /// The JetStream stream whose last batch witnesses the store's tip (`--nats-*`).
    pub nats: Option<NatsRequest>,
}

/// Where the published history is (`--nats-url`, `--nats-stream`, `--nats-subject`).
#[derive(Clone, Debug)]
pub struct NatsRequest {
    pub url: String,
    pub stream: String,
    pub subject: String,
}

/// True when `error` is damage RocksDB or the write-ahead-log check found while the audit
/// opened or read the store: a verdict (`INTEGRITY_FAILED`), not a failure to reach one.
pub fn is_storage_damage(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(cause.downcast_ref::<AuditError>(), Some(AuditError::Storage(e)) if e.is_corruption())
    })
}

/// The JetStream stream's last batch, read before the snapshot is opened: every batch in the
/// stream then was committed before the snapshot, so the snapshot must hold it.
fn read_stream_witness(nats: Option<&NatsRequest>) -> anyhow::Result<Option<Published>> {
    let Some(nats) = nats else {
        return Ok(None);
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let read = keel_projection::nats::last_published_at(&nats.url, &nats.stream, &nats.subject);
        let found = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .map_err(|_| anyhow!("--nats-url: no answer from JetStream within 10 s"))?;
        Ok(found?)
    })
}

/// Records a divergence when the store is behind (or beside) the stream's last batch.
fn compare_stream_witness(
    published: Option<Published>,
    nats: Option<&NatsRequest>,
    snapshot: &Snapshot,
    report: &mut AuditReport,
) -> anyhow::Result<()> {
    let (Some(published), Some(nats)) = (published, nats) else {
        return Ok(());
    };
    let tip = report.tip.last_batch;
    let stream = &nats.stream;
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

/// Where the projection is (`--mongo-*`).
#[derive(Clone, Debug)]
pub struct MongoRequest {
    pub url: String,
    /// The URL as reports may show it (credentials removed).
    pub url_shown: String,
    pub db: String,
    /// The projector whose checkpoint places the projection.
    pub durable: String,
    /// How long to wait for the projection to reach the snapshot's tip.
    pub wait: Duration,
}

/// Runs `keel audit` and writes its summary for people to `out`. `Ok(intact)` is a verdict,
/// `Err` means none could be reached.
pub fn run(args: &Request, out: &mut dyn Write) -> anyhow::Result<bool> {
    let Some(data) = args.data.as_deref() else {
        bail!(
            "--data DIR is required: the server has no endpoint that takes a snapshot, so the audit \
             opens the store itself (a live server's store is opened as a RocksDB secondary); \
             --url then checks that the server serves the audited log"
        );
    };
    // Parse the projection's URL before opening anything: a usage error comes first.
    let target = match &args.mongo {
        Some(mongo) => Some((ProjectionTarget::connect(mongo)?, mongo.wait)),
        None => None,
    };
    let published = read_stream_witness(args.nats.as_ref())?;
    let opening = Instant::now();
    let snapshot = Snapshot::open(data).with_context(|| format!("opening {}", data.display()))?;
    let open_elapsed = opening.elapsed();
    eprintln!(
        "keel audit: {} opened {}",
        data.display(),
        snapshot.mode().describe()
    );
    let projection = match target {
        Some((target, wait)) => {
            let tip = snapshot.tip()?.last_event;
            let summary = target.wait_for(tip, wait)?;
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
    let (mut report, log) = audit_snapshot_with_log(&snapshot, &options, &mut |p| printer.show(p))
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
    compare_stream_witness(published, args.nats.as_ref(), &snapshot, &mut report)?;
    let served = match &args.url {
        Some(url) => Some(served_log::compare(
            url,
            &args.client,
            args.served_event_json,
            &snapshot,
            &mut report,
        )?),
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
    print_summary(&outcome, out)?;
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

/// The checks every audit of a store runs (`projection` and `served_log` have lines of their
/// own; `snapshot` and `storage` are shown only when they found something).
const PRIMARY_CHECKS: [Check; 5] = [
    Check::Chain,
    Check::State,
    Check::Invariant,
    Check::CommandIndex,
    Check::Conservation,
];

const PROJECTION_NOT_CHECKED: &str = "not checked (no --mongo-url)";

fn print_summary(o: &Outcome, out: &mut dyn Write) -> std::io::Result<()> {
    let (report, tip) = (o.report, &o.report.tip);
    writeln!(out, "keel audit of {}", o.data.display())?;
    writeln!(
        out,
        "  snapshot    {}, opened in {:.3} s",
        o.mode.describe(),
        o.open_elapsed.as_secs_f64()
    )?;
    if report.attempts > 1 {
        writeln!(
            out,
            "  attempts    {} (divergences in earlier live snapshots: {:?}; caught up and audited again)",
            report.attempts, report.earlier_attempts
        )?;
    }
    writeln!(
        out,
        "  tip         batch {}, event {}, committed {}, hash {}",
        tip.last_batch,
        tip.last_event,
        committed_at(tip.last_committed_at_us).unwrap_or_else(|| "never".into()),
        hex(&tip.last_hash)
    )?;
    writeln!(
        out,
        "  checked     {} batches, {} events, {} aggregates, {} command ids ({} committed, {} rejected)",
        report.batches,
        report.events,
        report.aggregates,
        report.command_ids,
        report.command_ids_committed,
        report.command_ids_rejected
    )?;
    writeln!(
        out,
        "  log         {} rejections kept, {} rule set(s); checkpoint at batch {} (state and index compared with the log there)",
        report.rejections, report.rule_sets, report.checkpoint.batch
    )?;
    writeln!(
        out,
        "  time        {:.3} s; chain and replay {:.3} s, {:.0} events/s",
        report.elapsed.as_secs_f64(),
        report.replay_elapsed.as_secs_f64(),
        report.events_per_second()
    )?;
    if !report.submitters.is_empty() {
        let named: Vec<String> = report
            .submitters
            .iter()
            .map(|(id, batches)| format!("{id} ({batches} batches)"))
            .collect();
        writeln!(out, "  submitters  {}", named.join(", "))?;
    }
    let mut checks: Vec<String> = PRIMARY_CHECKS
        .iter()
        .map(|c| check_status(report, *c))
        .collect();
    for check in [Check::Snapshot, Check::Storage] {
        if report.count(check) > 0 {
            checks.push(check_status(report, check));
        }
    }
    writeln!(out, "  checks      {}", checks.join(", "))?;
    writeln!(out, "  rules       {}", rule_set_runs(report))?;
    writeln!(out, "  laws        {}", law_names(report))?;
    match o.projection {
        Some(p) => print_projection(report, p, out)?,
        None => writeln!(out, "  projection  {PROJECTION_NOT_CHECKED}")?,
    }
    if let (Some(url), Some(compared)) = (o.url, o.served) {
        writeln!(
            out,
            "  served log  {} ({compared} events compared with {url})",
            check_status(report, Check::ServedLog)
        )?;
    }
    print_divergences(report, out)
}

fn law_names(report: &AuditReport) -> String {
    let mut names: Vec<String> = report.laws.iter().map(|l| l.name().to_owned()).collect();
    names.extend(report.declared_laws.iter().map(|l| {
        let to = l
            .to_batch
            .map_or_else(String::new, |b| format!(" to batch {b}"));
        format!(
            "{} (definition {}, from batch {}{to})",
            l.name, l.domain_version, l.from_batch
        )
    }));
    names.join(", ")
}

/// The rule sets the log was decided under, run by run: `1a2b3c4d batches 1-40 (built-in +
/// seats@5e6f7a8b)`.
fn rule_set_runs(report: &AuditReport) -> String {
    if report.rule_set_runs.is_empty() {
        return "none (an empty log)".to_owned();
    }
    let runs: Vec<String> = report
        .rule_set_runs
        .iter()
        .map(|run| {
            let domains = match &run.domains {
                None => "text not recorded".to_owned(),
                Some(domains) => std::iter::once("built-in".to_owned())
                    .chain(
                        domains
                            .iter()
                            .map(|(name, version)| format!("{name}@{version}")),
                    )
                    .collect::<Vec<_>>()
                    .join(" + "),
            };
            format!(
                "{} batches {}-{} ({domains})",
                &hex(&run.hash)[..8],
                run.first_batch,
                run.last_batch
            )
        })
        .collect();
    runs.join(", ")
}

fn print_projection(
    report: &AuditReport,
    p: &ProjectionSummary,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    writeln!(
        out,
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
    )?;
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
    writeln!(
        out,
        "              {at}; {} aggregate and {} event documents compared in {:.3} s",
        p.aggregates_compared,
        p.events_compared,
        p.elapsed.as_secs_f64()
    )?;
    if p.aggregates_newer + p.events_not_yet_projected + p.events_past_tip > 0 {
        writeln!(
            out,
            "              not compared: {} aggregate documents moved past that point, {} events not projected yet, {} event documents past the snapshot",
            p.aggregates_newer, p.events_not_yet_projected, p.events_past_tip
        )?;
    }
    Ok(())
}

fn check_status(report: &AuditReport, check: Check) -> String {
    match report.count(check) {
        0 => format!("{} ok", check.as_str()),
        n => format!("{} FAILED ({n})", check.as_str()),
    }
}

fn print_divergences(report: &AuditReport, out: &mut dyn Write) -> std::io::Result<()> {
    let total = report.divergences_total();
    if total == 0 {
        return Ok(());
    }
    writeln!(
        out,
        "divergences: {total} (the first {} follow)",
        report.divergences.len()
    )?;
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
        writeln!(
            out,
            "  {}. [{}] {}: {}",
            n + 1,
            d.check.as_str(),
            place.join(", "),
            d.detail
        )?;
        if let (Some(expected), Some(found)) = (&d.expected, &d.found) {
            writeln!(out, "     expected: {expected}")?;
            writeln!(out, "     found:    {found}")?;
        }
    }
    Ok(())
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
                   "command_ids_rejected": report.command_ids_rejected, "rejections": report.rejections,
                   "rule_sets": report.rule_sets},
        "submitters": report.submitters.iter().map(|(id, batches)| json!({"key_id": id, "batches": batches})).collect::<Vec<_>>(),
        "checkpoint": {"batch": report.checkpoint.batch, "event": report.checkpoint.last_event,
                       "hash": hex(&report.checkpoint.hash)},
        "timing": {"open_seconds": o.open_elapsed.as_secs_f64(), "elapsed_seconds": report.elapsed.as_secs_f64(),
                   "replay_seconds": report.replay_elapsed.as_secs_f64(), "events_per_second": report.events_per_second()},
        "checks": checks,
        "conservation_laws": report.laws.iter().map(|law| json!({
            "name": law.name(), "statement": law.statement(), "scope": law.scope().as_str(),
        })).chain(report.declared_laws.iter().map(|law| json!({
            "name": law.name, "statement": law.statement, "scope": law.scope.as_str(),
            "domain_version": law.domain_version, "from_batch": law.from_batch, "to_batch": law.to_batch,
        }))).collect::<Vec<_>>(),
        "rule_sets": report.rule_set_runs.iter().map(|run| json!({
            "hash": hex(&run.hash), "first_batch": run.first_batch, "last_batch": run.last_batch,
            "batches": run.batches,
            "domains": run.domains.as_ref().map(|domains| domains.iter().map(|(name, version)| json!({
                "name": name, "version": version,
            })).collect::<Vec<_>>()),
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

/// A commit time as RFC 3339 with microseconds, as the server shows it (`None`: never).
fn committed_at(us: u64) -> Option<String> {
    (us > 0).then(|| {
        humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(us)).to_string()
    })
}
