//! `filter-agent check` is a complete pre-flight: it refuses what `run`
//! would refuse (compile-time refusals, the kernel tables' capacity), with
//! the same message, and counts every kind it loaded.

use std::{path::Path, process::Command};

use filter_agent::{
    compile::{self, Node},
    model::Store,
};

fn check(dir: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_filter-agent"))
        .arg("check")
        .arg(dir)
        .output()
        .expect("run filter-agent check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn dir_with(name: &str, yaml: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("fw-check-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    std::fs::write(d.join("policy.yaml"), yaml).expect("write");
    d
}

const HEP: &str = "apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: w, labels: {role: pub}}
spec: {node: n1, interfaceName: eth1}
";

#[test]
fn a_rule_run_would_refuse_is_refused_with_the_same_message() {
    let yaml = format!(
        "{HEP}---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: named-src}}
spec:
  selector: role == 'pub'
  ingress:
  - action: Allow
    protocol: TCP
    source: {{ports: [http]}}
"
    );
    let d = dir_with("named", &yaml);
    let (ok, stdout, _) = check(&d);
    assert!(!ok, "check accepted what run refuses");
    // What run says: the compiler's error for this node.
    let store = Store::load_dir(&d).expect("valid YAML");
    let node = Node {
        name: "n1".into(),
        ..Default::default()
    };
    let run_says = compile::compile(&store, &node)
        .expect_err("run refuses it")
        .to_string();
    assert!(
        stdout.lines().any(|l| l == run_says),
        "{stdout:?} vs {run_says:?}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_policy_beyond_the_kernel_tables_is_refused() {
    let rules: String = (0..16_385)
        .map(|i| {
            format!(
                "  - action: Allow\n    protocol: TCP\n    destination: {{ports: [{}]}}\n",
                1 + i % 60_000
            )
        })
        .collect();
    let yaml = format!(
        "{HEP}---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: huge}}
spec:
  selector: role == 'pub'
  types: [Ingress]
  ingress:
{rules}"
    );
    let d = dir_with("huge", &yaml);
    let (ok, stdout, _) = check(&d);
    assert!(!ok, "check accepted a policy the kernel tables cannot hold");
    assert!(
        stdout.contains("the kernel tables hold 16384 per stage and direction"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn the_summary_counts_every_kind() {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
    let (ok, _, stderr) = check(&d);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("GlobalNetworkPolicy") && stderr.contains("1 HostEndpoint"),
        "{stderr}"
    );
}
