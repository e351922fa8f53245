//! API keys, scopes, key reload, "who wrote this", and TLS, against a real `keel serve` (and
//! `keel keys`, `keel audit`) over real sockets on loopback.
#![allow(clippy::unwrap_used)] // a test may unwrap: the panic is its failure report

mod common;

use common::KeelProcess;
use keel_projection::http_client::{self, ClientOptions};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn keel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("KEEL_AUTH_KEYS")
        .output()
        .expect("run keel")
}

/// `keel keys add`; returns the key it printed.
fn add_key(file: &Path, id: &str, scopes: &str) -> String {
    let out = keel(&[
        "keys",
        "add",
        "--file",
        file.to_str().unwrap(),
        "--id",
        id,
        "--scopes",
        scopes,
    ]);
    assert!(
        out.status.success(),
        "keys add {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("keel_") && key.len() == 69, "{key}");
    key
}

fn keys_cmd(file: &Path, verb: &str, id: &str) -> Output {
    keel(&["keys", verb, "--file", file.to_str().unwrap(), "--id", id])
}

fn hangup(server: &KeelProcess) {
    let status = Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn client_with(options: &ClientOptions) -> reqwest::Client {
    http_client::builder(options)
        .unwrap()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn keyed(key: &str) -> reqwest::Client {
    client_with(&ClientOptions {
        ca_cert: None,
        api_key: Some(key.to_string()),
    })
}

async fn status_and_body(request: reqwest::RequestBuilder) -> (u16, Value, Option<String>) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let body = response.bytes().await.unwrap();
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, body, challenge)
}

fn open_batch(n: usize, tag: &str) -> Value {
    let commands: Vec<Value> = (0..n)
        .map(|i| {
            json!({"type": "open_account", "id": format!("{tag}-{i}"), "account": format!("{tag}{i}")})
        })
        .collect();
    json!({ "commands": commands })
}

/// Every route, the scope it needs (None: open), and a request for it.
fn routes(url: &str) -> Vec<(&'static str, Option<&'static str>, reqwest::Method, String)> {
    use reqwest::Method;
    vec![
        (
            "POST /v1/batches",
            Some("write"),
            Method::POST,
            format!("{url}/v1/batches"),
        ),
        (
            "GET /v1/aggregates",
            Some("read"),
            Method::GET,
            format!("{url}/v1/aggregates/account:a0"),
        ),
        (
            "GET /v1/events",
            Some("read"),
            Method::GET,
            format!("{url}/v1/events"),
        ),
        (
            "GET /v1/batches",
            Some("read"),
            Method::GET,
            format!("{url}/v1/batches/1"),
        ),
        (
            "GET /v1/subscribe",
            Some("read"),
            Method::GET,
            format!("{url}/v1/subscribe?after=0"),
        ),
        (
            "GET /v1/openapi.json",
            None,
            Method::GET,
            format!("{url}/v1/openapi.json"),
        ),
        (
            "GET /metrics",
            Some("admin"),
            Method::GET,
            format!("{url}/metrics"),
        ),
        ("GET /healthz", None, Method::GET, format!("{url}/healthz")),
        ("GET /readyz", None, Method::GET, format!("{url}/readyz")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_checks_the_key_and_its_scope() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    let writer = add_key(&keys, "writer", "write");
    let reader = add_key(&keys, "reader", "read");
    let admin = add_key(&keys, "ops", "admin");
    let all = add_key(&keys, "all", "write,read,admin");
    let revoked = add_key(&keys, "gone", "write,read,admin");
    assert!(keys_cmd(&keys, "revoke", "gone").status.success());
    // The file holds hashes only, readable by its owner only.
    let text = std::fs::read_to_string(&keys).unwrap();
    for key in [&writer, &reader, &admin, &all, &revoked] {
        assert!(!text.contains(key.as_str()));
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let data = dir.path().join("data");
    let server = KeelProcess::start(&data, &["--auth-keys", keys.to_str().unwrap()]);
    // One committed batch so that the read routes have something to answer.
    let (status, _, _) = status_and_body(
        keyed(&writer)
            .post(format!("{}/v1/batches", server.url))
            .json(&open_batch(1, "a")),
    )
    .await;
    assert_eq!(status, 200);

    let anonymous = client_with(&ClientOptions::default());
    let wrong = keyed(&format!("keel_{}", "0".repeat(64)));
    let scoped = |scope: &str| match scope {
        "write" => keyed(&writer),
        "read" => keyed(&reader),
        _ => keyed(&admin),
    };
    for (name, scope, method, url) in routes(&server.url) {
        let request = |client: &reqwest::Client| {
            let builder = client.request(method.clone(), &url);
            if method == reqwest::Method::POST {
                builder.json(&open_batch(1, &format!("r{}", name.len())))
            } else {
                builder
            }
        };
        let Some(scope) = scope else {
            let (status, _, _) = status_and_body(request(&anonymous)).await;
            assert_eq!(status, 200, "{name} is open");
            continue;
        };
        for (who, client) in [
            ("no key", &anonymous),
            ("wrong key", &wrong),
            ("revoked key", &keyed(&revoked)),
        ] {
            let (status, body, challenge) = status_and_body(request(client)).await;
            assert_eq!(status, 401, "{name} with {who}: {body}");
            assert_eq!(body["error"]["code"], "unauthorized", "{name} with {who}");
            assert!(challenge.unwrap().starts_with("Bearer"), "{name}");
        }
        for other in ["write", "read", "admin"]
            .into_iter()
            .filter(|s| *s != scope)
        {
            let (status, body, _) = status_and_body(request(&scoped(other))).await;
            assert_eq!(status, 403, "{name} with a `{other}` key: {body}");
            assert_eq!(body["error"]["code"], "forbidden");
            assert!(
                body["error"]["message"].as_str().unwrap().contains(scope),
                "{body}"
            );
        }
        for client in [scoped(scope), keyed(&all)] {
            let response = request(&client).send().await.unwrap();
            assert_eq!(
                response.status().as_u16(),
                200,
                "{name} with the `{scope}` scope"
            );
        }
    }
    // A malformed header is a 401 too, never a 500.
    let response = anonymous
        .get(format!("{}/v1/events", server.url))
        .header("authorization", "Basic dXNlcjpwdw==")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_the_audit_name_the_keys_that_wrote_them() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    let orders = add_key(&keys, "orders", "write,read");
    let billing = add_key(&keys, "billing", "write");
    let data = dir.path().join("data");
    let server = KeelProcess::start(
        &data,
        &[
            "--auth-keys",
            keys.to_str().unwrap(),
            "--linger-us",
            "20000",
        ],
    );
    // Two services write at the same time (the linger makes one batch of both, usually);
    // every batch must name exactly the keys whose requests it holds.
    let url = server.url.clone();
    let post = |key: String, tag: &'static str| {
        let url = url.clone();
        tokio::spawn(async move {
            let (status, body, _) = status_and_body(
                keyed(&key)
                    .post(format!("{url}/v1/batches"))
                    .json(&open_batch(3, tag)),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            body["batch"].as_u64().unwrap()
        })
    };
    let (a, b) = (post(orders.clone(), "o"), post(billing.clone(), "b"));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let reader = keyed(&orders);
    let batch_json = |seq: u64| {
        let reader = reader.clone();
        let url = url.clone();
        async move {
            let response = reader
                .get(format!("{url}/v1/batches/{seq}"))
                .header("accept", "application/json")
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 200);
            response.json::<Value>().await.unwrap()
        }
    };
    let mut submitters = Vec::new();
    for seq in if a == b { vec![a] } else { vec![a, b] } {
        let batch = batch_json(seq).await;
        assert_eq!(batch["seq"], seq);
        assert_eq!(batch["hash"].as_str().unwrap().len(), 64);
        let named: Vec<String> = serde_json::from_value(batch["submitters"].clone()).unwrap();
        let tags: Vec<&str> = batch["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["command_id"].as_str().unwrap()[..1])
            .collect();
        // Only the keys whose requests are in it.
        for (tag, id) in [("o", "orders"), ("b", "billing")] {
            assert_eq!(
                tags.contains(&tag),
                named.contains(&id.to_string()),
                "{batch}"
            );
        }
        submitters.extend(named);
    }
    submitters.sort();
    assert_eq!(submitters, ["billing", "orders"]);
    // A retry that only replays adds no submitter to the batch it lands in.
    let (status, body, _) = status_and_body(
        keyed(&billing)
            .post(format!("{url}/v1/batches"))
            .json(&open_batch(3, "b")),
    )
    .await;
    assert_eq!(status, 200);
    assert!(body["batch"].is_null(), "replayed only: {body}");
    // The binary batch message stays the default answer (the projector's gap repair).
    let response = reader
        .get(format!("{url}/v1/batches/{a}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );

    // The audit (over the server's own directory, live) names both keys, and --url works
    // with a read key.
    let report = dir.path().join("report.json");
    let out = keel(&[
        "audit",
        "--data",
        data.to_str().unwrap(),
        "--json",
        report.to_str().unwrap(),
        "--url",
        &url,
        "--api-key",
        &orders,
    ]);
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{summary}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        summary.contains("submitters  billing (1 batches), orders (1 batches)") || a == b,
        "{summary}"
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let ids: Vec<&str> = report["submitters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["billing", "orders"], "{report}");
    // Without a key the audit's --url check fails with the server's answer.
    let out = keel(&["audit", "--data", data.to_str().unwrap(), "--url", &url]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_reload_on_sighup_and_a_broken_file_keeps_the_keys_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    let first = add_key(&keys, "first", "read");
    let admin = add_key(&keys, "ops", "admin");
    let server = KeelProcess::start(
        &dir.path().join("data"),
        &["--auth-keys", keys.to_str().unwrap()],
    );
    let events = format!("{}/v1/events", server.url);
    let status = |key: String| {
        let events = events.clone();
        async move {
            keyed(&key)
                .get(&events)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // Waits (bounded) until `key` answers `want`: the reload runs on the server's own time.
    async fn eventually(
        check: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = u16> + Send>>,
        want: u16,
        what: &str,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = check().await;
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: still {got} after 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(status(first.clone()).await, 200);
    let second = add_key(&keys, "second", "read");
    assert_eq!(
        status(second.clone()).await,
        401,
        "not loaded before SIGHUP"
    );
    hangup(&server);
    let s = second.clone();
    eventually(
        || Box::pin(status(s.clone())),
        200,
        "a key added, then SIGHUP",
    )
    .await;
    assert!(keys_cmd(&keys, "revoke", "first").status.success());
    hangup(&server);
    let f = first.clone();
    eventually(
        || Box::pin(status(f.clone())),
        401,
        "a key revoked, then SIGHUP",
    )
    .await;
    // A broken file: the reload fails, the keys in force stay, the failure is counted.
    std::fs::write(&keys, b"{ not json").unwrap();
    hangup(&server);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(
            status(second.clone()).await,
            200,
            "the keys in force stay after a failed reload"
        );
        if metrics(&keyed(&admin), &server)
            .await
            .contains("keel_reload_errors_total 1")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failed reload was not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.terminate();
}

/// The server's /metrics text, read by `client` (which carries an admin key).
async fn metrics(client: &reqwest::Client, server: &KeelProcess) -> String {
    common::get_text(client, &format!("{}/metrics", server.url)).await
}

#[test]
fn keys_cli_refuses_reused_ids_unknown_scopes_and_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    add_key(&keys, "svc", "write");
    let file = keys.to_str().unwrap();
    let out = keel(&[
        "keys", "add", "--file", file, "--id", "svc", "--scopes", "read",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already"));
    let out = keel(&[
        "keys", "add", "--file", file, "--id", "x", "--scopes", "root",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scope"));
    let out = keel(&[
        "keys", "add", "--file", file, "--id", "bad id", "--scopes", "read",
    ]);
    assert!(!out.status.success());
    let out = keys_cmd(&keys, "revoke", "nobody");
    assert!(!out.status.success());
    let out = keel(&["keys", "list", "--file", file]);
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("svc") && listing.contains("write") && !listing.contains("keel_"));
}

#[test]
fn an_unauthenticated_server_refuses_a_non_loopback_address_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let out = keel(&[
        "serve",
        "--data",
        dir.path().join("data").to_str().unwrap(),
        "--listen",
        "0.0.0.0:0",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--insecure-listen-any") && stderr.contains("--auth-keys"),
        "{stderr}"
    );
}

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM files.
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let made =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_batches_refuses_plain_and_untrusted_clients_and_reloads_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    let key = add_key(&keys, "svc", "write,read,admin");
    let (cert, cert_key) = certificate(dir.path(), "first");
    let (cert_file, key_file) = (dir.path().join("tls.pem"), dir.path().join("tls.key"));
    std::fs::copy(&cert, &cert_file).unwrap();
    std::fs::copy(&cert_key, &key_file).unwrap();
    let data = dir.path().join("data");
    let server = KeelProcess::start(
        &data,
        &[
            "--auth-keys",
            keys.to_str().unwrap(),
            "--tls-cert",
            cert_file.to_str().unwrap(),
            "--tls-key",
            key_file.to_str().unwrap(),
        ],
    );
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );
    let trusting = |ca: &Path| {
        client_with(&ClientOptions {
            ca_cert: Some(ca.to_owned()),
            api_key: Some(key.clone()),
        })
    };
    let (status, body, _) = status_and_body(
        trusting(&cert)
            .post(format!("{}/v1/batches", server.url))
            .json(&open_batch(2, "t")),
    )
    .await;
    assert_eq!(status, 200, "a batch over TLS: {body}");
    assert_eq!(body["results"][1]["status"], "committed");
    // A subscription over TLS is served on the subscription lane, and streams.
    let mut stream = trusting(&cert)
        .get(format!("{}/v1/subscribe?after=0", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !text.contains("id: 2\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, stream.chunk())
            .await
            .expect("the stream's first events within 20 s")
            .unwrap()
            .expect("the stream goes on");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(text.contains("id: 1\nevent: event\n"), "{text}");
    let lane_connections = metrics(&trusting(&cert), &server)
        .await
        .lines()
        .find_map(|line| line.strip_prefix("keel_subscribe_lane_connections_total "))
        .map(|v| v.trim().to_owned());
    assert_eq!(lane_connections.as_deref(), Some("1"));
    drop(stream);
    // Plain HTTP to the TLS port gets no answer; a client that does not trust the
    // certificate fails the handshake.
    let plain = client_with(&ClientOptions::default());
    let http_url = server.url.replacen("https://", "http://", 1);
    assert!(
        plain
            .get(format!("{http_url}/healthz"))
            .send()
            .await
            .is_err()
    );
    let (other, _) = certificate(dir.path(), "other");
    assert!(
        trusting(&other)
            .get(format!("{}/healthz", server.url))
            .send()
            .await
            .is_err()
    );

    // Reload: a new certificate in place of the old one, then SIGHUP.
    std::fs::copy(&other, &cert_file).unwrap();
    std::fs::copy(dir.path().join("other.key"), &key_file).unwrap();
    hangup(&server);
    let deadline = Instant::now() + Duration::from_secs(10);
    while trusting(&other)
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        trusting(&cert)
            .get(format!("{}/healthz", server.url))
            .send()
            .await
            .is_err()
    );
    // The audit's --url speaks https with --ca-cert.
    let out = keel(&[
        "audit",
        "--data",
        data.to_str().unwrap(),
        "--url",
        &server.url,
        "--ca-cert",
        other.to_str().unwrap(),
        "--api-key",
        &key,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A broken certificate file on reload keeps the one in force.
    std::fs::write(&cert_file, b"not a certificate").unwrap();
    hangup(&server);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            trusting(&other)
                .get(format!("{}/healthz", server.url))
                .send()
                .await
                .is_ok()
        );
        if metrics(&trusting(&other), &server)
            .await
            .contains("keel_reload_errors_total 1")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failed reload was not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.terminate();
}
