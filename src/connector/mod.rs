//! Connectors at run time: one poll of one instance is
//! [`fetch::fetch`] (requests, pages) then [`detect::detect`] (pure).

pub mod auth;
pub mod detect;
pub mod fetch;
pub mod format;
pub mod spec;

use base64::Engine as _;

/// Secrets shorter than this are not masked: masking `ab` everywhere would
/// mangle every message and hide nothing worth hiding.
const MIN_SECRET: usize = 3;

/// Replaces every secret value in `text` with `***`. Applied to every
/// message that leaves a poll (errors, logs, `pollhook test` output).
///
/// Why more than a plain `replace`: a secret comes back from upstreams and
/// URLs in whatever encoding they chose, not the one pollhook sent. A
/// `/` may be raw, `%2F`, `%2f` or `%252F` (double-encoded), a space `+`
/// or `%20`, a JSON echo writes `\/`, `\"` or `\u002F`, and any mix of these in
/// one value (partially encoded). So the text is matched byte by byte of
/// the secret, each byte in any of its spellings. Basic auth puts the
/// secret in base64 (`user:pass`), where its spelling depends on where it
/// starts: every alignment is looked for, and the whole base64 word that
/// holds it is masked (so the user part goes too). And a secret's head
/// right before `…` (how previews mark a cut) is masked as well.
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
    let bytes = text.as_bytes();
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for s in secrets {
        let s = s.as_bytes();
        if s.len() < MIN_SECRET {
            continue;
        }
        let mut i = 0;
        while i < bytes.len() {
            // Every spelling of the first byte starts with it, `%`, `+`
            // (a space) or `\` (a JSON escape): skip the rest quickly.
            if !matches!(bytes[i], b'%' | b'+' | b'\\') && bytes[i] != s[0] {
                i += 1;
                continue;
            }
            match match_at(bytes, i, s, cut) {
                Some(end) if end > i => {
                    ranges.push((i, end));
                    i = end;
                }
                _ => i += 1,
            }
        }
        for core in base64_cores(s) {
            let mut from = 0;
            while let Some(at) = text[from..].find(&core) {
                let (start, end) = (from + at, from + at + core.len());
                let is_b64 = |c: &u8| c.is_ascii_alphanumeric() || b"+/=-_".contains(c);
                let word_start = bytes[..start]
                    .iter()
                    .rposition(|c| !is_b64(c))
                    .map_or(0, |p| p + 1);
                let word_end = bytes[end..]
                    .iter()
                    .position(|c| !is_b64(c))
                    .map_or(bytes.len(), |p| end + p);
                ranges.push((word_start, word_end));
                from = end;
            }
        }
    }
    if ranges.is_empty() {
        return text.to_string();
    }
    ranges.sort();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end) in ranges {
        if end <= at {
            continue;
        }
        if start > at {
            out.push_str(&text[at..start]);
            out.push_str("***");
        } else if at == 0 && start == 0 {
            out.push_str("***");
        }
        at = end;
    }
    out.push_str(&text[at..]);
    out
}

/// Where a spelling of `secret` starting at `text[i]` ends (the longest
/// one), or `None`. With `cut`, a match of at least [`MIN_SECRET`] bytes
/// running into the end of the text counts.
fn match_at(text: &[u8], i: usize, secret: &[u8], cut: bool) -> Option<usize> {
    // Text positions reachable after matching the first k secret bytes;
    // few, since the spellings of one byte rarely overlap.
    let mut states = vec![i];
    for (k, &b) in secret.iter().enumerate() {
        let mut next = Vec::new();
        for &p in &states {
            for len in spellings_at(text, p, b) {
                if !next.contains(&(p + len)) {
                    next.push(p + len);
                }
            }
        }
        if next.is_empty() {
            // A secret's head where the text was cut: at the end of a text
            // read up to a cap (`cut`), or before the `…` that marks a cut
            // anywhere (item previews in detection errors).
            let marked = states
                .iter()
                .copied()
                .filter(|&p| text[p..].starts_with("…".as_bytes()))
                .max();
            let at_end = states.iter().any(|&p| {
                p == text.len() || (text.len() - p < 6 && matches!(text[p], b'%' | b'\\'))
            });
            if k < MIN_SECRET {
                return None;
            }
            return marked.or((cut && at_end).then_some(text.len()));
        }
        states = next;
    }
    states.into_iter().max()
}

/// The lengths of every spelling of byte `b` found at `text[p..]`.
fn spellings_at(text: &[u8], p: usize, b: u8) -> Vec<usize> {
    let rest = &text[p.min(text.len())..];
    let hex_is = |h: &[u8]| {
        h.len() >= 2
            && std::str::from_utf8(&h[..2])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                == Some(b)
    };
    let mut out = Vec::new();
    if rest.first() == Some(&b) {
        out.push(1);
    }
    if rest.first() == Some(&b'%') && hex_is(&rest[1..]) {
        out.push(3);
    }
    if rest.starts_with(b"%25") && hex_is(&rest[3..]) {
        out.push(5);
    }
    if b == b' ' && rest.first() == Some(&b'+') {
        out.push(1);
    }
    if matches!(b, b'/' | b'"' | b'\\') && rest.first() == Some(&b'\\') && rest.get(1) == Some(&b) {
        out.push(2);
    }
    if b.is_ascii()
        && (rest.starts_with(b"\\u00") || rest.starts_with(b"\\U00"))
        && hex_is(&rest[4..])
    {
        out.push(6);
    }
    out
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
