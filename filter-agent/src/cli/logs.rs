//! `filter-agent logs`: the running agent's Log records (its last ones,
//! then, with `--follow`, each as it comes), as LOG lines or JSON, from
//! the agent's socket in its state directory (root only).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::ExitCode,
};

use super::stats::Output;
use crate::{dataplane, events::stream, state::default_state_dir};

/// Arguments of `logs`.
#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The agent's bpffs pin directory (names its state directory).
    #[arg(long, default_value = dataplane::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// The agent's state directory [default: /run/filter-agent/<pin dir name>].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Keep printing records as they come.
    #[arg(long, short)]
    pub follow: bool,
    /// LOG lines (text) or one JSON object per record.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Only records of this policy (or profile).
    #[arg(long, value_name = "NAME")]
    pub policy: Option<String>,
}

/// Prints records; exit 2 when the agent cannot be reached.
pub fn run(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| default_state_dir(&args.pin_dir));
    let path = stream::socket(&dir);
    let mut conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "filter-agent logs: {}: {e} (is the agent running with this --pin-dir/--state-dir, and are you root?)",
                path.display()
            );
            return Ok(ExitCode::from(2));
        }
    };
    conn.write_all(if args.follow {
        b"follow\n"
    } else {
        b"recent\n"
    })?;
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(conn).lines() {
        let line = line?;
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if let Some(n) = record.get("missed") {
            eprintln!("filter-agent logs: {n} records went by too fast to follow");
            continue;
        }
        if args
            .policy
            .as_deref()
            .is_some_and(|p| record["policy"].as_str() != Some(p))
        {
            continue;
        }
        let printed = match args.output {
            Output::Json => writeln!(out, "{line}"),
            Output::Text => writeln!(out, "{}", record["line"].as_str().unwrap_or_default()),
        };
        // The reader went away (a closed pipe): done.
        if printed.is_err() {
            break;
        }
        let _ = out.flush();
    }
    Ok(ExitCode::SUCCESS)
}
