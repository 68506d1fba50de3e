//! YAML text → nodes that remember their line.
//!
//! serde-saphyr parses each file once, within budgets (nesting, nodes,
//! aliases) that stop a hostile file before it costs time or stack, and
//! hands every node over with its position (`Spanned`); or, for the plain
//! YAML policy files are made of, [`events`] builds the same nodes from
//! the parser's events in a third of the time and leaves everything else
//! (every error among it) to serde-saphyr. A [`Node`] keeps
//! only the line, so an error found at any later step (typing, validation)
//! names `file:line` by following its field path through the nodes:
//! no second read of the file and no walk over its text.
//!
//! Typing deserializes from the nodes ([`Node::deserializer`]) the way
//! Calico's reader (sigs.k8s.io/yaml) types YAML: by the target field. A
//! scalar read as a number or boolean stays one where a number or boolean
//! is wanted, and is its text as written where a string is wanted (a label
//! value `1.10` is `"1.10"`, not `1.1`). Booleans are YAML 1.2's `true`
//! and `false` only, as serde_yaml had them: `node: n` is a node name.

use std::{borrow::Cow, fmt, sync::Arc};

use serde::de::{
    value::{MapDeserializer, SeqDeserializer},
    Deserialize, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Visitor,
};
use serde_saphyr::{MessageFormatter, Spanned};

mod events;

/// Calico resources nest about ten levels deep; 64 leaves room for lists
/// of lists and refuses what only an attack would write.
pub const MAX_NESTING: usize = 64;

/// One YAML node and the 1-based line it starts on.
#[derive(Clone, PartialEq)]
pub struct Node {
    /// Line of the node's first character.
    pub line: usize,
    /// Its column, 1-based, in characters (0: not from a file).
    pub column: u32,
    /// What it holds.
    pub value: Value,
    /// A number's, boolean's or null's text as written; bytes of it in the
    /// source until [`fill_texts`] reads them.
    text: Option<Box<str>>,
    span: Option<(usize, usize)>,
}

/// The content of a [`Node`].
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `~`, `null` or nothing.
    Null,
    /// `true`, `false` (and YAML 1.1's `yes`/`no`/`on`/`off`, as Calico's
    /// Go YAML reader reads them).
    Bool(bool),
    /// A negative integer.
    Int(i64),
    /// A non-negative integer.
    UInt(u64),
    /// A float.
    Float(f64),
    /// Any other scalar.
    String(String),
    /// A sequence; each item shared, so that a document with one item
    /// changed is a new spine over the same other items (see [`Parsed`]).
    Seq(Vec<Arc<Node>>),
    /// A mapping in document order; each key with its own line.
    Map(Vec<(Key, Node)>),
}

/// A mapping key and its line (a block value starts on the line below).
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    /// The key's text.
    pub name: String,
    /// Its line.
    pub line: usize,
}

/// A YAML syntax error or a budget refusal: line and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// 1-based line (1 when the parser knows none).
    pub line: usize,
    /// The parser's message, without its position.
    pub message: String,
}

/// The parser recurses once per nesting level; at [`MAX_NESTING`] an
/// unoptimised build needs about 3 MiB of stack, more than a test's or a
/// blocking task's thread has. It runs on a thread of its own with this
/// much (reserved, not touched, until used).
const PARSER_STACK: usize = 16 << 20;

/// The parser's node budget: a 4 MiB file of one-line CIDRs holds ~300,000
/// nodes; ten times that is still far below what would cost seconds.
pub(super) const MAX_NODES: usize = 4_000_000;

/// Every document of `text` (`---` separated); documents holding only
/// comments or `null` are left out.
pub fn documents(text: &str) -> Result<Vec<Node>, SyntaxError> {
    documents_within(text, MAX_NESTING)
}

/// [`documents`], refusing nesting deeper than `depth`.
pub(super) fn documents_within(text: &str, depth: usize) -> Result<Vec<Node>, SyntaxError> {
    let failed = |what: &str| SyntaxError {
        line: 1,
        message: format!("the YAML parser {what}"),
    };
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("yaml-parser".into())
            .stack_size(PARSER_STACK)
            .spawn_scoped(scope, || parse(text, depth))
            .map_err(|e| failed(&format!("could not start: {e}")))?
            .join()
            .map_err(|_| failed("failed unexpectedly"))?
    })
}

fn parse(text: &str, depth: usize) -> Result<Vec<Node>, SyntaxError> {
    match events::documents(text, depth) {
        Some(docs) => Ok(docs
            .into_iter()
            .filter(|d| d.value != Value::Null)
            .collect()),
        None => by_serde_saphyr(text, depth),
    }
}

/// serde-saphyr's reading of `text`, which decides what is accepted and
/// what every error says ([`events`] only reads faster where it agrees).
fn by_serde_saphyr(text: &str, depth: usize) -> Result<Vec<Node>, SyntaxError> {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    // Keys given twice are ambiguous: which one did the author mean?
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    options.strict_booleans = true;
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = depth;
    budget.flow_nesting_limit = MAX_NESTING;
    budget.max_nodes = MAX_NODES;
    budget.max_events = 8_000_000;
    options.budget = Some(budget);
    let docs: Vec<Node> = serde_saphyr::from_multiple_with_options(text, options).map_err(|e| {
        let line = e.location().map_or(1, |l| l.line() as usize).max(1);
        let message = match &e {
            serde_saphyr::Error::Budget { breach, .. } => match breach {
                serde_saphyr::budget::BudgetBreach::Depth { .. } => too_deep(),
                other => format!("larger than the parser's budget ({other:?}): refused"),
            },
            // The scanner's own bound on `[`/`{` nesting, met first when
            // brackets are never closed.
            serde_saphyr::Error::ExternalMessage { source, .. }
                if matches!(
                    source.as_ref(),
                    serde_saphyr::ExternalMessageSource::Parser(scan)
                        if matches!(scan.kind(), serde_saphyr::granit_parser::ErrorKind::RecursionLimitExceeded)
                ) =>
            {
                too_deep()
            }
            other => message_of(other),
        };
        SyntaxError { line, message }
    })?;
    Ok(docs
        .into_iter()
        .filter(|d| d.value != Value::Null)
        .map(|mut d| {
            fill_texts(&mut d, text);
            d
        })
        .collect())
}

/// Gives every non-string scalar its text as written in `source`.
fn fill_texts(node: &mut Node, source: &str) {
    if let Some((start, len)) = node.span.take() {
        node.text = source.get(start..start + len).map(Into::into);
    }
    match &mut node.value {
        // Fresh from the parser: every item is unshared, nothing is copied.
        Value::Seq(items) => items
            .iter_mut()
            .for_each(|n| fill_texts(Arc::make_mut(n), source)),
        Value::Map(entries) => entries.iter_mut().for_each(|(_, n)| fill_texts(n, source)),
        _ => {}
    }
}

fn too_deep() -> String {
    format!("nested deeper than {MAX_NESTING} levels: refused")
}

/// The parser's message without its location suffix (our errors carry the
/// line already), with control characters escaped.
fn message_of(e: &serde_saphyr::Error) -> String {
    let text: Cow<'_, str> =
        serde_saphyr::DefaultMessageFormatter.format_message(e.without_snippet());
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

impl Node {
    /// This node (its line and text as written) holding `value` instead.
    pub(super) fn with_value(&self, value: Value) -> Node {
        Node {
            line: self.line,
            column: self.column,
            value,
            text: self.text.clone(),
            span: self.span,
        }
    }

    /// The value under `key` of a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.name == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The text of a string scalar.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The line of the field at `path` (`spec.ingress[1].ports[0]`, as
    /// serde_path_to_error and the validator write paths), or of its
    /// deepest ancestor present: a missing field is reported where its
    /// parent is.
    pub fn line_of(&self, path: &str) -> usize {
        let mut node = self;
        let mut line = self.line;
        for segment in segments(path) {
            let next = match (segment, &node.value) {
                (Segment::Key(k), Value::Map(entries)) => entries
                    .iter()
                    .find(|(key, _)| key.name == k)
                    .map(|(key, v)| (key.line, v)),
                (Segment::Index(i), Value::Seq(items)) => items.get(i).map(|v| (v.line, &**v)),
                _ => None,
            };
            match next {
                Some((at, child)) => {
                    line = at;
                    node = child;
                }
                None => break,
            }
        }
        line
    }

    /// A JSON value as a node; every line is 0 (it came from no file).
    pub fn from_json(value: &serde_json::Value) -> Node {
        use serde_json::Value as J;
        let node = |value| Node {
            line: 0,
            column: 0,
            value,
            text: None,
            span: None,
        };
        let scalar = |value, text: String| Node {
            text: Some(text.into()),
            ..node(value)
        };
        match value {
            J::Null => scalar(Value::Null, String::new()),
            J::Bool(b) => scalar(Value::Bool(*b), b.to_string()),
            J::Number(n) => {
                let v = if let Some(u) = n.as_u64() {
                    Value::UInt(u)
                } else if let Some(i) = n.as_i64() {
                    Value::Int(i)
                } else {
                    Value::Float(n.as_f64().unwrap_or_default())
                };
                scalar(v, n.to_string())
            }
            J::String(s) => node(Value::String(s.clone())),
            J::Array(items) => node(Value::Seq(
                items.iter().map(|i| Arc::new(Node::from_json(i))).collect(),
            )),
            J::Object(map) => node(Value::Map(
                map.iter()
                    .map(|(k, v)| {
                        (
                            Key {
                                name: k.clone(),
                                line: 0,
                            },
                            Node::from_json(v),
                        )
                    })
                    .collect(),
            )),
        }
    }

    /// A serde deserializer over the node (see the module's notes on
    /// typing); with serde_path_to_error, errors name the field.
    pub fn deserializer(&self) -> NodeDeserializer<'_> {
        NodeDeserializer(self)
    }

    /// The text of a scalar as a string field reads it.
    fn scalar_text(&self) -> Option<&str> {
        match &self.value {
            Value::String(s) => Some(s),
            Value::Seq(_) | Value::Map(_) => None,
            _ => Some(self.text.as_deref().unwrap_or_default()),
        }
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{:?}", self.line, self.value)
    }
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// `a.b[2].c` → `a`, `b`, `[2]`, `c`.
fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        for index in rest.split('[').filter(|s| !s.is_empty()) {
            if let Ok(n) = index.trim_end_matches(']').parse() {
                out.push(Segment::Index(n));
            }
        }
    }
    out
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        let spanned = Spanned::<Value>::deserialize(d)?;
        // An alias's scalar was written at its anchor.
        let at = spanned.defined.span();
        let span = match spanned.value {
            Value::String(_) | Value::Seq(_) | Value::Map(_) => None,
            _ => at
                .byte_offset()
                .zip(at.byte_len())
                .map(|(o, l)| (o as usize, l as usize)),
        };
        Ok(Node {
            line: spanned.referenced.line() as usize,
            column: spanned.referenced.column() as u32,
            value: spanned.value,
            text: None,
            span,
        })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        struct Any;
        impl<'de> Visitor<'de> for Any {
            type Value = Value;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_none<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
                Ok(Value::Bool(b))
            }
            fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
                Ok(if i >= 0 {
                    Value::UInt(i as u64)
                } else {
                    Value::Int(i)
                })
            }
            fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
                Ok(Value::UInt(u))
            }
            fn visit_f64<E>(self, f: f64) -> Result<Value, E> {
                Ok(Value::Float(f))
            }
            fn visit_str<E>(self, s: &str) -> Result<Value, E> {
                Ok(Value::String(s.to_owned()))
            }
            fn visit_string<E>(self, s: String) -> Result<Value, E> {
                Ok(Value::String(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(Arc::new(item));
                }
                Ok(Value::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    let key = Key {
                        name: key.value,
                        line: key.referenced.line() as usize,
                    };
                    entries.push((key, map.next_value()?));
                }
                Ok(Value::Map(entries))
            }
        }
        d.deserialize_any(Any)
    }
}

/// See [`Node::deserializer`].
#[derive(Clone, Copy)]
pub struct NodeDeserializer<'a>(&'a Node);

type DeError = serde::de::value::Error;

impl<'de> IntoDeserializer<'de, DeError> for NodeDeserializer<'de> {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

impl<'de> Deserializer<'de> for NodeDeserializer<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.0.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Int(i) => visitor.visit_i64(*i),
            Value::UInt(u) => visitor.visit_u64(*u),
            Value::Float(f) => visitor.visit_f64(*f),
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Seq(items) => {
                let mut seq = SeqDeserializer::new(items.iter().map(|n| NodeDeserializer(n)));
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            Value::Map(entries) => {
                let mut map = MapDeserializer::new(
                    entries
                        .iter()
                        .map(|(k, v)| (k.name.as_str(), NodeDeserializer(v))),
                );
                let value = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(value)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0.scalar_text() {
            Some(text) => visitor.visit_borrowed_str(text),
            None => self.deserialize_any(visitor),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        // Calico's enumerations are plain strings (`action: Allow`).
        match &self.0.value {
            Value::String(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            _ => self.deserialize_any(visitor),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_follow_field_paths_in_block_and_flow_style() {
        let docs = documents(
            "# comment\na: 1\n---\n# only a comment\n---\nspec:\n  ingress:\n  - action: Allow\n    ports: [80, 81]\n  - nets:\n    - 10.0.0.0/8\n",
        )
        .expect("parses");
        assert_eq!(docs.len(), 2, "{docs:?}");
        let doc = &docs[1];
        assert_eq!(doc.line_of("spec"), 6);
        assert_eq!(doc.line_of("spec.ingress[0].ports[1]"), 9);
        assert_eq!(doc.line_of("spec.ingress[1].nets[0]"), 11);
        // A missing field is placed at its deepest present ancestor.
        assert_eq!(doc.line_of("spec.ingress[1].selector"), 10);
        assert_eq!(doc.line_of("spec.egress[0]"), 6);
    }

    #[test]
    fn scalars_are_typed_by_the_field_that_reads_them() {
        let docs = documents("p: [80, \"80\", 80:90, -1, 1.5, ~, true]\n").expect("parses");
        let p = docs[0].get("p").expect("p");
        let any: serde_json::Value = serde_json::Value::deserialize(p.deserializer()).expect("any");
        assert_eq!(
            any,
            serde_json::json!([80, "80", "80:90", -1, 1.5, null, true])
        );
        let text = Vec::<String>::deserialize(p.deserializer()).expect("strings");
        assert_eq!(text, ["80", "80", "80:90", "-1", "1.5", "~", "true"]);
        // As written, not as the number reads: a version label keeps its zero.
        let docs = documents("a: &v 1.10\nb: *v\nnode: n\non: yes\n").expect("parses");
        let map = std::collections::BTreeMap::<String, String>::deserialize(docs[0].deserializer())
            .expect("labels");
        assert_eq!(map["a"], "1.10");
        assert_eq!(map["b"], "1.10");
        assert_eq!(map["node"], "n");
        assert_eq!(map["on"], "yes");
        let flag = bool::deserialize(docs[0].get("on").expect("on").deserializer());
        assert!(flag.is_err(), "YAML 1.2: yes is not a boolean");
    }

    #[test]
    fn syntax_errors_duplicates_and_depth_are_refused_with_a_line() {
        let e = documents("a: 1\nb: [1, 2\n").expect_err("unclosed");
        assert!(e.line >= 2, "{e:?}");
        let e = documents("a: 1\nb: 2\na: 3\n").expect_err("duplicate");
        assert_eq!(e.line, 3, "{e:?}");
        let deep = format!("x: 1\ny: {}1{}\n", "[".repeat(70), "]".repeat(70));
        let e = documents(&deep).expect_err("deep");
        assert_eq!(e.line, 2, "{e:?}");
        assert!(e.message.contains("nested deeper than 64"), "{e:?}");
        let unclosed = format!("a: {}", "[".repeat(100_000));
        let e = documents(&unclosed).expect_err("unclosed deep");
        assert!(e.message.contains("nested deeper than 64"), "{e:?}");
        let compact = format!("x: 1\n{}y\n", "- ".repeat(70));
        assert!(documents(&compact).is_err());
        // Brackets in quotes and comments are text, not nesting.
        let quoted = format!("a: '{}' # {}\n", "[".repeat(100), "{".repeat(100));
        assert!(documents(&quoted).is_ok());
    }
}
