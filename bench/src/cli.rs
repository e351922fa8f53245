//! The `keel-bench` command line, parsed once at the edge into the configs the modules take.

use crate::domain;
use crate::load::LoadConfig;
use crate::schedule::{OpenLoop, Schedule};
use crate::target;
use crate::workload::{self, CommandTypes, Mix, Workload};
use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// Longest run any mode accepts.
pub const DURATION_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

/// `10s`, `10m`, `1h30m`, `500ms`: a positive duration of at most a week.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}`: {e} (try 10s, 10m, 1h)"))?;
    if duration.is_zero() {
        return Err(format!("`{text}`: the duration must be positive"));
    }
    if duration > DURATION_MAX {
        return Err(format!(
            "`{text}`: at most {} is allowed",
            humantime::format_duration(DURATION_MAX)
        ));
    }
    Ok(duration)
}

/// A ratio for `compare --min-ratio`: a finite number, 0 or more.
pub fn parse_min_ratio(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(ratio) if ratio.is_finite() && ratio >= 0.0 => Ok(ratio),
        _ => Err(format!("`{text}`: give a number, 0 or more (e.g. 0.5)")),
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "keel-bench",
    version,
    about = "Keel's load generator, metrics sampler, fio preflight and engine benchmark",
    long_about = "Without a subcommand: an HTTP load against a running `keel serve` (loopback only unless \
                  --allow-remote). With --preflight: the fio fsync preflight of --dir.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<SubCommand>,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Run the fio fsync preflight on --dir instead of a load.
    #[arg(long)]
    pub preflight: bool,
    #[command(flatten)]
    pub preflight_args: PreflightArgs,
}

#[derive(Subcommand, Debug)]
pub enum SubCommand {
    /// In-process ceiling: the sequencer and RocksDB without HTTP (a fresh temporary store).
    Engine(EngineArgs),
    /// Print result JSON files side by side (`label=path` or `path`).
    Compare {
        #[arg(required = true, num_args = 1..)]
        files: Vec<String>,
        /// With exactly two files: print the second's committed items/s over the first's, and
        /// fail (exit 1) when that ratio is below this.
        #[arg(long, value_parser = parse_min_ratio)]
        min_ratio: Option<f64>,
    },
    /// Live subscriptions (`GET /v1/subscribe`) under a write load: delivery latency and rate.
    Subscribe(crate::subscribe::SubscribeArgs),
    /// The floor under `subscribe` on this host: the same bytes fanned out over loopback TCP
    /// with no HTTP, SSE or store (one writer thread, readers that only count bytes).
    LoopbackFanout {
        #[command(flatten)]
        args: crate::fanout::FanoutArgs,
        /// Write the result JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Print a free TCP port on 127.0.0.1.
    FreePort,
    /// Wait until `GET /readyz` answers 200, or fail after --timeout.
    WaitReady {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
        #[arg(long)]
        allow_remote: bool,
        /// PEM certificate(s) to trust for an https --url.
        #[arg(long)]
        ca_cert: Option<PathBuf>,
    },
}

#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Base URL of the Keel server.
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "KEEL_BENCH_URL")]
    pub url: String,
    /// PEM certificate(s) to trust for an https --url (instead of the system's roots).
    #[arg(long, env = "KEEL_BENCH_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// API key for a server with --auth-keys (scope `write`; `admin` too with --sample-metrics).
    #[arg(long, env = "KEEL_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allow a non-loopback target (a server you own; nothing in this repository uses it).
    #[arg(long)]
    pub allow_remote: bool,
    /// Concurrent workers; each is one keep-alive HTTP/1.1 connection, one request at a time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub workers: u32,
    /// Commands per request.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch: u32,
    /// How long the measured load runs (after setup), e.g. 10s, 10m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Most requests over all workers; the load stops at this count or the duration.
    #[arg(long, default_value_t = 50_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_requests: u64,
    /// Accounts opened and funded in setup; transfers pick two of them at random.
    #[arg(long, default_value_t = 10_000)]
    pub accounts: u64,
    /// SKUs created in setup for the inventory mix.
    #[arg(long, default_value_t = 1000)]
    pub skus: u64,
    /// What the items are.
    #[arg(long, value_enum, default_value_t = Mix::Ledger)]
    pub mix: Mix,
    /// Send the mix's commands to the declared domain this file defines (the server must be
    /// started with the same `--domain FILE`): each `type` becomes `<domain>.<command>`. The
    /// file must declare every command the mix sends with every parameter the bench writes.
    #[arg(long, value_name = "FILE")]
    pub domain: Option<PathBuf>,
    /// Bytes of `memo` on each transfer (0..=4096), to model realistic item sizes.
    #[arg(long, default_value_t = 0)]
    pub payload_bytes: usize,
    /// Send every request as `atomic: true` (all or nothing).
    #[arg(long)]
    pub atomic: bool,
    /// Share of items designed to be rejected (impossible amounts), 0..=1.
    #[arg(long, default_value_t = 0.0)]
    pub reject_ratio: f64,
    /// The shape of the load's command ids: `counter` (`<run>-w<worker>-<n>`) or `random` (32
    /// random hex digits, as the UUIDv4 ids `keel_client` sends: every checkpoint's ids span
    /// the command-id index's whole key space, its hardest case).
    #[arg(long, value_enum, default_value_t = crate::workload::IdShape::Counter)]
    pub ids: crate::workload::IdShape,
    /// Seed of every worker's RNG (worker w uses a seed derived from it and w).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Open loop at this many items/s (over all workers); without it the load is closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Per-request timeout.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Write the result JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Scrape /metrics into this CSV during the load.
    #[arg(long)]
    pub sample_metrics: Option<PathBuf>,
    /// Time between two scrapes.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub sample_interval: Duration,
    /// The server's pid, for CPU% and RSS in the CSV (read from /proc).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Write the plots (timeline, latency, server) as PNG and SVG into this directory.
    #[arg(long)]
    pub plot_dir: Option<PathBuf>,
    /// The preflight JSON of the data disk, copied into the result's machine facts.
    #[arg(long)]
    pub preflight_json: Option<PathBuf>,
    /// The server's data directory (on this machine): its device, file system and mount point
    /// go into the result and the summary, so the disk measured is named.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A name for this run in the result and the plot titles.
    #[arg(long)]
    pub label: Option<String>,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct PreflightArgs {
    /// Directory on the disk to measure (the data directory's disk).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Most p99 write+fsync latency accepted, microseconds.
    #[arg(long, env = "FSYNC_MAX_LAT_US", default_value_t = 5000)]
    pub fsync_max_lat_us: u64,
    /// fio's --runtime.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub fio_runtime: Duration,
    /// fio's --size.
    #[arg(long, default_value = "64m")]
    pub fio_size: String,
    /// The fio binary.
    #[arg(long, default_value = "fio", env = "FIO")]
    pub fio: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Parent directory of the temporary store (put it on the disk under test).
    #[arg(long, env = "BENCH_DATA_ROOT")]
    pub dir: Option<PathBuf>,
    /// Use this (empty or new) directory as the store and keep it, e.g. to audit it afterwards
    /// (takes precedence over --dir).
    #[arg(long)]
    pub store: Option<PathBuf>,
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch: u32,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value_t = 10_000)]
    pub accounts: u64,
    /// Submissions kept queued at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub in_flight: u32,
    /// Most items per commit (one fsync); the default is `keel serve`'s.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1000..=1_000_000))]
    pub batch_items_max: u32,
    #[arg(long, default_value_t = 0)]
    pub payload_bytes: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_submissions: u64,
    /// Most aggregates the writer keeps in memory, as `keel serve --cache-aggregates-max`; below
    /// --accounts, each batch reads the accounts it lacks from the checkpoint.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub cache_aggregates_max: u64,
    /// The shape of the command ids: `counter` (`e-1`, `e-2`, ...: each checkpoint's ids fall
    /// in a few narrow key ranges) or `random` (32 random hex digits, as UUIDv4 ids are: every
    /// checkpoint's ids span the whole key space, the command-id index's hardest case).
    #[arg(long, value_enum, default_value_t = crate::engine_bench::IdShape::Counter)]
    pub ids: crate::engine_bench::IdShape,
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long)]
    pub preflight_json: Option<PathBuf>,
    #[arg(long)]
    pub label: Option<String>,
}

impl LoadArgs {
    /// Checks every value and builds the load's config. `run_id` makes command ids unique.
    pub fn to_config(&self, run_id: String) -> anyhow::Result<LoadConfig> {
        let base_url = target::checked_base_url(&self.url, self.allow_remote)?;
        if self.mix.needs_accounts() && !(2..=workload::ACCOUNTS_MAX).contains(&self.accounts) {
            bail!(
                "--accounts must be from 2 to {} (transfers need two accounts)",
                workload::ACCOUNTS_MAX
            );
        }
        if self.mix.needs_skus() && !(1..=workload::SKUS_MAX).contains(&self.skus) {
            bail!("--skus must be from 1 to {}", workload::SKUS_MAX);
        }
        if self.payload_bytes > workload::MEMO_BYTES_MAX {
            bail!(
                "--payload-bytes must be at most {} (the API's memo limit)",
                workload::MEMO_BYTES_MAX
            );
        }
        if !(0.0..=1.0).contains(&self.reject_ratio) {
            bail!("--reject-ratio must be from 0 to 1");
        }
        let workers = self.workers as usize;
        let batch = self.batch as usize;
        let mut workload = Workload {
            mix: self.mix,
            accounts: self.accounts,
            skus: self.skus,
            payload_bytes: self.payload_bytes,
            reject_ratio: self.reject_ratio,
            seed: self.seed,
            run_id,
            types: CommandTypes::builtin(),
            ids: self.ids,
        };
        let domain = match &self.domain {
            Some(path) => {
                let (domain, types) =
                    domain::load(path, self.mix, &workload.sent_commands(workers))?;
                workload.types = types;
                Some(domain)
            }
            None => None,
        };
        let schedule = match self.rate {
            None => Schedule::Closed,
            Some(rate) => Schedule::Open(OpenLoop::new(rate, batch, workers).ok_or_else(|| {
                anyhow::anyhow!("--rate {rate}: give a positive number of items per second")
            })?),
        };
        Ok(LoadConfig {
            base_url,
            client: keel_projection::http_client::ClientOptions {
                ca_cert: self.ca_cert.clone(),
                api_key: self.api_key.clone(),
            },
            workers,
            batch,
            duration: self.duration,
            requests_max: self.max_requests,
            atomic: self.atomic,
            schedule,
            workload,
            domain,
            request_timeout: self.request_timeout,
            progress: !self.quiet,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("keel-bench").chain(args.iter().copied()))
    }

    #[test]
    fn durations_parse_and_are_bounded() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("30d").is_err());
    }

    #[test]
    fn load_flags_build_a_config() {
        let cli = parse(&[
            "--url",
            "http://127.0.0.1:9",
            "--workers",
            "64",
            "--batch",
            "100",
            "--duration",
            "2s",
            "--rate",
            "50000",
            "--mix",
            "mixed",
            "--payload-bytes",
            "128",
            "--reject-ratio",
            "0.1",
            "--atomic",
        ])
        .unwrap();
        let config = cli.load.to_config("r".into()).unwrap();
        assert_eq!(
            (config.workers, config.batch, config.duration),
            (64, 100, Duration::from_secs(2))
        );
        assert!(
            matches!(config.schedule, Schedule::Open(s) if s.interval() == Duration::from_millis(2))
        );
        assert!(config.atomic);
        assert_eq!(config.workload.mix, Mix::Mixed);
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        let bad: &[(&[&str], &str)] = &[
            (&["--url", "http://10.1.2.3:8080"], "only loopback"),
            (&["--payload-bytes", "5000"], "--payload-bytes"),
            (&["--reject-ratio", "1.5"], "--reject-ratio"),
            (&["--accounts", "1"], "--accounts"),
            (&["--rate", "0"], "--rate"),
        ];
        for (args, needle) in bad {
            let error = parse(args)
                .unwrap()
                .load
                .to_config("r".into())
                .unwrap_err()
                .to_string();
            assert!(error.contains(needle), "{args:?}: {error}");
        }
        assert!(parse(&["--workers", "0"]).is_err());
        assert!(parse(&["--duration", "forever"]).is_err());
    }

    fn example(file: &str) -> String {
        format!("{}/../examples/domains/{file}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn domain_flag_qualifies_every_type_and_names_the_domain() {
        let ledger = example("ledger.toml");
        let cli = parse(&["--domain", &ledger, "--payload-bytes", "32"]).unwrap();
        assert_eq!(
            cli.load.domain.as_deref(),
            Some(std::path::Path::new(&ledger))
        );
        let config = cli.load.to_config("r".into()).unwrap();
        let domain = config.domain.unwrap();
        assert_eq!(
            (domain.name.as_str(), domain.file),
            ("cel_ledger", ledger.clone())
        );
        assert_eq!(config.workload.types.transfer, "cel_ledger.transfer");
        assert_eq!(
            config.workload.types.open_account,
            "cel_ledger.open_account"
        );
        // Without --domain: the built-in names.
        let config = parse(&[]).unwrap().load.to_config("r".into()).unwrap();
        assert!(config.domain.is_none());
        assert_eq!(config.workload.types, CommandTypes::builtin());
        // The inventory mix against the inventory file, and against the ledger file.
        let inventory = example("inventory.toml");
        let config = parse(&["--domain", &inventory, "--mix", "inventory"])
            .unwrap()
            .load
            .to_config("r".into())
            .unwrap();
        assert_eq!(config.workload.types.reserve, "cel_inventory.reserve");
        let error = parse(&["--domain", &ledger, "--mix", "inventory"])
            .unwrap()
            .load
            .to_config("r".into())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(
                "domain `cel_ledger` has no command `create_sku` (the inventory mix sends"
            ),
            "{error}"
        );
        let error = parse(&["--domain", "/nonexistent/x.toml"])
            .unwrap()
            .load
            .to_config("r".into())
            .unwrap_err();
        assert!(
            format!("{error:#}").contains("/nonexistent/x.toml"),
            "{error:#}"
        );
        assert!(parse(&["--domain"]).is_err());
    }

    #[test]
    fn preflight_and_subcommands_parse() {
        let cli = parse(&[
            "--preflight",
            "--dir",
            "/tmp/x",
            "--fsync-max-lat-us",
            "800",
        ])
        .unwrap();
        assert!(cli.preflight);
        assert_eq!(cli.preflight_args.fsync_max_lat_us, 800);
        let cli = parse(&["engine", "--batch", "2000", "--duration", "3s"]).unwrap();
        assert!(matches!(cli.command, Some(SubCommand::Engine(ref e)) if e.batch == 2000));
        let cli = parse(&["compare", "a=x.json", "y.json"]).unwrap();
        assert!(
            matches!(cli.command, Some(SubCommand::Compare { ref files, min_ratio: None }) if files.len() == 2)
        );
        let cli = parse(&["compare", "--min-ratio", "0.5", "a=x.json", "b=y.json"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(SubCommand::Compare {
                min_ratio: Some(0.5),
                ..
            })
        ));
        assert!(parse(&["compare", "--min-ratio", "-1", "x.json"]).is_err());
        assert!(parse(&["compare", "--min-ratio", "NaN", "x.json"]).is_err());
        assert!(parse(&["engine", "--url", "http://127.0.0.1:1"]).is_err());
    }
}
