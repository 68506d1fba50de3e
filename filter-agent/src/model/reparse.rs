//! A policy file's next version parsed from its last one: only the block
//! sequence items whose lines changed are parsed again.
//!
//! Parsing is most of what a reload of a big file costs (2.5 MB, 10,000
//! rules with 100,000 CIDRs: ~250 ms of ~400), and a one-rule change
//! leaves all but a few lines as they were. [`Parsed::update`] finds the
//! lines that differ (the longest common prefix and suffix), the deepest
//! run of block sequence items (`- ...` at one column) whose lines hold
//! them, parses just those lines of the new text as a sequence at the same
//! column, and splices the items it finds into a copy of the document's
//! spine; every other item is shared with the last parse (a sequence's
//! items are `Arc`s).
//!
//! The result is exactly what parsing the whole new text gives (a property
//! test holds the two side by side). Where that cannot be shown from the
//! lines alone, the whole text is parsed, as it would be without a last
//! version: the change is not inside such a run, or the lines touch
//! anchors, aliases, directives, tabs in indentation or carriage returns,
//! or hold something other than whole items at the run's column.

use std::sync::Arc;

use super::yaml::{documents_within, Node, SyntaxError, Value, MAX_NESTING, MAX_NODES};

/// One file's documents and the text they were parsed from.
#[derive(Clone, Default)]
pub struct Parsed {
    text: String,
    /// Where each line of `text` starts (lines as `split_inclusive('\n')`
    /// has them): kept, so the next update splits only what changed.
    starts: Vec<usize>,
    docs: Vec<Arc<Node>>,
    /// Nodes and keys in `docs`, held against the parser's node budget.
    nodes: usize,
}

/// How [`Parsed::update`] came by the new documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reparse {
    /// The text did not change.
    Unchanged,
    /// Only the changed items were parsed.
    Spliced,
    /// The whole text was parsed.
    Whole,
}

impl std::fmt::Debug for Parsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Parsed({} bytes, {} documents)",
            self.text.len(),
            self.docs.len()
        )
    }
}

impl Parsed {
    /// Parses the whole of `text`.
    pub fn new(text: &str) -> Result<Parsed, SyntaxError> {
        let docs: Vec<Arc<Node>> = documents_within(text, MAX_NESTING)?
            .into_iter()
            .map(Arc::new)
            .collect();
        Ok(Parsed {
            text: text.to_owned(),
            starts: line_starts(text, 0),
            nodes: docs.iter().map(|d| count(d)).sum(),
            docs,
        })
    }

    /// The documents (those holding only comments or `null` left out).
    pub fn docs(&self) -> &[Arc<Node>] {
        &self.docs
    }

    /// `text`'s documents, parsing again only what changed since this
    /// parse.
    pub fn update(&self, text: &str) -> Result<(Parsed, Reparse), SyntaxError> {
        if text == self.text {
            return Ok((self.clone(), Reparse::Unchanged));
        }
        if let Some(p) = self.splice(text) {
            return Ok((p, Reparse::Spliced));
        }
        Ok((Parsed::new(text)?, Reparse::Whole))
    }

    /// The documents of `text` from this parse and the changed items
    /// parsed alone; `None` where that is not shown to be exact.
    fn splice(&self, text: &str) -> Option<Parsed> {
        // A lone `\r` breaks lines for YAML but not for `lines`; a
        // directive (`%TAG`) gives tags meaning the items would not see.
        if self.text.contains('\r') || text.contains('\r') || directives(text) {
            return None;
        }
        let old = lines(&self.text, &self.starts);
        let (prefix, suffix, starts) = self.lines_changed(text);
        let new = lines(text, &starts);
        // The old text's changed lines, 1-based: [first, last], empty
        // (last = first - 1) where lines were only inserted.
        let changed = (prefix + 1, old.len() - suffix);
        let delta = new.len() as isize - old.len() as isize;

        let (k, run) = self.docs.iter().enumerate().find_map(|(k, doc)| {
            // A document ends where the next marker line starts.
            let end = (doc.line + 1..=old.len())
                .find(|&l| is_marker(old[l - 1]))
                .unwrap_or(old.len() + 1);
            let inside = doc.line <= changed.0 && changed.1 < end;
            inside
                .then(|| find_run(doc, end, changed, &old, 1))
                .flatten()
                .map(|run| (k, run))
        })?;

        // The run's lines in the new text: the same first line, the end
        // moved by the lines added or removed.
        let new_end = usize::try_from(run.end as isize + delta).ok()?;
        let old_lines = &old[run.start - 1..run.end];
        let new_lines = &new[run.start - 1..new_end];
        if !plain(old_lines) || !plain(new_lines) || !whole_items(new_lines, run.column) {
            return None;
        }
        let next = new.get(new_end).copied();
        // An empty node ends where the next token starts: with the run's
        // items gone, the item before them ends at the next line's token.
        if new_lines.is_empty() && run.first > 0 && next.map(indent) != Some(run.column) {
            return None;
        }
        // The replaced items are counted on a thread of their own while
        // the new ones are parsed (and counted as their lines are moved).
        let (parsed, replaced) = crate::on_two_threads(
            || parse_items(new_lines, next, &run),
            || run_nodes(&self.docs[k], &run),
        );
        let (items, added) = parsed?;

        // A sequence left with no item is no sequence (`key:` is null).
        if items.is_empty() && run_is_whole(&self.docs[k], &run) {
            return None;
        }
        let nodes = self.nodes + added - replaced;
        // Past half the budget the whole text is parsed, and the parser's
        // own count decides.
        if nodes > MAX_NODES / 2 {
            return None;
        }
        let docs = self
            .docs
            .iter()
            .enumerate()
            .map(|(i, doc)| match i.cmp(&k) {
                std::cmp::Ordering::Less => doc.clone(),
                std::cmp::Ordering::Equal => {
                    Arc::new(rebuild(doc, &run.path, &run, items.clone(), delta))
                }
                std::cmp::Ordering::Greater => shifted_arc(doc, delta),
            })
            .collect::<Vec<_>>();
        debug_assert_eq!(nodes, docs.iter().map(|d| count(d)).sum::<usize>());
        Some(Parsed {
            text: text.to_owned(),
            starts,
            docs,
            nodes,
        })
    }

    /// How many lines at the start and at the end `text` has as this
    /// text has them (the suffix no longer than what the prefix leaves of
    /// either text), and where `text`'s lines start: found by comparing
    /// bytes, and splitting only the lines between them.
    fn lines_changed(&self, text: &str) -> (usize, usize, Vec<usize>) {
        let (old, new) = (self.text.as_bytes(), text.as_bytes());
        let starts = &self.starts;
        let lines = starts.len();
        let n = old.len().min(new.len());
        // A line at the start is the same where it ends within the common
        // bytes: one per newline among them.
        let same = common_prefix(old, new, n);
        let prefix = starts[1.min(lines)..].partition_point(|&s| s <= same)
            + usize::from(same == old.len() && old.ends_with(b"\n"));
        // Where the prefix's lines end, in both texts.
        let first = starts.get(prefix).copied().unwrap_or(old.len());
        // A line at the end is the same where it lies within the common
        // bytes and starts a line in both texts.
        let tail = common_suffix(old, new, n);
        let shift = |at: usize| at + new.len() - old.len();
        let from = old.len() - tail;
        let mut suffix = lines - starts.partition_point(|&s| s < from);
        let starts_new_line = |at: usize| at == 0 || new[at - 1] == b'\n';
        if suffix > 0 && !starts_new_line(shift(starts[lines - suffix])) {
            suffix -= 1;
        }
        // No line both in the prefix and in the suffix, of either text.
        while suffix > 0 && (lines - suffix < prefix || shift(starts[lines - suffix]) < first) {
            suffix -= 1;
        }
        // The new text's lines: the prefix's as they were, those between
        // split, the suffix's moved by the change in length.
        let last = match suffix {
            0 => new.len(),
            _ => shift(starts[lines - suffix]),
        };
        let mut new_starts = Vec::with_capacity(lines + 16);
        new_starts.extend_from_slice(&starts[..prefix]);
        new_starts.extend(line_starts(&text[first..last], first));
        new_starts.extend(starts[lines - suffix..].iter().map(|&s| shift(s)));
        (prefix, suffix, new_starts)
    }
}

/// Where the lines of `text` start, offset by `base`.
fn line_starts(text: &str, base: usize) -> Vec<usize> {
    if text.is_empty() {
        return Vec::new();
    }
    let after_newlines = text
        .match_indices('\n')
        .map(|(i, _)| i + 1)
        .filter(|&i| i < text.len());
    std::iter::once(0)
        .chain(after_newlines)
        .map(|i| base + i)
        .collect()
}

/// The lines of `text` that start at `starts`.
fn lines<'a>(text: &'a str, starts: &[usize]) -> Vec<&'a str> {
    let ends = starts.iter().skip(1).copied().chain([text.len()]);
    starts.iter().zip(ends).map(|(&a, b)| &text[a..b]).collect()
}

/// Chunk of [`common_prefix`] and [`common_suffix`]: compared as memcmp
/// compares, then byte by byte within the last.
const CHUNK: usize = 64;

/// How many of the first `n` bytes of `a` and `b` are the same.
fn common_prefix(a: &[u8], b: &[u8], n: usize) -> usize {
    let mut i = 0;
    while i + CHUNK <= n && a[i..i + CHUNK] == b[i..i + CHUNK] {
        i += CHUNK;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// How many of the last `n` bytes of `a` and `b` are the same.
fn common_suffix(a: &[u8], b: &[u8], n: usize) -> usize {
    let (a, b) = (&a[a.len() - n..], &b[b.len() - n..]);
    let mut i = 0;
    while i + CHUNK <= n && a[n - i - CHUNK..n - i] == b[n - i - CHUNK..n - i] {
        i += CHUNK;
    }
    while i < n && a[n - i - 1] == b[n - i - 1] {
        i += 1;
    }
    i
}

/// The items `lines` (a run's new lines) hold, as the whole text parses
/// them, numbered from the run's start. `next` is the line after them:
/// its first token ends the last item, and an empty node (`key:` with no
/// value) takes its position from that token, so the lines are parsed
/// with a stand-in token at the same line and column.
///
/// A run of many lines (a full reload's is the whole policy) is parsed in
/// two halves on two threads, split at an item's dash near the middle:
/// the first half then ends before an item, as a run does.
fn parse_items(lines: &[&str], next: Option<&str>, run: &Run) -> Option<(Vec<Arc<Node>>, usize)> {
    let split = (lines.len() >= PARALLEL_LINES)
        .then(|| {
            (lines.len() / 2..lines.len()).find(|&k| dash_column(lines[k]) == Some(run.column))
        })
        .flatten();
    let Some(k) = split else {
        return parse_items_alone(lines, next, run);
    };
    let (first, second) = lines.split_at(k);
    let second_run = Run {
        path: Vec::new(),
        start: run.start + k,
        ..*run
    };
    // Each parse runs on a thread of its own with the stack it needs
    // (`documents_within`).
    let (first, second) = crate::on_two_threads(
        || parse_items_alone(first, Some(second[0]), run),
        || parse_items_alone(second, next, &second_run),
    );
    let (mut items, nodes) = first?;
    let (more, more_nodes) = second?;
    items.extend(more);
    Some((items, nodes + more_nodes))
}

/// Lines of a run from which [`parse_items`] parses it in two halves; few
/// in unit tests, so that the property tests split their runs too.
const PARALLEL_LINES: usize = if cfg!(test) { 4 } else { 20_000 };

/// [`parse_items`] on this thread: the items, and their nodes and keys.
fn parse_items_alone(
    lines: &[&str],
    next: Option<&str>,
    run: &Run,
) -> Option<(Vec<Arc<Node>>, usize)> {
    let column = run.column;
    let (head, tail) = match next.map(indent) {
        None => (String::new(), String::new()),
        // Another item.
        Some(at) if at == column => (String::new(), format!("{}- x\n", " ".repeat(at))),
        // A key (or marker) to the left: the sequence becomes the value of
        // a key at that column, followed by another.
        Some(at) if at < column => {
            let pad = " ".repeat(at);
            (format!("{pad}k:\n"), format!("{pad}z: x\n"))
        }
        Some(_) => return None,
    };
    let wrapped = !head.is_empty();
    let snippet = head + &lines.concat() + &tail;
    let snippet_lines: Vec<&str> = snippet.split_inclusive('\n').collect();
    // The items' own nesting counts from the sequence's depth.
    let depth = MAX_NESTING + 1 + usize::from(wrapped) - run.depth;
    // Taken, not borrowed: the items then have one owner each, and
    // renumbering their lines below changes them in place instead of
    // copying every one.
    let mut docs = documents_within(&snippet, depth).ok()?;
    let seq = match (docs.len(), wrapped) {
        (0, false) if next.is_none() => return Some((Vec::new(), 0)),
        (1, false) => docs.pop()?,
        (1, true) => match docs.pop()?.value {
            Value::Map(mut entries) if entries.len() == 2 && entries[1].0.name == "z" => {
                entries.swap_remove(0).1
            }
            _ => return None,
        },
        _ => return None,
    };
    let mut items = match seq.value {
        Value::Seq(items) => items,
        Value::Null if wrapped => Vec::new(),
        _ => return None,
    };
    if next.is_some() && !wrapped {
        // The stand-in item, on the last line.
        let stand_in = items.pop()?;
        if stand_in.line != snippet_lines.len() || stand_in.value != Value::String("x".into()) {
            return None;
        }
    }
    let offset = run.start as isize - 1 - isize::from(wrapped);
    let mut nodes = 0;
    for item in &mut items {
        if dash_before(&snippet_lines, item) != Some(column) {
            return None;
        }
        nodes += shift(Arc::make_mut(item), offset);
    }
    Some((items, nodes))
}

/// Spaces before a line's first character.
fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// A run of items of one block sequence: where it is and what it spans.
#[derive(Debug)]
struct Run {
    /// From the document's root to the sequence: an entry's index in a
    /// mapping, an item's in a sequence.
    path: Vec<usize>,
    /// The run's first and last item.
    first: usize,
    last: usize,
    /// Its lines, 1-based, inclusive: from the first item's dash to the
    /// line before the next item's (or before whatever follows the
    /// sequence).
    start: usize,
    end: usize,
    /// The column of the items' dashes.
    column: usize,
    /// Collections from the document's root to the sequence, both counted.
    depth: usize,
}

/// The deepest run of block sequence items in `node` (lines up to `hi`)
/// holding the lines `changed`.
fn find_run(
    node: &Node,
    hi: usize,
    changed: (usize, usize),
    lines: &[&str],
    depth: usize,
) -> Option<Run> {
    let (first, last) = changed;
    match &node.value {
        Value::Map(entries) => {
            // Each entry's lines: from its key to the next key.
            let end = |e: usize| entries.get(e + 1).map_or(hi, |(k, _)| k.line);
            let e = (0..entries.len()).find(|&e| entries[e].0.line <= first && last < end(e))?;
            let mut run = find_run(&entries[e].1, end(e), changed, lines, depth + 1)?;
            run.path.insert(0, e);
            Some(run)
        }
        Value::Seq(items) if !items.is_empty() => {
            // Block items only, each right after its dash on a line of its
            // own: a flow sequence's items are not after a dash.
            let column = dash_before(lines, &items[0])?;
            if items.windows(2).any(|w| w[0].line >= w[1].line) {
                return None;
            }
            for item in items.iter() {
                if dash_before(lines, item) != Some(column) {
                    return None;
                }
            }
            let start = |i: usize| items[i].line;
            let end = |i: usize| items.get(i + 1).map_or(hi, |n| n.line) - 1;
            let a = (0..items.len()).rev().find(|&i| start(i) <= first)?;
            let b = (0..items.len()).find(|&i| end(i) >= last)?;
            // Lines inserted between two items: the run is the one before.
            let a = a.min(b);
            if a == b {
                if let Some(mut run) = find_run(&items[a], end(a) + 1, changed, lines, depth + 1) {
                    run.path.insert(0, a);
                    return Some(run);
                }
            }
            Some(Run {
                path: Vec::new(),
                first: a,
                last: b,
                start: start(a),
                end: end(b),
                column,
                depth,
            })
        }
        _ => None,
    }
}

/// `node` with the run's items replaced by `items`, everything after them
/// moved by `delta` lines.
fn rebuild(node: &Node, path: &[usize], run: &Run, items: Vec<Arc<Node>>, delta: isize) -> Node {
    let value = match (&node.value, path) {
        (Value::Seq(old), []) => {
            let items: Vec<Arc<Node>> = old[..run.first]
                .iter()
                .cloned()
                .chain(items)
                .chain(old[run.last + 1..].iter().map(|n| shifted_arc(n, delta)))
                .collect();
            // A block sequence starts where its first item's dash is.
            let mut seq = node.with_value(Value::Seq(items));
            if let (0, Some(first)) = (run.first, seq_first_line(&seq)) {
                seq.line = first;
            }
            return seq;
        }
        (Value::Seq(old), [at, rest @ ..]) => Value::Seq(
            old.iter()
                .enumerate()
                .map(|(i, n)| match i.cmp(at) {
                    std::cmp::Ordering::Less => n.clone(),
                    std::cmp::Ordering::Equal => {
                        Arc::new(rebuild(n, rest, run, items.clone(), delta))
                    }
                    std::cmp::Ordering::Greater => shifted_arc(n, delta),
                })
                .collect(),
        ),
        (Value::Map(old), [at, rest @ ..]) => Value::Map(
            old.iter()
                .enumerate()
                .map(|(i, (key, n))| match i.cmp(at) {
                    std::cmp::Ordering::Less => (key.clone(), n.clone()),
                    std::cmp::Ordering::Equal => {
                        (key.clone(), rebuild(n, rest, run, items.clone(), delta))
                    }
                    std::cmp::Ordering::Greater => {
                        let mut key = key.clone();
                        key.line = moved(key.line, delta);
                        (key, shifted(n, delta))
                    }
                })
                .collect(),
        ),
        // `find_run` walked this path.
        _ => node.value.clone(),
    };
    node.with_value(value)
}

fn seq_first_line(seq: &Node) -> Option<usize> {
    match &seq.value {
        Value::Seq(items) => items.first().map(|n| n.line),
        _ => None,
    }
}

/// The run's items, in the document `doc`.
fn run_items<'a>(doc: &'a Node, run: &Run) -> &'a [Arc<Node>] {
    let mut node = doc;
    for &at in &run.path {
        node = match &node.value {
            Value::Map(entries) => &entries[at].1,
            Value::Seq(items) => &items[at],
            _ => return &[],
        };
    }
    match &node.value {
        Value::Seq(items) => items,
        _ => &[],
    }
}

/// The nodes of the run's items, in the document `doc`.
fn run_nodes(doc: &Node, run: &Run) -> usize {
    run_items(doc, run)[run.first..=run.last]
        .iter()
        .map(|n| count(n))
        .sum()
}

/// Whether the run is its sequence's every item.
fn run_is_whole(doc: &Node, run: &Run) -> bool {
    run.first == 0 && run.last + 1 == run_items(doc, run).len()
}

/// Nodes and keys under (and with) `node`.
fn count(node: &Node) -> usize {
    1 + match &node.value {
        Value::Seq(items) => items.iter().map(|n| count(n)).sum(),
        Value::Map(entries) => entries.iter().map(|(_, n)| 1 + count(n)).sum(),
        _ => 0,
    }
}

fn moved(line: usize, delta: isize) -> usize {
    (line as isize + delta) as usize
}

/// Moves every line under `node` by `delta`, in place; returns the nodes
/// and keys it moved (as [`count`] counts them), which a splice then need
/// not walk again to count.
fn shift(node: &mut Node, delta: isize) -> usize {
    node.line = moved(node.line, delta);
    1 + match &mut node.value {
        Value::Seq(items) => items
            .iter_mut()
            .map(|n| shift(Arc::make_mut(n), delta))
            .sum(),
        Value::Map(entries) => entries
            .iter_mut()
            .map(|(key, n)| {
                key.line = moved(key.line, delta);
                1 + shift(n, delta)
            })
            .sum(),
        _ => 0,
    }
}

/// A copy of `node` with every line moved by `delta`.
fn shifted(node: &Node, delta: isize) -> Node {
    let mut copy = node.clone();
    if delta != 0 {
        shift(&mut copy, delta);
    }
    copy
}

/// `node` shared where no line moves, a moved copy where they do.
fn shifted_arc(node: &Arc<Node>, delta: isize) -> Arc<Node> {
    if delta == 0 {
        node.clone()
    } else {
        Arc::new(shifted(node, delta))
    }
}

/// A document marker line (`---` or `...` alone or before a space).
fn is_marker(line: &str) -> bool {
    (line.starts_with("---") || line.starts_with("..."))
        && line[3..].chars().next().is_none_or(char::is_whitespace)
}

/// Whether `text` may hold a directive (`%YAML`, `%TAG`).
fn directives(text: &str) -> bool {
    text.starts_with('%') || text.contains("\n%")
}

/// The column of a line's block sequence dash (`- ` or `-` ending the
/// line), indented with spaces only.
fn dash_column(line: &str) -> Option<usize> {
    let column = indent(line);
    let rest = &line[column..];
    let after = rest.strip_prefix('-')?;
    after
        .chars()
        .next()
        .is_none_or(|c| c == ' ' || c == '\n')
        .then_some(column)
}

/// The column of the dash `node` stands after on its line (`-`, spaces,
/// then the node), if it does.
fn dash_before(lines: &[&str], node: &Node) -> Option<usize> {
    let line = lines.get(node.line.checked_sub(1)?)?;
    let at = line
        .char_indices()
        .nth((node.column as usize).checked_sub(1)?)?
        .0;
    let before = &line[..at];
    let dash = before.trim_end_matches(' ');
    if dash.len() == before.len() {
        return None;
    }
    let indent = dash.strip_suffix('-')?;
    indent.bytes().all(|b| b == b' ').then_some(indent.len())
}

/// Lines that mean the same alone as in their document: no anchors or
/// aliases (which reach across items) and no tabs in indentation.
fn plain(lines: &[&str]) -> bool {
    lines
        .iter()
        .all(|l| !l.contains(['&', '*']) && !l.trim_start_matches(' ').starts_with('\t'))
}

/// Whether `lines` are whole block sequence items at `column`: the first
/// line is a dash at `column` (where the item before them ended), and no
/// line with content is indented less, or as much without a dash. Comment
/// lines may be anywhere.
fn whole_items(lines: &[&str], column: usize) -> bool {
    if lines
        .first()
        .is_some_and(|l| dash_column(l) != Some(column))
    {
        return false;
    }
    lines.iter().all(|line| {
        let body = line.trim_start_matches(' ');
        let at = indent(line);
        body.trim().is_empty()
            || body.starts_with('#')
            || at > column
            || (at == column && dash_column(line) == Some(column))
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A policy of `rules` rules, each with a block list of nets.
    fn policy(rules: usize, action_of_last: &str) -> String {
        let mut y = String::from(
            "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata: {name: h}\n---\n\
             apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: p\nspec:\n  ingress:\n",
        );
        for r in 0..rules {
            let action = if r + 1 == rules {
                action_of_last
            } else {
                "Deny"
            };
            y += &format!(
                "  - action: {action}\n    source:\n      nets:\n      - 10.0.{r}.1/32\n      - 10.0.{r}.2/32\n    destination: {{ports: [{r}]}}\n"
            );
        }
        y + "  egress:\n  - action: Allow\n---\nkind: Tail\nlast: [1, 2]\n"
    }

    /// `update` from `old` to `new`: how, and that it is the whole parse.
    fn reparse(old: &str, new: &str) -> Reparse {
        let last = Parsed::new(old).expect("the old text parses");
        let (got, how) = last.update(new).expect("the new text parses");
        let whole = Parsed::new(new).expect("parses");
        assert_eq!(got.docs, whole.docs, "{how:?}: {old:?} → {new:?}");
        assert_eq!(got.nodes, whole.nodes);
        how
    }

    #[test]
    fn a_changed_rule_is_parsed_alone_and_spliced_in() {
        let old = policy(50, "Deny");
        assert_eq!(reparse(&old, &policy(50, "Allow")), Reparse::Spliced);
        assert_eq!(reparse(&old, &old), Reparse::Unchanged);
        // A rule added, removed, or one net inserted: lines after it move.
        assert_eq!(reparse(&old, &policy(51, "Deny")), Reparse::Spliced);
        assert_eq!(reparse(&old, &policy(49, "Deny")), Reparse::Spliced);
        let more = old.replace(
            "      - 10.0.7.2/32\n",
            "      - 10.0.7.2/32\n      - 10.0.7.3/32\n",
        );
        assert_eq!(reparse(&old, &more), Reparse::Spliced);
        let first = old.replace(
            "  - action: Deny\n    source:\n      nets:\n      - 10.0.0.1/32\n",
            "  - action: Allow\n  - action: Deny\n    source:\n      nets:\n      - 10.0.0.1/32\n",
        );
        assert_eq!(reparse(&old, &first), Reparse::Spliced);
        // Outside any item: the whole text.
        let renamed = old.replace("  name: p\n", "  name: q\n");
        assert_eq!(reparse(&old, &renamed), Reparse::Whole);
        // Anchors and aliases reach across items.
        let anchored = old.replace("      - 10.0.3.1/32\n", "      - &a 10.0.3.1/32\n");
        assert_eq!(reparse(&old, &anchored), Reparse::Whole);
        // Items that no longer stand alone at their column.
        let dedented = old.replace(
            "    destination: {ports: [9]}\n",
            "  destination: {ports: [9]}\n",
        );
        assert!(Parsed::new(&dedented).is_err() || reparse(&old, &dedented) == Reparse::Whole);
    }

    #[test]
    fn a_bad_change_is_the_whole_parse_s_error() {
        let old = policy(5, "Deny");
        let last = Parsed::new(&old).expect("parses");
        for bad in [
            old.replace("- 10.0.2.1/32", "- [10.0.2.1/32"),
            old.replace("action: Allow\n", "action: Allow\n    action: Deny\n"),
            old.replace("ports: [3]", "ports: [3]}"),
        ] {
            let whole = Parsed::new(&bad).expect_err("does not parse");
            let got = last.update(&bad).expect_err("does not parse");
            assert_eq!(got, whole);
        }
    }

    #[test]
    fn nesting_counts_from_the_document_s_root() {
        // Items at depth 3 (root map, spec map, sequence): the deepest
        // nesting the parser allows, then one more level.
        let doc = |levels: usize| {
            let inner = format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
            format!("a: 1\nspec:\n  items:\n  - {inner}\n  - 2\n")
        };
        let old = doc(1);
        for levels in [MAX_NESTING - 4, MAX_NESTING - 3, MAX_NESTING - 2] {
            let new = doc(levels);
            let whole = Parsed::new(&new);
            let last = Parsed::new(&old).expect("parses");
            match (last.update(&new), whole) {
                (Ok((got, how)), Ok(whole)) => {
                    assert_eq!(how, Reparse::Spliced);
                    assert_eq!(got.docs, whole.docs);
                }
                (Err(got), Err(whole)) => assert_eq!(got, whole),
                (got, whole) => panic!("{levels} levels: {got:?} against {whole:?}"),
            }
        }
        assert!(Parsed::new(&doc(MAX_NESTING - 3)).is_ok());
        assert!(Parsed::new(&doc(MAX_NESTING - 2)).is_err());
    }

    /// Items a document's sequences are made of: block and flow
    /// collections, block scalars (kept and clipped), quoted scalars over
    /// lines, nested and unusual item forms, comments.
    const ITEMS: &[&str] = &[
        "  - action: Allow\n",
        "  - action: Deny\n    protocol: TCP\n",
        "  - action: Deny\n    source:\n      nets:\n      - 10.0.0.1/32\n      - 10.0.0.2/32\n",
        "  - action: Log\n    destination: {ports: [80, 443]}\n",
        "  - action: Pass\n    text: |\n      block line\n\n      more\n",
        "  - action: Allow\n    keep: |+\n      kept\n\n",
        "  - \"quoted\n    continued\"\n",
        "  - - nested\n    - again\n",
        "  -\n    action: Allow\n",
        "  # a comment\n",
        "\n",
        "  - x\n",
        "  - {a: 1, b: [2, 3]}\n",
        "  - ports: [\n      -1, 2]\n",
        "  - é: ü\n    ports: [1]\n",
        "  - key:\n",
        "  - action: Allow\n    empty:\n",
        "  - |\n",
        "  - text: >-\n",
        "  - ''\n",
    ];

    /// Single lines an edit also inserts: what may break a document or
    /// what the splice must refuse (anchors, tabs, directives, markers).
    const LINES: &[&str] = &[
        "  - action: Allow\n",
        "    protocol: UDP\n",
        "      - 10.0.0.3/32\n",
        "  egress:\n",
        "spec:\n",
        "---\n",
        "...\n",
        "  - &a anchored\n",
        "  - *a\n",
        "\t- tabbed\n",
        "%TAG ! tag:x,2000:\n",
        "- top\n",
        "  key: value\n",
        "      x: 1\n",
        "# margin comment\n",
        "\n",
        "   - odd column\n",
        "    ]\n",
        "    empty:\n",
        "  -\n",
    ];

    /// A document: a head, items under `ingress`, perhaps more under
    /// `egress`, perhaps a second document.
    fn text(items: &[usize], egress: usize, second: bool) -> Vec<String> {
        let mut lines: Vec<String> = ["kind: GlobalNetworkPolicy\n", "spec:\n", "  ingress:\n"]
            .map(String::from)
            .into();
        let item = |i: &usize| {
            ITEMS[i % ITEMS.len()]
                .split_inclusive('\n')
                .map(String::from)
        };
        let split = items.len().saturating_sub(egress);
        lines.extend(items[..split].iter().flat_map(item));
        if egress > 0 {
            lines.push("  egress:\n".into());
            lines.extend(items[split..].iter().flat_map(item));
        }
        if second {
            lines.push("---\n".into());
            lines.push("kind: Tail\n".into());
            lines.push("list:\n".into());
            lines.push("  - one\n".into());
        }
        lines
    }

    /// An edit: at a place (a fraction of the lines), remove some lines
    /// and insert a whole item or single lines.
    type Edit = (f64, usize, Option<usize>, Vec<usize>);

    fn edits() -> impl Strategy<Value = Vec<Edit>> {
        proptest::collection::vec(
            (
                0.0..1.0f64,
                0usize..5,
                proptest::option::of(0usize..ITEMS.len()),
                proptest::collection::vec(0usize..LINES.len(), 0..3),
            ),
            1..3,
        )
    }

    proptest! {
        /// The lines kept at either end, and the new text's line starts,
        /// are those comparing lines gives.
        #[test]
        fn lines_changed_compares_as_lines_do(old in "[ab\n]{0,12}", new in "[ab\n]{0,12}") {
            // (`update` takes an unchanged text as it was.)
            prop_assume!(old != new);
            let last = Parsed {
                starts: line_starts(&old, 0),
                text: old.clone(),
                ..Parsed::default()
            };
            let a: Vec<&str> = old.split_inclusive('\n').collect();
            let b: Vec<&str> = new.split_inclusive('\n').collect();
            let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
            let suffix = a
                .iter()
                .rev()
                .zip(b.iter().rev())
                .take(a.len().min(b.len()) - prefix)
                .take_while(|(x, y)| x == y)
                .count();
            let (p, s, starts) = last.lines_changed(&new);
            prop_assert_eq!((p, s), (prefix, suffix));
            prop_assert_eq!(lines(&new, &starts), b);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// The splice's result is the whole parse's, success or error.
        #[test]
        fn an_update_is_the_whole_parse_of_the_new_text(
            items in proptest::collection::vec(0usize..ITEMS.len(), 1..30),
            egress in 0usize..4,
            second: bool,
            edits in edits(),
        ) {
            let mut lines = text(&items, egress, second);
            let old = lines.concat();
            let Ok(last) = Parsed::new(&old) else { return Ok(()); };
            for (at, remove, item, singles) in edits {
                let at = ((lines.len() as f64) * at) as usize;
                let end = (at + remove).min(lines.len());
                let insert: Vec<String> = match item {
                    Some(i) => ITEMS[i].split_inclusive('\n').map(String::from).collect(),
                    None => singles.iter().map(|&l| LINES[l].to_owned()).collect(),
                };
                lines.splice(at..end, insert);
            }
            let new = lines.concat();
            match (last.update(&new), Parsed::new(&new)) {
                (Ok((got, _)), Ok(whole)) => {
                    prop_assert_eq!(&got.docs, &whole.docs, "{:?} → {:?}", old, new);
                    prop_assert_eq!(got.nodes, whole.nodes);
                    prop_assert_eq!(&got.starts, &whole.starts, "{:?} → {:?}", old, new);
                }
                (Err(got), Err(whole)) => prop_assert_eq!(got, whole),
                (got, whole) => prop_assert!(false, "{:?} → {:?}: {:?} against {:?}", old, new, got.map(|g| g.0.docs), whole.map(|w| w.docs)),
            }
        }
    }
}
