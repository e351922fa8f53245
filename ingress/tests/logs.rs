//! Logs an operator can read (issue 13): the chain tip in hex (its `Debug` printed the hash as
//! a byte array), no ANSI colour codes when stderr is not a terminal (a file, journald, docker
//! logs), and `--log-format json` / `KEEL_LOG_FORMAT=json` with one JSON object per line.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `keel serve` on an empty store until it listens, stops it with SIGTERM and returns
/// everything it wrote on stderr (a file: not a terminal).
fn serve_logs(args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let stderr_path = dir.path().join("stderr.log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
    command
        .args(args)
        .arg("serve")
        .arg("--data")
        .arg(dir.path().join("store"))
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .env_remove("KEEL_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let url = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("keel: listening on http://")
                .map(str::to_owned)
        })
        .expect("keel serve did not listen");
    // One answered request: the serve loop, and with it the SIGTERM handler, is running (a
    // SIGTERM right after the "listening" line can beat the handler's installation).
    let mut stream = std::net::TcpStream::connect(&url).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: keel\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "keel serve did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::read_to_string(stderr_path).unwrap()
}

const EMPTY_TIP: &str =
    "batch 0 event 0 hash 0000000000000000000000000000000000000000000000000000000000000000";

#[test]
fn text_logs_have_no_colour_codes_off_a_terminal_and_show_the_tip_in_hex() {
    let logs = serve_logs(&[], &[]);
    assert!(!logs.contains('\u{1b}'), "ANSI escape codes in:\n{logs}");
    let opened = logs
        .lines()
        .find(|l| l.contains("store opened"))
        .unwrap_or_else(|| panic!("no 'store opened' line in:\n{logs}"));
    assert!(opened.contains(EMPTY_TIP), "{opened}");
    assert!(
        !opened.contains("[0, 0"),
        "the hash as a byte array: {opened}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("engine closed") && l.contains(EMPTY_TIP)),
        "{logs}"
    );
}

#[test]
fn json_logs_are_one_object_per_line_by_flag_or_environment() {
    for (args, env) in [
        (&["--log-format", "json"][..], &[][..]),
        (&[][..], &[("KEEL_LOG_FORMAT", "json")][..]),
    ] {
        let logs = serve_logs(args, env);
        let lines: Vec<serde_json::Value> = logs
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        assert!(lines.len() >= 3, "{logs}");
        for line in &lines {
            assert!(
                line["level"].is_string() && line["timestamp"].is_string(),
                "{line}"
            );
        }
        let opened = lines
            .iter()
            .find(|l| l["fields"]["message"] == "store opened")
            .unwrap_or_else(|| panic!("{logs}"));
        let tip = opened["fields"]["tip"].as_str().unwrap();
        assert!(tip.starts_with(EMPTY_TIP), "{opened}");
    }
    // A format that does not exist is refused by name.
    let output = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["--log-format", "xml", "serve"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("xml"));
}
