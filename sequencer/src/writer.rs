//! The writer thread: group commit over the bounded queue.

use crate::cache::{Cache, Undo};
use crate::checkpoint::{Done, Ids, Job, Map, Published, Recovered, Work};
use crate::{
    ItemResult, Message, PoisonOnPanic, ReadError, Reply, Responder, Shared, Submission,
    SubmitError,
};
use keel_engine::{CheckpointMark, Engine, PendingBatch};
use keel_invariants::{
    Aggregate, AggregateId, CommandOutcome, Envelope, Event, LoggedRejection, RejectCode,
    Rejection, apply, codec, decide_at,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub(crate) struct Writer {
    engine: Engine,
    cache: Cache,
    config: crate::Config,
    shared: Arc<Shared>,
    pending: PendingBatch,
    /// A submission taken from the queue that did not fit the previous batch.
    carry: Option<Submission>,
    scratch: Scratch,
    checkpoints: Checkpoints,
}

/// The writer's side of checkpointing (see `checkpoint.rs`).
pub(crate) struct Checkpoints {
    /// Aggregates changed since the last checkpoint handed to the thread, each once (the
    /// cache's stamps tell a first change: see [`crate::cache::Changed`]).
    pub(crate) dirty: Vec<AggregateId>,
    /// Command ids decided since the last checkpoint handed to the thread.
    pub(crate) recent: Ids,
    /// The checkpoint being written: its batch and its ids (still looked up here until the
    /// checkpoint is in the store).
    pub(crate) inflight: Option<(u64, Arc<Ids>)>,
    pub(crate) jobs: Option<SyncSender<Work>>,
    pub(crate) done: Receiver<Done>,
    /// What the last finished checkpoint handed back, reused by the next.
    spare_states: Vec<(AggregateId, Aggregate)>,
    spare_ids: Option<Ids>,
    pub(crate) published: Arc<Published>,
    pub(crate) batches_since: u64,
    pub(crate) since: Instant,
    /// The batch of the last checkpoint written: the cache may evict what it holds.
    pub(crate) written: u64,
}

impl Checkpoints {
    pub(crate) fn new(
        recovered: &mut Recovered,
        jobs: SyncSender<Work>,
        done: Receiver<Done>,
        published: Arc<Published>,
    ) -> Self {
        Self {
            dirty: std::mem::take(&mut recovered.dirty),
            recent: std::mem::take(&mut recovered.ids),
            inflight: None,
            jobs: Some(jobs),
            done,
            spare_states: Vec::new(),
            spare_ids: None,
            published,
            batches_since: 0,
            since: Instant::now(),
            written: recovered.mark.batch,
        }
    }

    fn outcome(&self, id: &str) -> Option<&CommandOutcome> {
        self.recent
            .get(id)
            .or_else(|| self.inflight.as_ref().and_then(|(_, ids)| ids.get(id)))
    }

    /// Takes note of finished checkpoints; with `wait`, first waits for the one in flight.
    fn collect(&mut self, wait: bool) {
        if wait && self.inflight.is_some() {
            while let Ok(done) = self.done.recv() {
                if self.finished(done) {
                    return;
                }
            }
            // The thread is gone: it failed and poisoned the write path.
            return;
        }
        while let Ok(done) = self.done.try_recv() {
            self.finished(done);
        }
    }

    /// Takes note of what the checkpoint thread handed back; when the checkpoint in flight is
    /// written, hands its ids to the thread to be freed there. Returns whether nothing is in
    /// flight any more.
    fn finished(&mut self, done: Done) -> bool {
        match done {
            Done::Emptied(ids) => self.spare_ids = Some(ids),
            Done::Written { batch, states } => {
                self.spare_states = states;
                self.written = self.written.max(batch);
                if self
                    .inflight
                    .as_ref()
                    .is_some_and(|(inflight, _)| batch >= *inflight)
                    && let Some((_, ids)) = self.inflight.take()
                    && let Some(jobs) = &self.jobs
                {
                    // Room: the thread is idle and the channel holds two. Otherwise (the
                    // thread failed and poisoned the write path) the ids are freed here.
                    let _ = jobs.try_send(Work::Free(ids));
                }
            }
        }
        self.inflight.is_none()
    }
}

/// Per-batch working memory, kept between batches for its allocations.
#[derive(Default)]
struct Scratch {
    /// Outcomes decided in this batch, by command id (a repeat in the same batch replays it).
    outcomes: Map<String, CommandOutcome>,
    /// Aggregates changed in this batch, each once, and whether the change is their first
    /// since the last checkpoint was handed to the thread (then they join
    /// [`Checkpoints::dirty`] once the batch is durable).
    changed: Vec<(AggregateId, bool)>,
    /// Undo records of the atomic submission being decided: the prior cache entries.
    undo: Vec<Undo>,
    /// Outcomes of earlier batches, looked up once per batch for every command id.
    stored: Map<String, CommandOutcome>,
    /// Per built-in code (`RejectCode::ALL` order), then one for every declared domain's code.
    rejected_by_code: [u64; RejectCode::ALL.len() + 1],
}

/// Where the batch being decided stood before a submission, to undo it: its events, the
/// sequence of its next event, and its changed aggregates.
#[derive(Clone, Copy)]
struct Mark {
    events: usize,
    seq: u64,
    changed: usize,
}

impl Mark {
    fn of(writer: &Writer) -> Self {
        Self {
            events: writer.pending.event_count(),
            seq: writer.pending.next_event_seq(),
            changed: writer.scratch.changed.len(),
        }
    }
}

/// What the writer decided for one submission, waiting for the fsync.
struct Decided {
    reply: Responder,
    results: Vec<ItemResult>,
    committed: usize,
    enqueued_at: Instant,
}

impl Writer {
    pub(crate) fn new(
        engine: Engine,
        cache: Cache,
        config: crate::Config,
        shared: Arc<Shared>,
        checkpoints: Checkpoints,
    ) -> Self {
        Self {
            engine,
            cache,
            config,
            shared,
            pending: PendingBatch::default(),
            carry: None,
            scratch: Scratch::default(),
            checkpoints,
        }
    }

    pub(crate) fn run(mut self, rx: Receiver<Message>) {
        // First local: dropped after every other local of this frame and before `rx`.
        let shared = Arc::clone(&self.shared);
        let _poison_on_panic = PoisonOnPanic(&shared);
        let mut closing = false;
        let mut group = Vec::new();
        // What recovery replayed from the log is checkpointed at once, so that the next start
        // replays nothing of it.
        self.checkpoint(!self.checkpoints.dirty.is_empty() || !self.checkpoints.recent.is_empty());
        while let Some(first) = self.next_submission(&rx, &mut closing) {
            group.clear();
            group.push(first);
            self.fill(&rx, &mut group, &mut closing);
            self.commit_group(&mut group);
            self.checkpoint(false);
        }
        // A final checkpoint at the tip: the next start replays no log at all.
        self.checkpoint(true);
        self.checkpoints.collect(true);
        self.checkpoints.jobs = None;
        tracing::info!(tip = %self.engine.tip(), "sequencer stopped; engine closed");
    }

    /// The first submission of the next batch; `None` when it is time to stop.
    fn next_submission(
        &mut self,
        rx: &Receiver<Message>,
        closing: &mut bool,
    ) -> Option<Submission> {
        if let Some(carried) = self.carry.take() {
            return Some(carried);
        }
        loop {
            let message = if *closing {
                rx.try_recv().ok()
            } else {
                // Idle with changes not yet checkpointed: wake up to checkpoint them on time.
                match rx.recv_timeout(self.config.checkpoint_interval) {
                    Ok(message) => Some(message),
                    Err(RecvTimeoutError::Timeout) => {
                        self.checkpoint(false);
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                }
            };
            match message? {
                Message::Submit(s) => return Some(self.dequeued(s)),
                Message::Shutdown => *closing = true,
            }
        }
    }

    /// Adds queued submissions to `group` up to `batch_items_max`, lingering if configured.
    fn fill(&mut self, rx: &Receiver<Message>, group: &mut Vec<Submission>, closing: &mut bool) {
        let mut items: usize = group.iter().map(|s| s.commands.len()).sum();
        let deadline = Instant::now() + self.config.linger;
        while items < self.config.batch_items_max {
            let message = match rx.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) => {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    if wait.is_zero() || *closing {
                        return;
                    }
                    match rx.recv_timeout(wait) {
                        Ok(m) => m,
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
                    }
                }
            };
            let submission = match message {
                Message::Submit(s) => self.dequeued(s),
                Message::Shutdown => {
                    *closing = true;
                    continue;
                }
            };
            if items + submission.commands.len() > self.config.batch_items_max {
                self.carry = Some(submission);
                return;
            }
            items += submission.commands.len();
            group.push(submission);
        }
    }

    fn dequeued(&self, submission: Submission) -> Submission {
        self.shared
            .queued_items
            .fetch_sub(submission.commands.len(), Ordering::AcqRel);
        submission
    }

    /// Decides, commits with one fsync, and answers every submission of `group`.
    fn commit_group(&mut self, group: &mut Vec<Submission>) {
        if self.shared.poisoned.load(Ordering::Acquire) {
            for s in group.drain(..) {
                s.reply.send(Err(SubmitError::Poisoned));
            }
            return;
        }
        let decided = match self.decide_group(group) {
            Ok(decided) => decided,
            Err(error) => {
                self.shared.poison(&error.to_string());
                for s in group.drain(..) {
                    s.reply.send(Err(SubmitError::Poisoned));
                }
                return;
            }
        };
        self.stage_rejections();
        let started = Instant::now();
        let committed = self.engine.commit(&mut self.pending);
        let fsync_seconds = started.elapsed().as_secs_f64();
        match committed {
            Ok(header) => {
                let durable_at_us = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64);
                // Published before the answers: a client reads its own writes.
                if let Some(header) = &header {
                    self.publish_changes(header.seq);
                }
                let batch = header.map(|h| h.seq);
                let submissions = decided.len();
                let committed_at_us = self.pending.committed_at_us();
                for d in decided {
                    metrics::histogram!("keel_queue_wait_seconds")
                        .record(d.enqueued_at.elapsed().as_secs_f64());
                    let batch = if d.committed > 0 { batch } else { None };
                    d.reply.send(Ok(Reply {
                        batch,
                        committed_at_us,
                        results: d.results,
                    }));
                }
                // After the answers, so that the requests' tasks are woken before the many
                // that the note wakes (live subscriptions).
                if let Some(header) = &header {
                    self.notify_durable(header, durable_at_us);
                }
                // The bookkeeping no answer waits for: it runs while the clients read their
                // answers, and before the next batch is decided (which looks ids up in it).
                self.keep_for_checkpoint(header.is_some());
                self.record_metrics(header.map_or(0, |h| h.count), fsync_seconds, submissions);
            }
            Err(error) => {
                // The cache now holds effects that are not durable. Nothing of this batch is
                // acknowledged, and nothing is ever written again by this process.
                self.shared.poison(&error.to_string());
                for d in decided {
                    d.reply.send(Err(SubmitError::Poisoned));
                }
            }
        }
    }

    /// Tells listeners (live subscriptions) that `header`'s batch is durable (its fsync returned
    /// at `durable_at_us`): one send on a bounded, lossy channel that never blocks, nothing per
    /// listener. Errors only mean that nobody listens.
    fn notify_durable(&self, header: &keel_engine::BatchHeader, durable_at_us: u64) {
        let _ = self.shared.durable.send(crate::DurableBatch {
            batch: header.seq,
            first_event: header.first_event,
            events: header.count,
            durable_at_us,
        });
    }

    fn record_metrics(&mut self, events: u32, fsync_seconds: f64, submissions: usize) {
        metrics::counter!("keel_items_committed_total").increment(u64::from(events));
        if events > 0 {
            metrics::counter!("keel_batches_committed_total").increment(1);
            metrics::histogram!("keel_batch_items").record(f64::from(events));
        }
        metrics::histogram!("keel_fsync_seconds").record(fsync_seconds);
        metrics::histogram!("keel_batch_requests").record(submissions as f64);
        metrics::gauge!("keel_queue_items")
            .set(self.shared.queued_items.load(Ordering::Acquire) as f64);
        let codes = RejectCode::ALL.iter().map(|code| code.as_str());
        for (code, count) in codes
            .chain(std::iter::once("domain_rule"))
            .zip(self.scratch.rejected_by_code.iter_mut())
        {
            if *count > 0 {
                metrics::counter!("keel_items_rejected_total", "code" => code.to_owned())
                    .increment(*count);
                *count = 0;
            }
        }
    }

    fn decide_group(&mut self, group: &mut Vec<Submission>) -> Result<Vec<Decided>, ReadError> {
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        self.engine.begin(&mut self.pending, now_us);
        self.scratch.outcomes.clear();
        self.scratch.changed.clear();
        self.load_stored_outcomes(group)?;
        self.cache.begin(self.engine.tip().last_batch + 1);
        // With more aggregates in the store than in memory: what the group's commands target
        // and the cache does not hold, read from the checkpoint in one multi-get.
        let engine = &self.engine;
        self.cache.prefetch(
            group
                .iter()
                .flat_map(|s| s.commands.iter())
                .flat_map(|c| c.command.targets().iter()),
            |keys| Ok(engine.checkpointed_states(keys)?),
        )?;
        // Dry runs first (a stable sort keeps every other order): decided against the committed
        // state alone, they never see effects whose fsync has not returned.
        group.sort_by_key(|s| !s.dry_run);
        let mut decided = Vec::with_capacity(group.len());
        for submission in group.drain(..) {
            if submission.dry_run {
                self.dry_run(submission);
                continue;
            }
            let before = self.pending.written();
            let (results, committed) =
                self.decide_submission(&submission.commands, submission.atomic);
            // The record names who submitted what it holds: a submission that only replayed
            // earlier answers added nothing to it.
            if let Some(submitter) = &submission.submitter
                && self.pending.written() != before
            {
                self.pending.add_submitter(submitter);
            }
            decided.push(Decided {
                reply: submission.reply,
                results,
                committed,
                enqueued_at: submission.enqueued_at,
            });
        }
        Ok(decided)
    }

    /// Looks up, in one multi-get, the stored outcome of every command id in the group.
    fn load_stored_outcomes(&mut self, group: &[Submission]) -> Result<(), ReadError> {
        self.scratch.stored.clear();
        // Each id is looked up once per batch: in the ids decided since the last checkpoint
        // (in memory; a hit, a retry, is copied into `stored`), and the rest in the
        // checkpointed index with one multi-get. Deciding then looks only at `stored`.
        let mut missing: Vec<&[u8]> =
            Vec::with_capacity(group.iter().map(|s| s.commands.len()).sum());
        for id in group
            .iter()
            .flat_map(|s| s.commands.iter())
            .filter_map(|c| c.id.as_deref())
        {
            match self.checkpoints.outcome(id) {
                Some(outcome) => {
                    self.scratch.stored.insert(id.to_owned(), outcome.clone());
                }
                None => missing.push(id.as_bytes()),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        // Sorted, and each id once: RocksDB then skips its own (slower) sort.
        missing.sort_unstable();
        missing.dedup();
        let found = self.engine.command_outcomes(&missing)?;
        for (id, value) in missing.iter().zip(found) {
            if let Some(bytes) = value {
                let outcome = codec::decode_outcome(&bytes)?;
                self.scratch
                    .stored
                    .insert(String::from_utf8_lossy(id).into_owned(), outcome);
            }
        }
        Ok(())
    }

    /// Decides a dry run exactly as [`Writer::decide_submission`] would, answers it at once, and
    /// forgets it: the cache, the pending record and the batch's command ids are as before.
    /// Runs before any other submission of the group (see `decide_group`), so the aggregates
    /// it marked changed were changed by it alone.
    fn dry_run(&mut self, submission: Submission) {
        let mark = Mark::of(self);
        let (results, _) = self.decide_commands(&submission.commands, submission.atomic, true);
        self.discard(&submission.commands, &results, mark);
        metrics::counter!("keel_dry_runs_total").increment(1);
        submission.reply.send(Ok(Reply {
            batch: None,
            committed_at_us: self.pending.committed_at_us(),
            results,
        }));
    }

    /// Decides every command of one submission in order; rolls all of it back when it is atomic
    /// and any command was rejected. Returns the results and how many committed.
    fn decide_submission(
        &mut self,
        commands: &[Envelope],
        atomic: bool,
    ) -> (Vec<ItemResult>, usize) {
        let (results, committed) = self.decide_commands(commands, atomic, false);
        for result in &results {
            if let ItemResult::Rejected {
                rejection,
                replayed: false,
            } = result
            {
                self.scratch.rejected_by_code[rejection.code.index()] += 1;
            }
        }
        (results, committed)
    }

    /// Decides `commands` in order, keeping undo records when the submission is `atomic` or
    /// `undoable` (a dry run), and rolls an atomic one back when any command was rejected.
    fn decide_commands(
        &mut self,
        commands: &[Envelope],
        atomic: bool,
        undoable: bool,
    ) -> (Vec<ItemResult>, usize) {
        let mark = Mark::of(self);
        self.scratch.undo.clear();
        let mut results = Vec::with_capacity(commands.len());
        let mut committed = 0;
        let mut fresh_rejections = 0;
        for envelope in commands {
            let result = self.decide_one(envelope, atomic || undoable);
            match &result {
                ItemResult::Committed {
                    replayed: false, ..
                } => committed += 1,
                ItemResult::Rejected {
                    replayed: false, ..
                } => fresh_rejections += 1,
                _ => {}
            }
            results.push(result);
        }
        if atomic && fresh_rejections > 0 {
            self.roll_back(commands, &mut results, mark);
            committed = 0;
        }
        (results, committed)
    }

    /// `undoable`: keep the prior state of every aggregate changed, for a roll-back.
    fn decide_one(&mut self, envelope: &Envelope, undoable: bool) -> ItemResult {
        if let Some(outcome) = envelope.id.as_deref().and_then(|id| self.known_outcome(id)) {
            return match outcome {
                CommandOutcome::Committed { seq } => ItemResult::Committed {
                    seq,
                    replayed: true,
                },
                CommandOutcome::Rejected(rejection) => ItemResult::Rejected {
                    rejection,
                    replayed: true,
                },
            };
        }
        let cache = &self.cache;
        let now = self.pending.committed_at_us();
        let outcome = match decide_at(envelope, |id| cache.get(id), now) {
            Ok(event) => {
                let command_id = envelope.id.as_deref();
                let seq = self
                    .pending
                    .push_event(|out| codec::encode_event_parts(command_id, &event, out));
                self.apply_to_cache(&event, undoable);
                CommandOutcome::Committed { seq }
            }
            Err(rejection) => CommandOutcome::Rejected(rejection),
        };
        if let Some(id) = &envelope.id {
            self.scratch.outcomes.insert(id.clone(), outcome.clone());
        }
        match outcome {
            CommandOutcome::Committed { seq } => ItemResult::Committed {
                seq,
                replayed: false,
            },
            CommandOutcome::Rejected(rejection) => ItemResult::Rejected {
                rejection,
                replayed: false,
            },
        }
    }

    /// The outcome of a command id decided earlier in this batch or in an earlier batch.
    fn known_outcome(&self, id: &str) -> Option<CommandOutcome> {
        self.scratch
            .outcomes
            .get(id)
            .or_else(|| self.scratch.stored.get(id))
            .cloned()
    }

    fn apply_to_cache(&mut self, event: &Event, undoable: bool) {
        for (index, id) in event.targets().iter().enumerate() {
            // One lookup per target: an aggregate in the cache is folded in its own slot.
            let undo = undoable.then_some(&mut self.scratch.undo);
            let changed = self.cache.update(id, undo, |previous| {
                let next = apply(event, index, previous);
                assert_invariants(&next, event, id);
                next
            });
            if changed.first_in_batch {
                self.scratch
                    .changed
                    .push((id.clone(), changed.first_since_handed));
            }
        }
    }

    /// Undoes an atomic submission: cache entries back to their prior values, its events and
    /// outcomes dropped, and every command it committed answered `atomic_rollback`.
    /// `mark` is where the batch stood before the submission.
    fn roll_back(&mut self, commands: &[Envelope], results: &mut [ItemResult], mark: Mark) {
        self.discard(commands, results, mark);
        for result in results.iter_mut() {
            // A repeat of an id committed earlier in this same submission is rolled back too.
            let undone = matches!(
                result,
                ItemResult::Committed {
                    replayed: false,
                    ..
                }
            ) || matches!(result, ItemResult::Committed { seq, replayed: true } if *seq >= mark.seq);
            if undone {
                *result = ItemResult::Rejected {
                    rejection: Rejection::new(
                        RejectCode::AtomicRollback,
                        "rolled back: another command of this atomic request was rejected",
                    ),
                    replayed: false,
                };
            }
        }
    }

    /// Forgets what deciding `commands` did (their `results`): cache entries back to their
    /// prior values (the undo records), the events and changed aggregates after `mark`
    /// dropped, and the outcomes of the command ids they decided forgotten.
    fn discard(&mut self, commands: &[Envelope], results: &[ItemResult], mark: Mark) {
        for undo in self.scratch.undo.drain(..).rev() {
            self.cache.restore(undo);
        }
        // The undo put every stamp back: these changes are as if never made.
        self.scratch.changed.truncate(mark.changed);
        self.pending.truncate_events(mark.events);
        for (envelope, result) in commands.iter().zip(results) {
            // Forget only what this submission decided: a replayed id's outcome belongs to an
            // earlier submission and must still be written.
            let fresh = matches!(
                result,
                ItemResult::Committed {
                    replayed: false,
                    ..
                } | ItemResult::Rejected {
                    replayed: false,
                    ..
                }
            );
            if let (true, Some(id)) = (fresh, &envelope.id) {
                self.scratch.outcomes.remove(id);
            }
        }
    }

    /// Adds the outcome of every command rejected with an id in this batch to the pending
    /// record, so that the log alone gives a retry its original answer (a committed command's
    /// id travels with its event).
    /// In command-id order, so that the same decisions always make the same record bytes.
    fn stage_rejections(&mut self) {
        let mut rejected: Vec<(&String, &Rejection)> = self
            .scratch
            .outcomes
            .iter()
            .filter_map(|(id, outcome)| match outcome {
                CommandOutcome::Rejected(rejection) => Some((id, rejection)),
                CommandOutcome::Committed { .. } => None,
            })
            .collect();
        rejected.sort_unstable_by_key(|(id, _)| *id);
        for (id, rejection) in rejected {
            let logged = LoggedRejection {
                command_id: id.clone(),
                rejection: rejection.clone(),
            };
            self.pending
                .push_rejection(|out| codec::encode_rejection(&logged, out));
        }
    }

    /// After batch `batch` is durable, before its answers: publishes what it changed to the
    /// overlay readers see.
    fn publish_changes(&mut self, batch: u64) {
        self.checkpoints.published.publish(
            batch,
            &self.cache,
            self.scratch.changed.iter().map(|(id, _)| id),
        );
    }

    /// After a durable batch's answers: keeps its aggregates and ids for the next checkpoint
    /// (`written`: the batch wrote a record; one that only replayed answers changed nothing).
    fn keep_for_checkpoint(&mut self, written: bool) {
        if !written {
            return;
        }
        let fresh = self.scratch.changed.drain(..).filter(|(_, fresh)| *fresh);
        self.checkpoints.dirty.extend(fresh.map(|(id, _)| id));
        for (id, outcome) in self.scratch.outcomes.drain() {
            self.checkpoints.recent.insert(id, outcome);
        }
        self.checkpoints.batches_since += 1;
    }

    /// Hands a checkpoint to the checkpoint thread when one is due (or `force`d) and none is
    /// being written. When the changes waiting for a checkpoint pass `checkpoint_pending_max`,
    /// waits for the one in flight first: memory stays bounded whatever the disk's speed.
    fn checkpoint(&mut self, force: bool) {
        self.checkpoints.collect(false);
        // Between batches, with what the last written checkpoint holds known.
        self.cache.evict(self.checkpoints.written);
        self.shared
            .cached_aggregates
            .store(self.cache.len(), Ordering::Relaxed);
        metrics::gauge!("keel_cache_aggregates").set(self.cache.len() as f64);
        let pending = self.checkpoints.dirty.len() + self.checkpoints.recent.len();
        if pending == 0 || self.shared.poisoned.load(Ordering::Acquire) {
            return;
        }
        let due = force
            || self.checkpoints.batches_since >= self.config.checkpoint_every_batches
            || self.checkpoints.since.elapsed() >= self.config.checkpoint_interval
            || pending >= self.config.checkpoint_pending_max;
        if !due {
            return;
        }
        if self.checkpoints.inflight.is_some() {
            if !(force || pending >= self.config.checkpoint_pending_max) {
                return;
            }
            let waited = Instant::now();
            self.checkpoints.collect(true);
            metrics::histogram!("keel_checkpoint_wait_seconds")
                .record(waited.elapsed().as_secs_f64());
            if self.checkpoints.inflight.is_some() {
                return;
            }
        }
        let Some(jobs) = &self.checkpoints.jobs else {
            return;
        };
        // Copied into the states the last checkpoint handed back, in place where it can (no
        // allocation for an aggregate of the same type).
        let mut states = std::mem::take(&mut self.checkpoints.spare_states);
        let mut filled = 0;
        for id in self.checkpoints.dirty.drain(..) {
            let Some(aggregate) = self.cache.get(&id) else {
                continue;
            };
            match states.get_mut(filled) {
                Some((slot_id, slot)) => {
                    *slot_id = id;
                    slot.clone_from(aggregate);
                }
                None => states.push((id, aggregate.clone())),
            }
            filled += 1;
        }
        states.truncate(filled);
        // The next checkpoint's ids: the emptied map handed back, or one with room for as many
        // as this one (no rehashing while they grow).
        let next = match self.checkpoints.spare_ids.take() {
            Some(spare) => spare,
            None => {
                Ids::with_capacity_and_hasher(self.checkpoints.recent.len(), Default::default())
            }
        };
        let ids = Arc::new(std::mem::replace(&mut self.checkpoints.recent, next));
        let mark = CheckpointMark::at(&self.engine.tip());
        let job = Job {
            states,
            ids: Arc::clone(&ids),
            mark,
        };
        match jobs.try_send(Work::Write(job)) {
            Ok(()) => {
                self.checkpoints.inflight = Some((mark.batch, ids));
                self.cache.handed(mark.batch);
            }
            Err(
                TrySendError::Full(Work::Write(job)) | TrySendError::Disconnected(Work::Write(job)),
            ) => {
                // Unreachable with nothing in flight (room for this job and one `Free`), or
                // the thread failed and poisoned the write path; keep the changes for the next
                // attempt.
                drop(ids);
                self.checkpoints
                    .dirty
                    .extend(job.states.into_iter().map(|(id, _)| id));
                if let Ok(ids) = Arc::try_unwrap(job.ids) {
                    self.checkpoints.recent = ids;
                }
            }
            // What was sent is a `Write`: nothing else comes back.
            Err(TrySendError::Full(Work::Free(_)) | TrySendError::Disconnected(Work::Free(_))) => {}
        }
        self.checkpoints.batches_since = 0;
        self.checkpoints.since = Instant::now();
    }
}

/// The check after every apply. A real check in release builds (the only profile): `decide`
/// accepted the command, so a violation here means decide and apply disagree, a bug in the
/// domain. The batch is not committed and nothing of it is acknowledged: the panic poisons the
/// write path (see `run_writer`) and `keel serve` exits so that recovery runs.
fn assert_invariants(next: &Aggregate, event: &Event, id: &AggregateId) {
    if let Err(violation) = keel_invariants::check_invariants(next) {
        panic!(
            "invariant `{}` violated after applying a {} event to {id}: {}; \
             the batch is not committed",
            violation.invariant,
            event.type_name(),
            violation.detail
        );
    }
}
