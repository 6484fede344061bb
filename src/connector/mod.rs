//! Connectors at run time: one poll of one instance is
//! [`fetch::fetch`] (requests, pages) then [`detect::detect`] (pure).

pub mod auth;
pub mod cassette;
pub mod columns;
pub mod curl;
pub mod detect;
pub mod fetch;
pub mod format;
pub mod scaffold;
pub mod spec;
pub mod transport;

use base64::Engine as _;

/// Secrets shorter than this are not masked: masking `ab` everywhere would
/// mangle every message and hide nothing worth hiding.
const MIN_SECRET: usize = 3;

/// The most secrets learned at run time kept for masking (the oldest
/// goes first): tokens rotate, and an old one matters less than a bound.
const MAX_LEARNED: usize = 4096;

/// Secrets learned at run time (issued and rotated OAuth2 tokens, the
/// credentials sent to a token endpoint): masked in every text [`mask`]
/// sees, with the secrets its caller passes.
#[derive(Default)]
struct Learned {
    set: std::collections::HashSet<String>,
    order: std::collections::VecDeque<String>,
}

static LEARNED: std::sync::LazyLock<parking_lot::RwLock<Learned>> =
    std::sync::LazyLock::new(Default::default);

/// Adds `secret` to the secrets masked everywhere, from now on: called the
/// moment a secret is learned (a token issued or rotated), before it is
/// used, so no message about its use can show it.
pub fn learn(secret: &str) {
    if secret.len() < MIN_SECRET {
        return;
    }
    let read = LEARNED.read();
    if read.set.contains(secret) {
        return;
    }
    drop(read);
    let mut w = LEARNED.write();
    if w.set.insert(secret.to_string()) {
        w.order.push_back(secret.to_string());
        if w.order.len() > MAX_LEARNED {
            if let Some(old) = w.order.pop_front() {
                w.set.remove(&old);
            }
        }
    }
}

/// Replaces every secret value in `text` with `***`: the `secrets` given
/// (an instance's credentials) and every secret [`learn`]ed at run time.
/// Applied to every message that leaves a poll (errors, logs, `pollhook
/// test` output).
///
/// Why more than a plain `replace`: a secret comes back from upstreams and
/// URLs in whatever encoding they chose, not the one pollhook sent. A
/// `/` may be raw, `%2F`, `%2f`, `%252F` or `%25252F` (encoded up to five
/// times), a space `+` or `%20`, a JSON echo writes `\/`, `\"` or
/// `\u002F`, an HTML page `&#47;`, `&#x2F;` or `&sol;`, a shouting one
/// upper-cases it, and any mix of these in one value (partially encoded).
/// So the text is matched character by character of the secret, each in
/// any of its spellings, ASCII letters in either case. Basic auth puts the
/// secret in base64 (`user:pass`), where its spelling depends on where it
/// starts: every alignment is looked for, and the whole base64 word that
/// holds it is masked (so the user part goes too); a hex dump of it (either
/// case) masks its whole hex word the same way. And a secret's head right
/// before `…` (how previews mark a cut) is masked as well.
pub fn mask(text: &str, secrets: &[String]) -> String {
    mask_ranges(text, secrets, false)
}

/// [`mask`] for text cut at its end (a body read up to a cap): a secret
/// whose beginning is the end of the text is masked too, since even its
/// prefix narrows the search for the rest.
pub fn mask_cut(text: &str, secrets: &[String]) -> String {
    mask_ranges(text, secrets, true)
}

fn mask_ranges(text: &str, secrets: &[String], cut: bool) -> String {
    let learned = LEARNED.read();
    let mut found = Finder::new(text, cut);
    let mut ranges = Vec::new();
    for s in secrets.iter().chain(learned.order.iter()) {
        found.ranges(s.as_bytes(), &mut ranges);
    }
    drop(learned);
    splice(text, ranges, |_| "***")
}

/// Replaces each of `values` (in any spelling [`mask`] knows) with what
/// stands for it, e.g. the `${VAR}` reference a config value came from.
/// Only the pairs given count, not the secrets learned at run time.
pub fn replace_values(text: &str, values: &[(String, String)]) -> String {
    let mut found = Finder::new(text, false);
    let mut ranges = Vec::new();
    for (i, (value, _)) in values.iter().enumerate() {
        let before = ranges.len();
        found.ranges(value.as_bytes(), &mut ranges);
        for r in &mut ranges[before..] {
            r.2 = i;
        }
    }
    splice(text, ranges, |i| values[i].1.as_str())
}

/// `text` with each range (start, end, which) replaced by `with(which)`;
/// overlapping ranges are merged into the first one's.
fn splice<'a>(
    text: &str,
    mut ranges: Vec<(usize, usize, usize)>,
    with: impl Fn(usize) -> &'a str,
) -> String {
    if ranges.is_empty() {
        return text.to_string();
    }
    ranges.sort();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end, which) in ranges {
        if end <= at {
            continue;
        }
        if start > at {
            out.push_str(&text[at..start]);
            out.push_str(with(which));
        } else if at == 0 && start == 0 {
            out.push_str(with(which));
        }
        at = end;
    }
    out.push_str(&text[at..]);
    out
}

/// Finds the spellings of secrets in one text.
struct Finder<'t> {
    text: &'t str,
    cut: bool,
    /// The text in lower case, for hex words (made at the first use).
    lower: Option<String>,
    /// Scratch space of [`match_at`].
    reach: Vec<Vec<usize>>,
}

impl<'t> Finder<'t> {
    fn new(text: &'t str, cut: bool) -> Self {
        Finder {
            text,
            cut,
            lower: None,
            reach: Vec::new(),
        }
    }

    /// Adds the byte ranges of `text` that spell `s` to `ranges` (the
    /// third field 0).
    fn ranges(&mut self, s: &[u8], ranges: &mut Vec<(usize, usize, usize)>) {
        let text = self.text;
        let bytes = text.as_bytes();
        if s.len() < MIN_SECRET {
            return;
        }
        let mut i = 0;
        while i < bytes.len() {
            // Every spelling of the first byte starts with it (in either
            // case), `%`, `+` (a space), `\` (a JSON escape) or `&` (an
            // HTML one): skip the rest quickly.
            if !matches!(bytes[i], b'%' | b'+' | b'\\' | b'&')
                && !bytes[i].eq_ignore_ascii_case(&s[0])
            {
                i += 1;
                continue;
            }
            match match_at(bytes, i, s, self.cut, &mut self.reach) {
                Some(end) if end > i => {
                    ranges.push((i, end, 0));
                    i = end;
                }
                _ => i += 1,
            }
        }
        let words = base64_cores(s)
            .into_iter()
            .map(|core| (core, false))
            .chain(std::iter::once((hex(s), true)));
        for (core, is_hex) in words {
            let haystack: &str = if is_hex {
                self.lower.get_or_insert_with(|| text.to_ascii_lowercase())
            } else {
                text
            };
            let in_word = |c: &u8| {
                if is_hex {
                    c.is_ascii_hexdigit()
                } else {
                    c.is_ascii_alphanumeric() || b"+/=-_".contains(c)
                }
            };
            let mut from = 0;
            while let Some(at) = haystack[from..].find(&core) {
                let (start, end) = (from + at, from + at + core.len());
                let word_start = bytes[..start]
                    .iter()
                    .rposition(|c| !in_word(c))
                    .map_or(0, |p| p + 1);
                let word_end = bytes[end..]
                    .iter()
                    .position(|c| !in_word(c))
                    .map_or(bytes.len(), |p| end + p);
                ranges.push((word_start, word_end, 0));
                from = end;
            }
        }
    }
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a spelling of `secret` starting at `text[i]` ends (the longest
/// one), or `None`. With `cut`, a match of at least [`MIN_SECRET`] bytes
/// running into the end of the text counts. `reach` is scratch space:
/// `reach[k]` holds the text positions reached after the first `k` bytes
/// of the secret (few, since the spellings of one character rarely
/// overlap; a numeric character reference covers a whole UTF-8 character
/// at once).
fn match_at(
    text: &[u8],
    i: usize,
    secret: &[u8],
    cut: bool,
    reach: &mut Vec<Vec<usize>>,
) -> Option<usize> {
    let n = secret.len();
    reach.resize_with(n + 1, Vec::new);
    for r in reach.iter_mut() {
        r.clear();
    }
    reach[0].push(i);
    let mut top = 0;
    let mut furthest = 0;
    for k in 0..n {
        if k > furthest {
            break;
        }
        if reach[k].is_empty() {
            continue;
        }
        top = k;
        let here = std::mem::take(&mut reach[k]);
        for &p in &here {
            spellings_at(text, p, &secret[k..], &mut |dk, dl| {
                let e = &mut reach[k + dk];
                if !e.contains(&(p + dl)) {
                    e.push(p + dl);
                }
                furthest = furthest.max(k + dk);
            });
        }
        reach[k] = here;
    }
    if let Some(end) = reach[n].iter().copied().max() {
        return Some(end);
    }
    // A secret's head where the text was cut: at the end of a text read up
    // to a cap (`cut`), or before the `…` that marks a cut anywhere (item
    // previews in detection errors).
    if top < MIN_SECRET {
        return None;
    }
    let states = &reach[top];
    let marked = states
        .iter()
        .copied()
        .filter(|&p| text[p..].starts_with("…".as_bytes()))
        .max();
    let at_end = states.iter().any(|&p| {
        p == text.len() || (text.len() - p < 10 && matches!(text[p], b'%' | b'\\' | b'&'))
    });
    marked.or((cut && at_end).then_some(text.len()))
}

/// HTML's named character references for the ASCII punctuation escapers
/// write (HTML 5 names).
const HTML_NAMED: &[(&str, u8)] = &[
    ("amp", b'&'),
    ("lt", b'<'),
    ("gt", b'>'),
    ("quot", b'"'),
    ("apos", b'\''),
    ("sol", b'/'),
    ("bsol", b'\\'),
    ("plus", b'+'),
    ("equals", b'='),
    ("num", b'#'),
    ("percnt", b'%'),
    ("colon", b':'),
    ("semi", b';'),
    ("comma", b','),
    ("period", b'.'),
    ("excl", b'!'),
    ("quest", b'?'),
    ("lpar", b'('),
    ("rpar", b')'),
    ("lsqb", b'['),
    ("rsqb", b']'),
    ("lcub", b'{'),
    ("rcub", b'}'),
    ("ast", b'*'),
    ("Hat", b'^'),
    ("grave", b'`'),
    ("lowbar", b'_'),
    ("verbar", b'|'),
    ("dollar", b'$'),
    ("commat", b'@'),
    ("nbsp", b' '),
];

/// Calls `found(secret bytes, text bytes)` for every spelling at
/// `text[p..]` of the character that begins `secret`.
fn spellings_at(text: &[u8], p: usize, secret: &[u8], found: &mut dyn FnMut(usize, usize)) {
    let rest = &text[p.min(text.len())..];
    let b = secret[0];
    let hex_at = |at: usize| -> Option<u8> {
        let h = rest.get(at..at + 2)?;
        u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
    };
    let Some(&first) = rest.first() else {
        return;
    };
    if first.eq_ignore_ascii_case(&b) {
        found(1, 1);
    }
    match first {
        b'%' => {
            // `%2F`, `%252F`, `%25252F`, …: percent-encoded up to five times.
            let mut q = 1;
            for _ in 0..5 {
                if hex_at(q) == Some(b) {
                    found(1, q + 2);
                }
                if rest.get(q..q + 2) != Some(b"25") {
                    break;
                }
                q += 2;
            }
        }
        b'+' if b == b' ' => found(1, 1),
        b'\\' => {
            if matches!(b, b'/' | b'"' | b'\\') && rest.get(1) == Some(&b) {
                found(1, 2);
            }
            if matches!(rest.get(1), Some(b'u' | b'U')) {
                let code = rest
                    .get(2..6)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u32::from_str_radix(h, 16).ok());
                if let (Some(code), Some((c, len))) = (code, first_char(secret)) {
                    if code == c as u32 {
                        found(len, 6);
                    }
                }
            }
        }
        b'&' => {
            if rest.get(1) == Some(&b'#') {
                // `&#47;`, `&#x2F;` (the `;` is optional in HTML).
                let (radix, digits_at) = match rest.get(2) {
                    Some(b'x' | b'X') => (16, 3),
                    _ => (10, 2),
                };
                let digits = rest[digits_at.min(rest.len())..]
                    .iter()
                    .take_while(|c| c.is_ascii_hexdigit() && (radix == 16 || c.is_ascii_digit()))
                    .take(8)
                    .count();
                let code = std::str::from_utf8(&rest[digits_at..digits_at + digits])
                    .ok()
                    .and_then(|d| u32::from_str_radix(d, radix).ok());
                if let (Some(code), Some((c, len))) = (code, first_char(secret)) {
                    if digits > 0 && code == c as u32 {
                        let end = digits_at + digits;
                        found(len, end + usize::from(rest.get(end) == Some(&b';')));
                    }
                }
            } else {
                for (name, c) in HTML_NAMED {
                    if *c == b
                        && rest[1..].starts_with(name.as_bytes())
                        && rest.get(1 + name.len()) == Some(&b';')
                    {
                        found(1, name.len() + 2);
                    }
                }
            }
        }
        _ => {}
    }
}

/// The first character of `secret` and its length in bytes, when it
/// begins with a whole UTF-8 character.
fn first_char(secret: &[u8]) -> Option<(char, usize)> {
    let len = match secret.first()? {
        b if *b < 0x80 => 1,
        b if *b >= 0xf0 => 4,
        b if *b >= 0xe0 => 3,
        b if *b >= 0xc0 => 2,
        _ => return None,
    };
    let c = std::str::from_utf8(secret.get(..len)?)
        .ok()?
        .chars()
        .next()?;
    Some((c, len))
}

/// What `secret` looks like inside any base64 text (standard and URL-safe
/// alphabets), for each of the three byte offsets it can start at: the
/// characters that depend on the secret's bytes only. Short secrets have
/// cores too short to tell from ordinary words, and are skipped.
fn base64_cores(secret: &[u8]) -> Vec<String> {
    const MIN_CORE: usize = 6;
    let mut out = Vec::new();
    for pad in 0..3usize {
        let mut buf = vec![0u8; pad];
        buf.extend_from_slice(secret);
        let enc = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&buf);
        // Characters 4·⌈pad/3⌉…: the padding bytes touch the first group's
        // chars only when pad > 0; the last group is partial unless the
        // length divides by 3.
        let skip = if pad == 0 { 0 } else { 4 };
        let full = buf.len() / 3 * 4;
        if full <= skip || full - skip < MIN_CORE {
            continue;
        }
        let core = &enc[skip..full];
        for c in [core.to_string(), core.replace('+', "-").replace('/', "_")] {
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{mask, mask_cut};
    use base64::Engine as _;

    #[test]
    fn secrets_are_masked_raw_and_url_encoded() {
        let s = vec!["ab/c+d=e f&g".to_string()];
        assert_eq!(mask("token ab/c+d=e f&g", &s), "token ***");
        assert_eq!(
            mask("http://x/?api_key=ab%2Fc%2Bd%3De+f%26g&x=1", &s),
            "http://x/?api_key=***&x=1"
        );
        assert_eq!(mask("p=ab%2Fc%2Bd%3De%20f%26g", &s), "p=***");
        assert_eq!(mask("no secret here", &s), "no secret here");
    }

    #[test]
    fn every_spelling_of_a_secret_is_masked() {
        let s = vec!["qkSEKRET/query+77".to_string()];
        for shown in [
            "qkSEKRET/query+77",
            "qkSEKRET%2Fquery%2B77",
            "qkSEKRET%2fquery%2b77",
            "qkSEKRET/query%2B77",
            "qkSEKRET%2Fquery+77",
            "%71kSEKRET/query+77",
            "qkSEKRET%252Fquery%252B77",
            "qkSEKRET\\/query+77",
            "qkSEKRET\\u002fquery\\u002B77",
        ] {
            assert_eq!(mask(&format!("key={shown}!"), &s), "key=***!", "{shown}");
        }
        let space = vec!["two words".to_string()];
        assert_eq!(mask("q=two+words", &space), "q=***");
        assert_eq!(mask("q=two%20words", &space), "q=***");
        assert_eq!(mask("a stranger qkSEKRET", &s), "a stranger qkSEKRET");
        // Several secrets, overlapping and at the start.
        let two = vec!["abcdef".to_string(), "cdefgh".to_string()];
        assert_eq!(mask("abcdefgh and cdefgh", &two), "*** and ***");
        // Too short to mask.
        assert_eq!(mask("ab", &["ab".to_string()]), "ab");
    }

    #[test]
    fn basic_auth_base64_of_a_secret_is_masked_in_any_alignment() {
        let s = vec!["hunter2-secret!".to_string()];
        for user in ["u", "us", "use", "someone", ""] {
            let b64 =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:hunter2-secret!"));
            assert_eq!(
                mask(&format!("got Authorization: Basic {b64}, denied"), &s),
                "got Authorization: Basic ***, denied",
                "{user}"
            );
        }
        // Secret first (a secret user name).
        let b64 = base64::engine::general_purpose::URL_SAFE.encode("hunter2-secret!:pw");
        assert_eq!(mask(&format!("[{b64}]"), &s), "[***]");
    }

    #[test]
    fn html_escaped_numeric_triple_encoded_hex_and_upper_cased_secrets_are_masked() {
        let s = vec!["tok/Xy9&q<é>\"z".to_string()];
        let secret = &s[0];
        let hex_lower: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
        let triple = secret
            .bytes()
            .map(|b| format!("%2525{b:02X}"))
            .collect::<String>();
        for shown in [
            "tok&#47;Xy9&amp;q&lt;&#233;&gt;&quot;z".to_string(),
            "tok&#x2F;Xy9&#38;q&#x3c;&#xE9;&#62;&#34z".to_string(),
            "tok&sol;Xy9&amp;q&lt;é&gt;&quot;z".to_string(),
            "TOK/XY9&Q<é>\"Z".to_string(),
            "TOK%2FXY9%26Q%3C%C3%A9%3E%22Z".to_string(),
            triple,
            "tok%25252fXy9%252526q<é>\"z".to_string(),
            "tok\\u002fXy9\\u0026q\\u003c\\u00e9>\\\"z".to_string(),
            hex_lower.clone(),
            hex_lower.to_uppercase(),
            format!("00ff{hex_lower}ab"),
        ] {
            assert_eq!(
                mask(&format!("key=[{shown}] end"), &s),
                "key=[***] end",
                "{shown}"
            );
        }
        // Ordinary text stays.
        assert_eq!(mask("a TOKEN &amp; 746f6b", &s), "a TOKEN &amp; 746f6b");
    }

    #[test]
    fn a_learned_secret_is_masked_everywhere_from_then_on() {
        let token = "at-learned-7Hq2Zx";
        assert_eq!(mask(&format!("bad {token}"), &[]), format!("bad {token}"));
        super::learn(token);
        assert_eq!(mask(&format!("bad {token}"), &[]), "bad ***");
        assert_eq!(mask("bad AT-LEARNED-7HQ2ZX!", &[]), "bad ***!");
    }

    #[test]
    fn a_secret_cut_before_an_ellipsis_is_masked() {
        let s = vec!["tok-0123456789".to_string()];
        assert_eq!(
            mask(r#"no list: {"error":"bad key tok-0123…; retry"#, &s),
            r#"no list: {"error":"bad key ***…; retry"#
        );
        let q = vec![r#"a"b\c"#.to_string()];
        assert_eq!(mask(r#"{"k":"a\"b\\c"}"#, &q), r#"{"k":"***"}"#);
    }

    #[test]
    fn a_secret_cut_by_the_end_of_the_text_is_masked() {
        let s = vec!["tok-0123456789".to_string()];
        assert_eq!(mask_cut("body: tok-0123", &s), "body: ***");
        assert_eq!(mask_cut("body: tok-0123%2", &s), "body: ***");
        assert_eq!(mask("body: tok-0123", &s), "body: tok-0123");
        // Fewer than three bytes: ordinary text.
        assert_eq!(mask_cut("body: to", &s), "body: to");
    }
}
