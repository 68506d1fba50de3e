//! `filter-agent run`: the daemon.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    compile::{self, Compiled},
    dataplane::{self, Dataplane},
    model::{Limits, Store},
    node,
};

use super::RunArgs;

/// Each policy file's text as last applied.
type Texts = BTreeMap<PathBuf, String>;

/// A policy read and compiled for this node.
struct Loaded {
    compiled: Compiled,
    /// Interface name → index, as compiled against.
    ifaces: BTreeMap<String, u32>,
    /// The file texts it was compiled from.
    texts: Texts,
}

/// Loads and compiles the directory for this node.
///
/// A file found without any resource (empty, blank or only comments)
/// that had some when the policy in force was applied is read as it was
/// then: an editor or a shell redirection rewriting a file leaves it empty
/// for a moment, and that moment must not take its host endpoints and
/// policies away (the programs would detach). Deleting the file removes
/// its resources.
fn load_and_compile(
    dir: &Path,
    node_name: &str,
    limits: &Limits,
    in_force: &Texts,
) -> Result<Loaded, String> {
    let joined = |errors: Vec<crate::model::Error>| {
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut texts = crate::model::read_dir_texts(dir, limits).map_err(joined)?;
    for (file, text) in &mut texts {
        if !crate::model::has_no_documents(text) {
            continue;
        }
        if let Some(good) = in_force
            .get(file)
            .filter(|t| !crate::model::has_no_documents(t))
        {
            tracing::warn!(file = %file.display(), "policy file has no resources (being rewritten?): its last applied content stays in force until it has resources again or is deleted");
            text.clone_from(good);
        }
    }
    let store = Store::from_texts(texts.clone()).map_err(joined)?;
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
    Ok(Loaded {
        compiled,
        ifaces: indexes,
        texts: texts.into_iter().collect(),
    })
}

/// Runs until SIGTERM or SIGINT.
pub async fn run_agent(args: RunArgs) -> anyhow::Result<ExitCode> {
    let node_name = node::node_name(args.node.as_deref());
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| super::stats::default_state_dir(&args.pin_dir));
    tracing::info!(node = %node_name, policy_dir = %args.policy_dir.display(), pin_dir = %args.pin_dir.display(), "starting");
    let adopting = args
        .pin_dir
        .join(filter_common::names::MAP_GENERATION)
        .exists();
    let options = dataplane::Options {
        conntrack_size: args.conntrack_size,
    };
    let mut dp =
        Dataplane::load_with(&args.pin_dir, &options).context("load the kernel programs")?;
    if !adopting {
        seed_conntrack(&mut dp);
    }
    let (mut watch, mut changes) = crate::source::watch(&args.policy_dir)
        .with_context(|| format!("watch {}", args.policy_dir.display()))?;
    // Signals end the agent even while a reload is under way (a policy
    // file that takes long to parse must not hold up SIGTERM).
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
        let _ = stop_tx.send(true);
    });
    let mut poll = tokio::time::interval(Duration::from_secs(args.interface_poll.max(1)));
    let mut sweep = tokio::time::interval(Duration::from_secs(args.conntrack_sweep.max(1)));
    let mut agent = Agent {
        dp,
        policy_dir: args.policy_dir.clone(),
        node_name,
        state_dir,
        last_good: None,
        last_ifaces: BTreeMap::new(),
        host_addrs: BTreeSet::new(),
        limits: Limits {
            max_file_bytes: args.max_file_size,
            ..Limits::default()
        },
        texts: Texts::new(),
        parse_timeout: Duration::from_secs(args.parse_timeout.max(1)),
    };
    agent.reload(&mut stop).await;
    while !*stop.borrow() {
        tokio::select! {
            Some(()) = changes.recv() => {
                // Editors write in several steps: let the burst settle.
                tokio::time::sleep(Duration::from_millis(150)).await;
                while changes.try_recv().is_ok() {}
                agent.reload(&mut stop).await;
            }
            _ = poll.tick() => {
                agent.restore_pins();
                if watch.refresh() {
                    tracing::warn!(dir = %args.policy_dir.display(), "the policy directory was replaced: watching the new one");
                }
                // One read of the interfaces serves both checks.
                let (ifaces, addrs) = interface_snapshot();
                if ifaces != agent.last_ifaces {
                    tracing::debug!("interfaces changed");
                    agent.reload(&mut stop).await;
                } else {
                    agent.sync_host_addresses(addrs);
                }
            }
            _ = sweep.tick() => agent.sweep(),
            _ = stop.changed() => {}
        }
    }
    if args.detach_on_exit {
        tracing::info!("stopping: detaching programs and removing pins");
        let _ = std::fs::remove_dir_all(&agent.state_dir);
        agent.dp.shutdown().context("detach and unpin")?;
    } else {
        agent.dp.leave();
    }
    Ok(ExitCode::SUCCESS)
}

/// Seeds conntrack from the kernel's table before anything is enforced, so
/// connections that already exist survive the first enforcement.
fn seed_conntrack(dp: &mut Dataplane) {
    let proc_file = Path::new("/proc/net/nf_conntrack");
    match dp.seed_from_kernel(proc_file) {
        Ok(Some(n)) => tracing::info!(flows = n, "conntrack seeded from the kernel's table"),
        Ok(None) => tracing::warn!(
            file = %proc_file.display(),
            "the kernel's conntrack table is not readable (nf_conntrack not loaded?): connections open before this start are judged as new"
        ),
        Err(e) => {
            tracing::warn!(error = %format!("{:#}", anyhow::Error::from(e)), "seeding conntrack failed; connections open before this start are judged as new")
        }
    }
}

/// The node's interfaces (name → index) and every address on them, from
/// one read.
fn interface_snapshot() -> (BTreeMap<String, u32>, BTreeSet<IpAddr>) {
    let all = node::interfaces();
    let addrs = all.values().flat_map(|(_, a)| a.iter().copied()).collect();
    let indexes = all.into_iter().map(|(n, (i, _))| (n, i)).collect();
    (indexes, addrs)
}

fn current_interfaces() -> BTreeMap<String, u32> {
    interface_snapshot().0
}

/// The daemon's state between reloads.
struct Agent {
    dp: Dataplane,
    policy_dir: PathBuf,
    node_name: String,
    /// Where `rules.json` goes for `filter-agent stats`.
    state_dir: PathBuf,
    /// The policy in force, re-applied when interfaces change.
    last_good: Option<Compiled>,
    last_ifaces: BTreeMap<String, u32>,
    /// The node addresses `FW_HOST1` holds.
    host_addrs: BTreeSet<IpAddr>,
    /// What one policy file may cost to read.
    limits: Limits,
    /// The file texts of the policy in force.
    texts: Texts,
    /// How long a reload may read, parse and compile.
    parse_timeout: Duration,
}

impl Agent {
    /// Keeps the kernel's list of node addresses current: what is
    /// host-bound changes with them.
    fn sync_host_addresses(&mut self, addrs: BTreeSet<IpAddr>) {
        if addrs == self.host_addrs {
            return;
        }
        match self.dp.set_host_addresses(&addrs) {
            Ok(()) => {
                tracing::info!(addresses = ?addrs, "node addresses");
                self.host_addrs = addrs;
            }
            Err(e) => {
                tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "updating the node addresses failed")
            }
        }
    }

    /// Pins again what someone removed from the pin directory.
    fn restore_pins(&mut self) {
        match self.dp.restore_pins() {
            Ok(restored) if restored.is_empty() => {}
            Ok(restored) => {
                tracing::warn!(pins = ?restored, "pins had been removed from the pin directory: re-pinned")
            }
            Err(e) => {
                tracing::error!(error = %format!("{:#}", anyhow::Error::from(e)), "pins were removed and could not be restored: the next agent cannot adopt this one's enforcement")
            }
        }
    }

    /// Removes expired conntrack entries and reports occupancy.
    fn sweep(&mut self) {
        match self.dp.sweep_conntrack() {
            Ok(s) => {
                let full = s.capacity > 0 && s.live as u64 * 10 >= u64::from(s.capacity) * 9;
                if full {
                    tracing::warn!(live = s.live, assured = s.assured, capacity = s.capacity, "conntrack table of new flows over 90% full: the oldest unassured flows are being evicted, assured ones are kept (raise --conntrack-size)");
                } else {
                    tracing::debug!(live = s.live, assured = s.assured, removed = s.removed, capacity = s.capacity, took = ?s.took, "conntrack swept");
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{:#}", anyhow::Error::from(e)), "conntrack sweep failed")
            }
        }
    }

    /// Loads, compiles and applies; on any error keeps the last good policy.
    /// Reading and compiling run on a blocking thread with a time limit, so
    /// the loop (signals, sweeper) is never held by a hostile file; a stop
    /// requested meanwhile abandons the reload.
    async fn reload(&mut self, stop: &mut tokio::sync::watch::Receiver<bool>) {
        let (dir, node, limits) = (self.policy_dir.clone(), self.node_name.clone(), self.limits);
        let in_force = self.texts.clone();
        let task =
            tokio::task::spawn_blocking(move || load_and_compile(&dir, &node, &limits, &in_force));
        let loaded = tokio::select! {
            r = task => r.unwrap_or_else(|e| Err(format!("loading the policy failed: {e}"))),
            _ = tokio::time::sleep(self.parse_timeout) => Err(format!(
                "reading and compiling the policy took longer than {:?} (--parse-timeout): given up",
                self.parse_timeout
            )),
            _ = stop.changed() => return,
        };
        self.settle(loaded);
    }

    /// Applies a loaded policy, or reports why it was rejected.
    fn settle(&mut self, loaded: Result<Loaded, String>) {
        let _span = tracing::info_span!("sync").entered();
        match loaded {
            Ok(Loaded {
                compiled,
                ifaces,
                texts,
            }) => {
                let rules: Vec<usize> = compiled.tables.iter().map(|t| t.rules.len()).collect();
                tracing::info!(
                    ?rules,
                    "compiled every stage (rules per table, untracked/pre-DNAT/normal/forward × ingress/egress)"
                );
                for e in compiled
                    .endpoints
                    .iter()
                    .filter(|e| !ifaces.contains_key(&e.iface))
                {
                    tracing::warn!(iface = %e.iface, hep = %e.hep, "interface of a host endpoint does not exist (yet)");
                }
                if self.apply(compiled, ifaces) {
                    self.texts = texts;
                }
            }
            Err(errors) => {
                for line in errors.lines() {
                    tracing::error!(error = %line, "invalid policy");
                }
                tracing::error!(
                    kept = self.last_good.is_some(),
                    "policy rejected; the last good policy stays enforced"
                );
                // Interfaces may still have changed: re-apply the last good one.
                let ifaces = current_interfaces();
                if ifaces != self.last_ifaces {
                    if let Some(good) = self.last_good.clone() {
                        let _ = self.apply(good, ifaces);
                    }
                }
            }
        }
    }

    /// Makes `compiled` live; on failure the previous policy stays.
    /// Returns whether it is live.
    fn apply(&mut self, compiled: Compiled, ifaces: BTreeMap<String, u32>) -> bool {
        // Before the tables: a host endpoint's first enforcement must know
        // which packets are for the node.
        self.sync_host_addresses(interface_snapshot().1);
        match self.dp.apply(&compiled, &ifaces) {
            Ok(generation) => {
                if let Err(e) = super::stats::write_state(
                    &self.state_dir,
                    &super::stats::state(&compiled, generation, &self.dp.attachments()),
                ) {
                    tracing::warn!(dir = %self.state_dir.display(), error = %e, "cannot write the rule index: stats will be unavailable");
                }
                let rules: usize = compiled.tables.iter().map(|t| t.rules.len()).sum();
                tracing::info!(
                    generation,
                    rules,
                    classes = compiled.classes.len(),
                    endpoints = ?self.dp.attachments(),
                    "policy applied"
                );
                self.last_good = Some(compiled);
                self.last_ifaces = ifaces;
                true
            }
            Err(e) => {
                let chain = anyhow::Error::from(e);
                tracing::error!(error = %format!("{chain:#}"), "applying the policy to the kernel failed");
                false
            }
        }
    }
}
