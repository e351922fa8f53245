//! Every error is the documented JSON error, over a real socket to a real `keel serve`: bad
//! paths, wrong methods, broken or encoded bodies, non-object shapes, and long input that must
//! not be echoed back in full. Raw TCP where reqwest cannot express the request.
#![allow(clippy::unwrap_used)] // a test may unwrap: the panic is its failure report

mod common;

use common::{KeelProcess, RawAnswer, client, raw_exchange};
use serde_json::{Value, json};

fn assert_error(answer: &RawAnswer, status: u16, code: &str) {
    assert_eq!(answer.status, status, "{answer:?}");
    assert_eq!(
        answer.header("content-type"),
        Some("application/json"),
        "{answer:?}"
    );
    assert_eq!(answer.json()["error"]["code"], code, "{answer:?}");
}

fn post_raw(head_extra: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /v1/batches HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{head_extra}\r\n"
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

async fn last_seq(c: &reqwest::Client, url: &str) -> u64 {
    let events: Value = c
        .get(format!("{url}/v1/events"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    events["last_seq"].as_u64().unwrap()
}

/// Regression: non-UTF-8 paths answered `400 text/plain`, a wrong method `405` with an empty
/// body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_paths_and_wrong_methods_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &[]);
    let url = keel.url.clone();
    tokio::task::spawn_blocking(move || {
        for path in ["/v1/aggregates/%FF%FE", "/v1/batches/%FF"] {
            let answer = raw_exchange(
                &url,
                format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
                false,
            );
            assert_error(&answer, 400, "invalid_path");
        }
        for (method, path, allow) in [
            ("GET", "/v1/batches", "POST"),
            ("DELETE", "/v1/aggregates/account:x", "GET"),
            ("PUT", "/v1/events", "GET"),
        ] {
            let answer = raw_exchange(
                &url,
                format!("{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
                    .as_bytes(),
                false,
            );
            assert_error(&answer, 405, "method_not_allowed");
            assert!(
                answer.header("allow").is_some_and(|a| a.contains(allow)),
                "{method} {path}: {answer:?}"
            );
        }
    })
    .await
    .unwrap();
}

/// Regression: a malformed chunked body or a body shorter than its Content-Length answered
/// `413 body_too_large`; a gzip transfer coding was ignored and the body taken as plain JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_and_encoded_bodies_are_refused_by_kind() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &["--body-read-timeout-ms", "800"]);
    let url = keel.url.clone();
    let body = br#"{"commands":[{"type":"open_account","account":"x"}]}"#;
    let chunked = |body: &[u8]| {
        let mut framed = format!("{:x}\r\n", body.len()).into_bytes();
        framed.extend_from_slice(body);
        framed.extend_from_slice(b"\r\n0\r\n\r\n");
        framed
    };
    let cases: Vec<(&str, Vec<u8>, bool, u16, &str)> = vec![
        (
            "bad chunk size",
            post_raw("transfer-encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n"),
            true,
            400,
            "malformed_body",
        ),
        (
            "body shorter than its Content-Length",
            post_raw(&format!("content-length: {}\r\n", body.len() + 40), body),
            true,
            400,
            "malformed_body",
        ),
        (
            "body that stops arriving",
            post_raw(&format!("content-length: {}\r\n", body.len() + 40), body),
            false,
            408,
            "request_timeout",
        ),
        (
            "gzip transfer coding",
            post_raw("transfer-encoding: gzip, chunked\r\n", &chunked(body)),
            false,
            415,
            "unsupported_encoding",
        ),
        (
            "gzip content coding",
            post_raw(
                &format!(
                    "content-encoding: gzip\r\ncontent-length: {}\r\n",
                    body.len()
                ),
                body,
            ),
            false,
            415,
            "unsupported_encoding",
        ),
        (
            "declared length over the bound",
            post_raw("content-length: 99999999999\r\n", b""),
            false,
            413,
            "body_too_large",
        ),
    ];
    let checked = tokio::task::spawn_blocking(move || {
        for (name, request, close_write, status, code) in cases {
            let answer = raw_exchange(&url, &request, close_write);
            assert_eq!(answer.status, status, "{name}: {answer:?}");
            assert_eq!(answer.json()["error"]["code"], code, "{name}: {answer:?}");
        }
        // The control: the same body, plainly chunked, commits.
        let answer = raw_exchange(
            &url,
            &post_raw("transfer-encoding: chunked\r\n", &chunked(body)),
            false,
        );
        assert_eq!(answer.status, 200, "{answer:?}");
    });
    checked.await.unwrap();
    assert_eq!(
        last_seq(&client(), &keel.url).await,
        1,
        "only the control committed"
    );
}

/// Regression: a body shaped as a JSON array (`[[{...}], false]`, or a command as a positional
/// array) was accepted and committed, because derived structs also accept sequences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_documented_object_shapes_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &[]);
    let c = client();
    let cases = [
        (
            json!([[{"type": "open_account", "account": "x"}], false]),
            "",
        ),
        (
            json!({"commands": [["open_account", null, null, "x"]]}),
            "commands[0]",
        ),
        (
            json!({"commands": [{"type": "open_account", "account": "x"}, ["open_account"]]}),
            "commands[1]",
        ),
    ];
    for (body, needle) in cases {
        let r = c
            .post(format!("{}/v1/batches", keel.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{body}");
        let answer: Value = r.json().await.unwrap();
        assert_eq!(
            answer["error"]["code"], "invalid_request",
            "{body}: {answer}"
        );
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains(needle),
            "{answer}"
        );
    }
    assert_eq!(last_seq(&c, &keel.url).await, 0, "nothing committed");
}

/// Regression: error messages echoed input in full (a 900 KB `type` came back as a 900 KB
/// message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_messages_quote_only_a_short_prefix_of_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &[]);
    let c = client();
    let long = "y".repeat(900_000);
    let bodies = [
        (
            json!({"commands": [{"type": long, "account": "x"}]}),
            "unknown_command_type",
        ),
        (
            json!({"commands": [{"type": "open_account", long.clone(): 1}]}),
            "unknown_field",
        ),
        (
            json!({"commands": [{"type": "deposit", "account": "x", "amount": long}]}),
            "invalid_amount",
        ),
        (
            json!({"commands": [{"type": "open_account", "account": "x", "expected_version": long}]}),
            "invalid_request",
        ),
        (json!({long.clone(): []}), "unknown_field"),
    ];
    for (body, code) in bodies {
        let r = c
            .post(format!("{}/v1/batches", keel.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let answer: Value = r.json().await.unwrap();
        let message = answer["error"]["message"].as_str().unwrap();
        assert_eq!(answer["error"]["code"], code, "{message}");
        assert!(message.len() < 400, "{code}: {} bytes", message.len());
        assert!(message.contains("yyyy"), "the prefix is quoted: {message}");
    }
    let (status, answer) = {
        let r = c
            .get(format!("{}/v1/aggregates/{}", keel.url, "z".repeat(20_000)))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 400);
    assert!(answer["error"]["message"].as_str().unwrap().len() < 400);
    let r = c
        .get(format!("{}/v1/events?{}=1", keel.url, "q".repeat(20_000)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "invalid_query");
    assert!(answer["error"]["message"].as_str().unwrap().len() < 400);
}

/// Integers above 2^53 - 1 (which JavaScript rounds) may be sent as decimal strings; they are
/// stored and answered exactly. Other strings are refused like any bad amount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_integers_travel_exactly_as_numbers_or_decimal_strings() {
    let dir = tempfile::tempdir().unwrap();
    let keel = KeelProcess::start(dir.path(), &[]);
    let c = client();
    let post = |body: Value| {
        let c = c.clone();
        let url = keel.url.clone();
        async move {
            let r = c
                .post(format!("{url}/v1/batches"))
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = post(json!({"commands": [
        {"type": "open_account", "account": "big", "overdraft_limit": "0"},
        {"type": "deposit", "account": "big", "amount": "9007199254740993"},
        {"type": "deposit", "account": "big", "amount": 9007199254740995u64},
        {"type": "create_sku", "sku": "s", "on_hand": "9223372036854775807"},
    ]}))
    .await;
    assert_eq!(status, 200, "{body}");
    let account = common::get_text(&c, &format!("{}/v1/aggregates/account:big", keel.url)).await;
    assert!(
        account.contains("\"balance\":18014398509481988"),
        "exact sum of both deposits: {account}"
    );
    for bad in ["9223372036854775808", "-1", "01", "1e3", " 1", ""] {
        let (status, body) =
            post(json!({"commands": [{"type": "deposit", "account": "big", "amount": bad}]})).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
        assert_eq!(body["error"]["code"], "invalid_amount", "{bad:?}: {body}");
    }
}
