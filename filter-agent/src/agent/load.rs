//! Reading and compiling a policy for this node: what a reload does off
//! the agent's loop.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    compile::{self, Compiled},
    model::{Limits, Parses, Store},
    node,
};

/// Each policy file's text as last applied.
pub type Texts = BTreeMap<PathBuf, String>;

/// The node's interfaces: name → (index, addresses). Endpoint binding (by
/// `expectedIPs`) and attachment depend on them: a policy is compiled for
/// one such snapshot.
pub type NodeInterfaces = BTreeMap<String, (u32, Vec<IpAddr>)>;

/// A policy read and compiled for this node.
pub struct Loaded {
    pub compiled: Compiled,
    /// The interfaces it was compiled for.
    pub seen: NodeInterfaces,
    /// The resources and file texts it was compiled from.
    pub store: Arc<Store>,
    pub texts: Texts,
    /// Where the load's time went.
    pub took: Took,
}

/// A load's time by step, for the log: what a slow reload spent its time
/// on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Took {
    /// Reading the policy files.
    pub read: Duration,
    /// Parsing, typing and validating them (and the Kubernetes API's
    /// resources).
    pub model: Duration,
    /// Compiling for this node.
    pub compile: Duration,
}

/// Why a policy source was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Files that do not load or validate: every error, each naming file,
    /// line and field.
    #[error("{} invalid resource(s)", .0.len())]
    Invalid(Vec<crate::model::Error>),
    /// A resource this dataplane cannot enforce as Calico would.
    #[error(transparent)]
    Unsupported(#[from] compile::Error),
    /// Reading and compiling took longer than `--parse-timeout`.
    #[error("reading and compiling the policy took longer than {0:?} (--parse-timeout): given up")]
    TimedOut(Duration),
    /// The loading task itself failed (a panic: a bug).
    #[error("loading the policy failed: {0}")]
    Task(String),
}

impl Refused {
    /// One line per problem, for the log.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Refused::Invalid(errors) => errors.iter().map(|e| e.to_string()).collect(),
            other => vec![other.to_string()],
        }
    }
}

/// What a reload found.
pub enum Outcome {
    /// A new policy, compiled.
    Loaded(Loaded),
    /// The policy source was refused. `recompiled`:
    /// the resources in force compiled again for the interfaces of now, as
    /// endpoint binding by expectedIPs and Service frontends depend on them.
    Rejected {
        why: Refused,
        recompiled: Option<Loaded>,
        /// The interfaces the refused sources were read for (`None`: the
        /// read did not finish).
        tried_for: Option<NodeInterfaces>,
    },
}

/// What a reload reads: the policy directory, if one is watched, and the
/// Kubernetes API's resources as last seen, if it is watched.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The policy directory.
    pub dir: Option<PathBuf>,
    /// This node's name.
    pub node_name: String,
    /// What one policy file may cost to read.
    pub limits: Limits,
    /// Resources from the Kubernetes API (`(Kind/namespace/name,
    /// document)`), and the namespaces' labels.
    pub kube: Option<(Vec<(String, serde_json::Value)>, Namespaces)>,
    /// What the last load leaves for the next to start from.
    pub memo: Arc<Mutex<Memo>>,
}

/// The last load's work, which the next takes over where its inputs did
/// not change: a one-rule change to a big policy then costs about what the
/// rule does, not what the policy does.
#[derive(Debug, Default)]
pub struct Memo {
    /// Each policy file's last parse ([`crate::model::reparse`]).
    pub parses: Parses,
    /// The last compile's classified fields ([`compile::Reuse`]).
    pub fields: compile::Reuse,
}

/// Namespace labels by namespace.
pub type Namespaces = BTreeMap<String, BTreeMap<String, String>>;

/// Reads the sources and compiles them for the interfaces of now; when
/// they are refused, compiles the resources in force again instead if the
/// interfaces changed since (`in_force`: those resources and the interfaces
/// they were compiled for).
pub fn load(
    inputs: &Inputs,
    texts: &Texts,
    in_force: Option<(Arc<Store>, NodeInterfaces)>,
) -> Outcome {
    let node_name = inputs.node_name.as_str();
    // A load given up on (--parse-timeout) may still hold the memo: this
    // one then starts from nothing.
    let mut fresh = Memo::default();
    let mut held = inputs.memo.try_lock();
    let memo = match held.as_deref_mut() {
        Ok(memo) => memo,
        Err(_) => &mut fresh,
    };
    // One read of the interfaces serves both, made while the sources are
    // read and parsed: the netlink dumps took a tenth of a one-rule
    // reload of a big policy.
    let (ifaces, modelled) = std::thread::scope(|s| {
        let reading = std::thread::Builder::new().spawn_scoped(s, node::interfaces);
        let modelled = model(inputs, texts, &mut memo.parses);
        let ifaces = match reading {
            Ok(r) => r.join().unwrap_or_else(|_| node::interfaces()),
            Err(_) => node::interfaces(),
        };
        (ifaces, modelled)
    });
    let loaded = modelled.and_then(|m| {
        let mut loaded = compile_for_node(
            Arc::new(m.store),
            node_name,
            ifaces.clone(),
            m.texts.into_iter().collect(),
            &mut memo.fields,
        )?;
        loaded.took.read = m.took.read;
        loaded.took.model = m.took.model;
        Ok(loaded)
    });
    match loaded {
        Ok(l) => Outcome::Loaded(l),
        Err(why) => Outcome::Rejected {
            why,
            recompiled: in_force
                .filter(|(_, compiled_for)| *compiled_for != ifaces)
                .and_then(|(store, _)| {
                    compile_for_node(store, node_name, ifaces.clone(), texts.clone(), &mut memo.fields)
                        .inspect_err(|e| tracing::error!(error = %e, "the resources in force do not compile for this node's interfaces of now"))
                        .ok()
                }),
            tried_for: Some(ifaces),
        },
    }
}

/// Reads and models the sources: the directory's files and the
/// Kubernetes API's resources.
///
/// A file found without any resource (empty, blank or only comments)
/// that had some when the policy in force was applied is read as it was
/// then: an editor or a shell redirection rewriting a file leaves it empty
/// for a moment, and that moment must not take its host endpoints and
/// policies away (the programs would detach). Deleting the file removes
/// its resources.
///
/// Resources from the Kubernetes API are loaded one by one: one that fails
/// validation is left out and reported (as Calico leaves a bad resource of
/// its datastore out), the others are enforced. A directory is loaded as a
/// whole: one bad file keeps the last good policy.
fn model(inputs: &Inputs, in_force: &Texts, parses: &mut Parses) -> Result<Modelled, Refused> {
    let mut store = Store::default();
    let started = std::time::Instant::now();
    let mut texts = match &inputs.dir {
        Some(dir) => read_dir(dir, &inputs.limits, in_force)?,
        None => Vec::new(),
    };
    let read = started.elapsed();
    if inputs.dir.is_some() {
        store = Store::from_texts_reusing(&texts, parses).map_err(Refused::Invalid)?;
    }
    if let Some((resources, namespaces)) = &inputs.kube {
        let (kube, errors) = Store::from_resources(resources);
        for e in &errors {
            tracing::error!(error = %e, "Kubernetes resource left out");
        }
        store.merge(kube);
        store.namespaces.clone_from(namespaces);
    }
    texts.sort();
    let model = started.elapsed() - read;
    let took = Took {
        read,
        model,
        ..Took::default()
    };
    Ok(Modelled { store, texts, took })
}

/// The sources read and modelled, to compile.
struct Modelled {
    store: Store,
    /// Each file's text, sorted by path.
    texts: Vec<(PathBuf, String)>,
    /// Reading and modelling.
    took: Took,
}

/// Reads the policy directory's files (see [`model()`] on files
/// caught empty).
fn read_dir(
    dir: &Path,
    limits: &Limits,
    in_force: &Texts,
) -> Result<Vec<(PathBuf, String)>, Refused> {
    let mut texts = crate::model::read_dir_texts(dir, limits).map_err(Refused::Invalid)?;
    for (file, text) in &mut texts {
        if !crate::model::has_no_documents(text) {
            continue;
        }
        if let Some(good) = in_force
            .get(file)
            .filter(|t| !crate::model::has_no_documents(t))
        {
            tracing::warn!(file = %file.display(), "policy file has no resources (being rewritten?): its last applied content stays in force until it has resources again or is deleted");
            text.clone_from(good);
        }
    }
    Ok(texts)
}

/// Compiles `store` for this node and its interfaces `ifaces`.
fn compile_for_node(
    store: Arc<Store>,
    node_name: &str,
    ifaces: NodeInterfaces,
    texts: Texts,
    reuse: &mut compile::Reuse,
) -> Result<Loaded, Refused> {
    // Said once per agent: the same files are reloaded on every change.
    static WARNED: std::sync::Once = std::sync::Once::new();
    if !store.network_policies.is_empty() {
        WARNED.call_once(|| tracing::warn!(
            count = store.network_policies.len(),
            "NetworkPolicy resources select pods, never host endpoints: loaded and validated, not enforced here"
        ));
    }
    let cnode = compile::Node {
        name: node_name.to_owned(),
        interfaces: ifaces
            .iter()
            .map(|(n, (_, a))| (n.clone(), a.clone()))
            .collect(),
    };
    let started = std::time::Instant::now();
    let (compiled, reused) = compile::compile_reusing(&store, &cnode, reuse);
    tracing::debug!(reused, "fields taken over from the last compile");
    let compiled = compiled?;
    Ok(Loaded {
        compiled,
        seen: ifaces,
        store,
        texts,
        took: Took {
            compile: started.elapsed(),
            ..Took::default()
        },
    })
}
