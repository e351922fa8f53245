//! The MongoDB side of the projection: collections, indexes, and the three writes of a round
//! (events, aggregates, checkpoint), each one bulk command.
//!
//! Writes are the classic `insert` and `update` commands with many statements, `ordered: false`
//! and an explicit write concern: every MongoDB since 2.6 and the wire-protocol stand-ins
//! (nx-27017) speak them, unlike the MongoDB 8 `bulkWrite` command. They are idempotent by
//! construction, so a write repeated after a timeout or a crash changes nothing:
//! - an event is inserted under `_id` = its sequence; a duplicate-key error is success;
//! - an aggregate is replaced only where its stored `last_seq` is lower than the new one; an
//!   upsert that finds a newer document fails with a duplicate key, which is success too;
//! - the checkpoint is compare-and-set on the previous `last_batch`.

use crate::documents::{self, Checkpoint, DocumentError};
use futures_util::TryStreamExt;
use keel_invariants::Aggregate;
use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Database, IndexModel};
use std::time::Duration;

pub const EVENTS: &str = "events";
pub const AGGREGATES: &str = "aggregates";
pub const CHECKPOINTS: &str = "checkpoints";

/// Most documents per write command. An event document is at most ~5 KiB (a 4 KiB memo and
/// three 128-byte names), so a command stays far below MongoDB's 16 MiB limit.
const DOCUMENTS_PER_COMMAND: usize = 1000;
/// MongoDB's duplicate-key error code.
const DUPLICATE_KEY: i64 = 11000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("MongoDB refused a write to `{collection}`: {detail}")]
    Write {
        collection: &'static str,
        detail: String,
    },
    #[error(transparent)]
    Document(#[from] DocumentError),
}

/// Whether the checkpoint compare-and-set took effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointWrite {
    Written,
    /// The stored checkpoint was not the one this projector started the round from: somebody
    /// dropped, restored or advanced the projection meanwhile.
    Moved,
}

/// The projection database.
#[derive(Clone, Debug)]
pub struct Store {
    db: Database,
    consumer: String,
}

impl Store {
    /// The projection in `db`, read or written for `consumer` (whose checkpoint it uses), on a
    /// client the caller configured (`keel audit` reads from the primary only).
    pub fn with_database(db: Database, consumer: &str) -> Self {
        Self {
            db,
            consumer: consumer.to_owned(),
        }
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Prepares a client for `url` (no IO yet: the driver connects on first use).
    pub async fn connect(url: &str, database: &str, consumer: &str) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(url).await?;
        options.app_name = Some("keel-projector".into());
        options.connect_timeout = Some(Duration::from_secs(5));
        options.server_selection_timeout = Some(Duration::from_secs(5));
        // Writes are retried by the projector's own loop, which is idempotent; reads are plain.
        options.retry_writes = Some(false);
        options.retry_reads = Some(true);
        let client = Client::with_options(options)?;
        Ok(Self {
            db: client.database(database),
            consumer: consumer.to_owned(),
        })
    }

    /// Creates the indexes analysts need (idempotent).
    pub async fn prepare(&self) -> Result<(), StoreError> {
        let index = |keys: Document, name: &str| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().name(name.to_owned()).build())
                .build()
        };
        self.db
            .collection::<Document>(EVENTS)
            .create_indexes([
                // Single-field indexes: compound ones with `_id` would serve "in order" a bit
                // better on MongoDB, but break inserts on the nx-27017 stand-in.
                index(doc! {"aggregates": 1}, "aggregates"),
                index(doc! {"committed_at": 1}, "committed_at"),
                index(doc! {"type": 1}, "type"),
            ])
            .await?;
        self.db
            .collection::<Document>(AGGREGATES)
            .create_index(index(doc! {"kind": 1}, "kind"))
            .await?;
        Ok(())
    }

    /// Drops the projection (`--rebuild`): both collections and every checkpoint.
    pub async fn drop_projection(&self) -> Result<(), StoreError> {
        for name in [EVENTS, AGGREGATES, CHECKPOINTS] {
            self.db.collection::<Document>(name).drop().await?;
        }
        Ok(())
    }

    /// This consumer's checkpoint, if it has one.
    pub async fn checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        let found = self
            .db
            .collection::<Document>(CHECKPOINTS)
            .find_one(doc! {"_id": &self.consumer})
            .await?;
        Ok(found
            .map(|d| documents::parse_checkpoint_document(&d))
            .transpose()?)
    }

    /// The stored aggregates among `ids`, each with its `last_seq`.
    pub async fn aggregates(
        &self,
        ids: &[String],
    ) -> Result<Vec<(String, Aggregate, u64)>, StoreError> {
        let collection = self.db.collection::<Document>(AGGREGATES);
        let mut found = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(DOCUMENTS_PER_COMMAND) {
            let cursor = collection.find(doc! {"_id": {"$in": chunk}}).await?;
            let documents: Vec<Document> = cursor.try_collect().await?;
            for document in &documents {
                found.push(documents::parse_aggregate_document(document)?);
            }
        }
        Ok(found)
    }

    /// Inserts event documents; those already present are left as they are.
    pub async fn insert_events(&self, events: &[Document]) -> Result<(), StoreError> {
        for chunk in events.chunks(DOCUMENTS_PER_COMMAND) {
            let command = doc! {
                "insert": EVENTS,
                "documents": chunk,
                "ordered": false,
                "writeConcern": write_concern(),
            };
            let response = self.db.run_command(command).await?;
            check_write(EVENTS, &response)?;
        }
        Ok(())
    }

    /// Replaces each aggregate document whose stored `last_seq` is lower than the new one
    /// (inserting it when absent). `aggregates` pairs a full document with its `last_seq`.
    pub async fn upsert_aggregates(
        &self,
        aggregates: &[(String, Document, u64)],
    ) -> Result<(), StoreError> {
        for chunk in aggregates.chunks(DOCUMENTS_PER_COMMAND) {
            let updates: Vec<Document> = chunk
                .iter()
                .map(|(id, document, last_seq)| {
                    doc! {
                        "q": {"_id": id, "last_seq": {"$lt": documents::u64_bson(*last_seq)}},
                        // The replacement names `_id` itself: some servers do not take it
                        // from the query on an upsert.
                        "u": document,
                        "upsert": true,
                    }
                })
                .collect();
            let command = doc! {
                "update": AGGREGATES,
                "updates": updates,
                "ordered": false,
                "writeConcern": write_concern(),
            };
            let response = self.db.run_command(command).await?;
            check_write(AGGREGATES, &response)?;
        }
        Ok(())
    }

    /// Moves this consumer's checkpoint from `previous_batch` to `checkpoint`, only if it is
    /// still at `previous_batch` (a missing document counts as batch 0).
    pub async fn write_checkpoint(
        &self,
        previous_batch: u64,
        checkpoint: &Checkpoint,
    ) -> Result<CheckpointWrite, StoreError> {
        let document = documents::checkpoint_document(&self.consumer, checkpoint, DateTime::now());
        let command = doc! {
            "update": CHECKPOINTS,
            "updates": [{
                "q": {"_id": &self.consumer, "last_batch": documents::u64_bson(previous_batch)},
                "u": document,
                "upsert": previous_batch == 0,
            }],
            "ordered": true,
            "writeConcern": write_concern(),
        };
        let response = self.db.run_command(command).await?;
        let report = check_write(CHECKPOINTS, &response)?;
        Ok(if report.matched_or_upserted == 1 {
            CheckpointWrite::Written
        } else {
            CheckpointWrite::Moved
        })
    }
}

/// Majority and journaled: a write the projector acks messages for survives a failover and
/// a crash of the server.
fn write_concern() -> Document {
    doc! {"w": "majority", "j": true}
}

struct WriteReport {
    matched_or_upserted: i64,
}

/// Turns a write command's answer into success (duplicate keys included) or an error.
fn check_write(collection: &'static str, response: &Document) -> Result<WriteReport, StoreError> {
    if let Ok(error) = response.get_document("writeConcernError") {
        return Err(StoreError::Write {
            collection,
            detail: format!("write concern: {error}"),
        });
    }
    if let Ok(errors) = response.get_array("writeErrors") {
        for error in errors {
            let error = error.as_document();
            let code = error.and_then(|e| e.get("code")).and_then(integer);
            if code != Some(DUPLICATE_KEY) {
                let detail =
                    error.map_or_else(|| "malformed write error".to_owned(), ToString::to_string);
                return Err(StoreError::Write { collection, detail });
            }
        }
    }
    let matched_or_upserted = response.get("n").and_then(integer).unwrap_or(0);
    Ok(WriteReport {
        matched_or_upserted,
    })
}

fn integer(value: &Bson) -> Option<i64> {
    match value {
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Int64(v) => Some(*v),
        Bson::Double(v) if v.fract() == 0.0 => Some(*v as i64),
        _ => None,
    }
}
