//! The real-world policy files: IBM's public samples must load and
//! compile; the old Calico v1 files must be rejected by the name of their
//! format.
//!
//! The corpus is not part of this repository: `FILTER_CORPUS` names it,
//! else a `shared/corpus` directory beside the clone (where CI has it).
//! Without it these tests do not run, and say so: each leaves a note in
//! `target/tmp/not-run/`, which `cargo xtask test` counts as skipped in its
//! summary, and with `FILTER_REQUIRE_CORPUS=1` (CI) its absence fails.

use std::path::{Path, PathBuf};

use filter_agent::{
    compile::{self, Node},
    model::Store,
};

/// The corpus directory `sub`, or `None` (recorded as not run by `test`).
fn corpus(sub: &str, test: &str) -> Option<PathBuf> {
    let root = std::env::var_os("FILTER_CORPUS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus"),
        PathBuf::from,
    );
    let p = root.join(sub);
    if p.is_dir() {
        return Some(p);
    }
    let why = format!(
        "{test}: NOT RUN: no policy corpus at {} (set FILTER_CORPUS to its directory)",
        p.display()
    );
    assert!(
        std::env::var_os("FILTER_REQUIRE_CORPUS").is_none(),
        "{why}; FILTER_REQUIRE_CORPUS is set"
    );
    eprintln!("{why}");
    let notes = Path::new(env!("CARGO_TARGET_TMPDIR")).join("not-run");
    let _ = std::fs::create_dir_all(&notes);
    let _ = std::fs::write(notes.join(test), why);
    None
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read corpus dir") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p
            .extension()
            .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
        {
            out.push(p);
        }
    }
    out.sort();
}

#[test]
fn every_kube_sample_loads_and_compiles() {
    let mut files = Vec::new();
    let Some(dir) = corpus("kube-samples", "every_kube_sample_loads_and_compiles") else {
        return;
    };
    yaml_files(&dir, &mut files);
    assert_eq!(files.len(), 209, "the corpus holds 209 policy files");
    let mut resources = 0;
    for f in &files {
        let store = Store::load_files(std::slice::from_ref(f))
            .unwrap_or_else(|e| panic!("{}: {e:?}", f.display()));
        resources +=
            store.global_policies.len() + store.network_policies.len() + store.host_endpoints.len();
        // Compile for every node the file's endpoints name, and for a node
        // with none (policies only).
        let mut nodes: Vec<String> = store
            .host_endpoints
            .iter()
            .map(|h| h.spec.node.clone())
            .collect();
        nodes.push("node-without-endpoints".into());
        for n in nodes {
            compile::compile(
                &store,
                &Node {
                    name: n,
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        }
    }
    assert!(resources >= 228, "{resources} resources");
}

const SYNTHETIC_HEPS: &str = "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: pub, labels: {ibm.role: worker_public}}\nspec: {node: corpus-node, interfaceName: eth1, expectedIPs: [169.60.1.1]}\n---\napiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: priv, labels: {ibm.role: worker_private}}\nspec: {node: corpus-node, interfaceName: eth0, expectedIPs: [10.1.1.1]}\n";

#[test]
fn each_region_directory_loads_as_one_policy_set() {
    let Some(samples) = corpus(
        "kube-samples",
        "each_region_directory_loads_as_one_policy_set",
    ) else {
        return;
    };
    for side in ["private-network-isolation", "public-network-isolation"] {
        for region in std::fs::read_dir(samples.join(side)).expect("read") {
            let dir = region.expect("entry").path();
            if dir.is_dir() {
                let store =
                    Store::load_dir(&dir).unwrap_or_else(|e| panic!("{}: {e:?}", dir.display()));
                // Endpoints of both roles on one node, so every policy that
                // selects a worker goes through the compiler.
                let mut store = store;
                let mut errors = Vec::new();
                store.add_text(Path::new("synthetic.yaml"), SYNTHETIC_HEPS, &mut errors);
                assert!(errors.is_empty(), "{errors:?}");
                let c = compile::compile(
                    &store,
                    &Node {
                        name: "corpus-node".into(),
                        ..Default::default()
                    },
                )
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
                let rules: usize = c.tables.iter().map(|t| t.rules.len()).sum();
                assert!(rules > 10, "{}: only {rules} rules compiled", dir.display());
            }
        }
    }
}

#[test]
fn old_v1_format_files_are_rejected_naming_the_format() {
    let Some(v2) = corpus(
        "kube-samples-history/private-network-isolation/calico-v2",
        "old_v1_format_files_are_rejected_naming_the_format",
    ) else {
        return;
    };
    let mut files = Vec::new();
    yaml_files(&v2, &mut files);
    assert_eq!(files.len(), 6);
    for f in &files {
        let errors =
            Store::load_files(std::slice::from_ref(f)).expect_err("v1 format must be rejected");
        for e in &errors {
            let text = e.to_string();
            assert!(
                text.contains("old Calico v1 format") && text.contains(&f.display().to_string()),
                "{text}"
            );
            assert!(e.origin.line > 0, "{text}");
        }
    }
}

#[test]
fn history_files_in_v3_format_are_valid_v3() {
    // The history folder also keeps pre-regional files that are genuine
    // projectcalico.org/v3 resources; Calico accepts them, and so do we.
    let Some(v3) = corpus(
        "kube-samples-history/private-network-isolation/calico-v3",
        "history_files_in_v3_format_are_valid_v3",
    ) else {
        return;
    };
    let store = Store::load_dir(&v3).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(!store.global_policies.is_empty());
}

#[test]
fn cluster_export_loads_except_the_name_calico_rejects() {
    let Some(dump) = corpus(
        "iks-cluster-dump",
        "cluster_export_loads_except_the_name_calico_rejects",
    ) else {
        return;
    };
    let mut files = Vec::new();
    yaml_files(&dump, &mut files);
    for f in &files {
        let result = Store::load_files(std::slice::from_ref(f));
        if f.ends_with("testcase20-1-empty-globalNetworkpolicy.yaml") {
            // Calico's validator rejects upper case in policy names.
            let e = result.expect_err("upper-case name");
            assert!(e[0].to_string().contains("metadata.name"), "{}", e[0]);
        } else {
            result.unwrap_or_else(|e| panic!("{}: {e:?}", f.display()));
        }
    }
    let store = Store::load_files(&[dump.join("hep_and_wep.json")]).expect("json lists");
    assert_eq!(store.host_endpoints.len(), 3);
    assert_eq!(store.global_network_sets.len(), 2);
}

/// The cluster's export as Calico's Kubernetes datastore serves it: each
/// resource a `crd.projectcalico.org/v1` object (policies of the default
/// tier named `default.<name>` as older releases store them, Calico's
/// metadata annotation, server bookkeeping) must load and compile exactly
/// as the exported files do.
#[test]
fn cluster_export_served_as_calico_crds_compiles_as_the_files_do() {
    use filter_agent::source::kube::{to_resources, Object, Options, CALICO_KINDS};
    let Some(dump) = corpus(
        "iks-cluster-dump",
        "cluster_export_served_as_calico_crds_compiles_as_the_files_do",
    ) else {
        return;
    };
    let files = [
        dump.join("testcase20-0-gnps.yaml"),
        dump.join("hep_and_wep.json"),
    ];
    let from_files = Store::load_files(&files).expect("files load");
    // The same resources as the API server holds them.
    let mut objects = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read");
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).expect("yaml");
        let mut stack = docs;
        while let Some(v) = stack.pop() {
            if let Some(items) = v.as_array().or_else(|| v["items"].as_array()) {
                stack.extend(items.iter().cloned());
                continue;
            }
            let Some(kind) = CALICO_KINDS
                .iter()
                .map(|k| k.0)
                .find(|k| v["kind"].as_str() == Some(k))
            else {
                continue;
            };
            let mut crd = v.clone();
            crd["apiVersion"] = "crd.projectcalico.org/v1".into();
            let name = v["metadata"]["name"].as_str().expect("name");
            if kind == "GlobalNetworkPolicy" {
                crd["metadata"]["name"] = format!("default.{name}").into();
            }
            crd["metadata"]["annotations"]["projectcalico.org/metadata"] =
                r#"{"creationTimestamp":null}"#.into();
            crd["metadata"]["resourceVersion"] = "12345".into();
            objects.push(Object { kind, value: crd });
        }
    }
    let (mut from_api, errors) =
        Store::from_resources(&to_resources(&objects, &Options::default()));
    assert!(errors.is_empty(), "{errors:?}");
    let names = |s: &Store| {
        let mut n: Vec<String> = s
            .global_policies
            .iter()
            .map(|p| p.meta.name.clone())
            .chain(s.host_endpoints.iter().map(|h| h.meta.name.clone()))
            .chain(s.global_network_sets.iter().map(|h| h.meta.name.clone()))
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&from_api), names(&from_files));
    assert!(!from_api.global_policies.is_empty() && !from_api.host_endpoints.is_empty());
    // Same order of resources, then the same tables for every node.
    let sort = |s: &mut Store| {
        s.global_policies
            .sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        s.host_endpoints
            .sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        s.global_network_sets
            .sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
    };
    let mut from_files = from_files;
    sort(&mut from_files);
    sort(&mut from_api);
    for h in &from_files.host_endpoints {
        let node = Node {
            name: h.spec.node.clone(),
            interfaces: Default::default(),
        };
        let a = compile::compile(&from_files, &node).expect("files compile");
        let b = compile::compile(&from_api, &node).expect("API compiles");
        assert_eq!(a.tables, b.tables, "node {}", h.spec.node);
    }
}
