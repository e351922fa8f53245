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
    for name in [
        "nats",
        "mongo",
        "mongo-express",
        "keel",
        "keel-project",
        "prometheus",
        "grafana",
    ] {
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
        project.contains("--source-url http://keel:8080"),
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

/// The port of an address flag in a service's command (`--listen 0.0.0.0:8080` -> 8080).
fn flag_port(command: &[String], flag: &str) -> Option<u16> {
    let at = command.iter().position(|a| a == flag)?;
    command.get(at + 1)?.rsplit(':').next()?.parse().ok()
}

/// Where a service mounts a host path of the repository (`../grafana/x:/etc/x:ro`): the host
/// path (relative to deploy/compose/) for the container path.
fn bind_mount(service: &Value, container_path: &str) -> Option<String> {
    strings(&service["volumes"]).into_iter().find_map(|v| {
        let mut parts = v.split(':');
        let host = parts.next()?;
        (parts.next()? == container_path && host.starts_with("../")).then(|| host.to_owned())
    })
}

/// Issue 13: the monitoring in the compose file cannot run here (no Docker engine), so its
/// wiring is checked: Prometheus scrapes the services and ports that serve /metrics, Grafana's
/// provisioning and dashboard are mounted from files that exist, and every panel names the
/// provisioned datasource. (projection/tests/dashboard.rs checks the panels' metrics against
/// real processes.)
#[test]
fn prometheus_and_grafana_are_wired_to_the_services_and_the_dashboard() {
    let compose: Value = serde_yaml::from_str(&read("deploy/compose/compose.yaml")).unwrap();
    let compose_dir = repo_root().join("deploy/compose");
    let services = &compose["services"];
    // Prometheus: its config is the repository's, and each scrape target is a service at the
    // port that service serves /metrics on.
    let prometheus = &services["prometheus"];
    let config_host = bind_mount(prometheus, "/etc/prometheus/prometheus.yml").unwrap();
    assert!(
        strings(&prometheus["command"])
            .contains(&"--config.file=/etc/prometheus/prometheus.yml".to_owned())
    );
    let config: Value =
        serde_yaml::from_str(&std::fs::read_to_string(compose_dir.join(&config_host)).unwrap())
            .unwrap();
    let keel_port = flag_port(&strings(&services["keel"]["command"]), "--listen").unwrap();
    let project_port = flag_port(
        &strings(&services["keel-project"]["command"]),
        "--metrics-listen",
    )
    .unwrap();
    let mut jobs = BTreeMap::new();
    for job in config["scrape_configs"].as_sequence().unwrap() {
        let name = job["job_name"].as_str().unwrap().to_owned();
        assert_eq!(job["metrics_path"].as_str(), Some("/metrics"), "{name}");
        let targets = strings(&job["static_configs"][0]["targets"]);
        jobs.insert(name, targets);
    }
    assert_eq!(jobs["keel"], vec![format!("keel:{keel_port}")]);
    assert_eq!(
        jobs["keel-project"],
        vec![format!("keel-project:{project_port}")]
    );
    for targets in jobs.values() {
        for target in targets {
            let service = target.split(':').next().unwrap();
            assert!(
                !services[service].is_null(),
                "{target} is no compose service"
            );
        }
    }
    // Grafana: provisioning and dashboards from the repository.
    let grafana = &services["grafana"];
    let provisioning = bind_mount(grafana, "/etc/grafana/provisioning").unwrap();
    let dashboards = bind_mount(grafana, "/etc/grafana/dashboards").unwrap();
    assert!(compose_dir.join(&provisioning).join("datasources").is_dir());
    let datasources: Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            compose_dir
                .join(&provisioning)
                .join("datasources/prometheus.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let datasource = &datasources["datasources"][0];
    assert_eq!(datasource["type"].as_str(), Some("prometheus"));
    assert_eq!(datasource["url"].as_str(), Some("http://prometheus:9090"));
    assert!(strings(&prometheus["ports"]).contains(&"127.0.0.1:9090:9090".to_owned()));
    let datasource_uid = datasource["uid"].as_str().unwrap();
    let providers: Value = serde_yaml::from_str(
        &std::fs::read_to_string(compose_dir.join(&provisioning).join("dashboards/keel.yaml"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        providers["providers"][0]["options"]["path"].as_str(),
        Some("/etc/grafana/dashboards")
    );
    // The dashboard: valid JSON with a uid and a title, unique panel ids, every panel and query
    // on the provisioned datasource, and jobs that Prometheus scrapes.
    let json = std::fs::read_to_string(compose_dir.join(&dashboards).join("keel.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(!dashboard["uid"].as_str().unwrap().is_empty());
    assert_eq!(dashboard["title"].as_str(), Some("Keel"));
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = std::collections::BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        assert_eq!(
            panel["datasource"]["uid"].as_str(),
            Some(datasource_uid),
            "{title}"
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}");
        for target in targets {
            assert_eq!(
                target["datasource"]["uid"].as_str(),
                Some(datasource_uid),
                "{title}"
            );
            let expr = target["expr"].as_str().unwrap();
            if let Some(rest) = expr.split("job=~\"").nth(1) {
                for job in rest.split('"').next().unwrap().split('|') {
                    assert!(jobs.contains_key(job), "{title}: job {job} is not scraped");
                }
            }
        }
    }
    for want in [
        "Throughput",
        "Rejections by code",
        "Batch size",
        "fsync latency",
        "queue",
        "Request latency",
        "Publish lag",
        "Projection lag",
        "poisoned",
    ] {
        assert!(
            panels
                .iter()
                .any(|p| p["title"].as_str().unwrap().contains(want)),
            "no panel for {want}"
        );
    }
}
