//! Command line: `run` (the daemon), `check` (validate files), `selector`
//! (evaluate one selector) and `explain` (what the policy does to a packet).
//!
//! Exit codes: 0 success, 1 input rejected, 2 the tool failed.

mod check;
mod explain;
mod logs;
mod run;
mod selector;
mod stats;
mod status;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

use crate::dataplane;

pub use explain::{to_json as explain_json, ExplainArgs};
pub use run::config as run_config;
pub use selector::SelectorArgs;
pub use stats::StatsArgs;

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
    /// Enforce Calico policy (a directory, the Kubernetes API) on this node's host endpoints.
    Run(RunArgs),
    /// Validate policy files; print every error; exit 1 if any.
    Check(CheckArgs),
    /// Evaluate a Calico selector against labels; print true or false.
    Selector(SelectorArgs),
    /// Show what each stage of the policy does to one packet, and why.
    Explain(ExplainArgs),
    /// Per-rule packet and byte counters of the running agent.
    Stats(StatsArgs),
    /// What the running agent enforces: interfaces, capacity, conntrack,
    /// the last apply and the last refusal.
    Status(StatsArgs),
    /// The running agent's Log records (LOG lines or JSON).
    Logs(logs::LogsArgs),
}

/// `filter-agent run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Directory of Calico v3 YAML (watched; re-applied on change).
    #[arg(long, env = "FILTER_POLICY_DIR")]
    pub policy_dir: Option<PathBuf>,
    /// Take policy from the Kubernetes API with the pod's service account
    /// (Calico's custom resources, Namespaces, Services, this Node).
    #[arg(long, env = "FILTER_KUBE")]
    pub kube: bool,
    /// Take policy from the Kubernetes API through this kubeconfig file.
    #[arg(long, env = "FILTER_KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Create this node's host endpoint in memory as Calico's
    /// kube-controllers would (`<node>-auto-hep`, all interfaces, the
    /// Node's addresses and labels, profile projectcalico-default-allow),
    /// for clusters that have none.
    #[arg(long, env = "FILTER_AUTO_HOST_ENDPOINTS")]
    pub auto_host_endpoints: bool,
    /// Serve /healthz and /readyz on this address (off by default).
    #[arg(long, env = "FILTER_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Node name that picks this node's HostEndpoints [default: $NODE_NAME,
    /// then the hostname].
    #[arg(long)]
    pub node: Option<String>,
    /// bpffs directory where programs and maps are pinned.
    #[arg(long, env = "FILTER_PIN_DIR", default_value = dataplane::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Where the agent writes what `stats` needs [default:
    /// /run/filter-agent/<pin dir name>].
    #[arg(long, env = "FILTER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// On SIGTERM/SIGINT, detach the programs and remove the pins. Without
    /// it the programs stay attached and pinned (the node stays enforced)
    /// and the next agent adopts them.
    #[arg(long, env = "FILTER_DETACH_ON_EXIT")]
    pub detach_on_exit: bool,
    /// How often to look for interfaces that appeared or went.
    #[arg(
        long,
        env = "FILTER_INTERFACE_POLL",
        default_value = "2",
        value_name = "SECONDS"
    )]
    pub interface_poll: u64,
    /// Entries of the connection tracking table (an adopted table keeps
    /// its size).
    #[arg(long, env = "FILTER_CONNTRACK_SIZE", default_value_t = filter_common::ct::DEFAULT_SIZE, value_name = "ENTRIES")]
    pub conntrack_size: u32,
    /// Entries of each address table (IPv4 and IPv6, source and
    /// destination; host addresses and other prefixes each have one),
    /// shared by the live policy and the next: a policy may use half. The
    /// prefix tries allocate as entries come (adopted ones keep their
    /// size); the host-address maps are sized to the policy, up to this,
    /// and allocated whole (16 bytes per entry of capacity for IPv4, 96
    /// for IPv6, kernel memory charged to the agent's cgroup).
    #[arg(long, env = "FILTER_MAX_PREFIXES", default_value_t = filter_common::MAX_TRIE_ENTRIES, value_name = "ENTRIES", value_parser = clap::value_parser!(u32).range(2..))]
    pub max_prefixes: u32,
    /// How often the sweeper removes expired conntrack entries and reports
    /// occupancy.
    #[arg(
        long,
        env = "FILTER_CONNTRACK_SWEEP",
        default_value = "30",
        value_name = "SECONDS"
    )]
    pub conntrack_sweep: u64,
    /// Largest policy file read; a larger one is refused (the last good
    /// policy stays).
    #[arg(long, env = "FILTER_MAX_FILE_SIZE", default_value_t = crate::model::DEFAULT_MAX_FILE_BYTES, value_name = "BYTES")]
    pub max_file_size: u64,
    /// Longest a reload may take to read, parse and compile the policy
    /// before it is given up (the last good policy stays).
    #[arg(
        long,
        env = "FILTER_PARSE_TIMEOUT",
        default_value = "10",
        value_name = "SECONDS"
    )]
    pub parse_timeout: u64,
    /// A burst of changes is applied once, this long after the last of
    /// them.
    #[arg(
        long,
        env = "FILTER_DEBOUNCE",
        default_value = "150",
        value_name = "MILLISECONDS"
    )]
    pub debounce: u64,
    /// Log records per rule at most (`N/second`, `/minute`, `/hour`,
    /// `/day`), where FelixConfiguration's logActionRateLimit is unset.
    #[arg(
        long,
        env = "FILTER_LOG_RATE",
        default_value = "10/second",
        value_name = "RATE"
    )]
    pub log_rate: String,
    /// Log records a quiet rule may write at once, where
    /// FelixConfiguration's logActionRateLimitBurst is unset.
    #[arg(
        long,
        env = "FILTER_LOG_BURST",
        default_value = "5",
        value_name = "RECORDS"
    )]
    pub log_burst: u32,
    /// Size of the Log record ring buffer: a power of two from 4KiB to
    /// 1GiB (an adopted ring keeps its size). A full ring loses records,
    /// counted; each record takes 304 bytes.
    #[arg(
        long,
        env = "FILTER_LOG_RING_SIZE",
        default_value = "1MiB",
        value_name = "BYTES"
    )]
    pub log_ring_size: String,
    /// The kernel programs' own diagnostics (inconsistent tables, a map
    /// update the kernel refused), at most once a second per kind and CPU,
    /// in the agent's log under target filter_ebpf. Off: the verifier
    /// removes them from the programs.
    #[arg(
        long,
        env = "FILTER_KERNEL_LOG_LEVEL",
        value_enum,
        default_value = "off",
        value_name = "LEVEL"
    )]
    pub kernel_log_level: dataplane::KernelLogLevel,
    /// Also print a line (prefix `calico-drop: `) for every packet a rule
    /// drops.
    #[arg(long, env = "FILTER_LOG_DENIED")]
    pub log_denied: bool,
    /// Also send each LOG line to syslog (facility kern, level notice), as
    /// the kernel's LOG target does.
    #[arg(long, env = "FILTER_SYSLOG")]
    pub syslog: bool,
    /// The syslog socket.
    #[arg(
        long,
        env = "FILTER_SYSLOG_SOCKET",
        default_value = "/dev/log",
        value_name = "PATH"
    )]
    pub syslog_socket: PathBuf,
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
        Command::Check(args) => check::check(args),
        Command::Selector(args) => selector::run(args),
        Command::Explain(args) => explain::run(args),
        Command::Stats(args) => stats::run(args),
        Command::Status(args) => status::run(args),
        Command::Logs(args) => logs::run(args),
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(run::run_agent(args))
        }
    }
}
