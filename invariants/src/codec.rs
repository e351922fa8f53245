//! The byte encodings of what the engine stores for the domain: [`LoggedEvent`] (an event-log
//! value), [`Aggregate`] (a state value), [`CommandOutcome`] (a command-id index value) and
//! [`LoggedRejection`]. All are postcard (a stable, documented, compact serde format: varint
//! integers, length-prefixed strings, enum variants by position); an event or a state is its
//! domain's stored tag followed by the domain's own postcard encoding (see
//! [`crate::registry`]). docs/FORMAT.md shows the bytes; a golden test pins them.

use crate::registry::{Aggregate, CommandOutcome, Event, LoggedEvent, LoggedRejection};

/// A stored value that does not decode: the store is corrupt or of another format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "undecodable record: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

/// Appends the encoding of `event` to `out` (reusing the caller's buffer).
pub fn encode_event(event: &LoggedEvent, out: &mut Vec<u8>) {
    event.encode(out);
}

/// Appends the encoding of a [`LoggedEvent`] made of `command_id` and `event` to `out`: the
/// same bytes as [`encode_event`], without the caller building one (the writer encodes each
/// event it decides straight from the command's id).
pub fn encode_event_parts(command_id: Option<&str>, event: &Event, out: &mut Vec<u8>) {
    LoggedEvent::encode_parts(command_id, event, out);
}

pub fn decode_event(bytes: &[u8]) -> Result<LoggedEvent, DecodeError> {
    exact(LoggedEvent::decode(bytes)?)
}

/// Appends the encoding of `aggregate` to `out`.
pub fn encode_aggregate(aggregate: &Aggregate, out: &mut Vec<u8>) {
    aggregate.encode(out);
}

pub fn decode_aggregate(bytes: &[u8]) -> Result<Aggregate, DecodeError> {
    exact(Aggregate::decode(bytes)?)
}

fn encode_into<T: serde::Serialize>(value: &T, out: &mut Vec<u8>) {
    crate::registry::encode_postcard(value, out);
}

fn exact<T>((value, rest): (T, &[u8])) -> Result<T, DecodeError> {
    if !rest.is_empty() {
        return Err(DecodeError(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

fn decode_exact<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    exact(postcard::take_from_bytes::<T>(bytes).map_err(|e| DecodeError(e.to_string()))?)
}

/// Appends the encoding of `outcome` (a command-id index value) to `out`.
pub fn encode_outcome(outcome: &CommandOutcome, out: &mut Vec<u8>) {
    encode_into(outcome, out);
}

pub fn decode_outcome(bytes: &[u8]) -> Result<CommandOutcome, DecodeError> {
    decode_exact(bytes)
}

/// Appends the encoding of `rejection` (a rejection kept in a log record) to `out`.
pub fn encode_rejection(rejection: &LoggedRejection, out: &mut Vec<u8>) {
    encode_into(rejection, out);
}

pub fn decode_rejection(bytes: &[u8]) -> Result<LoggedRejection, DecodeError> {
    decode_exact(bytes)
}
