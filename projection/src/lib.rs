//! Keel's publication and read projection.
//!
//! The **publisher** ([`publisher`]) runs inside `keel serve`: it follows the outbox cursor over
//! the committed log and sends every committed batch as one JetStream message. The
//! **projector** ([`projector`], `keel project`) is a durable JetStream consumer that applies
//! those batches, in order and exactly once in effect, to MongoDB collections analysts query
//! ([`documents`], [`store`]), and repairs gaps from Keel's own HTTP API ([`source`]).
//!
//! This crate reads only what was committed: the publisher holds a [`keel_engine::Reader`], the
//! projector sees batch messages. It never reaches into the write path, and nothing here can
//! slow the writer. docs/PROJECTION.md describes the collections, the batch message and the
//! guarantees.

pub mod backoff;
pub mod documents;
pub mod http_client;
pub mod nats;
pub mod projector;
pub mod publisher;
pub mod source;
pub mod store;

pub use backoff::{Shutdown, ShutdownTrigger, shutdown_channel};
pub use projector::{ProjectError, ProjectorConfig};
pub use publisher::{PublishError, PublisherConfig, PublisherHandle};

/// Runs the projector until `stop` resolves (for `keel project`, the binary's SIGTERM/Ctrl-C).
pub async fn project_until(
    config: ProjectorConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ProjectError> {
    let (trigger, shutdown) = shutdown_channel();
    tokio::spawn(async move {
        stop.await;
        trigger.trigger();
    });
    projector::run(config, shutdown).await
}
