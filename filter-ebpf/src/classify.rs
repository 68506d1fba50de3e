//! The classifier: a packet and a table → the first rule that matches.
//!
//! In: a parsed [`Packet`], the stage, direction and interface. Out: the
//! deciding rule's action and slot, or no verdict. One LPM lookup per field
//! gives a class; each class names a bitmap of the rules that field allows;
//! the first bit of `endpoint & src & dst & port` is the rule that decides
//! (design.md, "The classifier"). The cost does not depend on the number of
//! CIDRs, and grows with rules only by `WORDS` word ANDs.
//!
//! Invariant kept by the agent: every table it publishes has a `/0` entry in
//! each address trie and an any-protocol entry in the port trie, so a lookup
//! that misses means an unpublished table, reported as
//! `reason::PASS_TABLE_ERROR`.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie},
};
use filter_common::{
    action, direction, reason, rule_slot, stage, table_id, AddrV4Key, AddrV6Key, Bitmap,
    EndpointKey, PortKey, RuleMeta, GENERATIONS, MAX_CLASSES, MAX_ENDPOINT_ENTRIES, MAX_HOPS,
    MAX_RULE_SLOTS, MAX_TRIE_ENTRIES, PORT_KEY_FULL_BITS, TABLE_PREFIX_BITS, WORDS,
};

use crate::parse::{Family, Packet};

#[map(name = "FW_GEN1")]
static FW_GEN1: Array<u32> = Array::pinned(1, 0);

#[map(name = "FW_SRC4_1")]
static FW_SRC4_1: LpmTrie<AddrV4Key, u32> = LpmTrie::pinned(MAX_TRIE_ENTRIES, 0);

#[map(name = "FW_DST4_1")]
static FW_DST4_1: LpmTrie<AddrV4Key, u32> = LpmTrie::pinned(MAX_TRIE_ENTRIES, 0);

#[map(name = "FW_SRC6_1")]
static FW_SRC6_1: LpmTrie<AddrV6Key, u32> = LpmTrie::pinned(MAX_TRIE_ENTRIES, 0);

#[map(name = "FW_DST6_1")]
static FW_DST6_1: LpmTrie<AddrV6Key, u32> = LpmTrie::pinned(MAX_TRIE_ENTRIES, 0);

#[map(name = "FW_PORT1")]
static FW_PORT1: LpmTrie<PortKey, u32> = LpmTrie::pinned(MAX_TRIE_ENTRIES, 0);

#[map(name = "FW_CLASS1")]
static FW_CLASS1: Array<Bitmap> = Array::pinned(MAX_CLASSES, 0);

#[map(name = "FW_EP1")]
static FW_EP1: HashMap<EndpointKey, Bitmap> = HashMap::pinned(MAX_ENDPOINT_ENTRIES, 0);

#[map(name = "FW_SPORT1")]
static FW_SPORT1: LpmTrie<PortKey, u32> = LpmTrie::pinned(MAX_TRIE_ENTRIES, 0);

#[map(name = "FW_RULE2")]
static FW_RULE2: Array<RuleMeta> = Array::pinned(MAX_RULE_SLOTS, 0);

/// The rule that decided a packet.
#[derive(Clone, Copy)]
pub struct Decision {
    /// One of `filter_common::action`.
    pub action: u32,
    /// Index into `FW_RULE1` / `FW_RULE_CTR1`.
    pub slot: u32,
}

/// Outcome of one stage: a decision, or a reason there is none.
pub type StageResult = Result<Decision, u32>;

/// Runs `stage` in `direction` for `pkt` arriving on or leaving by `ifindex`.
/// `Err` carries the `reason` when no rule decided.
#[inline(always)]
pub fn classify(stage: u32, direction: u32, ifindex: u32, pkt: &Packet) -> StageResult {
    let packed = classify_call(stage, direction, ifindex, pkt);
    let (tag, value) = ((packed >> 32) as u32, packed as u32);
    match tag {
        action::ALLOW | action::DENY => Ok(Decision {
            action: tag,
            slot: value,
        }),
        _ => Err(value),
    }
}

/// [`classify`] as one BPF-to-BPF call: a program runs several stages, and
/// inlining each copy of the lookup keys and the hit bitmap would overflow
/// the 512-byte stack; a called function's frame is reused. Returns
/// `action << 32 | slot` for a decision, else `reason` (BPF functions return
/// one register).
#[inline(never)]
fn classify_call(stage: u32, direction: u32, ifindex: u32, pkt: &Packet) -> u64 {
    match classify_inline(stage, direction, ifindex, pkt) {
        Ok(d) => ((d.action as u64) << 32) | d.slot as u64,
        Err(why) => why as u64,
    }
}

#[inline(always)]
fn classify_inline(stage: u32, direction: u32, ifindex: u32, pkt: &Packet) -> StageResult {
    let generation = match FW_GEN1.get(0) {
        Some(g) if *g < GENERATIONS => *g,
        _ => return Err(reason::PASS_TABLE_ERROR),
    };
    let table = table_id(generation, stage, direction);
    let endpoint = EndpointKey { ifindex, table };
    // SAFETY: values of FW_EP1 are only replaced whole by the agent, and a
    // reader that races a replacement sees the old or the new mask; both are
    // masks of the live generation (the agent writes the inactive one).
    let mask = match unsafe { FW_EP1.get(&endpoint) } {
        Some(m) => m,
        None => return Err(reason::PASS_NO_POLICY),
    };
    let table_be = table.to_be_bytes();
    let (src, dst) = match pkt.family {
        Family::V4 => {
            let mut s = [0u8; 4];
            s.copy_from_slice(&pkt.src[..4]);
            let mut d = [0u8; 4];
            d.copy_from_slice(&pkt.dst[..4]);
            (
                FW_SRC4_1.get(&Key::new(
                    TABLE_PREFIX_BITS + 32,
                    AddrV4Key {
                        table: table_be,
                        addr: s,
                    },
                )),
                FW_DST4_1.get(&Key::new(
                    TABLE_PREFIX_BITS + 32,
                    AddrV4Key {
                        table: table_be,
                        addr: d,
                    },
                )),
            )
        }
        Family::V6 => (
            FW_SRC6_1.get(&Key::new(
                TABLE_PREFIX_BITS + 128,
                AddrV6Key {
                    table: table_be,
                    addr: pkt.src,
                },
            )),
            FW_DST6_1.get(&Key::new(
                TABLE_PREFIX_BITS + 128,
                AddrV6Key {
                    table: table_be,
                    addr: pkt.dst,
                },
            )),
        ),
    };
    let port_key = |known: bool, port: u16| PortKey {
        table: table_be,
        proto: pkt.proto,
        has_ports: known as u8,
        port: if known { port.to_be_bytes() } else { [0; 2] },
    };
    let dport = FW_PORT1.get(&Key::new(
        PORT_KEY_FULL_BITS,
        port_key(pkt.has_ports, pkt.dport),
    ));
    // ICMP type and code ride in the destination port; there is no source
    // port, so its source key says "no ports" like a fragment's.
    let icmp = pkt.proto == 1 || pkt.proto == 58;
    let sport = FW_SPORT1.get(&Key::new(
        PORT_KEY_FULL_BITS,
        port_key(pkt.has_ports && !icmp, pkt.sport),
    ));
    let (src, dst, dport, sport) = match (src, dst, dport, sport) {
        (Some(s), Some(d), Some(p), Some(q)) => (class(*s)?, class(*d)?, class(*p)?, class(*q)?),
        _ => return Err(reason::PASS_TABLE_ERROR),
    };
    let mut hops = Hops {
        hits: [0; WORDS],
        table,
        start: 0,
        action: 0,
        slot: 0,
        reason: reason::PASS_TOO_MANY_HOPS,
    };
    for w in 0..WORDS {
        hops.hits[w] =
            mask.words[w] & src.words[w] & dst.words[w] & dport.words[w] & sport.words[w];
    }
    // Each hop is one bpf_loop iteration: the verifier checks the callback
    // once instead of unrolling MAX_HOPS word scans (which exceeds its
    // instruction budget; design.md, "Measured on this machine kind").
    // SAFETY: `hop` has the callback signature bpf_loop expects, and the
    // context pointer is to `hops`, which lives on this stack frame for the
    // whole call.
    unsafe {
        aya_ebpf::helpers::bpf_loop(
            MAX_HOPS,
            hop as *mut core::ffi::c_void,
            &mut hops as *mut Hops as *mut core::ffi::c_void,
            0,
        );
    }
    match hops.action {
        action::ALLOW | action::DENY => Ok(Decision {
            action: hops.action,
            slot: hops.slot,
        }),
        _ => Err(hops.reason),
    }
}

/// Whether `ifindex` is a host endpoint: every endpoint has a normal-stage
/// ingress mask (its profiles and the final drop at least).
#[inline(always)]
pub fn is_endpoint(ifindex: u32) -> bool {
    let Some(generation) = FW_GEN1.get(0) else {
        return false;
    };
    let key = EndpointKey {
        ifindex,
        table: table_id(*generation, stage::NORMAL, direction::INGRESS),
    };
    // SAFETY: only presence is read.
    unsafe { FW_EP1.get(&key) }.is_some()
}

/// State of the verdict search across `bpf_loop` iterations.
struct Hops {
    /// AND of the endpoint mask and the field bitmaps.
    hits: [u64; WORDS],
    table: u32,
    /// Next rule to look at.
    start: u32,
    /// Allow or Deny once decided, else 0.
    action: u32,
    slot: u32,
    /// Why there is no verdict, when there is none.
    reason: u32,
}

/// One hop: the first matching rule at or after `start`. Allow and Deny
/// end the search; Log and Pass go on at the rule's `next`.
#[inline(never)]
extern "C" fn hop(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    const STOP: i64 = 1;
    const GO_ON: i64 = 0;
    // SAFETY: bpf_loop hands back the pointer `classify` passed: a live,
    // exclusive `Hops` on its stack.
    let st = unsafe { &mut *(ctx as *mut Hops) };
    let Some(rule) = first_from(&st.hits, st.start) else {
        st.reason = reason::PASS_NO_VERDICT;
        return STOP;
    };
    let slot = rule_slot(st.table, rule);
    let Some(meta) = FW_RULE2.get(slot) else {
        st.reason = reason::PASS_TABLE_ERROR;
        return STOP;
    };
    match meta.action {
        action::ALLOW | action::DENY => {
            st.action = meta.action;
            st.slot = slot;
            return STOP;
        }
        // Log events arrive with the events work; the rule is counted.
        action::LOG => crate::counters::count_rule(slot, 0),
        _ => {}
    }
    // The agent makes `next` point past the rule, so every hop moves on.
    if meta.next <= rule {
        st.reason = reason::PASS_TABLE_ERROR;
        return STOP;
    }
    st.start = meta.next;
    GO_ON
}

/// The lowest set bit at or after `start`, over the whole bitmap.
#[inline(always)]
fn first_from(hits: &[u64; WORDS], start: u32) -> Option<u32> {
    let first_word = (start / 64) as usize;
    // A fixed-bound loop over all words (skipping the early ones) keeps the
    // verifier's view simple; `skip(first_word)` would make the bound depend
    // on `start`.
    for (w, &word) in hits.iter().enumerate() {
        if w < first_word {
            continue;
        }
        let mut x = word;
        if w == first_word {
            x &= u64::MAX << (start % 64);
        }
        if x != 0 {
            return Some((w as u32) * 64 + lowest_bit(x));
        }
    }
    None
}

#[inline(always)]
fn class(id: u32) -> Result<&'static Bitmap, u32> {
    // The array lookup checks the bound too; checking here first keeps a
    // corrupt trie value from reading a class of the other generation's
    // range by accident of wrap-around.
    if id >= MAX_CLASSES {
        return Err(reason::PASS_TABLE_ERROR);
    }
    FW_CLASS1.get(id).ok_or(reason::PASS_TABLE_ERROR)
}

/// Index of the lowest set bit of a non-zero word. BPF has no count-trailing-
/// zeros instruction and LLVM's expansion wants a lookup table in .rodata; a
/// six-step binary search needs neither.
#[inline(always)]
fn lowest_bit(mut x: u64) -> u32 {
    let mut n = 0;
    if x & 0xffff_ffff == 0 {
        n += 32;
        x >>= 32;
    }
    if x & 0xffff == 0 {
        n += 16;
        x >>= 16;
    }
    if x & 0xff == 0 {
        n += 8;
        x >>= 8;
    }
    if x & 0xf == 0 {
        n += 4;
        x >>= 4;
    }
    if x & 0x3 == 0 {
        n += 2;
        x >>= 2;
    }
    if x & 0x1 == 0 {
        n += 1;
    }
    n
}
