//! Config errors that point at the file, the line, the field, and say what
//! was expected.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in one config file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    /// The file, as the user named it (relative paths stay relative).
    pub file: PathBuf,
    /// 1-based line, 0 when unknown (e.g. a file that cannot be read).
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// Dotted path of the field, e.g. `sources.balances.schedule`.
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
    /// The offending source line, shown under the message.
    pub excerpt: Option<String>,
}

impl ConfigError {
    /// An error about a whole file (unreadable, no location).
    pub fn file(file: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            field: String::new(),
            message: message.into(),
            excerpt: None,
        }
    }

    /// An error at a location of `source`; the field path is derived from
    /// the YAML around that location when `field` is empty.
    pub fn at(
        file: &Path,
        source: &str,
        line: u64,
        column: u64,
        field: &str,
        message: impl Into<String>,
    ) -> Self {
        let field = if field.is_empty() {
            yaml_path_at(source, line, column)
        } else {
            field.to_string()
        };
        let excerpt = (line > 0)
            .then(|| source.lines().nth(line as usize - 1).map(str::to_string))
            .flatten();
        ConfigError {
            file: file.to_path_buf(),
            line,
            column,
            field,
            message: message.into(),
            excerpt,
        }
    }

    /// Converts a YAML deserialization error, which knows the location but
    /// not always the field.
    pub fn from_yaml(file: &Path, source: &str, err: &serde_saphyr::Error) -> Self {
        let mut message = err.without_snippet().to_string();
        // serde-saphyr appends " at line N, column M"; we print the location
        // in front, in the `file:line:column` form editors understand.
        if let Some(i) = message.rfind(" at line ") {
            message.truncate(i);
        }
        let (line, column) = err
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        Self::at(file, source, line, column, "", message)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
            if self.column > 0 {
                write!(f, ":{}", self.column)?;
            }
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(excerpt) = &self.excerpt {
            write!(f, "\n    {:>4} | {}", self.line, excerpt)?;
            if self.column > 0 {
                write!(
                    f,
                    "\n         | {}^",
                    " ".repeat(self.column.saturating_sub(1) as usize)
                )?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a config; validation reports them all at once
/// rather than one per run.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Replaces, in every message, each substituted value (in any spelling
    /// `connector::mask` knows) by the reference it came from: `(value,
    /// reference)` pairs from `env::substitutions`. Excerpts show the file
    /// as written already.
    pub fn scrub(&mut self, substitutions: &[(String, String)]) {
        if substitutions.is_empty() {
            return;
        }
        for e in &mut self.0 {
            e.message = crate::connector::replace_values(&e.message, substitutions);
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "error: {e}")?;
        }
        if self.0.len() > 1 {
            write!(f, "\n{} errors", self.0.len())?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

/// The dotted key path of the node at `line`:`column` of a block-style YAML
/// document, e.g. `sources.balances.schedule`.
///
/// A heuristic over the text (the YAML parser reports locations, not paths):
/// the key on the line itself (the last `key:` left of the column, which also
/// covers flow maps such as `{ rate: x }`), then every less-indented `key:`
/// line above it. Good enough to name the field; the line number is exact.
pub fn yaml_path_at(source: &str, line: u64, column: u64) -> String {
    let lines: Vec<&str> = source.lines().collect();
    if line == 0 || line as usize > lines.len() {
        return String::new();
    }
    let idx = line as usize - 1;
    let text = lines[idx];
    let mut parts = Vec::new();
    let upto: String = text
        .chars()
        .take((column as usize).max(1).saturating_sub(1) + 1)
        .collect();
    // Keys on this line left of the error column, innermost last.
    let inline_keys = keys_in(&upto);
    let own_key_indent = indent_of(text);
    if inline_keys.is_empty() {
        // The error is on a line without a key (a list item, a continuation):
        // the owner is the nearest less-indented key line above.
        if let Some(k) = keys_in(text).first() {
            parts.push(k.clone());
        }
    } else {
        parts.extend(inline_keys.into_iter().rev());
    }
    let mut indent = own_key_indent;
    for prev in lines[..idx].iter().rev() {
        let t = prev.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let ind = indent_of(prev);
        if ind < indent {
            if let Some(k) = keys_in(prev).first() {
                parts.push(k.clone());
            }
            indent = ind;
            if ind == 0 {
                break;
            }
        }
    }
    parts.reverse();
    parts.join(".")
}

fn indent_of(line: &str) -> usize {
    let t = line.trim_start_matches([' ', '-']);
    line.len() - t.len()
}

/// The keys open at the end of `line`, outermost first (quotes stripped).
///
/// Flow maps nest: in `{ a: { x: 1 }, b: 2 }` the `b` is a sibling of `a`,
/// so a key is dropped when a `,` or a later key at its own depth follows,
/// and when the map holding it closes. Without that, every earlier key of a
/// flow map would read as a parent (`rate.burst` for `{ rate: …, burst: x }`).
fn keys_in(line: &str) -> Vec<String> {
    scan_keys(line).0.into_iter().map(|(k, _)| k).collect()
}

/// Keys of a line with their 1-based columns: those open at its end (see
/// [`keys_in`]) and every key written on it, in order.
type Keys = Vec<(String, u64)>;

fn scan_keys(line: &str) -> (Keys, Keys) {
    let mut all = Vec::new();
    // (flow depth, key, column)
    let mut open: Vec<(usize, String, u64)> = Vec::new();
    let chars: Vec<char> = line.chars().collect();
    let mut depth = 0usize;
    let mut start = 0;
    let mut in_quote: Option<char> = None;
    for (i, &c) in chars.iter().enumerate() {
        match in_quote {
            Some(q) if c == q => in_quote = None,
            Some(_) => {}
            None => match c {
                '"' | '\'' => in_quote = Some(c),
                '#' if i == 0 || chars[i - 1] == ' ' => break,
                '{' | '[' => {
                    depth += 1;
                    start = i + 1;
                }
                '}' | ']' => {
                    depth = depth.saturating_sub(1);
                    open.retain(|(d, _, _)| *d <= depth);
                    start = i + 1;
                }
                // A comma separates entries only inside a flow collection;
                // in a block value it is just text.
                ',' if depth > 0 => {
                    open.retain(|(d, _, _)| *d < depth);
                    start = i + 1;
                }
                ':' if i + 1 == chars.len() || chars[i + 1] == ' ' => {
                    let raw: String = chars[start..i].iter().collect();
                    let lead = raw.len() - raw.trim_start_matches([' ', '-']).len();
                    let key = raw
                        .trim()
                        .trim_start_matches("- ")
                        .trim()
                        .trim_matches(['"', '\''])
                        .to_string();
                    if !key.is_empty() {
                        open.retain(|(d, _, _)| *d < depth);
                        let column = raw[..lead].chars().count() + start + 1;
                        all.push((key.clone(), column as u64));
                        open.push((depth, key, column as u64));
                    }
                    start = i + 1;
                }
                _ => {}
            },
        }
    }
    let open = open.into_iter().map(|(_, k, c)| (k, c)).collect();
    (open, all)
}

/// Where `key:` is written inside the YAML node that starts at
/// `line`:`column` (a map, block or flow): its line and column.
///
/// For values whose type carries no location of its own (fields of a
/// tagged enum such as `request.auth`): searching the whole file for the
/// key would find the first `name:` of the file, usually another one.
pub fn key_in_node(source: &str, line: u64, column: u64, key: &str) -> Option<(u64, u64)> {
    let lines: Vec<&str> = source.lines().collect();
    let first = (line as usize).checked_sub(1)?;
    let node_indent = (column as usize).saturating_sub(1);
    for (i, text) in lines.iter().enumerate().skip(first) {
        let t = text.trim_start();
        if i > first {
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if indent_of(text) < node_indent {
                return None;
            }
        }
        let found = scan_keys(text)
            .1
            .into_iter()
            .find(|(k, c)| k == key && (i > first || *c as usize > node_indent));
        if let Some((_, c)) = found {
            return Some((i as u64 + 1, c));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "state_dir: x\nsources:\n  balances:\n    connector: bank\n    schedule: every 5 parsecs\n    for_each: { account: [a, b] }\nhosts:\n  h: { rate: 5/fortnight, burst: 2 }\n";

    #[test]
    fn paths_of_block_and_flow_keys() {
        assert_eq!(yaml_path_at(DOC, 5, 15), "sources.balances.schedule");
        assert_eq!(
            yaml_path_at(DOC, 6, 28),
            "sources.balances.for_each.account"
        );
        assert_eq!(yaml_path_at(DOC, 8, 14), "hosts.h.rate");
        assert_eq!(yaml_path_at(DOC, 1, 12), "state_dir");
    }

    #[test]
    fn earlier_keys_of_a_flow_map_are_siblings_not_parents() {
        let doc = "hosts: { 127.0.0.1: { rate: 10/s, burst: x } }\nendpoints:\n  x:\n    retry: { max_attempts: 3, backoff: exponential, first: 1s, max: bad }\n";
        let burst = doc.find("x }").unwrap() as u64 + 1;
        assert_eq!(yaml_path_at(doc, 1, burst), "hosts.127.0.0.1.burst");
        let line4 = doc.lines().nth(3).unwrap();
        let bad = line4.find("bad").unwrap() as u64 + 1;
        assert_eq!(yaml_path_at(doc, 4, bad), "endpoints.x.retry.max");
        // A closed inner map is left: `b` is a sibling of `a`, not inside it.
        let doc = "m: { a: { x: 1 }, b: oops }\n";
        let col = doc.find("oops").unwrap() as u64 + 1;
        assert_eq!(yaml_path_at(doc, 1, col), "m.b");
        // Lists in flow maps keep their key.
        let doc = "f: { account: [a, b, c], other: 1 }\n";
        let col = doc.find("c]").unwrap() as u64 + 1;
        assert_eq!(yaml_path_at(doc, 1, col), "f.account");
    }

    #[test]
    fn keys_are_found_inside_their_node_only() {
        let doc = "name: conn\nrequest:\n  auth:\n    type: api_key\n    name: X Bad\n  url: u\nflow: { type: k, name: n }\n";
        // The block map starts at `type:` (line 4, column 5).
        assert_eq!(key_in_node(doc, 4, 5, "name"), Some((5, 5)));
        assert_eq!(key_in_node(doc, 4, 5, "url"), None, "outside the node");
        let col = doc.lines().nth(6).unwrap().find('{').unwrap() as u64 + 1;
        assert_eq!(key_in_node(doc, 7, col, "name"), Some((7, 18)));
        assert_eq!(key_in_node(doc, 7, col, "flow"), None, "left of the node");
    }

    #[test]
    fn display_names_file_line_field() {
        let e = ConfigError::at(Path::new("bridge.yaml"), DOC, 5, 15, "", "bad duration");
        let s = e.to_string();
        assert!(
            s.starts_with("bridge.yaml:5:15: field `sources.balances.schedule`: bad duration"),
            "{s}"
        );
        assert!(s.contains("every 5 parsecs"));
    }
}
