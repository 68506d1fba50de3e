//! Entry points of the fuzz targets (fuzz/), kept in the library so the
//! smoke test below and `cargo fuzz` drive the same code.

use std::{collections::BTreeMap, path::Path};

use crate::{
    compile::{self, Node},
    model::{validate, Store},
    selector::Selector,
};

/// Loads `data` as a policy file, validates it and compiles it for a node
/// named in it (or none). Returns whether it loaded.
pub fn load_validate_compile(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let mut store = Store::default();
    let mut errors = Vec::new();
    store.add_text(Path::new("fuzz.yaml"), text, &mut errors);
    if !errors.is_empty() {
        return false;
    }
    validate::store(&store, &mut errors);
    if !errors.is_empty() {
        return false;
    }
    let name = store
        .host_endpoints
        .first()
        .map(|h| h.spec.node.clone())
        .unwrap_or_default();
    let interfaces: BTreeMap<String, Vec<std::net::IpAddr>> = BTreeMap::new();
    let _ = compile::compile(&store, &Node { name, interfaces });
    true
}

/// Parses `data` as a selector and evaluates it on a few label maps.
/// Returns whether it parsed.
pub fn parse_and_evaluate_selector(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    match Selector::parse(text) {
        Ok(sel) => {
            let labels: BTreeMap<String, String> =
                [("a", ""), ("ibm.role", "worker_public"), ("k", "v")]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
            let _ = sel.matches(&labels);
            let _ = sel.matches(&BTreeMap::new());
            true
        }
        Err(e) => {
            assert!(
                e.position <= text.len(),
                "error position {} past the end of {text:?}",
                e.position
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    //! No input may panic: random and mutated inputs through the fuzz entry
    //! points, as a quick smoke run inside `cargo test` (long runs: see
    //! fuzz/README.md).

    use proptest::prelude::*;

    const SEEDS: &[&str] = &[
        include_str!("../../examples/lessons/lesson3-whitelist.yaml"),
        include_str!("../../examples/demo/default-host-policies.yaml"),
        include_str!("../../examples/demo/host-endpoint.yaml"),
    ];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn selector_parser_never_panics(s in "[ a-z0-9_./!=&|(){},'\"\t-]{0,40}|(has|all|global|in|not|contains|starts|with)[ (]{0,2}.{0,20}") {
            super::parse_and_evaluate_selector(s.as_bytes());
        }

        #[test]
        fn yaml_loader_never_panics(seed in 0usize..3, cut in 0usize..2000, splice in ".{0,12}", at in 0usize..2000) {
            // Mutate a real policy file: insert junk somewhere, cut it short.
            let base = SEEDS[seed];
            let mut text: String = base.to_owned();
            let at = text.char_indices().map(|(i, _)| i).nth(at % text.chars().count().max(1)).unwrap_or(0);
            text.insert_str(at, &splice);
            let cut = text.char_indices().map(|(i, _)| i).nth(cut % text.chars().count().max(1)).unwrap_or(text.len());
            super::load_validate_compile(&text.as_bytes()[..cut]);
            super::load_validate_compile(text.as_bytes());
        }
    }

    #[test]
    fn seeds_load() {
        for s in SEEDS {
            assert!(super::load_validate_compile(s.as_bytes()));
        }
    }
}
