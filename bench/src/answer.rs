//! Reading the server's answers: per-item outcomes of a batch, and error bodies.

use serde::Deserialize;
use std::borrow::Cow;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct BatchAnswer<'a> {
    #[serde(borrow)]
    results: Vec<ItemAnswer<'a>>,
}

#[derive(Deserialize)]
struct ItemAnswer<'a> {
    #[serde(borrow)]
    status: Cow<'a, str>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
    #[serde(default)]
    replayed: bool,
}

/// What one answered request held.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub committed: u64,
    pub rejected: u64,
    /// Items answered from the command-id index (a repeated id): nothing was written.
    pub replayed: u64,
    pub rejected_by_code: BTreeMap<String, u64>,
    /// Per item, in order: did it commit (and was not a replay)?
    pub committed_mask: Vec<bool>,
}

/// Parses a `POST /v1/batches` 200 answer for a request of `items` commands.
pub fn tally_batch_answer(body: &[u8], items: usize) -> Result<Tally, String> {
    let answer: BatchAnswer<'_> = serde_json::from_slice(body)
        .map_err(|e| format!("the batch answer is not the documented JSON: {e}"))?;
    if answer.results.len() != items {
        return Err(format!(
            "the answer has {} results for {items} commands",
            answer.results.len()
        ));
    }
    let mut tally = Tally {
        committed_mask: Vec::with_capacity(items),
        ..Tally::default()
    };
    for item in &answer.results {
        tally.replayed += u64::from(item.replayed);
        match item.status.as_ref() {
            "committed" => {
                tally.committed += u64::from(!item.replayed);
                tally.committed_mask.push(!item.replayed);
            }
            "rejected" => {
                tally.rejected += 1;
                tally.committed_mask.push(false);
                let code = item.code.as_deref().unwrap_or("(no code)");
                *tally.rejected_by_code.entry(code.to_owned()).or_default() += 1;
            }
            other => return Err(format!("unknown item status `{other}`")),
        }
    }
    Ok(tally)
}

/// The `code` of an error answer `{"error": {"code": ...}}`, if the body has one.
pub fn error_code(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("error")?.get("code")?.as_str().map(str::to_owned)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tallies_committed_rejected_and_replayed() {
        let body = br#"{"batch": 17, "committed_at": "2026-11-21T22:30:00.123456Z", "results": [
            {"status": "committed", "seq": 4012},
            {"status": "committed", "seq": 7, "replayed": true},
            {"status": "rejected", "code": "insufficient_funds", "message": "account:a1 has \"0\""},
            {"status": "rejected", "code": "insufficient_funds", "message": "x"}]}"#;
        let t = tally_batch_answer(body, 4).unwrap();
        assert_eq!((t.committed, t.rejected, t.replayed), (1, 2, 1));
        assert_eq!(t.rejected_by_code["insufficient_funds"], 2);
        assert_eq!(t.committed_mask, vec![true, false, false, false]);
    }

    #[test]
    fn a_short_or_strange_answer_is_an_error() {
        let body = br#"{"batch": null, "committed_at": "x", "results": [{"status": "committed", "seq": 1}]}"#;
        assert!(
            tally_batch_answer(body, 2)
                .unwrap_err()
                .contains("1 results for 2")
        );
        assert!(tally_batch_answer(b"<html>", 1).is_err());
        let odd = br#"{"results": [{"status": "maybe"}]}"#;
        assert!(tally_batch_answer(odd, 1).unwrap_err().contains("maybe"));
    }

    #[test]
    fn error_codes_are_read_from_error_bodies() {
        let body = br#"{"error": {"code": "overloaded", "message": "the write queue is full"}}"#;
        assert_eq!(error_code(body).as_deref(), Some("overloaded"));
        assert_eq!(error_code(b"not json"), None);
    }
}
