//! The `projection` check of `keel audit --mongo-url`: the MongoDB projection equals the log
//! (docs/AUDIT.md, "The projection").
//!
//! The projection trails the store, and a live projector keeps moving while it is read, so the
//! comparison has a point: the projector's checkpoint (`checkpoints/<durable>`, the last batch
//! it applied whole), or the snapshot's tip when the checkpoint is past it. Everything up to the
//! point must be projected exactly; a document that moved past the point while the audit read
//! it is compared where that is possible and otherwise counted as newer, never guessed at.
//!
//! - Every `aggregates` document is rendered again from the log's state of that aggregate (the
//!   [`LogState`] the audit replayed, at the tip or at the point, whichever its `last_seq`
//!   names) by the projector's own [`documents::aggregate_document`], and compared field by
//!   field (`updated_at` aside); every aggregate the log creates up to the point has one.
//! - Every `events` document up to the snapshot's tip is compared with the snapshot's event
//!   rendered by [`documents::event_document`], in one merge over both in sequence order; every
//!   event up to the point has one.
//! - The checkpoint names a batch of the log with that batch's hash and last event.

use crate::command::MongoRequest;
use crate::{
    AggregateAt, AuditReport, Check, Divergence, LogState, Snapshot, SnapshotMode, shorten,
};
use anyhow::{Context, bail};
use keel_engine::format::hex;
use keel_projection::documents::{self, Checkpoint, bson_u64};
use keel_projection::store::{AGGREGATES, CHECKPOINTS, EVENTS, Store};
use keel_sequencer::CommittedEvent;
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::{ClientOptions, ReadPreference, SelectionCriteria};
use mongodb::{Client, Cursor, Database};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Events read from the snapshot at a time, for the merge with the `events` collection.
const EVENTS_PAGE: usize = 2000;
/// Longest `expected`/`found` text of a divergence (documents with 4 KiB memos are long).
const SHOWN_CHARS_MAX: usize = 600;

/// Where the projection lives and how long to wait for it.
pub struct ProjectionTarget {
    runtime: tokio::runtime::Runtime,
    store: Store,
    url: String,
    db_name: String,
    durable: String,
}

/// What the comparison covered.
#[derive(Debug, Default)]
pub struct ProjectionSummary {
    pub url: String,
    pub db: String,
    pub durable: String,
    pub checkpoint: Option<Checkpoint>,
    /// The event sequence the projection is compared at.
    pub point: u64,
    /// The snapshot's last event, and how long the audit waited for the projection to reach it.
    pub tip: u64,
    pub waited: Duration,
    pub aggregates_compared: u64,
    /// Aggregate documents the projector moved past the point while the audit read them.
    pub aggregates_newer: u64,
    pub events_compared: u64,
    /// Event documents after the point that were not projected yet (allowed: they are past the
    /// checkpoint), and event documents after the snapshot's tip (a live store moved on).
    pub events_not_yet_projected: u64,
    pub events_past_tip: u64,
    /// Time spent comparing (after the wait).
    pub elapsed: Duration,
}

impl ProjectionSummary {
    /// The events the projection's checkpoint is behind the snapshot's tip.
    pub fn behind(&self) -> u64 {
        self.tip
            .saturating_sub(self.checkpoint.map_or(0, |c| c.last_seq))
    }

    pub fn json(&self, divergences: u64) -> Value {
        let checkpoint = self.checkpoint.map(|c| {
            json!({"batch": c.last_batch, "event": c.last_seq,
                   "hash": hex(&c.last_hash)})
        });
        json!({
            "checked": true, "url": self.url, "db": self.db, "durable": self.durable,
            "checkpoint": checkpoint, "point": self.point, "snapshot_tip": self.tip,
            "behind_events": self.behind(), "waited_seconds": self.waited.as_secs_f64(),
            "compare_seconds": self.elapsed.as_secs_f64(),
            "aggregates_compared": self.aggregates_compared, "aggregates_newer": self.aggregates_newer,
            "events_compared": self.events_compared,
            "events_not_yet_projected": self.events_not_yet_projected,
            "events_past_tip": self.events_past_tip, "divergences": divergences,
        })
    }
}

impl ProjectionTarget {
    /// Prepares a client (the driver connects on first use).
    pub fn connect(request: &MongoRequest) -> anyhow::Result<Self> {
        let (url, db, durable) = (&request.url, &request.db, &request.durable);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime for MongoDB")?;
        let shown = request.url_shown.clone();
        let client = runtime.block_on(async {
            let mut options = ClientOptions::parse(url.as_str())
                .await
                .with_context(|| format!("--mongo-url {shown}"))?;
            options.app_name = Some("keel-audit".into());
            // Every read from the primary: a lagging secondary would show a checkpoint's
            // documents missing.
            options.selection_criteria =
                Some(SelectionCriteria::ReadPreference(ReadPreference::Primary));
            options.connect_timeout = Some(Duration::from_secs(5));
            options.server_selection_timeout = Some(Duration::from_secs(10));
            Client::with_options(options).with_context(|| format!("--mongo-url {shown}"))
        })?;
        Ok(Self {
            runtime,
            store: Store::with_database(client.database(db), durable),
            url: shown,
            db_name: db.clone(),
            durable: durable.clone(),
        })
    }

    /// Reads the checkpoint, waiting up to `wait` for it to reach the snapshot's last event
    /// `tip`; returns the point to compare at and what the wait found.
    pub fn wait_for(&self, tip: u64, wait: Duration) -> anyhow::Result<ProjectionSummary> {
        let started = Instant::now();
        let mut told = false;
        let checkpoint = loop {
            let checkpoint = self.runtime.block_on(self.checkpoint())?;
            let reached = checkpoint.is_some_and(|c| c.last_seq >= tip);
            if reached || tip == 0 || started.elapsed() >= wait {
                break checkpoint;
            }
            if !told {
                told = true;
                eprintln!(
                    "keel audit: waiting up to {:.0} s for the projection to reach event {tip} (its checkpoint is at event {})",
                    wait.as_secs_f64(),
                    checkpoint.map_or(0, |c| c.last_seq)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        Ok(ProjectionSummary {
            url: self.url.clone(),
            db: self.db_name.clone(),
            durable: self.durable.clone(),
            checkpoint,
            point: checkpoint.map_or(0, |c| c.last_seq).min(tip),
            tip,
            waited: started.elapsed(),
            ..ProjectionSummary::default()
        })
    }

    async fn checkpoint(&self) -> anyhow::Result<Option<Checkpoint>> {
        self.store.checkpoint().await.with_context(|| {
            format!(
                "reading {CHECKPOINTS} from {} (`{}`)",
                self.url, self.durable
            )
        })
    }

    /// Compares the projection with the log at `summary.point`, recording every difference in
    /// `report` as a [`Check::Projection`] divergence.
    pub fn compare(
        &self,
        snapshot: &Snapshot,
        log: &LogState,
        summary: &mut ProjectionSummary,
        report: &mut AuditReport,
    ) -> anyhow::Result<()> {
        // The audit may have caught a live snapshot up and audited again: its tip is final.
        summary.tip = report.tip.last_event;
        summary.point = summary.point.min(log.point());
        let mut run = Compare {
            snapshot,
            log,
            live: matches!(snapshot.mode(), SnapshotMode::Secondary { .. }),
            summary,
            report,
            url: &self.url,
            commit_times: HashMap::new(),
        };
        let started = Instant::now();
        run.checkpoint()?;
        self.runtime.block_on(async {
            run.aggregates(self.store.database()).await?;
            run.events(self.store.database()).await
        })?;
        summary.elapsed = started.elapsed();
        // A projection dropped (`keel project --rebuild`) or restored while it was read would
        // show as damage; refuse a verdict instead.
        let before = summary.checkpoint.map_or(0, |c| c.last_seq);
        let after = self.runtime.block_on(self.checkpoint())?;
        if before > 0 && after.is_none_or(|c| c.last_seq < before) {
            bail!(
                "the projection's checkpoint went from event {before} to {} while the audit read it \
                 (rebuilt or restored?); run the audit again",
                after.map_or_else(|| "nothing".to_owned(), |c| format!("event {}", c.last_seq))
            );
        }
        Ok(())
    }
}

/// One comparison's working state.
struct Compare<'a> {
    snapshot: &'a Snapshot,
    log: &'a LogState,
    /// The snapshot is of a live server, so the projection may legitimately be past it.
    live: bool,
    summary: &'a mut ProjectionSummary,
    report: &'a mut AuditReport,
    url: &'a str,
    /// Commit time of each batch looked up so far (`None`: its header cannot be read).
    commit_times: HashMap<u64, Option<u64>>,
}

impl Compare<'_> {
    fn record(&mut self, divergence: Divergence) {
        self.report.record(divergence);
    }

    /// The checkpoint must name a batch of the log, with its hash and last event.
    fn checkpoint(&mut self) -> anyhow::Result<()> {
        let tip = self.report.tip;
        let Some(checkpoint) = self.summary.checkpoint else {
            if tip.last_event > 0 {
                let detail = format!(
                    "no checkpoint `{}` in database `{}` of {}: the projection holds nothing the audit can place (not built yet, or --mongo-db/--mongo-durable name another)",
                    self.summary.durable, self.summary.db, self.url
                );
                self.record(Divergence::new(Check::Projection, detail));
            }
            return Ok(());
        };
        if checkpoint.last_batch > tip.last_batch {
            if !self.live {
                let detail = format!(
                    "checkpoint `{}` is at batch {} but the store ends at batch {}: the store is behind its projection: data loss (the projection holds batches the store does not)",
                    self.summary.durable, checkpoint.last_batch, tip.last_batch
                );
                let d = Divergence::new(Check::Projection, detail)
                    .at_batch(Some(checkpoint.last_batch));
                self.record(d);
            }
            return Ok(());
        }
        let header = self.snapshot.batch_header(checkpoint.last_batch)?;
        let expected = header.map(|h| (h.last_event(), h.hash, h.committed_at_us / 1000 * 1000));
        let found = (
            checkpoint.last_seq,
            checkpoint.last_hash,
            checkpoint.committed_at_us,
        );
        if expected != Some(found) {
            let describe = |(event, hash, at): (u64, [u8; 32], u64)| {
                format!(
                    "last event {event}, hash {}, committed_at_ms {}",
                    hex(&hash),
                    at / 1000
                )
            };
            let detail = format!(
                "checkpoint `{}` does not match batch {} of the log",
                self.summary.durable, checkpoint.last_batch
            );
            let d = Divergence::new(Check::Projection, detail)
                .at_batch(Some(checkpoint.last_batch))
                .at_seq(Some(checkpoint.last_seq))
                .expected_found(
                    expected.map_or_else(|| "no such batch".into(), describe),
                    describe(found),
                );
            self.record(d);
        }
        Ok(())
    }

    /// Every `aggregates` document against the log; then every aggregate the log has at the
    /// point and the projection lacks.
    async fn aggregates(&mut self, db: &Database) -> anyhow::Result<()> {
        let mut cursor: Cursor<Document> = db
            .collection::<Document>(AGGREGATES)
            .find(doc! {})
            .batch_size(1000)
            .await
            .with_context(|| format!("reading {AGGREGATES} from {}", self.url))?;
        let mut seen: HashSet<String> = HashSet::with_capacity(self.log.len());
        let mut last_print = Instant::now();
        while cursor
            .advance()
            .await
            .with_context(|| format!("reading {AGGREGATES}"))?
        {
            let document = cursor
                .deserialize_current()
                .with_context(|| format!("reading {AGGREGATES}"))?;
            if let Some(id) = self.aggregate_document(&document) {
                seen.insert(id);
            }
            if last_print.elapsed() >= Duration::from_secs(1) {
                last_print = Instant::now();
                eprintln!(
                    "keel audit: projection: {} aggregate documents read",
                    seen.len()
                );
            }
        }
        let mut missing: Vec<(&str, AggregateAt<'_>)> = self
            .log
            .iter_at_point()
            .filter(|(id, _)| !seen.contains(*id))
            .collect();
        missing.sort_by_key(|(_, at)| at.last_seq);
        for (id, at) in missing {
            let d = Divergence::new(
                Check::Projection,
                format!("{AGGREGATES}: the log has {id} at event {} and the projection has no document for it", self.summary.point),
            )
            .on(id)
            .at_seq(Some(at.last_seq))
            .at_batch(Some(at.last_batch))
            .expected_found(shown(&self.expected_aggregate(id, at)), "absent");
            self.report.record(d);
        }
        Ok(())
    }

    /// One aggregate document; returns its id when it has one.
    fn aggregate_document(&mut self, document: &Document) -> Option<String> {
        let Ok(id) = document.get_str("_id") else {
            let d = Divergence::new(
                Check::Projection,
                format!("{AGGREGATES}: a document whose _id is not an aggregate id"),
            )
            .expected_found("a string _id", shown(&extjson(document)));
            self.record(d);
            return None;
        };
        let id = id.to_owned();
        let Some(last_seq) = document.get("last_seq").and_then(bson_u64) else {
            let d = Divergence::new(
                Check::Projection,
                format!("{AGGREGATES}/{id}: last_seq is not a non-negative integer"),
            )
            .on(&id)
            .expected_found(
                match self.log.at_tip(&id) {
                    Some(at) => shown(&self.expected_aggregate(&id, at)),
                    None => "absent".into(),
                },
                shown(&extjson(document)),
            );
            self.record(d);
            return Some(id);
        };
        let (tip, point) = (self.summary.tip, self.summary.point);
        let at_tip = self.log.at_tip(&id);
        let expected = match at_tip {
            // Projected up to the aggregate's last event in the snapshot.
            Some(at) if at.last_seq == last_seq => Some(at),
            // Past the snapshot: the live store moved on.
            _ if last_seq > tip && self.live => {
                self.summary.aggregates_newer += 1;
                return Some(id);
            }
            // Past the point, before the aggregate's last event: a projector still running
            // moved it on. Its `last_seq` must name an event that touched it.
            Some(at) if last_seq > point && last_seq < at.last_seq => {
                if self.touches(last_seq, &id) {
                    self.summary.aggregates_newer += 1;
                } else {
                    let detail = format!(
                        "{AGGREGATES}/{id}: last_seq {last_seq} names an event that does not touch it"
                    );
                    let d = Divergence::new(Check::Projection, detail)
                        .on(&id)
                        .at_seq(Some(at.last_seq))
                        .at_batch(Some(at.last_batch))
                        .expected_found(
                            format!("an event of {id} after event {point}"),
                            shown(&extjson(document)),
                        );
                    self.record(d);
                }
                return Some(id);
            }
            _ => self.log.at_point(&id).filter(|at| at.last_seq == last_seq),
        };
        let Some(at) = expected else {
            let (what, place, expected) = match (self.log.at_point(&id), at_tip) {
                (Some(at), _) => (
                    format!(
                        "its last event up to event {point} is {}, the document says last_seq {last_seq}",
                        at.last_seq
                    ),
                    Some(at),
                    shown(&self.expected_aggregate(&id, at)),
                ),
                (None, Some(at)) => (
                    format!(
                        "the log creates it only after event {point} and its last event is {}, the document says last_seq {last_seq}",
                        at.last_seq
                    ),
                    Some(at),
                    shown(&self.expected_aggregate(&id, at)),
                ),
                (None, None) => (
                    format!("the log never creates it (the store ends at event {tip})"),
                    None,
                    "absent".into(),
                ),
            };
            let d = Divergence::new(Check::Projection, format!("{AGGREGATES}/{id}: {what}"))
                .on(&id)
                .at_seq(place.map(|at| at.last_seq))
                .at_batch(place.map(|at| at.last_batch))
                .expected_found(expected, shown(&extjson(document)));
            self.record(d);
            return Some(id);
        };
        self.summary.aggregates_compared += 1;
        let expected = self.expected_aggregate(&id, at);
        let mut found = document.clone();
        if expected.get("updated_at").is_none() {
            found.remove("updated_at");
        }
        let found = extjson(&found);
        if expected != found {
            let d = Divergence::new(
                Check::Projection,
                format!(
                    "{AGGREGATES}/{id} differs from the log in {}",
                    differing_fields(&expected, &found)
                ),
            )
            .on(&id)
            .at_seq(Some(at.last_seq))
            .at_batch(Some(at.last_batch))
            .expected_found(shown(&expected), shown(&found));
            self.record(d);
        }
        Some(id)
    }

    /// Whether the snapshot's event `seq` touches aggregate `id`.
    fn touches(&self, seq: u64, id: &str) -> bool {
        let events = self.snapshot.events(seq - 1, 1).unwrap_or_default();
        events
            .first()
            .filter(|e| e.seq == seq)
            .is_some_and(|e| e.logged.event.targets().iter().any(|t| t.as_str() == id))
    }

    /// The aggregate document the projector writes for `at`. `updated_at` is the commit time
    /// of the batch of its last event; left out when that header cannot be read (a store
    /// that lacks it fails the chain check).
    fn expected_aggregate(&mut self, id: &str, at: AggregateAt<'_>) -> Value {
        let committed_at = match self.commit_times.get(&at.last_batch) {
            Some(known) => *known,
            None => {
                let header = self.snapshot.batch_header(at.last_batch).ok().flatten();
                let time = header.map(|h| h.committed_at_us);
                self.commit_times.insert(at.last_batch, time);
                time
            }
        };
        let mut document =
            documents::aggregate_document(id, at.aggregate, at.last_seq, committed_at.unwrap_or(0));
        if committed_at.is_none() {
            document.remove("updated_at");
        }
        extjson(&document)
    }

    /// Every `events` document against the snapshot's event of that sequence, read in the
    /// server's natural order (no sort: a server's sort is not trusted to be numeric, and
    /// nx-27017's is not); which sequences were seen is kept in a bitmap, one bit per event.
    async fn events(&mut self, db: &Database) -> anyhow::Result<()> {
        let tip = self.summary.tip;
        let mut cursor: Cursor<Document> = db
            .collection::<Document>(EVENTS)
            .find(doc! {})
            .batch_size(1000)
            .await
            .with_context(|| format!("reading {EVENTS} from {}", self.url))?;
        let mut ours = OurEvents::new(self.snapshot);
        let words = usize::try_from(tip / 64 + 1).context("the log is too long to audit here")?;
        let mut seen = vec![0u64; words];
        let mut last_print = Instant::now();
        while cursor
            .advance()
            .await
            .with_context(|| format!("reading {EVENTS}"))?
        {
            let document = cursor
                .deserialize_current()
                .with_context(|| format!("reading {EVENTS}"))?;
            let Some(seq) = document.get("_id").and_then(bson_u64).filter(|s| *s > 0) else {
                let d = Divergence::new(
                    Check::Projection,
                    format!("{EVENTS}: a document whose _id is not an event sequence"),
                )
                .expected_found("an integer _id >= 1", shown(&extjson(&document)));
                self.record(d);
                continue;
            };
            if seq > tip {
                self.event_past_tip(seq);
                continue;
            }
            // `seq <= tip`, and `tip / 64` fits a usize (checked above).
            let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
            seen[word] |= bit;
            let Some(event) = ours.get(seq)? else {
                continue; // the store lacks it: the chain check reports that
            };
            self.summary.events_compared += 1;
            let expected = extjson(&documents::event_document(
                event.seq,
                event.batch,
                event.committed_at_us,
                &event.logged,
            ));
            let found = extjson(&document);
            if expected != found {
                let d = Divergence::new(
                    Check::Projection,
                    format!(
                        "{EVENTS}/{seq} differs from the log in {}",
                        differing_fields(&expected, &found)
                    ),
                )
                .at_seq(Some(seq))
                .at_batch(Some(event.batch))
                .expected_found(shown(&expected), shown(&found));
                self.record(d);
            }
            if last_print.elapsed() >= Duration::from_secs(1) {
                last_print = Instant::now();
                eprintln!(
                    "keel audit: projection: {} of {tip} events compared",
                    self.summary.events_compared
                );
            }
        }
        for range in unseen_ranges(&seen, tip) {
            self.missing_events(range);
        }
        Ok(())
    }

    fn event_past_tip(&mut self, seq: u64) {
        self.summary.events_past_tip += 1;
        if !self.live {
            let d = Divergence::new(
                Check::Projection,
                format!(
                    "{EVENTS}/{seq}: the store ends at event {}",
                    self.summary.tip
                ),
            )
            .at_seq(Some(seq))
            .expected_found("absent", format!("event {seq}"));
            self.record(d);
        }
    }

    /// Events of the log the projection has no document for: a fault up to the point (one
    /// divergence per run of consecutive events), not yet projected after it.
    fn missing_events(&mut self, (first, last): (u64, u64)) {
        let point = self.summary.point;
        if last > point {
            self.summary.events_not_yet_projected += last - first.max(point + 1) + 1;
        }
        if first > point {
            return;
        }
        let last = last.min(point);
        let range = if first == last {
            format!("event {first} is")
        } else {
            format!("events {first}..={last} ({} events) are", last - first + 1)
        };
        let count = last - first + 1;
        let batch = self
            .snapshot
            .events(first - 1, 1)
            .ok()
            .and_then(|events| events.first().filter(|e| e.seq == first).map(|e| e.batch));
        let d = Divergence::new(
            Check::Projection,
            format!("{EVENTS}: {range} missing from the projection, compared at event {point}"),
        )
        .at_seq(Some(first))
        .at_batch(batch)
        .expected_found(
            if count == 1 {
                "1 document".to_owned()
            } else {
                format!("{count} documents")
            },
            "absent",
        );
        self.record(d);
    }
}

/// Events 1..=`tip` whose bit is clear, as inclusive ranges.
fn unseen_ranges(seen: &[u64], tip: u64) -> Vec<(u64, u64)> {
    let is_seen = |seq: u64| seen[(seq / 64) as usize] & (1u64 << (seq % 64)) != 0;
    let mut ranges = Vec::new();
    let mut seq = 1;
    while seq <= tip {
        if seen[(seq / 64) as usize] == u64::MAX && seq % 64 == 0 {
            seq += 64; // a whole word seen: skip it
            continue;
        }
        if is_seen(seq) {
            seq += 1;
            continue;
        }
        let first = seq;
        while seq <= tip && !is_seen(seq) {
            seq += 1;
        }
        ranges.push((first, seq - 1));
    }
    ranges
}

/// The snapshot's events, read a page at a time around the sequences asked for: large pages
/// while the projection's documents come in sequence order, small ones when they do not.
struct OurEvents<'a> {
    snapshot: &'a Snapshot,
    page: Vec<CommittedEvent>,
}

/// Events read after a miss that does not follow the current page.
const EVENTS_PAGE_SMALL: usize = 16;

impl<'a> OurEvents<'a> {
    fn new(snapshot: &'a Snapshot) -> Self {
        Self {
            snapshot,
            page: Vec::new(),
        }
    }

    /// The snapshot's event `seq`, if it has it.
    fn get(&mut self, seq: u64) -> anyhow::Result<Option<&CommittedEvent>> {
        let in_page = |page: &[CommittedEvent]| page.binary_search_by_key(&seq, |e| e.seq).ok();
        if let Some(i) = in_page(&self.page) {
            return Ok(self.page.get(i));
        }
        let follows = self.page.last().is_some_and(|e| e.seq + 1 == seq);
        let limit = if follows || self.page.is_empty() {
            EVENTS_PAGE
        } else {
            EVENTS_PAGE_SMALL
        };
        // A page with an undecodable event or a missing header fails whole; read this event
        // alone then, and skip it if it is the broken one (the `chain` and `state` checks report it).
        self.page = match self.snapshot.events(seq - 1, limit) {
            Ok(page) => page,
            Err(_) => self.snapshot.events(seq - 1, 1).unwrap_or_default(),
        };
        Ok(in_page(&self.page).and_then(|i| self.page.get(i)))
    }
}

/// A document as relaxed extended JSON: Int32 and Int64 both become JSON numbers, so a
/// document written by another driver compares by value; a double stays a float and differs.
fn extjson(document: &Document) -> Value {
    Bson::Document(document.clone()).into_relaxed_extjson()
}

/// The top-level fields in which two documents differ, for the divergence's detail.
fn differing_fields(expected: &Value, found: &Value) -> String {
    let (Value::Object(e), Value::Object(f)) = (expected, found) else {
        return "its shape".into();
    };
    let mut fields: Vec<&str> = e
        .keys()
        .chain(f.keys())
        .filter(|k| e.get(*k) != f.get(*k))
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    fields.dedup();
    fields
        .iter()
        .map(|f| format!("`{f}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn shown(value: &Value) -> String {
    shorten(value.to_string(), SHOWN_CHARS_MAX)
}
