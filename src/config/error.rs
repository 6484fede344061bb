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

/// The `key:` tokens of a line, left to right (quotes stripped).
fn keys_in(line: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let bytes: Vec<char> = line.chars().collect();
    let mut start = 0;
    let mut in_quote: Option<char> = None;
    for (i, &c) in bytes.iter().enumerate() {
        match in_quote {
            Some(q) if c == q => in_quote = None,
            Some(_) => {}
            None => match c {
                '"' | '\'' => in_quote = Some(c),
                '#' if i == 0 || bytes[i - 1] == ' ' => break,
                '{' | ',' | '[' => start = i + 1,
                ':' if i + 1 == bytes.len() || bytes[i + 1] == ' ' => {
                    let key: String = bytes[start..i].iter().collect();
                    let key = key
                        .trim()
                        .trim_start_matches("- ")
                        .trim()
                        .trim_matches(['"', '\''])
                        .to_string();
                    if !key.is_empty() {
                        keys.push(key);
                    }
                    start = i + 1;
                }
                _ => {}
            },
        }
    }
    keys
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
