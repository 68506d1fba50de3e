//! Calico v3 resources: YAML files in, validated resources out.
//!
//! In: files of multi-document YAML (`---` separated, `List` kinds
//! allowed). Out: a [`Store`] of resources, each knowing the file and line it
//! came from, or every [`Error`] found, each naming file, line and field
//! path. Invariant: a resource in a [`Store`] has passed validation, so the
//! compiler never meets a malformed one.

pub mod defaults;
mod felix;
pub mod reparse;
pub mod types;
pub mod validate;
pub mod yaml;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{de::DeserializeOwned, Deserialize};

use reparse::{Parsed, Reparse};

pub use types::*;

/// Where a resource or error comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// File path as given.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Line 0: the whole file, or a resource that came from no file
        // (`Kind/namespace/name` from the Kubernetes API).
        match self.line {
            0 => write!(f, "{}", self.file.display()),
            line => write!(f, "{}:{line}", self.file.display()),
        }
    }
}

/// A resource that failed to load, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {field}: {message}")]
pub struct Error {
    /// File and line of the offending field (or of its document).
    pub origin: Origin,
    /// Field path such as `spec.ingress[0].destination.ports[1]`; the kind
    /// and name when the whole resource is at fault.
    pub field: String,
    /// What is wrong, in the user's terms.
    pub message: String,
}

/// A loaded resource with its name, labels and spec.
#[derive(Debug, Clone)]
pub struct Resource<S> {
    /// `metadata`.
    pub meta: Metadata,
    /// `spec`.
    pub spec: S,
    /// Where the resource starts.
    pub origin: Origin,
    /// Where its fields were written, to place later errors.
    pub source: Source,
}

/// The parsed document a resource came from and the resource's path in
/// it (empty, or `items[3]` in a List): later checks find the line of any
/// field through it. Empty for resources that come from no file.
#[derive(Clone, Default)]
pub struct Source {
    root: Option<Arc<yaml::Node>>,
    path: String,
}

impl Source {
    /// The line of `field` (a path inside the resource), if known.
    pub fn line_of(&self, field: &str) -> Option<usize> {
        let root = self.root.as_ref()?;
        Some(root.line_of(&join_path(&self.path, field)))
    }
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Source({:?})", self.path)
    }
}

/// Everything loaded from a policy source.
#[derive(Debug, Clone, Default)]
pub struct Store {
    /// Global network policies.
    pub global_policies: Vec<Resource<GlobalNetworkPolicySpec>>,
    /// Namespaced network policies (never applied to host endpoints).
    pub network_policies: Vec<Resource<NetworkPolicySpec>>,
    /// Host endpoints of every node.
    pub host_endpoints: Vec<Resource<HostEndpointSpec>>,
    /// Global network sets.
    pub global_network_sets: Vec<Resource<NetworkSetSpec>>,
    /// Namespaced network sets.
    pub network_sets: Vec<Resource<NetworkSetSpec>>,
    /// Tiers.
    pub tiers: Vec<Resource<TierSpec>>,
    /// Profiles.
    pub profiles: Vec<Resource<ProfileSpec>>,
    /// Felix configurations (`default` is the cluster-wide one).
    pub felix_configs: Vec<Resource<FelixConfigurationSpec>>,
    /// Kubernetes Services: where their frontends are.
    pub services: Vec<Service>,
    /// Namespace labels, where a source knows them (the Kubernetes API):
    /// what a rule's `namespaceSelector` sees (see [`Store::namespace_labels`]).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

/// The API version of Calico's resources as `calicoctl` writes them.
pub const CALICO_V3: &str = "projectcalico.org/v3";
const CALICO_CRD: &str = "crd.projectcalico.org/v1";

/// Calico kinds that exist but say nothing about host-endpoint policy.
const IGNORED_CALICO_KINDS: &[&str] = &[
    "BGPConfiguration",
    "BGPFilter",
    "BGPPeer",
    "BlockAffinity",
    "CalicoNodeStatus",
    "ClusterInformation",
    "IPAMConfiguration",
    "IPPool",
    "IPReservation",
    "KubeControllersConfiguration",
    "Node",
    "StagedGlobalNetworkPolicy",
    "StagedKubernetesNetworkPolicy",
    "StagedNetworkPolicy",
    "WorkloadEndpoint",
];

/// A whole resource document with a typed spec.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Document<S> {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default = "Option::default")]
    spec: Option<S>,
    /// Exported resources may carry a status block; it is ignored.
    #[serde(default, rename = "status")]
    _status: serde::de::IgnoredAny,
}

impl Store {
    /// Loads every `*.yaml`, `*.yml` and `*.json` file under `dir`
    /// (recursively, in name order) with the default [`Limits`]. Returns
    /// the store only if every file loaded; otherwise every error found.
    pub fn load_dir(dir: &Path) -> Result<Store, Vec<Error>> {
        Self::load_dir_limited(dir, &Limits::default())
    }

    /// [`Store::load_dir`] with `limits`.
    pub fn load_dir_limited(dir: &Path, limits: &Limits) -> Result<Store, Vec<Error>> {
        Self::from_texts(&read_dir_texts(dir, limits)?)
    }

    /// Parses and validates files already read (see [`read_dir_texts`]).
    pub fn from_texts(texts: &[(PathBuf, String)]) -> Result<Store, Vec<Error>> {
        Self::from_texts_reusing(texts, &mut Parses::default())
    }

    /// [`Store::from_texts`], parsing each file as a change to its last
    /// parse in `parses` ([`reparse`]); `parses` is left holding these
    /// texts' parses (a file that does not parse keeps its last one).
    pub fn from_texts_reusing(
        texts: &[(PathBuf, String)],
        parses: &mut Parses,
    ) -> Result<Store, Vec<Error>> {
        let mut store = Store::default();
        let mut errors = Vec::new();
        // What this load replaces, freed aside (`crate::drop_aside`).
        let mut retired: Vec<Parsed> = parses
            .files
            .extract_if(.., |file, _| !texts.iter().any(|(f, _)| f == file))
            .map(|(_, p)| p)
            .collect();
        let rules = std::cell::RefCell::new(RuleTypes {
            taken: 0,
            load: parses.rules.load + 1,
            ..std::mem::take(&mut parses.rules)
        });
        for (file, text) in texts {
            let parsed = match parses.files.get(file) {
                Some(last) => last.update(text),
                None => Parsed::new(text).map(|p| (p, Reparse::Whole)),
            };
            match parsed {
                Ok((parsed, how)) => {
                    tracing::debug!(file = %file.display(), ?how, "parsed");
                    store.add_docs(file, parsed.docs(), Some(&rules), &mut errors);
                    retired.extend(parses.files.insert(file.clone(), parsed));
                }
                Err(e) => errors.push(Error {
                    origin: Origin {
                        file: file.clone(),
                        line: e.line,
                    },
                    field: "-".into(),
                    message: e.message,
                }),
            }
        }
        let mut rules = rules.into_inner();
        let load = rules.load;
        let stale: Vec<_> = rules
            .typed
            .extract_if(|_, (_, seen)| *seen != load)
            .collect();
        parses.rules = rules;
        crate::drop_aside((retired, stale));
        if errors.is_empty() {
            validate::store(&store, &mut errors);
        }
        if errors.is_empty() {
            Ok(store)
        } else {
            Err(errors)
        }
    }

    /// The labels a `namespaceSelector` sees for namespace `ns`: its own,
    /// where known, and `projectcalico.org/name` (docs/semantics.md 5.4).
    pub fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        let mut labels = self.namespaces.get(ns).cloned().unwrap_or_default();
        labels.insert("projectcalico.org/name".into(), ns.to_owned());
        labels
    }

    /// Resources that came from no file (`(name, document)`, the name as
    /// `Kind/namespace/name`): each one that fails to load or validate is
    /// left out and reported, the others load (as Calico treats a bad
    /// resource in its datastore).
    pub fn from_resources(items: &[(String, serde_json::Value)]) -> (Store, Vec<Error>) {
        let mut store = Store::default();
        let mut errors = Vec::new();
        for (name, value) in items {
            let file = PathBuf::from(name);
            let ctx = DocContext {
                file: &file,
                root: Arc::new(yaml::Node::from_json(value)),
                rules: None,
            };
            store.add_node(&ctx, &ctx.root.clone(), "", &mut errors);
        }
        // Checks across resources (a policy's tier must exist) can fail
        // once another resource is left out: repeat until none fails.
        loop {
            let mut found = Vec::new();
            validate::store(&store, &mut found);
            if found.is_empty() {
                break;
            }
            let bad: BTreeSet<PathBuf> = found.iter().map(|e| e.origin.file.clone()).collect();
            store.retain(|origin| !bad.contains(&origin.file));
            errors.extend(found);
        }
        (store, errors)
    }

    /// Keeps the resources whose origin passes `keep`.
    fn retain(&mut self, keep: impl Fn(&Origin) -> bool) {
        macro_rules! retain {
            ($($list:ident),*) => {$(self.$list.retain(|r| keep(&r.origin));)*};
        }
        retain!(
            global_policies,
            network_policies,
            host_endpoints,
            global_network_sets,
            network_sets,
            tiers,
            profiles,
            felix_configs
        );
    }

    /// Adds every resource of `other`.
    pub fn merge(&mut self, other: Store) {
        self.global_policies.extend(other.global_policies);
        self.network_policies.extend(other.network_policies);
        self.host_endpoints.extend(other.host_endpoints);
        self.global_network_sets.extend(other.global_network_sets);
        self.network_sets.extend(other.network_sets);
        self.tiers.extend(other.tiers);
        self.profiles.extend(other.profiles);
        self.felix_configs.extend(other.felix_configs);
        self.services.extend(other.services);
        self.namespaces.extend(other.namespaces);
    }

    /// Loads the given files into one store.
    pub fn load_files(files: &[PathBuf]) -> Result<Store, Vec<Error>> {
        Self::load_files_limited(files, &Limits::default())
    }

    /// [`Store::load_files`] with `limits`.
    pub fn load_files_limited(files: &[PathBuf], limits: &Limits) -> Result<Store, Vec<Error>> {
        Self::from_texts(&read_texts(files, limits)?)
    }

    /// Parses one file's text into the store, appending errors.
    pub fn add_text(&mut self, file: &Path, text: &str, errors: &mut Vec<Error>) {
        let at = |line: usize, message: String| Error {
            origin: Origin {
                file: file.to_owned(),
                line,
            },
            field: "-".into(),
            message,
        };
        match yaml::documents(text) {
            Ok(docs) => {
                let docs: Vec<_> = docs.into_iter().map(Arc::new).collect();
                self.add_docs(file, &docs, None, errors);
            }
            Err(e) => errors.push(at(e.line, e.message)),
        }
    }

    /// Adds the resources of one file's parsed documents.
    fn add_docs(
        &mut self,
        file: &Path,
        docs: &[Arc<yaml::Node>],
        rules: Option<&std::cell::RefCell<RuleTypes>>,
        errors: &mut Vec<Error>,
    ) {
        for doc in docs {
            let ctx = DocContext {
                file,
                root: doc.clone(),
                rules,
            };
            self.add_node(&ctx, doc, "", errors);
        }
    }

    /// Adds the resource(s) in `node`, found at `path` in the document.
    fn add_node(
        &mut self,
        ctx: &DocContext<'_>,
        node: &yaml::Node,
        path: &str,
        errors: &mut Vec<Error>,
    ) {
        use yaml::Value;
        let at = |field: &str| join_path(path, field);
        match &node.value {
            Value::Null => return,
            Value::Seq(items) => {
                // calicoctl accepts a bare YAML/JSON list of resources.
                for (i, item) in items.iter().enumerate() {
                    self.add_node(ctx, item, &format!("{path}[{i}]"), errors);
                }
                return;
            }
            Value::Map(_) => {}
            _ => {
                errors.push(ctx.error_at(
                    path,
                    "expected a resource (a mapping with apiVersion and kind)".into(),
                ));
                return;
            }
        }
        let text = |k: &str| node.get(k).and_then(yaml::Node::as_str);
        let (Some(api_version), Some(kind)) = (text("apiVersion"), text("kind")) else {
            let missing = if text("apiVersion").is_none() {
                "apiVersion"
            } else {
                "kind"
            };
            errors.push(ctx.error_at(
                &at(missing),
                format!("missing {missing}: not a Kubernetes resource"),
            ));
            return;
        };
        if api_version == "v1"
            && matches!(
                kind,
                "policy" | "hostEndpoint" | "profile" | "workloadEndpoint" | "tier"
            )
        {
            errors.push(ctx.error_at(&at("apiVersion"),
                format!(
                    "this is the old Calico v1 format (apiVersion: v1, kind: {kind}), which Calico v3 no longer \
                     accepts; convert it with `calicoctl convert` to apiVersion: {CALICO_V3}"
                ),
            ));
            return;
        }
        if kind.ends_with("List") {
            match node.get("items").map(|n| &n.value) {
                Some(Value::Seq(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        self.add_node(ctx, item, &at(&format!("items[{i}]")), errors);
                    }
                }
                None | Some(Value::Null) => {}
                Some(_) => errors.push(ctx.error_at(&at("items"), "items must be a list".into())),
            }
            return;
        }
        if api_version == "v1" && kind == "Service" {
            if let Some(svc) = ctx.typed::<Service>(node, path, errors) {
                self.services.push(svc);
            }
            return;
        }
        if api_version != CALICO_V3 && api_version != CALICO_CRD {
            if api_version.contains("projectcalico.org") {
                errors.push(ctx.error_at(&at("apiVersion"),
                    format!("unsupported apiVersion {api_version:?}: expected {CALICO_V3} or {CALICO_CRD}"),
                ));
            } else {
                // Kubernetes objects that share the directory are not ours.
                tracing::debug!(file = %ctx.file.display(), kind, api_version, "skipping non-Calico resource");
            }
            return;
        }
        match kind {
            "GlobalNetworkPolicy" => {
                ctx.parse_policy(node, path, errors, &mut self.global_policies)
            }
            "NetworkPolicy" => ctx.parse_policy(node, path, errors, &mut self.network_policies),
            "HostEndpoint" => ctx.parse(node, path, errors, &mut self.host_endpoints),
            "GlobalNetworkSet" => ctx.parse(node, path, errors, &mut self.global_network_sets),
            "NetworkSet" => ctx.parse(node, path, errors, &mut self.network_sets),
            "Tier" => ctx.parse(node, path, errors, &mut self.tiers),
            "Profile" => ctx.parse(node, path, errors, &mut self.profiles),
            "FelixConfiguration" => ctx.parse(node, path, errors, &mut self.felix_configs),
            k if IGNORED_CALICO_KINDS.contains(&k) => {
                tracing::debug!(file = %ctx.file.display(), kind = k, "Calico kind without host-endpoint policy meaning, skipped");
            }
            other => {
                errors.push(ctx.error_at(&at("kind"), format!("unknown Calico kind {other:?}")))
            }
        }
    }
}

/// `a.b` + `c` → `a.b.c`; an empty prefix adds nothing.
pub(crate) fn join_path(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_owned()
    } else {
        format!("{prefix}.{field}")
    }
}

/// One document being parsed, for error positions.
struct DocContext<'a> {
    file: &'a Path,
    root: Arc<yaml::Node>,
    /// Rules typed by the last load, where the document is a reparse.
    rules: Option<&'a std::cell::RefCell<RuleTypes>>,
}

/// An error about `field` (a path from the document's root `root`, of
/// `file`), at its line.
fn error_in(file: &Path, root: &yaml::Node, field: &str, message: String) -> Error {
    Error {
        origin: Origin {
            file: file.to_owned(),
            line: root.line_of(field),
        },
        field: if field.is_empty() { "-" } else { field }.to_owned(),
        message,
    }
}

/// `node` (at `path` in the document `root` of `file`) as a `T`; the
/// error names the field that failed.
fn typed_in<T: DeserializeOwned>(
    file: &Path,
    root: &yaml::Node,
    node: &yaml::Node,
    path: &str,
) -> Result<T, Error> {
    serde_path_to_error::deserialize::<_, T>(node.deserializer()).map_err(|e| {
        let field = join_path(path, &e.path().to_string());
        error_in(file, root, &field, e.into_inner().to_string())
    })
}

/// Rules `which` of the list `list` (`items`) of the policy at `path`,
/// typed, in order. A full reload types every rule of a big policy, on two
/// threads (see [`crate::map_in_halves`]).
fn type_rules(
    file: &Path,
    root: &yaml::Node,
    path: &str,
    list: &str,
    items: &[Arc<yaml::Node>],
    which: &[usize],
) -> Vec<Result<Rule, Error>> {
    let one = |&i: &usize| {
        let at = join_path(path, &format!("spec.{list}[{i}]"));
        typed_in::<Rule>(file, root, &items[i], &at)
    };
    crate::map_in_halves(which, crate::PARALLEL_AT, one)
}

impl DocContext<'_> {
    /// An error about `field` (a path from the document's root), at its line.
    fn error_at(&self, field: &str, message: String) -> Error {
        error_in(self.file, &self.root, field, message)
    }

    /// `node` (at `path`) as a `T`; errors name the field that failed.
    fn typed<T: DeserializeOwned>(
        &self,
        node: &yaml::Node,
        path: &str,
        errors: &mut Vec<Error>,
    ) -> Option<T> {
        typed_in(self.file, &self.root, node, path)
            .map_err(|e| errors.push(e))
            .ok()
    }

    /// [`DocContext::parse`] of a policy whose rules are typed one by
    /// one, each taken from the last load where its item is the same.
    fn parse_policy<S: DeserializeOwned + Default + RuleLists>(
        &self,
        node: &yaml::Node,
        path: &str,
        errors: &mut Vec<Error>,
        out: &mut Vec<Resource<S>>,
    ) {
        match self
            .rules
            .and_then(|rules| self.typed_by_rule(node, path, rules))
        {
            Some(Ok(resource)) => out.push(resource),
            Some(Err(error)) => errors.push(error),
            None => self.parse(node, path, errors, out),
        }
    }

    /// `node` typed without its rule lists, then each rule alone (or taken
    /// from `rules`). The first error is the one typing the whole node
    /// gives: where anything but a rule fails, or there is no rule list,
    /// `None`, and the whole node is typed.
    fn typed_by_rule<S: DeserializeOwned + Default + RuleLists>(
        &self,
        node: &yaml::Node,
        path: &str,
        rules: &std::cell::RefCell<RuleTypes>,
    ) -> Option<Result<Resource<S>, Error>> {
        use yaml::Value;
        let Value::Map(entries) = &node.value else {
            return None;
        };
        let at_spec = entries.iter().position(|(k, _)| k.name == "spec")?;
        let spec = &entries[at_spec].1;
        let Value::Map(spec_entries) = &spec.value else {
            return None;
        };
        let is_list = |k: &yaml::Key, v: &yaml::Node| {
            matches!(k.name.as_str(), "ingress" | "egress") && matches!(v.value, Value::Seq(_))
        };
        if !spec_entries.iter().any(|(k, v)| is_list(k, v)) {
            return None;
        }
        let empty = |(k, v): &(yaml::Key, yaml::Node)| {
            let v = if is_list(k, v) {
                v.with_value(Value::Seq(Vec::new()))
            } else {
                v.clone()
            };
            (k.clone(), v)
        };
        let shell_spec = spec.with_value(Value::Map(spec_entries.iter().map(empty).collect()));
        let shell = node.with_value(Value::Map(
            entries
                .iter()
                .enumerate()
                .map(|(i, (k, v))| match i == at_spec {
                    true => (k.clone(), shell_spec.clone()),
                    false => (k.clone(), v.clone()),
                })
                .collect(),
        ));
        let doc = self.typed::<Document<S>>(&shell, path, &mut Vec::new())?;
        let mut spec = doc.spec.unwrap_or_default();
        let mut rules = rules.borrow_mut();
        let load = rules.load;
        for (key, list) in spec_entries {
            let (Value::Seq(items), Some(out)) = (&list.value, spec.list(&key.name)) else {
                continue;
            };
            out.reserve(items.len());
            let id = |item: &Arc<yaml::Node>| Arc::as_ptr(item) as usize;
            // The rules the last load did not type, typed first; the
            // first error in the list's order is the one returned, as
            // typing them one by one gives.
            let new: Vec<usize> = (0..items.len())
                .filter(|&i| !rules.typed.contains_key(&id(&items[i])))
                .collect();
            let typed = type_rules(self.file, &self.root, path, &key.name, items, &new);
            let mut typed = new.iter().copied().zip(typed).peekable();
            for (i, item) in items.iter().enumerate() {
                let id = id(item);
                let Some((_, typed)) = typed.next_if(|(j, _)| *j == i) else {
                    // Not new: the last load typed it.
                    let (rule, seen) = rules.typed.get_mut(&id)?;
                    *seen = load;
                    out.push(rule.clone());
                    rules.taken += 1;
                    continue;
                };
                let rule = match typed {
                    Ok(rule) => rule,
                    Err(e) => return Some(Err(e)),
                };
                let rule = Arc::new(Rule {
                    item: ItemId::of(item),
                    ..rule
                });
                rules.typed.insert(id, (rule.clone(), load));
                out.push(rule);
            }
        }
        Some(Ok(self.resource(node, path, doc.metadata, spec)))
    }

    /// The resource typed from `node` (at `path`).
    fn resource<S>(&self, node: &yaml::Node, path: &str, meta: Metadata, spec: S) -> Resource<S> {
        Resource {
            meta,
            spec,
            origin: Origin {
                file: self.file.to_owned(),
                line: node.line,
            },
            source: Source {
                root: Some(self.root.clone()),
                path: path.to_owned(),
            },
        }
    }

    fn parse<S: DeserializeOwned + Default>(
        &self,
        node: &yaml::Node,
        path: &str,
        errors: &mut Vec<Error>,
        out: &mut Vec<Resource<S>>,
    ) {
        if let Some(doc) = self.typed::<Document<S>>(node, path, errors) {
            let spec = doc.spec.unwrap_or_default();
            out.push(self.resource(node, path, doc.metadata, spec));
        }
    }
}

/// Whether `text` holds no YAML document (empty, blank or only comments
/// and document markers): what a file looks like while an editor or a
/// shell redirection rewrites it.
pub fn has_no_documents(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "---" || t == "..."
    })
}

/// Reads every policy file under `dir` (as [`Store::load_dir`] finds them)
/// within `limits`: each file's path and text, or every error.
pub fn read_dir_texts(dir: &Path, limits: &Limits) -> Result<Vec<(PathBuf, String)>, Vec<Error>> {
    let mut files = Vec::new();
    let dir_error = |e: std::io::Error| {
        vec![Error {
            origin: Origin {
                file: dir.to_owned(),
                line: 0,
            },
            field: "-".into(),
            message: format!("cannot read directory: {e}"),
        }]
    };
    let root = dir.canonicalize().map_err(dir_error)?;
    let mut refused = Vec::new();
    collect_files(&root, dir, &mut files, &mut refused).map_err(dir_error)?;
    match read_texts(&files, limits) {
        Ok(texts) if refused.is_empty() => Ok(texts),
        Ok(_) => Err(refused),
        Err(mut errors) => {
            errors.extend(refused);
            Err(errors)
        }
    }
}

/// Reads `files` within `limits` (regular files only, size bounded, see
/// [`Limits`]; nesting is the parser's budget, [`yaml::MAX_NESTING`]).
pub fn read_texts(
    files: &[PathBuf],
    limits: &Limits,
) -> Result<Vec<(PathBuf, String)>, Vec<Error>> {
    let mut texts = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        let error = |line: usize, message: String| Error {
            origin: Origin {
                file: file.clone(),
                line,
            },
            field: "-".into(),
            message,
        };
        match read_policy_file(file, limits.max_file_bytes) {
            Ok(text) => texts.push((file.clone(), text)),
            Err(message) => errors.push(error(0, message)),
        }
    }
    if errors.is_empty() {
        Ok(texts)
    } else {
        Err(errors)
    }
}

/// What a policy source reads, at most: a file of the policy directory
/// cannot stall the agent or fill its memory (docs/threat-model.md).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of one file.
    pub max_file_bytes: u64,
}

/// 4 MiB: the largest real policy file we know (a cluster export) is a
/// few hundred KiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 4 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        }
    }
}

/// Each policy file's last parse, and the rules typed from it, for
/// [`Store::from_texts_reusing`].
#[derive(Debug, Default)]
pub struct Parses {
    files: BTreeMap<PathBuf, Parsed>,
    rules: RuleTypes,
}

/// Typed rules by item address, and the load that last met each; a big
/// policy's every rule is looked up on each load, so the map is hashed
/// with foldhash.
type TypedRules = std::collections::HashMap<usize, (Arc<Rule>, u64), foldhash::fast::RandomState>;

/// Rules as typed from their parsed items, by the item's address (the
/// rule holds its item, [`ItemId`], so the address is not reused): a
/// reparse shares the items that did not change, and their rules are not
/// typed again. After a load, rules it did not meet are dropped.
#[derive(Default)]
struct RuleTypes {
    typed: TypedRules,
    /// This load's number.
    load: u64,
    /// Rules the last load took over.
    taken: usize,
}

impl fmt::Debug for RuleTypes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RuleTypes({} rules)", self.typed.len())
    }
}

impl Parses {
    /// How many rules the last load took over from the one before.
    pub fn rules_taken(&self) -> usize {
        self.rules.taken
    }
}

/// A policy spec's rule lists, which a load types rule by rule.
trait RuleLists {
    fn list(&mut self, name: &str) -> Option<&mut Vec<Arc<Rule>>>;
}

impl RuleLists for GlobalNetworkPolicySpec {
    fn list(&mut self, name: &str) -> Option<&mut Vec<Arc<Rule>>> {
        match name {
            "ingress" => Some(&mut self.ingress),
            "egress" => Some(&mut self.egress),
            _ => None,
        }
    }
}

impl RuleLists for NetworkPolicySpec {
    fn list(&mut self, name: &str) -> Option<&mut Vec<Arc<Rule>>> {
        match name {
            "ingress" => Some(&mut self.ingress),
            "egress" => Some(&mut self.egress),
            _ => None,
        }
    }
}

/// Reads one policy file: a regular file (not a FIFO, device or socket,
/// which could block or never end) of at most `max_bytes`.
fn read_policy_file(file: &Path, max_bytes: u64) -> Result<String, String> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    // O_NONBLOCK: opening a FIFO for reading must not wait for a writer.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(file)
        .map_err(|e| format!("cannot read file: {e}"))?;
    let meta = f.metadata().map_err(|e| format!("cannot stat file: {e}"))?;
    if !meta.file_type().is_file() {
        return Err("not a regular file (a FIFO, device or socket): refused".into());
    }
    if meta.len() > max_bytes {
        return Err(format!(
            "{} bytes, more than the limit of {max_bytes}: refused",
            meta.len()
        ));
    }
    let mut text = String::new();
    // The file may grow after the stat: read one byte past the limit at most.
    f.take(max_bytes + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read file: {e}"))?;
    if text.len() as u64 > max_bytes {
        return Err(format!("more than the limit of {max_bytes} bytes: refused"));
    }
    Ok(text)
}

/// Collects the policy files under `dir` (inside the canonical `root`).
/// Symlinks are followed only to regular files inside `root` (a
/// Kubernetes ConfigMap volume is made of such links); a policy file that
/// is a link out of the directory, to a non-file or to nothing is an error
/// in `refused` (so the last good policy stays, rather than its resources
/// silently going away).
fn collect_files(
    root: &Path,
    dir: &Path,
    out: &mut Vec<PathBuf>,
    refused: &mut Vec<Error>,
) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            // Editors' swap files and Kubernetes ConfigMap "..data" links.
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect_files(root, &path, out, refused)?;
            continue;
        }
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            continue;
        }
        if kind.is_symlink() {
            let why = match path.canonicalize() {
                Ok(target) if target.starts_with(root) && target.is_file() => None,
                Ok(target) => Some(format!(
                    "a symlink to {}, which is not a regular file inside the policy directory: refused",
                    target.display()
                )),
                Err(e) => Some(format!("a symlink that cannot be followed: {e}")),
            };
            if let Some(message) = why {
                refused.push(Error {
                    origin: Origin {
                        file: path,
                        line: 0,
                    },
                    field: "-".into(),
                    message,
                });
                continue;
            }
        }
        out.push(path);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The store (or the errors) typing every document whole gives.
    fn whole(text: &str) -> String {
        match load(text) {
            Ok(store) => format!("{store:?}"),
            Err(errors) => format!("{errors:?}"),
        }
    }

    fn reusing(text: &str, parses: &mut Parses) -> String {
        match Store::from_texts_reusing(&[("t.yaml".into(), text.to_owned())], parses) {
            Ok(store) => format!("{store:?}"),
            Err(errors) => format!("{errors:?}"),
        }
    }

    #[test]
    fn rules_typed_one_by_one_are_the_policy_typed_whole() {
        let policy = |kind: &str, spec: &str| {
            format!("apiVersion: projectcalico.org/v3\nkind: {kind}\nmetadata: {{name: p, namespace: n}}\nspec:\n{spec}")
        };
        let rules = "  ingress:\n  - action: Allow\n    protocol: TCP\n    destination: {ports: [22]}\n  - action: Deny\n    source: {nets: [10.0.0.0/8]}\n  egress:\n  - action: Allow\n";
        let texts = [
            policy("GlobalNetworkPolicy", rules),
            policy("NetworkPolicy", rules),
            policy(
                "GlobalNetworkPolicy",
                &rules.replace("action: Deny", "action: Bogus"),
            ),
            // Errors outside the rules and in them: the first one counts.
            policy(
                "GlobalNetworkPolicy",
                &format!(
                    "  order: x\n{}",
                    rules.replace("action: Deny", "action: Bogus")
                ),
            ),
            policy(
                "GlobalNetworkPolicy",
                &format!(
                    "{}  bogus: 1\n",
                    rules.replace("action: Deny", "action: Bogus")
                ),
            ),
            policy(
                "GlobalNetworkPolicy",
                "  egress:\n  - action: Nope\n  ingress:\n  - action: Bogus\n",
            ),
            policy("GlobalNetworkPolicy", "  ingress:\n  egress: 3\n"),
            policy(
                "GlobalNetworkPolicy",
                "  ingress:\n  - action: Allow\n    bogus: 1\n",
            ),
            format!(
                "{}\n---\n{}",
                policy("GlobalNetworkPolicy", rules),
                policy("GlobalNetworkPolicy", rules).replace("name: p", "name: q")
            ),
        ];
        let mut warm = Parses::default();
        for text in &texts {
            let want = whole(text);
            assert_eq!(reusing(text, &mut Parses::default()), want, "{text}");
            assert_eq!(
                reusing(text, &mut warm),
                want,
                "after the last text: {text}"
            );
        }
    }

    #[test]
    fn an_unchanged_rule_is_not_typed_again() {
        let text = |action: &str| {
            let mut y = String::from("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec:\n  ingress:\n");
            for r in 0..20 {
                y += &format!(
                    "  - action: {}\n    destination: {{ports: [{}]}}\n    protocol: TCP\n",
                    if r == 7 { action } else { "Allow" },
                    r + 1
                );
            }
            y
        };
        let mut parses = Parses::default();
        reusing(&text("Deny"), &mut parses);
        assert_eq!(parses.rules_taken(), 0);
        let flipped = reusing(&text("Allow"), &mut parses);
        assert_eq!(parses.rules_taken(), 19);
        assert_eq!(flipped, whole(&text("Allow")));
    }

    fn load(text: &str) -> Result<Store, Vec<Error>> {
        let mut store = Store::default();
        let mut errors = Vec::new();
        store.add_text(Path::new("t.yaml"), text, &mut errors);
        if errors.is_empty() {
            validate::store(&store, &mut errors);
        }
        if errors.is_empty() {
            Ok(store)
        } else {
            Err(errors)
        }
    }

    #[test]
    fn unquoted_port_range_is_a_range_not_a_sexagesimal_number() {
        let store = load(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: deny-nodeports\n\
             spec:\n  applyOnForward: true\n  preDNAT: true\n  selector: ibm.role=='worker_public'\n  ingress:\n\
             \x20 - action: Deny\n    protocol: TCP\n    destination:\n      ports:\n      - 30000:32767\n",
        )
        .expect("loads");
        let rule = &store.global_policies[0].spec.ingress[0];
        assert_eq!(
            rule.destination.ports,
            vec![Port::Range {
                first: 30000,
                last: 32767
            }]
        );
    }

    #[test]
    fn errors_name_file_line_and_field_across_documents() {
        let err = load(
            "# first\napiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata:\n  name: a\nspec:\n  node: n\n  interfaceName: eth0\n\
             ---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: b\nspec:\n  ingress:\n\
             \x20 - action: Allow\n    protocol: TCP\n    destination:\n      nets:\n      - 10.0.0.1/8\n",
        )
        .expect_err("bad CIDR");
        assert_eq!(err.len(), 1, "{err:?}");
        assert_eq!(err[0].origin.line, 20, "{}", err[0]);
        assert_eq!(err[0].field, "spec.ingress[0].destination.nets[0]");
        assert!(err[0].message.contains("host bits"), "{}", err[0]);
    }

    #[test]
    fn v1_format_is_rejected_by_name() {
        let err =
            load("apiVersion: v1\nkind: policy\nmetadata:\n  name: x\nspec: {}\n").expect_err("v1");
        assert!(
            err[0].message.contains("old Calico v1 format"),
            "{}",
            err[0]
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = load(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: x\nspec:\n  ingres: []\n",
        )
        .expect_err("typo");
        assert_eq!(err[0].origin.line, 6, "{}", err[0]);
        assert!(
            err[0].message.contains("unknown field `ingres`"),
            "{}",
            err[0]
        );
    }

    #[test]
    fn fifos_devices_large_files_and_links_out_are_refused() {
        let dir = std::env::temp_dir().join(format!("fw-model-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let fifo = dir.join("a-fifo.yaml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        std::os::unix::fs::symlink("/dev/zero", dir.join("b-zero.yaml")).expect("symlink");
        std::fs::write(dir.join("c-big.yaml"), vec![b'#'; 2048]).expect("write");
        let limits = Limits {
            max_file_bytes: 1024,
        };
        let errors = Store::load_dir_limited(&dir, &limits).expect_err("refused");
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        let has =
            |file: &str, what: &str| text.iter().any(|t| t.contains(file) && t.contains(what));
        assert!(has("a-fifo.yaml", "not a regular file"), "{text:?}");
        assert!(has("b-zero.yaml", "not a regular file inside"), "{text:?}");
        assert!(has("c-big.yaml", "more than the limit"), "{text:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
