//! A Kubernetes API server for tests, in-process, on 127.0.0.1 inside a
//! test namespace: the list and watch protocol for the collections the
//! agent watches, and nothing else.
//!
//! What it speaks, as the real API server does:
//! * `GET <collection>`: a `<Kind>List` with the collection's objects and
//!   the current `metadata.resourceVersion`; `fieldSelector=metadata.name=X`
//!   filters by name (the agent watches its own Node so);
//! * `GET <collection>?watch=true&resourceVersion=N`: a chunked stream of
//!   `{"type": "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK", "object": ...}`
//!   lines: every change after N, then changes as they happen, a BOOKMARK
//!   first; a resourceVersion older than the history kept (see
//!   [`KubeApi::forget_history`]) gets an `ERROR` event with a `410 Gone`
//!   Status, after which a client must list again;
//! * objects carry `metadata.resourceVersion` and `uid`.
//!
//! Tests change objects with [`KubeApi::apply`] and [`KubeApi::delete`],
//! end every watch stream with [`KubeApi::close_watches`], and take the
//! server away and back with [`KubeApi::stop`] and [`KubeApi::start`].

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::Netns;

/// A collection: where it is served and the kind of its items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Collection {
    /// URL path of the collection (all namespaces).
    pub path: &'static str,
    /// `apiVersion` of its objects.
    pub api_version: &'static str,
    /// `kind` of its objects.
    pub kind: &'static str,
}

/// Every collection the agent watches.
pub const COLLECTIONS: &[Collection] = &[
    calico(
        "/apis/crd.projectcalico.org/v1/globalnetworkpolicies",
        "GlobalNetworkPolicy",
    ),
    calico(
        "/apis/crd.projectcalico.org/v1/networkpolicies",
        "NetworkPolicy",
    ),
    calico(
        "/apis/crd.projectcalico.org/v1/hostendpoints",
        "HostEndpoint",
    ),
    calico(
        "/apis/crd.projectcalico.org/v1/globalnetworksets",
        "GlobalNetworkSet",
    ),
    calico("/apis/crd.projectcalico.org/v1/networksets", "NetworkSet"),
    calico("/apis/crd.projectcalico.org/v1/tiers", "Tier"),
    calico(
        "/apis/crd.projectcalico.org/v1/felixconfigurations",
        "FelixConfiguration",
    ),
    core("/api/v1/namespaces", "Namespace"),
    core("/api/v1/services", "Service"),
    core("/api/v1/nodes", "Node"),
];

const fn calico(path: &'static str, kind: &'static str) -> Collection {
    Collection {
        path,
        api_version: "crd.projectcalico.org/v1",
        kind,
    }
}

const fn core(path: &'static str, kind: &'static str) -> Collection {
    Collection {
        path,
        api_version: "v1",
        kind,
    }
}

/// The collection of `kind`.
pub fn collection(kind: &str) -> Collection {
    *COLLECTIONS
        .iter()
        .find(|c| c.kind == kind)
        .unwrap_or_else(|| panic!("no collection of {kind}"))
}

#[derive(Default)]
struct Db {
    /// The last resourceVersion given out.
    rv: u64,
    /// Objects by collection, then `namespace/name`.
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// Every change: (resourceVersion, collection path, event type, object).
    history: Vec<(u64, &'static str, &'static str, Value)>,
    /// Watches from a resourceVersion before this one get 410 Gone.
    oldest: u64,
    /// Open watch streams: collection path and where events go.
    watches: Vec<(&'static str, mpsc::UnboundedSender<Bytes>)>,
    /// Requests served, by kind of request, for tests to look at.
    requests: Vec<String>,
}

impl Db {
    fn emit(&mut self, path: &'static str, kind: &'static str, object: Value) {
        let line = event_line(kind, &object);
        self.history.push((self.rv, path, kind, object));
        self.watches
            .retain(|(p, tx)| *p != path || tx.send(line.clone()).is_ok());
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("json");
    line.push(b'\n');
    Bytes::from(line)
}

fn key(object: &Value) -> String {
    let meta = &object["metadata"];
    format!(
        "{}/{}",
        meta["namespace"].as_str().unwrap_or_default(),
        meta["name"].as_str().expect("objects have a name")
    )
}

/// A kubeconfig file at `path` for `server` with bearer `token`.
pub fn write_kubeconfig(path: &Path, server: &str, token: &str) {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\nusers:\n- name: test\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\n"
    );
    std::fs::write(path, text).expect("write kubeconfig");
}

/// The test API server. Stopped on drop.
pub struct KubeApi {
    db: Arc<Mutex<Db>>,
    netns: std::path::PathBuf,
    addr: SocketAddr,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl KubeApi {
    /// Serves on `127.0.0.1:port` inside `ns`, with no objects yet.
    pub fn start_in(ns: &Netns, port: u16) -> KubeApi {
        let mut api = KubeApi {
            db: Arc::new(Mutex::new(Db::default())),
            netns: ns.path(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            running: None,
        };
        api.start();
        api
    }

    /// A kubeconfig file at `path` that points at this server with
    /// [`TOKEN`].
    pub fn write_kubeconfig(&self, path: &Path) {
        write_kubeconfig(path, &format!("http://{}", self.addr), TOKEN);
    }

    /// Starts serving again (after [`KubeApi::stop`]); objects and history
    /// are kept.
    pub fn start(&mut self) {
        if self.running.is_some() {
            return;
        }
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (db, addr, netns) = (self.db.clone(), self.addr, self.netns.clone());
        let thread = std::thread::spawn(move || {
            crate::enter(&netns);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
                ready_tx.send(()).expect("test alive");
                let app = Router::new().fallback(handle).with_state(db);
                tokio::select! {
                    r = axum::serve(listener, app) => r.expect("serve"),
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime ends every connection and stream.
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("API server started");
        self.running = Some((stop_tx, thread));
    }

    /// Stops serving: the listener closes and every open stream breaks,
    /// as when the API server goes away.
    pub fn stop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
        self.db.lock().expect("db").watches.clear();
    }

    /// Ends every watch stream (the server closing them, as it does at
    /// `timeoutSeconds`); clients watch again from their resourceVersion.
    pub fn close_watches(&self) {
        self.db.lock().expect("db").watches.clear();
    }

    /// Forgets the history: a watch from any resourceVersion given out so
    /// far gets `410 Gone`, so its client must list again.
    pub fn forget_history(&self) {
        let mut db = self.db.lock().expect("db");
        db.oldest = db.rv + 1;
        db.history.clear();
    }

    /// Creates or replaces an object (`kind` picks its collection); returns
    /// its new resourceVersion.
    pub fn apply(&self, kind: &str, mut object: Value) -> u64 {
        let c = collection(kind);
        let mut db = self.db.lock().expect("db");
        db.rv += 1;
        let rv = db.rv;
        object["apiVersion"] = json!(c.api_version);
        object["kind"] = json!(c.kind);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let k = key(&object);
        object["metadata"]["uid"] = json!(format!("uid-{}", k.replace('/', "-")));
        let objects = db.objects.entry(c.path).or_default();
        let event = if objects.insert(k, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        db.emit(c.path, event, object);
        rv
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> bool {
        let c = collection(kind);
        let mut db = self.db.lock().expect("db");
        let k = format!("{}/{name}", namespace.unwrap_or_default());
        let Some(mut object) = db.objects.entry(c.path).or_default().remove(&k) else {
            return false;
        };
        db.rv += 1;
        object["metadata"]["resourceVersion"] = json!(db.rv.to_string());
        db.emit(c.path, "DELETED", object);
        true
    }

    /// Requests served so far (`LIST <path>` or `WATCH <path> from <rv>`).
    pub fn requests(&self) -> Vec<String> {
        self.db.lock().expect("db").requests.clone()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The bearer token [`KubeApi::write_kubeconfig`] writes; any other is
/// refused with 401, as bad credentials are.
pub const TOKEN: &str = "test-token";

async fn handle(
    State(db): State<Arc<Mutex<Db>>>,
    uri: Uri,
    headers: axum::http::HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(TOKEN) {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let Some(c) = COLLECTIONS.iter().find(|c| c.path == uri.path()) else {
        return status(StatusCode::NOT_FOUND, "NotFound", "no such collection");
    };
    let name_filter = query
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name="))
        .map(str::to_owned);
    let selected = move |o: &Value| {
        name_filter
            .as_deref()
            .is_none_or(|n| o["metadata"]["name"].as_str() == Some(n))
    };
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let mut d = db.lock().expect("db");
    if !watch {
        d.requests.push(format!("LIST {}", c.path));
        let items: Vec<Value> = d
            .objects
            .get(c.path)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|o| selected(o))
            .cloned()
            .collect();
        let body = json!({
            "apiVersion": c.api_version,
            "kind": format!("{}List", c.kind),
            "metadata": {"resourceVersion": d.rv.to_string()},
            "items": items,
        });
        return (StatusCode::OK, axum::Json(body)).into_response();
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(d.rv);
    d.requests.push(format!("WATCH {} from {from}", c.path));
    let (tx, rx) = mpsc::unbounded_channel();
    if from + 1 < d.oldest {
        let gone = json!({
            "apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": format!("too old resource version: {from} ({})", d.oldest),
            "reason": "Expired", "code": 410,
        });
        let _ = tx.send(event_line("ERROR", &gone));
        drop(tx);
    } else {
        let bookmark = json!({
            "apiVersion": c.api_version, "kind": c.kind,
            "metadata": {"resourceVersion": d.rv.to_string()},
        });
        let backlog: Vec<Bytes> = d
            .history
            .iter()
            .filter(|(rv, path, _, o)| *rv > from && *path == c.path && selected(o))
            .map(|(_, _, kind, o)| event_line(kind, o))
            .collect();
        for line in backlog {
            let _ = tx.send(line);
        }
        let _ = tx.send(event_line("BOOKMARK", &bookmark));
        if name_filter_is_none(&query) {
            d.watches.push((c.path, tx));
        } else {
            // A filtered watch gets every change of the collection that
            // passes the filter: the agent's Node watch filters by name.
            let (ftx, mut frx) = mpsc::unbounded_channel::<Bytes>();
            d.watches.push((c.path, ftx));
            let name = query
                .get("fieldSelector")
                .and_then(|f| f.strip_prefix("metadata.name="))
                .map(str::to_owned);
            tokio::spawn(async move {
                while let Some(line) = frx.recv().await {
                    let v: Value = serde_json::from_slice(&line).unwrap_or(Value::Null);
                    if name.as_deref() == v["object"]["metadata"]["name"].as_str()
                        && tx.send(line).is_err()
                    {
                        break;
                    }
                }
            });
        }
    }
    drop(d);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("response")
}

fn name_filter_is_none(query: &BTreeMap<String, String>) -> bool {
    !query
        .get("fieldSelector")
        .is_some_and(|f| f.starts_with("metadata.name="))
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "apiVersion": "v1", "kind": "Status", "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    (code, axum::Json(body)).into_response()
}
