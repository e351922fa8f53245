//! The `keel-bench` binary: parses the command line and hands it to the library.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    keel_bench::run_cli(keel_bench::cli::Cli::parse())
}
