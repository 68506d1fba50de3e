//! `filter-agent run`: the daemon.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
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

/// The node's interfaces: name → (index, addresses). Endpoint binding (by
/// `expectedIPs`) and attachment depend on them: a policy is compiled for
/// one such snapshot.
type NodeInterfaces = BTreeMap<String, (u32, Vec<IpAddr>)>;

/// A policy read and compiled for this node.
struct Loaded {
    compiled: Compiled,
    /// The interfaces it was compiled for.
    seen: NodeInterfaces,
    /// The resources and file texts it was compiled from.
    store: Arc<Store>,
    texts: Texts,
}

/// Why a policy source was refused.
#[derive(Debug, thiserror::Error)]
enum Refused {
    /// Files that do not load or validate: every error, each naming file,
    /// line and field.
    #[error("{} invalid resource(s)", .0.len())]
    Invalid(Vec<crate::model::Error>),
    /// A resource this dataplane cannot enforce as Calico would.
    #[error(transparent)]
    Unsupported(#[from] compile::Error),
    /// Reading and compiling took longer than `--parse-timeout`.
    #[error("reading and compiling the policy took longer than {0:?} (--parse-timeout): given up")]
    TimedOut(Duration),
    /// The loading task itself failed (a panic: a bug).
    #[error("loading the policy failed: {0}")]
    Task(String),
}

impl Refused {
    /// One line per problem, for the log.
    fn lines(&self) -> Vec<String> {
        match self {
            Refused::Invalid(errors) => errors.iter().map(|e| e.to_string()).collect(),
            other => vec![other.to_string()],
        }
    }
}

/// What a reload found.
enum Outcome {
    /// A new policy, compiled.
    Loaded(Loaded),
    /// The policy source was refused. `recompiled`:
    /// the resources in force compiled again for the interfaces of now, as
    /// endpoint binding by expectedIPs and Service frontends depend on them.
    Rejected {
        why: Refused,
        recompiled: Option<Loaded>,
    },
}

/// Reads the directory and compiles it for the interfaces of now; when it
/// is refused, compiles the resources in force again instead if the
/// interfaces changed since (`in_force`: those resources and the interfaces
/// they were compiled for).
fn load(
    dir: &Path,
    node_name: &str,
    limits: &Limits,
    texts: &Texts,
    in_force: Option<(Arc<Store>, NodeInterfaces)>,
) -> Outcome {
    // One read of the interfaces serves both.
    let ifaces = node::interfaces();
    match load_and_compile(dir, node_name, &ifaces, limits, texts) {
        Ok(l) => Outcome::Loaded(l),
        Err(why) => Outcome::Rejected {
            why,
            recompiled: in_force
                .filter(|(_, compiled_for)| *compiled_for != ifaces)
                .and_then(|(store, _)| {
                    compile_for_node(store, node_name, ifaces, texts.clone())
                        .inspect_err(|e| tracing::error!(error = %e, "the resources in force do not compile for this node's interfaces of now"))
                        .ok()
                }),
        },
    }
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
    ifaces: &NodeInterfaces,
    limits: &Limits,
    in_force: &Texts,
) -> Result<Loaded, Refused> {
    let mut texts = crate::model::read_dir_texts(dir, limits).map_err(Refused::Invalid)?;
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
    let store = Store::from_texts(&texts).map_err(Refused::Invalid)?;
    compile_for_node(
        Arc::new(store),
        node_name,
        ifaces.clone(),
        texts.into_iter().collect(),
    )
}

/// Compiles `store` for this node and its interfaces `ifaces`.
fn compile_for_node(
    store: Arc<Store>,
    node_name: &str,
    ifaces: NodeInterfaces,
    texts: Texts,
) -> Result<Loaded, Refused> {
    // Said once per agent: the same files are reloaded on every change.
    static WARNED: std::sync::Once = std::sync::Once::new();
    if !store.network_policies.is_empty() {
        WARNED.call_once(|| tracing::warn!(
            count = store.network_policies.len(),
            "NetworkPolicy resources select pods, never host endpoints: loaded and validated, not enforced here"
        ));
    }
    let cnode = compile::Node {
        name: node_name.to_owned(),
        interfaces: ifaces
            .iter()
            .map(|(n, (_, a))| (n.clone(), a.clone()))
            .collect(),
    };
    let compiled = compile::compile(&store, &cnode)?;
    Ok(Loaded {
        compiled,
        seen: ifaces,
        store,
        texts,
    })
}

/// Runs until SIGTERM or SIGINT.
pub async fn run_agent(args: RunArgs) -> anyhow::Result<ExitCode> {
    let node_name = node::node_name(args.node.as_deref());
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| crate::state::default_state_dir(&args.pin_dir));
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
        store: None,
        compiled_for: NodeInterfaces::new(),
        host_addrs: BTreeSet::new(),
        limits: Limits {
            max_file_bytes: args.max_file_size,
        },
        texts: Texts::new(),
        parse_timeout: Duration::from_secs(args.parse_timeout.max(1)),
    };
    agent.reload(&mut stop).await;
    // Editors write in several steps: a burst of changes is one reload,
    // DEBOUNCE after the last of them (a deadline, not a sleep, so the loop
    // keeps answering meanwhile).
    const DEBOUNCE: Duration = Duration::from_millis(150);
    let mut settle_at: Option<tokio::time::Instant> = None;
    while !*stop.borrow() {
        let due = settle_at;
        tokio::select! {
            Some(()) = changes.recv() => {
                settle_at = Some(tokio::time::Instant::now() + DEBOUNCE);
            }
            _ = async { tokio::time::sleep_until(due.expect("guarded")).await }, if due.is_some() => {
                settle_at = None;
                agent.reload(&mut stop).await;
            }
            _ = poll.tick() => {
                agent.restore_pins();
                if watch.refresh() {
                    tracing::warn!(dir = %args.policy_dir.display(), "the policy directory was replaced: watching the new one");
                }
                // One read of the interfaces serves both checks. A new
                // interface or address can bind an endpoint (by
                // expectedIPs): compile again.
                let now = node::interfaces();
                if now != agent.compiled_for {
                    tracing::debug!("interfaces or their addresses changed");
                    agent.reload(&mut stop).await;
                } else {
                    agent.sync_host_addresses(addresses(&now));
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

/// Every address of the node's interfaces.
fn addresses(ifaces: &NodeInterfaces) -> BTreeSet<IpAddr> {
    ifaces
        .values()
        .flat_map(|(_, a)| a.iter().copied())
        .collect()
}

/// The daemon's state between reloads.
struct Agent {
    dp: Dataplane,
    policy_dir: PathBuf,
    node_name: String,
    /// Where `rules.json` goes for `filter-agent stats`.
    state_dir: PathBuf,
    /// The resources in force, compiled again when the interfaces change
    /// while the policy source is refused.
    store: Option<Arc<Store>>,
    /// The interfaces the policy in force was compiled for.
    compiled_for: NodeInterfaces,
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
        let texts = self.texts.clone();
        let in_force = self.store.clone().map(|s| (s, self.compiled_for.clone()));
        let task =
            tokio::task::spawn_blocking(move || load(&dir, &node, &limits, &texts, in_force));
        let rejected = |why: Refused| Outcome::Rejected {
            why,
            recompiled: None,
        };
        let outcome = tokio::select! {
            r = task => r.unwrap_or_else(|e| rejected(Refused::Task(e.to_string()))),
            _ = tokio::time::sleep(self.parse_timeout) => rejected(Refused::TimedOut(self.parse_timeout)),
            _ = stop.changed() => return,
        };
        self.settle(outcome);
    }

    /// Applies a loaded policy, or reports why it was rejected.
    fn settle(&mut self, outcome: Outcome) {
        let _span = tracing::info_span!("sync").entered();
        match outcome {
            Outcome::Loaded(Loaded {
                compiled,
                seen,
                store,
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
                    .filter(|e| !seen.contains_key(&e.iface))
                {
                    tracing::warn!(iface = %e.iface, hep = %e.hep, "interface of a host endpoint does not exist (yet)");
                }
                if self.apply(compiled, seen) {
                    self.texts = texts;
                    self.store = Some(store);
                }
            }
            Outcome::Rejected { why, recompiled } => {
                for line in why.lines() {
                    tracing::error!(error = %line, "invalid policy");
                }
                tracing::error!(
                    kept = self.store.is_some(),
                    "policy rejected; the last good policy stays enforced"
                );
                // The interfaces changed meanwhile: the resources in force,
                // compiled for them.
                if let Some(l) = recompiled {
                    let _ = self.apply(l.compiled, l.seen);
                }
            }
        }
    }

    /// Makes `compiled` live; on failure the previous policy stays.
    /// Returns whether it is live.
    fn apply(&mut self, compiled: Compiled, seen: NodeInterfaces) -> bool {
        // Before the tables: a host endpoint's first enforcement must know
        // which packets are for the node.
        self.sync_host_addresses(addresses(&seen));
        let ifaces = seen.iter().map(|(n, (i, _))| (n.clone(), *i)).collect();
        match self.dp.apply(&compiled, &ifaces) {
            Ok(generation) => {
                if let Err(e) = crate::state::write_state(
                    &self.state_dir,
                    &crate::state::state(&compiled, generation, &self.dp.attachments()),
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
                self.compiled_for = seen;
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
