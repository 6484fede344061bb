//! Connectors at run time: one poll of one instance is
//! [`fetch::fetch`] (requests, pages) then [`detect::detect`] (pure).

pub mod detect;
pub mod fetch;
pub mod format;

/// Replaces every secret value in `text` with `***`. Applied to every
/// message that leaves a poll (errors, logs, `pollhook test` output).
pub fn mask(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if s.len() >= 3 {
            out = out.replace(s.as_str(), "***");
        }
    }
    out
}
