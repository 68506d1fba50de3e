//! deploy/ as a cluster would read it: every manifest deserializes into
//! its Kubernetes type, the ClusterRole grants exactly what the agent
//! watches (read-only), and the DaemonSet's and the image's command lines
//! (with the ConfigMap's environment) are ones the agent accepts.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use clap::{CommandFactory, Parser};
use filter_agent::{
    cli::{run_config, Cli, Command},
    source::kube::{Access, CALICO_GROUP, CALICO_KINDS, CORE_KINDS},
};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::de::DeserializeOwned;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn load<T: DeserializeOwned>(file: &str) -> T {
    let path = deploy().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let k: serde_json::Value = load("kustomization.yaml");
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("file").to_owned())
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(deploy())
        .expect("deploy/")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present);
    let _: Namespace = load("namespace.yaml");
    let _: ServiceAccount = load("serviceaccount.yaml");
}

#[test]
fn the_cluster_role_grants_exactly_what_is_watched_read_only() {
    let role: ClusterRole = load("clusterrole.yaml");
    let mut granted = BTreeSet::new();
    for rule in role.rules.expect("rules") {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]), "read-only");
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.expect("apiGroups") {
            for resource in rule.resources.clone().expect("resources") {
                granted.insert((group.clone(), resource));
            }
        }
    }
    let watched: BTreeSet<(String, String)> = CALICO_KINDS
        .iter()
        .map(|(_, plural)| (CALICO_GROUP.to_owned(), plural.to_string()))
        .chain(
            CORE_KINDS
                .iter()
                .map(|(_, plural)| (String::new(), plural.to_string())),
        )
        .collect();
    assert_eq!(granted, watched);

    let binding: ClusterRoleBinding = load("clusterrolebinding.yaml");
    let account: ServiceAccount = load("serviceaccount.yaml");
    let ds: DaemonSet = load("daemonset.yaml");
    assert_eq!(
        binding.role_ref.name,
        role.metadata.name.clone().expect("name")
    );
    let subject = &binding.subjects.expect("subjects")[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(Some(&subject.name), account.metadata.name.as_ref());
    assert_eq!(subject.namespace, account.metadata.namespace);
    assert_eq!(ds.metadata.namespace, account.metadata.namespace);
    let pod = ds.spec.expect("spec").template.spec.expect("pod");
    assert_eq!(pod.service_account_name, account.metadata.name);
}

/// The `filter-agent run` flags the ConfigMap's variables stand for (each
/// must be the environment name of a flag; RUST_LOG is the log filter).
fn flags_from_environment(config: &ConfigMap) -> Vec<String> {
    let cli = Cli::command();
    let run = cli.find_subcommand("run").expect("run");
    let mut flags = Vec::new();
    for (key, value) in config.data.clone().expect("data") {
        if key == "RUST_LOG" {
            continue;
        }
        let arg = run
            .get_arguments()
            .find(|a| a.get_env().and_then(|e| e.to_str()) == Some(key.as_str()))
            .unwrap_or_else(|| panic!("ConfigMap key {key} is no flag's environment name"));
        let long = arg.get_long().expect("long flag");
        let is_flag = matches!(arg.get_action(), clap::ArgAction::SetTrue);
        match (is_flag, value.as_str()) {
            (true, "true") => flags.push(format!("--{long}")),
            (true, "false") => {}
            (true, other) => panic!("{key}: {other:?} is not true or false"),
            (false, v) => flags.push(format!("--{long}={v}")),
        }
    }
    flags
}

fn run_args(argv: &[String]) -> filter_agent::cli::RunArgs {
    let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    match cli.command {
        Command::Run(args) => args,
        _ => panic!("{argv:?} is not `run`"),
    }
}

#[test]
fn the_daemonset_runs_the_agent_from_the_api_with_its_probes_and_pins() {
    let ds: DaemonSet = load("daemonset.yaml");
    let config: ConfigMap = load("configmap.yaml");
    let spec = ds.spec.expect("spec");
    assert_eq!(
        spec.update_strategy.and_then(|u| u.type_).as_deref(),
        Some("RollingUpdate")
    );
    let pod = spec.template.spec.expect("pod");
    assert_eq!(pod.host_network, Some(true));
    let tolerations = pod.tolerations.clone().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint"
    );
    let c = &pod.containers[0];
    // NODE_NAME from the downward API.
    let node = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");
    // The ConfigMap is the environment.
    assert!(c
        .env_from
        .iter()
        .flatten()
        .any(|e| e.config_map_ref.as_ref().map(|r| &r.name) == config.metadata.name.as_ref()));
    // Capabilities, not privileged.
    let security = c.security_context.clone().expect("securityContext");
    assert_ne!(security.privileged, Some(true));
    let added: BTreeSet<String> = security
        .capabilities
        .and_then(|c| c.add)
        .expect("capabilities")
        .into_iter()
        .collect();
    for cap in ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"] {
        assert!(added.contains(cap), "{cap}");
    }
    // bpffs from the host at /sys/fs/bpf.
    let bpffs = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| h.path == "/sys/fs/bpf")
        })
        .expect("bpffs volume");
    assert!(c
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.name == bpffs.name && m.mount_path == "/sys/fs/bpf"));

    // The command line with the ConfigMap's environment is one `run`
    // accepts: the API in-cluster, probes where the probes look.
    let mut argv = vec!["filter-agent".to_owned()];
    argv.extend(c.args.clone().expect("args"));
    argv.extend(flags_from_environment(&config));
    let args = run_args(&argv);
    let cfg = run_config(&args).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(matches!(cfg.kube, Some(Access::InCluster)), "{argv:?}");
    let addr = cfg.metrics_addr.expect("probe address");
    for (probe, path) in [
        (c.liveness_probe.clone(), "/healthz"),
        (c.readiness_probe.clone(), "/readyz"),
    ] {
        let get = probe.and_then(|p| p.http_get).expect("httpGet probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(addr.port()))
        );
        assert_eq!(get.host.as_deref(), Some(addr.ip().to_string().as_str()));
    }
}

#[test]
fn the_image_runs_the_agent_with_arguments_it_accepts() {
    let text = std::fs::read_to_string(deploy().join("Dockerfile")).expect("Dockerfile");
    let json_of = |instruction: &str| -> Vec<String> {
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with(instruction))
            .unwrap_or_else(|| panic!("no {instruction}"));
        serde_json::from_str(line[instruction.len()..].trim()).expect("exec form")
    };
    let entrypoint = json_of("ENTRYPOINT");
    assert_eq!(entrypoint, ["/filter-agent"]);
    assert!(
        text.contains("COPY --from=build /filter-agent /filter-agent"),
        "the image holds the agent at its entrypoint"
    );
    let mut argv = vec!["filter-agent".to_owned()];
    argv.extend(json_of("CMD"));
    let cfg = run_config(&run_args(&argv)).expect("config");
    assert!(matches!(cfg.kube, Some(Access::InCluster)));
}

#[test]
fn bad_command_lines_are_refused_by_name() {
    let refused = |argv: &[&str]| {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        run_config(&run_args(&argv))
            .expect_err("refused")
            .to_string()
    };
    assert!(refused(&["filter-agent", "run"]).contains("no policy source"));
    assert!(refused(&["filter-agent", "run", "--kube", "--kubeconfig", "x"]).contains("not both"));
    assert!(refused(&[
        "filter-agent",
        "run",
        "--policy-dir",
        "d",
        "--auto-host-endpoints"
    ])
    .contains("needs the Kubernetes API"));
}
