//! `keel audit`: the flags, parsed into a [`keel_audit::command::Request`], and the verdict:
//! the last line of stdout is `INTEGRITY_OK` or `INTEGRITY_FAILED`. Exit codes: 0 intact,
//! 1 divergences found, 2 no verdict (usage or I/O). The audit itself is the `keel-audit`
//! crate (`audit/`); this module only hands it the flags and the server's event rendering.

use crate::{redact_credentials, wire};
use clap::Args;
use keel_audit::command::{self, MongoRequest, NatsRequest, Request};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    /// PEM certificate(s) to trust for an https --url (instead of the system's roots).
    #[arg(long, env = "KEEL_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// API key (scope `read`) for --url when the server has --auth-keys.
    #[arg(long, env = "KEEL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
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

impl AuditArgs {
    fn request(&self) -> Request {
        Request {
            data: self.data.clone(),
            json: self.json.clone(),
            max_divergences: self.max_divergences,
            url: self.url.clone(),
            client: keel_projection::http_client::ClientOptions {
                ca_cert: self.ca_cert.clone(),
                api_key: self.api_key.clone(),
            },
            served_event_json: wire::event_json,
            mongo: self.mongo_url.as_ref().map(|url| MongoRequest {
                url: url.clone(),
                url_shown: redact_credentials(url),
                db: self.mongo_db.clone(),
                durable: self.mongo_durable.clone(),
                wait: self.mongo_wait,
            }),
            nats: self.nats_url.as_ref().map(|url| NatsRequest {
                url: url.clone(),
                stream: self.nats_stream.clone(),
                subject: self.nats_subject.clone(),
            }),
        }
    }
}

/// Runs `keel audit` and returns its exit code.
pub fn run(args: &AuditArgs) -> ExitCode {
    let verdict = command::run(&args.request(), &mut std::io::stdout().lock());
    match verdict {
        Ok(true) => {
            println!("INTEGRITY_OK");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("INTEGRITY_FAILED");
            ExitCode::from(1)
        }
        // Damage RocksDB or the write-ahead-log check found while opening or reading is a
        // verdict, not a failure to reach one.
        Err(error) if command::is_storage_damage(&error) => {
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
