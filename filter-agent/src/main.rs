//! The `filter-agent` binary: parse flags, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use filter_agent::cli::{self, Cli, LogFormat};

/// A reload of a big policy allocates and frees millions of small
/// objects (YAML nodes, rules, table entries) on several threads; with
/// glibc's allocator that was a third of its CPU time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("filter-agent: {e:#}");
            ExitCode::from(2)
        }
    }
}
