//! The `keel-bench` binary: parses the command line and hands it to the library.

use clap::Parser;
use std::process::ExitCode;

/// The same allocator as `keel` (see Cargo.toml): the in-process engine bench measures the
/// writer as it runs in production.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    keel_bench::run_cli(keel_bench::cli::Cli::parse())
}
