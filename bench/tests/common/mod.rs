//! Test helpers: a real `keel serve` on a free loopback port and a temporary data directory.

#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The repository root (bench/ is one level down).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The release `keel` binary: `$KEEL_BIN`, else beside this test's own deps directory
/// (`<target>/release/deps/<test>` -> `<target>/release/keel`).
pub fn keel_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("KEEL_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    let release = exe.parent().and_then(Path::parent).unwrap();
    let keel = release.join("keel");
    assert!(
        keel.is_file(),
        "the keel binary is missing at {}: build it first with `cargo build --release -p keel-ingress` \
         (same CARGO_TARGET_DIR), or set KEEL_BIN",
        keel.display()
    );
    keel
}

pub fn keel_bench_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keel-bench"))
}

pub fn free_port() -> u16 {
    keel_bench::free_port().unwrap()
}

/// A running `keel serve`; stopped with SIGTERM (then SIGKILL) when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub data: tempfile::TempDir,
    pub log: PathBuf,
}

impl Server {
    pub fn start() -> Server {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = data.path().with_extension("log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(keel_bin())
            .args(["serve", "--data"])
            .arg(data.path().join("store"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let server = Server {
            child,
            url,
            data,
            log,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        if let Err(error) = runtime.block_on(keel_bench::wait_ready(
            &server.url,
            Duration::from_secs(30),
            false,
            &keel_projection::http_client::ClientOptions::default(),
        )) {
            panic!(
                "keel serve did not get ready: {error:#}\nlog:\n{}",
                server.log_text()
            );
        }
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn store(&self) -> PathBuf {
        self.data.path().join("store")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits up to `within` for the exit.
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait()
            && self.terminate(Duration::from_secs(10)).is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// True when the PNG signature and a non-empty IHDR are there.
pub fn is_png(bytes: &[u8]) -> bool {
    bytes.len() > 33 && bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR"
}

/// Width and height from the IHDR chunk.
pub fn png_size(bytes: &[u8]) -> (u32, u32) {
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}
