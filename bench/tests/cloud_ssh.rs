//! The cloud scripts (deploy/cloud/) against a real sshd on 127.0.0.1 that the test starts: the
//! "VM" is this machine, reached over ssh on a free port with a key made for the test, so the
//! scripts run exactly as they would against a cloud VM (push, prepare, run, interrupt, fetch).
//! The sshd sets CARGO=true and KEEL_BIN/KEEL_BENCH_BIN for its sessions (sshd_config SetEnv):
//! the remote `make bench-build` builds nothing and the scenarios use this build's binaries.
//! Issue 13: faults 1 (the disk measured), 2 (ssh port and options), 4 (an interrupted run),
//! 5 (the verdict of the run just made), 6 (a host without cloud-init) and 7 (small ones).

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use common::{free_port, keel_bench_bin, keel_bin, repo_root};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// An sshd on 127.0.0.1 for the current user, and the client side's key and known_hosts.
struct Sshd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Sshd {
    fn start() -> Sshd {
        let sshd = Path::new("/usr/sbin/sshd");
        assert!(
            sshd.is_file(),
            "this test needs sshd: apt-get install openssh-server (`make deps-test` does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).display().to_string();
        for key in ["host_key", "client_key"] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f", &path(key)])
                .status()
                .unwrap();
            assert!(status.success());
        }
        std::fs::copy(path("client_key.pub"), path("authorized_keys")).unwrap();
        // sshd refuses to start without its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = free_port();
        let config = format!(
            "ListenAddress 127.0.0.1:{port}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nLogLevel ERROR\n\
             SetEnv CARGO=true KEEL_BIN={} KEEL_BENCH_BIN={}\n",
            path("host_key"),
            path("authorized_keys"),
            path("sshd.pid"),
            keel_bin().display(),
            keel_bench_bin().display(),
        );
        std::fs::write(path("sshd_config"), config).unwrap();
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f", &path("sshd_config")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        Sshd { child, port, dir }
    }

    /// The "VM"'s checkout directory and data root (both under the test's directory).
    fn vm_dir(&self) -> PathBuf {
        self.dir.path().join("vm/keel")
    }

    fn data_root(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A cloud script with the environment an SRE would set for this "VM".
    fn script(&self, script: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut command = Command::new("bash");
        command
            .arg(repo_root().join(script))
            .args(args)
            .env("KEEL_VM_HOST", "127.0.0.1")
            .env("KEEL_VM_USER", whoami())
            .env("KEEL_VM_PORT", self.port.to_string())
            .env("KEEL_VM_KEY", self.dir.path().join("client_key"))
            .env(
                "KEEL_VM_SSH_OPTS",
                format!(
                    "-o UserKnownHostsFile={}",
                    self.dir.path().join("known_hosts").display()
                ),
            )
            .env("KEEL_VM_DIR", self.vm_dir())
            .env("BENCH_DATA_ROOT", self.data_root())
            .env("KEEL_FETCH_DIR", self.local_results())
            .stdin(Stdio::null());
        for name in [
            "BENCH_WORKERS",
            "BENCH_BATCH",
            "BENCH_DURATION",
            "BENCH_RUN_ID",
        ] {
            command.env_remove(name);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        command
    }

    /// Where fetch-results.sh copies this "VM"'s results to (KEEL_FETCH_DIR).
    fn local_results(&self) -> PathBuf {
        self.dir.path().join("local-results")
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn whoami() -> String {
    let output = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

fn text(output: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs a command to its end, bounded.
fn run_bounded(mut command: Command, limit: Duration) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return false;
            }
        }
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        true
    });
    let output = child.wait_with_output().unwrap();
    assert!(
        !watchdog.join().unwrap(),
        "still running after {limit:?}:\n{}",
        text(&output)
    );
    output
}

/// The one result folder of a run (`<RUN_ID>-<scenario>`) under `root`, made after `before`.
fn new_result_folders(root: &Path, before: &[PathBuf]) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    found.retain(|p| p.is_dir() && !before.contains(p));
    found.sort();
    found
}

fn dirs_in(root: &Path) -> Vec<PathBuf> {
    new_result_folders(root, &[])
}

/// The device, file system and mount point findmnt gives for `dir`.
fn findmnt(dir: &Path) -> (String, String, String) {
    let output = Command::new("findmnt")
        .args(["-no", "SOURCE,FSTYPE,TARGET", "--target"])
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    let mut fields = text.split_whitespace().map(str::to_owned);
    (
        fields.next().unwrap(),
        fields.next().unwrap(),
        fields.next().unwrap(),
    )
}

/// True while any process's command line mentions `needle` (the run's result folder).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!("{}: {cmdline}", name.to_string_lossy()));
            }
        }
    }
    found
}

/// Faults 6 and 7: up.sh prepares a host that has no cloud-init at all (this machine), checks
/// the data directory, prints labelled facts and a "Next:" hint with every variable given.
#[test]
fn up_prepares_a_host_without_cloud_init_and_names_what_is_missing() {
    let sshd = Sshd::start();
    let output = run_bounded(
        sshd.script("deploy/cloud/up.sh", &[], &[]),
        Duration::from_secs(120),
    );
    let all = text(&output);
    assert!(output.status.success(), "up.sh failed:\n{all}");
    let (device, fstype, mount) = findmnt(&sshd.data_root());
    for want in [
        "cores: ".to_owned(),
        "kernel: ".to_owned(),
        format!("data disk: {device} ({fstype}, mounted at {mount})"),
        format!("KEEL_VM_PORT={}", sshd.port),
        "KEEL_VM_KEY=".to_owned(),
        "KEEL_VM_SSH_OPTS=".to_owned(),
        format!("KEEL_VM_USER={}", whoami()),
    ] {
        assert!(all.contains(&want), "{want:?} missing:\n{all}");
    }
    // A data directory that is not there is named, with the command that creates it.
    let missing = sshd.dir.path().join("no-such-disk");
    let output = run_bounded(
        sshd.script(
            "deploy/cloud/up.sh",
            &[],
            &[("BENCH_DATA_ROOT", missing.to_str().unwrap())],
        ),
        Duration::from_secs(120),
    );
    let all = text(&output);
    assert_eq!(output.status.code(), Some(1), "{all}");
    assert!(
        all.contains("does not exist") && all.contains("sudo install -d"),
        "{all}"
    );
}

/// Faults 1, 5 and 7: a run over ssh measures BENCH_DATA_ROOT's disk and names it in the result
/// and the verdict; bench.sh prints this run's verdict with the local path of its copy.
#[test]
fn a_cloud_run_names_its_disk_and_reports_its_own_verdict() {
    let sshd = Sshd::start();
    let before = dirs_in(&sshd.local_results());
    let output = run_bounded(
        sshd.script(
            "deploy/cloud/bench.sh",
            &["bench"],
            &[
                ("BENCH_DURATION", "2s"),
                ("BENCH_WORKERS", "2"),
                ("BENCH_BATCH", "100"),
                ("BENCH_ACCOUNTS", "100"),
                ("BENCH_PREFLIGHT", "0"),
                ("BENCH_SAMPLE_INTERVAL", "500ms"),
            ],
        ),
        Duration::from_secs(180),
    );
    let all = text(&output);
    assert!(output.status.success(), "bench.sh failed:\n{all}");
    let fetched = new_result_folders(&sshd.local_results(), &before);
    assert_eq!(
        fetched.len(),
        1,
        "one new result folder: {fetched:?}\n{all}"
    );
    let folder = &fetched[0];
    let verdict = std::fs::read_to_string(folder.join("VERDICT")).unwrap();
    let (device, fstype, mount) = findmnt(&sshd.data_root());
    let disk = format!("{device} ({fstype}, mounted at {mount})");
    assert!(
        verdict.starts_with("PASSED: bench (INTEGRITY_OK) on ") && verdict.contains(&disk),
        "{verdict}"
    );
    // Fault 7: the verdict names no path of the VM's checkout; the report names the local copy.
    assert!(
        !verdict.contains(sshd.vm_dir().to_str().unwrap()),
        "{verdict}"
    );
    assert!(
        all.contains(&format!("(local copy: {})", folder.display())),
        "{all}"
    );
    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("result.json")).unwrap()).unwrap();
    let data_disk = &result["machine"]["data_disk"];
    assert_eq!(data_disk["device"], device.as_str(), "{data_disk}");
    assert_eq!(data_disk["fstype"], fstype.as_str());
    assert_eq!(data_disk["mount"], mount.as_str());
    let summary = std::fs::read_to_string(folder.join("summary.txt")).unwrap();
    assert!(summary.contains(&disk), "{summary}");
    let env = std::fs::read_to_string(folder.join("scenario.env")).unwrap();
    assert!(
        env.contains(&format!("BENCH_DATA_ROOT={}\n", sshd.data_root().display())),
        "{env}"
    );
}

/// Fault 4: Ctrl-C on the SRE's side stops the run on the "VM" (its server and load are gone
/// within seconds, not after BENCH_DURATION) and the run is marked INTERRUPTED, locally too.
#[test]
fn ctrl_c_stops_the_remote_run_and_marks_it_interrupted() {
    let sshd = Sshd::start();
    let remote_results = sshd.vm_dir().join("bench/results");
    let before_local = dirs_in(&sshd.local_results());
    let mut command = sshd.script(
        "deploy/cloud/bench.sh",
        &["bench-broker"],
        &[
            ("BENCH_DURATION", "5m"),
            ("BENCH_BATCH", "100"),
            ("BENCH_ACCOUNTS", "100"),
            ("BENCH_PREFLIGHT", "0"),
        ],
    );
    // Its own process group, like a shell job: Ctrl-C is SIGINT to the whole group.
    command.process_group(0);
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pgid = child.id();
    // Wait until the load runs on the "VM" (its progress log has lines).
    let deadline = Instant::now() + Duration::from_secs(120);
    let folder = loop {
        let running = dirs_in(&remote_results)
            .into_iter()
            .find(|d| d.to_string_lossy().ends_with("-broker"))
            .filter(|d| {
                std::fs::read_to_string(d.join("progress.log")).is_ok_and(|t| t.lines().count() > 1)
            });
        if let Some(folder) = running {
            break folder;
        }
        assert!(Instant::now() < deadline, "the remote run did not start");
        std::thread::sleep(Duration::from_millis(200));
    };
    let server_pid = std::fs::read_to_string(folder.join("server.pid")).unwrap();
    let interrupted_at = Instant::now();
    let status = Command::new("kill")
        .args(["-INT", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    assert!(status.success());
    let output = run_to_end(child, Duration::from_secs(90));
    let all = text(&output);
    assert_eq!(output.status.code(), Some(130), "{all}");
    assert!(
        interrupted_at.elapsed() < Duration::from_secs(90),
        "the remote run was not stopped"
    );
    // Nothing of the run is left on the "VM": no server, no load, no pid file.
    assert!(
        !Path::new(&format!("/proc/{}", server_pid.trim())).exists(),
        "keel serve {server_pid} still runs"
    );
    let leftovers = processes_mentioning(folder.to_str().unwrap());
    assert!(leftovers.is_empty(), "still running: {leftovers:?}");
    let pid_files: Vec<_> = std::fs::read_dir(&remote_results)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pid"))
        .collect();
    assert!(pid_files.is_empty(), "{pid_files:?}");
    // The verdict says INTERRUPTED, on the VM, in the local copy and in what bench.sh printed.
    let remote_verdict = std::fs::read_to_string(folder.join("VERDICT")).unwrap();
    assert!(
        remote_verdict.starts_with("INTERRUPTED: broker"),
        "{remote_verdict}"
    );
    assert!(
        !folder.join("audit.txt").exists(),
        "an interrupted run is never audited"
    );
    let fetched = new_result_folders(&sshd.local_results(), &before_local);
    assert_eq!(fetched.len(), 1, "{fetched:?}");
    let local_verdict = std::fs::read_to_string(fetched[0].join("VERDICT")).unwrap();
    assert_eq!(local_verdict, remote_verdict);
    assert!(all.contains("INTERRUPTED: broker"), "{all}");
    assert!(all.contains("bench: bench-broker INTERRUPTED"), "{all}");
}

fn run_to_end(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    });
    let output = child.wait_with_output().unwrap();
    watchdog.join().unwrap();
    output
}

/// Fault 5: fetch-results.sh flags a result folder without a VERDICT instead of skipping it,
/// and reports only the run asked for.
#[test]
fn fetch_flags_folders_without_a_verdict_and_reports_only_the_run_asked_for() {
    let sshd = Sshd::start();
    let results = sshd.vm_dir().join("bench/results");
    for (folder, verdict) in [
        (
            "20990101T000000Z-1-broker",
            Some("PASSED: broker (INTEGRITY_OK) on x"),
        ),
        ("20990101T000001Z-2-broker", None),
    ] {
        let dir = results.join(folder);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("scenario.env"), "scenario=broker\n").unwrap();
        if let Some(verdict) = verdict {
            std::fs::write(dir.join("VERDICT"), format!("{verdict}\n")).unwrap();
        }
    }
    let fetch = |args: &[&str]| {
        run_bounded(
            sshd.script("deploy/cloud/fetch-results.sh", args, &[]),
            Duration::from_secs(60),
        )
    };
    let only_passed = fetch(&["20990101T000000Z-1"]);
    let all = text(&only_passed);
    assert!(only_passed.status.success(), "{all}");
    assert!(
        all.contains("PASSED: broker") && !all.contains("NO VERDICT"),
        "{all}"
    );
    let unfinished = fetch(&["20990101T000001Z-2"]);
    let all = text(&unfinished);
    assert_eq!(unfinished.status.code(), Some(1), "{all}");
    assert!(
        all.contains("NO VERDICT")
            && all.contains("20990101T000001Z-2-broker")
            && !all.contains("PASSED"),
        "{all}"
    );
    let everything = fetch(&[]);
    let all = text(&everything);
    assert_eq!(everything.status.code(), Some(1), "{all}");
    assert!(
        all.contains("PASSED: broker") && all.contains("NO VERDICT"),
        "{all}"
    );
    let none = fetch(&["20990101T000002Z-3"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(text(&none).contains("left no result folder"));
}
