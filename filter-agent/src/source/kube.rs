//! The Kubernetes API as a policy source: Calico's custom resources (its
//! Kubernetes datastore), Namespaces, Services and this node's Node.
//!
//! One kube-rs watcher per kind keeps that kind's objects as the API
//! server has them. A watcher lists, then watches; on `410 Gone` it lists
//! again, on a dropped connection it reconnects after a backoff (0.5 s
//! doubling to 10 s, jittered so a thousand nodes do not return at once).
//! Every change wakes the agent, which debounces and then compiles every
//! kind's objects as they are then ([`Kube::snapshot`]). Until each kind
//! has been listed once there is no snapshot: a policy half-listed is
//! never enforced. While a watch fails, what it last had stays, and
//! [`Kube::stale_since`] says since when.
//!
//! How objects become Calico v3 resources is in [`to_resources`].

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        utils::Backoff,
        watcher::{self, Event},
        WatchStreamExt,
    },
    Client,
};
use serde_json::{json, Value};
use tokio::{sync::mpsc, task::JoinHandle};

/// How to reach the API server.
#[derive(Debug, Clone)]
pub enum Access {
    /// The pod's service account (`KUBERNETES_SERVICE_HOST`, the mounted
    /// token and CA).
    InCluster,
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
}

/// The group and version of the custom resources Calico's Kubernetes
/// datastore keeps.
pub const CALICO_GROUP: &str = "crd.projectcalico.org";
/// Their version.
pub const CALICO_VERSION: &str = "v1";

/// Calico kinds watched: kind, plural (namespaced kinds in all
/// namespaces).
pub const CALICO_KINDS: &[(&str, &str)] = &[
    ("GlobalNetworkPolicy", "globalnetworkpolicies"),
    ("NetworkPolicy", "networkpolicies"),
    ("HostEndpoint", "hostendpoints"),
    ("GlobalNetworkSet", "globalnetworksets"),
    ("NetworkSet", "networksets"),
    ("Tier", "tiers"),
    ("FelixConfiguration", "felixconfigurations"),
];

/// Core kinds watched: kind, plural (all of them cluster-wide but Node,
/// which is this node's only).
pub const CORE_KINDS: &[(&str, &str)] = &[
    ("Namespace", "namespaces"),
    ("Service", "services"),
    ("Node", "nodes"),
];

/// A source error: the API cannot be configured or reached.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig file could not be read or used.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Not in a pod, or the service account is not mounted.
    #[error(
        "in-cluster configuration: {0} (run in a pod with a service account, or give --kubeconfig)"
    )]
    InCluster(String),
    /// The client could not be built.
    #[error("Kubernetes client: {0}")]
    Client(String),
}

/// Builds a client for `access`. Only configuration is checked here: an
/// unreachable server or refused credentials show as a watch that fails
/// (logged, retried, the source stale), not as an agent that will not start.
pub async fn client(access: &Access) -> Result<Client, Error> {
    let config = match access {
        Access::InCluster => {
            kube::Config::incluster().map_err(|e| Error::InCluster(e.to_string()))?
        }
        Access::Kubeconfig(path) => {
            let bad = |message: String| Error::Kubeconfig {
                path: path.clone(),
                message,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| bad(e.to_string()))?
        }
    };
    Client::try_from(config).map_err(|e| Error::Client(e.to_string()))
}

/// Objects of one kind by `namespace/name`, as JSON.
type Objects = BTreeMap<String, Value>;

#[derive(Default)]
struct State {
    objects: BTreeMap<&'static str, Objects>,
    /// Kinds listed at least once.
    listed: BTreeSet<&'static str>,
    /// Kinds whose watch fails now, with since when.
    failing: BTreeMap<&'static str, SystemTime>,
}

/// The running watches. Dropping it stops them.
pub struct Kube {
    state: Arc<Mutex<State>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Kube {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One kind's objects as a watch saw them.
#[derive(Debug, Clone)]
pub struct Object {
    /// Its kind.
    pub kind: &'static str,
    /// The object as JSON.
    pub value: Value,
}

impl Kube {
    /// Starts watching with `client`; each change sends `()` on `changes`.
    /// `node` is this node's name (its Node is the only one watched).
    pub fn start(client: Client, node: &str, changes: mpsc::UnboundedSender<()>) -> Kube {
        let state = Arc::new(Mutex::new(State::default()));
        let mut tasks = Vec::new();
        for &(kind, plural) in CALICO_KINDS {
            let gvk = GroupVersionKind::gvk(CALICO_GROUP, CALICO_VERSION, kind);
            let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
            // Namespaced kinds too are watched across all namespaces.
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
            tasks.push(tokio::spawn(watch_kind(
                api,
                kind,
                watcher::Config::default(),
                state.clone(),
                changes.clone(),
            )));
        }
        tasks.push(tokio::spawn(watch_kind(
            Api::<Namespace>::all(client.clone()),
            "Namespace",
            watcher::Config::default(),
            state.clone(),
            changes.clone(),
        )));
        tasks.push(tokio::spawn(watch_kind(
            Api::<Service>::all(client.clone()),
            "Service",
            watcher::Config::default(),
            state.clone(),
            changes.clone(),
        )));
        tasks.push(tokio::spawn(watch_kind(
            Api::<Node>::all(client),
            "Node",
            watcher::Config::default().fields(&format!("metadata.name={node}")),
            state.clone(),
            changes,
        )));
        Kube { state, tasks }
    }

    /// Every object of every kind, once each kind has been listed.
    pub fn snapshot(&self) -> Option<Vec<Object>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let all = CALICO_KINDS
            .iter()
            .map(|k| k.0)
            .chain(CORE_KINDS.iter().map(|k| k.0));
        if !all.clone().all(|k| state.listed.contains(k)) {
            return None;
        }
        Some(
            state
                .objects
                .iter()
                .flat_map(|(kind, objects)| {
                    objects.values().map(|v| Object {
                        kind,
                        value: v.clone(),
                    })
                })
                .collect(),
        )
    }

    /// Since when a watch has been failing (the oldest failure), if one is.
    pub fn stale_since(&self) -> Option<SystemTime> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.failing.values().min().copied()
    }
}

/// Keeps one kind's objects in `state` as its watch reports them.
async fn watch_kind<K>(
    api: Api<K>,
    kind: &'static str,
    config: watcher::Config,
    state: Arc<Mutex<State>>,
    changes: mpsc::UnboundedSender<()>,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    K: Send + 'static,
{
    let mut events = watcher::watcher(api, config)
        .backoff(Jittered::default())
        .boxed();
    // Objects of a list under way: they replace the kind's objects only
    // when the list is complete (a deletion while the watch was away then
    // shows as the object missing).
    let mut listing: Option<Objects> = None;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                let e = with_causes(&e);
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                if !s.failing.contains_key(kind) {
                    tracing::warn!(kind, error = %e, "Kubernetes watch failed; the last objects seen stay in force while it retries");
                    s.failing.insert(kind, SystemTime::now());
                } else {
                    tracing::debug!(kind, error = %e, "Kubernetes watch still failing");
                }
                continue;
            }
        };
        let key = |o: &K| {
            let meta = o.meta();
            format!(
                "{}/{}",
                meta.namespace.as_deref().unwrap_or_default(),
                meta.name.as_deref().unwrap_or_default()
            )
        };
        let json = |o: &K| serde_json::to_value(o).unwrap_or(Value::Null);
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        if s.failing.remove(kind).is_some() {
            tracing::info!(kind, "Kubernetes watch is back");
        }
        let changed = match event {
            Event::Init => {
                listing = Some(Objects::new());
                false
            }
            Event::InitApply(o) => {
                listing.get_or_insert_default().insert(key(&o), json(&o));
                false
            }
            Event::InitDone => {
                let objects = listing.take().unwrap_or_default();
                tracing::debug!(kind, count = objects.len(), "listed");
                s.objects.insert(kind, objects);
                s.listed.insert(kind);
                true
            }
            Event::Apply(o) => {
                s.objects.entry(kind).or_default().insert(key(&o), json(&o));
                true
            }
            Event::Delete(o) => {
                s.objects.entry(kind).or_default().remove(&key(&o));
                true
            }
        };
        drop(s);
        if changed {
            let _ = changes.send(());
        }
    }
}

/// An error and its causes, `: `-joined (a refused connection shows as
/// such, not as "client error (Connect)").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

/// Exponential backoff from 0.5 s to 10 s, each delay shortened by up to
/// a quarter at random, reset once a watch works again.
#[derive(Debug, Clone)]
struct Jittered {
    next: Duration,
}

impl Default for Jittered {
    fn default() -> Self {
        Jittered {
            next: Duration::from_millis(500),
        }
    }
}

impl Iterator for Jittered {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(10));
        // Cheap randomness: the clock's nanoseconds.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Some(now - now.mul_f64(f64::from(nanos % 250) / 1000.0))
    }
}

impl Backoff for Jittered {
    fn reset(&mut self) {
        *self = Jittered::default();
    }
}

/// What the agent builds from Kubernetes objects, besides Calico's own
/// resources.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// This node's name.
    pub node: String,
    /// Create `<node>-auto-hep` as Calico's kube-controllers would.
    pub auto_host_endpoints: bool,
}

/// Each Namespace's labels, by name.
pub fn namespaces(objects: &[Object]) -> BTreeMap<String, BTreeMap<String, String>> {
    objects
        .iter()
        .filter(|o| o.kind == "Namespace")
        .filter_map(|o| {
            let meta = &o.value["metadata"];
            let labels = serde_json::from_value(meta["labels"].clone()).unwrap_or_default();
            Some((meta["name"].as_str()?.to_owned(), labels))
        })
        .collect()
}

/// Kubernetes objects as the Calico v3 resource documents this project
/// loads, each with a name for errors (`Kind/namespace/name`):
///
/// * Calico custom resources (`crd.projectcalico.org/v1`) become the
///   `projectcalico.org/v3` resource they store: same kind and spec;
///   metadata keeps name, namespace, labels and annotations (less Calico's
///   own `projectcalico.org/metadata` bookkeeping). A policy of the
///   default tier stored as `default.<name>` (older Calico releases) is
///   `<name>`.
/// * A Namespace becomes the profile `kns.<namespace>` Calico derives from
///   it (allow all, `labelsToApply` its labels as `pcns.<key>` and
///   `pcns.projectcalico.org/name`), and its labels are what
///   `namespaceSelector` sees.
/// * Services are taken as they are (frontends for the forward stage).
/// * With `auto_host_endpoints`, this node's Node becomes the host
///   endpoint Calico's kube-controllers creates: `<node>-auto-hep`,
///   `interfaceName: "*"`, `expectedIPs` the Node's InternalIP and
///   ExternalIP addresses, the Node's labels, profile
///   `projectcalico-default-allow`.
pub fn to_resources(objects: &[Object], options: &Options) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for o in objects {
        let meta = &o.value["metadata"];
        let name = meta["name"].as_str().unwrap_or_default();
        let namespace = meta["namespace"].as_str();
        let id = match namespace {
            Some(ns) => format!("{}/{ns}/{name}", o.kind),
            None => format!("{}/{name}", o.kind),
        };
        let mut annotations = meta["annotations"].clone();
        if let Some(map) = annotations.as_object_mut() {
            map.remove("projectcalico.org/metadata");
        }
        let labels = meta["labels"].clone();
        match o.kind {
            "Namespace" => {
                let mut apply: serde_json::Map<String, Value> = labels
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (format!("pcns.{k}"), v.clone()))
                    .collect();
                apply.insert("pcns.projectcalico.org/name".into(), json!(name));
                out.push((
                    id,
                    json!({
                        "apiVersion": crate::model::CALICO_V3,
                        "kind": "Profile",
                        "metadata": {"name": format!("kns.{name}")},
                        "spec": {
                            "ingress": [{"action": "Allow"}],
                            "egress": [{"action": "Allow"}],
                            "labelsToApply": apply,
                        },
                    }),
                ));
            }
            "Service" => out.push((id, o.value.clone())),
            "Node" => {
                if options.auto_host_endpoints && name == options.node {
                    let ips: Vec<&str> = o.value["status"]["addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|a| matches!(a["type"].as_str(), Some("InternalIP" | "ExternalIP")))
                        .filter_map(|a| a["address"].as_str())
                        .collect();
                    out.push((
                        id,
                        json!({
                            "apiVersion": crate::model::CALICO_V3,
                            "kind": "HostEndpoint",
                            "metadata": {"name": format!("{name}-auto-hep"), "labels": labels},
                            "spec": {
                                "node": name,
                                "interfaceName": "*",
                                "expectedIPs": ips,
                                "profiles": [crate::model::defaults::ALLOW_PROFILE],
                            },
                        }),
                    ));
                }
            }
            kind => {
                let spec = o.value.get("spec").cloned().unwrap_or(json!({}));
                let tier = spec["tier"].as_str().unwrap_or("default");
                let name = match name.strip_prefix("default.") {
                    Some(short)
                        if tier == "default"
                            && matches!(kind, "GlobalNetworkPolicy" | "NetworkPolicy") =>
                    {
                        short
                    }
                    _ => name,
                };
                let mut metadata = json!({"name": name});
                if let Some(ns) = namespace {
                    metadata["namespace"] = json!(ns);
                }
                if labels.is_object() {
                    metadata["labels"] = labels;
                }
                if annotations.as_object().is_some_and(|a| !a.is_empty()) {
                    metadata["annotations"] = annotations;
                }
                out.push((
                    id,
                    json!({
                        "apiVersion": crate::model::CALICO_V3,
                        "kind": kind,
                        "metadata": metadata,
                        "spec": spec,
                    }),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Store;

    fn object(kind: &'static str, value: Value) -> Object {
        Object { kind, value }
    }

    #[test]
    fn calico_objects_namespaces_and_the_node_become_v3_resources() {
        let objects = vec![
            object(
                "GlobalNetworkPolicy",
                json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "GlobalNetworkPolicy",
                       "metadata": {"name": "default.allow-ping", "resourceVersion": "7", "uid": "u",
                                    "annotations": {"projectcalico.org/metadata": "{\"uid\":\"u\"}"}},
                       "spec": {"selector": "all()", "ingress": [{"action": "Allow", "protocol": "ICMP"}]}}),
            ),
            object(
                "GlobalNetworkPolicy",
                json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "GlobalNetworkPolicy",
                       "metadata": {"name": "deny-all"},
                       "spec": {"ingress": [{"action": "Deny"}]}}),
            ),
            object(
                "Namespace",
                json!({"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": "web", "labels": {"team": "a"}}}),
            ),
            object(
                "Node",
                json!({"apiVersion": "v1", "kind": "Node",
                       "metadata": {"name": "n1", "labels": {"role": "worker"}},
                       "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.5"},
                                                {"type": "Hostname", "address": "n1"}]}}),
            ),
        ];
        let options = Options {
            node: "n1".into(),
            auto_host_endpoints: true,
        };
        let (store, errors) = Store::from_resources(&to_resources(&objects, &options));
        assert!(errors.is_empty(), "{errors:?}");
        let names: Vec<&str> = store
            .global_policies
            .iter()
            .map(|p| p.meta.name.as_str())
            .collect();
        assert_eq!(names, ["allow-ping", "deny-all"]);
        assert!(store.global_policies[0].meta.annotations.is_empty());
        let profile = &store.profiles[0];
        assert_eq!(profile.meta.name, "kns.web");
        assert_eq!(profile.spec.labels_to_apply["pcns.team"], "a");
        assert_eq!(
            profile.spec.labels_to_apply["pcns.projectcalico.org/name"],
            "web"
        );
        let hep = &store.host_endpoints[0];
        assert_eq!(hep.meta.name, "n1-auto-hep");
        assert_eq!(hep.spec.interface_name, "*");
        assert_eq!(hep.spec.expected_ips, ["10.0.0.5"]);
        assert_eq!(hep.meta.labels["role"], "worker");
        assert_eq!(namespaces(&objects)["web"]["team"], "a");
    }

    #[test]
    fn a_resource_that_fails_validation_is_left_out_and_named() {
        let objects = vec![
            object(
                "GlobalNetworkPolicy",
                json!({"metadata": {"name": "good"}, "spec": {"ingress": [{"action": "Deny"}]}}),
            ),
            object(
                "GlobalNetworkPolicy",
                json!({"metadata": {"name": "bad"},
                       "spec": {"ingress": [{"action": "Allow", "destination": {"ports": [80]}}]}}),
            ),
            object(
                "GlobalNetworkPolicy",
                json!({"metadata": {"name": "typo"}, "spec": {"ingres": []}}),
            ),
        ];
        let (store, errors) = Store::from_resources(&to_resources(&objects, &Options::default()));
        let names: Vec<&str> = store
            .global_policies
            .iter()
            .map(|p| p.meta.name.as_str())
            .collect();
        assert_eq!(names, ["good"]);
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(
            text.iter().any(
                |t| t.starts_with("GlobalNetworkPolicy/bad: spec.ingress[0].destination.ports")
            ),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("GlobalNetworkPolicy/typo: spec") && t.contains("ingres")),
            "{text:?}"
        );
    }

    #[test]
    fn backoff_grows_to_ten_seconds_and_resets() {
        let mut b = Jittered::default();
        let first = b.next().expect("delay");
        assert!(first <= Duration::from_millis(500) && first > Duration::from_millis(370));
        let last = (0..10).filter_map(|_| b.next()).last().expect("delay");
        assert!(last <= Duration::from_secs(10) && last > Duration::from_millis(7_400));
        b.reset();
        assert!(b.next().expect("delay") <= Duration::from_millis(500));
    }
}
