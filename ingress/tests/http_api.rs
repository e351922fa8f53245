//! End-to-end tests of the HTTP API against a real `keel serve` process over a real socket.
#![allow(clippy::unwrap_used)] // a test may unwrap: the panic is its failure report

mod common;

use common::{KeelProcess, client};
use serde_json::{Value, json};

async fn post(c: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = c
        .post(format!("{url}/v1/batches"))
        .json(&body)
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json body"))
}

async fn get(c: &reqwest::Client, url: &str, path: &str) -> (u16, Value) {
    let r = c.get(format!("{url}{path}")).send().await.expect("get");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json body"))
}

fn statuses(body: &Value) -> Vec<String> {
    body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| match r["status"].as_str() {
            Some("committed") => "committed".to_string(),
            _ => r["code"].as_str().unwrap_or("?").to_string(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_batch_answers_every_item_in_order_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &[]);
    let c = client();
    let (status, body) = post(
        &c,
        &keel.url,
        json!({"commands": [
            {"type": "open_account", "account": "alice", "overdraft_limit": 10},
            {"type": "open_account", "account": "bob"},
            {"type": "deposit", "account": "alice", "amount": 100, "memo": "salary"},
            {"type": "withdraw", "account": "bob", "amount": 1},
            {"type": "transfer", "from": "alice", "to": "bob", "amount": 105},
            {"type": "transfer", "from": "alice", "to": "carol", "amount": 1},
            {"type": "create_sku", "sku": "A-17", "on_hand": 5},
            {"type": "reserve", "sku": "A-17", "qty": 3, "order": "o-1"},
            {"type": "reserve", "sku": "A-17", "qty": 3, "order": "o-2"},
            {"type": "ship", "sku": "A-17", "order": "o-1"},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        statuses(&body),
        [
            "committed",
            "committed",
            "committed",
            "insufficient_funds",
            "committed",
            "account_not_found",
            "committed",
            "committed",
            "insufficient_stock",
            "committed"
        ]
    );
    let seqs: Vec<u64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .collect();
    assert_eq!(
        seqs,
        [1, 2, 3, 4, 5, 6, 7],
        "committed items get gapless sequences in order"
    );
    assert_eq!(body["batch"], 1);
    assert!(body["committed_at"].as_str().unwrap().ends_with('Z'));

    let (status, alice) = get(&c, &keel.url, "/v1/aggregates/account:alice").await;
    assert_eq!(status, 200);
    assert_eq!(
        alice,
        json!({"id": "account:alice", "kind": "account", "version": 3,
        "state": {"balance": -5, "overdraft_limit": 10, "closed": false}})
    );
    let (_, sku) = get(&c, &keel.url, "/v1/aggregates/sku:A-17").await;
    assert_eq!(
        sku["state"],
        json!({"on_hand": 2, "reserved": 0, "available": 2, "reservations": {}})
    );
    assert_eq!(sku["version"], 3);
    let (status, missing) = get(&c, &keel.url, "/v1/aggregates/account:carol").await;
    assert_eq!(status, 404);
    assert_eq!(missing["error"]["code"], "not_found");

    let (status, events) = get(&c, &keel.url, "/v1/events?after=2&limit=2").await;
    assert_eq!(status, 200);
    assert_eq!(events["last_seq"], 7);
    assert_eq!(events["next_after"], 4);
    let first = &events["events"][0];
    assert_eq!(first["seq"], 3);
    assert_eq!(first["type"], "deposited");
    assert_eq!(first["aggregates"], json!(["account:alice"]));
    assert_eq!(
        first["data"],
        json!({"account": "alice", "amount": 100, "memo": "salary"})
    );
    assert_eq!(events["events"][1]["type"], "transferred");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_batch_commits_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &[]);
    let c = client();
    let (status, body) = post(
        &c,
        &keel.url,
        json!({"atomic": true, "commands": [
            {"type": "open_account", "account": "a", "id": "open-a"},
            {"type": "deposit", "account": "a", "amount": 50},
            {"type": "withdraw", "account": "a", "amount": 60},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        statuses(&body),
        ["atomic_rollback", "atomic_rollback", "insufficient_funds"]
    );
    assert_eq!(body["batch"], Value::Null);
    assert_eq!(
        get(&c, &keel.url, "/v1/aggregates/account:a").await.0,
        404,
        "nothing of it was written"
    );
    assert_eq!(get(&c, &keel.url, "/v1/events").await.1["last_seq"], 0);

    // The same ids may be retried once the request is fixed: a rolled-back request leaves no trace.
    let (status, body) = post(
        &c,
        &keel.url,
        json!({"atomic": true, "commands": [
            {"type": "open_account", "account": "a", "id": "open-a"},
            {"type": "deposit", "account": "a", "amount": 50},
            {"type": "withdraw", "account": "a", "amount": 20},
        ]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(statuses(&body), ["committed", "committed", "committed"]);
    assert_eq!(
        get(&c, &keel.url, "/v1/aggregates/account:a").await.1["state"]["balance"],
        30
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_command_id_returns_the_original_result_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &[]);
    let c = client();
    let batch = json!({"commands": [
        {"type": "open_account", "account": "a", "id": "c-1"},
        {"type": "deposit", "account": "a", "amount": 7, "id": "c-2"},
        {"type": "withdraw", "account": "a", "amount": 100, "id": "c-3"},
    ]});
    let (_, first) = post(&c, &keel.url, batch.clone()).await;
    assert_eq!(
        statuses(&first),
        ["committed", "committed", "insufficient_funds"]
    );
    // Now the withdrawal would succeed, but the retry must get the original rejection.
    post(
        &c,
        &keel.url,
        json!({"commands": [{"type": "deposit", "account": "a", "amount": 1000}]}),
    )
    .await;
    let (status, retry) = post(&c, &keel.url, batch).await;
    assert_eq!(status, 200);
    assert_eq!(
        statuses(&retry),
        ["committed", "committed", "insufficient_funds"]
    );
    for i in 0..3 {
        assert_eq!(retry["results"][i]["replayed"], true, "{retry}");
        assert_eq!(retry["results"][i]["seq"], first["results"][i]["seq"]);
    }
    assert_eq!(retry["batch"], Value::Null, "a pure replay commits nothing");
    let (_, a) = get(&c, &keel.url, "/v1/aggregates/account:a").await;
    assert_eq!(a["state"]["balance"], 1007);
    assert_eq!(a["version"], 3);

    // A repeat inside one request is answered from the first occurrence.
    let (_, dup) = post(
        &c,
        &keel.url,
        json!({"commands": [
            {"type": "deposit", "account": "a", "amount": 1, "id": "d"},
            {"type": "deposit", "account": "a", "amount": 1, "id": "d"},
        ]}),
    )
    .await;
    assert_eq!(dup["results"][1]["replayed"], true);
    assert_eq!(dup["results"][1]["seq"], dup["results"][0]["seq"]);
    assert_eq!(
        get(&c, &keel.url, "/v1/aggregates/account:a").await.1["state"]["balance"],
        1008
    );

    // The index survives a restart.
    let data = keel.data.clone();
    assert!(keel.terminate().success());
    let keel = KeelProcess::start(&data, &[]);
    let (_, again) = post(
        &c,
        &keel.url,
        json!({"commands": [
        {"type": "deposit", "account": "a", "amount": 7, "id": "c-2"}]}),
    )
    .await;
    assert_eq!(again["results"][0]["seq"], first["results"][1]["seq"]);
    assert_eq!(again["results"][0]["replayed"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_version_mismatch_is_a_version_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &[]);
    let c = client();
    let (_, body) = post(
        &c,
        &keel.url,
        json!({"commands": [
            {"type": "open_account", "account": "a", "expected_version": 0},
            {"type": "deposit", "account": "a", "amount": 5, "expected_version": 1},
            {"type": "deposit", "account": "a", "amount": 5, "expected_version": 1},
            {"type": "open_account", "account": "a", "expected_version": 0},
        ]}),
    )
    .await;
    assert_eq!(
        statuses(&body),
        [
            "committed",
            "committed",
            "version_conflict",
            "version_conflict"
        ]
    );
    assert!(
        body["results"][2]["message"]
            .as_str()
            .unwrap()
            .contains("version 2, expected 1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(
        dir.path(),
        &["--batch-items-max", "10", "--body-bytes-max", "4096"],
    );
    let c = client();
    let ok = json!({"type": "open_account", "account": "x"});
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "unknown type",
            json!({"commands": [ok, {"type": "steal", "account": "x"}]}),
            "unknown_command_type",
            "commands[1]",
        ),
        (
            "missing type",
            json!({"commands": [{"account": "x"}]}),
            "missing_field",
            "`type`",
        ),
        (
            "missing field",
            json!({"commands": [ok, {"type": "transfer", "from": "x", "amount": 1}]}),
            "missing_field",
            "`to`",
        ),
        (
            "unknown field",
            json!({"commands": [{"type": "deposit", "account": "x", "amount": 1, "colour": "red"}]}),
            "unknown_field",
            "colour",
        ),
        (
            "field of another type",
            json!({"commands": [{"type": "deposit", "account": "x", "amount": 1, "sku": "s"}]}),
            "unexpected_field",
            "`sku`",
        ),
        (
            "unknown top-level field",
            json!({"commands": [ok], "atomik": true}),
            "unknown_field",
            "atomik",
        ),
        (
            "negative amount",
            json!({"commands": [{"type": "deposit", "account": "x", "amount": -5}]}),
            "invalid_amount",
            "-5",
        ),
        (
            "zero amount",
            json!({"commands": [{"type": "deposit", "account": "x", "amount": 0}]}),
            "invalid_amount",
            "greater than 0",
        ),
        (
            "fractional amount",
            json!({"commands": [{"type": "deposit", "account": "x", "amount": 1.5}]}),
            "invalid_amount",
            "1.5",
        ),
        (
            "amount above i64",
            json!({"commands": [{"type": "deposit", "account": "x", "amount": 9223372036854775808u64}]}),
            "invalid_amount",
            "9223372036854775808",
        ),
        (
            "amount above u64",
            json!({"commands": [{"type": "deposit", "account": "x", "amount": 1e20}]}),
            "invalid_amount",
            "amount",
        ),
        (
            "empty name",
            json!({"commands": [{"type": "open_account", "account": ""}]}),
            "invalid_name",
            "`account`",
        ),
        (
            "name with space",
            json!({"commands": [{"type": "open_account", "account": "a b"}]}),
            "invalid_name",
            "`account`",
        ),
        (
            "empty batch",
            json!({"commands": []}),
            "empty_batch",
            "empty",
        ),
        (
            "no commands",
            json!({"atomic": true}),
            "missing_field",
            "commands",
        ),
        (
            "too many items",
            json!({"commands": vec![ok.clone(); 11]}),
            "too_many_items",
            "at most 10",
        ),
        (
            "commands not a list",
            json!({"commands": {"type": "open_account"}}),
            "invalid_request",
            "array",
        ),
        (
            "negative expected_version",
            json!({"commands": [{"type": "open_account", "account": "x", "expected_version": -1}]}),
            "invalid_request",
            "commands[0]",
        ),
    ];
    for (name, body, code, needle) in cases {
        let (status, answer) = post(&c, &keel.url, body).await;
        assert_eq!(status, 400, "{name}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{name}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{name}: message {message:?} should mention {needle:?}"
        );
    }

    let raw = |body: &'static str, content_type: &'static str| {
        c.post(format!("{}/v1/batches", keel.url))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let r = raw("{\"commands\": [", "application/json").await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_json"
    );
    let r = raw(
        r#"{"commands":[{"type":"open_account","account":"x"}]}"#,
        "text/plain",
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "unsupported_media_type"
    );
    let big = json!({"commands": [{"type": "deposit", "account": "x", "amount": 1, "memo": "m".repeat(5000)}]});
    let (status, answer) = post(&c, &keel.url, big).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"]["code"], "body_too_large");

    let (_, events) = get(&c, &keel.url, "/v1/events").await;
    assert_eq!(events["last_seq"], 0, "no bad request committed anything");
    assert_eq!(get(&c, &keel.url, "/v1/aggregates/account:x").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_refused_at_once_with_503_and_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(
        dir.path(),
        &["--queue-depth-max", "1", "--batch-items-max", "2000"],
    );
    let c = client();
    post(
        &c,
        &keel.url,
        json!({"commands": [{"type": "open_account", "account": "hot"}]}),
    )
    .await;
    let deposits: Vec<Value> = (0..2000)
        .map(|_| json!({"type": "deposit", "account": "hot", "amount": 1}))
        .collect();
    let body = json!({"commands": deposits});
    let mut tasks = Vec::new();
    for _ in 0..48 {
        let (c, url, body) = (c.clone(), keel.url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(format!("{url}/v1/batches"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            (
                r.status().as_u16(),
                retry_after,
                r.json::<Value>().await.unwrap(),
            )
        }));
    }
    let (mut ok, mut overloaded) = (0u64, 0u64);
    for task in tasks {
        let (status, retry_after, body) = task.await.unwrap();
        match status {
            200 => {
                assert!(
                    body["results"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|r| r["status"] == "committed")
                );
                ok += 1;
            }
            503 => {
                assert_eq!(body["error"]["code"], "overloaded", "{body}");
                assert_eq!(retry_after.as_deref(), Some("1"));
                overloaded += 1;
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(
        overloaded > 0,
        "48 concurrent requests into a queue of 1 must overflow it"
    );
    assert!(ok > 0);
    let (_, hot) = get(&c, &keel.url, "/v1/aggregates/account:hot").await;
    assert_eq!(
        hot["state"]["balance"].as_u64(),
        Some(ok * 2000),
        "exactly the accepted requests were committed"
    );
    let (_, ready) = get(&c, &keel.url, "/readyz").await;
    assert_eq!(ready["status"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_unknown_routes() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &[]);
    let c = client();
    assert_eq!(
        get(&c, &keel.url, "/healthz").await,
        (200, json!({"status": "ok"}))
    );
    assert_eq!(get(&c, &keel.url, "/readyz").await.0, 200);
    post(
        &c,
        &keel.url,
        json!({"commands": [{"type": "open_account", "account": "a"},
        {"type": "withdraw", "account": "a", "amount": 1}]}),
    )
    .await;
    let wanted = [
        "keel_items_committed_total 1",
        "keel_items_rejected_total{code=\"insufficient_funds\"} 1",
        "keel_batches_committed_total 1",
        "keel_fsync_seconds_bucket",
        "keel_batch_items_bucket",
        "keel_request_seconds_bucket",
        // Set after each checkpoint, which an idle writer takes within a second.
        "keel_store_sorted_runs{family=\"command_ids\"}",
        "keel_store_table_readers_bytes{family=\"command_ids\"}",
        "keel_store_table_readers_bytes{family=\"state\"}",
    ];
    // The writer records a batch's metrics after it answers, so a scrape right after the
    // answer can precede them: scrape again, at most 50 times 100 ms.
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = common::get_text(&c, &format!("{}/metrics", keel.url)).await;
        if wanted.iter().all(|series| metrics.contains(series)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for series in wanted {
        assert!(
            metrics.contains(series),
            "/metrics lacks {series:?}:\n{metrics}"
        );
    }
    let (status, body) = get(&c, &keel.url, "/v2/nothing").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, body) = get(&c, &keel.url, "/v1/events?limit=0").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );
    let (status, body) = get(&c, &keel.url, "/v1/aggregates/alice").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_name"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_closes_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &[]);
    let c = client();
    post(
        &c,
        &keel.url,
        json!({"commands": [{"type": "open_account", "account": "a"}]}),
    )
    .await;
    let deposits: Vec<Value> = (0..1000)
        .map(|_| json!({"type": "deposit", "account": "a", "amount": 1}))
        .collect();
    let body = json!({"commands": deposits});
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, url, body) = (c.clone(), keel.url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = 0u64;
            for _ in 0..200 {
                match c.post(format!("{url}/v1/batches")).json(&body).send().await {
                    Ok(r) if r.status() == 200 => acked += 1000,
                    _ => break, // refused (503 shutting_down) or connection closed: stop
                }
            }
            acked
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let data = keel.data.clone();
    let status = tokio::task::spawn_blocking(move || keel.terminate())
        .await
        .unwrap();
    assert!(
        status.success(),
        "keel serve exits 0 after SIGTERM: {status:?}"
    );
    let mut acked = 0;
    for task in tasks {
        acked += task.await.unwrap();
    }
    assert!(acked > 0);
    let keel = KeelProcess::start(&data, &[]);
    let balance = get(&c, &keel.url, "/v1/aggregates/account:a").await.1["state"]["balance"]
        .as_u64()
        .unwrap();
    assert!(
        balance >= acked,
        "every acknowledged deposit survived: balance {balance} < acked {acked}"
    );
}
