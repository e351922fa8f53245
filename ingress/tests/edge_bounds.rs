//! The HTTP edge's bounds against a real `keel serve`: memory per request, slow and stalled
//! clients, open connections, concurrent parses and reads, and a shutdown that a half-sent
//! request cannot hold up.
#![allow(clippy::unwrap_used)] // a test may unwrap: the panic is its failure report

mod common;

use common::{KeelProcess, address, client, proc_status_kib};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// `{"commands":[{},{},...]}` of exactly `bytes` bytes: the cheapest body per command.
fn empty_items_body(bytes: usize) -> Vec<u8> {
    let (head, tail) = (b"{\"commands\":[{}".as_slice(), b"]}".as_slice());
    let items = (bytes - head.len() - tail.len()) / 3;
    let mut body = Vec::with_capacity(bytes);
    body.extend_from_slice(head);
    for _ in 0..items {
        body.extend_from_slice(b",{}");
    }
    body.extend_from_slice(tail);
    body
}

/// A 16 MiB body whose single memo starts with an escape, so serde_json unescapes all of it
/// into its scratch buffer: the worst case for strings.
fn escaped_memo_body(bytes: usize) -> Vec<u8> {
    let head = br#"{"commands":[{"type":"deposit","account":"a","amount":1,"memo":"\n"#;
    let tail = br#""}]}"#;
    let mut body = Vec::with_capacity(bytes);
    body.extend_from_slice(head);
    body.resize(bytes - tail.len(), b'm');
    body.extend_from_slice(tail);
    body
}

/// Regression: a 16 MiB body of 5.6M `{}` items was refused `too_many_items` only after all of
/// it was parsed (~1.5 GB of RSS per request; three at once took the server to 3.0 GB). Now the
/// parser stops at `--batch-items-max` and at most `--parse-concurrency-max` bodies are held at
/// once, so the peak stays under the documented bound (docs/API.md "Bounds and memory"):
/// parse_concurrency_max x (4 x body_bytes_max + batch_items_max x 1 KiB) of live memory over
/// the baseline, plus one body_bytes_max per slot of allocator retention (glibc keeps freed
/// 16 MiB blocks in per-thread arenas once its mmap threshold has adapted to them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_worst_case_bodies_keep_memory_bounded() {
    const PARSE_SLOTS: u64 = 2;
    const CLIENTS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(
        dir.path(),
        &["--parse-concurrency-max", &PARSE_SLOTS.to_string()],
    );
    let pid = keel.child.id();
    let c = client();
    let ok = c
        .post(format!("{}/v1/batches", keel.url))
        .json(&json!({"commands": [{"type": "open_account", "account": "a"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let baseline_kib = proc_status_kib(pid, "VmRSS");
    let bodies = [
        (empty_items_body(16 << 20), "too_many_items"),
        (escaped_memo_body(16 << 20), "invalid_memo"),
    ];
    for (body, refusal) in bodies.into_iter().flat_map(|b| [b.clone(), b]) {
        let mut tasks = Vec::new();
        for _ in 0..CLIENTS {
            let (c, url, body) = (c.clone(), keel.url.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                let r = c
                    .post(format!("{url}/v1/batches"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap())
            }));
        }
        for task in tasks {
            let (status, answer) = task.await.unwrap();
            let code = answer["error"]["code"].as_str().unwrap().to_string();
            assert!(
                (status, code.as_str()) == (400, refusal)
                    || (status, code.as_str()) == (503, "overloaded"),
                "{status} {answer}"
            );
        }
        println!(
            "after {refusal}: peak {} KiB",
            proc_status_kib(pid, "VmHWM")
        );
    }
    let peak_kib = proc_status_kib(pid, "VmHWM");
    let bound_kib = PARSE_SLOTS * ((4 + 1) * 16 * MIB + 10_000 * 1024) / 1024;
    println!("baseline {baseline_kib} KiB, peak {peak_kib} KiB, bound +{bound_kib} KiB");
    assert!(
        peak_kib <= baseline_kib + bound_kib,
        "peak RSS {peak_kib} KiB exceeds baseline {baseline_kib} KiB + bound {bound_kib} KiB"
    );
}

/// Opens a connection and sends `bytes` (part of a request), leaving it open.
fn half_request(url: &str, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(address(url)).unwrap();
    stream.write_all(bytes).unwrap();
    stream
}

/// True once the server closed `stream` (EOF or reset), waiting at most `within`.
fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // an answer (e.g. 408) before the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false, // timed out: still open
        }
    }
}

/// Regression: SIGTERM did not finish while a client held a half-sent request (cut headers or
/// a cut body); the process waited until the client hung up (45 s and more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_half_sent_requests_exits_within_the_drain_bound() {
    let dir = tempfile::tempdir().unwrap();
    // Timeouts far longer than the drain: only the drain bound can end these connections.
    let keel = KeelProcess::start(
        dir.path(),
        &[
            "--shutdown-drain-secs",
            "2",
            "--header-read-timeout-ms",
            "600000",
            "--body-read-timeout-ms",
            "600000",
        ],
    );
    let c = client();
    let r = c
        .post(format!("{}/v1/batches", keel.url))
        .json(&json!({"commands": [{"type": "open_account", "account": "a"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let url = keel.url.clone();
    let held = tokio::task::spawn_blocking(move || {
        let cut_head = half_request(&url, b"POST /v1/batches HTTP/1.1\r\nhost: x\r\ncontent-");
        let cut_body = half_request(
            &url,
            b"POST /v1/batches HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"commands\":[",
        );
        (cut_head, cut_body)
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // the server has read both
    let data = keel.data.clone();
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || keel.terminate())
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(status.success(), "clean exit: {status:?}");
    assert!(
        took < Duration::from_secs(8),
        "exit took {took:?}; the drain bound is 2 s"
    );
    drop(held);
    // The store was closed cleanly: it reopens with what was committed.
    let keel = KeelProcess::start(&data, &[]);
    let r = c
        .get(format!("{}/v1/aggregates/account:a", keel.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Regression: no header read timeout was set (hyper's never applied without a timer), so 200
/// slowloris connections stayed open indefinitely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_by_the_header_read_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &["--header-read-timeout-ms", "500"]);
    let url = keel.url.clone();
    tokio::task::spawn_blocking(move || {
        let mut streams: Vec<TcpStream> = (0..200)
            .map(|i| match i % 3 {
                0 => half_request(&url, b""),
                1 => half_request(&url, b"GET /healthz HTTP/1.1\r\n"),
                _ => half_request(&url, b"POST /v1/batches HTTP/1.1\r\nhost: x\r\nx-slow: 1"),
            })
            .collect();
        let started = Instant::now();
        for (i, stream) in streams.iter_mut().enumerate() {
            assert!(
                closed_by_server(stream, Duration::from_secs(10)),
                "connection {i} still open {:?} after connecting",
                started.elapsed()
            );
        }
    })
    .await
    .unwrap();
    // The server still serves.
    let r = client()
        .get(format!("{}/healthz", keel.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Open connections are bounded: one over `--connections-max` is closed at once, and a slot is
/// usable again when a connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_bound_are_closed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(
        dir.path(),
        &[
            "--connections-max",
            "4",
            "--header-read-timeout-ms",
            "60000",
        ],
    );
    let url = keel.url.clone();
    tokio::task::spawn_blocking(move || {
        let mut held: Vec<TcpStream> = (0..4).map(|_| half_request(&url, b"GET /he")).collect();
        std::thread::sleep(Duration::from_millis(300)); // all four accepted
        let mut extra = half_request(&url, b"");
        assert!(
            closed_by_server(&mut extra, Duration::from_secs(5)),
            "a fifth connection is closed"
        );
        for stream in &mut held {
            assert!(
                !closed_by_server(stream, Duration::from_millis(50)),
                "the first four stay open"
            );
        }
        held.pop();
        std::thread::sleep(Duration::from_millis(300)); // its slot is returned
        let mut again = half_request(&url, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n");
        again
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answer = [0u8; 12];
        again.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200");
    })
    .await
    .unwrap();
}

/// A full parse bound answers 503 + Retry-After after a short wait instead of queueing bodies
/// without bound; reads are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_parse_bound_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(
        dir.path(),
        &[
            "--parse-concurrency-max",
            "1",
            "--body-read-timeout-ms",
            "60000",
        ],
    );
    let url = keel.url.clone();
    // Holds the only parse slot: headers sent, body never finished.
    let slow = tokio::task::spawn_blocking(move || {
        half_request(
            &url,
            b"POST /v1/batches HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{",
        )
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = client();
    let started = Instant::now();
    let r = c
        .post(format!("{}/v1/batches", keel.url))
        .json(&json!({"commands": [{"type": "open_account", "account": "a"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "overloaded"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let r = c
        .get(format!("{}/v1/events", keel.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "reads do not wait for the parse bound");
    drop(slow);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c
        .post(format!("{}/v1/batches", keel.url))
        .json(&json!({"commands": [{"type": "open_account", "account": "a"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "the slot is free again once the client left"
    );
}

/// Store reads run on the blocking pool behind a bound; a full bound answers 503 +
/// Retry-After at once instead of queueing reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_read_bound_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &["--read-concurrency-max", "1"]);
    let c = client();
    let deposits: Vec<Value> = (0..10_000)
        .map(|i| json!({"type": "open_account", "account": format!("a{i}")}))
        .collect();
    let r = c
        .post(format!("{}/v1/batches", keel.url))
        .json(&json!({"commands": deposits}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut refused = 0;
    for _round in 0..5 {
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (c, url) = (c.clone(), keel.url.clone());
            tasks.push(tokio::spawn(async move {
                let r = c
                    .get(format!("{url}/v1/events?limit=10000"))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let retry_after = r.headers().get("retry-after").cloned();
                (status, retry_after, r.json::<Value>().await.unwrap())
            }));
        }
        for task in tasks {
            let (status, retry_after, body) = task.await.unwrap();
            match status {
                200 => assert_eq!(body["events"].as_array().unwrap().len(), 10_000),
                503 => {
                    assert_eq!(body["error"]["code"], "overloaded", "{body}");
                    assert_eq!(retry_after.unwrap(), "1");
                    refused += 1;
                }
                other => panic!("unexpected {other}: {body}"),
            }
        }
        if refused > 0 {
            break;
        }
    }
    assert!(
        refused > 0,
        "16 concurrent reads over a bound of 1 were all served"
    );
}
