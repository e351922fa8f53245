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
    // The built-in domains are listed from the same registry, each with its own codes.
    let builtin = domains["builtin_domains"].as_array().unwrap();
    assert_eq!(builtin.len(), 2, "{builtin:?}");
    assert_eq!(builtin[0]["name"], "ledger");
    assert_eq!(builtin[0]["kinds"], json!(["account"]));
    assert_eq!(builtin[1]["name"], "inventory");
    assert_eq!(builtin[1]["laws"].as_array().unwrap().len(), 2);
    let ledger_codes = builtin[0]["rejection_codes"].as_array().unwrap();
    assert!(ledger_codes.contains(&json!("insufficient_funds")));
    assert!(!ledger_codes.contains(&json!("sku_not_found")));
    assert!(
        builtin[0]["commands"]
            .as_array()
            .unwrap()
            .contains(&json!("transfer"))
    );

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

    // A dry run answers as the commit would and writes nothing; a misspelt query commits
    // nothing either.
    let (_, events_before) = get(&c, &keel.url, "/v1/events?after=0&limit=1").await;
    let request = json!({"commands": [
        {"type": "hold_seats", "flight": "AF1", "hold": "d1", "seats": 1, "id": "dry-1"},
        {"type": "hold_seats", "flight": "AF1", "hold": "d2", "seats": 1},
        {"type": "hold_seats", "flight": "AF1", "hold": "d3", "seats": 2},
    ]});
    for query in ["?dry_run=true", "?dry_run=true&dry_run=true"] {
        let r = c
            .post(format!("{}/v1/batches{query}", keel.url))
            .json(&request)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        if query.ends_with("&dry_run=true") {
            assert_eq!(status, 400, "{body}");
            assert_eq!(body["error"]["code"], "invalid_query", "{body}");
            continue;
        }
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["dry_run"], json!(true), "{body}");
        assert_eq!(body["batch"], Value::Null, "{body}");
        assert_eq!(
            outcomes(&body),
            ["committed", "committed", "sold_out"],
            "{body}"
        );
    }
    for query in ["?dryrun=true", "?dry_run=yes"] {
        let r = c
            .post(format!("{}/v1/batches{query}", keel.url))
            .json(&request)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{query}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_query", "{body}");
    }
    assert_eq!(
        get(&c, &keel.url, "/v1/aggregates/flight:AF1").await.1,
        before
    );
    let (_, events_after) = get(&c, &keel.url, "/v1/events?after=0&limit=1").await;
    assert_eq!(events_after["last_seq"], events_before["last_seq"]);
    // The same request committed for real answers the same, and its id is new.
    let (_, real) = post(&c, &keel.url, request).await;
    assert_eq!(outcomes(&real), ["committed", "committed", "sold_out"]);
    assert_eq!(real["results"][0].get("replayed"), None, "{real}");
    assert_eq!(real.get("dry_run"), None, "{real}");

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

/// A points domain: `earn` and `spend` move a wallet's points and say so in the laws' flows.
/// `extra` is appended (commands of a later version of the file).
fn points_domain(extra: &str) -> String {
    format!(
        r#"name = "points"

[kinds.wallet]
fields.points = {{ type = "int" }}

[commands.open_wallet]
params.wallet = {{ type = "id", kind = "wallet" }}
targets = [{{ param = "wallet", must = "not_exist" }}]
effects.wallet = {{ points = "0" }}

[commands.earn]
params.wallet = {{ type = "id", kind = "wallet" }}
params.amount = {{ type = "uint", min = 1, max = 1000000 }}
targets = [{{ param = "wallet", must = "exist" }}]
effects.wallet = {{ points = "wallet.points + int(params.amount)" }}

[commands.spend]
params.wallet = {{ type = "id", kind = "wallet" }}
params.amount = {{ type = "uint", min = 1, max = 1000000 }}
targets = [{{ param = "wallet", must = "exist" }}]
preconditions = [{{ check = "wallet.points >= int(params.amount)", code = "not_enough_points" }}]
effects.wallet = {{ points = "wallet.points - int(params.amount)" }}
{extra}
[[laws]]
name = "issued"
statement = "all points equal points earned minus points spent"
kind = "wallet"
scope = "total"
quantity = "wallet.points"
flows.earn = {{ wallet = "int(params.amount)" }}
flows.spend = {{ wallet = "-int(params.amount)" }}
"#
    )
}

fn audit_json(dir: &std::path::Path) -> (bool, Value, String) {
    let json_path = dir.join("audit.json");
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["audit", "--data"])
        .arg(dir.join("data"))
        .arg("--json")
        .arg(&json_path)
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success(), report, text)
}

/// Runs `keel serve --domain file` over `dir/data` and posts each body in turn.
async fn serve_and_post(dir: &std::path::Path, file: &std::path::Path, bodies: &[Value]) {
    let keel = KeelProcess::start(&dir.join("data"), &["--domain", file.to_str().unwrap()]);
    let c = client();
    for body in bodies {
        let (status, answer) = post(&c, &keel.url, body.clone()).await;
        assert_eq!(status, 200, "{answer}");
        assert!(
            outcomes(&answer).iter().all(|o| o == "committed"),
            "{answer}"
        );
    }
    assert!(keel.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_laws_are_proven_per_definition_version() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("points.toml");

    // Version 1.
    std::fs::write(&file, points_domain("")).unwrap();
    serve_and_post(
        dir.path(),
        &file,
        &[
            json!({"commands": [
                {"type": "open_wallet", "wallet": "w1"},
                {"type": "open_wallet", "wallet": "w2"},
                {"type": "earn", "wallet": "w1", "amount": 50},
            ]}),
            json!({"commands": [{"type": "spend", "wallet": "w1", "amount": 20}]}),
        ],
    )
    .await;
    let (ok, report, text) = audit_json(dir.path());
    assert!(ok, "{report}");
    let runs = report["rule_sets"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{report}");
    assert_eq!(runs[0]["first_batch"], 1);
    assert_eq!(runs[0]["domains"][0]["name"], "points");
    let v1 = runs[0]["domains"][0]["version"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(text.contains(&format!("points@{v1}")), "{text}");
    let law = |report: &Value, i: usize| {
        report["conservation_laws"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["name"] == "points.issued")
            .nth(i)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(law(&report, 0)["from_batch"], 1, "{report}");
    assert_eq!(law(&report, 0)["to_batch"], Value::Null, "{report}");

    // Version 2 adds a command that moves points and declares its flow: the law's new version
    // opens with the points already there, and the audit proves both versions.
    let bonus = r#"
[commands.bonus]
params.wallet = { type = "id", kind = "wallet" }
params.amount = { type = "uint", min = 1, max = 1000 }
targets = [{ param = "wallet", must = "exist" }]
effects.wallet = { points = "wallet.points + int(params.amount)" }
"#;
    let v2_text = points_domain(bonus).replace(
        "flows.spend = {",
        "flows.bonus = { wallet = \"int(params.amount)\" }\nflows.spend = {",
    );
    std::fs::write(&file, &v2_text).unwrap();
    serve_and_post(
        dir.path(),
        &file,
        &[json!({"commands": [
            {"type": "bonus", "wallet": "w2", "amount": 7},
            {"type": "earn", "wallet": "w2", "amount": 1},
        ]})],
    )
    .await;
    let (ok, report, _) = audit_json(dir.path());
    assert!(ok, "{report}");
    let runs = report["rule_sets"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{report}");
    assert_eq!(runs[1]["first_batch"], 3, "{report}");
    assert_ne!(runs[1]["domains"][0]["version"], v1.as_str());
    assert_eq!(law(&report, 0)["to_batch"], 3, "{report}");
    assert_eq!(law(&report, 1)["from_batch"], 3, "{report}");

    // Version 3 adds a command that mints points without a flow: the writer accepts it (its
    // effects are what the file says), and the audit proves the law broken.
    std::fs::write(&file, v2_text.replace("[commands.bonus]", "[commands.mint]\n[commands.bonus]").replace(
        "[commands.mint]\n",
        "[commands.mint]\nparams.wallet = { type = \"id\", kind = \"wallet\" }\ntargets = [{ param = \"wallet\", must = \"exist\" }]\neffects.wallet = { points = \"wallet.points + 1000\" }\n\n",
    ))
    .unwrap();
    serve_and_post(
        dir.path(),
        &file,
        &[json!({"commands": [{"type": "mint", "wallet": "w1"}]})],
    )
    .await;
    let (ok, report, text) = audit_json(dir.path());
    assert!(!ok, "{report}");
    assert_eq!(report["verdict"], "INTEGRITY_FAILED");
    let broken: Vec<&Value> = report["divergences"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["check"] == "conservation")
        .collect();
    assert_eq!(broken.len(), 1, "{report}");
    let detail = broken[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("points.issued") && detail.contains("from batch 4"),
        "{detail}"
    );
    assert!(
        broken[0]["expected"].as_str().unwrap().starts_with("38 "),
        "{report}"
    );
    assert!(
        broken[0]["found"].as_str().unwrap().starts_with("1038 "),
        "{report}"
    );
    assert!(text.contains("INTEGRITY_FAILED"), "{text}");

    // A restart without the domain the log was last written under is refused, and changes
    // nothing.
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .env_remove("KEEL_DOMAINS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`points`") && stderr.contains("--domain"),
        "{stderr}"
    );
    let (_, after, _) = audit_json(dir.path());
    assert_eq!(after["tip"], report["tip"], "nothing written");
}
