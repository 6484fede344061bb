//! bridge.yaml's own settings: connector files, endpoints, host quotas.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::diag::Diag;
use super::load_connector;
use crate::config::error::ConfigError;
use crate::config::raw::{RawBridge, RawEndpoint, RawHost, RawRetry, Secrets};
use crate::connector::spec::Connector;
use crate::deliver::policy::{CircuitPolicy, Endpoint};
use crate::deliver::retry::{Delays, RetryPolicy};
use crate::deliver::sign::SigningKey;
use crate::quota::HostQuota;

/// Every connector file `connectors:` names (`connectors/*.yaml` by
/// default), by connector name; a name used twice is an error.
pub(super) fn load_connectors(
    diag: &mut Diag,
    raw: &RawBridge,
) -> BTreeMap<String, Arc<Connector>> {
    let base = diag.file.parent().unwrap_or(Path::new("."));
    let patterns: Vec<(String, u64)> = if raw.connectors.is_empty() {
        vec![("connectors/*.yaml".to_string(), 0)]
    } else {
        raw.connectors
            .iter()
            .map(|s| (s.value.clone(), s.referenced.line()))
            .collect()
    };
    let mut connectors: BTreeMap<String, Arc<Connector>> = BTreeMap::new();
    for (pattern, line) in &patterns {
        let files = match expand_glob(base, pattern) {
            Ok(f) => f,
            Err(msg) => {
                diag.at(*line, 0, "connectors", msg.to_string());
                continue;
            }
        };
        if files.is_empty() && *line > 0 {
            diag.at(
                *line,
                0,
                "connectors",
                format!("`{pattern}` matches no file"),
            );
        }
        for path in files {
            match load_connector(&path) {
                Ok(c) => {
                    if let Some(other) = connectors.get(&c.name) {
                        diag.push(ConfigError::file(
                            &path,
                            format!(
                                "connector name `{}` is already used by {}",
                                c.name,
                                other.file.display()
                            ),
                        ));
                    } else {
                        connectors.insert(c.name.clone(), Arc::new(c));
                    }
                }
                Err(e) => diag.extend(e),
            }
        }
    }
    connectors
}

/// One entry of `endpoints:`; `None` when its URL is unusable. Other
/// problems are only reported: they fail the whole load anyway.
pub(super) fn resolve_endpoint(diag: &mut Diag, name: &str, ep: &RawEndpoint) -> Option<Endpoint> {
    let field = format!("endpoints.{name}");
    let url = match reqwest::Url::parse(&ep.url.value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Some(u),
        Ok(_) | Err(_) => {
            diag.at_span(
                &ep.url,
                &format!("{field}.url"),
                "expected an http:// or https:// URL",
            );
            None
        }
    };
    let keys = signing_keys(diag, &field, ep);
    let retry = ep.retry.as_ref().map(retry_policy).unwrap_or_default();
    if let Some(u) = &url {
        if let Err(msg) = check_endpoint_url(u, ep.allow_insecure, ep.allow_private) {
            diag.at_span(&ep.url, &format!("{field}.url"), msg.to_string());
        }
    }
    let circuit = ep.circuit.as_ref();
    Some(Endpoint {
        name: name.to_string(),
        url: url?,
        keys,
        timeout: ep.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(15)),
        retry,
        max_in_flight: ep.max_in_flight.unwrap_or(8).max(1) as usize,
        ordering: ep.ordering.unwrap_or_default(),
        hub_secret: ep.hub_secret.clone(),
        allow_private: ep.allow_private,
        circuit: CircuitPolicy {
            failures: circuit.and_then(|c| c.failures).unwrap_or(5).max(1),
            probe_every: circuit
                .and_then(|c| c.probe_every)
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(30)),
            disable_after: circuit.and_then(|c| c.disable_after).map(|d| d.0),
        },
    })
}

/// The endpoint's secrets (one, or several during a rotation).
fn signing_keys(diag: &mut Diag, field: &str, ep: &RawEndpoint) -> Vec<SigningKey> {
    let secrets = match &ep.secret.value {
        Secrets::One(s) => vec![s.clone()],
        Secrets::Many(v) => v.clone(),
    };
    let mut keys = Vec::new();
    for (i, s) in secrets.iter().enumerate() {
        match SigningKey::parse(s) {
            Ok(k) => keys.push(k),
            // The message never includes the secret itself.
            Err(e) => diag.at_span(
                &ep.secret,
                &format!("{field}.secret"),
                if secrets.len() > 1 {
                    format!("secret #{}: {e}", i + 1)
                } else {
                    e.to_string()
                },
            ),
        }
    }
    if secrets.is_empty() {
        diag.at(
            ep.secret.referenced.line(),
            0,
            &format!("{field}.secret"),
            "expected at least one secret",
        );
    }
    keys
}

/// `retry:`: a fixed schedule, or exponential backoff, and the attempts.
fn retry_policy(r: &RawRetry) -> RetryPolicy {
    let mut retry = RetryPolicy::default();
    if let Some(sched) = &r.schedule {
        retry.delays = Delays::Schedule(sched.iter().map(|d| d.0).collect());
        retry.max_attempts = sched.len() as u32 + 1;
    } else if r.first.is_some() || r.max.is_some() || r.backoff.is_some() {
        retry.delays = Delays::Exponential {
            first: r.first.map(|d| d.0).unwrap_or(Duration::from_secs(5)),
            max: r.max.map(|d| d.0).unwrap_or(Duration::from_secs(3600)),
        };
        retry.max_attempts = 12;
    }
    if let Some(n) = r.max_attempts {
        retry.max_attempts = n.max(1);
    }
    retry
}

/// One entry of `hosts:`.
pub(super) fn host_quota(h: &RawHost) -> HostQuota {
    HostQuota {
        rate: h.rate,
        burst: h.burst.unwrap_or(1).max(1),
        max_in_flight: h.max_in_flight,
    }
}

/// What is wrong with bridge.yaml's connector files or an endpoint's URL;
/// the messages are config errors (at the field's line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum BridgeError {
    /// A `connectors:` entry without `*` names a missing file.
    #[error("connector file `{0}` does not exist")]
    NoSuchFile(String),
    /// A `*` in a directory of a `connectors:` pattern.
    #[error("`{0}`: `*` is only supported in the file name")]
    WildcardDirectory(String),
    /// The directory of a pattern cannot be listed.
    #[error("cannot list `{dir}`: {error}")]
    Unlistable { dir: String, error: String },
    /// Plain `http://` to another host.
    #[error("`http://` to `{0}` would send events and signatures in clear text; use `https://`, or set `allow_insecure: true`")]
    ClearText(String),
    /// A private or link-local address literal.
    #[error("{0} is a private or link-local address; endpoints there are refused (SSRF guard) unless `allow_private: true`")]
    Private(std::net::IpAddr),
}

/// Transport safety of an endpoint URL: `https` unless the host is
/// loopback (or `allow_insecure`), and no private or link-local address
/// literal unless `allow_private` (names are checked when they resolve).
fn check_endpoint_url(
    url: &reqwest::Url,
    allow_insecure: bool,
    allow_private: bool,
) -> Result<(), BridgeError> {
    let host = url.host();
    let loopback = match host {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if url.scheme() == "http" && !loopback && !allow_insecure {
        return Err(BridgeError::ClearText(
            url.host_str().unwrap_or("").to_string(),
        ));
    }
    let ip: Option<std::net::IpAddr> = match host {
        Some(url::Host::Ipv4(ip)) => Some(ip.into()),
        Some(url::Host::Ipv6(ip)) => Some(ip.into()),
        _ => None,
    };
    if let Some(ip) = ip {
        if crate::deliver::guard::is_private(ip) && !allow_private {
            return Err(BridgeError::Private(ip));
        }
    }
    Ok(())
}

/// Expands `dir/*.yaml`-style patterns (a `*` in the file name only),
/// sorted, relative to `base`.
fn expand_glob(base: &Path, pattern: &str) -> Result<Vec<PathBuf>, BridgeError> {
    let path = base.join(pattern);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_string();
    if !name.contains('*') {
        return if path.is_file() {
            Ok(vec![path])
        } else {
            Err(BridgeError::NoSuchFile(path.display().to_string()))
        };
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    if dir.to_string_lossy().contains('*') {
        return Err(BridgeError::WildcardDirectory(pattern.to_string()));
    }
    let entries = std::fs::read_dir(dir).map_err(|e| BridgeError::Unlistable {
        dir: dir.display().to_string(),
        error: e.to_string(),
    })?;
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| wildcard(&name, n))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// `*` matches any run of characters.
fn wildcard(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            let Some(pos) = rest.find(part) else {
                return false;
            };
            rest = &rest[pos + part.len()..];
        }
    }
    rest.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard("*.yaml", "bank.yaml"));
        assert!(!wildcard("*.yaml", "bank.yml"));
        assert!(wildcard("bank-*.yaml", "bank-balance.yaml"));
        assert!(wildcard("exact.yaml", "exact.yaml"));
    }
}
