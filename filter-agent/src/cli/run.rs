//! `filter-agent run`: flags and signals around [`crate::agent::run`].

use std::{process::ExitCode, time::Duration};

use tokio::signal::unix::{signal, SignalKind};

use crate::{
    agent::{self, Config, Status},
    dataplane,
    model::Limits,
    node,
    source::kube::Access,
};

use super::RunArgs;

/// The agent's configuration from the command line (and the FILTER_*
/// environment a ConfigMap sets). Checked here rather than by clap, so a
/// flag set to `false` in the environment counts as not given.
pub fn config(args: &RunArgs) -> anyhow::Result<Config> {
    let kube = match (&args.kubeconfig, args.kube) {
        (Some(_), true) => anyhow::bail!("give --kube or --kubeconfig, not both"),
        (Some(path), false) => Some(Access::Kubeconfig(path.clone())),
        (None, true) => Some(Access::InCluster),
        (None, false) => None,
    };
    if kube.is_none() && args.policy_dir.is_none() {
        anyhow::bail!("no policy source: give --policy-dir, --kube or --kubeconfig");
    }
    if kube.is_none() && args.auto_host_endpoints {
        anyhow::bail!("--auto-host-endpoints needs the Kubernetes API (--kube or --kubeconfig)");
    }
    Ok(Config {
        policy_dir: args.policy_dir.clone(),
        kube,
        auto_host_endpoints: args.auto_host_endpoints,
        node_name: node::node_name(args.node.as_deref()),
        pin_dir: args.pin_dir.clone(),
        state_dir: args
            .state_dir
            .clone()
            .unwrap_or_else(|| crate::state::default_state_dir(&args.pin_dir)),
        detach_on_exit: args.detach_on_exit,
        interface_poll: Duration::from_secs(args.interface_poll.max(1)),
        conntrack_sweep: Duration::from_secs(args.conntrack_sweep.max(1)),
        dataplane: dataplane::Options {
            conntrack_size: args.conntrack_size,
            log_ring_bytes: dataplane::ring_bytes(&args.log_ring_size)
                .map_err(|e| anyhow::anyhow!("--log-ring-size: {e}"))?,
            kernel_log: args.kernel_log_level,
            bench_skip: 0,
            prefix_capacity: args.max_prefixes,
            room: dataplane::Room::MIN,
            // Worked out from the policy before the programs load.
            start_room: None,
        },
        limits: Limits {
            max_file_bytes: args.max_file_size,
        },
        parse_timeout: Duration::from_secs(args.parse_timeout.max(1)),
        debounce: Duration::from_millis(args.debounce),
        status: Status::default(),
        metrics_addr: args.metrics_addr,
        log_rate: dataplane::Rate::parse(&args.log_rate, args.log_burst)
            .map_err(|e| anyhow::anyhow!("--log-rate: {e}"))?,
        log_denied: args.log_denied,
        syslog: args.syslog.then(|| args.syslog_socket.clone()),
    })
}

/// Runs until SIGTERM or SIGINT.
pub async fn run_agent(args: RunArgs) -> anyhow::Result<ExitCode> {
    // Signals end the agent even while a reload is under way (a policy
    // file that takes long to parse must not hold up SIGTERM).
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
        let _ = stop_tx.send(true);
    });
    agent::run(config(&args)?, stop).await?;
    Ok(ExitCode::SUCCESS)
}
