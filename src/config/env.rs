//! `${VAR}` and `${VAR:-default}` substitution from the environment.
//!
//! A substituted value is exactly one YAML scalar, whatever it holds:
//! quotes, backslashes, newlines, `#`, `: `, `{`, `]`, leading spaces, an
//! alias `*x`, a tag `!!binary`. Pasting values into the text (as this
//! module once did) let a value close its quotes and write keys of its
//! own (`", allow_private: true, hub_secret: "x`), and a backslash from a
//! `${file:…}` broke a double-quoted string. So substitution is done on the
//! parsed scalars, in four steps:
//!
//! 1. every `${…}` (and `$${`) of the text is masked by a placeholder of
//!    the same byte length: a private-use character the file does not
//!    contain, one per reference, padded with `_`. A placeholder is a plain
//!    scalar's character in every context (flow or block, quoted or not),
//!    so `[${A}, ${B}]` still parses, and every byte offset, line and
//!    column of the masked text is the file's own;
//! 2. the masked text is parsed into events (serde-saphyr's own parser),
//!    which give each scalar's decoded value, style and source span;
//! 3. in each scalar holding placeholders, they are replaced by their
//!    values in the *decoded* value (so no value is ever read as YAML);
//! 4. that scalar's span is written back as a double-quoted scalar with
//!    every special character escaped, on as many lines as the original
//!    span (a multi-line scalar keeps its line count with escaped line
//!    breaks), so every later line number stays exact. Only a plain
//!    scalar whose new value is a bare word of `[A-Za-z0-9_.+-]` (a
//!    number, a boolean, a word) stays plain, so `port: ${PORT}` is still
//!    a number; a value that would read as null (`~`, `null`, empty) is
//!    quoted, so a substituted value is never "absent".
//!
//! Everything outside scalars is left as written: a `${OLD_VAR}` in a
//! comment needs no value. `$${` writes a literal `${`. Errors point at the
//! `${` in the file; their excerpts show the file as written, never a value.
//!
//! Secrets that should not live in the environment come from files:
//! `${file:/run/secrets/bank_token}` reads a file, and
//! `${credential:bank_token}` reads `$CREDENTIALS_DIRECTORY/bank_token`, the
//! directory systemd fills from `LoadCredential=`/`SetCredential=` (so the
//! secret never appears in the unit file or `systemctl show`). One trailing
//! newline is dropped, as `echo secret > file` writes one. Errors name the
//! file, never its content.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::Path;

use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle};

use super::error::{ConfigError, ConfigErrors};

/// Substitutes every `${VAR}` of `text`, looking names up with `lookup`.
/// All missing variables are reported, each at its line.
pub fn interpolate(
    file: &Path,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigErrors> {
    let (out, errors) = interpolate_partial(file, text, lookup);
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// One `${…}` or `$${` of the text.
struct Reference<'t> {
    /// Its bytes in the text.
    range: Range<usize>,
    /// `None` for `$${` (a literal `${`), else what is between the braces.
    inner: Option<&'t str>,
}

/// A scalar of the masked text holding placeholders.
struct Scalar {
    range: Range<usize>,
    value: String,
    style: ScalarStyle,
    /// Column (0-based, in characters) where its content starts.
    column: usize,
}

/// [`interpolate`] that substitutes what it can: each failed substitution
/// leaves an empty value and an error (whose `field` names where it was).
/// Operator commands read a few fields of bridge.yaml and must not fail on
/// a variable only the daemon's other fields use (see `config::operator`).
pub fn interpolate_partial(
    file: &Path,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> (String, Vec<ConfigError>) {
    let error_at = |offset: usize, message: String| error_at(file, text, offset, message);
    let (refs, unterminated) = references(text);
    if refs.is_empty() && unterminated.is_empty() {
        return (text.to_string(), Vec::new());
    }
    // 1. Mask.
    let (masked, markers) = match mask(text, &refs) {
        Ok(m) => m,
        Err(e) => return (text.to_string(), vec![error_at(e.at, e.to_string())]),
    };
    let index: HashMap<char, usize> = markers.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    // 2. Parse.
    let scalars = match scalars_holding(&masked, &index) {
        Ok(s) => s,
        Err(e) => {
            // Nothing is substituted in a file that is not YAML: the
            // error is the parser's, at its place in the file.
            let mut errors: Vec<ConfigError> = unterminated
                .iter()
                .map(|&at| error_at(at, UNTERMINATED.to_string()))
                .collect();
            let m = e.marker();
            errors.push(ConfigError::at(
                file,
                text,
                m.line() as u64,
                m.col() as u64 + 1,
                "",
                e.info().to_string(),
            ));
            return (text.to_string(), errors);
        }
    };
    let mut errors: Vec<ConfigError> = unterminated
        .iter()
        .filter(|&&at| scalars.iter().any(|s| s.range.contains(&at)))
        .map(|&at| error_at(at, UNTERMINATED.to_string()))
        .collect();
    // 3. and 4. Substitute in the decoded values; write the scalars back.
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for s in &scalars {
        let value = substitute(s, &refs, &index, lookup, &mut |at, message| {
            errors.push(error_at(at, message))
        });
        let (range, text_of_range) = match s.style {
            ScalarStyle::Literal | ScalarStyle::Folded => match block_header(text, s.range.start) {
                Some(h) => (h..s.range.end, &text[h..s.range.end]),
                None => {
                    errors.push(error_at(
                        s.range.start,
                        "`${…}` in a block scalar whose `|` or `>` cannot be found; write the value in quotes".to_string(),
                    ));
                    continue;
                }
            },
            _ => (s.range.clone(), &text[s.range.clone()]),
        };
        // Trailing blank lines of a block scalar stay as they are.
        let content = text_of_range.trim_end();
        out.push_str(&text[last..range.start]);
        out.push_str(&emit(
            &value,
            s.style,
            content.matches('\n').count(),
            s.column.max(1),
        ));
        last = range.start + content.len();
    }
    out.push_str(&text[last..]);
    (out, errors)
}

/// An error at byte `offset` of the file: its line and column are the
/// text's own, since masking keeps every offset.
fn error_at(file: &Path, text: &str, offset: usize, message: String) -> ConfigError {
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[..offset].matches('\n').count() as u64 + 1;
    ConfigError::at(
        file,
        text,
        line,
        (offset - line_start + 1) as u64,
        "",
        message,
    )
}

/// More references than private-use characters the file leaves free.
#[derive(Debug, thiserror::Error)]
#[error("too many `${{…}}` references ({refs}); a file can hold {free}")]
struct TooManyReferences {
    /// The first reference without a placeholder.
    at: usize,
    refs: usize,
    free: usize,
}

/// Step 1: the text with every reference replaced by its placeholder (a
/// private-use character the file does not hold, padded with `_` to the
/// reference's length), and the placeholders in the references' order.
fn mask(text: &str, refs: &[Reference<'_>]) -> Result<(String, Vec<char>), TooManyReferences> {
    let used: BTreeSet<char> = text.chars().collect();
    let markers: Vec<char> = ('\u{E000}'..='\u{F8FF}')
        .filter(|c| !used.contains(c))
        .take(refs.len())
        .collect();
    if markers.len() < refs.len() {
        return Err(TooManyReferences {
            at: refs[markers.len()].range.start,
            refs: refs.len(),
            free: markers.len(),
        });
    }
    let mut masked = String::with_capacity(text.len());
    let mut last = 0;
    for (r, m) in refs.iter().zip(&markers) {
        masked.push_str(&text[last..r.range.start]);
        masked.push(*m);
        masked.extend(std::iter::repeat_n('_', r.range.len() - m.len_utf8()));
        last = r.range.end;
    }
    masked.push_str(&text[last..]);
    Ok((masked, markers))
}

/// Step 2: the scalars of the masked text that hold a placeholder, with
/// their decoded values, styles and spans; or the parser's error.
fn scalars_holding(
    masked: &str,
    index: &HashMap<char, usize>,
) -> Result<Vec<Scalar>, serde_saphyr::granit_parser::ScanError> {
    let mut scalars = Vec::new();
    let mut parser = Parser::new_from_str(masked);
    while let Some(event) = parser.next_event() {
        if let (Event::Scalar(value, style, _, _), span) = event? {
            let Some(range) = span.byte_range() else {
                continue;
            };
            if value.chars().any(|c| index.contains_key(&c)) {
                scalars.push(Scalar {
                    range,
                    value: value.into_owned(),
                    style,
                    column: span.start.col(),
                });
            }
        }
    }
    Ok(scalars)
}

/// Step 3: a scalar's decoded value with each of its placeholders replaced
/// by the reference's value; a reference without one becomes empty and
/// an error (`fail`, at the `${`).
fn substitute(
    s: &Scalar,
    refs: &[Reference<'_>],
    index: &HashMap<char, usize>,
    lookup: &dyn Fn(&str) -> Option<String>,
    fail: &mut dyn FnMut(usize, String),
) -> String {
    let mut value = String::with_capacity(s.value.len());
    let mut chars = s.value.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let Some(&k) = index.get(&c) else {
            value.push(c);
            continue;
        };
        let r = &refs[k];
        let pad = r.range.len() - c.len_utf8();
        let after = i + c.len_utf8();
        if !s.range.contains(&r.range.start)
            || s.value.get(after..after + pad) != Some(&"_".repeat(pad))
        {
            // Not a placeholder of this scalar (an escape such as
            // `"\uE000"` wrote the character): the character itself.
            value.push(c);
            continue;
        }
        for _ in 0..pad {
            chars.next();
        }
        match r.inner {
            None => value.push_str("${"),
            Some(inner) => match resolve(inner, lookup) {
                Ok(v) => value.push_str(&v),
                Err(e) => fail(r.range.start, e.to_string()),
            },
        }
    }
    value
}

const UNTERMINATED: &str = "unterminated `${`: expected `${VAR}` or `${VAR:-default}`";

/// Every `${…}` and `$${` of `text` (a reference ends at the first `}` of
/// its line), and where each `${` without a `}` starts.
fn references(text: &str) -> (Vec<Reference<'_>>, Vec<usize>) {
    let mut refs = Vec::new();
    let mut unterminated = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
        } else if text[i..].starts_with("$${") {
            refs.push(Reference {
                range: i..i + 3,
                inner: None,
            });
            i += 3;
        } else if text[i..].starts_with("${") {
            let line_end = text[i..].find('\n').map_or(text.len(), |n| i + n);
            match text[i + 2..line_end].find('}') {
                Some(n) => {
                    let end = i + 2 + n + 1;
                    refs.push(Reference {
                        range: i..end,
                        inner: Some(&text[i + 2..end - 1]),
                    });
                    i = end;
                }
                None => {
                    unterminated.push(i);
                    i += 2;
                }
            }
        } else {
            i += 1;
        }
    }
    (refs, unterminated)
}

/// Where the `|` or `>` of the block scalar whose content starts at
/// `content` is: on the last non-blank line above it.
fn block_header(text: &str, content: usize) -> Option<usize> {
    let before = &text[..text[..content].rfind('\n')?];
    let mut end = before.len();
    loop {
        let start = before[..end].rfind('\n').map_or(0, |i| i + 1);
        let line = &before[start..end];
        if !line.trim().is_empty() {
            // The last indicator before a comment: a key may hold ` | `.
            let code = &line[..[" #", "\t#"]
                .iter()
                .filter_map(|c| line.find(c))
                .min()
                .unwrap_or(line.len())];
            let b = code.as_bytes();
            return (0..b.len())
                .rev()
                .find(|&i| {
                    (b[i] == b'|' || b[i] == b'>')
                        && (i == 0 || b[i - 1] == b' ' || b[i - 1] == b'\t')
                        && {
                            let rest = code[i + 1..].trim_start_matches(|c: char| {
                                c == '-' || c == '+' || c.is_ascii_digit()
                            });
                            rest.is_empty() || rest.starts_with([' ', '\t', '\r'])
                        }
                })
                .map(|i| start + i);
        }
        if start == 0 {
            return None;
        }
        end = start - 1;
    }
}

/// A scalar holding exactly `value`, on `lines + 1` lines (continuation
/// lines indented by `indent` spaces, deeper than the node's parent).
fn emit(value: &str, style: ScalarStyle, lines: usize, indent: usize) -> String {
    if lines == 0 && style == ScalarStyle::Plain && is_bare_word(value) {
        return value.to_string();
    }
    let mut out = String::with_capacity(value.len() + 2 + lines * (indent + 2));
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // Outside YAML's printable set, or a line break to YAML 1.1
            // (NEL, LS, PS), or a byte order mark.
            '\u{0}'..='\u{1f}'
            | '\u{7f}'..='\u{9f}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{feff}'
            | '\u{fffe}'
            | '\u{ffff}' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    // An escaped line break (`\` at the end of a line) adds nothing to the
    // value; the next line's indentation is dropped too.
    for _ in 0..lines {
        out.push_str("\\\n");
        out.extend(std::iter::repeat_n(' ', indent));
    }
    out.push('"');
    out
}

/// Whether `value` written plainly is itself and nothing more: a number, a
/// boolean or a word, never null, a document marker or an indicator.
fn is_bare_word(value: &str) -> bool {
    !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '-'))
        && value != "-"
        && !value.starts_with("---")
        && !value.starts_with("...")
        && !matches!(value, "null" | "Null" | "NULL")
}

/// Every value the references of `text` stand for, each with its
/// reference as written (`${BANK_TOKEN}`, `${file:/run/secrets/t}`): what
/// error messages must say instead of the value (see
/// `ConfigErrors::scrub`). References that cannot be resolved have no value.
pub fn substitutions(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    let (refs, _) = references(text);
    refs.iter()
        .filter_map(|r| {
            let value = resolve(r.inner?, lookup).ok()?;
            Some((value, text[r.range.clone()].to_string()))
        })
        .collect()
}

/// Why a `${…}` reference has no value; the message is the config error's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// `${inner}` names no variable.
    #[error("`${{{0}}}`: expected a variable name of letters, digits and `_`")]
    BadName(String),
    /// The variable is unset and has no default.
    #[error("environment variable `{0}` is not set (write `${{{0}:-default}}` to give a default)")]
    Unset(String),
    /// `${credential:…}` with an empty name or a path.
    #[error("`${{credential:{0}}}`: expected a credential name without `/`")]
    BadCredential(String),
    /// `${credential:…}` outside a systemd unit that loads credentials.
    #[error("`${{credential:{0}}}`: $CREDENTIALS_DIRECTORY is not set (it is set by systemd for units with `LoadCredential={0}:/path`)")]
    NoCredentialsDirectory(String),
    /// `${scheme:…}` of an unknown scheme.
    #[error("`${{{0}:…}}`: expected `${{VAR}}`, `${{file:/path}}` or `${{credential:name}}`")]
    UnknownScheme(String),
    /// The secret file could not be read.
    #[error("cannot read secret file {path}: {error}")]
    Unreadable { path: String, error: String },
}

/// The value of `${inner}`.
fn resolve(inner: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, EnvError> {
    let (name, default) = match inner.split_once(":-") {
        Some((n, d)) => (n, Some(d)),
        None => (inner, None),
    };
    if let Some((scheme, arg)) = name.split_once(':') {
        return read_secret(scheme, arg, lookup);
    }
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(EnvError::BadName(inner.to_string()));
    }
    lookup(name)
        .or_else(|| default.map(str::to_string))
        .ok_or_else(|| EnvError::Unset(name.to_string()))
}

/// `${file:PATH}` and `${credential:NAME}`.
fn read_secret(
    scheme: &str,
    arg: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, EnvError> {
    let path = match scheme {
        "file" => std::path::PathBuf::from(arg),
        "credential" => {
            if arg.is_empty() || arg.contains('/') {
                return Err(EnvError::BadCredential(arg.to_string()));
            }
            let Some(dir) = lookup("CREDENTIALS_DIRECTORY") else {
                return Err(EnvError::NoCredentialsDirectory(arg.to_string()));
            };
            Path::new(&dir).join(arg)
        }
        other => return Err(EnvError::UnknownScheme(other.to_string())),
    };
    let mut value = std::fs::read_to_string(&path).map_err(|e| EnvError::Unreadable {
        path: path.display().to_string(),
        error: e.to_string(),
    })?;
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "BANK_URL" => Some("http://127.0.0.1:8081".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn substitutes_defaults_and_escapes() {
        let text = "a: ${BANK_URL}/x\nb: ${NOPE:-7}\nc: '${EMPTY}'\nd: $${LITERAL} $5\n# e: ${COMMENTED}\nf: 1 # ${ALSO}\n";
        let out = interpolate(Path::new("b.yaml"), text, &env).unwrap();
        assert_eq!(
            out,
            "a: \"http://127.0.0.1:8081/x\"\nb: 7\nc: \"\"\nd: \"${LITERAL} $5\"\n# e: ${COMMENTED}\nf: 1 # ${ALSO}\n"
        );
    }

    #[test]
    fn secrets_from_files_and_systemd_credentials() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tok"), "s3cret\n").unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        let lookup = move |n: &str| (n == "CREDENTIALS_DIRECTORY").then(|| d.clone());
        let text = format!(
            "a: ${{file:{}/tok}}\nb: ${{credential:tok}}\n",
            dir.path().display()
        );
        let out = interpolate(Path::new("b.yaml"), &text, &lookup).unwrap();
        assert_eq!(out, "a: s3cret\nb: s3cret\n");
        let errs = interpolate(Path::new("b.yaml"), "x: ${credential:nope}\n", &lookup)
            .unwrap_err()
            .to_string();
        assert!(
            errs.contains("b.yaml:1") && errs.contains("cannot read secret file"),
            "{errs}"
        );
        let errs = interpolate(Path::new("b.yaml"), "x: ${credential:tok}\n", &env)
            .unwrap_err()
            .to_string();
        assert!(errs.contains("CREDENTIALS_DIRECTORY is not set"), "{errs}");
    }

    #[test]
    fn missing_variables_name_file_line_and_variable() {
        let text = "state_dir: x\nendpoints:\n  agent:\n    secret: ${AGENT_SECRET}\n";
        let errs = interpolate(Path::new("bridge.yaml"), text, &env).unwrap_err();
        let s = errs.to_string();
        assert!(s.contains("bridge.yaml:4:13"), "{s}");
        assert!(s.contains("endpoints.agent.secret"), "{s}");
        assert!(s.contains("`AGENT_SECRET` is not set"), "{s}");
    }

    /// Values that would be YAML if pasted into the text.
    const HOSTILE: &[&str] = &[
        "\", allow_private: true, hub_secret: \"x",
        "', allow_private: true, x: '",
        "a\\b\\\"c",
        "line one\nallow_private: true",
        "x # not a comment",
        "k: v",
        "{ a: 1 }",
        "]",
        "[1, 2",
        "  leading and trailing  ",
        "*alias",
        "&anchor v",
        "!!binary aGk=",
        "- item",
        "---",
        "...",
        "~",
        "null",
        "",
        "|",
        "> folded",
        "%YAML 1.2",
        "@reserved `tick`",
        "tab\tand\rcr",
        "\u{85}nel\u{2028}ls\u{feff}bom\u{7}bell\u{0}nul",
        "${NESTED}",
        "caf\u{e9} \u{1f980} \u{e000}",
    ];

    fn parse(text: &str) -> serde_json::Value {
        serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn a_value_is_one_scalar_in_every_context() {
        let contexts = [
            ("a: \"${V}\"\nb: 1\n", "a"),
            ("a: '${V}'\nb: 1\n", "a"),
            ("a: ${V}\nb: 1\n", "a"),
            ("m: { a: ${V}, z: 2 }\nb: 1\n", "m"),
            ("m: { a: \"${V}\", z: 2 }\nb: 1\n", "m"),
            ("s: [${V}, 2]\nb: 1\n", "s"),
            ("s:\n  - ${V}\nb: 1\n", "s"),
            ("${V}: 3\nb: 1\n", ""),
        ];
        for value in HOSTILE {
            let lookup = |n: &str| (n == "V").then(|| value.to_string());
            for (text, key) in contexts {
                let out = interpolate(Path::new("b.yaml"), text, &lookup).unwrap();
                let v = parse(&out);
                assert_eq!(out.lines().count(), text.lines().count(), "{out}");
                assert_eq!(v["b"], 1, "{value:?} in {text:?}:\n{out}");
                let got = match key {
                    "a" => v["a"].clone(),
                    "m" => {
                        assert_eq!(v["m"].as_object().unwrap().len(), 2, "{out}");
                        assert_eq!(v["m"]["z"], 2, "{out}");
                        v["m"]["a"].clone()
                    }
                    "s" => {
                        let s = v["s"].as_array().unwrap();
                        assert!(s.len() == 1 || s.len() == 2 && s[1] == 2, "{out}");
                        s[0].clone()
                    }
                    _ => {
                        let m = v.as_object().unwrap();
                        assert_eq!(m.len(), 2, "{out}");
                        let k = m.keys().find(|k| *k != "b").unwrap();
                        assert_eq!(m[k], 3, "{out}");
                        serde_json::Value::String(k.clone())
                    }
                };
                assert_eq!(
                    got,
                    serde_json::Value::String(value.to_string()),
                    "{value:?} in {text:?}:\n{out}"
                );
                assert_eq!(v.as_object().unwrap().len(), 2, "{out}");
            }
        }
    }

    #[test]
    fn plain_words_keep_their_type_and_text_around_stays() {
        let lookup = |n: &str| match n {
            "PORT" => Some("8080".to_string()),
            "ON" => Some("true".to_string()),
            "HOST" => Some("h\"x".to_string()),
            _ => None,
        };
        let text = "p: ${PORT}\non: ${ON}\nq: \"${PORT}\"\nurl: http://${HOST}:${PORT}/x # ${C}\nl: [${PORT}, \"a${ON}\"]\n";
        let out = interpolate(Path::new("b.yaml"), text, &lookup).unwrap();
        let v = parse(&out);
        assert_eq!(v["p"], 8080);
        assert_eq!(v["on"], true);
        assert_eq!(v["q"], "8080");
        assert_eq!(v["url"], "http://h\"x:8080/x");
        assert_eq!(v["l"], serde_json::json!([8080, "atrue"]));
        assert!(out.contains("# ${C}"), "{out}");
    }

    #[test]
    fn multi_line_scalars_keep_their_line_count() {
        let lookup = |n: &str| (n == "V").then(|| "x\"\ny: 1 \\".to_string());
        for (text, want) in [
            (
                "a: |\n  one ${V}\n  two\n\nb: 1\n",
                "one x\"\ny: 1 \\\ntwo\n",
            ),
            ("a: >-\n  one ${V}\n  two\nb: 1\n", "one x\"\ny: 1 \\ two"),
            ("a: | # c\n\n  one ${V}\nb: 1\n", "\none x\"\ny: 1 \\\n"),
            ("a: \"one\n  ${V} two\"\nb: 1\n", "one x\"\ny: 1 \\ two"),
            ("a: one\n  ${V} two\nb: 1\n", "one x\"\ny: 1 \\ two"),
            ("l:\n  - |\n    ${V}\n    z\nb: 1\n", ""),
            ("a | b: | # c | d\n  ${V}\nb: 1\n", "x\"\ny: 1 \\\n"),
        ] {
            let out = interpolate(Path::new("b.yaml"), text, &lookup).unwrap();
            assert_eq!(out.lines().count(), text.lines().count(), "{out}");
            let v = parse(&out);
            assert_eq!(v["b"], 1, "{out}");
            if text.starts_with("a | b") {
                assert_eq!(v["a | b"], want, "{out}");
            } else if want.is_empty() {
                assert_eq!(v["l"][0], "x\"\ny: 1 \\\nz\n", "{out}");
            } else {
                assert_eq!(v["a"], want, "{text:?}:\n{out}");
            }
        }
    }
}
