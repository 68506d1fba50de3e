//! The table builder: rules laid out in evaluation order, each field's
//! prefixes mapped to classes (the interned sets of rules they allow),
//! endpoint masks (docs/design.md, "The classifier").

use super::*;

pub(super) fn action_code(a: Action) -> u32 {
    match a {
        Action::Allow => action::ALLOW,
        Action::Deny => action::DENY,
        Action::Log => action::LOG,
        Action::Pass => action::PASS,
    }
}

/// Rules of one table in order, with the endpoints each concerns.
#[derive(Default)]
pub(super) struct TableBuilder {
    pub(super) rules: Vec<RuleInfo>,
    matches: Vec<RuleMatch>,
    /// Each part's endpoints, shared by the parts of a policy.
    endpoints: Vec<std::sync::Arc<BTreeSet<usize>>>,
}

impl TableBuilder {
    /// Appends the parts of one rule; returns their index range.
    pub(super) fn push(
        &mut self,
        a: Action,
        owner: u32,
        parts: Vec<RuleMatch>,
        eps: &BTreeSet<usize>,
    ) -> std::ops::Range<u32> {
        let start = self.rules.len() as u32;
        let end = start + parts.len() as u32;
        let eps = match self.endpoints.last() {
            Some(last) if **last == *eps => last.clone(),
            _ => std::sync::Arc::new(eps.clone()),
        };
        for m in parts {
            // A Log part goes on past its siblings: one record per rule.
            self.rules.push(RuleInfo {
                action: action_code(a),
                next: end,
                owner,
            });
            self.matches.push(m);
            self.endpoints.push(eps.clone());
        }
        start..end
    }

    /// Room for `rules` more rule parts.
    pub(super) fn reserve(&mut self, rules: usize) {
        self.rules.reserve(rules);
        self.matches.reserve(rules);
        self.endpoints.reserve(rules);
    }

    pub(super) fn set_next(&mut self, range: std::ops::Range<u32>, next: u32) {
        for r in range {
            self.rules[r as usize].next = next;
        }
    }

    pub(super) fn build(
        self,
        stage: u32,
        direction: u32,
        bound: &[(String, &Resource<HostEndpointSpec>)],
        interner: &mut Interner,
        reuse: &mut Reuse,
    ) -> Table {
        let mut masks: BTreeMap<String, RuleSet> = BTreeMap::new();
        for (r, eps) in self.endpoints.iter().enumerate() {
            for &e in eps.iter() {
                masks.entry(bound[e].0.clone()).or_default().insert(r);
            }
        }
        let matches = &self.matches;
        let v4: RuleSet = matches
            .iter()
            .enumerate()
            .filter(|(_, m)| m.v4)
            .map(|(r, _)| r)
            .collect();
        let v6: RuleSet = matches
            .iter()
            .enumerate()
            .filter(|(_, m)| m.v6)
            .map(|(r, _)| r)
            .collect();
        let mut field = |n: u8, inputs: Inputs| -> Entries {
            let slot = (stage, direction, n);
            let mut local = match reuse.last.remove(&slot) {
                Some(last) if inputs.are(&last.key) => {
                    reuse.reused += 1;
                    last
                }
                _ => {
                    reuse.in_step = false;
                    Field::classify(inputs.key(), matches)
                }
            };
            let entries = local.entries_in(interner, &mut reuse.in_step);
            reuse.next.insert(slot, local);
            entries
        };
        let addr = |f, active| Inputs::Addr(matches, f, active);
        let port = |f, whole_protocol| Inputs::Port(matches, f, whole_protocol);
        let src_v4 = field(0, addr(|m| &m.src4, &v4)).prefixes();
        let dst_v4 = field(1, addr(|m| &m.dst4, &v4)).prefixes();
        let src_v6 = field(2, addr(|m| &m.src6, &v6)).prefixes();
        let dst_v6 = field(3, addr(|m| &m.dst6, &v6)).prefixes();
        let dports = field(4, port(|m| &m.dport, true)).ports();
        let sports = field(5, port(|m| &m.sport, false)).ports();
        Table {
            stage,
            direction,
            rules: self.rules,
            src_v4,
            dst_v4,
            src_v6,
            dst_v6,
            dports,
            sports,
            masks,
        }
    }
}

/// The entries of a port trie for one port field.
///
/// One field must hold every rule's protocol match: the destination port
/// (`whole_protocol`). The source port field holds it only for rules with
/// source ports, whose ports mean something only under it; for the rest
/// it allows every protocol, as the destination field already decides.
/// So a table whose rules name no source port has one source entry, and
/// the kernel no source lookup (`TableHints`), whatever protocols its
/// rules name.
pub(super) fn port_entries(
    matches: &[RuleMatch],
    field: fn(&RuleMatch) -> &Option<FieldMatch>,
    whole_protocol: bool,
    interner: &mut Interner,
) -> Vec<PortEntry> {
    let holds_protocol = |m: &RuleMatch| whole_protocol || field(m).is_some();
    // Every protocol a rule matched here names gets its own subtree.
    let protos: BTreeSet<u8> = matches
        .iter()
        .filter(|m| holds_protocol(m))
        .flat_map(|m| m.protocol.into_iter().chain(m.not_protocol))
        .collect();
    let proto_ok = |m: &RuleMatch, p: Option<u8>| {
        // `p == None` stands for a protocol no rule names.
        !holds_protocol(m)
            || (m.protocol.is_none_or(|want| Some(want) == p)
                && m.not_protocol.is_none_or(|not| Some(not) != p))
    };
    let rules_where = |ok: &dyn Fn(&RuleMatch) -> bool| -> RuleSet {
        matches
            .iter()
            .enumerate()
            .filter(|(_, m)| ok(m))
            .map(|(r, _)| r)
            .collect()
    };
    let mut out = Vec::new();
    let any = rules_where(&|m| proto_ok(m, None) && field(m).is_none());
    out.push(PortEntry {
        proto: None,
        has_ports: None,
        port: 0,
        port_len: 0,
        class: interner.class(any),
    });
    let fms: Vec<FieldMatch> = matches
        .iter()
        .map(|m| field(m).clone().unwrap_or_default())
        .collect();
    for &p in &protos {
        // No L4 ports known (non-first fragments, protocols without ports):
        // only rules with no port constraint can match.
        let no_ports = rules_where(&|m| proto_ok(m, Some(p)) && field(m).is_none());
        out.push(PortEntry {
            proto: Some(p),
            has_ports: Some(false),
            port: 0,
            port_len: 0,
            class: interner.class(no_ports),
        });
        let all = rules_where(&|m| proto_ok(m, Some(p)));
        for (prefix, class) in prefix::classify(&fms, &all, &mut |s| interner.class(s)) {
            out.push(PortEntry {
                proto: Some(p),
                has_ports: Some(true),
                port: prefix.value(16) as u16,
                port_len: prefix.len,
                class,
            });
        }
    }
    out
}

/// What decides one field's classes in one table: each rule part's
/// constraint on the field, and for an address field the parts of its
/// family, for a port field their protocols.
#[derive(PartialEq)]
enum FieldKey {
    Addr(Vec<FieldMatch>, RuleSet),
    Port(Vec<(Option<FieldMatch>, Option<u8>, Option<u8>)>, bool),
}

/// One field's inputs in a table being built: its rule parts, and which
/// of their fields (and the family's parts, or whether the field holds
/// the protocol match).
enum Inputs<'a> {
    Addr(&'a [RuleMatch], fn(&RuleMatch) -> &FieldMatch, &'a RuleSet),
    Port(&'a [RuleMatch], fn(&RuleMatch) -> &Option<FieldMatch>, bool),
}

impl Inputs<'_> {
    /// Whether `key` holds these inputs (compared in place: a hit copies
    /// nothing).
    fn are(&self, key: &FieldKey) -> bool {
        match (self, key) {
            (Inputs::Addr(matches, f, active), FieldKey::Addr(fm, a)) => {
                a == *active
                    && fm.len() == matches.len()
                    && fm.iter().zip(*matches).all(|(x, m)| x == f(m))
            }
            (Inputs::Port(matches, f, whole), FieldKey::Port(fm, w)) => {
                w == whole
                    && fm.len() == matches.len()
                    && fm.iter().zip(*matches).all(|((x, p, np), m)| {
                        x == f(m) && *p == m.protocol && *np == m.not_protocol
                    })
            }
            _ => false,
        }
    }

    /// The inputs, copied as a key.
    fn key(&self) -> FieldKey {
        match self {
            Inputs::Addr(matches, f, active) => FieldKey::Addr(
                matches.iter().map(|m| f(m).clone()).collect(),
                (*active).clone(),
            ),
            Inputs::Port(matches, f, whole) => FieldKey::Port(
                matches
                    .iter()
                    .map(|m| (f(m).clone(), m.protocol, m.not_protocol))
                    .collect(),
                *whole,
            ),
        }
    }
}

/// One field of one table classified: its entries with classes numbered
/// locally (in order of first use), and the rule set of each local class.
/// A field's entries: an address field's prefixes, or a port field's
/// entries, each with its class.
enum Entries {
    Addr(Vec<(Prefix, u32)>),
    Port(Vec<PortEntry>),
}

impl Entries {
    fn prefixes(self) -> Vec<(Prefix, u32)> {
        match self {
            Entries::Addr(e) => e,
            Entries::Port(_) => Vec::new(),
        }
    }

    fn ports(self) -> Vec<PortEntry> {
        match self {
            Entries::Port(e) => e,
            Entries::Addr(_) => Vec::new(),
        }
    }
}

struct Field {
    key: FieldKey,
    /// The entries, their classes numbered locally.
    entries: Entries,
    sets: Vec<RuleSet>,
    /// The classes the local ones became, and how many classes there
    /// were before, when the field was last interned.
    global: Vec<u32>,
    before: usize,
}

impl Field {
    fn classify(key: FieldKey, matches: &[RuleMatch]) -> Field {
        let mut local = Interner::default();
        let entries = match &key {
            FieldKey::Addr(fm, active) => {
                Entries::Addr(prefix::classify(fm, active, &mut |s| local.class(s)))
            }
            FieldKey::Port(_, whole_protocol) => {
                let field: fn(&RuleMatch) -> &Option<FieldMatch> = if *whole_protocol {
                    |m| &m.dport
                } else {
                    |m| &m.sport
                };
                Entries::Port(port_entries(matches, field, *whole_protocol, &mut local))
            }
        };
        Field {
            key,
            entries,
            sets: local.classes,
            global: Vec::new(),
            before: usize::MAX,
        }
    }

    /// The entries with their classes interned in `interner`. Local
    /// classes are interned in their order, which is the order of first
    /// use: the numbering is the one interning the field directly gives.
    ///
    /// `in_step`: every field before this one in this compile was taken
    /// over, so `interner` holds what it held before this field last time
    /// if it holds as many classes; then the classes are the same as last
    /// time, and are appended without a lookup.
    fn entries_in(&mut self, interner: &mut Interner, in_step: &mut bool) -> Entries {
        let before = interner.classes.len();
        if *in_step && before == self.before {
            interner.replay(&self.sets, &self.global);
        } else {
            *in_step = false;
            self.global = self.sets.iter().map(|s| interner.class_of(s)).collect();
            self.before = before;
        }
        let global = &self.global;
        match &self.entries {
            Entries::Addr(e) => {
                Entries::Addr(e.iter().map(|&(p, c)| (p, global[c as usize])).collect())
            }
            Entries::Port(e) => Entries::Port(
                e.iter()
                    .map(|&e| PortEntry {
                        class: global[e.class as usize],
                        ..e
                    })
                    .collect(),
            ),
        }
    }
}

/// The fields of the last compile, by (stage, direction, field), for the
/// next compile to take over where a field's inputs did not change: a
/// one-rule change to a table of 10,000 rules with 100,000 CIDRs then
/// classifies only the fields the rule changed (an action changes none).
#[derive(Default)]
pub struct Reuse {
    last: std::collections::HashMap<(u32, u32, u8), Field>,
    next: std::collections::HashMap<(u32, u32, u8), Field>,
    /// The parts of each rule that depends on nothing else, by its parsed
    /// item ([`crate::model::ItemId`]).
    last_parts: PartsByItem,
    next_parts: PartsByItem,
    reused: usize,
    /// Every field so far in this compile was taken over (the fields come
    /// in the same order every compile).
    in_step: bool,
}

impl Reuse {
    /// Before a compile.
    pub(super) fn start(&mut self) {
        self.in_step = true;
    }

    /// After a compile: what it classified becomes what the next reuses.
    pub(super) fn finish(&mut self) -> usize {
        self.last = std::mem::take(&mut self.next);
        self.last_parts = std::mem::take(&mut self.next_parts);
        std::mem::take(&mut self.reused)
    }

    /// The parts of `r`, taken from the last compile where `r` is the
    /// same parsed item and depends on nothing else.
    pub(super) fn parts(
        &mut self,
        r: &Rule,
        resolver: &Resolver<'_>,
    ) -> Result<Vec<RuleMatch>, Unsupported> {
        let Some(id) = r.item.key().filter(|_| Resolver::stands_alone(r)) else {
            return resolver.rule(r);
        };
        let parts = match self.last_parts.remove(&id) {
            Some((_, parts)) => parts,
            None => resolver.rule(r)?,
        };
        self.next_parts.insert(id, (r.item.clone(), parts.clone()));
        Ok(parts)
    }
}

impl std::fmt::Debug for Reuse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reuse({} fields)", self.last.len())
    }
}

/// Rule parts by parsed item, the item held (see [`crate::model::ItemId`]).
type PartsByItem = std::collections::HashMap<
    usize,
    (crate::model::ItemId, Vec<RuleMatch>),
    foldhash::fast::RandomState,
>;

/// Interns rule sets: each distinct set gets one class number.
pub(super) struct Interner {
    pub(super) classes: Vec<RuleSet>,
    /// Class of each set; built at the first lookup, so a compile whose
    /// every field is taken over ([`Reuse`]) hashes no set.
    index: Option<bits::SetIndex<u32>>,
}

impl Default for Interner {
    fn default() -> Self {
        Interner {
            classes: vec![RuleSet::new()],
            index: None,
        }
    }
}

impl Interner {
    fn index(&mut self) -> &mut bits::SetIndex<u32> {
        let classes = &self.classes;
        self.index.get_or_insert_with(|| {
            classes
                .iter()
                .enumerate()
                .map(|(c, s)| (s.clone(), c as u32))
                .collect()
        })
    }

    /// [`Interner::class`] of a borrowed set, copied only if new.
    pub(super) fn class_of(&mut self, set: &RuleSet) -> u32 {
        match self.index().get(set) {
            Some(c) => *c,
            None => self.class(set.clone()),
        }
    }

    pub(super) fn class(&mut self, set: RuleSet) -> u32 {
        use std::collections::hash_map::Entry;
        let next = self.classes.len() as u32;
        match self.index().entry(set) {
            Entry::Occupied(known) => *known.get(),
            Entry::Vacant(new) => {
                let set = new.key().clone();
                new.insert(next);
                self.classes.push(set);
                next
            }
        }
    }

    /// Appends the classes that interning `sets` gave `global` from this
    /// interner's state: those numbered from the end on, in order.
    fn replay(&mut self, sets: &[RuleSet], global: &[u32]) {
        for (set, &c) in sets.iter().zip(global) {
            if c as usize == self.classes.len() {
                if let Some(index) = &mut self.index {
                    index.insert(set.clone(), c);
                }
                self.classes.push(set.clone());
            }
        }
    }
}
