//! `filter-agent run`: the daemon.

use std::{collections::BTreeMap, path::Path, process::ExitCode, time::Duration};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    compile::{self, Compiled},
    dataplane::Dataplane,
    model::Store,
    node,
};

use super::RunArgs;

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
    // Said once per agent: the same files are reloaded on every change.
    static WARNED: std::sync::Once = std::sync::Once::new();
    if !store.network_policies.is_empty() {
        WARNED.call_once(|| tracing::warn!(
            count = store.network_policies.len(),
            "NetworkPolicy resources select pods, never host endpoints: loaded and validated, not enforced here"
        ));
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

/// Runs until SIGTERM or SIGINT.
pub async fn run_agent(args: RunArgs) -> anyhow::Result<ExitCode> {
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
