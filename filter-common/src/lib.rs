//! The contract between the kernel programs (`filter-ebpf`) and the agent.
//!
//! Everything here crosses the user/kernel boundary: map keys and values,
//! the verdict codes, the per-packet reason codes and the map and program
//! names. Every type is `#[repr(C)]` with explicit padding, and its size is
//! asserted at compile time, so both sides agree byte for byte.
//!
//! # The classifier tables (design.md, "The classifier")
//!
//! Rules of one *table* (a generation × stage × direction) are numbered
//! `0..MAX_RULES` in evaluation order. Each packet field is looked up once
//! and yields a [`Bitmap`] of the rules that field allows; the first bit set
//! in the AND of all bitmaps and the endpoint's mask is the deciding rule.
//!
//! * address tries (`FW_SRC4_1`, `FW_DST4_1`, `FW_SRC6_1`, `FW_DST6_1`):
//!   LPM key = table id then address ([`AddrV4Key`], [`AddrV6Key`]); value =
//!   class number (`u32`).
//! * port trie (`FW_PORT1`): LPM key = table id, protocol, "has ports" flag,
//!   destination port ([`PortKey`]); value = class number.
//! * `FW_CLASS1`: array, class number → [`Bitmap`].
//! * `FW_EP1`: hash, [`EndpointKey`] → [`Bitmap`] of the rules whose policy
//!   selects the endpoint on that interface. No entry: no policy applies.
//! * `FW_SPORT1`: like `FW_PORT1`, keyed by the source port.
//! * `FW_RULE2`: array, [`rule_slot`] → [`RuleMeta`].
//! * `FW_GEN1`: array of one `u32`, the live generation. The agent writes a
//!   whole new generation, then flips this word: a packet reads it once and
//!   so sees one policy version, never half of two.
#![no_std]

/// Rules per table. A table holds one stage and direction of one generation.
pub const MAX_RULES: u32 = 1024;
/// 64-bit words in a [`Bitmap`].
pub const WORDS: usize = (MAX_RULES / 64) as usize;
/// Policy generations kept side by side for atomic updates.
pub const GENERATIONS: u32 = 2;
/// Bitmap classes available to one generation. Class numbers of generation
/// `g` are `g * CLASSES_PER_GEN ..`, so writing one never touches the other.
pub const CLASSES_PER_GEN: u32 = 8192;
/// Size of the class array.
pub const MAX_CLASSES: u32 = CLASSES_PER_GEN * GENERATIONS;
/// Tables per generation: four stages × two directions.
pub const TABLES_PER_GEN: u32 = 8;
/// Entries in the rule metadata and rule counter arrays.
pub const MAX_RULE_SLOTS: u32 = MAX_RULES * TABLES_PER_GEN * GENERATIONS;
/// Prefix bits the table id takes at the front of every LPM key.
pub const TABLE_PREFIX_BITS: u32 = 32;

/// Entries in each LPM trie (shared by all tables and both generations).
pub const MAX_TRIE_ENTRIES: u32 = 262_144;
/// Log and Pass rules one packet may meet in one stage before the program
/// gives up on the stage (counted as `reason::PASS_TOO_MANY_HOPS`).
pub const MAX_HOPS: u32 = 32;
/// Entries in the endpoint map: (interface, table) pairs.
pub const MAX_ENDPOINT_ENTRIES: u32 = 4096;

/// Policy stages (calico-semantics.md 3.1), in pipeline order.
pub mod stage {
    /// `doNotTrack: true` policies.
    pub const UNTRACKED: u32 = 0;
    /// `preDNAT: true` policies.
    pub const PRE_DNAT: u32 = 1;
    /// Normal host-endpoint policies.
    pub const NORMAL: u32 = 2;
    /// `applyOnForward: true` policies on forwarded traffic.
    pub const FORWARD: u32 = 3;
}

/// Traffic direction relative to the host endpoint.
pub mod direction {
    /// Arriving on the endpoint's interface.
    pub const INGRESS: u32 = 0;
    /// Leaving through the endpoint's interface.
    pub const EGRESS: u32 = 1;
}

/// Rule actions as stored in [`RuleMeta::action`].
pub mod action {
    /// Accept: ends the stage.
    pub const ALLOW: u32 = 1;
    /// Drop: ends the stage.
    pub const DENY: u32 = 2;
    /// Record and go on with the next rule.
    pub const LOG: u32 = 3;
    /// Leave the tier.
    pub const PASS: u32 = 4;
}

/// The table id of a generation, stage and direction. It leads every LPM key
/// and every endpoint key, so each table is a disjoint subtree.
#[inline(always)]
pub const fn table_id(generation: u32, stage: u32, direction: u32) -> u32 {
    (generation * TABLES_PER_GEN) + (stage << 1) + direction
}

/// Index of a rule in `FW_RULE2` and `FW_RULE_CTR1`.
#[inline(always)]
pub const fn rule_slot(table: u32, rule: u32) -> u32 {
    table * MAX_RULES + rule
}

/// One bit per rule of a table; bit `r % 64` of word `r / 64` is rule `r`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bitmap {
    /// The words, rule 0 in the lowest bit of word 0.
    pub words: [u64; WORDS],
}

impl Bitmap {
    /// No rule.
    pub const EMPTY: Bitmap = Bitmap { words: [0; WORDS] };
}

/// Data part of an IPv4 address trie key. Field order is LPM order: the
/// table id first, so a prefix never spans two tables.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrV4Key {
    /// [`table_id`], big-endian.
    pub table: [u8; 4],
    /// Address in network order.
    pub addr: [u8; 4],
}

/// Data part of an IPv6 address trie key, laid out like [`AddrV4Key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrV6Key {
    /// [`table_id`], big-endian.
    pub table: [u8; 4],
    /// Address in network order.
    pub addr: [u8; 16],
}

/// Data part of a port trie key.
///
/// `has_ports` is 1 when the packet has an L4 header with ports (TCP, UDP,
/// SCTP, or ICMP whose type and code ride in `port` as `type << 8 | code`),
/// and 0 for non-first fragments and other protocols: a prefix that stops
/// after the protocol byte then matches rules that name the protocol but no
/// port, and nothing that needs a port (as iptables' port matches never
/// match a non-first fragment).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortKey {
    /// [`table_id`], big-endian.
    pub table: [u8; 4],
    /// IP protocol number (IPv6: the upper-layer header).
    pub proto: u8,
    /// 1 when `port` is meaningful, else 0.
    pub has_ports: u8,
    /// Destination port (or ICMP type/code), network order.
    pub port: [u8; 2],
}

/// Prefix length of a [`PortKey`] that matches every packet of a table.
pub const PORT_KEY_ANY_PROTO_BITS: u32 = TABLE_PREFIX_BITS;
/// Prefix length of a [`PortKey`] that fixes the protocol.
pub const PORT_KEY_PROTO_BITS: u32 = TABLE_PREFIX_BITS + 8;
/// Prefix length of a [`PortKey`] that fixes protocol and `has_ports`.
pub const PORT_KEY_FLAG_BITS: u32 = TABLE_PREFIX_BITS + 16;
/// Prefix length of a full [`PortKey`].
pub const PORT_KEY_FULL_BITS: u32 = TABLE_PREFIX_BITS + 32;

/// Data part of a failsafe trie key (`FW_FAILSAFE1`, calico-semantics.md
/// 4). An entry without a net fixes direction, protocol and port (prefix
/// [`FAILSAFE_PORT_BITS`]); one with a net adds the family and the net's
/// prefix of `addr` (the source for inbound, the destination for outbound).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailsafeKey {
    /// `direction::INGRESS` or `direction::EGRESS`.
    pub direction: u8,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    /// Destination port, network order.
    pub port: [u8; 2],
    /// 4 or 6.
    pub family: u8,
    /// Zero.
    pub pad: [u8; 3],
    /// Peer address, network order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
}

/// Prefix length of a [`FailsafeKey`] with no net.
pub const FAILSAFE_PORT_BITS: u32 = 32;
/// Prefix length of a [`FailsafeKey`] up to the address.
pub const FAILSAFE_ADDR_OFFSET_BITS: u32 = 64;
/// Entries in the failsafe trie.
pub const MAX_FAILSAFE_ENTRIES: u32 = 256;

/// Key of the endpoint map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// Interface index in the agent's network namespace.
    pub ifindex: u32,
    /// [`table_id`].
    pub table: u32,
}

/// What a rule does and who wrote it, for verdicts, counters and events.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleMeta {
    /// One of [`action`].
    pub action: u32,
    /// Agent-assigned policy number (the agent keeps the names).
    pub policy: u32,
    /// Index of the rule within its policy's rule list.
    pub rule: u32,
    /// For Log: the rule to go on with (past the other parts of the same
    /// rule); for Pass: the first rule after the tier (or profile).
    pub next: u32,
}

/// Per-rule counters (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounter {
    /// Packets the rule decided.
    pub packets: u64,
    /// Their bytes, as seen at the hook.
    pub bytes: u64,
}

/// Why a program returned what it did; indexes `FW_STATS1`.
///
/// Append-only: never renumber or reuse a value (style.md, Errors).
pub mod reason {
    /// The frame is not one the parser understands (ARP, LLDP, …): passed.
    pub const PASS_NOT_IP: u32 = 0;
    /// A header claims more bytes than the frame has: passed to the kernel,
    /// whose own checks drop it.
    pub const PASS_TRUNCATED: u32 = 1;
    /// No policy of this stage applies to the interface.
    pub const PASS_NO_POLICY: u32 = 2;
    /// Policies apply but no rule decided.
    pub const PASS_NO_VERDICT: u32 = 3;
    /// A rule allowed the packet.
    pub const ALLOW_RULE: u32 = 4;
    /// A rule denied the packet.
    pub const DROP_RULE: u32 = 5;
    /// A table the agent wrote is incomplete (should not happen): passed.
    pub const PASS_TABLE_ERROR: u32 = 6;
    /// Seen by a TC program that does not enforce yet.
    pub const PASS_TC_OBSERVED: u32 = 7;
    /// More than `MAX_HOPS` Log/Pass rules matched: the stage gives no
    /// verdict (the agent warns when a policy can lead there).
    pub const PASS_TOO_MANY_HOPS: u32 = 8;
    /// An inbound failsafe port: the pre-DNAT stage is skipped (4).
    pub const PASS_FAILSAFE: u32 = 9;
    /// Number of reason slots in `FW_STATS1`.
    pub const COUNT: u32 = 16;
}

/// Program and map names, as the kernel and `bpftool` show them (≤ 15
/// bytes). Map names carry a layout version: bump it when a layout changes,
/// so a new agent never adopts an old map.
pub mod names {
    /// XDP program on host-endpoint interfaces.
    pub const PROG_XDP: &str = "fw_xdp";
    /// TC ingress program on host-endpoint interfaces.
    pub const PROG_TC_INGRESS: &str = "fw_tc_in";
    /// TC egress program.
    pub const PROG_TC_EGRESS: &str = "fw_tc_eg";
    /// A program that only returns XDP_PASS: the benchmark's baseline.
    pub const PROG_PASS: &str = "fw_pass";
    /// Live generation.
    pub const MAP_GENERATION: &str = "FW_GEN1";
    /// IPv4 source trie.
    pub const MAP_SRC_V4: &str = "FW_SRC4_1";
    /// IPv4 destination trie.
    pub const MAP_DST_V4: &str = "FW_DST4_1";
    /// IPv6 source trie.
    pub const MAP_SRC_V6: &str = "FW_SRC6_1";
    /// IPv6 destination trie.
    pub const MAP_DST_V6: &str = "FW_DST6_1";
    /// Protocol / destination port trie.
    pub const MAP_PORT: &str = "FW_PORT1";
    /// Protocol / source port trie.
    pub const MAP_SPORT: &str = "FW_SPORT1";
    /// Class → bitmap.
    pub const MAP_CLASS: &str = "FW_CLASS1";
    /// Endpoint masks.
    pub const MAP_ENDPOINT: &str = "FW_EP1";
    /// Rule metadata.
    pub const MAP_RULE: &str = "FW_RULE2";
    /// Per-rule counters.
    pub const MAP_RULE_COUNTERS: &str = "FW_RULE_CTR1";
    /// Per-reason packet counters.
    pub const MAP_STATS: &str = "FW_STATS1";
    /// Failsafe ports.
    pub const MAP_FAILSAFE: &str = "FW_FAILSAFE1";
}

// Sizes are part of the ABI: no implicit padding anywhere.
const _: () = assert!(core::mem::size_of::<Bitmap>() == WORDS * 8);
const _: () = assert!(core::mem::size_of::<AddrV4Key>() == 8);
const _: () = assert!(core::mem::size_of::<AddrV6Key>() == 20);
const _: () = assert!(core::mem::size_of::<PortKey>() == 8);
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 8);
const _: () = assert!(core::mem::size_of::<FailsafeKey>() == 24);
const _: () = assert!(core::mem::size_of::<RuleMeta>() == 16);
const _: () = assert!(core::mem::size_of::<RuleCounter>() == 16);
const _: () = assert!(
    table_id(GENERATIONS - 1, stage::FORWARD, direction::EGRESS) < TABLES_PER_GEN * GENERATIONS
);

#[cfg(feature = "user")]
mod pod {
    //! SAFETY (all impls): the types are `#[repr(C)]`, `Copy`, made only of
    //! integers and integer arrays, and have no padding (asserted above), so
    //! every bit pattern is a valid value.
    use super::*;
    unsafe impl aya::Pod for Bitmap {}
    unsafe impl aya::Pod for AddrV4Key {}
    unsafe impl aya::Pod for AddrV6Key {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for FailsafeKey {}
    unsafe impl aya::Pod for RuleMeta {}
    unsafe impl aya::Pod for RuleCounter {}
}
