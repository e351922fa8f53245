//! `GET /v1/subscribe` end to end: a real `keel serve` process, real sockets, Server-Sent
//! Events read as a client reads them. Every wait is bounded in time and every loop in count.
#![allow(clippy::unwrap_used)] // a test may unwrap: the panic is its failure report

mod common;

use common::{KeelProcess, client};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// The longest any single wait of these tests may take.
const WAIT: Duration = Duration::from_secs(20);

/// One SSE block: its comment lines and its fields.
#[derive(Debug, Default, Clone)]
struct Block {
    comments: Vec<String>,
    id: Option<u64>,
    event: Option<String>,
    data: Option<String>,
}

impl Block {
    fn json(&self) -> Value {
        serde_json::from_str(self.data.as_deref().unwrap()).unwrap()
    }
}

/// A subscription's stream, read block by block.
struct Stream {
    response: reqwest::Response,
    buffer: String,
}

impl Stream {
    async fn open(url: &str, query: &str, last_event_id: Option<u64>) -> Self {
        let client = keel_projection::http_client::builder(&Default::default())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let mut request = client.get(format!("{url}/v1/subscribe{query}"));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = tokio::time::timeout(WAIT, request.send())
            .await
            .expect("subscribe answered in time")
            .expect("subscribe");
        assert_eq!(response.status().as_u16(), 200);
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        assert_eq!(header("content-type").as_deref(), Some("text/event-stream"));
        assert_eq!(header("cache-control").as_deref(), Some("no-cache"));
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next block, `None` when the stream ended; panics after [`WAIT`].
    async fn next(&mut self) -> Option<Block> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let text: String = self.buffer.drain(..end + 2).collect();
                return Some(parse_block(&text));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, self.response.chunk())
                .await
                .expect("a block within the wait")
                .expect("reading the stream");
            match chunk {
                Some(bytes) => self.buffer.push_str(std::str::from_utf8(&bytes).unwrap()),
                None => {
                    assert!(self.buffer.is_empty(), "a cut block: {:?}", self.buffer);
                    return None;
                }
            }
        }
    }

    /// The next block that is an event or a resume (comment-only blocks are skipped).
    async fn next_event(&mut self) -> Option<Block> {
        for _ in 0..1000 {
            let block = self.next().await?;
            if block.event.is_some() {
                return Some(block);
            }
        }
        panic!("1000 blocks without an event")
    }

    /// Events until one with sequence `last` (inclusive), at most `max` of them.
    async fn events_until(&mut self, last: u64, max: usize) -> Vec<Block> {
        let mut events = Vec::new();
        while events.len() < max {
            let block = self.next_event().await.expect("the stream ended early");
            assert_eq!(block.event.as_deref(), Some("event"), "{block:?}");
            let id = block.id.unwrap();
            events.push(block);
            if id >= last {
                return events;
            }
        }
        panic!("more than {max} events before {last}")
    }
}

fn parse_block(text: &str) -> Block {
    let mut block = Block::default();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix(':') {
            block.comments.push(comment.trim().to_string());
        } else if let Some(id) = line.strip_prefix("id: ") {
            block.id = Some(id.parse().unwrap());
        } else if let Some(event) = line.strip_prefix("event: ") {
            block.event = Some(event.to_string());
        } else if let Some(data) = line.strip_prefix("data: ") {
            assert!(block.data.is_none(), "one data line per event: {text:?}");
            block.data = Some(data.to_string());
        } else {
            assert!(line.is_empty(), "unexpected line {line:?} in {text:?}");
        }
    }
    block
}

async fn post(c: &reqwest::Client, url: &str, commands: Value) -> Value {
    let answer = c
        .post(format!("{url}/v1/batches"))
        .json(&json!({ "commands": commands }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    answer.json().await.unwrap()
}

/// The highest committed seq of an answer.
fn last_seq(answer: &Value) -> u64 {
    answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .max()
        .unwrap()
}

/// Every committed event as `GET /v1/events` gives it, up to `last`.
async fn served_events(c: &reqwest::Client, url: &str, last: u64) -> Vec<Value> {
    let mut events = Vec::new();
    let mut after = 0;
    for _ in 0..1000 {
        if after >= last {
            return events;
        }
        let page: Value = c
            .get(format!("{url}/v1/events?after={after}&limit=1000"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let got = page["events"].as_array().unwrap().clone();
        after = page["next_after"].as_u64().unwrap();
        events.extend(got);
    }
    panic!("more than 1000 pages")
}

async fn metric(c: &reqwest::Client, url: &str, name: &str) -> f64 {
    let text = common::get_text(c, &format!("{url}/metrics")).await;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn deposits(accounts: &[&str], amount: u64, memo_bytes: usize) -> Value {
    let memo = "m".repeat(memo_bytes);
    Value::Array(
        accounts
            .iter()
            .map(|a| json!({"type": "deposit", "account": a, "amount": amount, "memo": memo}))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_then_live_without_gap_or_duplicate_while_a_writer_commits() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &[]);
    let c = client();
    post(
        &c,
        &keel.url,
        json!([{"type": "open_account", "account": "a"}, {"type": "open_account", "account": "b"}]),
    )
    .await;
    // History to catch up on: 3000 events, more than one store page.
    for _ in 0..30 {
        post(&c, &keel.url, deposits(&["a"; 100], 1, 0)).await;
    }
    // A writer commits 60 more batches while the subscription catches up and goes live.
    let writer = {
        let (c, url) = (c.clone(), keel.url.clone());
        tokio::spawn(async move {
            let mut last = 0;
            for round in 0..60 {
                let size = 1 + round % 7;
                last = last_seq(&post(&c, &url, deposits(&vec!["b"; size], 1, 0)).await);
            }
            last
        })
    };
    let mut stream = Stream::open(&keel.url, "", None).await;
    let last = writer.await.unwrap();
    let got = stream.events_until(last, 10_000).await;
    let ids: Vec<u64> = got.iter().map(|b| b.id.unwrap()).collect();
    assert_eq!(
        ids,
        (1..=last).collect::<Vec<_>>(),
        "every event once, in order"
    );
    // Each event's data is exactly what GET /v1/events serves for it.
    let served = served_events(&c, &keel.url, last).await;
    assert_eq!(served.len() as u64, last);
    for (block, event) in got.iter().zip(&served) {
        assert_eq!(&block.json(), event);
    }
    // Batches delivered live are announced with their durable time.
    let mut more = Stream::open(&keel.url, &format!("?after={last}"), None).await;
    let answer = post(&c, &keel.url, deposits(&["a", "b"], 1, 0)).await;
    let block = more.next_event().await.unwrap();
    assert_eq!(block.id, Some(last + 1));
    let batch = answer["batch"].as_u64().unwrap();
    let comment = block
        .comments
        .iter()
        .find(|c| c.starts_with("batch "))
        .expect("a batch comment before the batch's first event");
    let words: Vec<&str> = comment.split(' ').collect();
    assert_eq!(words[..3], ["batch", &batch.to_string(), "durable_at_us"]);
    assert!(words[3].parse::<u64>().unwrap() > 0);
    assert_eq!(more.next_event().await.unwrap().id, Some(last + 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_overrides_after() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &[]);
    let c = client();
    post(
        &c,
        &keel.url,
        json!([{"type": "open_account", "account": "a"}]),
    )
    .await;
    let last = last_seq(&post(&c, &keel.url, deposits(&["a"; 20], 1, 0)).await);
    let mut stream = Stream::open(&keel.url, "?after=3", Some(10)).await;
    let got = stream.events_until(last, 100).await;
    let ids: Vec<u64> = got.iter().map(|b| b.id.unwrap()).collect();
    assert_eq!(ids, (11..=last).collect::<Vec<_>>());
    let mut stream = Stream::open(&keel.url, "?after=3", None).await;
    assert_eq!(stream.next_event().await.unwrap().id, Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kind_and_aggregate_filters_and_only_committed_events() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &[]);
    let c = client();
    // Events 1..=4 are history (caught up), the rest arrive live.
    post(
        &c,
        &keel.url,
        json!([
            {"type": "open_account", "account": "a"},
            {"type": "open_account", "account": "b"},
            {"type": "create_sku", "sku": "x", "on_hand": 5},
            {"type": "deposit", "account": "a", "amount": 10},
        ]),
    )
    .await;
    let mut skus = Stream::open(&keel.url, "?kind=sku", None).await;
    let mut bob = Stream::open(&keel.url, "?aggregate=account:b", None).await;
    let mut bob_accounts = Stream::open(&keel.url, "?kind=account&aggregate=account:b", None).await;
    let mut everything = Stream::open(&keel.url, "?after=4", None).await;
    // Rejected commands (and a batch with nothing committed) make no event.
    let rejected = post(
        &c,
        &keel.url,
        json!([{"type": "deposit", "account": "nobody", "amount": 1},
               {"type": "withdraw", "account": "b", "amount": 1}]),
    )
    .await;
    assert!(rejected["batch"].is_null(), "{rejected}");
    let answer = post(
        &c,
        &keel.url,
        json!([
            {"type": "transfer", "from": "a", "to": "b", "amount": 3},   // 5
            {"type": "restock", "sku": "x", "qty": 1},                   // 6
            {"type": "transfer", "from": "a", "to": "nobody", "amount": 1}, // rejected
            {"type": "deposit", "account": "a", "amount": 1},            // 7
            {"type": "deposit", "account": "b", "amount": 1},            // 8
        ]),
    )
    .await;
    assert_eq!(last_seq(&answer), 8);
    let ids = |blocks: Vec<Block>| blocks.iter().map(|b| b.id.unwrap()).collect::<Vec<_>>();
    assert_eq!(ids(skus.events_until(6, 10).await), [3, 6]);
    assert_eq!(ids(bob.events_until(8, 10).await), [2, 5, 8]);
    assert_eq!(ids(bob_accounts.events_until(8, 10).await), [2, 5, 8]);
    let all = everything.events_until(8, 10).await;
    assert_eq!(ids(all.clone()), [5, 6, 7, 8]);
    assert_eq!(
        all[0].json()["aggregates"],
        json!(["account:a", "account:b"])
    );
    // Nothing more arrives on the filtered streams for an event they do not want: the next
    // event they see is the next one they want.
    post(
        &c,
        &keel.url,
        json!([{"type": "deposit", "account": "a", "amount": 1}]),
    )
    .await; // 9
    post(
        &c,
        &keel.url,
        json!([{"type": "restock", "sku": "x", "qty": 1}]),
    )
    .await; // 10
    assert_eq!(skus.next_event().await.unwrap().id, Some(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_is_ended_while_others_and_the_writer_keep_going() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &["--subscriber-buffer-batches", "4"]);
    let c = client();
    post(
        &c,
        &keel.url,
        json!([{"type": "open_account", "account": "a"}]),
    )
    .await;
    // A subscriber that never reads: a raw socket with a small receive buffer.
    let mut slow = std::net::TcpStream::connect(common::address(&keel.url)).unwrap();
    slow.write_all(b"GET /v1/subscribe?after=1 HTTP/1.1\r\nHost: keel\r\n\r\n")
        .unwrap();
    let mut normal = Stream::open(&keel.url, "?after=1", None).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&c, &keel.url, "keel_subscribers").await < 2.0 {
        assert!(Instant::now() < deadline, "both subscriptions registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ~40 KiB per batch: a few MiB fill the socket buffers and the slow one's 4 batches.
    let mut last = 0;
    let mut received = 0;
    for round in 0..1000 {
        let started = Instant::now();
        last = last_seq(&post(&c, &keel.url, deposits(&["a"; 10], 1, 4000)).await);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "writes keep committing"
        );
        // The normal subscriber keeps up as it goes.
        received = normal
            .events_until(last, 100)
            .await
            .last()
            .unwrap()
            .id
            .unwrap();
        if round > 20 && metric(&c, &keel.url, "keel_subscriber_overflows_total").await >= 1.0 {
            break;
        }
    }
    assert_eq!(received, last);
    assert!(metric(&c, &keel.url, "keel_subscriber_overflows_total").await >= 1.0);
    assert_eq!(metric(&c, &keel.url, "keel_subscribers").await, 1.0);
    // The slow one, once it reads, finds what was in flight, then `resume` (too_slow) naming
    // the last event it was sent, then the end of the stream (the chunked terminator).
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut text = Vec::new();
    let mut chunk = [0u8; 65536];
    for _ in 0..100_000 {
        if text.ends_with(b"\r\n0\r\n\r\n") {
            break;
        }
        let n = slow.read(&mut chunk).unwrap();
        assert!(
            n > 0,
            "the server closed the slow connection before the resume event"
        );
        text.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&text);
    let resume = text.rfind("event: resume").expect("a resume event");
    let last_id_sent = text[..resume]
        .rsplit("id: ")
        .nth(1)
        .and_then(|rest| rest.split('\n').next())
        .map(|id| id.trim().parse::<u64>().unwrap())
        .unwrap();
    let expected = format!(
        "id: {last_id_sent}\nevent: resume\ndata: {{\"reason\":\"too_slow\",\"resume_after\":{last_id_sent}}}\n\n"
    );
    assert!(
        text.contains(&expected),
        "{}",
        &text[resume.saturating_sub(200)..]
    );
    assert!(last_id_sent < last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_over_the_bound_get_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &["--subscribers-max", "2"]);
    let _one = Stream::open(&keel.url, "", None).await;
    let _two = Stream::open(&keel.url, "?kind=account", None).await;
    let answer = client()
        .get(format!("{}/v1/subscribe", keel.url))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 503);
    assert!(answer.headers().get("retry-after").is_some());
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    // A closed subscription frees its place (the server notices when it next writes to it).
    drop(_one);
    let deadline = Instant::now() + WAIT;
    for n in 0.. {
        post(
            &client(),
            &keel.url,
            json!([{"type": "open_account", "account": format!("a{n}")}]),
        )
        .await;
        let status = client()
            .get(format!("{}/v1/subscribe", keel.url))
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .map(|r| r.status().as_u16());
        if let Ok(200) = status {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the place was not freed: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_are_400_invalid_query() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &[]);
    let c = client();
    let cases: &[(&str, Option<&str>)] = &[
        ("?after=x", None),
        ("?after=-1", None),
        ("?limit=5", None),
        ("?kind=", None),
        ("?kind=account:alice", None),
        ("?aggregate=alice", None),
        ("?aggregate=", None),
        ("", Some("abc")),
    ];
    for (query, last_event_id) in cases {
        let mut request = c.get(format!("{}/v1/subscribe{query}", keel.url));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", *id);
        }
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status().as_u16(), 400, "{query} {last_event_id:?}");
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_query", "{query}: {body}");
    }
    let answer = c
        .post(format!("{}/v1/subscribe", keel.url))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_every_stream_with_resume_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &["--shutdown-drain-secs", "60"]);
    let c = client();
    post(
        &c,
        &keel.url,
        json!([{"type": "open_account", "account": "a"}]),
    )
    .await;
    let last = last_seq(&post(&c, &keel.url, deposits(&["a"; 5], 1, 0)).await);
    let mut all = Stream::open(&keel.url, "", None).await;
    let mut none = Stream::open(&keel.url, "?kind=sku", None).await;
    all.events_until(last, 10).await;
    let pid = keel.child.id();
    let started = Instant::now();
    let terminate = tokio::task::spawn_blocking(move || keel.terminate());
    let resume = all.next_event().await.unwrap();
    assert_eq!(resume.event.as_deref(), Some("resume"));
    assert_eq!(resume.id, Some(last));
    assert_eq!(
        resume.json(),
        json!({"reason": "shutting_down", "resume_after": last})
    );
    assert!(all.next().await.is_none(), "the stream ends after resume");
    // A subscription that received nothing resumes after where it started.
    let resume = none.next_event().await.unwrap();
    assert_eq!(
        resume.json(),
        json!({"reason": "shutting_down", "resume_after": 0})
    );
    let status = terminate.await.unwrap();
    assert!(status.success(), "keel serve {pid} exited with {status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown waited {:?} (the drain bound is 60 s)",
        started.elapsed()
    );
}

/// The router in process (no `keel serve`): the hub starts with the first subscription, and a
/// poisoned write path refuses subscriptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_router_streams_and_a_poisoned_engine_refuses() {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use keel_engine::{Engine, FaultPlan, MemoryStorage};
    use keel_ingress::http::{AppState, HttpLimits, router};
    use keel_sequencer::{Config, Sequencer};
    use std::sync::Arc;
    use tower::ServiceExt;

    // Sync 1 records the format version, sync 2 opens the account, sync 3 fails.
    let storage = Arc::new(MemoryStorage::new(FaultPlan {
        fail_sync_at: Some(3),
        power_loss_at: None,
    }));
    let engine = Engine::open(storage).unwrap();
    let sequencer = Arc::new(Sequencer::start(engine, Config::default()).unwrap());
    let app = router(AppState::new(
        Arc::clone(&sequencer),
        keel_ingress::metrics_handle().unwrap(),
        HttpLimits::default(),
    ));
    let call = |method: &str, uri: &str, body: Option<Value>| {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(body.map_or(Body::empty(), |b| Body::from(b.to_string())))
            .unwrap();
        app.clone().oneshot(request)
    };
    let stream = call("GET", "/v1/subscribe", None).await.unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    let mut body = stream.into_body();
    let open = json!({"commands": [{"type": "open_account", "account": "a"}]});
    let answer = call("POST", "/v1/batches", Some(open)).await.unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let frame = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("an event within the wait")
        .unwrap()
        .unwrap();
    let text = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
    assert!(text.contains("id: 1\nevent: event\n"), "{text}");

    let deposit = json!({"commands": [{"type": "deposit", "account": "a", "amount": 1}]});
    let answer = call("POST", "/v1/batches", Some(deposit)).await.unwrap();
    assert_eq!(answer.status().as_u16(), 503);
    assert!(sequencer.is_poisoned());
    let refused = call("GET", "/v1/subscribe", None).await.unwrap();
    assert_eq!(refused.status().as_u16(), 503);
    let bytes = axum::body::to_bytes(refused.into_body(), 1 << 16)
        .await
        .unwrap();
    let error: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(error["error"]["code"], "engine_poisoned");
}

/// The niceness of each thread of process `pid` whose name is `name` (`/proc/PID/task/*/stat`,
/// field 19).
fn thread_nices(pid: u32, name: &str) -> Vec<i64> {
    let mut nices = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) else {
            continue;
        };
        if comm.trim() != name {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // After the `(comm)` field: state is field 3, nice is field 19.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        nices.push(fields[19 - 3].parse().unwrap());
    }
    nices
}

/// Subscription connections and the hub run on the subscription lane, at the niceness
/// `--subscriber-nice` gives; requests that are not subscriptions stay on the main runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_served_on_the_lower_priority_lane() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &["--subscriber-nice", "7"]);
    let c = client();
    post(
        &c,
        &keel.url,
        json!([{"type": "open_account", "account": "a"}]),
    )
    .await;
    assert_eq!(
        metric(&c, &keel.url, "keel_subscribe_lane_connections_total").await,
        0.0,
        "writes and metrics are not on the lane"
    );
    let mut stream = Stream::open(&keel.url, "", None).await;
    assert_eq!(stream.next_event().await.unwrap().id, Some(1));
    assert_eq!(
        metric(&c, &keel.url, "keel_subscribe_lane_connections_total").await,
        1.0
    );
    let lane = thread_nices(keel.child.id(), "keel-subscribe");
    assert!(
        !lane.is_empty(),
        "the lane's threads are named keel-subscribe"
    );
    assert!(lane.iter().all(|&nice| nice == 7), "{lane:?}");
    let main = thread_nices(keel.child.id(), "tokio-rt-worker");
    assert!(!main.is_empty());
    assert!(main.iter().all(|&nice| nice == 0), "{main:?}");
    // Live delivery works from the lane.
    let answer = post(&c, &keel.url, deposits(&["a"], 1, 0)).await;
    assert_eq!(
        stream.next_event().await.unwrap().id,
        Some(last_seq(&answer))
    );
}

/// With a wake-up budget of 1 per second, a round that woke the one subscriber is followed by
/// the next at least a second later, and the batches committed meanwhile arrive together in
/// one delivery, every event once and in order: a subscriber that keeps up is not ended as too
/// slow, though more batches than its buffer of 2 came in during the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fan_out_is_paced_by_its_wakeup_budget_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(
        dir.path(),
        &[
            "--subscriber-wakeups-per-sec",
            "1",
            "--subscriber-buffer-batches",
            "2",
        ],
    );
    let c = client();
    let first = post(
        &c,
        &keel.url,
        json!([{"type": "open_account", "account": "a"}]),
    )
    .await;
    let mut stream = Stream::open(&keel.url, &format!("?after={}", last_seq(&first)), None).await;
    // Round 1: one batch, delivered at once (nothing was delivered before).
    let answer = post(&c, &keel.url, deposits(&["a"], 1, 0)).await;
    assert_eq!(
        stream.next_event().await.unwrap().id,
        Some(last_seq(&answer))
    );
    let round_one = Instant::now();
    // Six more batches, each committed (fsynced) before the next is sent.
    let mut last = 0;
    for _ in 0..6 {
        last = last_seq(&post(&c, &keel.url, deposits(&["a", "a"], 1, 0)).await);
    }
    let rest = stream.events_until(last, 12).await;
    assert!(
        round_one.elapsed() >= Duration::from_millis(500),
        "the next round waited for the budget: {:?}",
        round_one.elapsed()
    );
    let ids: Vec<u64> = rest.iter().map(|b| b.id.unwrap()).collect();
    assert_eq!(ids, (last - 11..=last).collect::<Vec<_>>());
    // Each batch's durable time still comes before its first event.
    let commented = rest
        .iter()
        .filter(|b| b.comments.iter().any(|c| c.starts_with("batch ")))
        .count();
    assert_eq!(commented, 6, "{rest:?}");
    assert_eq!(
        metric(&c, &keel.url, "keel_subscriber_overflows_total").await,
        0.0
    );
}

/// A filtered subscriber's events are scattered over a round's shared chunk; the round hands
/// them out as one piece (copied together). The piece holds exactly its events, in order, each
/// batch's durable-time comment before its first one, each event as `GET /v1/events` serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_subscriber_gets_its_scattered_events_of_a_round_exactly() {
    let dir = tempfile::tempdir().unwrap();
    // One wake-up a second: the batches after the first round go out together.
    let keel = KeelProcess::start(dir.path(), &["--subscriber-wakeups-per-sec", "1"]);
    let c = client();
    let opened = post(
        &c,
        &keel.url,
        json!([{"type": "open_account", "account": "a"}, {"type": "open_account", "account": "b"}]),
    )
    .await;
    let after = last_seq(&opened);
    let mut stream = Stream::open(
        &keel.url,
        &format!("?after={after}&aggregate=account:a"),
        None,
    )
    .await;
    let first = post(&c, &keel.url, deposits(&["a"], 1, 0)).await;
    assert_eq!(
        stream.next_event().await.unwrap().id,
        Some(last_seq(&first))
    );
    // Three batches of b, a, b, a, b: a's events are the 2nd and 4th of each.
    let mut wanted = Vec::new();
    let mut last = 0;
    for _ in 0..3 {
        last = last_seq(&post(&c, &keel.url, deposits(&["b", "a", "b", "a", "b"], 1, 9)).await);
        wanted.extend([last - 3, last - 1]);
    }
    let got = stream.events_until(*wanted.last().unwrap(), 6).await;
    let ids: Vec<u64> = got.iter().map(|b| b.id.unwrap()).collect();
    assert_eq!(ids, wanted);
    let served = served_events(&c, &keel.url, last).await;
    for block in &got {
        let seq = block.id.unwrap();
        assert_eq!(&block.json(), &served[(seq - 1) as usize], "event {seq}");
    }
    // Every batch announced once, before its first event of a (the 1st, 3rd and 5th block).
    for (i, block) in got.iter().enumerate() {
        let announced = block.comments.iter().any(|c| c.starts_with("batch "));
        assert_eq!(announced, i % 2 == 0, "block {i}: {block:?}");
    }
}
