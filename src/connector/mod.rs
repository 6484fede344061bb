//! Connectors at run time: one poll of one instance is
//! [`fetch::fetch`] (requests, pages) then [`detect::detect`] (pure).

pub mod auth;
pub mod detect;
pub mod fetch;
pub mod format;
pub mod spec;

/// Replaces every secret value in `text` with `***`. Applied to every
/// message that leaves a poll (errors, logs, `pollhook test` output).
/// A secret also appears encoded in URLs (`a/b+c` is `a%2Fb%2Bc` in a
/// query), so its form- and percent-encoded forms are masked too.
pub fn mask(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if s.len() < 3 {
            continue;
        }
        let form: String = url::form_urlencoded::byte_serialize(s.as_bytes()).collect();
        let percent = form.replace('+', "%20");
        for variant in [s.as_str(), form.as_str(), percent.as_str()] {
            out = out.replace(variant, "***");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::mask;

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
}
