//! Test harness: a real `keel serve` process on a free loopback port.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct KeelProcess {
    pub child: Child,
    pub url: String,
    pub data: PathBuf,
}

impl KeelProcess {
    /// Starts `keel serve` on `data` with `extra` flags, and waits until it listens.
    pub fn start(data: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn keel serve");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("keel: listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("keel serve did not start listening in 60 s");
        Self {
            child,
            url,
            data: data.to_path_buf(),
        }
    }

    /// SIGKILL: no chance to flush or drain anything.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "keel serve did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for KeelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::Client {
    keel_projection::http_client::builder(&Default::default())
        .expect("client settings")
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// The body of `GET url` as text (a test's failure when the request fails).
pub async fn get_text(c: &reqwest::Client, url: &str) -> String {
    let response = c.get(url).send().await.expect("the GET is answered");
    response.text().await.expect("a text body")
}

/// `host:port` of a `http://host:port` URL.
pub fn address(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// An HTTP answer read off a raw socket.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "answer {} is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Sends `request` as raw bytes on a new connection (then half-closes it when `close_write`),
/// and reads one answer: what reqwest cannot send (broken framing, codings, bad paths).
pub fn raw_exchange(url: &str, request: &[u8], close_write: bool) -> RawAnswer {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address(url)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    stream.write_all(request).expect("send");
    if close_write {
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
    }
    let mut received = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(answer) = parse_answer(&received) {
            return answer;
        }
        match stream.read(&mut chunk) {
            Ok(0) => panic!(
                "connection closed before a whole answer: {:?}",
                String::from_utf8_lossy(&received)
            ),
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) => panic!(
                "no whole answer ({e}); got {:?}",
                String::from_utf8_lossy(&received)
            ),
        }
    }
}

/// A whole answer with a `Content-Length` body, once `bytes` hold it.
fn parse_answer(bytes: &[u8]) -> Option<RawAnswer> {
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..head_end]).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().expect("content-length"));
    let body = bytes.get(head_end + 4..head_end + 4 + length)?.to_vec();
    Some(RawAnswer {
        status,
        headers,
        body,
    })
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}
