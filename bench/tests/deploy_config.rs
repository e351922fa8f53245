//! The deploy files that cannot run here (no Docker engine, no systemd as init, no cloud) are
//! still checked: the compose file and cloud-init parse and say what they must, the systemd
//! units pass `systemd-analyze verify` and carry the hardening, the Dockerfile is multi-stage.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use common::repo_root;
use serde_yaml::Value;
use std::collections::BTreeMap;
use std::process::Command;

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn strings(value: &Value) -> Vec<String> {
    value.as_sequence().map_or_else(Vec::new, |s| {
        s.iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    })
}

#[test]
fn compose_file_has_every_service_with_healthchecks_on_loopback_ports() {
    let compose: Value = serde_yaml::from_str(&read("deploy/compose/compose.yaml")).unwrap();
    let services = compose["services"].as_mapping().unwrap();
    let names: Vec<&str> = services.keys().filter_map(Value::as_str).collect();
    for name in ["nats", "mongo", "mongo-express", "keel", "keel-project"] {
        assert!(names.contains(&name), "service {name} missing");
    }
    for (name, service) in services {
        for port in strings(&service["ports"]) {
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name:?} publishes {port} beyond loopback"
            );
        }
    }
    for name in ["nats", "mongo", "keel"] {
        assert!(
            !compose["services"][name]["healthcheck"]["test"].is_null(),
            "{name} has no healthcheck"
        );
    }
    let keel = &compose["services"]["keel"];
    assert!(
        strings(&keel["healthcheck"]["test"])
            .iter()
            .any(|s| s.ends_with("/healthz"))
    );
    assert_eq!(
        keel["build"]["dockerfile"].as_str(),
        Some("deploy/compose/Dockerfile")
    );
    assert!(strings(&keel["command"]).contains(&"serve".to_owned()));
    assert_eq!(keel["stop_signal"].as_str(), Some("SIGTERM"));
    let nats = &compose["services"]["nats"];
    assert!(
        strings(&nats["volumes"])
            .iter()
            .any(|v| v.starts_with("../nats/nats.conf:"))
    );
    assert!(strings(&nats["command"]).contains(&"--jetstream".to_owned()));
    let project = strings(&compose["services"]["keel-project"]["command"]).join(" ");
    assert!(
        project
            .starts_with("project --nats-url nats://nats:4222 --mongo-url mongodb://mongo:27017"),
        "{project}"
    );
    assert!(
        project.ends_with("--source-url http://keel:8080"),
        "{project}"
    );
    let depends = compose["services"]["keel-project"]["depends_on"]
        .as_mapping()
        .unwrap();
    for dependency in ["keel", "nats", "mongo"] {
        assert_eq!(
            depends[dependency]["condition"].as_str(),
            Some("service_healthy"),
            "{dependency}"
        );
    }
    assert_eq!(
        compose["services"]["mongo-express"]["environment"]["ME_CONFIG_MONGODB_URL"].as_str(),
        Some("mongodb://mongo:27017/")
    );
}

#[test]
fn dockerfile_is_multi_stage_and_installs_libclang() {
    let dockerfile = read("deploy/compose/Dockerfile");
    let stages = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert_eq!(stages, 2, "build and runtime stages");
    assert!(dockerfile.contains("libclang-dev"));
    assert!(dockerfile.contains("cargo build --release --locked -p keel-ingress"));
    assert!(dockerfile.contains("USER keel"));
    assert!(dockerfile.contains("STOPSIGNAL SIGTERM"));
    assert!(
        read("deploy/compose/Dockerfile.dockerignore")
            .lines()
            .any(|l| l.trim() == "target")
    );
}

#[test]
fn cloud_init_installs_the_build_and_bench_dependencies_and_mounts_the_data_disk() {
    let text = read("deploy/cloud/cloud-init.yaml");
    assert!(
        text.starts_with("#cloud-config\n"),
        "cloud-init needs the #cloud-config header"
    );
    let config: Value = serde_yaml::from_str(&text).unwrap();
    let packages = strings(&config["packages"]);
    for package in [
        "build-essential",
        "libclang-dev",
        "fio",
        "rsync",
        "git",
        "make",
        "fonts-dejavu-core",
    ] {
        assert!(
            packages.contains(&package.to_owned()),
            "package {package} missing"
        );
    }
    let runcmd = serde_yaml::to_string(&config["runcmd"]).unwrap();
    assert!(
        runcmd.contains("keel-mount-data-disk") && runcmd.contains("rustup"),
        "{runcmd}"
    );
    let script = config["write_files"][0]["content"].as_str().unwrap();
    assert!(script.contains("/var/lib/keel") && script.contains("noatime"));
}

/// `[Section]` -> key -> values (a key may repeat).
fn parse_unit(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_owned();
            sections.entry(current.clone()).or_default();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        assert!(!current.is_empty(), "{key} outside a section");
        sections
            .get_mut(&current)
            .unwrap()
            .entry(key.trim().to_owned())
            .or_default()
            .push(value.trim().to_owned());
    }
    sections
}

#[test]
fn systemd_units_carry_the_hardening_and_drain_settings() {
    for unit in ["keel.service", "keel-project.service"] {
        let sections = parse_unit(&read(&format!("deploy/systemd/{unit}")));
        assert_eq!(
            sections.keys().collect::<Vec<_>>(),
            vec!["Install", "Service", "Unit"],
            "{unit}"
        );
        let service = &sections["Service"];
        let one = |key: &str| service.get(key).and_then(|v| v.last()).map(String::as_str);
        for (key, want) in [
            ("ProtectSystem", "strict"),
            ("NoNewPrivileges", "yes"),
            ("PrivateTmp", "yes"),
            ("Restart", "on-failure"),
            ("KillSignal", "SIGTERM"),
        ] {
            assert_eq!(one(key), Some(want), "{unit}: {key}");
        }
        assert!(
            one("ExecStart").is_some_and(|e| e.starts_with("/usr/local/bin/keel ")),
            "{unit}"
        );
        assert!(
            one("LimitNOFILE").is_some_and(|n| n.parse::<u64>().unwrap() >= 65536),
            "{unit}"
        );
        let stop: u64 = one("TimeoutStopSec").unwrap().parse().unwrap();
        assert!(
            stop >= 60,
            "{unit}: TimeoutStopSec {stop} is too short to drain"
        );
        assert!(
            sections["Unit"].contains_key("StartLimitBurst"),
            "{unit}: restart rate limit in [Unit]"
        );
        assert_eq!(sections["Install"]["WantedBy"], vec!["multi-user.target"]);
    }
    let keel = parse_unit(&read("deploy/systemd/keel.service"));
    assert_eq!(keel["Service"]["ReadWritePaths"], vec!["/var/lib/keel"]);
    assert_eq!(keel["Service"]["User"], vec!["keel"]);
    assert_eq!(keel["Unit"]["RequiresMountsFor"], vec!["/var/lib/keel"]);
    let project = parse_unit(&read("deploy/systemd/keel-project.service"));
    assert_eq!(project["Service"]["DynamicUser"], vec!["yes"]);
    let exec = &project["Service"]["ExecStart"][0];
    for flag in ["--nats-url", "--mongo-url", "--source-url"] {
        assert!(exec.contains(flag), "{exec}");
    }
}

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    // verify also checks that ExecStart's binary exists; this machine has no installed keel,
    // so the copies point at /bin/true. Everything else is verified as written.
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for unit in ["keel.service", "keel-project.service"] {
        let text =
            read(&format!("deploy/systemd/{unit}")).replace("/usr/local/bin/keel ", "/bin/true ");
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .unwrap_or_else(|e| {
            panic!("systemd-analyze is required for this test (package systemd): {e}")
        });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "systemd-analyze verify: {stderr}");
    let complaints: Vec<&str> = stderr.lines().filter(|l| l.contains(".service")).collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze complained:\n{}",
        complaints.join("\n")
    );
}

#[test]
fn sysusers_entry_creates_the_keel_user() {
    let text = read("deploy/systemd/keel.sysusers.conf");
    let line = text
        .lines()
        .find(|l| !l.starts_with('#') && !l.trim().is_empty())
        .unwrap();
    assert!(line.starts_with("u keel - "), "{line}");
    assert!(line.contains("/var/lib/keel"));
}
