//! Kernel programs of the host-endpoint firewall: entry points and the
//! pipeline of docs/semantics.md 3.9, hook by hook (docs/design.md, "Kernel
//! side: where each program runs").
//!
//! * `fw_xdp` (XDP, host-endpoint ingress): raw failsafe, untracked
//!   ingress stage, conntrack (read only), mangle failsafe, pre-DNAT stage
//!   for new flows. A Deny drops the frame at the driver; the verdict goes
//!   to TC in the metadata area.
//! * `fw_tc_in` (TC ingress, host endpoints): conntrack, then for
//!   host-bound packets failsafe, the normal ingress stage with profiles,
//!   and a conntrack entry for allowed new flows. Forwarded packets pass
//!   on to the forward stage. Without XDP metadata (XDP could not run or
//!   write it) it runs XDP's stages itself first, and their conntrack
//!   lookup, which then records the packet, is its own.
//! * `fw_tc_eg` (TC egress): host-originated packets meet the untracked
//!   egress stage, conntrack, failsafe and the normal egress stage;
//!   forwarded ones conntrack and the forward stage (ingress rules of the
//!   incoming endpoint, egress rules of the outgoing one).
//!
//! Each entry point calls a `try_` function returning the action and the
//! reason it is counted under; one exit path counts it.
#![no_std]
#![no_main]
#![expect(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "aya's #[classifier] expansion hands the kernel's raw __sk_buff pointer to a safe fn"
)]

mod classify;
mod conntrack;
mod counters;
mod diag;
mod events;
mod failsafe;
mod fragments;
mod host;
mod parse;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use conntrack::{Hook, Known};
use filter_common::{action, direction, mark, reason, stage, xdp_verdict, XdpMeta, XDP_META_MAGIC};
use parse::Packet;

/// What one stage said.
enum Verdict {
    Allow,
    Deny,
    /// No rule decided; the reason is counted if nothing later decides.
    Continue(u32),
}

/// Runs one stage and counts the deciding rule; the packet remembers
/// whether the stage left Log records to write (and a drop's, with
/// `--log-denied`).
#[inline(always)]
fn run_stage(stage: u32, dir: u32, ifindex: u32, pkt: &Packet, bytes: u64) -> Verdict {
    let (result, logged) = classify::classify(stage, dir, ifindex, pkt);
    if !cfg!(feature = "bench-no-log") {
        pkt.add_log_pending(logged);
    }
    match result {
        Ok(d) => {
            counters::count_rule(d.slot, bytes);
            if d.action == action::DENY {
                if !cfg!(feature = "bench-no-log") {
                    events::denied(pkt, d.slot, stage, dir);
                }
                Verdict::Deny
            } else {
                Verdict::Allow
            }
        }
        Err(why) => {
            if why == reason::PASS_TABLE_ERROR {
                diag::fw_diag_tables(stage, dir);
            }
            Verdict::Continue(why)
        }
    }
}

/// A reason already counted (the program hands over to its logger):
/// outside `FW_STATS2`, so counting it again does nothing.
const COUNTED: u32 = u32::MAX;

/// Ends a program whose packet left Log records: counts the reason and
/// hands the verdict to the logger (see `events`).
#[inline(always)]
fn finish<C: events::Hook>(
    ctx: &C,
    pkt: &Packet,
    origin: impl FnOnce() -> (u8, u32, u32, u32),
    (verdict, why): (u32, u32),
) -> (u32, u32) {
    if cfg!(feature = "bench-no-log") || !pkt.log_pending() {
        return (verdict, why);
    }
    counters::count_reason(why);
    let (hook, in_if, out_if, len) = origin();
    let v = events::finish(
        ctx,
        ((hook as u64) << 32) | in_if as u64,
        ((out_if as u64) << 32) | len as u64,
        verdict,
    );
    (v, COUNTED)
}

/// The outcome of the stages before conntrack's entry point: XDP's work.
enum Early {
    /// The interface has no rules in XDP's stages: nothing ran, and TC can
    /// tell as much from the one lookup that told XDP (so XDP leaves it
    /// no metadata: writing it cost about 9 ns).
    NoStages,
    Drop,
    /// An `xdp_verdict` for TC, the reason to count if nothing later
    /// decides, and whether conntrack was asked on the way (and, unless
    /// the hook only peeks, recorded the packet).
    Pass(u32, u32, bool),
}

/// `cargo xtask bench`'s component profile (`filter_common::bench_skip`):
/// read-only data the loader sets; 0 outside the benchmark, where the
/// verifier removes every branch that reads it.
#[unsafe(no_mangle)]
static FW_BENCH_SKIP: aya_ebpf::Global<u32> = aya_ebpf::Global::new(0);

/// Whether the benchmark switched `part` off.
#[inline(always)]
pub(crate) fn skipped(part: u32) -> bool {
    FW_BENCH_SKIP.load() & part != 0
}

/// Raw failsafe, untracked ingress, conntrack, mangle failsafe, pre-DNAT:
/// everything 3.9 does before DNAT. `hook`: XDP peeks; TC ingress,
/// running these stages where XDP did not, records the packet in the one
/// lookup (as netfilter's conntrack does before the mangle table's
/// pre-DNAT rules see it), so it does not look the flow up twice.
#[inline(always)]
fn early_ingress(ifindex: u32, pkt: &Packet, bytes: u64, hook: Hook) -> Early {
    use filter_common::bench_skip as skip;
    // Failsafe and conntrack only decide which of XDP's two stages see the
    // packet: an endpoint with rules in neither (the most common case)
    // needs neither; one lookup says. (Broken tables have every bit: the
    // stages run and say so.)
    let tables = classify::tables_of(ifindex);
    let has = |stage| tables & filter_common::table_bit(stage, direction::INGRESS) != 0;
    let untracked = has(stage::UNTRACKED);
    let pre_dnat = has(stage::PRE_DNAT);
    if !untracked && !pre_dnat {
        return Early::NoStages;
    }
    // The failsafe lists decide whether the untracked stage sees the
    // packet, and for a new flow whether pre-DNAT rules do: without an
    // untracked stage, a packet of a known flow needs no failsafe lookup
    // (about 9 ns), so they are asked after conntrack there.
    let failsafe = || !skipped(skip::FAILSAFE) && failsafe::is_failsafe(direction::INGRESS, pkt);
    let asked = untracked.then(failsafe);
    if asked == Some(false)
        && !skipped(skip::UNTRACKED)
        && (skipped(skip::FAILSAFE) || !failsafe::is_reply_failsafe(direction::INGRESS, pkt))
    {
        match run_stage(stage::UNTRACKED, direction::INGRESS, ifindex, pkt, bytes) {
            Verdict::Allow => {
                return Early::Pass(xdp_verdict::UNTRACKED_ALLOW, reason::ALLOW_RULE, false)
            }
            Verdict::Deny => return Early::Drop,
            Verdict::Continue(_) => {}
        }
    }
    let failsafe_in = || asked.unwrap_or_else(failsafe);
    // Conntrack's answer here only decides whether pre-DNAT rules see the
    // packet: without them, no lookup (the largest fixed cost of the
    // pipeline). TC ingress then looks the flow up for itself.
    if !pre_dnat {
        let why = if failsafe_in() {
            reason::PASS_FAILSAFE
        } else {
            reason::PASS_NO_POLICY
        };
        return Early::Pass(xdp_verdict::NONE, why, false);
    }
    if conntrack::track(pkt, hook) != Known::New {
        return Early::Pass(xdp_verdict::NONE, reason::ALLOW_CONNTRACK, true);
    }
    // The mangle failsafe skips pre-DNAT policy only (4).
    if failsafe_in() {
        return Early::Pass(xdp_verdict::NONE, reason::PASS_FAILSAFE, true);
    }
    if skipped(skip::PRE_DNAT) {
        return Early::Pass(xdp_verdict::NONE, reason::PASS_NO_POLICY, true);
    }
    match run_stage(stage::PRE_DNAT, direction::INGRESS, ifindex, pkt, bytes) {
        Verdict::Allow => Early::Pass(xdp_verdict::PRE_DNAT_ALLOW, reason::ALLOW_RULE, true),
        Verdict::Deny => Early::Drop,
        Verdict::Continue(why) => Early::Pass(xdp_verdict::NONE, why, true),
    }
}

#[xdp]
pub fn fw_xdp(ctx: XdpContext) -> u32 {
    let (verdict, why) = try_xdp(&ctx);
    counters::count_reason(why);
    verdict
}

/// A frame the parser did not turn into a packet: passed (not IP) or
/// dropped (an IP packet that cannot be judged).
#[inline(always)]
fn unparsed<T>(why: u32, pass: T, drop: T) -> (T, u32) {
    if reason::is_drop(why) {
        (drop, why)
    } else {
        (pass, why)
    }
}

/// A non-first fragment follows the verdict its first fragment got at
/// this hook (`fragments`).
#[inline(always)]
fn later_fragment<T>(hook: u32, pkt: &Packet, pass: T, drop: T) -> (T, u32) {
    if fragments::first_passed(hook, pkt) {
        (pass, reason::PASS_FRAGMENT)
    } else {
        (drop, reason::DROP_FRAGMENT)
    }
}

#[inline(always)]
fn try_xdp(ctx: &XdpContext) -> (u32, u32) {
    let hook = parse::slot::XDP;
    let pkt = match parse::parse_into(hook, ctx.data(), ctx.data_end(), 0) {
        Ok(p) => p,
        Err(why) => return unparsed(why, xdp_action::XDP_PASS, xdp_action::XDP_DROP),
    };
    if pkt.fragment {
        // TC ingress applies the same rule on its own (no metadata needed).
        return later_fragment(hook, pkt, xdp_action::XDP_PASS, xdp_action::XDP_DROP);
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    // Read once: a context field read again later may be compiled from a
    // moved context pointer, which the verifier refuses.
    let ifindex = ctx.ingress_ifindex() as u32;
    let judged = match early_ingress(ifindex, pkt, bytes, Hook::Peek) {
        Early::NoStages => {
            fragments::remember(hook, pkt);
            (xdp_action::XDP_PASS, reason::PASS_NO_POLICY)
        }
        Early::Drop => (xdp_action::XDP_DROP, reason::DROP_RULE),
        Early::Pass(verdict, why, _) => {
            fragments::remember(hook, pkt);
            // Without room for metadata TC runs these stages again itself.
            parse::set_xdp_meta(
                ctx,
                XdpMeta {
                    magic: XDP_META_MAGIC,
                    verdict,
                },
            );
            (xdp_action::XDP_PASS, why)
        }
    };
    // Read only when needed: held across the stages, the fields would
    // take stack the classifier's call chain needs.
    let origin = || (filter_common::events::hook::XDP, ifindex, 0, bytes as u32);
    finish(ctx, pkt, origin, judged)
}

/// The XDP logger: writes the records `fw_xdp` left pending and returns
/// its verdict (reached only by tail call, `events`).
#[xdp]
pub fn fw_xdp_log(ctx: XdpContext) -> u32 {
    events::log_pending(&parse::XdpFrame(&ctx))
}

/// The TC logger, for both TC programs.
#[classifier]
pub fn fw_tc_log(ctx: TcContext) -> i32 {
    events::log_pending(&parse::TcFrame(&ctx)) as i32
}

/// Returns XDP_PASS and nothing else: the baseline of `cargo xtask bench`
/// (loaded only by the benchmark).
#[xdp]
pub fn fw_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Returns XDP_DROP and nothing else: the ceiling of the real-traffic
/// benchmark (attached only by the benchmark).
#[xdp]
pub fn fw_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Returns TC_ACT_OK and nothing else: the TC baseline of `cargo xtask
/// bench` (loaded only by the benchmark).
#[classifier]
pub fn fw_tc_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[classifier]
pub fn fw_tc_in(ctx: TcContext) -> i32 {
    let (verdict, why) = try_tc_in(&ctx);
    counters::count_reason(why);
    verdict
}

#[inline(always)]
fn try_tc_in(ctx: &TcContext) -> (i32, u32) {
    let hook = parse::slot::TC_INGRESS;
    let (skb, pkt) = parse::skb(ctx, hook);
    let pkt = match pkt {
        Ok(p) => p,
        Err(why) => return unparsed(why, TC_ACT_OK, TC_ACT_SHOT),
    };
    if pkt.fragment {
        return later_fragment(hook, pkt, TC_ACT_OK, TC_ACT_SHOT);
    }
    let judged = tc_in(ctx, &skb, pkt);
    if judged.0 == TC_ACT_OK {
        fragments::remember(hook, pkt);
    }
    // Read only when needed: held across the stages, the fields would
    // take stack the classifier's call chain needs.
    let origin = || {
        (
            filter_common::events::hook::TC_INGRESS,
            skb.ifindex,
            0,
            skb.len,
        )
    };
    let (v, why) = finish(ctx, pkt, origin, (judged.0 as u32, judged.1));
    (v as i32, why)
}

/// TC ingress for a packet that is not a later fragment.
#[inline(always)]
fn tc_in(ctx: &TcContext, skb: &parse::Skb, pkt: &Packet) -> (i32, u32) {
    use filter_common::bench_skip as skip;
    let bytes = skb.len as u64;
    // `tracked`: XDP's stages, run here, already asked conntrack and
    // recorded the packet.
    let (early, tracked) = match skb.meta {
        Some(m) => (m.verdict, false),
        None => match early_ingress(skb.ifindex, pkt, bytes, Hook::TcIngress) {
            Early::NoStages => (xdp_verdict::NONE, false),
            Early::Drop => return (TC_ACT_SHOT, reason::DROP_RULE),
            Early::Pass(_, reason::ALLOW_CONNTRACK, true) => {
                return (TC_ACT_OK, reason::ALLOW_CONNTRACK)
            }
            Early::Pass(v, _, tracked) => (v, tracked),
        },
    };
    // A FIB lookup: asked only where the answer matters, so not for the
    // packets of known flows, most of them.
    let host_bound = || {
        use aya_ebpf::EbpfContext;
        skipped(skip::HOST_BOUND) || host::is_host_bound(ctx.as_ptr(), skb.ifindex, pkt)
    };
    if early == xdp_verdict::UNTRACKED_ALLOW {
        if !host_bound() {
            ctx.set_mark((skb.mark & !mark::MASK) | mark::UNTRACKED);
        }
        return (TC_ACT_OK, reason::ALLOW_EARLIER_STAGE);
    }
    if !tracked && conntrack::track(pkt, Hook::TcIngress) != Known::New {
        return (TC_ACT_OK, reason::ALLOW_CONNTRACK);
    }
    let host_bound = host_bound();
    if early == xdp_verdict::PRE_DNAT_ALLOW {
        conntrack::open(pkt, !host_bound);
        if !host_bound {
            ctx.set_mark((skb.mark & !mark::MASK) | mark::PRE_DNAT);
        }
        return (TC_ACT_OK, reason::ALLOW_EARLIER_STAGE);
    }
    if !host_bound {
        // Judged after DNAT and routing, at TC egress. Recording the flow
        // under its pre-DNAT tuple lets the un-NATed reply find it there.
        conntrack::open(pkt, true);
        return (TC_ACT_OK, reason::PASS_FORWARDED);
    }
    if !skipped(skip::FAILSAFE) && failsafe::is_failsafe(direction::INGRESS, pkt) {
        conntrack::open(pkt, false);
        return (TC_ACT_OK, reason::PASS_FAILSAFE);
    }
    if skipped(skip::NORMAL) {
        return (TC_ACT_OK, reason::PASS_NO_POLICY);
    }
    normal_stage(direction::INGRESS, skb.ifindex, pkt, bytes)
}

/// The normal stage with its profiles; an allowed flow is recorded.
#[inline(always)]
fn normal_stage(dir: u32, ifindex: u32, pkt: &Packet, bytes: u64) -> (i32, u32) {
    match run_stage(stage::NORMAL, dir, ifindex, pkt, bytes) {
        Verdict::Allow => {
            conntrack::open(pkt, false);
            (TC_ACT_OK, reason::ALLOW_RULE)
        }
        Verdict::Deny => (TC_ACT_SHOT, reason::DROP_RULE),
        // Not a host endpoint, or a table problem (counted).
        Verdict::Continue(why) => (TC_ACT_OK, why),
    }
}

#[classifier]
pub fn fw_tc_eg(ctx: TcContext) -> i32 {
    let (verdict, why) = try_tc_eg(&ctx);
    counters::count_reason(why);
    verdict
}

#[inline(always)]
fn try_tc_eg(ctx: &TcContext) -> (i32, u32) {
    let hook = parse::slot::TC_EGRESS;
    let (skb, pkt) = parse::skb(ctx, hook);
    let pkt = match pkt {
        Ok(p) => p,
        Err(why) => return unparsed(why, TC_ACT_OK, TC_ACT_SHOT),
    };
    let bytes = skb.len as u64;
    let judged = if skb.ingress_ifindex == 0 {
        host_egress(skb.ifindex, pkt, bytes)
    } else {
        forward_egress(&skb, pkt, bytes)
    };
    if judged.0 == TC_ACT_OK {
        fragments::remember(hook, pkt);
    }
    // As in `try_tc_in`.
    let origin = || {
        (
            filter_common::events::hook::TC_EGRESS,
            skb.ingress_ifindex,
            skb.ifindex,
            skb.len,
        )
    };
    let (v, why) = finish(ctx, pkt, origin, (judged.0 as u32, judged.1));
    (v as i32, why)
}

/// A packet the node itself sends (3.9, "EGRESS via HEP h,
/// host-originated").
#[inline(always)]
fn host_egress(ifindex: u32, pkt: &Packet, bytes: u64) -> (i32, u32) {
    if pkt.fragment {
        return later_fragment(parse::slot::TC_EGRESS, pkt, TC_ACT_OK, TC_ACT_SHOT);
    }
    let failsafe_out = failsafe::is_failsafe(direction::EGRESS, pkt);
    if !failsafe_out && !failsafe::is_reply_failsafe(direction::EGRESS, pkt) {
        match run_stage(stage::UNTRACKED, direction::EGRESS, ifindex, pkt, bytes) {
            Verdict::Allow => return (TC_ACT_OK, reason::ALLOW_RULE),
            Verdict::Deny => return (TC_ACT_SHOT, reason::DROP_RULE),
            Verdict::Continue(_) => {}
        }
    }
    if conntrack::track(pkt, Hook::TcEgress) != Known::New {
        return (TC_ACT_OK, reason::ALLOW_CONNTRACK);
    }
    if failsafe_out {
        conntrack::open(pkt, false);
        return (TC_ACT_OK, reason::PASS_FAILSAFE);
    }
    normal_stage(direction::EGRESS, ifindex, pkt, bytes)
}

/// A routed packet, after DNAT (3.6, 3.9 "forwarded"): the ingress rules
/// of the endpoint it came in by, then the egress rules of the one it
/// leaves by. No applyOnForward policy, or a Pass out of the last tier:
/// allowed. No failsafe for forwarded traffic (4).
#[inline(always)]
fn forward_egress(skb: &parse::Skb, pkt: &Packet, bytes: u64) -> (i32, u32) {
    let (in_if, out_if) = (skb.ingress_ifindex, skb.ifindex);
    let touches_endpoint = classify::is_endpoint(in_if) || classify::is_endpoint(out_if);
    if !touches_endpoint {
        return (TC_ACT_OK, reason::PASS_NOT_POLICED);
    }
    if pkt.fragment {
        return later_fragment(parse::slot::TC_EGRESS, pkt, TC_ACT_OK, TC_ACT_SHOT);
    }
    if conntrack::track(pkt, Hook::TcEgress) != Known::New {
        return (TC_ACT_OK, reason::ALLOW_CONNTRACK);
    }
    let earlier = skb.mark & mark::MASK;
    let mut why = reason::PASS_NO_POLICY;
    // An untracked or pre-DNAT allow skips the incoming endpoint's forward
    // policy, not the outgoing one's (3.7).
    if earlier == 0 {
        match run_stage(stage::FORWARD, direction::INGRESS, in_if, pkt, bytes) {
            Verdict::Deny => return (TC_ACT_SHOT, reason::DROP_RULE),
            Verdict::Allow => why = reason::ALLOW_RULE,
            Verdict::Continue(w) => why = w,
        }
    }
    match run_stage(stage::FORWARD, direction::EGRESS, out_if, pkt, bytes) {
        Verdict::Deny => return (TC_ACT_SHOT, reason::DROP_RULE),
        Verdict::Allow => why = reason::ALLOW_RULE,
        Verdict::Continue(_) => {}
    }
    if earlier & mark::UNTRACKED == 0 {
        conntrack::open(pkt, false);
    }
    (TC_ACT_OK, why)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path to it.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
