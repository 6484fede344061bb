//! `${VAR}` and `${VAR:-default}` substitution from the environment.
//!
//! Done on the text, before YAML parsing, line by line: line numbers stay
//! those of the file, so a missing variable is reported at its line, and the
//! YAML parser's later locations stay exact. Comments are left alone, so a
//! commented-out `${OLD_VAR}` needs no value. `$${` writes a literal `${`.
//!
//! Secrets that should not live in the environment come from files:
//! `${file:/run/secrets/bank_token}` reads a file, and
//! `${credential:bank_token}` reads `$CREDENTIALS_DIRECTORY/bank_token`, the
//! directory systemd fills from `LoadCredential=`/`SetCredential=` (so the
//! secret never appears in the unit file or `systemctl show`). One trailing
//! newline is dropped, as `echo secret > file` writes one. Errors name the
//! file, never its content.

use std::path::Path;

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

/// What a substitution that failed leaves in the text: `~` is YAML's null
/// in any position (a plain value, a flow list or map entry) and plain text
/// inside quotes or next to other characters, so the text still parses.
const FAILED: &str = "~";

/// [`interpolate`] that substitutes what it can: each failed substitution
/// leaves `~` and an error (whose `field` names where it was).
/// Operator commands read a few fields of bridge.yaml and must not fail on
/// a variable only the daemon's other fields use (see `config::operator`).
pub fn interpolate_partial(
    file: &Path,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> (String, Vec<ConfigError>) {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let line_no = n as u64 + 1;
        let (code, comment) = split_comment(line);
        let mut rest = code;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let after = &rest[i..];
            if let Some(r) = after.strip_prefix("$${") {
                out.push_str("${");
                rest = r;
                continue;
            }
            if !after.starts_with("${") {
                out.push('$');
                rest = &after[1..];
                continue;
            }
            let Some(end) = after.find('}') else {
                errors.push(ConfigError::at(
                    file,
                    text,
                    line_no,
                    (code.len() - rest.len() + i + 1) as u64,
                    "",
                    "unterminated `${`: expected `${VAR}` or `${VAR:-default}`",
                ));
                out.push_str(after);
                rest = "";
                break;
            };
            let inner = &after[2..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let column = (code.len() - rest.len() + i + 1) as u64;
            if let Some((scheme, arg)) = name.split_once(':') {
                match read_secret(scheme, arg, lookup) {
                    Ok(value) => out.push_str(&value),
                    Err(msg) => {
                        out.push_str(FAILED);
                        errors.push(ConfigError::at(file, text, line_no, column, "", msg));
                    }
                }
            } else if name.is_empty()
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                out.push_str(FAILED);
                errors.push(ConfigError::at(
                    file,
                    text,
                    line_no,
                    column,
                    "",
                    format!("`${{{inner}}}`: expected a variable name of letters, digits and `_`"),
                ));
            } else {
                match lookup(name).or_else(|| default.map(str::to_string)) {
                    Some(value) if !value.contains('\n') => out.push_str(&value),
                    found => {
                        out.push_str(FAILED);
                        errors.push(ConfigError::at(
                            file,
                            text,
                            line_no,
                            column,
                            "",
                            if found.is_some() {
                                format!("environment variable `{name}` contains a newline, which a config value cannot hold")
                            } else {
                                format!(
                                    "environment variable `{name}` is not set (write `${{{name}:-default}}` to give a default)"
                                )
                            },
                        ));
                    }
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out.push_str(comment);
    }
    (out, errors)
}

/// `${file:PATH}` and `${credential:NAME}`.
fn read_secret(
    scheme: &str,
    arg: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let path = match scheme {
        "file" => std::path::PathBuf::from(arg),
        "credential" => {
            if arg.is_empty() || arg.contains('/') {
                return Err(format!(
                    "`${{credential:{arg}}}`: expected a credential name without `/`"
                ));
            }
            let Some(dir) = lookup("CREDENTIALS_DIRECTORY") else {
                return Err(format!(
                    "`${{credential:{arg}}}`: $CREDENTIALS_DIRECTORY is not set (it is set by systemd for units with `LoadCredential={arg}:/path`)"
                ));
            };
            Path::new(&dir).join(arg)
        }
        other => {
            return Err(format!(
                "`${{{other}:…}}`: expected `${{VAR}}`, `${{file:/path}}` or `${{credential:name}}`"
            ))
        }
    };
    let mut value = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    if value.contains('\n') {
        return Err(format!(
            "secret file {} holds several lines; a config value cannot",
            path.display()
        ));
    }
    Ok(value)
}

/// Splits a line into code and a trailing `# comment` (a `#` at the start or
/// after whitespace, outside quotes).
fn split_comment(line: &str) -> (&str, &str) {
    let mut quote: Option<char> = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '"' | '\'' => quote = Some(c),
                '#' if prev == ' ' || prev == '\t' => return line.split_at(i),
                _ => {}
            },
        }
        prev = c;
    }
    (line, "")
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
            "a: http://127.0.0.1:8081/x\nb: 7\nc: ''\nd: ${LITERAL} $5\n# e: ${COMMENTED}\nf: 1 # ${ALSO}\n"
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
}
