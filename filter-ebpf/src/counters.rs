//! Counters: per-reason packet counts and per-rule packets and bytes.
//!
//! Both are per-CPU arrays so the fast path never contends; the agent sums
//! the CPUs when it reads them.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use filter_common::{reason, RuleCounter, MAX_RULE_SLOTS};

#[map(name = "FW_STATS2")]
static FW_STATS2: PerCpuArray<u64> = PerCpuArray::pinned(reason::COUNT, 0);

#[map(name = "FW_RULE_CTR2")]
static FW_RULE_CTR2: PerCpuArray<RuleCounter> = PerCpuArray::pinned(MAX_RULE_SLOTS, 0);

/// Counts one packet for `reason`.
#[inline(always)]
pub fn count_reason(reason: u32) {
    if let Some(c) = FW_STATS2.get_ptr_mut(reason) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU
        // array, so it is valid and only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
}

/// Counts one packet of `bytes` bytes for the rule in `slot`.
#[inline(always)]
pub fn count_rule(slot: u32, bytes: u64) {
    if let Some(c) = FW_RULE_CTR2.get_ptr_mut(slot) {
        // SAFETY: as in `count_reason`.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
