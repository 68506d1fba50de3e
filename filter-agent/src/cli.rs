//! Command line: `run` (the daemon) and `check` (validate files).
//!
//! Exit codes (style.md): 0 success, 1 input rejected, 2 the tool failed.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    compile::{self, Compiled},
    dataplane::{self, Dataplane},
    model::Store,
    node,
};

/// Calico v3 host-endpoint policy, enforced with XDP and TC.
#[derive(Debug, Parser)]
#[command(name = "filter-agent", version)]
pub struct Cli {
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enforce the policy of a directory on this node's host endpoints.
    Run(RunArgs),
    /// Validate policy files; print every error; exit 1 if any.
    Check(CheckArgs),
}

/// `filter-agent run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Directory of Calico v3 YAML (watched; re-applied on change).
    #[arg(long)]
    pub policy_dir: PathBuf,
    /// Node name that picks this node's HostEndpoints [default: $NODE_NAME,
    /// then the hostname].
    #[arg(long)]
    pub node: Option<String>,
    /// bpffs directory where programs and maps are pinned.
    #[arg(long, default_value = dataplane::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// How often to look for interfaces that appeared or went.
    #[arg(long, default_value = "2", value_name = "SECONDS")]
    pub interface_poll: u64,
}

/// `filter-agent check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Files or directories to validate.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check(args) => check(args),
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(run_agent(args))
        }
    }
}

fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let mut all_errors = Vec::new();
    let mut loaded = 0;
    for path in &args.paths {
        let result = if path.is_dir() {
            Store::load_dir(path)
        } else {
            Store::load_files(std::slice::from_ref(path))
        };
        match result {
            Ok(store) => {
                loaded += store.global_policies.len()
                    + store.network_policies.len()
                    + store.host_endpoints.len()
                    + store.global_network_sets.len()
            }
            Err(errors) => all_errors.extend(errors),
        }
    }
    for e in &all_errors {
        println!("{e}");
    }
    if all_errors.is_empty() {
        eprintln!("ok: {loaded} resources valid");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{} error(s)", all_errors.len());
        Ok(ExitCode::from(1))
    }
}

/// Loads and compiles the directory for this node.
fn load_and_compile(
    dir: &Path,
    node_name: &str,
) -> Result<(Compiled, BTreeMap<String, u32>), String> {
    let store = Store::load_dir(dir).map_err(|errors| {
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    if !store.network_policies.is_empty() {
        tracing::warn!(
            count = store.network_policies.len(),
            "NetworkPolicy resources select pods, never host endpoints: loaded and validated, not enforced here"
        );
    }
    let ifaces = node::interfaces();
    let cnode = compile::Node {
        name: node_name.to_owned(),
        interfaces: ifaces
            .iter()
            .map(|(n, (_, a))| (n.clone(), a.clone()))
            .collect(),
    };
    let compiled = compile::compile(&store, &cnode).map_err(|e| e.to_string())?;
    let indexes = ifaces.into_iter().map(|(n, (i, _))| (n, i)).collect();
    Ok((compiled, indexes))
}

async fn run_agent(args: RunArgs) -> anyhow::Result<ExitCode> {
    let node_name = node::node_name(args.node.as_deref());
    tracing::info!(node = %node_name, policy_dir = %args.policy_dir.display(), pin_dir = %args.pin_dir.display(), "starting");
    let mut dp = Dataplane::load(&args.pin_dir).context("load the kernel programs")?;
    let (_watcher, mut changes) = crate::source::watch(&args.policy_dir)
        .with_context(|| format!("watch {}", args.policy_dir.display()))?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut poll = tokio::time::interval(Duration::from_secs(args.interface_poll.max(1)));
    let mut last_good: Option<Compiled> = None;
    let mut last_ifaces = BTreeMap::new();

    reload(
        &mut dp,
        &args.policy_dir,
        &node_name,
        &mut last_good,
        &mut last_ifaces,
    );
    loop {
        tokio::select! {
            Some(()) = changes.recv() => {
                // Editors write in several steps: let the burst settle.
                tokio::time::sleep(Duration::from_millis(150)).await;
                while changes.try_recv().is_ok() {}
                reload(&mut dp, &args.policy_dir, &node_name, &mut last_good, &mut last_ifaces);
            }
            _ = poll.tick() => {
                let ifaces: BTreeMap<String, u32> = node::interfaces().into_iter().map(|(n, (i, _))| (n, i)).collect();
                if ifaces != last_ifaces {
                    tracing::debug!("interfaces changed");
                    reload(&mut dp, &args.policy_dir, &node_name, &mut last_good, &mut last_ifaces);
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    tracing::info!("stopping: detaching programs and removing pins");
    dp.shutdown().context("detach and unpin")?;
    Ok(ExitCode::SUCCESS)
}

/// Loads, compiles and applies; on any error keeps the last good policy.
fn reload(
    dp: &mut Dataplane,
    dir: &Path,
    node_name: &str,
    last_good: &mut Option<Compiled>,
    last_ifaces: &mut BTreeMap<String, u32>,
) {
    let _span = tracing::info_span!("sync").entered();
    let (compiled, ifaces) = match load_and_compile(dir, node_name) {
        Ok(c) => c,
        Err(errors) => {
            for line in errors.lines() {
                tracing::error!(error = %line, "invalid policy");
            }
            tracing::error!(
                kept = last_good.is_some(),
                "policy rejected; the last good policy stays enforced"
            );
            // Interfaces may still have changed: re-apply the last good one.
            let ifaces: BTreeMap<String, u32> = node::interfaces()
                .into_iter()
                .map(|(n, (i, _))| (n, i))
                .collect();
            if let Some(good) = last_good.as_ref().filter(|_| ifaces != *last_ifaces) {
                if let Err(e) = dp.apply(good, &ifaces) {
                    tracing::error!(error = %format!("{e:#}"), "re-applying the last good policy failed");
                }
                *last_ifaces = ifaces;
            }
            return;
        }
    };
    let rules: Vec<usize> = compiled.tables.iter().map(|t| t.rules.len()).collect();
    tracing::info!(
        ?rules,
        "compiled every stage (rules per table, untracked/pre-DNAT/normal/forward × ingress/egress); this version's kernel enforces the pre-DNAT stage"
    );
    for e in compiled
        .endpoints
        .iter()
        .filter(|e| !ifaces.contains_key(&e.iface))
    {
        tracing::warn!(iface = %e.iface, hep = %e.hep, "interface of a host endpoint does not exist (yet)");
    }
    match dp.apply(&compiled, &ifaces) {
        Ok(generation) => {
            let rules: usize = compiled.tables.iter().map(|t| t.rules.len()).sum();
            tracing::info!(
                generation,
                rules,
                classes = compiled.classes.len(),
                endpoints = ?dp.attachments(),
                "policy applied"
            );
            *last_good = Some(compiled);
            *last_ifaces = ifaces;
        }
        Err(e) => {
            let chain = anyhow::Error::from(e);
            tracing::error!(error = %format!("{chain:#}"), "applying the policy to the kernel failed");
        }
    }
}
