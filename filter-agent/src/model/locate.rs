//! Field path → line, for errors found after deserializing.
//!
//! serde_yaml_ng (like serde_yaml before it) keeps no positions once a
//! value is built, so checks that span fields (validation) find their line
//! again by walking the block-style YAML
//! text along the path (`spec.ingress[1].destination.ports[0]`). Flow style
//! (`{...}`, `[...]`) stops the walk at the deepest line found, which is
//! still the right neighbourhood.

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            if let Ok(n) = idx.trim_end_matches(']').parse() {
                out.push(Segment::Index(n));
            }
        }
    }
    out
}

/// A line's content column, after spaces and any `- ` sequence markers.
fn content(line: &str) -> (usize, &str) {
    let mut col = 0;
    let mut rest = line;
    loop {
        let trimmed = rest.trim_start_matches(' ');
        col += rest.len() - trimmed.len();
        if let Some(after) = trimmed.strip_prefix("- ") {
            col += 2;
            rest = after;
        } else if trimmed == "-" {
            return (col + 1, "");
        } else {
            return (col, trimmed);
        }
    }
}

fn is_blank(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

/// The 1-based line of `path` in `text`, or of its deepest ancestor found.
pub fn line_of(text: &str, path: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = 1;
    let mut pos = 0;
    // Content of the current node is indented deeper than this.
    let mut parent_col: isize = -1;
    for seg in segments(path) {
        match seg {
            Segment::Key(key) => {
                let mut hit = None;
                for (i, line) in lines.iter().enumerate().skip(pos) {
                    if is_blank(line) {
                        continue;
                    }
                    let (col, text) = content(line);
                    if (col as isize) <= parent_col && i > pos {
                        break;
                    }
                    if (col as isize) > parent_col
                        && text
                            .strip_prefix(key)
                            .is_some_and(|r| r.trim_start().starts_with(':'))
                    {
                        hit = Some((i, col));
                        break;
                    }
                }
                let Some((i, col)) = hit else { return found };
                found = i + 1;
                pos = i + 1;
                parent_col = col as isize;
            }
            Segment::Index(n) => {
                let mut seen = 0;
                let mut hit = None;
                let mut dash_col = None;
                for (i, line) in lines.iter().enumerate().skip(pos) {
                    if is_blank(line) {
                        continue;
                    }
                    let indent = line.len() - line.trim_start_matches(' ').len();
                    let trimmed = line.trim_start_matches(' ');
                    if (indent as isize) < parent_col.max(0) && dash_col.is_some() {
                        break;
                    }
                    if trimmed.starts_with("- ") || trimmed == "-" {
                        if dash_col.is_none() {
                            dash_col = Some(indent);
                        }
                        if Some(indent) == dash_col {
                            if seen == n {
                                hit = Some((i, indent));
                                break;
                            }
                            seen += 1;
                        }
                    } else if dash_col.is_some_and(|d| indent <= d) {
                        break;
                    }
                }
                let Some((i, indent)) = hit else { return found };
                found = i + 1;
                // The item's first key may sit on the dash line itself.
                pos = i;
                parent_col = indent as isize;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::line_of;

    const DOC: &str = "\
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
spec:
  ingress:
  - action: Allow
    protocol: TCP
  - action: Deny
    destination:
      ports:
      - 80
      - 9000:8000
  egress: []
";

    #[test]
    fn finds_nested_fields_and_items() {
        assert_eq!(line_of(DOC, "spec"), 3);
        assert_eq!(line_of(DOC, "spec.ingress[0].protocol"), 6);
        assert_eq!(line_of(DOC, "spec.ingress[1]"), 7);
        assert_eq!(line_of(DOC, "spec.ingress[1].action"), 7);
        assert_eq!(line_of(DOC, "spec.ingress[1].destination.ports[1]"), 11);
        assert_eq!(line_of(DOC, "spec.egress"), 12);
    }

    #[test]
    fn missing_fields_fall_back_to_the_deepest_ancestor() {
        assert_eq!(line_of(DOC, "spec.ingress[1].source.nets"), 7);
        assert_eq!(line_of(DOC, "spec.nothing"), 3);
    }
}
