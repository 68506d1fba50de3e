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
    endpoints: Vec<BTreeSet<usize>>,
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
    ) -> Table {
        let mut masks: BTreeMap<String, RuleSet> = BTreeMap::new();
        for (r, eps) in self.endpoints.iter().enumerate() {
            for &e in eps {
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
        let mut addr = |f: fn(&RuleMatch) -> &FieldMatch, active: &RuleSet| -> Vec<(Prefix, u32)> {
            let fm: Vec<FieldMatch> = matches.iter().map(|m| f(m).clone()).collect();
            prefix::classify(&fm, active, &mut |s| interner.class(s))
        };
        let src_v4 = addr(|m| &m.src4, &v4);
        let dst_v4 = addr(|m| &m.dst4, &v4);
        let src_v6 = addr(|m| &m.src6, &v6);
        let dst_v6 = addr(|m| &m.dst6, &v6);
        let dports = port_entries(matches, |m| &m.dport, true, interner);
        let sports = port_entries(matches, |m| &m.sport, false, interner);
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

/// Interns rule sets: each distinct set gets one class number.
pub(super) struct Interner {
    pub(super) classes: Vec<RuleSet>,
    index: bits::SetIndex<u32>,
}

impl Default for Interner {
    fn default() -> Self {
        let mut index = bits::SetIndex::default();
        index.insert(RuleSet::new(), 0);
        Interner {
            classes: vec![RuleSet::new()],
            index,
        }
    }
}

impl Interner {
    pub(super) fn class(&mut self, set: RuleSet) -> u32 {
        if let Some(c) = self.index.get(&set) {
            return *c;
        }
        let next = self.classes.len() as u32;
        self.classes.push(set.clone());
        self.index.insert(set, next);
        next
    }
}
