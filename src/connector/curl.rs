//! A curl command line read as the one HTTP request it makes, for
//! `pollhook new connector --from-curl` (see [`super::scaffold`]). Pure:
//! text in, a [`CurlRequest`] out.
//!
//! The command is split into words as a POSIX shell would (single and
//! double quotes, backslash escapes, `\`-newline continuations, bash's
//! `$'…'` that browsers' "Copy as cURL" writes). Flags that change what is
//! fetched are understood; flags that only change curl's own output
//! (`-s`, `-v`, `-i`, `-o FILE`, …) are ignored with a warning; any other
//! flag is an error naming it, so that nothing silently changes the
//! request.

use std::collections::VecDeque;

/// The request of a curl command.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CurlRequest {
    /// `-X`; `None`: GET, or POST when there is data (curl's rule).
    pub method: Option<String>,
    /// The URL, as written (with its query).
    pub url: String,
    /// `-H` headers in order (and `-A`, `-b` as `User-Agent`, `Cookie`).
    pub headers: Vec<(String, String)>,
    /// `-d`/`--data*`/`--json` pieces; curl joins them with `&`.
    pub data: Vec<String>,
    /// `--json`: the data is JSON (and so is the answer expected).
    pub json: bool,
    /// `-G`: the data goes into the query of a GET.
    pub get: bool,
    /// `-u user[:password]`.
    pub user: Option<String>,
    /// What was ignored or cannot be kept, for the user to read.
    pub warnings: Vec<String>,
}

/// Why a curl command could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CurlError {
    #[error("the curl command has an unterminated {0} quote")]
    Unterminated(&'static str),
    #[error("the curl command has no URL")]
    NoUrl,
    #[error(
        "the curl command has two URLs (`{0}` and `{1}`); a connector starts from one request"
    )]
    TwoUrls(String, String),
    #[error("curl flag `{0}` needs a value")]
    MissingValue(String),
    #[error("curl flag `{0}` is not supported by `--from-curl` (it may change the request in a way a connector cannot express); remove it and try again")]
    UnknownFlag(String),
    #[error("curl flag `{flag} {value}`: {why}")]
    Unsupported {
        flag: String,
        value: String,
        why: &'static str,
    },
}

/// Splits `cmd` into words as a POSIX shell does (no expansions):
/// `'…'` literal, `"…"` with `\"`, `\\`, `\$`, `` \` `` escapes, `$'…'`
/// with C escapes, `\x` outside quotes, `\`-newline joined away.
pub fn split_words(cmd: &str) -> Result<Vec<String>, CurlError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = cmd.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('\n') => {}
                Some('\r') if chars.peek() == Some(&'\n') => {
                    chars.next();
                }
                Some(n) => {
                    cur.push(n);
                    in_word = true;
                }
                None => {}
            },
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(n) => cur.push(n),
                        None => return Err(CurlError::Unterminated("single")),
                    }
                }
            }
            '$' if chars.peek() == Some(&'\'') => {
                chars.next();
                in_word = true;
                ansi_c_quoted(&mut chars, &mut cur)?;
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(n @ ('"' | '\\' | '$' | '`')) => cur.push(n),
                            Some('\n') => {}
                            Some(n) => {
                                cur.push('\\');
                                cur.push(n);
                            }
                            None => return Err(CurlError::Unterminated("double")),
                        },
                        Some(n) => cur.push(n),
                        None => return Err(CurlError::Unterminated("double")),
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// The rest of a `$'…'` word (after the opening quote).
fn ansi_c_quoted(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    cur: &mut String,
) -> Result<(), CurlError> {
    loop {
        match chars.next() {
            Some('\'') => return Ok(()),
            Some('\\') => match chars.next() {
                Some('n') => cur.push('\n'),
                Some('t') => cur.push('\t'),
                Some('r') => cur.push('\r'),
                Some('0') => cur.push('\0'),
                Some('x') => {
                    let hex: String = std::iter::from_fn(|| chars.next_if(char::is_ascii_hexdigit))
                        .take(2)
                        .collect();
                    let code = u32::from_str_radix(&hex, 16).unwrap_or(0);
                    cur.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                }
                Some(n) => cur.push(n),
                None => return Err(CurlError::Unterminated("$'")),
            },
            Some(n) => cur.push(n),
            None => return Err(CurlError::Unterminated("$'")),
        }
    }
}

/// Flags that only change curl's own behaviour or output: ignored.
const IGNORED: &[&str] = &[
    "-s",
    "--silent",
    "-S",
    "--show-error",
    "-v",
    "--verbose",
    "-i",
    "--include",
    "-f",
    "--fail",
    "--fail-with-body",
    "-g",
    "--globoff",
    "--no-progress-meter",
    "-#",
    "--progress-bar",
    "--compressed",
    "-L",
    "--location",
];

/// Flags with a value that only change curl's own output or timing:
/// ignored with their value.
const IGNORED_WITH_VALUE: &[&str] = &[
    "-o",
    "--output",
    "-w",
    "--write-out",
    "-m",
    "--max-time",
    "--connect-timeout",
    "--retry",
];

/// Reads a curl command (`curl` first, then flags and the URL).
pub fn parse_curl(cmd: &str) -> Result<CurlRequest, CurlError> {
    let mut words: VecDeque<String> = split_words(cmd)?.into();
    if words
        .front()
        .is_some_and(|w| w == "curl" || w.ends_with("/curl"))
    {
        words.pop_front();
    }
    let mut r = CurlRequest::default();
    let mut url: Option<String> = None;
    let mut rest_are_urls = false;
    while let Some(word) = words.pop_front() {
        if rest_are_urls || !word.starts_with('-') || word == "-" {
            set_url(&mut url, word)?;
            continue;
        }
        if word == "--" {
            rest_are_urls = true;
            continue;
        }
        let mut expanded = expand_short(word);
        let flag = expanded.remove(0);
        for w in expanded.into_iter().rev() {
            words.push_front(w);
        }
        one_flag(&mut r, &mut url, flag, &mut words)?;
    }
    r.url = url.ok_or(CurlError::NoUrl)?;
    Ok(r)
}

/// One flag (its value taken from `words`) into the request.
fn one_flag(
    r: &mut CurlRequest,
    url: &mut Option<String>,
    flag: String,
    words: &mut VecDeque<String>,
) -> Result<(), CurlError> {
    let mut value = || {
        words
            .pop_front()
            .ok_or_else(|| CurlError::MissingValue(flag.clone()))
    };
    match flag.as_str() {
        "-X" | "--request" => r.method = Some(value()?.to_ascii_uppercase()),
        "-H" | "--header" => {
            let h = value()?;
            match h.split_once(':') {
                Some((k, v)) => r.headers.push((k.trim().to_string(), v.trim().to_string())),
                None => r
                    .warnings
                    .push(format!("`{flag} {h}`: not a `Name: value` header, ignored")),
            }
        }
        "-d" | "--data" | "--data-raw" | "--data-binary" | "--data-ascii" | "--data-urlencode" => {
            let d = value()?;
            if d.starts_with('@') && flag != "--data-raw" {
                return Err(CurlError::Unsupported {
                    flag,
                    value: d,
                    why: "a body read from a file; give it inline (`--data-raw '…'`)",
                });
            }
            r.data.push(d);
        }
        "--json" => {
            r.data.push(value()?);
            r.json = true;
        }
        "-u" | "--user" => r.user = Some(value()?),
        "--url" => set_url(url, value()?)?,
        "-G" | "--get" => r.get = true,
        "-A" | "--user-agent" => r.headers.push(("User-Agent".into(), value()?)),
        "-b" | "--cookie" => {
            let c = value()?;
            if !c.contains('=') {
                return Err(CurlError::Unsupported {
                    flag,
                    value: c,
                    why: "cookies read from a file; give them inline (`-b 'name=value'`)",
                });
            }
            r.headers.push(("Cookie".into(), c));
        }
        "-e" | "--referer" => r.headers.push(("Referer".into(), value()?)),
        "-k" | "--insecure" => r.warnings.push(format!(
            "`{flag}` ignored: pollhook always verifies TLS certificates"
        )),
        f if IGNORED.contains(&f) => r
            .warnings
            .push(format!("`{f}` ignored (curl's own output)")),
        f if IGNORED_WITH_VALUE.contains(&f) => {
            let v = value()?;
            r.warnings
                .push(format!("`{flag} {v}` ignored (curl's own output)"));
        }
        _ => return Err(CurlError::UnknownFlag(flag)),
    }
    Ok(())
}

fn set_url(url: &mut Option<String>, word: String) -> Result<(), CurlError> {
    match url {
        Some(first) => Err(CurlError::TwoUrls(first.clone(), word)),
        None => {
            *url = Some(word);
            Ok(())
        }
    }
}

/// Short flags taking a value: the rest of a cluster is the value.
const SHORT_WITH_VALUE: &[char] = &['X', 'H', 'd', 'u', 'A', 'b', 'e', 'o', 'w', 'm'];

/// A cluster of short flags as separate words: `-sSL` is `-s -S -L`,
/// `-XPOST` is `-X POST`, `-sd@x` is `-s -d @x`. Other words unchanged.
fn expand_short(word: String) -> Vec<String> {
    if word.starts_with("--") || word.len() <= 2 {
        return vec![word];
    }
    let mut out = Vec::new();
    for (i, c) in word[1..].char_indices() {
        out.push(format!("-{c}"));
        if SHORT_WITH_VALUE.contains(&c) {
            let rest = &word[1 + i + c.len_utf8()..];
            if !rest.is_empty() {
                out.push(rest.to_string());
            }
            break;
        }
    }
    out
}

impl CurlRequest {
    /// A plain GET of `url` (`--from-url`).
    pub fn from_url(url: &str) -> CurlRequest {
        CurlRequest {
            url: url.to_string(),
            ..CurlRequest::default()
        }
    }

    /// The data, joined as curl sends it; `None` without data or with `-G`.
    pub fn body(&self) -> Option<String> {
        (!self.data.is_empty() && !self.get).then(|| self.data.join("&"))
    }

    /// The method curl would use.
    pub fn method(&self) -> String {
        match &self.method {
            Some(m) => m.clone(),
            None if self.body().is_some() => "POST".into(),
            None => "GET".into(),
        }
    }

    /// The URL with `-G` data appended to its query.
    pub fn full_url(&self) -> String {
        if !self.get || self.data.is_empty() {
            return self.url.clone();
        }
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}{}", self.url, self.data.join("&"))
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_follow_shell_quoting() {
        let w = split_words(
            "curl 'https://x/a b' -H \"A: \\\"q\\\" \\$x\" \\\n  -d $'a\\nb' plain\\ word",
        )
        .unwrap();
        assert_eq!(
            w,
            [
                "curl",
                "https://x/a b",
                "-H",
                "A: \"q\" $x",
                "-d",
                "a\nb",
                "plain word"
            ]
        );
        assert_eq!(split_words("a ''").unwrap(), ["a", ""]);
        assert_eq!(
            split_words("curl 'x").unwrap_err(),
            CurlError::Unterminated("single")
        );
        assert_eq!(
            split_words("curl \"x").unwrap_err(),
            CurlError::Unterminated("double")
        );
    }

    #[test]
    fn flags_become_the_request() {
        let r = parse_curl(
            "curl -sSL -X post --url 'https://api.example.com/v1/things?per_page=2' \
             -H 'Authorization: Bearer tok' --header 'Accept:application/json' \
             -u 'me:pw' -A agent/1 -b 'sid=abc' --compressed -d a=1 --data-raw b=2",
        )
        .unwrap();
        assert_eq!(r.method(), "POST");
        assert_eq!(r.url, "https://api.example.com/v1/things?per_page=2");
        assert_eq!(r.header("authorization"), Some("Bearer tok"));
        assert_eq!(r.header("Accept"), Some("application/json"));
        assert_eq!(r.header("user-agent"), Some("agent/1"));
        assert_eq!(r.header("cookie"), Some("sid=abc"));
        assert_eq!(r.user.as_deref(), Some("me:pw"));
        assert_eq!(r.body().as_deref(), Some("a=1&b=2"));
        assert!(r.warnings.iter().any(|w| w.contains("--compressed")));
    }

    #[test]
    fn get_moves_data_into_the_query_and_attached_values_split() {
        let r = parse_curl("curl -G https://x/y?a=1 -dq=rust -XGET").unwrap();
        assert!(r.get);
        assert_eq!(r.full_url(), "https://x/y?a=1&q=rust");
        assert_eq!(r.body(), None);
        assert_eq!(r.method(), "GET");
        let j = parse_curl("curl --json '{\"a\":1}' https://x/").unwrap();
        assert!(j.json);
        assert_eq!(j.method(), "POST");
        let k = parse_curl("curl -k https://x/").unwrap();
        assert!(k.warnings[0].contains("TLS"), "{:?}", k.warnings);
    }

    #[test]
    fn unknown_flags_and_missing_parts_are_errors_naming_them() {
        assert_eq!(
            parse_curl("curl --proxy http://p:1 https://x/").unwrap_err(),
            CurlError::UnknownFlag("--proxy".into())
        );
        assert_eq!(
            parse_curl("curl -Z https://x/").unwrap_err(),
            CurlError::UnknownFlag("-Z".into())
        );
        assert_eq!(parse_curl("curl -s").unwrap_err(), CurlError::NoUrl);
        assert_eq!(
            parse_curl("curl https://x/ -H").unwrap_err(),
            CurlError::MissingValue("-H".into())
        );
        assert!(matches!(
            parse_curl("curl https://a/ https://b/").unwrap_err(),
            CurlError::TwoUrls(..)
        ));
        assert!(matches!(
            parse_curl("curl -d @body.json https://a/").unwrap_err(),
            CurlError::Unsupported { .. }
        ));
        let e = parse_curl("curl --proxy http://p:1 https://x/").unwrap_err();
        assert!(e.to_string().contains("`--proxy`"), "{e}");
    }
}
