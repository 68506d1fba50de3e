//! `filter-agent explain`: what each stage does to one packet, and who
//! decided, from the reference evaluator.
//!
//! The JSON form (`--output json`) is one object, stable and documented in
//! docs/explain.md:
//! `{"verdict": "allow"|"deny", "stages": [{"stage", "verdict", "tier",
//! "policy", "rule", "kind"}], "logged": [{"tier", "policy", "rule",
//! "kind"}]}`.

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use clap::ValueEnum;
use serde_json::{json, Value};

use crate::{
    dataplane::{conntrack::Flow, live},
    model::{Protocol, Store},
    reference::{Direction, Explanation, Failsafe, Packet, Reference, Verdict, Who},
};

/// Text or JSON.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    /// Readable lines.
    Text,
    /// One JSON object.
    Json,
}

/// Direction as typed on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Dir {
    /// Arriving on the endpoint.
    Ingress,
    /// Leaving by the endpoint.
    Egress,
}

/// Arguments of `explain`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Directory of Calico v3 YAML.
    #[arg(long)]
    pub policy_dir: PathBuf,
    /// HostEndpoint name.
    #[arg(long)]
    pub endpoint: String,
    /// Direction relative to the endpoint.
    #[arg(long, value_enum)]
    pub direction: Dir,
    /// Protocol: tcp, udp, icmp, icmpv6, sctp, udplite (any case) or a
    /// number.
    #[arg(long)]
    pub proto: Protocol,
    /// Source address.
    #[arg(long)]
    pub src: IpAddr,
    /// Destination address (before DNAT).
    #[arg(long)]
    pub dst: IpAddr,
    /// Source port.
    #[arg(long)]
    pub sport: Option<u16>,
    /// Destination port.
    #[arg(long)]
    pub dport: Option<u16>,
    /// ICMP type.
    #[arg(long)]
    pub icmp_type: Option<u8>,
    /// ICMP code.
    #[arg(long)]
    pub icmp_code: Option<u8>,
    /// TCP flags, e.g. SYN or SYN,ACK (shown; conntrack state comes from
    /// --established).
    #[arg(long, value_delimiter = ',')]
    pub tcp_flags: Vec<String>,
    /// The packet belongs to a flow conntrack knows (ESTABLISHED/RELATED).
    #[arg(long)]
    pub established: bool,
    /// The packet is routed through the node, not to or from it.
    #[arg(long)]
    pub forwarded: bool,
    /// Where kube-proxy's DNAT sends the packet (IP:PORT).
    #[arg(long)]
    pub dnat_to: Option<std::net::SocketAddr>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Also send the packet through the kernel programs a running agent
    /// loaded (BPF_PROG_TEST_RUN on the live tables and conntrack) and show
    /// the kernel's verdict beside the reference's. Exit 3 when they differ.
    #[arg(long)]
    pub dataplane: bool,
    /// The running agent's pin directory (with --dataplane).
    #[arg(long, default_value = crate::dataplane::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// The endpoint's interface, when its HostEndpoint binds by expectedIPs
    /// (with --dataplane).
    #[arg(long)]
    pub interface: Option<String>,
}

/// Explains one packet; exit 2 when the input cannot be explained.
pub fn run(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let fail = |msg: String| {
        eprintln!("filter-agent explain: {msg}");
        Ok(ExitCode::from(2))
    };
    let store = match Store::load_dir(&args.policy_dir) {
        Ok(s) => s,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            return fail(format!(
                "{} error(s) in {}",
                errors.len(),
                args.policy_dir.display()
            ));
        }
    };
    let Some(hep) = store
        .host_endpoints
        .iter()
        .find(|h| h.meta.name == args.endpoint)
    else {
        return fail(format!(
            "no HostEndpoint named {:?} in {}",
            args.endpoint,
            args.policy_dir.display()
        ));
    };
    let proto = args.proto;
    if args.src.is_ipv4() != args.dst.is_ipv4() {
        return fail("--src and --dst must be of one IP family".into());
    }
    let ported = proto.supports_ports();
    let icmp = filter_common::proto::is_icmp(proto.0);
    if !ported && (args.sport.is_some() || args.dport.is_some()) {
        return fail(format!(
            "--sport/--dport need TCP, UDP or SCTP, not {proto}"
        ));
    }
    let packet = Packet {
        src: args.src,
        dst: args.dst,
        proto: proto.0,
        sport: if ported {
            Some(args.sport.unwrap_or(40000))
        } else {
            None
        },
        dport: if ported { args.dport } else { None },
        icmp: if icmp {
            Some((args.icmp_type.unwrap_or(8), args.icmp_code.unwrap_or(0)))
        } else {
            None
        },
        established: args.established,
        forwarded: args.forwarded,
        dnat_to: args.dnat_to,
    };
    if ported && packet.dport.is_none() {
        return fail(format!("--dport is needed for {proto}"));
    }
    let direction = match args.direction {
        Dir::Ingress => Direction::Ingress,
        Dir::Egress => Direction::Egress,
    };
    let failsafe = Failsafe::from_store(&store, &hep.spec.node);
    if !args.dataplane {
        let e = Reference::new(&store).explain(hep, direction, &packet, &failsafe);
        match args.output {
            Output::Json => println!("{}", to_json(&e)),
            Output::Text => print_text(&args, &hep.spec.interface_name, &e),
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(bad) = args.tcp_flags.iter().find(|f| {
        !["FIN", "SYN", "RST", "PSH", "ACK", "URG"].contains(&f.to_ascii_uppercase().as_str())
    }) {
        return fail(format!(
            "--tcp-flags {bad:?}: expected FIN, SYN, RST, PSH, ACK or URG"
        ));
    }
    let iface = args
        .interface
        .clone()
        .unwrap_or_else(|| hep.spec.interface_name.clone());
    if iface.is_empty() || iface == "*" {
        return fail(format!(
            "HostEndpoint {:?} names no single interface: pass --interface",
            args.endpoint
        ));
    }
    let Ok(ifindex) = nix::net::if_::if_nametoindex(iface.as_str()) else {
        return fail(format!("no interface {iface:?} in this network namespace"));
    };
    let mut packet = packet;
    let (e, kernel) = match through_kernel(&args, ifindex, &mut packet, |p| {
        Reference::new(&store).explain(hep, direction, p, &failsafe)
    }) {
        Ok(r) => r,
        Err(e) => return fail(format!("{:#}", anyhow::Error::from(e))),
    };
    let agree = (e.verdict == Verdict::Allow) == kernel.allowed;
    match args.output {
        Output::Json => {
            let mut j = to_json(&e);
            j["kernel"] = json!({
                "verdict": if kernel.allowed { "allow" } else { "deny" },
                "program": kernel.program,
                "return_code": kernel.return_code,
            });
            println!("{j}");
        }
        Output::Text => {
            print_text(&args, &iface, &e);
            println!(
                "kernel:  {} ({} returned {}){}",
                if kernel.allowed { "allow" } else { "deny" },
                kernel.program,
                kernel.return_code,
                if agree {
                    ""
                } else {
                    "  <- DIFFERS from the reference"
                }
            );
        }
    }
    Ok(if agree {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// Runs the packet through the live programs of `ifindex`. Conntrack is
/// the live table: the reference is told the flow is established when the
/// table says so; `--established` makes it so for this one packet. The
/// table entry is put back as it was afterwards.
fn through_kernel(
    args: &ExplainArgs,
    ifindex: u32,
    packet: &mut Packet,
    reference: impl Fn(&Packet) -> Explanation,
) -> Result<(Explanation, live::KernelVerdict), crate::dataplane::Error> {
    let mut kernel = live::Live::open(&args.pin_dir)?;
    let icmp = filter_common::proto::is_icmp(packet.proto);
    let echo_id = 1;
    let (sport, dport) = if icmp {
        (echo_id, echo_id)
    } else {
        (packet.sport.unwrap_or(0), packet.dport.unwrap_or(0))
    };
    let flow = Flow {
        src: packet.src,
        dst: packet.dst,
        proto: packet.proto,
        sport,
        dport,
    };
    // The packet as the forward stage sees it, after kube-proxy's DNAT.
    let translated = packet.dnat_to.map(|to| Flow {
        dst: to.ip(),
        dport: if icmp { dport } else { to.port() },
        ..flow
    });
    let before = kernel.flow_entry(&flow);
    let before_translated = translated.map(|t| kernel.flow_entry(&t));
    if args.established {
        kernel.establish_flow(&flow)?;
    }
    packet.established = args.established || before.is_some_and(|v| live::known(&flow, &v));
    let flags = if args.tcp_flags.is_empty() {
        0x02
    } else {
        tcp_flags(&args.tcp_flags)
    };
    let frame = live::frame(&flow, packet.icmp, flags);
    let after_dnat = match &translated {
        Some(t) => live::frame(t, packet.icmp, flags),
        None => frame.clone(),
    };
    let route = live::Route {
        ingress: matches!(args.direction, Dir::Ingress),
        forwarded: packet.forwarded,
        ifindex,
        other_ifindex: live::LOOPBACK,
    };
    let verdict = live::judge(&mut kernel, &frame, &after_dnat, route);
    // Leave the live table as it was, whatever the run did to it.
    kernel.restore_flow(&flow, before)?;
    if let (Some(t), Some(was)) = (translated, before_translated) {
        kernel.restore_flow(&t, was)?;
    }
    Ok((reference(packet), verdict?))
}

/// `SYN,ACK` → the TCP flags byte.
fn tcp_flags(names: &[String]) -> u8 {
    names.iter().fold(0, |acc, n| {
        acc | match n.to_ascii_uppercase().as_str() {
            "FIN" => 0x01,
            "SYN" => 0x02,
            "RST" => 0x04,
            "PSH" => 0x08,
            "ACK" => 0x10,
            "URG" => 0x20,
            _ => 0,
        }
    })
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::Continue => "continue",
        Verdict::NotEvaluated => "not-evaluated",
    }
}

/// `(kind, tier, policy, rule)` of who decided.
fn who_fields(w: Option<&Who>) -> (Value, Value, Value, Value) {
    match w {
        None => (Value::Null, Value::Null, Value::Null, Value::Null),
        Some(Who::Policy { tier, policy, rule }) => {
            (json!("policy"), json!(tier), json!(policy), json!(rule))
        }
        Some(Who::TierEnd { tier }) => (
            json!("tier-default-action"),
            json!(tier),
            Value::Null,
            Value::Null,
        ),
        Some(Who::Profile { profile, rule }) => {
            (json!("profile"), Value::Null, json!(profile), json!(rule))
        }
        Some(Who::NoProfileAllowed) => (
            json!("no-profile-allowed"),
            Value::Null,
            Value::Null,
            Value::Null,
        ),
        Some(Who::Failsafe) => (json!("failsafe"), Value::Null, Value::Null, Value::Null),
        Some(Who::Conntrack) => (json!("conntrack"), Value::Null, Value::Null, Value::Null),
        Some(Who::Default) => (json!("default"), Value::Null, Value::Null, Value::Null),
    }
}

/// The documented JSON form.
pub fn to_json(e: &Explanation) -> Value {
    let stages: Vec<Value> = e
        .stages
        .iter()
        .map(|s| {
            let (kind, tier, policy, rule) = who_fields(s.by.as_ref());
            json!({"stage": s.stage.name(), "verdict": verdict_name(s.verdict), "kind": kind, "tier": tier, "policy": policy, "rule": rule})
        })
        .collect();
    let logged: Vec<Value> = e
        .stages
        .iter()
        .flat_map(|s| s.logged.iter().map(move |w| (s.stage.name(), w)))
        .map(|(stage, w)| {
            let (kind, tier, policy, rule) = who_fields(Some(w));
            json!({"stage": stage, "kind": kind, "tier": tier, "policy": policy, "rule": rule})
        })
        .collect();
    json!({"verdict": verdict_name(e.verdict), "stages": stages, "logged": logged})
}

fn describe(w: Option<&Who>) -> String {
    match w {
        None => String::new(),
        Some(Who::Policy { tier, policy, rule }) => {
            format!("tier {tier}, policy {policy}, rule {rule}")
        }
        Some(Who::TierEnd { tier }) => {
            format!("tier {tier}: its policies applied, none decided (default action Deny)")
        }
        Some(Who::Profile { profile, rule }) => format!("profile {profile}, rule {rule}"),
        Some(Who::NoProfileAllowed) => {
            "no policy or profile allowed it (host endpoint default deny)".into()
        }
        Some(Who::Failsafe) => "failsafe port".into(),
        Some(Who::Conntrack) => "established flow (conntrack)".into(),
        Some(Who::Default) => {
            "no applyOnForward policy applies: forwarded traffic is allowed".into()
        }
    }
}

fn print_text(args: &ExplainArgs, iface: &str, e: &Explanation) {
    let port = |p: Option<u16>| p.map(|p| format!(":{p}")).unwrap_or_default();
    println!(
        "endpoint {} ({iface}) {:?} {} {}{} -> {}{}",
        args.endpoint,
        args.direction,
        args.proto,
        args.src,
        port(args.sport),
        args.dst,
        port(args.dport)
    );
    for s in &e.stages {
        println!(
            "  {:<10} {:<14} {}",
            s.stage.name(),
            verdict_name(s.verdict),
            describe(s.by.as_ref())
        );
        for l in &s.logged {
            println!("  {:<10} {:<14} {}", "", "logged", describe(Some(l)));
        }
    }
    println!("verdict: {}", verdict_name(e.verdict));
}
