//! Every shell script of the bench and deploy passes `bash -n` and shellcheck; the make
//! targets pass the right knobs; the cloud scripts refuse to run without an explicit VM.
//! Nothing here contacts any address: the cloud scripts stop before ssh.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use common::repo_root;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The scripts this crate owns, by directory. A script added or removed changes this list.
const SCRIPTS: &[&str] = &[
    "bench/ensure-fio.sh",
    "bench/run-ceiling.sh",
    "bench/run-recovery.sh",
    "bench/run-scenario.sh",
    "bench/run-subscribe.sh",
    "deploy/cloud/bench.sh",
    "deploy/cloud/common.sh",
    "deploy/cloud/fetch-results.sh",
    "deploy/cloud/up.sh",
    "deploy/cloud/vm-bench.sh",
    "deploy/cloud/vm-prepare.sh",
];

fn shell_scripts_in(dir: &str) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(repo_root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .map(|p| format!("{dir}/{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    found.sort();
    found
}

#[test]
fn the_script_list_is_complete() {
    let mut found = shell_scripts_in("bench");
    found.extend(shell_scripts_in("deploy/cloud"));
    assert_eq!(
        found, SCRIPTS,
        "update SCRIPTS (and these checks) when scripts change"
    );
}

fn shellcheck(paths: &[PathBuf]) {
    let output = Command::new("shellcheck")
        .arg("-x")
        .args(paths)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| {
            panic!("shellcheck is required for this test (apt-get install shellcheck): {e}")
        });
    assert!(
        output.status.success(),
        "shellcheck:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn scripts_parse_and_pass_shellcheck() {
    let paths: Vec<PathBuf> = SCRIPTS.iter().map(|s| repo_root().join(s)).collect();
    for path in &paths {
        let status = Command::new("bash").arg("-n").arg(path).status().unwrap();
        assert!(status.success(), "bash -n {}", path.display());
        let text = std::fs::read_to_string(path).unwrap();
        assert!(
            text.starts_with("#!/usr/bin/env bash\n"),
            "{} needs a bash shebang",
            path.display()
        );
        assert!(
            text.contains("set -euo pipefail") || path.ends_with("common.sh"),
            "{}",
            path.display()
        );
    }
    shellcheck(&paths);
}

#[test]
fn the_cloud_init_disk_script_passes_shellcheck() {
    let yaml: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/cloud/cloud-init.yaml")).unwrap(),
    )
    .unwrap();
    let script = yaml["write_files"][0]["content"].as_str().unwrap();
    assert!(script.contains("noatime"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel-mount-data-disk.sh");
    std::fs::write(&path, script).unwrap();
    assert!(
        Command::new("bash")
            .arg("-n")
            .arg(&path)
            .status()
            .unwrap()
            .success()
    );
    shellcheck(&[path]);
}

fn run_clean(script: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new("bash");
    command
        .arg(repo_root().join(script))
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", "/nonexistent");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

#[test]
fn cloud_scripts_need_an_explicit_vm_and_never_guess_one() {
    for script in ["deploy/cloud/up.sh", "deploy/cloud/fetch-results.sh"] {
        let output = run_clean(script, &[], &[]);
        assert_eq!(output.status.code(), Some(2), "{script}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("KEEL_VM_HOST is not set"),
            "{script}"
        );
    }
    let output = run_clean("deploy/cloud/bench.sh", &["bench-broker"], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("KEEL_VM_HOST is not set"));
    let output = run_clean(
        "deploy/cloud/bench.sh",
        &["rm-rf"],
        &[("KEEL_VM_HOST", "vm.invalid")],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("usage"));
    // A key that is not there is refused before ssh is tried.
    let output = run_clean(
        "deploy/cloud/fetch-results.sh",
        &[],
        &[
            ("KEEL_VM_HOST", "vm.invalid"),
            ("KEEL_VM_KEY", "/nonexistent/key"),
        ],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("KEEL_VM_KEY"));
}

/// `make -n` prints what a target would run, without running it.
fn make_dry(target: &str, vars: &[&str]) -> String {
    let output = Command::new("make")
        .args(["-n", "-f", "bench/bench.mk", target, "CARGO=cargo"])
        .args(vars)
        .current_dir(repo_root())
        .env_remove("BENCH_WORKERS")
        .env_remove("BENCH_BATCH")
        .env_remove("BENCH_DURATION")
        .env_remove("BENCH_DOMAIN")
        .env_remove("BENCH_DOMAIN_MIN_RATIO")
        .env_remove("RESULTS_DIR")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "make -n {target}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn make_targets_pass_scenario_defaults_and_overrides() {
    let build = "cargo build --release -p keel-ingress -p keel-bench";
    let bench = make_dry("bench", &[]);
    assert!(bench.contains(build), "{bench}");
    assert!(
        bench.contains("BENCH_WORKERS=1 BENCH_BATCH=1000") && bench.contains("BENCH_DURATION=15s"),
        "{bench}"
    );
    assert!(bench.contains("run-scenario.sh bench"), "{bench}");
    let broker = make_dry("bench-broker", &[]);
    assert!(
        broker.contains("BENCH_DURATION=10m") && broker.contains("run-scenario.sh broker"),
        "{broker}"
    );
    let dense = make_dry("bench-dense", &["BENCH_DURATION=5s"]);
    assert!(
        dense.contains("BENCH_WORKERS=64 BENCH_BATCH=100") && dense.contains("BENCH_DURATION=5s"),
        "{dense}"
    );
    let ceiling = make_dry("bench-ceiling", &[]);
    assert!(
        ceiling.contains("BENCH_DURATION=1m") && ceiling.contains("run-ceiling.sh"),
        "{ceiling}"
    );
    let engine = make_dry("bench-engine", &["BENCH_BATCH=2000"]);
    assert!(
        engine.contains("BENCH_KIND=engine BENCH_BATCH=2000"),
        "{engine}"
    );
    let preflight = make_dry("preflight", &["FSYNC_MAX_LAT_US=800"]);
    assert!(
        preflight.contains("ensure-fio.sh") && preflight.contains("--fsync-max-lat-us 800"),
        "{preflight}"
    );
    let cloud = make_dry("cloud-bench-dense", &[]);
    assert!(
        cloud.contains("deploy/cloud/bench.sh bench-dense"),
        "{cloud}"
    );
    // bench-domain: the built-in side without a domain, then the example ledger file, 1 x 1000
    // for 15 s each, then the ratio from the two result.json files.
    let domain = make_dry("bench-domain", &[]);
    assert!(domain.contains(build), "{domain}");
    assert!(
        domain.contains("BENCH_WORKERS=1")
            && domain.contains("BENCH_BATCH=1000")
            && domain.contains("BENCH_DURATION=15s"),
        "{domain}"
    );
    assert!(
        domain.contains("run-scenario.sh \"domain-$side\"")
            && domain.contains("domain=\"examples/domains/ledger.toml\"")
            && domain.contains("compare --min-ratio \"0.5\"")
            && domain.contains("built-in=$base/builtin/result.json")
            && domain.contains("file=$base/file/result.json"),
        "{domain}"
    );
    let domain = make_dry(
        "bench-domain",
        &[
            "BENCH_DOMAIN=examples/domains/inventory.toml",
            "BENCH_DOMAIN_MIN_RATIO=0.8",
            "BENCH_DURATION=3s",
        ],
    );
    assert!(
        domain.contains("domain=\"examples/domains/inventory.toml\"")
            && domain.contains("--min-ratio \"0.8\"")
            && domain.contains("BENCH_DURATION=3s"),
        "{domain}"
    );
    let workers = make_dry("bench", &["BENCH_WORKERS=3"]);
    assert!(workers.contains("BENCH_WORKERS=3 "), "{workers}");
    // The release profile only, in the shared target directory.
    assert!(!bench.contains("--profile") && !bench.contains("target/debug"));
}

/// A directory of stand-ins for ssh and rsync that log their arguments (one per line, then
/// `---`) and succeed, so a cloud script runs to its end without any network.
fn stub_ssh_and_rsync(dir: &Path) -> PathBuf {
    let log = dir.join("calls.log");
    for tool in ["ssh", "rsync"] {
        let path = dir.join(tool);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\n{{ echo {tool}; printf '%s\\n' \"$@\"; echo ---; }} >>{}\nexit 0\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    log
}

/// Issue 13, faults 1, 2 and 7: `make cloud-bench-broker` ran the VM's scenario on the TMPDIR
/// of the SRE's machine (bench.mk exported it), knew no ssh port or options, and forwarded
/// every empty knob. Now: the VM's data disk, -p and the extra options on ssh and rsync, and
/// only the knobs that have a value.
#[test]
fn the_make_path_runs_on_the_vm_data_disk_with_ssh_port_and_options() {
    let dir = tempfile::tempdir().unwrap();
    let log = stub_ssh_and_rsync(dir.path());
    let key = dir.path().join("key");
    std::fs::write(&key, "not a real key").unwrap();
    let run = |vars: &[&str]| {
        let _ = std::fs::remove_file(&log);
        let output = Command::new("make")
            .args(["-s", "-f", "bench/bench.mk", "cloud-bench-broker"])
            .args(vars)
            .current_dir(repo_root())
            .env_clear()
            .env("PATH", format!("{}:/usr/bin:/bin", dir.path().display()))
            .env("HOME", dir.path())
            .env("TMPDIR", "/tmp/sre-laptop-tmp")
            .env("KEEL_VM_HOST", "vm.invalid")
            .env("KEEL_VM_PORT", "2222")
            .env("KEEL_VM_KEY", &key)
            .env("KEEL_VM_SSH_OPTS", "-o ProxyJump=bastion.invalid")
            .env("KEEL_FETCH_DIR", dir.path().join("results"))
            .output()
            .unwrap();
        (output, std::fs::read_to_string(&log).unwrap_or_default())
    };
    let (output, calls) = run(&["BENCH_DURATION=2m"]);
    // The stub VM produced no result folder: the run is not reported as a success.
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("left no result folder"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let run_call = calls
        .split("---\n")
        .find(|c| c.starts_with("ssh\n") && c.contains("vm-bench.sh "))
        .unwrap_or_else(|| panic!("no remote run in:\n{calls}"));
    let args: Vec<&str> = run_call.lines().collect();
    assert!(args.windows(2).any(|w| w == ["-p", "2222"]), "{run_call}");
    assert!(
        args.windows(2)
            .any(|w| w == ["-o", "ProxyJump=bastion.invalid"]),
        "{run_call}"
    );
    let remote = args.last().unwrap();
    assert!(
        remote.contains("BENCH_DATA_ROOT=/var/lib/keel/bench"),
        "{remote}"
    );
    assert!(!remote.contains("sre-laptop-tmp"), "{remote}");
    assert!(remote.contains("BENCH_DURATION=2m"), "{remote}");
    assert!(
        !remote.contains("BENCH_WORKERS="),
        "empty knob forwarded: {remote}"
    );
    let rsync_call = calls
        .split("---\n")
        .find(|c| c.starts_with("rsync\n") && c.contains("--delete"))
        .unwrap();
    assert!(
        rsync_call.contains("-p 2222") && rsync_call.contains("ProxyJump=bastion.invalid"),
        "{rsync_call}"
    );
    // A data root given explicitly is the one used.
    let (_, calls) = run(&["BENCH_DATA_ROOT=/mnt/nvme/keel"]);
    assert!(calls.contains("BENCH_DATA_ROOT=/mnt/nvme/keel"), "{calls}");
    // The local preflight target still defaults to TMPDIR.
    let preflight = make_dry("preflight", &["TMPDIR=/tmp/sre-laptop-tmp"]);
    assert!(
        preflight.contains("--dir \"/tmp/sre-laptop-tmp\""),
        "{preflight}"
    );
}

/// Issue 13, fault 3: without ssh or rsync on the SRE's machine the scripts say how to get them.
#[test]
fn a_missing_local_tool_is_named_with_how_to_install_it() {
    let dir = tempfile::tempdir().unwrap();
    for tool in ["bash", "dirname"] {
        std::os::unix::fs::symlink(format!("/bin/{tool}"), dir.path().join(tool)).unwrap();
    }
    let output = Command::new(dir.path().join("bash"))
        .arg(repo_root().join("deploy/cloud/fetch-results.sh"))
        .env_clear()
        .env("PATH", dir.path())
        .env("HOME", "/nonexistent")
        .env("KEEL_VM_HOST", "vm.invalid")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("ssh is required on this machine")
            && stderr.contains("apt-get install openssh-client"),
        "{stderr}"
    );
    let output = run_clean(
        "deploy/cloud/fetch-results.sh",
        &[],
        &[("KEEL_VM_HOST", "vm.invalid"), ("KEEL_VM_PORT", "22x")],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("KEEL_VM_PORT=22x"));
}
