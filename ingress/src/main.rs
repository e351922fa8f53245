//! The `keel` binary.

use clap::Parser;
use keel_ingress::config::{Cli, Command, LogFormat};
use std::io::IsTerminal;
use std::process::ExitCode;

/// jemalloc for every allocation of the process, RocksDB's included (see Cargo.toml and
/// docs/BENCHMARKS.md, "The process allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Log lines go to stderr, filtered by RUST_LOG (default `info`). Text has ANSI colours only
/// when stderr is a terminal: in a file, journald or `docker logs` escape codes are noise.
fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.with_ansi(false).json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("keel: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Serve(config) => runtime.block_on(keel_ingress::serve(config)),
        Command::Audit(args) => return keel_ingress::audit_cmd::run(&args),
        Command::Project(args) => runtime.block_on(keel_ingress::project(args)),
        Command::Openapi => {
            print!("{}", keel_ingress::openapi::document());
            Ok(())
        }
        Command::Keys(args) => keel_ingress::keys_cmd::run(&args),
        Command::Upgrade(args) => keel_ingress::upgrade::run(&args.data),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("keel: {error:#}");
            ExitCode::FAILURE
        }
    }
}
