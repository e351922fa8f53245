//! Declared domains end to end: a real `keel serve --domain` process, the seat-booking and the
//! ledger example files, requests over a real socket, the answers, the reads, bad input, a
//! definition that does not load, and `keel audit` over the store afterwards.
#![allow(clippy::unwrap_used)] // a test may unwrap: the panic is its failure report

mod common;

use common::{KeelProcess, client};
use serde_json::{Value, json};
use std::process::Command;

fn example(name: &str) -> String {
    format!("{}/../examples/domains/{name}", env!("CARGO_MANIFEST_DIR"))
}

async fn post(c: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = c
        .post(format!("{url}/v1/batches"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn get(c: &reqwest::Client, url: &str, path: &str) -> (u16, Value) {
    let r = c.get(format!("{url}{path}")).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn outcomes(body: &Value) -> Vec<String> {
    body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| match r["status"].as_str() {
            Some("committed") => "committed".to_string(),
            _ => r["code"].as_str().unwrap_or("?").to_string(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seat_booking_over_http_then_audited() {
    let dir = tempfile::tempdir().unwrap();
    let seats = example("seats.toml");
    let ledger = example("ledger.toml");
    let keel = KeelProcess::start(dir.path(), &["--domain", &seats, "--domain", &ledger]);
    let c = client();

    let (status, domains) = get(&c, &keel.url, "/v1/domains").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = domains["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cel_ledger", "seats"]);
    assert_eq!(domains["rule_set"].as_str().unwrap().len(), 64);
    let hold = domains["domains"][1]["commands"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "hold_seats")
        .unwrap();
    let codes: Vec<&str> = hold["rejection_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for code in ["flight_not_found", "hold_exists", "sold_out", "overbooked"] {
        assert!(codes.contains(&code), "{code} missing from {codes:?}");
    }

    let (status, body) = post(
        &c,
        &keel.url,
        json!({"commands": [
            {"type": "schedule_flight", "flight": "AF1", "capacity": 3, "departs": "2031-06-01T08:00:00Z"},
            {"type": "seats.hold_seats", "flight": "AF1", "hold": "h1", "seats": 2, "id": "req-1"},
            {"type": "hold_seats", "flight": "AF1", "hold": "h2", "seats": 2},
            {"type": "hold_seats", "flight": "AF1", "hold": "h1", "seats": 1},
            {"type": "hold_seats", "flight": "ZZ9", "hold": "h9", "seats": 1},
            {"type": "cel_ledger.open_account", "account": "alice"},
            {"type": "cel_ledger.deposit", "account": "alice", "amount": "25"},
            {"type": "open_account", "account": "alice"},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        outcomes(&body),
        [
            "committed",
            "committed",
            "sold_out",
            "hold_exists",
            "flight_not_found",
            "committed",
            "committed",
            "committed"
        ]
    );
    let sold_out = &body["results"][2]["message"];
    assert!(
        sold_out.as_str().unwrap().contains("1 seats left"),
        "{sold_out}"
    );

    // A retry of a command id replays its answer.
    let (_, again) = post(
        &c,
        &keel.url,
        json!({"commands": [{"type": "hold_seats", "flight": "AF1", "hold": "h1", "seats": 2, "id": "req-1"}]}),
    )
    .await;
    assert_eq!(again["results"][0]["replayed"], json!(true), "{again}");

    // Confirm: two aggregates in one command, one of them created.
    let (_, body) = post(
        &c,
        &keel.url,
        json!({"commands": [
            {"type": "confirm_hold", "flight": "AF1", "hold": "h1", "booking": "B-1", "passenger": "Ada"},
        ]}),
    )
    .await;
    assert_eq!(outcomes(&body), ["committed"], "{body}");
    let (status, flight) = get(&c, &keel.url, "/v1/aggregates/flight:AF1").await;
    assert_eq!(status, 200);
    assert_eq!(flight["kind"], "flight");
    assert_eq!(flight["state"]["sold"], 2);
    assert_eq!(flight["state"]["held"], 0);
    assert_eq!(flight["state"]["departs"], "2031-06-01T08:00:00Z");
    let (_, booking) = get(&c, &keel.url, "/v1/aggregates/booking:B-1").await;
    assert_eq!(booking["state"]["passenger"], "Ada");
    assert_eq!(booking["state"]["seats"], 2);
    let (_, account) = get(&c, &keel.url, "/v1/aggregates/cel_account:alice").await;
    assert_eq!(account["state"]["balance"], 25);

    // Events carry the domain, command, parameters by name and effects.
    let (_, events) = get(&c, &keel.url, "/v1/events?after=0&limit=100").await;
    let confirmed = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "hold_confirmed")
        .unwrap_or_else(|| panic!("{events}"));
    assert_eq!(confirmed["data"]["domain"], "seats");
    assert_eq!(confirmed["data"]["params"]["passenger"], "Ada");
    assert_eq!(
        confirmed["aggregates"],
        json!(["flight:AF1", "booking:B-1"])
    );

    // Cancel: the booking is deleted, its seats free.
    let (_, body) = post(
        &c,
        &keel.url,
        json!({"commands": [{"type": "cancel_booking", "booking": "B-1", "flight": "AF1"}]}),
    )
    .await;
    assert_eq!(outcomes(&body), ["committed"], "{body}");
    let (_, booking) = get(&c, &keel.url, "/v1/aggregates/booking:B-1").await;
    assert_eq!(booking["state"]["deleted"], json!(true), "{booking}");

    // Bad input: 400 naming the item and the field; nothing committed.
    let before = get(&c, &keel.url, "/v1/aggregates/flight:AF1").await.1;
    for (command, code, names) in [
        (
            json!({"type": "hold_seats", "flight": "AF1", "hold": "h5", "seats": 12}),
            "invalid_field",
            "`seats`",
        ),
        (
            json!({"type": "hold_seats", "flight": "AF1", "hold": "h5"}),
            "missing_field",
            "`seats`",
        ),
        (
            json!({"type": "hold_seats", "flight": "AF1", "hold": "h5", "seats": 1, "color": "red"}),
            "unexpected_field",
            "`color`",
        ),
        (
            json!({"type": "hold_seats", "flight": "AF1", "hold": "h5", "seats": "two"}),
            "invalid_field",
            "`seats`",
        ),
        (
            json!({"type": "hold_seats", "flight": "A F1", "hold": "h5", "seats": 1}),
            "invalid_name",
            "`flight`",
        ),
        (
            json!({"type": "schedule_flight", "flight": "AF2", "capacity": 3, "departs": "tomorrow"}),
            "invalid_field",
            "`departs`",
        ),
        (
            json!({"type": "nope.hold_seats", "flight": "AF1"}),
            "unknown_command_type",
            "nope",
        ),
    ] {
        let (status, body) = post(
            &c,
            &keel.url,
            json!({"commands": [{"type": "hold_seats", "flight": "AF1", "hold": "ok", "seats": 1}, command]}),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("commands[1]"), "{message}");
        assert!(message.contains(names), "{message}");
    }
    assert_eq!(
        get(&c, &keel.url, "/v1/aggregates/flight:AF1").await.1,
        before
    );

    let status = keel.terminate();
    assert!(status.success());

    // The audit decides every declared event again under the recorded rules: a clean store.
    let json_path = dir.path().join("audit.json");
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["audit", "--data"])
        .arg(dir.path())
        .arg("--json")
        .arg(&json_path)
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(report["verdict"], "INTEGRITY_OK", "{report}");
    assert_eq!(report["divergences"], json!([]), "{report}");
}

#[test]
fn a_definition_that_does_not_load_stops_the_server_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"bad\"\n\n[kinds.thing]\nfields.n = { type = \"int\" }\n\n[commands.touch]\nparams.thing = { type = \"id\", kind = \"thing\" }\ntargets = [{ param = \"thing\", must = \"exist\" }]\neffects.thing = { n = \"thing.n + 1u\" }\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .arg("--domain")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.toml:9:"), "{stderr}");
    assert!(stderr.contains("int and uint"), "{stderr}");
    assert!(!dir.path().join("data").exists(), "nothing was created");
}
