//! The log record of format 2: everything one batch decided, in one self-checking byte string
//! stored under one key (docs/FORMAT.md, "Log record", is the reference).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | record layout = 2 |
//! | 1 | 8 | batch sequence |
//! | 9 | 8 | first event sequence (at least 1; the next event's sequence when the batch has none) |
//! | 17 | 4 | event count |
//! | 21 | 4 | rejection count |
//! | 25 | 2 | submitter count |
//! | 27 | 4 | rules text length (0 unless this is the first record under its rule set) |
//! | 31 | 8 | commit time, µs since the Unix epoch |
//! | 39 | 32 | rule-set hash |
//! | 71 | 32 | previous record's hash (zeros for batch 1) |
//! | 103 | | events: `count` x (length u32, payload) |
//! | | | rejections: `count` x (length u32, payload) |
//! | | | submitters: `count` x (length u8, UTF-8) |
//! | | | rules text (UTF-8) |
//! | end - 32 | 32 | hash: BLAKE3 of `keel.batch.v2` and every byte before it |
//!
//! Integers are big-endian. Event and rejection payloads are opaque to the engine (the
//! domain's postcard encodings). The hash covers the whole record, so no byte of a committed
//! batch can change without the chain breaking.

use crate::format::{FormatError, hex};

/// The record layout this build writes and reads.
pub const RECORD_LAYOUT: u8 = 2;
/// Bytes before the first event.
pub const RECORD_FIXED_LEN: usize = 103;
/// Bytes of the trailing hash.
pub const RECORD_HASH_LEN: usize = 32;
/// Domain separation for the batch hash.
const HASH_CONTEXT: &[u8] = b"keel.batch.v2";
/// Domain separation for a rule set's hash.
const RULES_CONTEXT: &[u8] = b"keel.rules.v1";
/// Most submitters one record names, and the longest submitter id.
pub const SUBMITTERS_MAX: usize = u16::MAX as usize;
pub const SUBMITTER_BYTES_MAX: usize = u8::MAX as usize;

/// A committed batch's header: where its events are, when it committed, the rules it was
/// decided under, and its place in the hash chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub seq: u64,
    /// The first event's sequence; when `count` is 0, the sequence the next event gets.
    pub first_event: u64,
    pub count: u32,
    /// Commands rejected in this batch whose outcome the log keeps (they carried an id).
    pub rejections: u32,
    pub committed_at_us: u64,
    pub rule_set: [u8; 32],
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

impl BatchHeader {
    /// The last event's sequence: the event before the batch when it has none.
    pub fn last_event(&self) -> u64 {
        self.first_event + u64::from(self.count) - 1
    }
}

/// The rules every batch is decided under: the text that defines them and its BLAKE3 hash.
/// The text is written into the log by the first record under it; every record names the hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSet {
    pub hash: [u8; 32],
    pub text: std::sync::Arc<str>,
}

impl RuleSet {
    pub fn new(text: &str) -> Self {
        Self {
            hash: rules_hash(text.as_bytes()),
            text: text.into(),
        }
    }
}

impl Default for RuleSet {
    /// The empty rule set (tests of the engine alone, which decides nothing).
    fn default() -> Self {
        Self::new("")
    }
}

pub fn rules_hash(text: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(RULES_CONTEXT);
    h.update(text);
    *h.finalize().as_bytes()
}

/// The parts of a record before its hash, as the engine seals them.
pub(crate) struct RecordParts<'a> {
    pub seq: u64,
    pub first_event: u64,
    pub event_count: u32,
    /// Framed events: (u32 length, payload) back to back.
    pub events: &'a [u8],
    pub rejection_count: u32,
    /// Framed rejections, like `events`.
    pub rejections: &'a [u8],
    pub submitters: &'a [String],
    /// Written only when this is the first record under the rule set.
    pub rules_text: &'a str,
    pub committed_at_us: u64,
    pub rule_set: [u8; 32],
    pub prev_hash: [u8; 32],
}

impl RecordParts<'_> {
    /// Appends the record to `out` and returns its hash.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) -> [u8; 32] {
        let start = out.len();
        let submitters = u16::try_from(self.submitters.len()).expect("bounded by the caller");
        let rules_len = u32::try_from(self.rules_text.len()).expect("rules text under 4 GiB");
        out.push(RECORD_LAYOUT);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.first_event.to_be_bytes());
        out.extend_from_slice(&self.event_count.to_be_bytes());
        out.extend_from_slice(&self.rejection_count.to_be_bytes());
        out.extend_from_slice(&submitters.to_be_bytes());
        out.extend_from_slice(&rules_len.to_be_bytes());
        out.extend_from_slice(&self.committed_at_us.to_be_bytes());
        out.extend_from_slice(&self.rule_set);
        out.extend_from_slice(&self.prev_hash);
        debug_assert_eq!(out.len() - start, RECORD_FIXED_LEN);
        out.extend_from_slice(self.events);
        out.extend_from_slice(self.rejections);
        for s in self.submitters {
            let len = u8::try_from(s.len()).expect("bounded by the caller");
            out.push(len);
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(self.rules_text.as_bytes());
        let hash = record_hash(&out[start..]);
        out.extend_from_slice(&hash);
        hash
    }
}

fn record_hash(body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(HASH_CONTEXT);
    h.update(body);
    *h.finalize().as_bytes()
}

/// A decoded, hash-verified record borrowing its bytes.
#[derive(Clone, Copy, Debug)]
pub struct RecordView<'a> {
    pub header: BatchHeader,
    events: &'a [u8],
    rejections: &'a [u8],
    submitters: &'a [u8],
    submitter_count: u16,
    rules_text: &'a str,
}

impl<'a> RecordView<'a> {
    /// Decodes and verifies the record stored under batch `seq`: layout, every length, the
    /// sequence it names, the rules text's hash when present, and the hash over every byte.
    pub fn decode(seq: u64, bytes: &'a [u8]) -> Result<Self, FormatError> {
        Self::decode_checked(seq, bytes, true)
    }

    /// Like [`RecordView::decode`] without the hash checks (of the record and of its rules
    /// text): for reading on past a break in the chain (the audit reports the break and still
    /// replays what the damaged record's own layout holds). Never for anything that trusts the
    /// record.
    pub fn decode_unverified(seq: u64, bytes: &'a [u8]) -> Result<Self, FormatError> {
        Self::decode_checked(seq, bytes, false)
    }

    fn decode_checked(seq: u64, bytes: &'a [u8], verify: bool) -> Result<Self, FormatError> {
        let fail = |detail: String| FormatError(format!("batch {seq}: log record {detail}"));
        if bytes.len() < RECORD_FIXED_LEN + RECORD_HASH_LEN {
            return Err(fail(format!(
                "of {} bytes, shorter than the {} of an empty record",
                bytes.len(),
                RECORD_FIXED_LEN + RECORD_HASH_LEN
            )));
        }
        if bytes[0] != RECORD_LAYOUT {
            return Err(fail(format!(
                "has layout {}, this build reads {RECORD_LAYOUT}",
                bytes[0]
            )));
        }
        let (body, stored_hash) = bytes.split_at(bytes.len() - RECORD_HASH_LEN);
        let computed = if verify {
            record_hash(body)
        } else {
            array(stored_hash)
        };
        if computed != stored_hash {
            return Err(fail(format!(
                "does not match its hash {} (computed {})",
                hex(stored_hash),
                hex(&computed)
            )));
        }
        let u64_at = |at: usize| u64::from_be_bytes(array(&bytes[at..at + 8]));
        let u32_at = |at: usize| u32::from_be_bytes(array(&bytes[at..at + 4]));
        let header = BatchHeader {
            seq: u64_at(1),
            first_event: u64_at(9),
            count: u32_at(17),
            rejections: u32_at(21),
            committed_at_us: u64_at(31),
            rule_set: array(&bytes[39..71]),
            prev_hash: array(&bytes[71..103]),
            hash: array(stored_hash),
        };
        let submitter_count = u16::from_be_bytes(array(&bytes[25..27]));
        let rules_len = u32_at(27) as usize;
        if header.seq != seq {
            return Err(fail(format!("names batch {}", header.seq)));
        }
        let valid_range = header.seq > 0
            && header.first_event > 0
            && header
                .first_event
                .checked_add(u64::from(header.count))
                .is_some();
        if !valid_range {
            return Err(fail(format!(
                "names {} events from event {}; batches and events are numbered from 1",
                header.count, header.first_event
            )));
        }
        let mut at = RECORD_FIXED_LEN;
        let events =
            frames(body, &mut at, header.count).map_err(|e| fail(format!("events: {e}")))?;
        let rejections = frames(body, &mut at, header.rejections)
            .map_err(|e| fail(format!("rejections: {e}")))?;
        let submitters_start = at;
        for _ in 0..submitter_count {
            let len = *body
                .get(at)
                .ok_or_else(|| fail("submitters run past the end".into()))?;
            at += 1 + usize::from(len);
            let id = body
                .get(at - usize::from(len)..at)
                .ok_or_else(|| fail("submitters run past the end".into()))?;
            std::str::from_utf8(id).map_err(|_| fail("a submitter id is not UTF-8".into()))?;
        }
        let submitters = &body[submitters_start..at];
        let rules = body
            .get(at..)
            .filter(|rest| rest.len() == rules_len)
            .ok_or_else(|| {
                fail(format!(
                    "has {} bytes after its submitters, its header promises a rules text of {rules_len}",
                    body.len() - at
                ))
            })?;
        let rules_text =
            std::str::from_utf8(rules).map_err(|_| fail("rules text is not UTF-8".into()))?;
        if verify && !rules_text.is_empty() && rules_hash(rules) != header.rule_set {
            return Err(fail(format!(
                "carries a rules text whose hash is not the rule set {} it names",
                hex(&header.rule_set)
            )));
        }
        Ok(Self {
            header,
            events,
            rejections,
            submitters,
            submitter_count,
            rules_text,
        })
    }

    /// Every event's (sequence, payload), in order.
    pub fn events(&self) -> impl Iterator<Item = (u64, &'a [u8])> + use<'a> {
        let first = self.header.first_event;
        Frames(self.events)
            .enumerate()
            .map(move |(i, payload)| (first + i as u64, payload))
    }

    /// Every rejection's payload, in order.
    pub fn rejections(&self) -> impl Iterator<Item = &'a [u8]> + use<'a> {
        Frames(self.rejections)
    }

    /// The key ids of the clients that submitted this batch's requests.
    pub fn submitters(&self) -> Vec<&'a str> {
        let mut out = Vec::with_capacity(usize::from(self.submitter_count));
        let mut rest = self.submitters;
        while let Some((&len, tail)) = rest.split_first() {
            let (id, tail) = tail.split_at(usize::from(len));
            // Checked to be UTF-8 by `decode`.
            out.push(std::str::from_utf8(id).unwrap_or_default());
            rest = tail;
        }
        out
    }

    /// The rules text, when this is the first record under its rule set; empty otherwise.
    pub fn rules_text(&self) -> &'a str {
        self.rules_text
    }
}

/// Checks `count` length-prefixed frames starting at `at` and returns their bytes.
fn frames<'a>(body: &'a [u8], at: &mut usize, count: u32) -> Result<&'a [u8], String> {
    let start = *at;
    for i in 0..count {
        let len = body
            .get(*at..*at + 4)
            .map(|b| u32::from_be_bytes(array(b)) as usize)
            .ok_or_else(|| format!("frame {i} of {count} runs past the end"))?;
        *at = at
            .checked_add(4 + len)
            .filter(|end| *end <= body.len())
            .ok_or_else(|| format!("frame {i} of {count} ({len} bytes) runs past the end"))?;
    }
    Ok(&body[start..*at])
}

/// Iterates checked frames.
struct Frames<'a>(&'a [u8]);

impl<'a> Iterator for Frames<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.0.len() < 4 {
            return None;
        }
        let len = u32::from_be_bytes(array(&self.0[..4])) as usize;
        let (frame, rest) = self.0[4..].split_at(len);
        self.0 = rest;
        Some(frame)
    }
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    out
}

/// Appends one frame (u32 length, then what `payload` writes) to `out`.
pub(crate) fn push_frame(out: &mut Vec<u8>, payload: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    payload(out);
    let len = u32::try_from(out.len() - at - 4).expect("a frame under 4 GiB");
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn framed(payloads: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            push_frame(&mut out, |o| o.extend_from_slice(p));
        }
        out
    }

    fn record(
        events: &[Vec<u8>],
        rejections: &[Vec<u8>],
        submitters: &[String],
        rules: &str,
    ) -> (Vec<u8>, [u8; 32]) {
        let (e, r) = (framed(events), framed(rejections));
        let parts = RecordParts {
            seq: 3,
            first_event: 10,
            event_count: events.len() as u32,
            events: &e,
            rejection_count: rejections.len() as u32,
            rejections: &r,
            submitters,
            rules_text: rules,
            committed_at_us: 42,
            rule_set: rules_hash(rules.as_bytes()),
            prev_hash: [7; 32],
        };
        let mut out = Vec::new();
        let hash = parts.encode(&mut out);
        (out, hash)
    }

    proptest! {
        #[test]
        fn round_trips(
            events in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..8),
            rejections in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..4),
            submitters in prop::collection::vec("[a-z]{0,12}", 0..3),
            rules in "[ -~]{0,30}",
        ) {
            let (bytes, hash) = record(&events, &rejections, &submitters, &rules);
            let view = RecordView::decode(3, &bytes).expect("decodes");
            prop_assert_eq!(view.header.hash, hash);
            prop_assert_eq!(view.header.count as usize, events.len());
            let got: Vec<(u64, Vec<u8>)> = view.events().map(|(s, p)| (s, p.to_vec())).collect();
            let want: Vec<(u64, Vec<u8>)> = events.iter().enumerate().map(|(i, p)| (10 + i as u64, p.clone())).collect();
            prop_assert_eq!(got, want);
            let got: Vec<Vec<u8>> = view.rejections().map(<[u8]>::to_vec).collect();
            prop_assert_eq!(got, rejections);
            prop_assert_eq!(view.submitters(), submitters.iter().map(String::as_str).collect::<Vec<_>>());
            prop_assert_eq!(view.rules_text(), rules.as_str());
        }

        #[test]
        fn refuses_any_flipped_bit_and_any_cut(
            events in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..6),
            at in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let (mut bytes, _) = record(&events, &[vec![1, 2]], &["k1".to_string()], "rules");
            let cut = at.index(bytes.len());
            prop_assert!(RecordView::decode(3, &bytes[..cut]).is_err());
            bytes[cut] ^= 1 << bit;
            prop_assert!(RecordView::decode(3, &bytes).is_err());
        }
    }

    #[test]
    fn a_record_under_another_key_is_refused() {
        let (bytes, _) = record(&[vec![1]], &[], &[], "");
        let error = RecordView::decode(4, &bytes).expect_err("names batch 3");
        assert!(error.0.contains("names batch 3"), "{error}");
    }

    #[test]
    fn layout_is_pinned() {
        let (bytes, hash) = record(&[vec![0xAA]], &[], &[], "");
        assert_eq!(bytes[0], 2);
        assert_eq!(&bytes[1..9], &3u64.to_be_bytes());
        assert_eq!(&bytes[9..17], &10u64.to_be_bytes());
        assert_eq!(&bytes[17..21], &1u32.to_be_bytes());
        assert_eq!(&bytes[31..39], &42u64.to_be_bytes());
        assert_eq!(&bytes[71..103], &[7; 32]);
        assert_eq!(&bytes[103..108], &[0, 0, 0, 1, 0xAA]);
        assert_eq!(bytes.len(), 103 + 5 + 32);
        assert_eq!(&bytes[108..], &hash);
    }
}
