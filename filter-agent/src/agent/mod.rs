//! The agent: one loop that keeps this node's enforcement equal to its
//! policy sources (a watched directory, the Kubernetes API), survives bad
//! input by keeping the last good policy, polls interfaces, sweeps
//! conntrack and says when it is ready. The binary only parses flags and
//! signals; tests run the same [`run`].

mod load;
mod metrics;
mod record;
mod serve;

pub use metrics::Metrics;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use tokio::sync::watch;

use crate::{
    compile::Compiled,
    dataplane::{self, Dataplane},
    model::{Limits, Store},
    node,
};

use load::{load, Inputs, Loaded, NodeInterfaces, Outcome, Refused, Texts, Took};

use crate::events::reader::{self, SharedNames};
use crate::source::{
    kube::{self, Access, Kube},
    DirWatch,
};

/// What the agent enforces and how.
#[derive(Debug, Clone)]
pub struct Config {
    /// The watched policy directory, if there is one.
    pub policy_dir: Option<PathBuf>,
    /// The Kubernetes API, if it is a source.
    pub kube: Option<Access>,
    /// Create this node's host endpoint as Calico's kube-controllers would
    /// (Kubernetes source only).
    pub auto_host_endpoints: bool,
    /// This node's name (picks its host endpoints).
    pub node_name: String,
    /// bpffs directory of the pins.
    pub pin_dir: PathBuf,
    /// Where `rules.json` goes for `filter-agent stats`.
    pub state_dir: PathBuf,
    /// On shutdown, detach and unpin instead of leaving enforcement on.
    pub detach_on_exit: bool,
    /// How often interfaces and pins are checked.
    pub interface_poll: Duration,
    /// How often conntrack is swept.
    pub conntrack_sweep: Duration,
    /// Kernel map options (conntrack size).
    pub dataplane: dataplane::Options,
    /// What one policy file may cost to read.
    pub limits: Limits,
    /// How long a reload may read, parse and compile.
    pub parse_timeout: Duration,
    /// A burst of changes is one reload this long after the last of them.
    pub debounce: Duration,
    /// What the agent tells probes and tests.
    pub status: Status,
    /// Where `/healthz` and `/readyz` are served, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Log rules' record rate per rule, where FelixConfiguration sets none.
    pub log_rate: dataplane::Rate,
    /// Write a record for every dropped packet too.
    pub log_denied: bool,
    /// Send each LOG line to this syslog socket too.
    pub syslog: Option<PathBuf>,
}

/// What the running agent tells the world: readiness (a policy is
/// enforced), for the readiness probe and for tests. Clones share it.
#[derive(Debug, Clone)]
pub struct Status {
    ready: Arc<watch::Sender<bool>>,
    live: Arc<std::sync::Mutex<Liveness>>,
    /// What `/metrics` serves.
    pub metrics: Metrics,
}

#[derive(Debug, Clone, Copy)]
struct Liveness {
    /// When the loop last went round.
    beat: std::time::Instant,
    /// Since when a policy source has been unreachable.
    stale_since: Option<std::time::SystemTime>,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            ready: Arc::new(watch::channel(false).0),
            live: Arc::new(std::sync::Mutex::new(Liveness {
                beat: std::time::Instant::now(),
                stale_since: None,
            })),
            metrics: Metrics::default(),
        }
    }
}

impl Status {
    /// Whether this agent has applied a policy (a previous agent's
    /// adopted enforcement alone does not count: a policy this agent
    /// refuses must hold a rolling update back).
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the agent is ready.
    pub async fn ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// How long ago the agent's loop last went round (a loop that stops
    /// going round is a hung agent: the liveness probe restarts it).
    pub fn since_beat(&self) -> Duration {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .beat
            .elapsed()
    }

    /// Since when a policy source (the Kubernetes API) has been
    /// unreachable; meanwhile the last good policy stays enforced.
    pub fn stale_since(&self) -> Option<std::time::SystemTime> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stale_since
    }

    fn beat(&self, stale_since: Option<std::time::SystemTime>) {
        self.metrics.source_stale(stale_since);
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.beat = std::time::Instant::now();
        live.stale_since = stale_since;
    }

    fn set_ready(&self) {
        self.ready.send_if_modified(|r| !std::mem::replace(r, true));
    }
}

/// The room for the sized maps of the first policy, if it loads within
/// `--parse-timeout`: a first start whose policy outgrows the least room
/// then loads its programs once, not again at its first publish (seconds,
/// the verifier's). With the Kubernetes API as a source, that policy is
/// the policy directory's and the API's first list of every kind, waited
/// for within the same time: until it is complete the agent publishes
/// nothing anyway (`Agent::reload`), so loading the programs later costs
/// no enforcement. A policy that does not load, or a list that does not
/// come in time, leaves the least room, and the first reload to report or
/// to move the maps.
async fn start_room(
    config: &Config,
    memo: &Arc<Mutex<load::Memo>>,
    kube: Option<(&Kube, &mut Changes)>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<dataplane::Room> {
    let deadline = tokio::time::Instant::now() + config.parse_timeout;
    let resources = match kube {
        Some((kube, changes)) => {
            let objects = first_list(kube, changes, deadline, shutdown).await?;
            let options = kube::Options {
                node: config.node_name.clone(),
                auto_host_endpoints: config.auto_host_endpoints,
            };
            Some((
                kube::to_resources(&objects, &options),
                kube::namespaces(&objects),
            ))
        }
        None => None,
    };
    if config.policy_dir.is_none() && resources.is_none() {
        return None;
    }
    let inputs = Inputs {
        dir: config.policy_dir.clone(),
        node_name: config.node_name.clone(),
        limits: config.limits,
        kube: resources,
        memo: memo.clone(),
    };
    let task = tokio::task::spawn_blocking(move || load(&inputs, &Texts::new(), None));
    let Ok(Ok(Outcome::Loaded(l))) = tokio::time::timeout_at(deadline, task).await else {
        return None;
    };
    let room = dataplane::room_for(&l.compiled, &indexes(&l.seen), &config.dataplane).ok()?;
    (room != config.dataplane.room).then(|| {
        tracing::info!(
            ?room,
            bytes = room.bytes(),
            "classifier maps sized to the policy before loading the programs"
        );
        room
    })
}

/// The wake-ups of the agent's loop: every source sends `()` on a change.
type Changes = tokio::sync::mpsc::UnboundedReceiver<()>;

/// The Kubernetes API's first list of every kind, if it comes before
/// `deadline` (and no stop is asked for). Consumes the wake-ups on the way:
/// the first reload reads the watches' state whatever they said.
async fn first_list(
    kube: &Kube,
    changes: &mut Changes,
    deadline: tokio::time::Instant,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Vec<kube::Object>> {
    loop {
        if let Some(objects) = kube.snapshot() {
            return Some(objects);
        }
        tokio::select! {
            woke = changes.recv() => woke?,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!("no first list from the Kubernetes API within --parse-timeout: the programs load with the least room, and the first policy may move their maps");
                return None;
            }
            _ = shutdown.changed() => return None,
        }
    }
}

/// Runs the agent until `shutdown` turns true (or its sender goes).
pub async fn run(config: Config, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    tracing::info!(node = %config.node_name, policy_dir = ?config.policy_dir, kube = ?config.kube, pin_dir = %config.pin_dir.display(), "starting");
    // A kubeconfig that cannot be used stops the agent before it touches
    // the kernel.
    let client = match &config.kube {
        Some(access) => Some(kube::client(access).await?),
        None => None,
    };
    let adopting = config
        .pin_dir
        .join(filter_common::names::MAP_GENERATION)
        .exists();
    // The first load's work, which its first reload takes over.
    let memo: Arc<Mutex<load::Memo>> = Default::default();
    // Every source wakes the loop through one channel. The watches start
    // before the programs load: a first start sizes the maps to their
    // first list.
    let (changed, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let kube = client.map(|c| Kube::start(c, &config.node_name, changed.clone()));
    let mut options = config.dataplane;
    if !adopting {
        let kube = kube.as_ref().map(|k| (k, &mut changes));
        options.start_room = start_room(&config, &memo, kube, &mut shutdown).await;
    }
    let mut dp =
        Dataplane::load_with(&config.pin_dir, &options).context("load the kernel programs")?;
    if !adopting {
        seed_conntrack(&mut dp);
    }
    // Log records: read as they come, printed as the kernel's LOG line.
    let names = SharedNames::default();
    let ring = dp
        .take_events()
        .context("open the Log record ring buffer")?;
    let hub = Arc::new(crate::events::stream::Hub::default());
    {
        let (names, hub, stop) = (names.clone(), hub.clone(), shutdown.clone());
        let syslog = config.syslog.clone();
        tokio::spawn(async move {
            if let Err(e) = reader::run(ring, names, hub, syslog, stop).await {
                tracing::error!(error = %e, "the Log record reader stopped");
            }
        });
    }
    {
        let (dir, stop) = (config.state_dir.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::events::stream::serve(dir.clone(), hub, stop).await {
                tracing::error!(dir = %dir.display(), error = %e, "cannot serve filter-agent logs");
            }
        });
    }
    if config.dataplane.kernel_log != dataplane::KernelLogLevel::Off {
        let logger = dp
            .take_kernel_log(crate::events::diag::ToTracing)
            .context("open the kernel programs' diagnostics")?;
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::events::diag::run(logger, stop).await {
                tracing::error!(error = %e, "the kernel diagnostics reader stopped");
            }
        });
    }
    if let Some(addr) = config.metrics_addr {
        // The loop goes round at least every interface poll; ten missed
        // rounds (at least a minute) is a hung agent.
        let hung = (config.interface_poll * 10).max(Duration::from_secs(60));
        let (status, stop, pins) = (
            config.status.clone(),
            shutdown.clone(),
            config.pin_dir.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = serve::serve(addr, status, hung, pins, stop).await {
                tracing::error!(%addr, error = %e, "cannot serve the probes");
            }
        });
    }
    let mut watch = match &config.policy_dir {
        Some(dir) => Some(
            crate::source::watch(dir, changed.clone())
                .with_context(|| format!("watch {}", dir.display()))?,
        ),
        None => None,
    };
    drop(changed);
    let mut poll = tokio::time::interval(config.interface_poll.max(Duration::from_millis(100)));
    let mut sweep = tokio::time::interval(config.conntrack_sweep.max(Duration::from_secs(1)));
    let mut agent = Agent {
        dp,
        inputs: Inputs {
            dir: config.policy_dir.clone(),
            node_name: config.node_name.clone(),
            limits: config.limits,
            kube: None,
            memo,
        },
        kube,
        kube_options: kube::Options {
            node: config.node_name.clone(),
            auto_host_endpoints: config.auto_host_endpoints,
        },
        state_dir: config.state_dir.clone(),
        store: None,
        compiled_for: NodeInterfaces::new(),
        refused_for: None,
        host_addrs: BTreeSet::new(),
        texts: Texts::new(),
        parse_timeout: config.parse_timeout,
        status: config.status.clone(),
        said_waiting: false,
        reload_started: std::time::Instant::now(),
        took: Took::default(),
        recorder: record::Recorder::start(config.state_dir.clone(), names, config.status.clone())
            .context("start the thread that writes the rule index")?,
        log_rate: config.log_rate,
        log_denied: config.log_denied,
    };
    agent.reload(&mut shutdown).await;
    // Editors write in several steps: a burst of changes is one reload,
    // `debounce` after the last of them (a deadline, not a sleep, so the
    // loop keeps answering meanwhile).
    let mut settle_at: Option<tokio::time::Instant> = None;
    while !*shutdown.borrow() {
        let due = settle_at;
        tokio::select! {
            Some(()) = changes.recv() => {
                settle_at = Some(tokio::time::Instant::now() + config.debounce);
            }
            _ = async { tokio::time::sleep_until(due.expect("guarded")).await }, if due.is_some() => {
                settle_at = None;
                agent.reload(&mut shutdown).await;
            }
            _ = poll.tick() => {
                agent.restore_pins();
                agent.status.beat(agent.kube.as_ref().and_then(Kube::stale_since));
                if watch.as_mut().is_some_and(DirWatch::refresh) {
                    tracing::warn!(dir = ?config.policy_dir, "the policy directory was replaced: watching the new one");
                }
                // One read of the interfaces serves both checks. A new
                // interface or address can bind an endpoint (by
                // expectedIPs): compile again.
                let now = node::interfaces();
                if now != agent.compiled_for && agent.refused_for.as_ref() != Some(&now) {
                    tracing::debug!("interfaces or their addresses changed");
                    agent.reload(&mut shutdown).await;
                } else {
                    agent.sync_host_addresses(addresses(&now));
                }
            }
            _ = sweep.tick() => agent.sweep(),
            r = shutdown.changed() => if r.is_err() { break },
        }
    }
    // The books of the last reload are written before anything is removed.
    agent.recorder.finish();
    if config.detach_on_exit {
        tracing::info!("stopping: detaching programs and removing pins");
        let _ = std::fs::remove_dir_all(&agent.state_dir);
        agent.dp.shutdown().context("detach and unpin")?;
    } else {
        agent.dp.leave();
    }
    Ok(())
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

/// The node's interfaces by name, as the dataplane takes them: their
/// indexes.
fn indexes(ifaces: &NodeInterfaces) -> dataplane::Interfaces {
    ifaces.iter().map(|(n, (i, _))| (n.clone(), *i)).collect()
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
    /// What a reload reads (the Kubernetes part filled in at each reload).
    inputs: Inputs,
    /// The Kubernetes watches, if the API is a source.
    kube: Option<Kube>,
    kube_options: kube::Options,
    /// Where `rules.json` goes for `filter-agent stats`.
    state_dir: PathBuf,
    /// The resources in force, compiled again when the interfaces change
    /// while the policy source is refused.
    store: Option<Arc<Store>>,
    /// The interfaces the policy in force was compiled for.
    compiled_for: NodeInterfaces,
    /// The interfaces the sources were last refused for: the interface
    /// poll compiles again only when the interfaces differ from these too,
    /// not every poll (each would log the same refusal again).
    refused_for: Option<NodeInterfaces>,
    /// The node addresses `FW_HOST1` holds.
    host_addrs: BTreeSet<IpAddr>,
    /// The file texts of the policy in force.
    texts: Texts,
    /// How long a reload may read, parse and compile.
    parse_timeout: Duration,
    /// Readiness.
    status: Status,
    /// Writes down what each reload did (`rules.json`, names, metrics).
    recorder: record::Recorder,
    /// See [`Config::log_rate`].
    log_rate: dataplane::Rate,
    /// See [`Config::log_denied`].
    log_denied: bool,
    /// When the reload under way started (for `/metrics`).
    reload_started: std::time::Instant,
    /// Where the last load's time went.
    took: Took,
    /// "Waiting for the first list" was logged.
    said_waiting: bool,
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
                self.status
                    .metrics
                    .conntrack(s.live as u64, u64::from(s.capacity));
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
        self.reload_started = std::time::Instant::now();
        let mut inputs = self.inputs.clone();
        if let Some(kube) = &self.kube {
            let Some(objects) = kube.snapshot() else {
                if !std::mem::replace(&mut self.said_waiting, true) {
                    tracing::info!("waiting for the Kubernetes API's first list of every kind");
                }
                return;
            };
            inputs.kube = Some((
                kube::to_resources(&objects, &self.kube_options),
                kube::namespaces(&objects),
            ));
        }
        let texts = self.texts.clone();
        let in_force = self.store.clone().map(|s| (s, self.compiled_for.clone()));
        let task = tokio::task::spawn_blocking(move || load(&inputs, &texts, in_force));
        let rejected = |why: Refused| Outcome::Rejected {
            why,
            recompiled: None,
            tried_for: None,
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
                took,
            }) => {
                self.took = took;
                self.refused_for = None;
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
                if self.apply(compiled, seen, &store) {
                    self.texts = texts;
                    self.store = Some(store);
                }
            }
            Outcome::Rejected {
                why,
                recompiled,
                tried_for,
            } => {
                self.refused_for = tried_for;
                for line in why.lines() {
                    tracing::error!(error = %line, "invalid policy");
                }
                let lines = why.lines();
                let message = lines.first().cloned().map(|first| match lines.len() {
                    1 => first,
                    n => format!("{first} (and {} more)", n - 1),
                });
                self.recorder.refused(record::Refused {
                    took: self.reload_started.elapsed().as_secs_f64(),
                    message,
                });
                // The interfaces changed meanwhile: the resources in force,
                // compiled for them.
                if let Some(l) = recompiled {
                    self.took = l.took;
                    let _ = self.apply(l.compiled, l.seen, &l.store);
                }
            }
        }
    }

    /// The kernel's Log settings for the policy just applied:
    /// FelixConfiguration's `logActionRateLimit` and
    /// `logActionRateLimitBurst` where set. Returns its `logPrefix`, for
    /// the record reader.
    fn log_settings(&mut self, store: &Store) -> Option<String> {
        use crate::model::defaults::felix_setting;
        let node = &self.inputs.node_name;
        let prefix = felix_setting(store, node, |f| f.log_prefix.clone());
        let burst = felix_setting(store, node, |f| {
            f.other
                .get("logActionRateLimitBurst")
                .and_then(|v| v.as_u64())
        })
        .map_or(self.log_rate.burst, |b| b as u32);
        let rate = match felix_setting(store, node, |f| {
            f.other
                .get("logActionRateLimit")
                .and_then(|v| v.as_str().map(str::to_owned))
        }) {
            // Validated already: a bad one never reaches here.
            Some(text) => dataplane::Rate::parse(&text, burst).unwrap_or(self.log_rate),
            None => dataplane::Rate {
                burst,
                ..self.log_rate
            },
        };
        if let Err(e) = self.dp.set_log_config(rate, self.log_denied) {
            tracing::warn!(error = %format!("{:#}", anyhow::Error::from(e)), "cannot set the Log record rate");
        }
        prefix
    }

    /// Makes `compiled` live; on failure the previous policy stays.
    /// Returns whether it is live.
    fn apply(&mut self, compiled: Compiled, seen: NodeInterfaces, store: &Store) -> bool {
        // Before the tables: a host endpoint's first enforcement must know
        // which packets are for the node.
        self.sync_host_addresses(addresses(&seen));
        let ifaces = indexes(&seen);
        match self.dp.apply(&compiled, &ifaces) {
            Ok(generation) => {
                // Enforced from the flip; attaching new interfaces comes
                // after.
                let times = self.dp.last_publish();
                let took = times
                    .enforced
                    .saturating_duration_since(self.reload_started)
                    .as_secs_f64();
                let prefix = self.log_settings(store);
                self.recorder.applied(record::Applied {
                    attachments: self.dp.attachments(),
                    compiled,
                    generation,
                    prefix,
                    took,
                    load: self.took,
                    written: times.to_enforce,
                    changed: times.changed,
                });
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
