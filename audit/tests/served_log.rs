//! The `served_log` check (`keel audit --url`) against a stand-in server on a loopback port: a
//! server that serves the audited log exactly passes; one that serves an event differently, or
//! fewer events than the snapshot holds, is a `served_log` divergence; an error answer is no
//! verdict. Guards the replacement of the hand-rolled HTTP/1.1 client by reqwest: the pages
//! must still be read, paged and compared as before.

#![allow(clippy::unwrap_used)] // a test may unwrap: the panic is its failure report

use keel_audit::Snapshot;
use keel_audit::command::{self, Request};
use keel_engine::Engine;
use keel_invariants::{AggregateId, Command, Envelope, ledger};
use keel_sequencer::{CommittedEvent, Config, Sequencer};
use serde_json::{Value, json};
use std::error::Error;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type TestResult<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

/// How the stand-in renders an event; the audit renders its own events the same way.
fn render(event: &CommittedEvent) -> Value {
    json!({
        "seq": event.seq,
        "batch": event.batch,
        "type": event.logged.event.type_name(),
        "command_id": event.logged.command_id,
    })
}

/// A store of 3 accounts opened and 3 deposits (6 events), closed.
fn write_store(dir: &Path) -> TestResult {
    let sequencer = Sequencer::start(Engine::open_rocksdb(dir)?, Config::default())?;
    for i in 0..3 {
        let account = AggregateId::new(ledger::KIND, &format!("a{i}"));
        let commands = vec![
            Command::new(ledger::Command::OpenAccount {
                account: account.clone(),
                overdraft_limit: 0,
            }),
            Command::new(ledger::Command::Deposit {
                account,
                amount: 10,
                memo: None,
            }),
        ];
        let envelopes = commands
            .into_iter()
            .map(|command| Envelope {
                id: None,
                expected_version: None,
                command,
            })
            .collect();
        sequencer.submit(envelopes, false)?.blocking_recv()??;
    }
    sequencer.shutdown();
    Ok(())
}

/// What the stand-in answers to every `GET /v1/events`.
#[derive(Clone)]
enum Serve {
    /// These events (after the request's `after`), with `last_seq`.
    Events { events: Vec<Value>, last_seq: u64 },
    /// This status and body.
    Status(u16),
}

/// A stand-in `keel serve` on 127.0.0.1 that answers one request per connection
/// (`Connection: close`) until dropped, for at most 30 s.
struct StandIn {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StandIn {
    fn start(serve: Serve) -> TestResult<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stopping.load(Ordering::Acquire) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => answer(stream, &serve),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self {
            address,
            stop,
            thread: Some(thread),
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer(mut stream: TcpStream, serve: &Serve) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buffer[..n]),
        }
    }
    let request = String::from_utf8_lossy(&request);
    let path = request.split_whitespace().nth(1).unwrap_or_default();
    assert!(path.starts_with("/v1/events?"), "asked for {path}");
    let after: u64 = path
        .split(['?', '&'])
        .find_map(|pair| pair.strip_prefix("after="))
        .and_then(|n| n.parse().ok())
        .unwrap();
    let (status, body) = match serve {
        Serve::Events { events, last_seq } => {
            let page: Vec<&Value> = events
                .iter()
                .filter(|e| e["seq"].as_u64().unwrap() > after)
                .collect();
            (
                200,
                json!({"events": page, "last_seq": last_seq}).to_string(),
            )
        }
        Serve::Status(status) => (*status, r#"{"error":{"code":"x","message":"no"}}"#.into()),
    };
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
}

/// Runs `keel audit --data dir --url url --json ...`; returns the verdict (or the error text),
/// the summary and the JSON report.
fn audit(dir: &Path, url: String) -> TestResult<(Result<bool, String>, String, Value)> {
    let report_dir = tempfile::tempdir()?;
    let json_path = report_dir.path().join("report.json");
    let request = Request {
        client: keel_projection::http_client::ClientOptions::default(),
        data: Some(dir.to_owned()),
        json: Some(json_path.clone()),
        max_divergences: 20,
        url: Some(url),
        served_event_json: render,
        mongo: None,
        nats: None,
    };
    let mut summary = Vec::new();
    let verdict = command::run(&request, &mut summary).map_err(|e| format!("{e:#}"));
    let report = match std::fs::read(&json_path) {
        Ok(bytes) => serde_json::from_slice(&bytes)?,
        Err(_) => Value::Null,
    };
    Ok((verdict, String::from_utf8(summary)?, report))
}

fn served_log_divergences(report: &Value) -> Vec<Value> {
    report["divergences"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["check"] == "served_log")
        .cloned()
        .collect()
}

#[test]
fn a_server_serving_the_log_exactly_passes_and_every_difference_is_located() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_store(dir.path())?;
    let ours: Vec<Value> = Snapshot::open(dir.path())?
        .events(0, 100)?
        .iter()
        .map(render)
        .collect();
    assert_eq!(ours.len(), 6);

    let exact = StandIn::start(Serve::Events {
        events: ours.clone(),
        last_seq: 6,
    })?;
    let (verdict, summary, report) = audit(dir.path(), exact.url())?;
    assert_eq!(verdict, Ok(true), "{summary}");
    assert_eq!(report["served_log"]["events_compared"], 6, "{report:#}");
    assert_eq!(report["checks"]["served_log"], 0, "{report:#}");
    assert!(
        summary.contains("served log  served_log ok (6 events compared with"),
        "{summary}"
    );

    let mut changed = ours.clone();
    changed[2]["type"] = json!("withdrawn");
    let differs = StandIn::start(Serve::Events {
        events: changed,
        last_seq: 6,
    })?;
    let (verdict, summary, report) = audit(dir.path(), differs.url())?;
    assert_eq!(verdict, Ok(false), "{summary}");
    let found = served_log_divergences(&report);
    assert_eq!(found.len(), 1, "{report:#}");
    assert_eq!(found[0]["seq"], 3, "{report:#}");
    assert!(
        found[0]["detail"]
            .as_str()
            .unwrap()
            .ends_with("serves event 3 differently"),
        "{report:#}"
    );
    assert!(summary.contains("served_log FAILED (1)"), "{summary}");

    let short = StandIn::start(Serve::Events {
        events: ours[..4].to_vec(),
        last_seq: 6,
    })?;
    let (verdict, summary, report) = audit(dir.path(), short.url())?;
    assert_eq!(verdict, Ok(false), "{summary}");
    let found = served_log_divergences(&report);
    assert_eq!(found.len(), 1, "{report:#}");
    assert_eq!(found[0]["seq"], 1, "{report:#}");
    assert!(
        found[0]["detail"]
            .as_str()
            .unwrap()
            .contains("serves 4 events after 0; the snapshot has them up to 6"),
        "{report:#}"
    );
    assert_eq!(report["served_log"]["events_compared"], 4, "{report:#}");
    Ok(())
}

#[test]
fn an_error_answer_an_unreachable_server_or_a_bad_url_is_no_verdict() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_store(dir.path())?;
    let failing = StandIn::start(Serve::Status(503))?;
    let (verdict, _, _) = audit(dir.path(), failing.url())?;
    let error = verdict.expect_err("a 503 is no verdict");
    assert!(error.contains("HTTP 503"), "{error}");

    let (verdict, _, _) = audit(dir.path(), "https://127.0.0.1:1".into())?;
    let error = verdict.expect_err("nothing listens");
    assert!(error.contains("https://127.0.0.1:1"), "{error}");

    let (verdict, _, _) = audit(dir.path(), "ftp://127.0.0.1:1".into())?;
    let error = verdict.expect_err("not http");
    assert!(
        error.contains("must be http://host:port or https://host:port"),
        "{error}"
    );
    Ok(())
}
