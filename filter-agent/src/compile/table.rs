//! The table builder: rules laid out in evaluation order, each field's
//! prefixes mapped to classes (the interned sets of rules they allow),
//! endpoint masks (docs/design.md, "The classifier").

use std::sync::Arc;

use super::*;

/// A rule part as tables hold it: shared between the compile that
/// resolved it, the tables' field keys and the next compile's
/// [`Reuse`], so taking a part over copies a pointer, and a field whose
/// parts are the same pointers is the same field without comparing them.
pub(super) type Part = Arc<RuleMatch>;

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
    matches: Vec<Part>,
    /// Each part's endpoints, shared by the parts of a policy.
    endpoints: Vec<std::sync::Arc<BTreeSet<usize>>>,
}

impl TableBuilder {
    /// Appends the parts of one rule; returns their index range.
    pub(super) fn push(
        &mut self,
        a: Action,
        owner: u32,
        parts: &[Part],
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
            self.matches.push(m.clone());
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
        let matches: Arc<[Part]> = self.matches.into();
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
        let key = |of| FieldKey {
            parts: matches.clone(),
            of,
        };
        let keys = [
            key(Of::Addr(|m| &m.src4, v4.clone())),
            key(Of::Addr(|m| &m.dst4, v4)),
            key(Of::Addr(|m| &m.src6, v6.clone())),
            key(Of::Addr(|m| &m.dst6, v6)),
            key(Of::Port(|m| &m.dport, true)),
            key(Of::Port(|m| &m.sport, false)),
        ];
        let slot = |n: usize| (stage, direction, n as u8);
        let [src_v4, dst_v4, src_v6, dst_v6, dports, sports] =
            fields(keys, |n, key| match reuse.last.remove(&slot(n)) {
                Some(last) if key.is(&last.key) => {
                    reuse.reused += 1;
                    Ok(Field { key, ..last })
                }
                replaced => {
                    reuse.retired.extend(replaced);
                    Err(key)
                }
            });
        // The rules every packet matches: those each field has in every
        // class.
        let mut everywhere: Option<RuleSet> = None;
        // Numbered into the compile's classes in field order, as the
        // fields come: taken over, or classified.
        let mut number = |n: usize, (mut local, classified): (Field, bool)| {
            if classified {
                reuse.in_step = false;
            }
            let entries = local.entries_in(interner, &mut reuse.in_step);
            match &mut everywhere {
                Some(all) => all.intersect_with(&local.every),
                None => everywhere = Some(local.every.clone()),
            }
            reuse.next.insert(slot(n), local);
            entries
        };
        let src_v4 = number(0, src_v4).prefixes();
        let dst_v4 = number(1, dst_v4).prefixes();
        let src_v6 = number(2, src_v6).prefixes();
        let dst_v6 = number(3, dst_v6).prefixes();
        let dports = number(4, dports).ports();
        let sports = number(5, sports).ports();
        Table {
            everywhere: everywhere.unwrap_or_default(),
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

/// A table's fields: each taken over from the last compile (`take` gives
/// it back, `Ok`) or classified (`true` beside it). Those classified are
/// independent and one may hold most of a compile's work (a list of
/// 100,000 sources), so two threads take them one by one.
fn fields<const N: usize>(
    keys: [FieldKey; N],
    mut take: impl FnMut(usize, FieldKey) -> Result<Field, FieldKey>,
) -> [(Field, bool); N] {
    let mut done: [Option<(Field, bool)>; N] = [const { None }; N];
    let mut todo = Vec::new();
    for (n, key) in keys.into_iter().enumerate() {
        match take(n, key) {
            Ok(field) => done[n] = Some((field, false)),
            Err(key) => todo.push((n, key)),
        }
    }
    let jobs = todo.len();
    let queue = std::sync::Mutex::new(todo.into_iter());
    let work = || {
        let mut out = Vec::new();
        loop {
            let job = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
            let Some((n, key)) = job else { return out };
            out.push((n, Field::classify(key)));
        }
    };
    let classified = match jobs {
        0 | 1 => work(),
        // Both take from the queue: whichever is free takes the next.
        _ => {
            let (mut out, more) = crate::on_two_threads(work, work);
            out.extend(more);
            out
        }
    };
    for (n, field) in classified {
        done[n] = Some((field, true));
    }
    done.map(|field| field.expect("every field is taken over or classified"))
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
    matches: &[Part],
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

/// What decides one field's classes in one table: the table's rule parts
/// and which of their fields, with, for an address field, the parts of its
/// family, for a port field, whether it holds the protocol match.
struct FieldKey {
    parts: Arc<[Part]>,
    of: Of,
}

enum Of {
    Addr(fn(&RuleMatch) -> &FieldMatch, RuleSet),
    Port(fn(&RuleMatch) -> &Option<FieldMatch>, bool),
}

impl FieldKey {
    /// Whether `last`, a key of the same field of the same table, has the
    /// same inputs: a part that is the same pointer is the same part, so a
    /// compile that took every part over compares no field.
    fn is(&self, last: &FieldKey) -> bool {
        let parts = self.parts.len() == last.parts.len();
        match (&self.of, &last.of) {
            (Of::Addr(f, active), Of::Addr(_, was)) => {
                parts
                    && active == was
                    && (self.parts.iter().zip(last.parts.iter()))
                        .all(|(a, b)| Arc::ptr_eq(a, b) || f(a) == f(b))
            }
            (Of::Port(f, whole), Of::Port(_, was)) => {
                parts
                    && whole == was
                    && (self.parts.iter().zip(last.parts.iter())).all(|(a, b)| {
                        Arc::ptr_eq(a, b)
                            || (f(a) == f(b)
                                && a.protocol == b.protocol
                                && a.not_protocol == b.not_protocol)
                    })
            }
            _ => false,
        }
    }
}

/// One field of one table classified: its entries with classes numbered
/// locally (in order of first use), and the rule set of each local class.
/// A field's entries: an address field's prefixes, or a port field's
/// entries, each with its class.
#[derive(Clone)]
enum Entries {
    Addr(Arc<Vec<(Prefix, u32)>>),
    Port(Arc<Vec<PortEntry>>),
}

impl Entries {
    fn prefixes(self) -> Arc<Vec<(Prefix, u32)>> {
        match self {
            Entries::Addr(e) => e,
            Entries::Port(_) => Arc::default(),
        }
    }

    fn ports(self) -> Arc<Vec<PortEntry>> {
        match self {
            Entries::Port(e) => e,
            Entries::Addr(_) => Arc::default(),
        }
    }
}

struct Field {
    key: FieldKey,
    /// The entries, their classes numbered locally.
    entries: Entries,
    sets: Vec<RuleSet>,
    /// The rules in the class of every entry, none where there is no
    /// entry: whatever a packet's value of this field, its class has them.
    /// Kept with the field when a compile takes it over.
    every: RuleSet,
    /// The classes the local ones became, and how many classes there
    /// were before, when the field was last interned.
    global: Vec<u32>,
    before: usize,
    /// The entries with the classes of `global`, while it holds: a field
    /// taken over whose classes kept their numbers is the same value (and
    /// allocation) as last time, which the dataplane compares first.
    made: Option<Entries>,
}

impl Field {
    fn classify(key: FieldKey) -> Field {
        let mut local = Interner::default();
        let entries = match &key.of {
            Of::Addr(f, active) => {
                let fms = key.parts.iter().map(|m| f(m));
                Entries::Addr(Arc::new(prefix::classify(fms, active, &mut |s| {
                    local.class(s)
                })))
            }
            Of::Port(f, whole_protocol) => Entries::Port(Arc::new(port_entries(
                &key.parts,
                *f,
                *whole_protocol,
                &mut local,
            ))),
        };
        let every = match &entries {
            Entries::Addr(e) => every_class(&local.classes, e.iter().map(|&(_, c)| c)),
            Entries::Port(e) => every_class(&local.classes, e.iter().map(|e| e.class)),
        };
        Field {
            key,
            entries,
            every,
            sets: local.classes,
            global: Vec::new(),
            before: usize::MAX,
            made: None,
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
            let global: Vec<u32> = self.sets.iter().map(|s| interner.class_of(s)).collect();
            if global != self.global {
                self.made = None;
                self.global = global;
            }
            self.before = before;
        }
        let global = &self.global;
        self.made
            .get_or_insert_with(|| match &self.entries {
                Entries::Addr(e) => Entries::Addr(Arc::new(
                    e.iter().map(|&(p, c)| (p, global[c as usize])).collect(),
                )),
                Entries::Port(e) => Entries::Port(Arc::new(
                    e.iter()
                        .map(|&e| PortEntry {
                            class: global[e.class as usize],
                            ..e
                        })
                        .collect(),
                )),
            })
            .clone()
    }
}

/// The rules in every one of `sets` that `classes` (the entries' local
/// classes) use; none for no entries.
fn every_class(sets: &[RuleSet], classes: impl Iterator<Item = u32>) -> RuleSet {
    let mut used = vec![false; sets.len()];
    for c in classes {
        if let Some(u) = used.get_mut(c as usize) {
            *u = true;
        }
    }
    let mut them = sets.iter().zip(used).filter(|(_, u)| *u).map(|(s, _)| s);
    let Some(first) = them.next() else {
        return RuleSet::new();
    };
    let mut all = first.clone();
    // Most fields' classes have no rule in common: the first few say so.
    for s in them {
        if all.is_empty() {
            break;
        }
        all.intersect_with(s);
    }
    all
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
    /// Parts resolved ahead ([`Reuse::resolve_ahead`]) for this compile.
    resolved: std::collections::HashMap<
        usize,
        Result<Arc<[Part]>, Unsupported>,
        foldhash::fast::RandomState,
    >,
    reused: usize,
    /// The last compile's fields this one replaced, to be freed aside.
    retired: Vec<Field>,
    /// Every field so far in this compile was taken over (the fields come
    /// in the same order every compile).
    in_step: bool,
}

impl Reuse {
    /// Before a compile.
    pub(super) fn start(&mut self) {
        self.in_step = true;
        // As many rules as last time, most likely: no rehash on the way.
        self.next_parts.reserve(self.last_parts.len());
    }

    /// After a compile: what it classified becomes what the next reuses.
    /// What it replaced is freed aside ([`crate::drop_aside`]): the last
    /// parts not taken over hold the last parse's items, and with every
    /// rule changed freeing them is a fifth of the compile.
    pub(super) fn finish(&mut self) -> usize {
        let fields = std::mem::replace(&mut self.last, std::mem::take(&mut self.next));
        let parts = std::mem::replace(&mut self.last_parts, std::mem::take(&mut self.next_parts));
        crate::drop_aside((
            fields,
            parts,
            std::mem::take(&mut self.retired),
            std::mem::take(&mut self.resolved),
        ));
        std::mem::take(&mut self.reused)
    }

    /// The parts of `r`, taken from the last compile where `r` is the
    /// same parsed item and depends on nothing else.
    pub(super) fn parts(
        &mut self,
        r: &Rule,
        resolver: &Resolver<'_>,
    ) -> Result<Arc<[Part]>, Unsupported> {
        let Some(id) = alone(r) else {
            return resolve(r, resolver);
        };
        // A policy of several stages meets its rules once per stage.
        if let Some((_, parts)) = self.next_parts.get(&id) {
            return Ok(parts.clone());
        }
        let parts = match self.last_parts.remove(&id) {
            Some((_, parts)) => parts,
            None => match self.resolved.remove(&id) {
                Some(resolved) => resolved?,
                None => resolve(r, resolver)?,
            },
        };
        self.next_parts.insert(id, (r.item.clone(), parts.clone()));
        Ok(parts)
    }

    /// Resolves ahead the rules of `rules` that [`Reuse::parts`] will not
    /// take over, on two threads when there are enough of them to pay for
    /// one: with every rule of a big policy changed, resolving them is a
    /// quarter of the compile.
    pub(super) fn resolve_ahead<'r>(
        &mut self,
        rules: impl Iterator<Item = &'r Rule>,
        resolver: &Resolver<'_>,
    ) {
        let todo: Vec<(usize, &Rule)> = rules
            .filter_map(|r| alone(r).map(|id| (id, r)))
            .filter(|(id, _)| !self.last_parts.contains_key(id))
            .collect();
        let resolved = crate::map_in_halves(&todo, crate::PARALLEL_AT, |&(id, r)| {
            (id, resolve(r, resolver))
        });
        self.resolved.extend(resolved);
    }
}

impl std::fmt::Debug for Reuse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reuse({} fields)", self.last.len())
    }
}

/// The key of `r`'s parsed item, if its parts depend on nothing but it
/// (and may be kept from one compile to the next).
fn alone(r: &Rule) -> Option<usize> {
    r.item.key().filter(|_| Resolver::stands_alone(r))
}

fn resolve(r: &Rule, resolver: &Resolver<'_>) -> Result<Arc<[Part]>, Unsupported> {
    Ok(resolver.rule(r)?.into_iter().map(Arc::new).collect())
}

/// Rule parts by parsed item, the item held (see [`crate::model::ItemId`]).
type PartsByItem = std::collections::HashMap<
    usize,
    (crate::model::ItemId, Arc<[Part]>),
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
                .map(|(c, s)| (s.keyed(), c as u32))
                .collect()
        })
    }

    /// [`Interner::class`] of a borrowed set (a reference more, not a
    /// copy of its words).
    pub(super) fn class_of(&mut self, set: &RuleSet) -> u32 {
        self.class_keyed(set.keyed())
    }

    pub(super) fn class(&mut self, set: RuleSet) -> u32 {
        self.class_keyed(set.into())
    }

    fn class_keyed(&mut self, key: bits::Keyed) -> u32 {
        use std::collections::hash_map::Entry;
        let next = self.classes.len() as u32;
        match self.index().entry(key) {
            Entry::Occupied(known) => *known.get(),
            Entry::Vacant(new) => {
                let set = new.key().set.clone();
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
                    index.insert(set.keyed(), c);
                }
                self.classes.push(set.clone());
            }
        }
    }
}
