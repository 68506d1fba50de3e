//! The contract between the kernel programs (`filter-ebpf`) and the agent.
//!
//! Everything here crosses the user/kernel boundary: map keys and values,
//! the verdict codes, the per-packet reason codes and the map and program
//! names. Every type is `#[repr(C)]` with explicit padding, and its size is
//! asserted at compile time, so both sides agree byte for byte.
//!
//! # The classifier tables (docs/design.md, "The classifier")
//!
//! Rules of one *table* (a generation × stage × direction) are numbered
//! `0..MAX_RULES` in evaluation order. Each packet field is looked up once
//! and yields a *class*: the set of rules that field allows, as a bitmap of
//! `WORDS` 64-bit words. The first bit set in the AND of the field classes
//! and the endpoint's class is the deciding rule.
//!
//! * address tries (`FW_SRC4_1`, `FW_DST4_1`, `FW_SRC6_1`, `FW_DST6_1`):
//!   LPM key = table id then address ([`AddrV4Key`], [`AddrV6Key`]); value =
//!   class number (`u32`). Their host addresses (/32, /128) are in hashes
//!   beside them instead (`FW_SRC4X1`, `FW_DST4X1`, `FW_SRC6X1`,
//!   `FW_DST6X1`), keyed by the same LPM key: looked up first, as an exact
//!   hit is the longest prefix.
//! * port trie (`FW_PORT1`): LPM key = table id, protocol, "has ports" flag,
//!   destination port ([`PortKey`]); value = class number.
//! * `FW_CLASS2`: array, class number → [`ClassHead`]: which words of the
//!   class's bitmap are non-zero (the summary) and where they are stored.
//! * `FW_WORD1`: array of `u64`, the non-zero bitmap words of every class.
//!   Classes are stored sparse because a field with thousands of classes
//!   (one per distinct /32, say) would need gigabytes as dense bitmaps, and
//!   most of their words are zero.
//! * `FW_EP3`: hash, [`EndpointKey`] → [`EndpointValue`]: the class of the
//!   rules whose policy selects the endpoint on that interface, where the
//!   table's rule metadata starts, and the rule that decides every packet
//!   when the first of them matches all. No entry: no policy applies.
//! * `FW_SPORT1`: like `FW_PORT1`, keyed by the source port.
//! * `FW_RULE3`: array, rule slot ([`EndpointValue::first_slot`] + rule) →
//!   [`RuleMeta`]; `FW_RULE_CTR2` counts by the same slot.
//! * `FW_GEN1`: array of one `u32`, the live generation. The agent writes a
//!   whole new generation, then flips this word: a packet reads it once and
//!   so sees one policy version, never half of two.
#![cfg_attr(not(test), no_std)]

/// Rules per table. A table holds one stage and direction of one generation.
pub const MAX_RULES: u32 = 16_384;
/// 64-bit words in a class bitmap.
pub const WORDS: u32 = MAX_RULES / 64;
/// Words of a class summary: one bit per bitmap word.
pub const SUMMARY_WORDS: usize = (WORDS / 64) as usize;
/// Policy generations kept side by side for atomic updates.
pub const GENERATIONS: u32 = 2;
/// The most classes one generation may have. The agent sizes the class
/// array to the policy: with room for `r` a generation, class numbers of
/// generation `g` are `g * r ..`, so writing one never touches the other;
/// the programs read the numbers from the tables.
pub const CLASSES_PER_GEN: u32 = 65_536;
/// The largest class array.
pub const MAX_CLASSES: u32 = CLASSES_PER_GEN * GENERATIONS;
/// The most non-zero class words one generation may have (8 MiB); sized
/// and placed in `FW_WORD1` as the classes are.
pub const CLASS_WORDS_PER_GEN: u32 = 1 << 20;
/// The largest class word array.
pub const MAX_CLASS_WORDS: u32 = CLASS_WORDS_PER_GEN * GENERATIONS;
/// Tables per generation: four stages × two directions.
pub const TABLES_PER_GEN: u32 = 8;
/// Rule slots available to one generation, shared by its tables (each
/// table's rules take consecutive slots). Fewer than `MAX_RULES` per table
/// because the counters are per CPU: 16 bytes × slots × CPUs.
pub const RULE_SLOTS_PER_GEN: u32 = 32_768;
/// Entries in the rule metadata and rule counter arrays.
pub const MAX_RULE_SLOTS: u32 = RULE_SLOTS_PER_GEN * GENERATIONS;
/// Prefix bits the table id takes at the front of every LPM key.
pub const TABLE_PREFIX_BITS: u32 = 32;

/// Entries in each LPM trie (shared by all tables and both generations),
/// and the most each address field's host-address hash is sized to (the
/// agent's `--max-prefixes`).
pub const MAX_TRIE_ENTRIES: u32 = 262_144;
/// The most entries of each single-port hash (`FW_PORTX1`, `FW_SPORTX1`),
/// all tables and both generations: a policy names far fewer single ports
/// than addresses. The agent sizes them to the policy (a hash allocates 16
/// bytes of buckets per entry up front).
pub const MAX_PORT_ENTRIES: u32 = 65_536;
/// Log and Pass rules one packet may meet in one stage before the program
/// gives up on the stage (counted as `reason::PASS_TOO_MANY_HOPS`).
pub const MAX_HOPS: u32 = 32;
/// Entries in the endpoint map: (interface, table) pairs.
pub const MAX_ENDPOINT_ENTRIES: u32 = 4096;
/// Interfaces below this index have their endpoint entries in an array
/// too ([`endpoint_slot`]): one inlined array lookup where the hash took
/// a hash of the key and a bucket walk (about 25 ns a lookup, and a
/// packet takes one for the interface's summary and one per stage).
/// A node's own interfaces, the host endpoints, are created at boot and
/// have small indexes; the rest are looked up in the hash.
pub const ENDPOINT_ARRAY_IFINDEXES: u32 = 512;
/// Rows of the endpoint array: every table of both generations, then each
/// generation's summary.
pub const ENDPOINT_ARRAY_ROWS: u32 = MAX_TABLES + GENERATIONS;
/// Entries in the endpoint array.
pub const MAX_ENDPOINT_SLOTS: u32 = ENDPOINT_ARRAY_ROWS * ENDPOINT_ARRAY_IFINDEXES;

/// IP protocol numbers (IPv4 protocol, IPv6 upper-layer header), named once
/// for the kernel, the agent and the tests.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
    pub const UDPLITE: u8 = 136;

    /// Whether packets of `p` carry ports (and so may have port matches).
    pub const fn has_ports(p: u8) -> bool {
        matches!(p, TCP | UDP | SCTP)
    }

    /// ICMP of either family.
    pub const fn is_icmp(p: u8) -> bool {
        matches!(p, ICMP | ICMPV6)
    }
}

/// Address families as the map keys carry them.
pub mod family {
    pub const V4: u8 = 4;
    pub const V6: u8 = 6;
}

/// TCP flag bits (the flags byte, offset 13 of the header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
}

/// A policy stage (docs/semantics.md 3.1), in pipeline order.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// `doNotTrack: true` policies.
    Untracked = 0,
    /// `preDNAT: true` policies.
    PreDnat = 1,
    /// Normal host-endpoint policies.
    Normal = 2,
    /// `applyOnForward: true` policies on forwarded traffic.
    Forward = 3,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 4] = [
        Stage::Untracked,
        Stage::PreDnat,
        Stage::Normal,
        Stage::Forward,
    ];

    /// The name the CLI, JSON and logs use: the one table of names.
    pub const fn name(self) -> &'static str {
        match self {
            Stage::Untracked => "untracked",
            Stage::PreDnat => "pre-dnat",
            Stage::Normal => "normal",
            Stage::Forward => "forward",
        }
    }

    /// The stage of a map value.
    pub const fn from_u32(v: u32) -> Option<Stage> {
        match v {
            0 => Some(Stage::Untracked),
            1 => Some(Stage::PreDnat),
            2 => Some(Stage::Normal),
            3 => Some(Stage::Forward),
            _ => None,
        }
    }
}

/// Stages as map keys carry them ([`Stage`] as `u32`).
pub mod stage {
    use super::Stage;
    pub const UNTRACKED: u32 = Stage::Untracked as u32;
    pub const PRE_DNAT: u32 = Stage::PreDnat as u32;
    pub const NORMAL: u32 = Stage::Normal as u32;
    pub const FORWARD: u32 = Stage::Forward as u32;
}

/// Traffic direction relative to the host endpoint.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Arriving on the endpoint's interface.
    Ingress = 0,
    /// Leaving through the endpoint's interface.
    Egress = 1,
}

impl Direction {
    /// Both directions.
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// The name the CLI, JSON and Calico's YAML use.
    pub const fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    /// The direction of a map value.
    pub const fn from_u32(v: u32) -> Option<Direction> {
        match v {
            0 => Some(Direction::Ingress),
            1 => Some(Direction::Egress),
            _ => None,
        }
    }
}

/// Directions as map keys carry them ([`Direction`] as `u32`).
pub mod direction {
    use super::Direction;
    pub const INGRESS: u32 = Direction::Ingress as u32;
    pub const EGRESS: u32 = Direction::Egress as u32;
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

/// Where a class's bitmap is. Bit `r % 64` of bitmap word `r / 64` is rule
/// `r`; bit `b` of `summary[s]` says whether bitmap word `64 * s + b` is
/// non-zero. The words of summary word `s` are stored from
/// `FW_WORD1[offset[s]]`: all 64 of them when bit `s` of `dense` is set
/// (word `64 * s + b` at `offset[s] + b`), else only the non-zero ones, in
/// order (at `offset[s]` plus the number of summary bits set below `b`).
/// Dense storage spares the counting where most words have rules anyway.
///
/// A verdict scan ANDs the summaries first and so visits only words where
/// every field has a rule: with ten thousand rules that is usually one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassHead {
    /// Non-zero words of the bitmap.
    pub summary: [u64; SUMMARY_WORDS],
    /// Index in `FW_WORD1` of the first stored word of each summary word.
    pub offset: [u32; SUMMARY_WORDS],
    /// Bit `s`: summary word `s` is stored dense.
    pub dense: u32,
    /// 1 + the class's lowest rule; 0 for an empty class or where unknown
    /// (a head written before this field was, when it was padding). No
    /// rule below the highest of a packet's five classes' lowest rules can
    /// be in all five, so the search starts there, and where that rule is
    /// in all five it decides without the scan (`filter-ebpf`'s
    /// `classify`). 0 is always a safe answer: the search starts at rule 0.
    pub first: u32,
}

/// Lookups a table does not need, worked out by the agent from what it
/// writes (`FW_TABLE1`, indexed by [`table_id`]). A field whose trie holds
/// nothing for the table but its catch-all entry (an address trie's `/0`,
/// the port trie's any-protocol entry) gives every packet that entry's
/// class once the field's exact hash missed; a table without host
/// addresses or single ports in a field needs no exact-hash lookup there. Most tables leave most fields open (ingress rules rarely name
/// destinations or source ports), so most lookups go. All zeros, as a
/// table never written reads, means "look everything up": always right.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableHints {
    /// Per [`field`]: 1 + the class of the field's catch-all entry when the
    /// table holds no other prefix there (host addresses and single ports
    /// aside: they are in the exact hash, asked first); 0 to look the
    /// field up.
    pub fallback: [u32; field::COUNT],
    /// Bit `1 << f` per [`field`] `f`: the table has entries in that
    /// field's exact hash (host addresses, single ports).
    pub exact: u32,
    /// Zero.
    pub pad: u32,
}

/// The looked-up fields of a packet, as [`TableHints`] indexes them.
pub mod field {
    /// IPv4 source address.
    pub const SRC4: usize = 0;
    /// IPv4 destination address.
    pub const DST4: usize = 1;
    /// IPv6 source address.
    pub const SRC6: usize = 2;
    /// IPv6 destination address.
    pub const DST6: usize = 3;
    /// Protocol and destination port (ICMP type and code).
    pub const DPORT: usize = 4;
    /// Protocol and source port.
    pub const SPORT: usize = 5;
    /// Fields.
    pub const COUNT: usize = 6;
}

/// Entries of `FW_TABLE1`: one per table of both generations.
pub const MAX_TABLES: u32 = TABLES_PER_GEN * GENERATIONS;

/// The endpoint map's summary key of `generation`: with an interface, its
/// value's `class` has bit [`table_bit`] set for every table of the
/// generation with rules for the interface (`first_slot` is 0). One lookup
/// tells a program which stages an interface has, instead of one per stage.
/// Outside the range of [`table_id`], so no table's key collides with it.
#[inline(always)]
pub const fn summary_table(generation: u32) -> u32 {
    SUMMARY_TABLE | generation
}

/// See [`summary_table`].
pub const SUMMARY_TABLE: u32 = 0x8000_0000;

/// A summary entry's bit for the table of `stage` and `direction`.
#[inline(always)]
pub const fn table_bit(stage: u32, direction: u32) -> u32 {
    1 << table_id(0, stage, direction)
}

/// Value of the endpoint map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointValue {
    /// Class of the rules whose policy selects the endpoint.
    pub class: u32,
    /// Rule slot of the table's rule 0: rule `r` is at `first_slot + r` in
    /// `FW_RULE3` and `FW_RULE_CTR2`.
    pub first_slot: u32,
    /// 1 + rule `r` when the endpoint's first rule in the table is `r`,
    /// an Allow or Deny that every packet matches (in every class of every
    /// field): the verdict without a field's lookup or the scan (the
    /// default deny of an endpoint without policy, an allow-all). 0: the
    /// rules are searched.
    pub decided: u32,
}

/// Value of the endpoint array (`FW_EPA1`): the endpoint map's entry for
/// an interface with a small index, where it is one array lookup away
/// ([`endpoint_slot`]). All-zero, as the array starts, is "no entry".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointSlot {
    pub class: u32,
    pub first_slot: u32,
    /// 1 where the endpoint map has the entry, else 0.
    pub present: u32,
    /// [`EndpointValue::decided`].
    pub decided: u32,
}

impl EndpointSlot {
    /// The slot holding `v`.
    #[inline(always)]
    pub const fn holding(v: &EndpointValue) -> EndpointSlot {
        EndpointSlot {
            class: v.class,
            first_slot: v.first_slot,
            present: 1,
            decided: v.decided,
        }
    }

    /// The entry the slot holds, if any.
    #[inline(always)]
    pub const fn value(&self) -> Option<EndpointValue> {
        if self.present == 0 {
            return None;
        }
        Some(EndpointValue {
            class: self.class,
            first_slot: self.first_slot,
            decided: self.decided,
        })
    }
}

/// Where the endpoint array holds the entry of `key` (a table's or a
/// summary's), if its interface has a small enough index
/// ([`ENDPOINT_ARRAY_IFINDEXES`]); `None` for one the endpoint map alone
/// holds.
#[inline(always)]
pub const fn endpoint_slot(key: &EndpointKey) -> Option<u32> {
    if key.ifindex >= ENDPOINT_ARRAY_IFINDEXES {
        return None;
    }
    let row = if key.table & SUMMARY_TABLE != 0 {
        MAX_TABLES + (key.table & !SUMMARY_TABLE)
    } else {
        key.table
    };
    if row >= ENDPOINT_ARRAY_ROWS {
        return None;
    }
    Some(row * ENDPOINT_ARRAY_IFINDEXES + key.ifindex)
}

/// Data part of an IPv4 address trie key. Field order is LPM order: the
/// table id first, so a prefix never spans two tables.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrV4Key {
    /// [`table_id`], big-endian.
    pub table: [u8; 4],
    /// Address in network order.
    pub addr: [u8; 4],
}

/// Data part of an IPv6 address trie key, laid out like [`AddrV4Key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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

/// Data part of a failsafe trie key (`FW_FAILSAFE1`, docs/semantics.md
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

/// Entries of the failsafe port filter (`FW_FSPORT1`): one byte per port,
/// in front of the failsafe trie. Most packets are to no failsafe port,
/// and an array lookup is a few instructions where a trie walk is tens of
/// nanoseconds.
pub const FAILSAFE_PORTS: u32 = 65_536;

/// The bit of a port's byte in `FW_FSPORT1` that says some failsafe entry
/// of `direction`, protocol `proto` (6 or 17) and family (4 or 6) has that
/// port: only then is the trie asked. An entry without a net sets the bit
/// of both families.
#[inline(always)]
pub const fn failsafe_port_bit(direction: u8, proto: u8, family: u8) -> u8 {
    let d = (direction & 1) << 2;
    let p = if proto == 17 { 2 } else { 0 };
    let f = if family == 6 { 1 } else { 0 };
    1 << (d | p | f)
}

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

/// Log records: what a kernel program tells the agent about one packet a
/// `Log` rule matched (or, with `--log-denied`, one it dropped), through
/// the `FW_EVENTS2` ring buffer.
pub mod events {
    use crate::MAX_RULE_SLOTS;

    /// Bytes of the packet a record keeps, from the link-layer header: room
    /// for two VLAN tags, an IPv6 header with a few extension headers or
    /// an IPv4 header with options, an ICMP error and the headers of the
    /// packet it quotes.
    pub const CAPTURE: usize = 256;
    /// Default size of the ring buffer (a power of two pages).
    pub const DEFAULT_RING_BYTES: u32 = 1 << 20;
    /// Log rules one stage can note for one packet; more are counted lost.
    pub const MAX_NOTED: usize = 4;
    /// Index of the logger in its program array (`FW_TAILX1`, `FW_TAILT1`).
    pub const LOGGER: u32 = 0;
    /// Index of the token bucket and counters of drops no rule decided.
    pub const NO_RULE: u32 = MAX_RULE_SLOTS;
    /// Entries of the bucket and counter maps: every rule slot, then
    /// [`NO_RULE`].
    pub const SLOTS: u32 = MAX_RULE_SLOTS + 1;

    /// The hook a record comes from.
    pub mod hook {
        pub const XDP: u8 = 0;
        pub const TC_INGRESS: u8 = 1;
        pub const TC_EGRESS: u8 = 2;
        pub const NAMES: [&str; 3] = ["xdp", "tc-ingress", "tc-egress"];
    }

    /// Why a record was written.
    pub mod kind {
        /// A Log rule matched.
        pub const LOG: u8 = 1;
        /// The packet was dropped (`--log-denied`).
        pub const DENIED: u8 = 2;
    }

    /// What the record says was decided: `NONE` for a Log rule (it decides
    /// nothing; the packet goes on), `DENY` for a drop.
    pub mod verdict {
        /// No rule decided in the stage.
        pub const NONE: u8 = 0;
        pub const ALLOW: u8 = 1;
        pub const DENY: u8 = 2;
    }

    /// One record.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct Record {
        /// `bpf_ktime_get_ns` (boot-relative, without suspend).
        pub time_ns: u64,
        /// The interface the packet came in on (0: none, host-originated).
        pub in_ifindex: u32,
        /// The interface it leaves by (0: not known at this hook).
        pub out_ifindex: u32,
        /// The rule slot that logged or decided; [`NO_RULE`] if none.
        pub slot: u32,
        /// The packet's length from the link-layer header.
        pub packet_len: u32,
        /// [`hook`].
        pub hook: u8,
        /// `Stage` as a number.
        pub stage: u8,
        /// `Direction` as a number.
        pub direction: u8,
        /// [`verdict`].
        pub verdict: u8,
        /// [`kind`].
        pub kind: u8,
        pub _pad: u8,
        /// Bytes of `data` that hold the packet.
        pub captured: u16,
        /// The outer VLAN tag the kernel took out of the frame before the
        /// hook (TC: the skb's tag), its protocol (0x8100, 0x88a8) in host
        /// order, or 0: then any tags are in `data`.
        pub vlan_proto: u16,
        /// That tag's TCI (priority and VLAN ID).
        pub vlan_tci: u16,
        pub _pad2: u32,
        /// The packet's first bytes (tags the kernel left in the frame
        /// included).
        pub data: [u8; CAPTURE],
    }

    /// Logging settings, one entry of `FW_LOGCFG1`, written by the agent.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Config {
        /// Nanoseconds per record and rule (1e9 / rate); 0: no limit.
        pub interval_ns: u64,
        /// How far ahead of now a bucket may run: burst × interval.
        pub burst_ns: u64,
        /// Non-zero: write a record for every dropped packet.
        pub log_denied: u32,
        pub _pad: u32,
    }

    /// Records per rule slot (per CPU).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Counter {
        /// Written to the ring buffer.
        pub emitted: u64,
        /// Left out by the rule's token bucket.
        pub limited: u64,
        /// Lost: the ring buffer was full, or more Log rules matched in
        /// one stage than a packet can note.
        pub lost: u64,
    }

    const _: () = assert!(core::mem::size_of::<Record>() == 40 + CAPTURE);
    const _: () = assert!(core::mem::size_of::<Config>() == 24);
}

/// Why a program returned what it did; indexes `FW_STATS2`.
///
/// Append-only: never renumber or reuse a value (counters and dashboards
/// outlive agent versions).
pub mod reason {
    /// The frame is not one the parser understands (ARP, LLDP, …): passed.
    pub const PASS_NOT_IP: u32 = 0;
    /// No longer produced: a truncated IP packet is dropped
    /// ([`DROP_MALFORMED`]). Kept so the numbering stays stable.
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
    /// A failsafe port: the stage is skipped (4).
    pub const PASS_FAILSAFE: u32 = 9;
    /// Conntrack knows the flow (established, a reply, or a related ICMP
    /// error): accepted before policy (docs/semantics.md 3.4).
    pub const ALLOW_CONNTRACK: u32 = 10;
    /// TC ingress: the packet is not for this node; the forward stage judges
    /// it at TC egress.
    pub const PASS_FORWARDED: u32 = 11;
    /// A non-first fragment whose first fragment (which carried the ports)
    /// this hook judged and passed moments ago: it follows that verdict.
    pub const PASS_FRAGMENT: u32 = 12;
    /// An earlier stage (untracked or pre-DNAT) allowed the packet, so the
    /// later host-policy stages of its endpoint are skipped (3.7, 3.8).
    pub const ALLOW_EARLIER_STAGE: u32 = 13;
    /// Not a packet any stage of this hook polices (TC egress: forwarded
    /// traffic that touches no host endpoint).
    pub const PASS_NOT_POLICED: u32 = 14;
    /// An IP packet policy cannot be judged on, dropped (fail closed): a
    /// header or the L4 fields rules read (ports, TCP flags, ICMP type and
    /// code) lie beyond the frame, a first fragment too short to hold them
    /// (RFC 1858, RFC 7112), a TCP fragment at offset 8 (RFC 3128), more
    /// VLAN tags or IPv6 extension headers than the parser walks, or an
    /// IP header the kernel would refuse too.
    pub const DROP_MALFORMED: u32 = 15;
    /// A non-first fragment whose first fragment this hook did not pass
    /// (denied, never seen, or arrived later): dropped.
    pub const DROP_FRAGMENT: u32 = 16;
    /// Not a verdict but an event, counted beside the packet's own reason:
    /// a flow qualified as assured but the assured table was full, so it
    /// stays in the LRU table (where new flows may evict it; its packets
    /// are then judged again by policy, the safe side).
    pub const EVENT_ASSURED_TABLE_FULL: u32 = 17;
    /// Number of reason slots in `FW_STATS2`.
    pub const COUNT: u32 = 32;

    /// Whether a program returning this reason dropped the packet.
    pub const fn is_drop(reason: u32) -> bool {
        matches!(reason, DROP_RULE | DROP_MALFORMED | DROP_FRAGMENT)
    }

    /// Every reason with its name, as `filter-agent stats` (text and JSON)
    /// and the metrics show it: the one table of names, next to the codes.
    pub const NAMES: [(u32, &str); 18] = [
        (PASS_NOT_IP, "pass_not_ip"),
        (PASS_TRUNCATED, "pass_truncated"),
        (PASS_NO_POLICY, "pass_no_policy"),
        (PASS_NO_VERDICT, "pass_no_verdict"),
        (ALLOW_RULE, "allow_rule"),
        (DROP_RULE, "drop_rule"),
        (PASS_TABLE_ERROR, "pass_table_error"),
        (PASS_TC_OBSERVED, "pass_tc_observed"),
        (PASS_TOO_MANY_HOPS, "pass_too_many_hops"),
        (PASS_FAILSAFE, "pass_failsafe"),
        (ALLOW_CONNTRACK, "allow_conntrack"),
        (PASS_FORWARDED, "pass_forwarded"),
        (PASS_FRAGMENT, "pass_fragment"),
        (ALLOW_EARLIER_STAGE, "allow_earlier_stage"),
        (PASS_NOT_POLICED, "pass_not_policed"),
        (DROP_MALFORMED, "drop_malformed"),
        (DROP_FRAGMENT, "drop_fragment"),
        (EVENT_ASSURED_TABLE_FULL, "event_assured_table_full"),
    ];

    // Every code below COUNT has a name, once.
    const _: () = {
        let mut i = 0;
        while i < NAMES.len() {
            assert!(NAMES[i].0 == i as u32, "NAMES lists the codes in order");
            i += 1;
        }
        assert!(NAMES.len() as u32 <= COUNT);
    };
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
    /// A TC program that only returns TC_ACT_OK: the benchmark's TC
    /// baseline.
    pub const PROG_TC_PASS: &str = "fw_tc_pass";
    /// The real-traffic benchmark's ceiling: XDP_DROP and nothing else.
    pub const PROG_DROP: &str = "fw_drop";
    /// The XDP logger: writes Log records, reached by tail call.
    pub const PROG_XDP_LOG: &str = "fw_xdp_log";
    /// The TC logger, likewise.
    pub const PROG_TC_LOG: &str = "fw_tc_log";
    /// The XDP logger (a program array holds programs of one type).
    pub const MAP_TAIL_XDP: &str = "FW_TAILX1";
    /// The TC logger.
    pub const MAP_TAIL_TC: &str = "FW_TAILT1";
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
    /// IPv4 source host addresses (/32) of `MAP_SRC_V4`'s tables, exact
    /// ([`crate::hosts4`]).
    pub const MAP_SRC_V4_EXACT: &str = "FW_SRC4H1";
    /// IPv4 destination host addresses, likewise.
    pub const MAP_DST_V4_EXACT: &str = "FW_DST4H1";
    /// IPv6 source host addresses (/128), likewise.
    pub const MAP_SRC_V6_EXACT: &str = "FW_SRC6X2";
    /// IPv6 destination host addresses, likewise.
    pub const MAP_DST_V6_EXACT: &str = "FW_DST6X2";
    /// Protocol / destination port trie.
    pub const MAP_PORT: &str = "FW_PORT1";
    /// Protocol / source port trie.
    pub const MAP_SPORT: &str = "FW_SPORT1";
    /// Single destination ports of `MAP_PORT`'s tables, exact.
    pub const MAP_PORT_EXACT: &str = "FW_PORTX1";
    /// Single source ports of `MAP_SPORT`'s tables, exact.
    pub const MAP_SPORT_EXACT: &str = "FW_SPORTX1";
    /// Per table, the lookups it does not need ([`crate::TableHints`]).
    pub const MAP_TABLE_HINTS: &str = "FW_TABLE1";
    /// Class → where its bitmap words are.
    pub const MAP_CLASS: &str = "FW_CLASS2";
    /// The non-zero words of all class bitmaps.
    pub const MAP_CLASS_WORDS: &str = "FW_WORD1";
    /// Endpoint classes.
    pub const MAP_ENDPOINT: &str = "FW_EP3";
    /// The endpoint entries of interfaces with small indexes, again
    /// ([`crate::endpoint_slot`]).
    pub const MAP_ENDPOINT_SLOTS: &str = "FW_EPA1";
    /// Rule metadata.
    pub const MAP_RULE: &str = "FW_RULE3";
    /// Per-rule counters.
    pub const MAP_RULE_COUNTERS: &str = "FW_RULE_CTR2";
    /// Per-reason packet counters.
    pub const MAP_STATS: &str = "FW_STATS2";
    /// Failsafe ports.
    pub const MAP_FAILSAFE: &str = "FW_FAILSAFE1";
    /// Which ports have failsafe entries (`crate::failsafe_port_bit`).
    pub const MAP_FAILSAFE_PORTS: &str = "FW_FSPORT1";
    /// Connection tracking table.
    pub const MAP_CONNTRACK: &str = "FW_CT2";
    /// The assured flows (`ct::ASSURED`): a hash, not an LRU, so a flood of
    /// new flows cannot evict them.
    pub const MAP_CONNTRACK_ASSURED: &str = "FW_CTA1";
    /// Conntrack's presence filter: a byte per slot of
    /// [`crate::CtKey::seen_slot`], the epoch it was last marked in, eight
    /// to an entry ([`crate::CT_SEEN_WORDS`]), memory-mapped by the agent.
    pub const MAP_CT_SEEN: &str = "FW_CTSEEN2";
    /// The presence filter's control word (`ct::EPOCH_ENABLED`). Renamed
    /// with the filter, so an agent adopting the maps of one that had the
    /// filter of another layout starts with it off (control 0).
    pub const MAP_CT_EPOCH: &str = "FW_CTEPOCH2";
    /// The node's own addresses.
    pub const MAP_HOST: &str = "FW_HOST1";
    /// Service frontends.
    pub const MAP_SERVICES: &str = "FW_SVC2";
    /// The first fragments each hook passed (`FragKey` → time).
    pub const MAP_FRAGMENTS: &str = "FW_FRAG1";
    /// Log records ([`crate::events::Record`]) for the agent.
    pub const MAP_EVENTS: &str = "FW_EVENTS2";
    /// Logging settings ([`crate::events::Config`]).
    pub const MAP_LOG_CONFIG: &str = "FW_LOGCFG1";
    /// Per-rule token buckets of Log records (time the bucket is full).
    pub const MAP_LOG_BUCKETS: &str = "FW_LOGTB1";
    /// Per-rule emitted / rate-limited / lost records (per CPU).
    pub const MAP_LOG_COUNTERS: &str = "FW_LOGCTR1";
    /// The records the packet under way owes, per CPU, for its logger; a
    /// map of each object's own until it was pinned.
    pub const MAP_LOG_PENDING: &str = "FW_PENDING1";

    /// Every pinned map: the agent checks the loaded object has each, so a
    /// name changed on one side only fails at load, not at first use.
    pub const MAPS: [&str; 36] = [
        MAP_GENERATION,
        MAP_SRC_V4,
        MAP_DST_V4,
        MAP_SRC_V6,
        MAP_DST_V6,
        MAP_SRC_V4_EXACT,
        MAP_DST_V4_EXACT,
        MAP_SRC_V6_EXACT,
        MAP_DST_V6_EXACT,
        MAP_PORT,
        MAP_SPORT,
        MAP_PORT_EXACT,
        MAP_SPORT_EXACT,
        MAP_TABLE_HINTS,
        MAP_CLASS,
        MAP_CLASS_WORDS,
        MAP_ENDPOINT,
        MAP_RULE,
        MAP_RULE_COUNTERS,
        MAP_STATS,
        MAP_FAILSAFE,
        MAP_FAILSAFE_PORTS,
        MAP_CONNTRACK,
        MAP_CONNTRACK_ASSURED,
        MAP_HOST,
        MAP_SERVICES,
        MAP_FRAGMENTS,
        MAP_EVENTS,
        MAP_LOG_CONFIG,
        MAP_LOG_BUCKETS,
        MAP_LOG_COUNTERS,
        MAP_LOG_PENDING,
        MAP_TAIL_XDP,
        MAP_TAIL_TC,
        MAP_CT_SEEN,
        MAP_CT_EPOCH,
    ];

    /// Every program, likewise.
    pub const PROGRAMS: [&str; 8] = [
        PROG_XDP,
        PROG_TC_INGRESS,
        PROG_TC_EGRESS,
        PROG_PASS,
        PROG_TC_PASS,
        PROG_DROP,
        PROG_XDP_LOG,
        PROG_TC_LOG,
    ];
}

/// The verdict XDP hands to TC ingress in the packet's metadata area
/// (`bpf_xdp_adjust_meta`), as Calico's own BPF dataplane does.
///
/// TC trusts the area only when `magic` matches: the magic carries the
/// layout version, so a TC program never misreads metadata written by
/// an XDP program of another layout (or by nobody).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpMeta {
    /// [`XDP_META_MAGIC`].
    pub magic: u32,
    /// One of [`xdp_verdict`].
    pub verdict: u32,
}

/// Identifies an [`XdpMeta`] of this layout (`"fw"` + layout version 1).
pub const XDP_META_MAGIC: u32 = 0x6677_0001;

/// The IPv4 host addresses (/32s) of the address tries' tables, exact:
/// an open-addressed table in an array map of 64-byte buckets, one cache
/// line, where a hash map took a bucket and an element in two (a list of a
/// million sources leaves the cache, and each packet paid both misses).
/// The agent writes it through a shared mapping of the array
/// (`BPF_F_MMAPABLE`), one aligned 8-byte store a slot, and is its only
/// writer; the programs read it.
///
/// A bucket is [`Bucket`]: word 0 the farthest, in buckets, that an entry
/// whose home is this bucket lies from it (0: all in the home bucket), then
/// [`BUCKET_SLOTS`] slots. A slot is 0 when empty, else [`slot`]: the
/// address, 1 + the table id and the class, so one compare matches both
/// the table and the address. A lookup reads the home bucket ([`home`])
/// and, as far as its word 0 says, the ones after it, at most
/// [`PROBE_BUCKETS`] in all; the agent places an entry in the first free
/// slot within that reach and refuses one it cannot place (the table is
/// sized at under 60 % full, so that does not happen by chance).
///
/// Both generations share the table. A slot of the generation being
/// written matches no packet's table until it goes live, so each slot and
/// word 0 can change one store at a time under the readers.
pub mod hosts4 {
    /// One bucket: the reach word, then the slots.
    pub type Bucket = [u64; 8];
    /// Slots a bucket holds.
    pub const BUCKET_SLOTS: usize = 7;
    /// The most buckets a lookup reads: the home bucket and the next seven.
    pub const PROBE_BUCKETS: u32 = 8;
    /// The fewest buckets a table has, so that a reach never wraps round
    /// onto the home bucket.
    pub const MIN_BUCKETS: u32 = PROBE_BUCKETS;
    /// The class bits of a slot. Classes are below `MAX_CLASSES` (2^17).
    pub const CLASS_BITS: u32 = 24;
    const CLASS_MASK: u64 = (1 << CLASS_BITS) - 1;
    // A slot's table byte holds 1 + the table id, 0 meaning empty.
    const _: () = assert!(super::MAX_TABLES < 0xff);
    const _: () = assert!(super::MAX_CLASSES <= 1 << CLASS_BITS);

    /// The slot bits that name the table and address (`slot` without its
    /// class): what a lookup compares.
    #[inline(always)]
    pub const fn key(table: u32, addr: [u8; 4]) -> u64 {
        ((u32::from_be_bytes(addr) as u64) << 32) | (((table + 1) as u64) << CLASS_BITS)
    }

    /// The slot holding `class` for `table` and `addr`.
    #[inline(always)]
    pub const fn slot(table: u32, addr: [u8; 4], class: u32) -> u64 {
        key(table, addr) | (class as u64 & CLASS_MASK)
    }

    /// The class a slot holds if it holds `key`'s.
    #[inline(always)]
    pub const fn class_if(slot: u64, key: u64) -> Option<u32> {
        if slot & !CLASS_MASK == key {
            Some((slot & CLASS_MASK) as u32)
        } else {
            None
        }
    }

    /// The table id of a full slot.
    #[inline(always)]
    pub const fn table_of(slot: u64) -> u32 {
        (((slot >> CLASS_BITS) & 0xff) as u32).wrapping_sub(1)
    }

    /// The home bucket of `key` in a table of `mask + 1` buckets: the
    /// middle bits of a multiplicative (Fibonacci) hash, which spreads
    /// runs of addresses, the usual shape of a list, evenly.
    #[inline(always)]
    pub const fn home(key: u64, mask: u32) -> u32 {
        ((key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32) & mask
    }

    /// The programs' globals holding the source and destination tables'
    /// bucket masks (buckets − 1), set when the agent loads them with the
    /// maps' size.
    pub const MASK_GLOBALS: [&str; 2] = ["FW_SRC4H_MASK", "FW_DST4H_MASK"];

    /// The class of `key`'s entry in a table of `mask + 1` buckets, where
    /// `bucket(b)` reads bucket `b`: the home bucket, then as many after
    /// it as its reach word says. The programs' lookup, and the agent's
    /// tests' model of it.
    #[inline(always)]
    pub fn lookup<'a>(
        bucket: impl Fn(u32) -> Option<&'a Bucket>,
        mask: u32,
        key: u64,
    ) -> Option<u32> {
        let home = home(key, mask);
        let reach = bucket(home)?[0];
        for d in 0..PROBE_BUCKETS {
            if d as u64 > reach {
                break;
            }
            let b = bucket(home.wrapping_add(d) & mask)?;
            let mut w = 1;
            while w < 8 {
                if let Some(class) = class_if(b[w], key) {
                    return Some(class);
                }
                w += 1;
            }
        }
        None
    }

    /// Buckets for `entries` entries over both generations: a power of
    /// two with 1.75 slots an entry or more (at most 4/7 full).
    pub const fn buckets(entries: u32) -> u32 {
        let b = (entries / 4).next_power_of_two();
        if b < MIN_BUCKETS {
            MIN_BUCKETS
        } else {
            b
        }
    }
}

/// `cargo xtask bench`'s component profile: parts of `fw_xdp` and
/// `fw_tc_in` a benchmark load switches off, as bits of the read-only
/// global [`bench_skip::GLOBAL`] set when the object is loaded. The agent
/// leaves it 0, and the verifier then removes every check (a known
/// constant), so the switches cost the enforcing programs nothing.
pub mod bench_skip {
    /// The global's symbol.
    pub const GLOBAL: &str = "FW_BENCH_SKIP";
    /// The failsafe lookups.
    pub const FAILSAFE: u32 = 1;
    /// The untracked stage.
    pub const UNTRACKED: u32 = 2;
    /// The conntrack lookups (every packet is a new flow).
    pub const CONNTRACK: u32 = 4;
    /// The pre-DNAT stage.
    pub const PRE_DNAT: u32 = 8;
    /// In every stage, the classifier's scan (its map lookups still run).
    pub const SCAN: u32 = 16;
    /// The table hints ([`crate::TableHints`]): every field looked up.
    pub const HINTS: u32 = 32;
    /// TC ingress: the FIB lookup that tells host-bound from forwarded
    /// packets (every packet taken as host-bound).
    pub const HOST_BOUND: u32 = 64;
    /// TC ingress: the normal stage (its packets pass).
    pub const NORMAL: u32 = 128;
}

/// Verdicts XDP hands to TC in [`XdpMeta::verdict`].
pub mod xdp_verdict {
    /// XDP ran its stages and none decided (or conntrack or failsafe let
    /// the packet skip them): TC goes on with the host-policy stages.
    pub const NONE: u32 = 0;
    /// The untracked stage allowed the packet: no conntrack entry, later
    /// host-policy stages skipped (docs/semantics.md 3.8).
    pub const UNTRACKED_ALLOW: u32 = 1;
    /// The pre-DNAT stage allowed the packet: the normal and forward
    /// ingress stages of this endpoint are skipped (3.7).
    pub const PRE_DNAT_ALLOW: u32 = 2;
}

/// `skb->mark` bits TC ingress sets so that TC egress, after routing, knows
/// an earlier stage of the incoming endpoint allowed a forwarded packet.
/// Outside Calico's (0xffff0000 by default, but configurable) and
/// kube-proxy's (0x4000, 0x8000) usual bits.
pub mod mark {
    /// Both bits.
    pub const MASK: u32 = 0x0000_0300;
    /// The incoming endpoint's untracked stage allowed it.
    pub const UNTRACKED: u32 = 0x0000_0100;
    /// The incoming endpoint's pre-DNAT stage allowed it.
    pub const PRE_DNAT: u32 = 0x0000_0200;
}

/// Connection tracking (docs/design.md, "Conntrack"; docs/conntrack.md).
///
/// One LRU hash entry per flow, keyed by the normalized 5-tuple: the
/// lower (address, port) end is side A. The value records which side
/// opened the flow, whether the other side answered, and the TCP closing
/// flags; the expiry follows from those (the same [`ct::timeout_ns`] in the
/// kernel, which ignores stale entries, and in the agent's sweeper, which
/// deletes them).
pub mod ct {
    /// Side A opened the flow (else side B did).
    pub const OPENED_BY_A: u32 = 1 << 0;
    /// The answering side has sent a packet: the flow is established.
    pub const SEEN_REPLY: u32 = 1 << 1;
    /// TCP FIN seen from side A.
    pub const FIN_A: u32 = 1 << 2;
    /// TCP FIN seen from side B.
    pub const FIN_B: u32 = 1 << 3;
    /// TCP RST seen.
    pub const RST: u32 = 1 << 4;
    /// Recorded at TC ingress for a forwarded flow under its pre-DNAT
    /// tuple, before the forward stage judged it: only a reply seen at TC
    /// egress (after the kernel's un-NAT and source checks) establishes it.
    pub const FORWARD_PENDING: u32 = 1 << 5;
    /// TCP: `CtValue::end_a` holds the end of what side A has sent.
    pub const END_A: u32 = 1 << 6;
    /// TCP: `CtValue::end_b` holds the end of what side B has sent.
    pub const END_B: u32 = 1 << 7;
    /// How far a RST's sequence number may lie from the end of what its
    /// sender has sent (segments this hook did not see, data in flight)
    /// and still close the flow: a blind attacker must hit a 128 KiB window
    /// of the 4 GiB sequence space (1 in 32,768 per try). A RST outside it
    /// passes (the endpoint's own stack judges it, RFC 5961) but leaves the
    /// flow's state alone.
    pub const RST_WINDOW: u32 = 1 << 16;
    /// The flow is assured and lives in the assured table (`FW_CTA1`),
    /// from which nothing evicts it: TCP once its handshake completed (the
    /// opener acknowledged the answer), UDP and other protocols once both
    /// sides sent and the flow is more than [`ASSURED_AFTER`] units old
    /// (netfilter's rule). ICMP echo flows are never assured.
    pub const ASSURED: u32 = 1 << 8;
    /// Age (in `CtValue::opened` units) an answered non-TCP flow needs to
    /// be assured: two, as netfilter's 2 s for UDP streams.
    pub const ASSURED_AFTER: u32 = 2;
    /// `CtValue::opened` units: nanoseconds shifted right by this.
    pub const OPENED_SHIFT: u32 = 30;

    /// `now` (nanoseconds, CLOCK_MONOTONIC) in `CtValue::opened` units.
    #[inline(always)]
    pub const fn opened_units(now: u64) -> u32 {
        (now >> OPENED_SHIFT) as u32
    }

    const SECOND: u64 = 1_000_000_000;
    /// TCP, opened but not answered (netfilter's SYN_SENT is 120 s).
    pub const TCP_OPENING: u64 = 120 * SECOND;
    /// TCP, established (netfilter: 5 days; Calico's BPF dataplane: 1 h).
    pub const TCP_ESTABLISHED: u64 = 24 * 3600 * SECOND;
    /// TCP after a FIN from each side (netfilter's TIME_WAIT).
    pub const TCP_CLOSING: u64 = 120 * SECOND;
    /// TCP after a RST (netfilter's CLOSE).
    pub const TCP_RESET: u64 = 10 * SECOND;
    /// UDP, not answered (netfilter: 30 s).
    pub const UDP_OPENING: u64 = 30 * SECOND;
    /// UDP, answered (netfilter's stream timeout).
    pub const UDP_ESTABLISHED: u64 = 180 * SECOND;
    /// ICMP echo (netfilter: 30 s).
    pub const ICMP: u64 = 30 * SECOND;
    /// Other protocols (netfilter's generic timeout).
    pub const OTHER: u64 = 600 * SECOND;

    /// How long an entry with `flags` of protocol `proto` lives after its
    /// last packet.
    #[inline(always)]
    pub const fn timeout_ns(proto: u8, flags: u32) -> u64 {
        match proto {
            super::proto::TCP => {
                if flags & RST != 0 {
                    TCP_RESET
                } else if flags & (FIN_A | FIN_B) == FIN_A | FIN_B {
                    TCP_CLOSING
                } else if flags & SEEN_REPLY != 0 {
                    TCP_ESTABLISHED
                } else {
                    TCP_OPENING
                }
            }
            super::proto::UDP | super::proto::SCTP => {
                if flags & SEEN_REPLY != 0 {
                    UDP_ESTABLISHED
                } else {
                    UDP_OPENING
                }
            }
            super::proto::ICMP | super::proto::ICMPV6 => ICMP,
            _ => OTHER,
        }
    }

    /// Default number of entries of the conntrack table.
    pub const DEFAULT_SIZE: u32 = 262_144;

    /// The presence filter's control word (`FW_CTEPOCH1`): the current
    /// epoch (1 to 255; 0 before the agent's first sweep) in the low byte,
    /// and this bit once lookups may trust the filter.
    pub const EPOCH_ENABLED: u32 = 1 << 8;

    /// The epoch after `epoch` (255 wraps to 1: 0 means never marked).
    #[inline(always)]
    pub const fn next_epoch(epoch: u8) -> u8 {
        if epoch == 255 {
            1
        } else {
            epoch + 1
        }
    }

    /// The mark a flow's slot gets when its entry is inserted under control
    /// word `control`: the current epoch, or none before the agent has
    /// started one. Every writer of the tables marks with it, after the
    /// insert (the sweeper's walk must be able to find any flow whose mark
    /// it may overwrite).
    #[inline(always)]
    pub const fn insert_mark(control: u32) -> Option<u8> {
        match control as u8 {
            0 => None,
            epoch => Some(epoch),
        }
    }

    /// Whether a slot marked `mark` may hold a flow under control word
    /// `control`: always while the filter is not enabled; else when it was
    /// marked in the epoch before the current one, the current one or the
    /// next. The epoch before: an entry inserted after the sweeper's walk
    /// passed it carries the epoch before the flip. The next: the sweeper
    /// marks what its walk found with the next epoch before it flips, and
    /// in between those slots hold only that mark. A slot of a flow that
    /// is gone ages out after two flips.
    #[inline(always)]
    pub const fn may_have_flow(mark: u8, control: u32) -> bool {
        if control & EPOCH_ENABLED == 0 {
            return true;
        }
        let epoch = control as u8;
        mark != 0 && (mark == epoch || next_epoch(mark) == epoch || mark == next_epoch(epoch))
    }
}

/// Key of the conntrack table: a flow's 5-tuple with the lower (address,
/// port) end first, so both directions find one entry. ICMP echo flows use
/// the echo identifier as both ports; other portless protocols use 0.
///
/// Aligned to 8, as the kernel's `Packet` is: LLVM's BPF backend copies
/// and reads a field it only knows as byte-aligned one byte at a time
/// (each address became 16 byte loads and 16 byte stores), where an
/// aligned one takes two eight-byte moves. The layout and size (40) are
/// the same either way.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// 4 or 6.
    pub family: u8,
    /// IP protocol.
    pub proto: u8,
    /// Side A's port, network order.
    pub port_a: [u8; 2],
    /// Side B's port, network order.
    pub port_b: [u8; 2],
    /// Zero.
    pub pad: [u8; 2],
    /// Side A's address, network order; IPv4 in the first four bytes.
    pub addr_a: [u8; 16],
    /// Side B's address.
    pub addr_b: [u8; 16],
}

/// Slots of the conntrack presence filter (`names::MAP_CT_SEEN`, a byte
/// each): 128 KiB, which stays in cache where the tables' bucket arrays
/// do not.
pub const CT_SEEN_SLOTS: u32 = 1 << 17;

/// Entries of the presence filter's array map: eight slots to a `u64`. An
/// array map gives every entry at least eight bytes, so a byte an entry
/// would take 1 MiB and a line of cache per eight slots.
pub const CT_SEEN_WORDS: u32 = CT_SEEN_SLOTS / 8;

impl CtKey {
    /// This key's slot in the presence filter: a cheap hash of the ends.
    #[inline(always)]
    pub fn seen_slot(&self) -> u32 {
        let w = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut h: u32 = (u32::from(self.proto) << 8)
            ^ u32::from_ne_bytes([
                self.port_a[0],
                self.port_a[1],
                self.port_b[0],
                self.port_b[1],
            ]);
        h = (h ^ w(&self.addr_a, 0)).wrapping_mul(0x9e37_79b1);
        h = (h ^ w(&self.addr_b, 0)).wrapping_mul(0x85eb_ca77);
        h = (h ^ w(&self.addr_a, 12) ^ w(&self.addr_b, 12)).wrapping_mul(0xc2b2_ae3d);
        (h ^ (h >> 15)) & (CT_SEEN_SLOTS - 1)
    }

    /// A key of `family` and `proto` with the ends still to [`CtKey::fill`].
    #[inline(always)]
    pub const fn new(family: u8, proto: u8) -> CtKey {
        CtKey {
            family,
            proto,
            port_a: [0; 2],
            port_b: [0; 2],
            pad: [0; 2],
            addr_a: [0; 16],
            addr_b: [0; 16],
        }
    }

    /// The key of a packet from (`src`, `sport`) to (`dst`, `dport`) and
    /// whether its source is side A: the lower (address, port) end, compared
    /// lexicographically, so both directions find one entry. Kernel and
    /// agent build keys with this one function (the kernel through
    /// [`CtKey::fill`], which writes in place: its stack is 512 bytes).
    pub fn normalized(
        family: u8,
        proto: u8,
        src: &[u8; 16],
        dst: &[u8; 16],
        sport: u16,
        dport: u16,
    ) -> (CtKey, bool) {
        let mut key = CtKey::new(family, proto);
        let src_is_a = key.fill(src, dst, sport, dport);
        (key, src_is_a)
    }

    /// Writes the addresses and ports of [`CtKey::normalized`] into `self`
    /// (family and protocol are the caller's); returns whether `src` is
    /// side A.
    #[inline(always)]
    pub fn fill(&mut self, src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16) -> bool {
        // Lexicographic order of the bytes is the order of the big-endian
        // halves: two comparisons of eight bytes where a byte loop with an
        // early exit kept the kernel from reading more than a byte at once.
        let (s, d) = (be_halves(src), be_halves(dst));
        let src_is_a = if s == d { sport <= dport } else { s < d };
        if src_is_a {
            self.addr_a = *src;
            self.addr_b = *dst;
            self.port_a = sport.to_be_bytes();
            self.port_b = dport.to_be_bytes();
        } else {
            self.addr_a = *dst;
            self.addr_b = *src;
            self.port_a = dport.to_be_bytes();
            self.port_b = sport.to_be_bytes();
        }
        src_is_a
    }
}

/// An address as two big-endian halves, high first: ordered as its bytes
/// are.
#[inline(always)]
fn be_halves(a: &[u8; 16]) -> (u64, u64) {
    let half = |i: usize| {
        u64::from_be_bytes([
            a[i],
            a[i + 1],
            a[i + 2],
            a[i + 3],
            a[i + 4],
            a[i + 5],
            a[i + 6],
            a[i + 7],
        ])
    };
    (half(0), half(8))
}

impl CtValue {
    /// Whether the entry of a flow of protocol `proto` is still alive at
    /// `now` (the same clock as `last_seen`): the kernel ignores dead
    /// entries, the agent's sweeper deletes them.
    #[inline(always)]
    pub const fn live(&self, proto: u8, now: u64) -> bool {
        now.saturating_sub(self.last_seen) <= ct::timeout_ns(proto, self.flags)
    }
}

/// Value of the conntrack table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// CLOCK_MONOTONIC of the last packet (the kernel reads the coarse
    /// clock: up to a tick behind).
    pub last_seen: u64,
    /// [`ct`] flags.
    pub flags: u32,
    /// TCP: sequence number after the last byte (SYN and FIN count one)
    /// side A has sent, when [`ct::END_A`] is set.
    pub end_a: u32,
    /// The same for side B ([`ct::END_B`]).
    pub end_b: u32,
    /// When the flow was opened, in units of 2^30 ns (about a second): the
    /// age a UDP flow needs to be assured.
    pub opened: u32,
}

/// Key of the fragment table (`FW_FRAG1`): one IP datagram whose first
/// fragment a hook passed. Its later fragments carry no L4 header; they
/// follow the first one's verdict (as Cilium does) or are dropped. The
/// protocol is not part of the key: an IPv6 fragment header names the next
/// header of the fragmentable part, not the upper layer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// 4 or 6.
    pub family: u8,
    /// The hook that passed the first fragment (`parse::slot` + 1 in the
    /// kernel): a later fragment follows the verdict of its own hook.
    pub hook: u8,
    /// Zero.
    pub pad: [u8; 2],
    /// IPv4 identification (16 bits) or IPv6 fragment identification.
    pub id: u32,
    /// Source address, network order; IPv4 in the first four bytes.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
}

/// Entries of the fragment table (an LRU: a flood of first fragments can
/// only cost later fragments of other datagrams their way in, never let
/// one through).
pub const MAX_FRAGMENTS: u32 = 16_384;

/// How long after its first fragment a datagram's later fragments are let
/// through: the kernel's reassembly timeout (`ipfrag_time`, 30 s).
pub const FRAGMENT_TIMEOUT_NS: u64 = 30_000_000_000;

/// Key of the node-address map (`FW_HOST1`): one of the node's own
/// addresses. Traffic to them is host-bound (docs/design.md).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostKey {
    /// 4 or 6.
    pub family: u8,
    /// Zero.
    pub pad: [u8; 3],
    /// The address, network order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
}

/// Entries in the node-address map.
pub const MAX_HOST_ADDRS: u32 = 1024;

/// Key of the service-frontend map (`FW_SVC2`): an address, protocol and
/// port kube-proxy rewrites. Traffic to a frontend is forwarded, not
/// host-bound, even when the address is the node's (a NodePort).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SvcKey {
    /// 4 or 6.
    pub family: u8,
    /// 6, 17 or 132.
    pub proto: u8,
    /// Port, network order.
    pub port: [u8; 2],
    /// Address, network order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
}

/// Entries in the service-frontend map.
pub const MAX_FRONTENDS: u32 = 65_536;

// Sizes are part of the ABI: no implicit padding anywhere.
const _: () = assert!(core::mem::size_of::<ClassHead>() == SUMMARY_WORDS * 12 + 8);
const _: () = assert!(
    SUMMARY_WORDS <= 32,
    "ClassHead::dense has a bit per summary word"
);
const _: () = assert!(core::mem::size_of::<EndpointValue>() == 12);
const _: () = assert!(core::mem::size_of::<TableHints>() == 4 * field::COUNT + 8);
// The verdict scan's summary words cover every bitmap word exactly.
const _: () = assert!(WORDS.is_multiple_of(64) && MAX_RULES.is_multiple_of(64));
const _: () = assert!(core::mem::size_of::<AddrV4Key>() == 8);
const _: () = assert!(core::mem::size_of::<AddrV6Key>() == 20);
const _: () = assert!(core::mem::size_of::<PortKey>() == 8);
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 8);
const _: () = assert!(core::mem::size_of::<FailsafeKey>() == 24);
const _: () = assert!(core::mem::size_of::<RuleMeta>() == 16);
const _: () = assert!(core::mem::size_of::<RuleCounter>() == 16);
const _: () = assert!(core::mem::size_of::<XdpMeta>() == 8);
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);
const _: () = assert!(core::mem::size_of::<CtValue>() == 24);
const _: () = assert!(core::mem::size_of::<HostKey>() == 20);
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);
const _: () = assert!(core::mem::size_of::<SvcKey>() == 20);
const _: () = assert!(
    table_id(GENERATIONS - 1, stage::FORWARD, direction::EGRESS) < TABLES_PER_GEN * GENERATIONS
);

#[cfg(feature = "user")]
mod pod {
    //! SAFETY (all impls): the types are `#[repr(C)]`, `Copy`, made only of
    //! integers and integer arrays, and have no padding (asserted above), so
    //! every bit pattern is a valid value.
    use super::*;
    unsafe impl aya::Pod for ClassHead {}
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for EndpointSlot {}
    unsafe impl aya::Pod for TableHints {}
    unsafe impl aya::Pod for AddrV4Key {}
    unsafe impl aya::Pod for AddrV6Key {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for FailsafeKey {}
    unsafe impl aya::Pod for RuleMeta {}
    unsafe impl aya::Pod for RuleCounter {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for HostKey {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for SvcKey {}
    unsafe impl aya::Pod for events::Record {}
    unsafe impl aya::Pod for events::Config {}
    unsafe impl aya::Pod for events::Counter {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_slots_are_distinct_and_in_range_for_small_indexes_only() {
        let mut seen = std::collections::BTreeSet::new();
        let tables = (0..GENERATIONS)
            .flat_map(|g| (0..TABLES_PER_GEN).map(move |t| g * TABLES_PER_GEN + t))
            .chain((0..GENERATIONS).map(summary_table));
        for table in tables {
            for ifindex in [0, 1, ENDPOINT_ARRAY_IFINDEXES - 1] {
                let slot = endpoint_slot(&EndpointKey { ifindex, table }).expect("a slot");
                assert!(slot < MAX_ENDPOINT_SLOTS);
                assert!(seen.insert(slot), "slot {slot} taken twice");
            }
            let large = EndpointKey {
                ifindex: ENDPOINT_ARRAY_IFINDEXES,
                table,
            };
            assert_eq!(endpoint_slot(&large), None);
        }
        let unknown = EndpointKey {
            ifindex: 1,
            table: summary_table(GENERATIONS),
        };
        assert_eq!(endpoint_slot(&unknown), None);
    }

    /// Side A is the lower (address bytes, port) end, whichever way the
    /// packet goes, for addresses that differ in each byte's place.
    #[test]
    fn a_flow_key_puts_the_lower_address_and_port_first_both_ways() {
        let mut addrs = vec![[0u8; 16], [0xff; 16]];
        for i in 0..16 {
            for v in [1, 0x7f, 0x80, 0xff] {
                let mut a = [0u8; 16];
                a[i] = v;
                addrs.push(a);
                let mut b = [0x11u8; 16];
                b[i] = v;
                addrs.push(b);
            }
        }
        for src in &addrs {
            for dst in &addrs {
                for (sport, dport) in [(1, 2), (2, 1), (7, 7), (0x8000, 1)] {
                    let (key, src_is_a) = CtKey::normalized(6, 17, src, dst, sport, dport);
                    assert_eq!(src_is_a, (src, sport) <= (dst, dport));
                    let (back, dst_is_a) = CtKey::normalized(6, 17, dst, src, dport, sport);
                    assert_eq!(key, back);
                    assert!(src_is_a != dst_is_a || (src, sport) == (dst, dport));
                    let (a, pa) = if src_is_a { (src, sport) } else { (dst, dport) };
                    assert_eq!((&key.addr_a, key.port_a), (a, pa.to_be_bytes()));
                }
            }
        }
    }
}
