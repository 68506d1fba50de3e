//! The parser's events straight into [`Node`]s, for the YAML that policy
//! files are made of: block and flow mappings and sequences of plain,
//! quoted and block scalars.
//!
//! serde-saphyr stays the authority. This reader answers only where it
//! agrees with it (the differential tests below hold that) and otherwise
//! gives up (`None`): on any error, tag, anchor, alias, merge key,
//! directive, key that is not a plain word or quoted, or a budget it
//! might come near. Then serde-saphyr reads the whole text again and
//! decides what is accepted and what each error says. Why have two: on a
//! 10,000-rule policy with 100,000 CIDRs, serde's way to positions
//! (`Spanned`: a visitor and a location map per key and scalar) costs
//! two thirds of the parse; the events themselves the rest.

use std::{borrow::Cow, collections::HashSet, sync::Arc};

use serde_saphyr::granit_parser::{Event, Options, Parser, ScalarStyle, Span};

use super::{Key, Node, Value, MAX_NESTING, MAX_NODES};

/// Budgets kept well inside serde-saphyr's (see `parse`), so that whatever
/// it would refuse, this reader has given up on first.
const MARGIN: usize = 16;
const MAX_EVENTS: usize = 8_000_000 - MARGIN;
const MAX_DOCUMENTS: usize = 1_000;
const MAX_SCALAR_BYTES: usize = 48 << 20;

/// Every document of `text` as [`super::documents_within`] reads it
/// (null documents kept: the caller drops them), or `None`: let
/// serde-saphyr read it.
pub(super) fn documents(text: &str, depth: usize) -> Option<Vec<Node>> {
    let mut options = Options::default();
    options.flow_nesting_limit = MAX_NESTING;
    options.block_nesting_limit = options.block_nesting_limit.max(depth + 1);
    options.emit_comments = false;
    let mut reader = Reader {
        source: text,
        depth: depth.saturating_sub(2),
        stack: Vec::new(),
        root: None,
        docs: Vec::new(),
        nodes: 0,
        scalar_bytes: 0,
    };
    for (events, item) in Parser::new_from_str_with_options(text, options).enumerate() {
        let (event, span) = item.ok()?;
        if events >= MAX_EVENTS {
            return None;
        }
        if !reader.event(event, span)? {
            return Some(reader.docs);
        }
    }
    None
}

/// A collection being read: its position and what it holds so far.
struct Open {
    line: usize,
    column: u32,
    items: Items,
}

enum Items {
    Seq(Vec<Arc<Node>>),
    Map {
        entries: Vec<(Key, Node)>,
        /// A key read, its value not yet.
        key: Option<Key>,
        /// The names, once there are too many to compare one by one.
        names: Option<HashSet<String>>,
    },
}

/// Beyond this many keys, duplicates are found through a set.
const LINEAR_KEYS: usize = 16;

struct Reader<'a> {
    source: &'a str,
    depth: usize,
    stack: Vec<Open>,
    root: Option<Node>,
    docs: Vec<Node>,
    nodes: usize,
    scalar_bytes: usize,
}

impl Reader<'_> {
    /// Takes one event; `Some(false)` at the stream's end, `None`: give up.
    fn event(&mut self, event: Event<'_>, span: Span) -> Option<bool> {
        let map = matches!(event, Event::MappingStart(..));
        match event {
            Event::StreamStart => {}
            Event::StreamEnd => return Some(false),
            Event::DocumentStart(_, version) => {
                if version.is_some() || self.docs.len() >= MAX_DOCUMENTS {
                    return None;
                }
            }
            Event::DocumentEnd => {
                let root = self.root.take()?;
                if !self.stack.is_empty() {
                    return None;
                }
                self.docs.push(root);
            }
            Event::Scalar(value, style, anchor, tag) => {
                if anchor != 0 || tag.is_some() {
                    return None;
                }
                self.count()?;
                self.scalar_bytes += value.len();
                if self.scalar_bytes > MAX_SCALAR_BYTES {
                    return None;
                }
                if let Some(Open {
                    items:
                        Items::Map {
                            key: key @ None, ..
                        },
                    ..
                }) = self.stack.last_mut()
                {
                    *key = Some(Key {
                        name: key_name(value, style)?,
                        line: span.start.line(),
                    });
                    return self.check_duplicate().then_some(true);
                }
                let node = scalar(value, style, &span, self.source)?;
                self.place(node)?;
            }
            Event::SequenceStart(_, anchor, tag) | Event::MappingStart(_, anchor, tag) => {
                if anchor != 0 || tag.is_some() || self.stack.len() >= self.depth {
                    return None;
                }
                if let Some(Open {
                    items: Items::Map { key: None, .. },
                    ..
                }) = self.stack.last()
                {
                    return None; // a collection as a key
                }
                self.count()?;
                self.stack.push(Open {
                    line: span.start.line(),
                    column: span.start.col() as u32 + 1,
                    items: if map {
                        Items::Map {
                            entries: Vec::new(),
                            key: None,
                            names: None,
                        }
                    } else {
                        Items::Seq(Vec::new())
                    },
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let open = self.stack.pop()?;
                let value = match open.items {
                    Items::Seq(items) => Value::Seq(items),
                    Items::Map {
                        entries, key: None, ..
                    } => Value::Map(entries),
                    Items::Map { key: Some(_), .. } => return None,
                };
                self.place(Node {
                    line: open.line,
                    column: open.column,
                    value,
                    text: None,
                    span: None,
                })?;
            }
            // Aliases, anchors' names, comments: serde-saphyr's to read.
            _ => return None,
        }
        Some(true)
    }

    fn count(&mut self) -> Option<()> {
        self.nodes += 1;
        (self.nodes < MAX_NODES - MARGIN).then_some(())
    }

    /// Puts a finished node where it belongs: an item, a key's value or
    /// the document.
    fn place(&mut self, node: Node) -> Option<()> {
        match self.stack.last_mut() {
            None if self.root.is_none() => self.root = Some(node),
            None => return None,
            Some(Open {
                items: Items::Seq(items),
                ..
            }) => items.push(Arc::new(node)),
            Some(Open {
                items: Items::Map { entries, key, .. },
                ..
            }) => entries.push((key.take()?, node)),
        }
        Some(())
    }

    /// Whether the key just read is new in its mapping.
    fn check_duplicate(&mut self) -> bool {
        let Some(Open {
            items:
                Items::Map {
                    entries,
                    key: Some(key),
                    names,
                },
            ..
        }) = self.stack.last_mut()
        else {
            return false;
        };
        if entries.len() < LINEAR_KEYS {
            return entries.iter().all(|(k, _)| k.name != key.name);
        }
        let names =
            names.get_or_insert_with(|| entries.iter().map(|(k, _)| k.name.clone()).collect());
        names.insert(key.name.clone())
    }
}

/// A key's text, where serde-saphyr would read the same: quoted, block,
/// or a plain word that no schema reads as anything but a string.
fn key_name(value: Cow<'_, str>, style: ScalarStyle) -> Option<String> {
    if style == ScalarStyle::Plain
        && (value == "<<" || !matches!(plain(&value), Plain::Text | Plain::Word))
    {
        return None;
    }
    Some(value.into_owned())
}

/// How a plain scalar reads.
enum Plain {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    /// Starts like a word: a string.
    Word,
    /// Holds a character no number has: a string.
    Text,
    /// Might be a number in one of YAML's other spellings (`0x1F`, `1e3`,
    /// `.inf`, `+5`, `1.10`): serde-saphyr types it.
    Numeric,
}

fn plain(text: &str) -> Plain {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Plain::Null,
        "true" | "True" | "TRUE" => return Plain::Bool(true),
        "false" | "False" | "FALSE" => return Plain::Bool(false),
        _ => {}
    }
    // Every number serde-saphyr reads is spelt in these; anything else
    // (a CIDR's `/`, a port range's `:`, a space) is text.
    let numeral = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.' | b'_');
    let bytes = text.as_bytes();
    if !bytes.iter().all(numeral) {
        return Plain::Text;
    }
    // Numbers start with a digit, a sign or a dot (`.5`, `.inf`);
    // `inf` and `nan` without the dot are strings in YAML 1.2.
    if !matches!(bytes[0], b'0'..=b'9' | b'+' | b'-' | b'.') {
        return Plain::Word;
    }
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let decimal = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    match (decimal, negative) {
        (true, false) => digits.parse().map_or(Plain::Numeric, Plain::UInt),
        // As serde-saphyr's `visit_i64`: `-0` is 0.
        (true, true) => text.parse::<i64>().map_or(Plain::Numeric, |i| {
            if i >= 0 {
                Plain::UInt(i as u64)
            } else {
                Plain::Int(i)
            }
        }),
        _ => Plain::Numeric,
    }
}

/// A scalar as a node, typed as [`super::Value`]'s visitor types it.
fn scalar(value: Cow<'_, str>, style: ScalarStyle, span: &Span, source: &str) -> Option<Node> {
    let node = |value, text| Node {
        line: span.start.line(),
        column: span.start.col() as u32 + 1,
        value,
        text,
        span: None,
    };
    if style != ScalarStyle::Plain {
        return Some(node(Value::String(value.into_owned()), None));
    }
    let value = match plain(&value) {
        Plain::Text | Plain::Word => return Some(node(Value::String(value.into_owned()), None)),
        Plain::Null => Value::Null,
        Plain::Bool(b) => Value::Bool(b),
        Plain::Int(i) => Value::Int(i),
        Plain::UInt(u) => Value::UInt(u),
        Plain::Numeric => typed_by_serde_saphyr(&value)?,
    };
    // A non-string keeps its text as written (see `Node::scalar_text`).
    let written = source.get(span.start.byte_offset()?..span.end.byte_offset()?)?;
    let text = match value {
        Value::String(_) => None,
        _ => Some(written.into()),
    };
    Some(node(value, text))
}

/// A numeral in one of YAML's rarer spellings, typed by serde-saphyr
/// itself: read alone, a plain word of [`plain`]'s characters is the same
/// scalar it was in its document.
fn typed_by_serde_saphyr(text: &str) -> Option<Value> {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    match serde_saphyr::from_str_with_options::<Value>(text, options).ok()? {
        Value::Seq(_) | Value::Map(_) => None,
        value => Some(value),
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use proptest::prelude::*;

    use super::super::{by_serde_saphyr, MAX_NESTING};
    use super::*;

    /// Whether this reader answered for `text`; where it did, its answer
    /// is serde-saphyr's, node for node (lines, columns, values, texts).
    fn agrees(text: &str) -> bool {
        let Some(fast) = documents(text, MAX_NESTING) else {
            return false;
        };
        let fast: Vec<Node> = fast
            .into_iter()
            .filter(|d| d.value != Value::Null)
            .collect();
        assert_eq!(Ok(fast), by_serde_saphyr(text, MAX_NESTING), "{text}");
        true
    }

    #[test]
    fn scalars_keys_and_layouts_read_as_serde_saphyr_reads_them() {
        let answered = [
            "a: 1\nb: -2\nc: -0\nd: 1.10\ne: 0x1F\nf: 1e3\nh: +5\ni: 007\n\
             j: 10.0.0.1\nk: 10.0.0.0/8\nl: 80:90\nm: ~\nn: null\no:\np: true\nq: False\n\
             r: yes\ns: 'x'\nt: \"y\\tz\"\nu: |\n  block\nv: >\n  folded\n  text\n\
             w: [1, a, 'b', {c: d, e: }]\nx: {}\ny: []\nz: inf\naa: 1_000\nab: 0o17\n\
             ac: 0b101\nad: -.5\nae: 1.\naf: .\nag: -a\nah: 18446744073709551615\n\
             ai: 18446744073709551616\naj: -9223372036854775808\nak: -9223372036854775809\n\
             al: +\nan: -.nan\nao: 0X1F\nap: fd00::1\naq: 2001:db8::/32\n\
             ar: a plain\n  scalar over lines\nas: é ü\n'é': 1\n",
            "- a: 1\n  b: [x, 'y']\n- c\n-\n  - d\n  - {e: f}\n- ''\n-\n",
            "# c\n---\n# only a comment\n---\nkind: K\n...\n---\n~\n---\n- 1\n",
            "'80': x\n\"a b\": y\n? z\n: 1\nyes: n\n",
            "hello\n",
            "a: 1\r\nb:\r\n  - 10.0.0.0/8\r\n",
            "labels: {a: '1', b: \"2\", c: 3, d: e}\nports: [80, \"443\", 8000:8080]\n",
        ];
        for text in answered {
            assert!(agrees(text), "not answered: {text}");
        }
        let key = (0..40).map(|i| format!("k{i}: {i}\n")).collect::<String>();
        assert!(agrees(&key));
        // Left to serde-saphyr, which accepts or refuses each as it will.
        let handed_over = [
            "a: &x 1\nb: *x\n",
            // serde-saphyr's policy on non-finite floats decides these.
            "g: .inf\n",
            "am: .NaN\n",
            "a: !!str 1\n",
            "base: &b {x: 1}\nc:\n  <<: *b\n",
            "a: 1\nb: 2\na: 3\n",
            &format!("{key}k3: 0\n"),
            "80: x\n",
            "~: x\n",
            "true: x\n",
            "[a]: x\n",
            "%YAML 1.2\n---\na: 1\n",
            "a: [1, 2\n",
            "a:\n  - b\n c: d\n",
            &format!("x: 1\ny: {}1{}\n", "[".repeat(70), "]".repeat(70)),
            &format!("x: 1\n{}y\n", "- ".repeat(70)),
        ];
        for text in handed_over {
            assert!(!agrees(text), "answered: {text}");
        }
    }

    /// Every YAML file this repository ships, and the policy corpus where
    /// it is (`FILTER_CORPUS`, or `shared/corpus` beside the clone).
    #[test]
    fn every_shipped_and_corpus_file_reads_as_serde_saphyr_reads_it() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let corpus = std::env::var_os("FILTER_CORPUS")
            .map_or_else(|| root.join("../shared/corpus"), PathBuf::from);
        let mut files = Vec::new();
        for dir in [root.join("examples"), root.join("deploy"), corpus] {
            yaml_files(&dir, &mut files);
        }
        assert!(files.len() >= 10, "{files:?}");
        let mut answered = 0;
        for file in &files {
            let Ok(text) = std::fs::read_to_string(file) else {
                continue;
            };
            answered += usize::from(agrees(&text));
        }
        // Anchors or tags may send a few to serde-saphyr; not most.
        assert!(
            answered * 10 >= files.len() * 9,
            "{answered} of {}",
            files.len()
        );
    }

    fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for path in entries.flatten().map(|e| e.path()) {
            if path.is_dir() {
                yaml_files(&path, out);
            } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(path);
            }
        }
    }

    const SCALARS: &[&str] = &[
        "1",
        "-1",
        "0",
        "01",
        "1.5",
        "1.10",
        "0x10",
        "1e3",
        ".inf",
        "-.5",
        "+2",
        "~",
        "null",
        "",
        "true",
        "False",
        "yes",
        "no",
        "10.0.0.1",
        "10.0.0.0/8",
        "80:90",
        "fd00::1",
        "a b",
        "Allow",
        "'q'",
        "\"d\"",
        "'it''s'",
        "-x",
        "1_0",
        "inf",
        "nan",
        "é",
    ];
    const KEYS: &[&str] = &[
        "a", "b", "kind", "spec", "80", "'q'", "\"k\"", "true", "~", "<<", "a b", "yes",
    ];

    #[derive(Debug, Clone)]
    enum Tree {
        Scalar(usize),
        Seq(Vec<Tree>),
        Map(Vec<(usize, Tree)>),
        Flow(Box<Tree>),
    }

    fn tree() -> impl Strategy<Value = Tree> {
        let leaf = (0..SCALARS.len()).prop_map(Tree::Scalar);
        leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Tree::Seq),
                proptest::collection::vec((0..KEYS.len(), inner.clone()), 0..4).prop_map(Tree::Map),
                inner.prop_map(|t| Tree::Flow(Box::new(t))),
            ]
        })
    }

    /// Block layout, one level per two spaces; `Flow` writes its subtree
    /// in brackets on one line.
    fn block(tree: &Tree, indent: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        match tree {
            Tree::Seq(items) if !items.is_empty() => {
                for item in items {
                    out.push_str(&format!("{pad}-"));
                    value(item, indent + 2, out);
                }
            }
            Tree::Map(entries) if !entries.is_empty() => {
                for (k, v) in entries {
                    out.push_str(&format!("{pad}{}:", KEYS[*k]));
                    value(v, indent + 2, out);
                }
            }
            other => {
                out.push_str(&pad);
                flow(other, out);
                out.push('\n');
            }
        }
    }

    fn value(tree: &Tree, indent: usize, out: &mut String) {
        match tree {
            Tree::Seq(v) if !v.is_empty() => {
                out.push('\n');
                block(tree, indent, out);
            }
            Tree::Map(v) if !v.is_empty() => {
                out.push('\n');
                block(tree, indent, out);
            }
            other => {
                out.push(' ');
                flow(other, out);
                out.push('\n');
            }
        }
    }

    fn flow(tree: &Tree, out: &mut String) {
        match tree {
            Tree::Scalar(s) => out.push_str(SCALARS[*s]),
            Tree::Flow(t) => flow(t, out),
            Tree::Seq(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    out.push_str(if i == 0 { "" } else { ", " });
                    flow(item, out);
                }
                out.push(']');
            }
            Tree::Map(entries) => {
                out.push('{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    out.push_str(if i == 0 { "" } else { ", " });
                    out.push_str(KEYS[*k]);
                    out.push_str(": ");
                    flow(v, out);
                }
                out.push('}');
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Wherever this reader answers, serde-saphyr agrees; and for
        /// documents of words and CIDRs under plain keys it does answer.
        #[test]
        fn generated_documents_read_as_serde_saphyr_reads_them(
            docs in proptest::collection::vec(tree(), 1..3),
        ) {
            let mut text = String::new();
            for doc in &docs {
                text.push_str("---\n");
                block(doc, 0, &mut text);
            }
            agrees(&text);
        }
    }
}
