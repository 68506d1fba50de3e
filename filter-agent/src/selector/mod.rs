//! Calico selectors: text → [`Selector`] → true/false over a label map.
//!
//! Implements the grammar and lexical rules of docs/semantics.md 5:
//! `==`, `!=`, `in {}`, `not in {}`, `has()`, `all()`, `global()`,
//! `contains`, `starts with`, `ends with`, `&&`, `||`, `!`, parentheses and
//! both quote styles. Only space and TAB are blanks; word operators are
//! recognised only right after a label, so a label may be called `in`.
//! Errors carry the byte position where parsing stopped.

use std::collections::{BTreeMap, BTreeSet};

/// A parsed selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(Expr);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    All,
    Global,
    Has(String),
    Eq(String, String),
    Ne(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Contains(String, String),
    StartsWith(String, String),
    EndsWith(String, String),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

/// A selector that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at position {position}")]
pub struct ParseError {
    /// Byte offset into the selector text.
    pub position: usize,
    /// What was expected or found.
    pub message: String,
}

impl Selector {
    /// Parses `text`; empty or blank text means `all()`.
    pub fn parse(text: &str) -> Result<Selector, ParseError> {
        let mut p = Parser {
            s: text.as_bytes(),
            pos: 0,
        };
        p.blanks()?;
        if p.pos == p.s.len() {
            return Ok(Selector(Expr::All));
        }
        let e = p.or_expr()?;
        p.blanks()?;
        if p.pos != p.s.len() {
            return Err(p.err("unexpected trailing text"));
        }
        Ok(Selector(e))
    }

    /// Evaluates against `labels` (5.3).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        eval(&self.0, labels)
    }

    /// Whether this is `all()` (written so, or blank).
    pub fn is_all(&self) -> bool {
        self.0 == Expr::All
    }

    /// Whether this is `global()` alone.
    pub fn is_global(&self) -> bool {
        self.0 == Expr::Global
    }
}

/// A selector field as a resource writes it: the text, and the selector
/// parsed once while loading. Some fields tell a blank text (no scope)
/// from `all()` (any namespace), so the text stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    text: String,
    parsed: Selector,
}

impl Written {
    /// Parses `text`.
    pub fn new(text: &str) -> Result<Written, ParseError> {
        Ok(Written {
            parsed: Selector::parse(text)?,
            text: text.to_owned(),
        })
    }

    /// The text as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether the text is empty or blanks only.
    pub fn is_blank(&self) -> bool {
        self.text.trim().is_empty()
    }

    /// The parsed selector.
    pub fn selector(&self) -> &Selector {
        &self.parsed
    }

    /// Evaluates against `labels`.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.parsed.matches(labels)
    }
}

impl<'de> serde::Deserialize<'de> for Written {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Written, D::Error> {
        let text = String::deserialize(d)?;
        Written::new(&text)
            .map_err(|e| serde::de::Error::custom(format!("invalid selector {text:?}: {e}")))
    }
}

fn eval(e: &Expr, l: &BTreeMap<String, String>) -> bool {
    match e {
        Expr::All | Expr::Global => true,
        Expr::Has(k) => l.contains_key(k),
        Expr::Eq(k, v) => l.get(k) == Some(v),
        // `!=` and `not in` are true when the label is absent.
        Expr::Ne(k, v) => l.get(k) != Some(v),
        Expr::In(k, set) => l.get(k).is_some_and(|v| set.contains(v)),
        Expr::NotIn(k, set) => !l.get(k).is_some_and(|v| set.contains(v)),
        Expr::Contains(k, s) => l.get(k).is_some_and(|v| v.contains(s.as_str())),
        Expr::StartsWith(k, s) => l.get(k).is_some_and(|v| v.starts_with(s.as_str())),
        Expr::EndsWith(k, s) => l.get(k).is_some_and(|v| v.ends_with(s.as_str())),
        Expr::Not(e) => !eval(e, l),
        Expr::And(a, b) => eval(a, l) && eval(b, l),
        Expr::Or(a, b) => eval(a, l) || eval(b, l),
    }
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

fn is_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-')
}

impl Parser<'_> {
    fn err(&self, message: &str) -> ParseError {
        ParseError {
            position: self.pos,
            message: message.to_owned(),
        }
    }

    /// Skips spaces and TABs; any other control character is an error.
    fn blanks(&mut self) -> Result<(), ParseError> {
        while let Some(&b) = self.s.get(self.pos) {
            match b {
                b' ' | b'\t' => self.pos += 1,
                b'\n' | b'\r' => return Err(self.err("line breaks are not allowed in a selector")),
                _ => break,
            }
        }
        Ok(())
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn eat(&mut self, token: &str) -> Result<bool, ParseError> {
        self.blanks()?;
        if self.s[self.pos..].starts_with(token.as_bytes()) {
            self.pos += token.len();
            Ok(true)
        } else {
            Ok(false)
        }
    }

    fn or_expr(&mut self) -> Result<Expr, ParseError> {
        let mut e = self.and_expr()?;
        while self.eat("||")? {
            e = Expr::Or(Box::new(e), Box::new(self.and_expr()?));
        }
        Ok(e)
    }

    fn and_expr(&mut self) -> Result<Expr, ParseError> {
        let mut e = self.unary()?;
        while self.eat("&&")? {
            e = Expr::And(Box::new(e), Box::new(self.unary()?));
        }
        Ok(e)
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        let mut negations = 0;
        loop {
            self.blanks()?;
            // `!` but not the start of `!=` (which needs a label before it).
            if self.peek() == Some(b'!') && self.s.get(self.pos + 1) != Some(&b'=') {
                self.pos += 1;
                negations += 1;
            } else {
                break;
            }
        }
        let e = self.primary()?;
        Ok(if negations % 2 == 1 {
            Expr::Not(Box::new(e))
        } else {
            e
        })
    }

    fn function(&mut self, name: &str) -> Result<bool, ParseError> {
        self.blanks()?;
        let rest = &self.s[self.pos..];
        if rest.starts_with(name.as_bytes()) && rest.get(name.len()) == Some(&b'(') {
            self.pos += name.len() + 1;
            return Ok(true);
        }
        Ok(false)
    }

    fn primary(&mut self) -> Result<Expr, ParseError> {
        self.blanks()?;
        if self.eat("(")? {
            let e = self.or_expr()?;
            if !self.eat(")")? {
                return Err(self.err("expected ')'"));
            }
            return Ok(e);
        }
        if self.function("has")? {
            self.blanks()?;
            let label = self.label()?;
            if !self.eat(")")? {
                return Err(self.err("expected ')' after has(label"));
            }
            return Ok(Expr::Has(label));
        }
        for (name, expr) in [("all", Expr::All), ("global", Expr::Global)] {
            if self.function(name)? {
                if !self.eat(")")? {
                    return Err(self.err(&format!("expected ')' after {name}(")));
                }
                return Ok(expr);
            }
        }
        let label = self.label()?;
        self.blanks()?;
        if self.eat("==")? {
            return Ok(Expr::Eq(label, self.literal()?));
        }
        if self.eat("!=")? {
            return Ok(Expr::Ne(label, self.literal()?));
        }
        if self.word(&["contains"])? {
            return Ok(Expr::Contains(label, self.literal()?));
        }
        if self.word(&["starts with", "startswith"])? {
            return Ok(Expr::StartsWith(label, self.literal()?));
        }
        if self.word(&["ends with", "endswith"])? {
            return Ok(Expr::EndsWith(label, self.literal()?));
        }
        if self.word(&["not in", "notin"])? {
            return Ok(Expr::NotIn(label, self.set()?));
        }
        if self.word(&["in"])? {
            return Ok(Expr::In(label, self.set()?));
        }
        Err(self.err("expected an operator (==, !=, in, not in, contains, starts with, ends with) after the label"))
    }

    /// A word operator; internal blanks optional; a word boundary after it.
    fn word(&mut self, forms: &[&str]) -> Result<bool, ParseError> {
        self.blanks()?;
        for form in forms {
            let mut i = self.pos;
            let mut ok = true;
            for part in form.split(' ') {
                while matches!(self.s.get(i), Some(b' ' | b'\t')) {
                    i += 1;
                }
                if self.s[i..].starts_with(part.as_bytes()) {
                    i += part.len();
                } else {
                    ok = false;
                    break;
                }
            }
            if ok && !self.s.get(i).copied().is_some_and(is_label_byte) {
                self.pos = i;
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn label(&mut self) -> Result<String, ParseError> {
        self.blanks()?;
        let start = self.pos;
        while self.peek().is_some_and(is_label_byte) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.err("expected a label"));
        }
        if self.pos - start > 512 {
            return Err(ParseError {
                position: start,
                message: "label longer than 512 characters".into(),
            });
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.pos]).into_owned())
    }

    fn literal(&mut self) -> Result<String, ParseError> {
        self.blanks()?;
        let quote = match self.peek() {
            Some(q @ (b'"' | b'\'')) => q,
            _ => return Err(self.err("expected a quoted string")),
        };
        let start = self.pos + 1;
        let Some(len) = self.s[start..].iter().position(|&b| b == quote) else {
            return Err(self.err("unterminated string"));
        };
        self.pos = start + len + 1;
        // The input is a &str and quotes are ASCII, so this slice is UTF-8.
        Ok(String::from_utf8_lossy(&self.s[start..start + len]).into_owned())
    }

    fn set(&mut self) -> Result<BTreeSet<String>, ParseError> {
        if !self.eat("{")? {
            return Err(self.err("expected '{'"));
        }
        let mut set = BTreeSet::new();
        if self.eat("}")? {
            return Ok(set);
        }
        loop {
            set.insert(self.literal()?);
            if self.eat("}")? {
                return Ok(set);
            }
            if !self.eat(",")? {
                return Err(self.err("expected ',' or '}'"));
            }
            // A trailing comma is allowed.
            if self.eat("}")? {
                return Ok(set);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn eval(sel: &str, pairs: &[(&str, &str)]) -> bool {
        Selector::parse(sel)
            .unwrap_or_else(|e| panic!("{sel}: {e}"))
            .matches(&labels(pairs))
    }

    #[test]
    fn the_tutorial_selector_matches_worker_public() {
        assert!(eval(
            "ibm.role=='worker_public'",
            &[("ibm.role", "worker_public")]
        ));
        assert!(!eval(
            "ibm.role=='worker_public'",
            &[("ibm.role", "worker_private")]
        ));
        assert!(!eval("ibm.role=='worker_public'", &[]));
    }

    #[test]
    fn negative_operators_match_absent_labels() {
        assert!(eval("a != 'x'", &[]));
        assert!(eval("a not in {'x'}", &[]));
        assert!(!eval("a in {}", &[("a", "")]));
        assert!(eval("a notin {}", &[]));
    }

    #[test]
    fn precedence_and_negation() {
        // `!a == "x" && b == "y"` is `(!(a=="x")) && (b=="y")`.
        assert!(eval("!a == \"x\" && b == \"y\"", &[("b", "y")]));
        assert!(eval("!!has(a)", &[("a", "")]));
        assert!(eval("has(a) || b == 'c' && has(z)", &[("a", "1")]));
    }

    #[test]
    fn word_operators_and_odd_labels() {
        assert!(eval("contains contains 'x'", &[("contains", "axb")]));
        assert!(eval("k starts with 'ab'", &[("k", "abc")]));
        assert!(eval("k startswith 'ab'", &[("k", "abc")]));
        assert!(eval("k ends  with 'bc'", &[("k", "abc")]));
        assert!(eval(
            "calico/k8s_ns in {'a', 'b',}",
            &[("calico/k8s_ns", "b")]
        ));
        assert!(eval("has( a )", &[("a", "")]));
        assert!(eval("all( )", &[]));
        assert!(eval("", &[]));
        assert!(eval("k == 'say \"hi\"'", &[("k", "say \"hi\"")]));
    }

    #[test]
    fn syntax_errors_have_positions() {
        for bad in [
            "a = 'b'",
            "a == b",
            "has (a)",
            "ALL()",
            "a == 'b' c == 'd'",
            "a in {'x' 'y'}",
            "(a == 'b'",
            "a & b",
            "a == 'b'\n",
            "!a",
        ] {
            let e = Selector::parse(bad).expect_err(bad);
            assert!(e.position <= bad.len(), "{bad}: {e}");
        }
        assert_eq!(Selector::parse("a == b").unwrap_err().position, 5);
    }

    #[test]
    fn only_space_and_tab_are_blanks() {
        assert!(eval("\ta == 'b'\t&&\thas(c)", &[("a", "b"), ("c", "")]));
        assert!(Selector::parse("a == 'b'\r").is_err());
        // A folded YAML selector is one line; a literal (|) one has a newline.
        assert!(Selector::parse("a == 'b' &&\nhas(c)").is_err());
    }

    #[test]
    fn labels_may_start_with_digits_dots_slashes_and_dashes() {
        assert!(eval("1abc == 'x'", &[("1abc", "x")]));
        assert!(eval(
            "projectcalico.org/name == 'default'",
            &[("projectcalico.org/name", "default")]
        ));
        assert!(eval("-x == 'y'", &[("-x", "y")]));
        assert!(
            eval("in in {'a'}", &[("in", "a")]),
            "a label may be called in"
        );
        assert!(eval("has(has)", &[("has", "")]));
        let long = "a".repeat(513);
        assert!(
            Selector::parse(&format!("{long} == 'x'")).is_err(),
            "labels are at most 512 characters"
        );
        assert!(Selector::parse(&format!("{} == 'x'", "a".repeat(512))).is_ok());
    }

    #[test]
    fn literals_have_no_escapes_and_take_either_quote() {
        assert!(eval(r#"k == "it's""#, &[("k", "it's")]));
        assert!(
            eval(r"k == 'a\'", &[("k", r"a\")]),
            "backslash is a plain character"
        );
        assert!(eval("k == 'żółw'", &[("k", "żółw")]));
        assert!(eval("k == ''", &[("k", "")]), "empty value is a value");
        assert!(!eval("k == ''", &[]));
    }

    #[test]
    fn empty_substring_matches_any_present_value() {
        assert!(eval("k contains ''", &[("k", "v")]));
        assert!(!eval("k starts with ''", &[]));
    }

    #[test]
    fn word_operators_need_a_word_boundary() {
        // `k inx {…}`: "inx" is not the operator "in".
        assert!(Selector::parse("k inx {'a'}").is_err());
        assert!(Selector::parse("k containsx 'a'").is_err());
        assert!(eval("k not  in {'a'}", &[("k", "b")]));
    }

    #[test]
    fn set_literals() {
        assert!(eval("k in {'a','a'}", &[("k", "a")]), "duplicates collapse");
        assert!(
            Selector::parse("k in ('a')").is_err(),
            "parentheses are not braces"
        );
        assert!(Selector::parse("k in {a}").is_err(), "members are quoted");
        assert!(Selector::parse("k in {'a',,}").is_err());
    }

    #[test]
    fn functions_are_lower_case_without_a_blank_before_the_parenthesis() {
        assert!(Selector::parse("global()").is_ok());
        assert!(Selector::parse("Has(a)").is_err());
        assert!(Selector::parse("all ()").is_err());
        assert!(Selector::parse("has(a) == 'b'").is_err());
        assert!(Selector::parse("()").is_err());
        assert!(Selector::parse("\"b\" == a").is_err());
    }
}
