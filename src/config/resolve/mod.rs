//! Validation of the raw YAML into the runtime types.
//!
//! Split by what is resolved: `bridge` (connector files, endpoints, host
//! quotas), `source` (sources, `for_each`, routes), `connector` (request
//! and auth, paging and cursor, detection and emit rules, `discover`). Every
//! problem of a file goes to one `Diag`, so a load reports them all.
//!
//! The runtime types live with their users (`crate::runtime`'s `Source`
//! and `Route`, `crate::connector::spec`, `crate::deliver::policy`,
//! `crate::quota`); `Config` is here, being what the daemon is handed.

mod bridge;
mod connector;
mod diag;
mod source;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use self::diag::Diag;
use super::env::interpolate;
use super::error::{ConfigError, ConfigErrors};
use super::operator::{
    admin_auth, check_listen_auth, location_of, parse_listen, read_file, state_dir_of, AdminAuth,
};
use super::raw::{ConnectorRef, RawBridge, RawConnector};
use crate::connector::spec::Connector;
use crate::deliver::policy::Endpoint;
use crate::quota::HostQuota;

pub use crate::connector::spec::{scalar_text, Instance};
pub use crate::runtime::{Route, Source, DEFAULT_RETENTION};

/// A whole, valid configuration.
pub struct Config {
    /// The bridge file it was read from.
    pub file: PathBuf,
    /// Directory of the embedded store, and of `admin.addr` whatever the
    /// backend.
    pub state_dir: PathBuf,
    /// The store the daemon opens (`store.backend`).
    pub store: crate::store::Location,
    /// Admin server address, if any.
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token the admin server requires: `None` only when
    /// `admin.token` is absent on a loopback address or says `none`.
    pub admin_token: Option<String>,
    /// `admin.allowed_hosts`, lower case (see `crate::access`).
    pub admin_allowed_hosts: Vec<String>,
    /// What `validate` and the daemon's start warn about (`file:line:
    /// field: message`); nothing here stops the daemon.
    pub warnings: Vec<String>,
    /// How long shutdown waits for in-flight work.
    pub shutdown_timeout: Duration,
    /// Delivery attempts older than this are forgotten.
    pub history_retention: Duration,
    /// The `User-Agent` of polls (`user_agent`), when set.
    pub user_agent: Option<String>,
    /// `operations:`: where pollhook's own events go (none: nowhere).
    pub operations: crate::opsevents::OpsPolicy,
    /// PostgreSQL: how long a node's lease on an instance lasts unrenewed
    /// (`store.lease`; see `crate::cluster`).
    pub lease: Duration,
    /// Dead letters older than this are deleted (`None`: kept).
    pub dead_letter_retention: Option<Duration>,
    /// Every connector found, by name.
    pub connectors: BTreeMap<String, Arc<Connector>>,
    /// Sources in name order.
    pub sources: Vec<Arc<Source>>,
    /// Endpoints by name.
    pub endpoints: BTreeMap<String, Arc<Endpoint>>,
    /// Host quotas by `host` or `host:port`.
    pub hosts: BTreeMap<String, HostQuota>,
    /// The bridge file as written (after `${VAR}`), so a reload can tell
    /// which sources and endpoints changed (see `crate::reload`).
    pub definition: Value,
}

/// The bridge file's tree without its sources' `for_each` lists (a
/// `for_each: discover` stays): a reload compares instances one by one
/// (`crate::reload::units`), never through this tree, and kept for the
/// daemon's life a list of 100,000 accounts cost about 120 bytes an
/// instance (measured with heaptrack).
fn without_instance_lists(mut definition: Value) -> Value {
    if let Some(sources) = definition.get_mut("sources").and_then(Value::as_object_mut) {
        for source in sources.values_mut().filter_map(Value::as_object_mut) {
            if source.get("for_each").and_then(Value::as_str) != Some("discover") {
                source.remove("for_each");
            }
        }
    }
    definition
}

impl Config {
    /// How many instances the sources poll, when the configuration says
    /// (`None` when a source discovers its instances at run time).
    pub fn fleet(&self) -> Option<usize> {
        self.sources
            .iter()
            .map(|s| (!s.discovered).then_some(s.instances.len()))
            .sum()
    }

    /// Reads and validates `bridge.yaml` and every connector it names.
    /// Environment variables come from the process environment.
    pub fn load(file: &Path) -> Result<Config, ConfigErrors> {
        Self::load_with_env(file, &|name| std::env::var(name).ok())
    }

    /// [`Config::load`] with an explicit environment (tests). Errors name
    /// the `${…}` reference a value came from, never the value (a type
    /// error quoting a token given as `${BANK_TOKEN}` says `${BANK_TOKEN}`).
    pub fn load_with_env(
        file: &Path,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        Self::load_as_given(file, lookup).map_err(|mut errors| {
            if let Ok(original) = std::fs::read_to_string(file) {
                errors.scrub(&super::env::substitutions(&original, lookup));
            }
            errors
        })
    }

    fn load_as_given(
        file: &Path,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let original = read_file(file)?;
        let text = interpolate(file, &original, lookup)?;
        let raw: RawBridge = serde_saphyr::from_str(&text)
            .map_err(|e| ConfigError::from_yaml(file, &original, &e))?;
        // The same text as a plain tree: what changed on a reload is told
        // by comparing these, not the compiled runtime types.
        let definition = without_instance_lists(serde_saphyr::from_str(&text).unwrap_or_default());
        // Messages quote the text as written: `${VAR}` values stay unseen.
        let mut diag = Diag::new(file, &original);
        let connectors = bridge::load_connectors(&mut diag, &raw);
        let mut endpoints = BTreeMap::new();
        for (name, ep) in &raw.endpoints {
            if let Some(e) = bridge::resolve_endpoint(&mut diag, name, ep) {
                endpoints.insert(name.clone(), Arc::new(e));
            }
        }
        let sources = resolve_sources(&mut diag, &raw, &connectors);
        let store = store_location(&mut diag, file, &raw);
        let operations = operations(&mut diag, &raw, &endpoints);
        check_user_agent(&mut diag, &raw);
        let hosts = raw
            .hosts
            .iter()
            .map(|(name, h)| (name.clone(), bridge::host_quota(h)))
            .collect();
        let admin = raw
            .admin
            .as_ref()
            .map(|a| resolve_admin(&mut diag, file, &original, a))
            .unwrap_or_default();
        diag.finish(|| Config {
            file: file.to_path_buf(),
            state_dir: state_dir_of(file, raw.state_dir.as_deref()),
            store,
            admin_listen: admin.listen,
            admin_token: admin.token,
            admin_allowed_hosts: admin.allowed_hosts,
            warnings: admin.warnings,
            shutdown_timeout: raw
                .shutdown_timeout
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(10)),
            history_retention: raw
                .store
                .as_ref()
                .and_then(|s| s.history)
                .map_or(Duration::from_secs(7 * 86400), |d| d.0),
            dead_letter_retention: raw.store.as_ref().and_then(|s| s.dead_letters).map(|d| d.0),
            operations,
            user_agent: raw.user_agent.clone(),
            lease: raw
                .store
                .as_ref()
                .and_then(|s| s.lease.as_ref())
                .map_or(DEFAULT_LEASE, |d| d.value.0),
            connectors,
            sources,
            endpoints,
            hosts,
            definition,
        })
    }

    /// The source called `name`.
    pub fn source(&self, name: &str) -> Option<&Arc<Source>> {
        self.sources.iter().find(|s| s.name == name)
    }
}

/// `user_agent`, when set, must be something a header can carry: checked
/// at load, so a typo is not a failure of every poll.
fn check_user_agent(diag: &mut Diag, raw: &RawBridge) {
    let Some(ua) = &raw.user_agent else { return };
    if ua.trim().is_empty() || reqwest::header::HeaderValue::from_str(ua).is_err() {
        let line = diag.line_of("user_agent");
        diag.at(
            line,
            0,
            "user_agent",
            "expected a User-Agent header value: printable text on one line, such as `acme-agents/1.0 (ops@acme.example)`",
        );
    }
}

/// What the daemon takes of `admin:`.
#[derive(Default)]
struct Admin {
    listen: Option<SocketAddr>,
    token: Option<String>,
    /// `allowed_hosts`, lower case.
    allowed_hosts: Vec<String>,
    /// `token: none` on an address others can reach: allowed, but said.
    warnings: Vec<String>,
}

/// `admin:` resolved: the listen address and the token, read by the same
/// functions `pollhook status` uses (`config::operator`), checked
/// together (a listen address off loopback needs a token or `none`).
fn resolve_admin(
    diag: &mut Diag,
    file: &Path,
    original: &str,
    admin: &super::raw::RawAdmin,
) -> Admin {
    let mut out = Admin::default();
    for h in &admin.allowed_hosts {
        match crate::access::allowed_host_entry(&h.value) {
            Ok(name) => out.allowed_hosts.push(name),
            Err(e) => diag.at_span(h, "admin.allowed_hosts", e.to_string()),
        }
    }
    let auth = admin_auth(file, original, admin.token.as_ref());
    match parse_listen(file, original, &admin.listen) {
        Ok(addr) => {
            out.listen = Some(addr);
            if let Ok(auth) = &auth {
                if let Err(e) = check_listen_auth(file, original, &admin.listen, addr, auth) {
                    diag.push(e);
                }
                if *auth == AdminAuth::Disabled && !addr.ip().to_canonical().is_loopback() {
                    out.warnings.push(format!(
                        "{}:{}: admin.token: `none` on `{addr}`, which is not a loopback address: anyone who reaches it can replay, drop and export events; set a token unless something in front of it (a firewall, a proxy that authenticates) keeps everyone else out",
                        file.display(),
                        admin.token.as_ref().map_or(0, |t| t.referenced.line()),
                    ));
                }
            }
        }
        Err(e) => diag.push(e),
    }
    match auth {
        Ok(AdminAuth::Token(t)) => out.token = Some(t),
        Ok(_) => {}
        Err(e) => diag.push(e),
    }
    out
}

/// `operations:`: endpoints that exist; the defaults otherwise. The
/// window of the per-minute bound is a minute (`POLLHOOK_OPS_WINDOW`
/// shortens it, for tests).
fn operations(
    diag: &mut Diag,
    raw: &RawBridge,
    endpoints: &BTreeMap<String, Arc<Endpoint>>,
) -> crate::opsevents::OpsPolicy {
    let mut p = crate::opsevents::OpsPolicy::default();
    let Some(o) = &raw.operations else {
        return p;
    };
    if o.deliver_to.value.is_empty() {
        diag.at_span(
            &o.deliver_to,
            "operations.deliver_to",
            "expected at least one endpoint",
        );
    }
    for ep in &o.deliver_to.value {
        if !endpoints.contains_key(ep) {
            let known: Vec<&str> = endpoints.keys().map(String::as_str).collect();
            diag.at_span(
                &o.deliver_to,
                "operations.deliver_to",
                format!(
                    "no endpoint named `{ep}` (defined: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
    }
    p.deliver_to = o.deliver_to.value.clone();
    if let Some(n) = o.failing_after {
        p.failing_after = n.max(1);
    }
    if let Some(d) = o.failing_for {
        p.failing_for = d.0;
    }
    if let Some(d) = o.throttled_after {
        p.throttled_after = d.0;
    }
    if let Some(n) = o.max_per_minute {
        p.max_per_window = n;
    }
    if let Some(w) = std::env::var("POLLHOOK_OPS_WINDOW")
        .ok()
        .and_then(|w| crate::schedule::parse_duration(&w).ok())
    {
        p.window = w;
    }
    p
}

/// `store.lease` when not given.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);

/// `store:`: the embedded store in `state_dir`, or PostgreSQL, which needs
/// a `url`; `url` and `schema` under `sled` are refused (a setting that
/// does nothing is a mistake).
fn store_location(diag: &mut Diag, file: &Path, raw: &RawBridge) -> crate::store::Location {
    use super::raw::StoreBackend;
    use crate::store::valid_schema;
    let state_dir = raw.state_dir.as_deref();
    let Some(st) = &raw.store else {
        return location_of(file, state_dir, None);
    };
    match st.backend.as_ref().map(|b| b.value) {
        None | Some(StoreBackend::Sled) => {
            for (name, v) in [("url", &st.url), ("schema", &st.schema)] {
                if let Some(v) = v {
                    diag.at_span(
                        v,
                        &format!("store.{name}"),
                        "only for `backend: postgres` (the embedded store lives in `state_dir`)",
                    );
                }
            }
            if let Some(v) = &st.lease {
                diag.at_span(
                    v,
                    "store.lease",
                    "only for `backend: postgres` (one process owns an embedded store: nothing to lease)",
                );
            }
            location_of(file, state_dir, None)
        }
        Some(StoreBackend::Postgres) => {
            let schema = match &st.schema {
                Some(s) if !valid_schema(&s.value) => {
                    diag.at_span(
                        s,
                        "store.schema",
                        "a PostgreSQL schema name here is a lower-case identifier: [a-z_][a-z0-9_]*, at most 63 bytes",
                    );
                    Some(String::new())
                }
                Some(s) => Some(s.value.clone()),
                None => None,
            };
            let url = match &st.url {
                Some(u) if u.value.trim().is_empty() => {
                    diag.at_span(
                        u,
                        "store.url",
                        "empty: `backend: postgres` needs the database's URL",
                    );
                    String::new()
                }
                Some(u) => u.value.clone(),
                None => {
                    let line = diag.line_of("backend");
                    diag.at(
                        line,
                        0,
                        "store.url",
                        "`backend: postgres` needs `url: postgres://user@host:5432/database`",
                    );
                    String::new()
                }
            };
            location_of(file, state_dir, Some((url, schema)))
        }
    }
}

/// `sources:`, each with its named connector or its inline one.
fn resolve_sources(
    diag: &mut Diag,
    raw: &RawBridge,
    connectors: &BTreeMap<String, Arc<Connector>>,
) -> Vec<Arc<Source>> {
    let mut sources = Vec::new();
    for (name, src) in &raw.sources {
        let connector = match &src.connector.value {
            ConnectorRef::Name(wanted) => match connectors.get(wanted) {
                Some(c) => c.clone(),
                None => {
                    let known: Vec<&str> = connectors.keys().map(String::as_str).collect();
                    diag.at_span(
                        &src.connector,
                        &format!("sources.{name}.connector"),
                        format!(
                            "no connector named `{wanted}` (known: {})",
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    );
                    continue;
                }
            },
            // A one-off connector: validated like a file's, with locations
            // in the bridge file, named after the source.
            ConnectorRef::Inline(rc) => {
                match connector::resolve_connector(diag.file, diag.text, rc, Some(name)) {
                    Ok(c) => Arc::new(c),
                    Err(e) => {
                        diag.extend_under(&format!("sources.{name}.connector."), e);
                        continue;
                    }
                }
            }
        };
        if let Some(s) = source::resolve_source(diag, name, src, connector, &raw.endpoints) {
            sources.push(Arc::new(s));
        }
    }
    sources
}

/// Reads and validates one connector file.
pub fn load_connector(file: &Path) -> Result<Connector, ConfigErrors> {
    let text = read_file(file)?;
    let raw: RawConnector =
        serde_saphyr::from_str(&text).map_err(|e| ConfigError::from_yaml(file, &text, &e))?;
    let mut c = connector::resolve_connector(file, &text, &raw, None)?;
    c.definition = serde_saphyr::from_str(&text).unwrap_or_default();
    Ok(c)
}
