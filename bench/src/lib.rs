//! `keel-bench`: Keel's benchmarks for SREs. An HTTP load generator (closed or open loop, N
//! workers, batch size, payload, reject share, seeded), a `/metrics` sampler that writes CSV,
//! plots drawn by the tool itself, the fio fsync preflight of the data disk, and an in-process
//! engine benchmark that shows the sequencer's and RocksDB's own ceiling without HTTP.
//!
//! It is not part of the product: nothing in the write path depends on it, and it may depend on
//! anything (`bench -> anything`). It only ever loads loopback targets unless told otherwise
//! (see [`target`]). The binary is a thin `main` over [`run_cli`]; tests call the same library
//! entries ([`run_load_command`], [`preflight::run`], [`engine_bench::run`]).

pub mod answer;
pub mod cli;
pub mod disk;
pub mod domain;
pub mod engine_bench;
pub mod fanout;
pub mod load;
pub mod plot;
pub mod preflight;
pub mod report;
pub mod sampler;
pub mod schedule;
pub mod stats;
pub mod subscribe;
pub mod target;
pub mod workload;

use anyhow::Context;
use cli::{Cli, EngineArgs, LoadArgs, PreflightArgs, SubCommand};
use report::{LoadReport, Machine, Parameters};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Exit code when the preflight finds the disk too slow.
pub const EXIT_DISK_TOO_SLOW: u8 = 3;

/// Runs the parsed command line; errors are printed here.
pub fn run_cli(cli: Cli) -> ExitCode {
    let result = match (&cli.command, cli.preflight) {
        (Some(SubCommand::Engine(args)), _) => run_engine_command(args).map(|()| ExitCode::SUCCESS),
        (Some(SubCommand::Compare { files, min_ratio }), _) => run_compare(files, *min_ratio),
        (Some(SubCommand::Subscribe(args)), _) => {
            with_runtime(run_subscribe_command(args)).map(|()| ExitCode::SUCCESS)
        }
        (Some(SubCommand::LoopbackFanout { args, json }), _) => {
            run_fanout_command(args, json.as_deref()).map(|()| ExitCode::SUCCESS)
        }
        (Some(SubCommand::FreePort), _) => free_port().map(|port| {
            println!("{port}");
            ExitCode::SUCCESS
        }),
        (
            Some(SubCommand::WaitReady {
                url,
                timeout,
                allow_remote,
                ca_cert,
            }),
            _,
        ) => {
            let options = keel_projection::http_client::ClientOptions {
                ca_cert: ca_cert.clone(),
                api_key: None,
            };
            with_runtime(wait_ready(url, *timeout, *allow_remote, &options))
                .map(|()| ExitCode::SUCCESS)
        }
        (None, true) => run_preflight_command(&cli.preflight_args, cli.load.json.as_deref()),
        (None, false) => with_runtime(run_load_command(&cli.load)).map(|report| {
            print!("{}", report.table());
            ExitCode::SUCCESS
        }),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("keel-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn with_runtime<T>(
    future: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(future)
}

/// `keel-bench subscribe`: runs it, prints the table, writes the JSON when asked.
async fn run_subscribe_command(args: &subscribe::SubscribeArgs) -> anyhow::Result<()> {
    let report = subscribe::run(args).await?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `keel-bench loopback-fanout`: runs it, prints the table, writes the JSON when asked.
fn run_fanout_command(
    args: &fanout::FanoutArgs,
    json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let report = fanout::run(args)?;
    print!("{}", report.table());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The whole HTTP load: health check, setup, sampler, load, report, JSON and plots. Prints
/// progress on stderr (unless `--quiet`); returns the report (the caller prints the table).
pub async fn run_load_command(args: &LoadArgs) -> anyhow::Result<LoadReport> {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let run_id = workload::run_id_from_millis(millis);
    let config = Arc::new(args.to_config(run_id.clone())?);
    let mut machine =
        Machine::read(args.preflight_json.as_deref())?.with_data_dir(args.data_dir.as_deref());
    load::check_health(&config.base_url, &config.client).await?;
    let setup = load::run_setup(&config).await?;
    if !args.quiet {
        eprintln!(
            "setup: {} items in {} requests, {:.1} s ({} already existed)",
            setup.items, setup.requests, setup.duration_s, setup.already_existed
        );
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let sampler = args.sample_metrics.as_ref().map(|csv| {
        let config = sampler::SamplerConfig {
            base_url: config.base_url.clone(),
            client: config.client.clone(),
            csv: csv.clone(),
            interval: args.sample_interval,
            server_pid: args.server_pid,
            samples_max: samples_max(args.duration, args.sample_interval),
        };
        tokio::spawn(sampler::run(config, stop_rx))
    });
    let started_at = now_rfc3339();
    let outcome = load::run_load(Arc::clone(&config), setup).await;
    let _ = stop_tx.send(true);
    let rows = match sampler {
        Some(handle) => Some(handle.await.context("the sampler task failed")??),
        None => None,
    };
    let outcome = outcome?;
    machine.loadavg_1m_end = report::loadavg_1m();
    let parameters = parameters(args, &config, run_id);
    let report = LoadReport::new(
        &outcome,
        parameters,
        machine,
        rows.as_deref(),
        started_at,
        args.label.clone(),
    );
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    if let Some(dir) = &args.plot_dir {
        let title = args
            .label
            .clone()
            .unwrap_or_else(|| format!("{} x batch {}", args.workers, args.batch));
        match write_load_plots(dir, &title, &report, &outcome.latency, rows.as_deref()) {
            Ok(files) => eprintln!(
                "plots: {}",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(error) => eprintln!("keel-bench: WARNING: no plots: {error:#}"),
        }
    }
    Ok(report)
}

/// Bound on the sampler's scrapes: the planned number plus slack for setup and shutdown.
fn samples_max(duration: Duration, interval: Duration) -> u64 {
    let planned = duration.as_secs_f64() / interval.as_secs_f64().max(1e-3);
    planned.ceil() as u64 + 100
}

fn parameters(args: &LoadArgs, config: &load::LoadConfig, run_id: String) -> Parameters {
    Parameters {
        url: config.base_url.to_string(),
        workers: config.workers,
        batch: config.batch,
        duration_s: config.duration.as_secs_f64(),
        requests_max: config.requests_max,
        mode: if args.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        rate_items_per_sec: args.rate,
        mix: args.mix,
        domain: config.domain.clone(),
        accounts: args.accounts,
        skus: args.skus,
        payload_bytes: args.payload_bytes,
        atomic: args.atomic,
        reject_ratio: args.reject_ratio,
        seed: args.seed,
        ids: args.ids,
        run_id,
        sample_interval_s: args
            .sample_metrics
            .as_ref()
            .map(|_| args.sample_interval.as_secs_f64()),
    }
}

/// Writes the three plots (PNG + SVG each) into `dir`.
pub fn write_load_plots(
    dir: &Path,
    title: &str,
    report: &LoadReport,
    latency: &stats::LatencyHistogram,
    rows: Option<&[sampler::SampleRow]>,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = plot::write_timeline(&dir.join("timeline"), title, &report.timeline)?;
    files.extend(plot::write_latency(&dir.join("latency"), title, latency)?);
    if let Some(rows) = rows.filter(|r| !r.is_empty()) {
        files.extend(plot::write_server(
            &dir.join("server"),
            &format!("{title}: server (from /metrics)"),
            rows,
        )?);
    }
    Ok(files)
}

pub fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("encoding the result JSON")?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

fn run_preflight_command(args: &PreflightArgs, json: Option<&Path>) -> anyhow::Result<ExitCode> {
    let dir = args
        .dir
        .clone()
        .context("--preflight needs --dir DIR (a directory on the disk to measure)")?;
    let config = preflight::PreflightConfig {
        dir,
        fsync_max_lat_us: args.fsync_max_lat_us,
        runtime: args.fio_runtime,
        size: args.fio_size.clone(),
        fio: args.fio.clone(),
    };
    let result = preflight::run(&config)?;
    print!("{}", preflight::describe(&result));
    if let Some(path) = json {
        write_json(path, &result)?;
    }
    Ok(if result.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DISK_TOO_SLOW)
    })
}

fn run_engine_command(args: &EngineArgs) -> anyhow::Result<()> {
    let config = engine_bench::EngineConfig {
        dir: args.dir.clone().unwrap_or_else(std::env::temp_dir),
        store: args.store.clone(),
        batch: args.batch as usize,
        duration_s: args.duration.as_secs_f64(),
        accounts: args.accounts,
        in_flight: args.in_flight as usize,
        batch_items_max: args.batch_items_max as usize,
        payload_bytes: args.payload_bytes,
        seed: args.seed,
        submissions_max: args.max_submissions,
        cache_aggregates_max: usize::try_from(args.cache_aggregates_max).unwrap_or(usize::MAX),
        ids: args.ids,
    };
    // The disk of the store: the kept store's own, else the parent of the temporary one.
    let store_disk_dir = args.store.as_deref().unwrap_or(&config.dir);
    let machine =
        Machine::read(args.preflight_json.as_deref())?.with_data_dir(Some(store_disk_dir));
    let report = engine_bench::run(&config, machine, args.label.clone())?;
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    print!("{}", report.table());
    Ok(())
}

/// Prints the side-by-side table; with `min_ratio`, then the second file's committed items/s
/// over the first's, and fails when it is below `min_ratio`.
fn run_compare(files: &[String], min_ratio: Option<f64>) -> anyhow::Result<ExitCode> {
    let mut results = Vec::new();
    for spec in files {
        let (label, path) = match spec.split_once('=') {
            Some((label, path)) => (label.to_owned(), PathBuf::from(path)),
            None => {
                let path = PathBuf::from(spec);
                let label = path
                    .parent()
                    .and_then(|p| p.file_name())
                    .map_or_else(|| spec.clone(), |n| n.to_string_lossy().into_owned());
                (label, path)
            }
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        results.push((label, value));
    }
    print!("{}", report::compare_table(&results));
    let Some(min_ratio) = min_ratio else {
        return Ok(ExitCode::SUCCESS);
    };
    let ratio = report::items_ratio(&results, min_ratio).map_err(|e| anyhow::anyhow!(e))?;
    println!("{}", ratio.line);
    if ratio.passed() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "keel-bench: the committed items/s ratio {:.3} is under --min-ratio {min_ratio}",
        ratio.ratio
    );
    Ok(ExitCode::FAILURE)
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener
        .local_addr()
        .context("reading the bound address")?
        .port())
}

/// Polls `GET /readyz` every 100 ms until it answers 200, for at most `timeout`.
pub async fn wait_ready(
    url: &str,
    timeout: Duration,
    allow_remote: bool,
    options: &keel_projection::http_client::ClientOptions,
) -> anyhow::Result<()> {
    let base = target::checked_base_url(url, allow_remote)?;
    let readyz = target::endpoint(&base, "/readyz");
    let client = load::http_client(Duration::from_secs(1), options)?;
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match client.get(readyz.clone()).send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => last = format!("HTTP {}", response.status()),
            Err(error) => last = error.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!(
        "{readyz} was not ready within {} ({last})",
        humantime::format_duration(timeout)
    )
}
