//! Kernel programs of the host-endpoint firewall: entry points only.
//!
//! * `fw_xdp` (XDP, host-endpoint ingress): inbound failsafe ports, then the
//!   pre-DNAT stage (calico-semantics.md 3.7, 4). A Deny drops the frame at
//!   the driver; an Allow or no verdict lets it go on.
//! * `fw_tc_in`, `fw_tc_eg` (TC ingress and egress of host endpoints): parse
//!   and count; the normal, untracked and forward stages arrive with the
//!   dataplane work and will live here.
//!
//! Each entry point calls a `try_` function returning the action or the
//! reason for passing, and one exit path counts it.
#![no_std]
#![no_main]
#![expect(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "aya's #[classifier] expansion hands the kernel's raw __sk_buff pointer to a safe fn"
)]

mod classify;
mod counters;
mod failsafe;
mod parse;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use filter_common::{action, direction, reason, stage};

#[xdp]
pub fn fw_xdp(ctx: XdpContext) -> u32 {
    let (verdict, why) = try_xdp(&ctx);
    counters::count_reason(why);
    verdict
}

/// Returns the XDP action and the reason it is counted under.
#[inline(always)]
fn try_xdp(ctx: &XdpContext) -> (u32, u32) {
    let pkt = match parse::parse(ctx.data(), ctx.data_end()) {
        Ok(p) => p,
        Err(why) => return (xdp_action::XDP_PASS, why),
    };
    // The mangle failsafe: inbound failsafe ports skip pre-DNAT policy
    // (calico-semantics.md 4).
    if failsafe::is_failsafe(direction::INGRESS, &pkt) {
        return (xdp_action::XDP_PASS, reason::PASS_FAILSAFE);
    }
    let ifindex = ctx.ingress_ifindex() as u32;
    match classify::classify(stage::PRE_DNAT, direction::INGRESS, ifindex, &pkt) {
        Ok(d) => {
            let bytes = (ctx.data_end() - ctx.data()) as u64;
            counters::count_rule(d.slot, bytes);
            if d.action == action::DENY {
                (xdp_action::XDP_DROP, reason::DROP_RULE)
            } else {
                (xdp_action::XDP_PASS, reason::ALLOW_RULE)
            }
        }
        Err(why) => (xdp_action::XDP_PASS, why),
    }
}

/// Returns XDP_PASS and nothing else: the baseline of `cargo xtask bench`
/// (loaded only by the benchmark).
#[xdp]
pub fn fw_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn fw_tc_in(ctx: TcContext) -> i32 {
    counters::count_reason(observe(&ctx));
    TC_ACT_OK
}

#[classifier]
pub fn fw_tc_eg(ctx: TcContext) -> i32 {
    counters::count_reason(observe(&ctx));
    TC_ACT_OK
}

/// Parses the linear part of the skb so the program is proven against the
/// verifier with the same parser the XDP path uses.
#[inline(always)]
fn observe(ctx: &TcContext) -> u32 {
    match parse::parse(ctx.data(), ctx.data_end()) {
        Ok(_) => reason::PASS_TC_OBSERVED,
        Err(why) => why,
    }
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
