//! Sizing to the policy the maps the kernel allocates when they are
//! created: the class arrays (an array map is allocated whole), the
//! host-address hashes (preallocated: element and bucket, per entry of
//! capacity) and the single-port hashes (16 bytes of buckets per entry of
//! capacity, up front; their elements come as they are written). The
//! tries allocate as entries come.
//!
//! A map cannot be resized and the programs hold theirs, so a policy that
//! does not fit, or needs less than an eighth, is written into new
//! programs whose maps have its room ([`super::Dataplane::publish`]).

use filter_common::{
    ClassHead, CLASSES_PER_GEN, CLASS_WORDS_PER_GEN, GENERATIONS, MAX_PORT_ENTRIES,
};

/// What each generation may hold of the sized maps: generation `g`'s
/// classes and words start at `g` times `heads` and `words`; each host
/// and port hash holds both generations, `hosts` or `ports` entries each.
/// Sized at twice what a generation needs, a power of two, between the
/// least asked for ([`Room::MIN`] by default) and the most the kernel's
/// tables (and `--max-prefixes`) allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// Class heads (`FW_CLASS2`) per generation.
    pub heads: u32,
    /// Class words (`FW_WORD1`) per generation.
    pub words: u32,
    /// Host addresses per generation in each exact hash, in
    /// [`HOST_MAPS`]' order.
    pub hosts: [u32; 4],
    /// Single ports (per protocol) per generation in each exact hash, in
    /// [`PORT_MAPS`]' order.
    pub ports: [u32; 2],
}

/// The host-address maps (IPv4 tables, IPv6 hashes), in [`Room::hosts`]'
/// order.
pub const HOST_MAPS: [&str; 4] = [
    filter_common::names::MAP_SRC_V4_EXACT,
    filter_common::names::MAP_DST_V4_EXACT,
    filter_common::names::MAP_SRC_V6_EXACT,
    filter_common::names::MAP_DST_V6_EXACT,
];

/// The single-port hashes, in [`Room::ports`]' order.
pub const PORT_MAPS: [&str; 2] = [
    filter_common::names::MAP_PORT_EXACT,
    filter_common::names::MAP_SPORT_EXACT,
];

/// Bytes of buckets a hash map allocates per entry of capacity.
const BUCKET_BYTES: u64 = 16;

/// Bytes a host map takes per entry of capacity, in [`HOST_MAPS`]' order:
/// for IPv4 its share of a table's buckets (64 bytes for 4 entries,
/// `filter_common::hosts4::buckets`); for IPv6, preallocated hashes, its
/// bucket and its element (the kernel's 48-byte `htab_elem` header, the
/// 24-byte key and the 4-byte value each rounded up to 8 bytes).
const HOST_ENTRY_BYTES: [u64; 4] = [
    16,
    16,
    BUCKET_BYTES + 48 + 24 + 8,
    BUCKET_BYTES + 48 + 24 + 8,
];

/// `max_entries` of host map `i` ([`HOST_MAPS`]' order) with room for
/// `hosts` a generation: buckets for the IPv4 tables, entries for the
/// IPv6 hashes.
pub fn host_map_entries(i: usize, hosts: u32) -> u32 {
    let entries = hosts.saturating_mul(GENERATIONS);
    if i < 2 {
        filter_common::hosts4::buckets(entries)
    } else {
        entries
    }
}

/// The room a generation has in host map `i` of `max_entries` entries
/// (the inverse of [`host_map_entries`]).
pub fn hosts_of_map(i: usize, max_entries: u32) -> u32 {
    if i < 2 {
        max_entries.saturating_mul(4) / GENERATIONS
    } else {
        max_entries / GENERATIONS
    }
}

impl Room {
    /// The agent's least ([`super::Options::room`]): under a MiB for the
    /// class arrays, the two IPv4 host tables and the four hashes, both
    /// generations, room for a few hundred rules.
    pub const MIN: Room = Room {
        heads: 1 << 10,
        words: 1 << 14,
        hosts: [1 << 10; 4],
        ports: [1 << 8; 2],
    };
    /// The most the kernel's tables hold; the host hashes are held to
    /// `--max-prefixes` besides ([`Room::within`]).
    pub const MAX: Room = Room {
        heads: CLASSES_PER_GEN,
        words: CLASS_WORDS_PER_GEN,
        hosts: [u32::MAX / GENERATIONS; 4],
        ports: [MAX_PORT_ENTRIES / GENERATIONS; 2],
    };

    /// This room, each part at most `most`'s.
    pub fn within(self, most: Room) -> Room {
        self.each(most, u32::min)
    }

    /// This room, each part at least `least`'s.
    pub fn at_least(self, least: Room) -> Room {
        self.each(least, u32::max)
    }

    /// `f` of each part of this room and the same part of `other`.
    fn each(self, other: Room, f: fn(u32, u32) -> u32) -> Room {
        Room {
            heads: f(self.heads, other.heads),
            words: f(self.words, other.words),
            hosts: std::array::from_fn(|i| f(self.hosts[i], other.hosts[i])),
            ports: std::array::from_fn(|i| f(self.ports[i], other.ports[i])),
        }
    }

    /// The room for a generation that needs `need`: twice it, a power of
    /// two, at least `least` and at most `most`.
    pub fn fitting(need: Room, least: Room, most: Room) -> Room {
        let size = |need: u32| {
            need.saturating_mul(2)
                .checked_next_power_of_two()
                .unwrap_or(u32::MAX)
        };
        Room {
            heads: size(need.heads),
            words: size(need.words),
            hosts: need.hosts.map(size),
            ports: need.ports.map(size),
        }
        .at_least(least)
        .within(most)
    }

    /// The room to move to for a generation that needs `need` (between
    /// `least` and `most`), if this one does not hold it or is more than
    /// eight times what it needs (in bytes).
    pub fn refit(self, need: Room, least: Room, most: Room) -> Option<Room> {
        let fit = Room::fitting(need, least, most);
        let too_small = need.heads > self.heads
            || need.words > self.words
            || (0..4).any(|i| need.hosts[i] > self.hosts[i])
            || (0..2).any(|i| need.ports[i] > self.ports[i]);
        let too_big = self.bytes() > fit.bytes() * 8;
        (too_small || too_big).then_some(fit)
    }

    /// Bytes the sized maps allocate up front, both generations.
    pub fn bytes(self) -> u64 {
        let heads = u64::from(self.heads) * std::mem::size_of::<ClassHead>() as u64;
        let words = u64::from(self.words) * 8;
        let hosts: u64 = (self.hosts.iter().zip(HOST_ENTRY_BYTES))
            .map(|(&n, bytes)| u64::from(n) * bytes)
            .sum();
        let ports: u64 = self
            .ports
            .iter()
            .map(|&n| u64::from(n) * BUCKET_BYTES)
            .sum();
        (heads + words + hosts + ports) * u64::from(GENERATIONS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(heads: u32, words: u32, hosts: u32) -> Room {
        Room {
            heads,
            words,
            hosts: [hosts, 0, 0, 0],
            ports: [0; 2],
        }
    }

    #[test]
    fn the_sized_maps_grow_past_their_room_and_shrink_below_an_eighth() {
        let most = Room::MAX;
        let room = Room::fitting(need(0, 0, 0), Room::MIN, most);
        assert_eq!(room, Room::MIN);
        assert_eq!(room.refit(need(100, 1000, 100), Room::MIN, most), None);
        assert_eq!(
            room.refit(need(1024, 16384, 1024), Room::MIN, most),
            None,
            "a full room is kept"
        );
        let grown = room
            .refit(need(1025, 10, 0), Room::MIN, most)
            .expect("more classes");
        assert_eq!(grown.heads, 4096, "twice the need, a power of two");
        assert_eq!(grown.words, Room::MIN.words);
        assert!(
            room.refit(need(10, 16385, 0), Room::MIN, most).is_some(),
            "more words"
        );
        let hosts = room
            .refit(need(10, 10, 5000), Room::MIN, most)
            .expect("more hosts");
        assert_eq!(hosts.hosts, [16384, 1024, 1024, 1024]);
        let ports = Room {
            ports: [0, 300],
            ..need(10, 10, 0)
        };
        let ports = room
            .refit(ports, Room::MIN, most)
            .expect("more source ports");
        assert_eq!(ports.ports, [256, 1024]);
        let all = Room::fitting(Room::MAX, Room::MIN, most);
        assert_eq!(all.ports, [MAX_PORT_ENTRIES / GENERATIONS; 2]);
        let full = Room::fitting(need(u32::MAX, u32::MAX, 0), Room::MIN, most);
        assert_eq!(
            (full.heads, full.words),
            (CLASSES_PER_GEN, CLASS_WORDS_PER_GEN)
        );
        let big = Room::fitting(need(20_000, 300_000, 0), Room::MIN, most);
        assert_eq!(big.refit(need(20_000, 300_000, 0), Room::MIN, most), None);
        assert_eq!(
            big.refit(need(100, 1000, 0), Room::MIN, most),
            Some(Room::MIN),
            "far less than an eighth"
        );
    }

    #[test]
    fn a_room_asked_for_is_the_least() {
        let least = Room::MAX.within(Room {
            hosts: [131_072; 4],
            ..Room::MAX
        });
        let room = Room::fitting(need(0, 0, 0), least, Room::MAX);
        assert_eq!(room, least);
        assert_eq!(room.refit(need(1, 1, 1), least, Room::MAX), None, "kept");
    }

    #[test]
    fn the_hashes_stay_within_max_prefixes() {
        let most = Room {
            hosts: [32; 4],
            ..Room::MAX
        };
        assert_eq!(Room::fitting(need(0, 0, 0), Room::MIN, most).hosts, [32; 4]);
        assert_eq!(
            Room::fitting(need(0, 0, 30), Room::MIN, most).hosts,
            [32; 4]
        );
        assert_eq!(Room::MAX.within(most).hosts, [32; 4]);
    }
}
