//! Validation of the raw YAML into resolved runtime types.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use serde_json_path::JsonPath;
use serde_saphyr::Spanned;

use super::env::interpolate;
use super::error::{ConfigError, ConfigErrors};
use super::raw::{self, ConnectorRef, DeliverTo, RawBridge, RawConnector, Secrets};
use crate::connector::spec::{
    Auth, Body, Connector, CursorSpec, DetectMode, Discover, EmitRule, EventType, KeyLocation,
    OAuth2, PageStyle, Paginate, Param, RequestSpec,
};
use crate::deliver::policy::{CircuitPolicy, Endpoint};
use crate::deliver::retry::{Delays, RetryPolicy};
use crate::deliver::sign::SigningKey;
use crate::quota::HostQuota;
use crate::schedule::Schedule;
use crate::template::{self, Engine, Tpl, ValueTpl};

/// A whole, valid configuration.
pub struct Config {
    /// The bridge file it was read from.
    pub file: PathBuf,
    /// Directory of the embedded store.
    pub state_dir: PathBuf,
    /// Admin server address, if any.
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token the admin server requires, if any.
    pub admin_token: Option<String>,
    /// How long shutdown waits for in-flight work.
    pub shutdown_timeout: Duration,
    /// Delivery attempts older than this are forgotten.
    pub history_retention: Duration,
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

/// A source: a connector run for someone, with its instances.
pub struct Source {
    pub name: String,
    pub connector: Arc<Connector>,
    pub schedule: Schedule,
    /// Static instances (`for_each` lists, or the one `default`); empty for
    /// `for_each: discover`, whose instances are found at run time.
    pub instances: Vec<Instance>,
    pub routes: Vec<Route>,
    /// `for_each: discover`.
    pub discovered: bool,
    /// Params' defaults with the source's `with` values: the variables of
    /// every instance before its own values.
    pub base_vars: Map<String, Value>,
    /// How long the state of an instance that left the discovered list is kept.
    pub retention: Duration,
    /// `for_each: discover`: when the list is refreshed.
    pub discover_schedule: Option<Schedule>,
}

impl Source {
    /// An instance of a `for_each: discover` source with its discovered param
    /// values (typed like the params' defaults).
    pub fn discovered_instance(&self, name: &str, with: &Map<String, Value>) -> Instance {
        let mut vars = self.base_vars.clone();
        for (k, v) in with {
            let default = self
                .connector
                .params
                .get(k)
                .and_then(|p| p.default.as_ref());
            vars.insert(k.clone(), coerce(v, default));
        }
        let secrets = secrets_of(&self.connector, &vars);
        Instance {
            key: format!("{}/{name}", self.name),
            name: name.to_string(),
            vars,
            secrets,
        }
    }
}

impl Source {
    /// A one-instance source for trying a connector file without a bridge
    /// (`pollhook test connector.yaml --with key=value`). Param values are
    /// checked like a source's `with:` and typed like their defaults; when
    /// the connector can `discover` the params still missing, the source
    /// discovers its instances.
    pub fn for_connector(
        connector: Arc<Connector>,
        with: &[(String, String)],
    ) -> Result<Source, String> {
        let file = connector.file.display().to_string();
        let mut base_vars = Map::new();
        for (k, p) in &connector.params {
            if let Some(d) = &p.default {
                base_vars.insert(k.clone(), d.clone());
            }
        }
        for (k, v) in with {
            let Some(p) = connector.params.get(k) else {
                return Err(format!(
                    "--with {k}=…: connector `{}` ({file}) declares no param `{k}`; declared: {}",
                    connector.name,
                    connector
                        .params
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            };
            base_vars.insert(
                k.clone(),
                coerce(&Value::String(v.clone()), p.default.as_ref()),
            );
        }
        let discoverable: BTreeSet<&str> = connector
            .discover
            .as_ref()
            .map(|d| d.with.iter().map(|(k, _)| k.as_str()).collect())
            .unwrap_or_default();
        let missing: Vec<&String> = connector
            .params
            .iter()
            .filter(|(k, p)| p.required && !base_vars.contains_key(*k))
            .map(|(k, _)| k)
            .collect();
        let discovered =
            !missing.is_empty() && missing.iter().all(|k| discoverable.contains(k.as_str()));
        if !missing.is_empty() && !discovered {
            return Err(format!(
                "connector `{}` ({file}) requires {}; give {}",
                connector.name,
                missing
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                missing
                    .iter()
                    .map(|k| format!("--with {k}=…"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
        let name = connector.name.clone();
        let mut source = Source {
            name: name.clone(),
            schedule: connector
                .schedule
                .clone()
                .unwrap_or_else(|| Schedule::parse("every 1m").expect("valid")),
            instances: vec![],
            routes: vec![],
            discovered,
            base_vars,
            retention: DEFAULT_RETENTION,
            discover_schedule: connector.discover.as_ref().map(|d| d.schedule.clone()),
            connector,
        };
        if !discovered {
            let inst = source.discovered_instance("default", &Map::new());
            source.instances.push(inst);
        }
        Ok(source)
    }
}

/// Values of secret params, to mask.
fn secrets_of(c: &Connector, vars: &Map<String, Value>) -> Vec<String> {
    c.params
        .iter()
        .filter(|(_, p)| p.secret)
        .filter_map(|(k, _)| vars.get(k).map(scalar_text))
        .filter(|s| !s.is_empty())
        .collect()
}

/// One source × `for_each` entry: polled on its own, with its own state.
#[derive(Debug, Clone)]
pub struct Instance {
    /// `source/instance`, the key of its state and its name in logs.
    pub key: String,
    /// The instance part (`acc-0001`, or `default` without `for_each`).
    pub name: String,
    /// Template variables: the connector's params with this instance's values.
    pub vars: Map<String, Value>,
    /// Values of secret params, to mask wherever text is shown.
    pub secrets: Vec<String>,
}

/// Which events go to one endpoint.
#[derive(Debug, Clone)]
pub struct Route {
    pub endpoint: String,
    /// `None`: every type.
    pub types: Option<BTreeSet<String>>,
}

impl Route {
    pub fn accepts(&self, kind: &str) -> bool {
        self.types.as_ref().is_none_or(|t| t.contains(kind))
    }
}

/// How long the state of an instance no longer polled is kept (a source's
/// `retention`): long enough to undo a mistaken edit or outage.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 86400);

/// Variables every request template may use besides the params.
const REQUEST_BUILTINS: &[&str] = &["cursor", "now"];

impl Config {
    /// Reads and validates `bridge.yaml` and every connector it names.
    /// Environment variables come from the process environment.
    pub fn load(file: &Path) -> Result<Config, ConfigErrors> {
        Self::load_with_env(file, &|name| std::env::var(name).ok())
    }

    /// [`Config::load`] with an explicit environment (tests).
    pub fn load_with_env(
        file: &Path,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let original = std::fs::read_to_string(file)
            .map_err(|e| ConfigError::file(file, format!("cannot read the file: {e}")))?;
        let text = interpolate(file, &original, lookup)?;
        let raw: RawBridge = serde_saphyr::from_str(&text)
            .map_err(|e| ConfigError::from_yaml(file, &original, &e))?;
        // The same text as a plain tree: what changed on a reload is told
        // by comparing these, not the compiled runtime types.
        let definition: Value = serde_saphyr::from_str(&text).unwrap_or_default();
        let base = file.parent().unwrap_or(Path::new("."));
        let mut errors = Vec::new();
        let at =
            |errors: &mut Vec<ConfigError>, line: u64, column: u64, field: &str, msg: String| {
                errors.push(ConfigError::at(file, &original, line, column, field, msg));
            };

        // Connectors.
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
                    at(&mut errors, *line, 0, "connectors", msg);
                    continue;
                }
            };
            if files.is_empty() && *line > 0 {
                at(
                    &mut errors,
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
                            errors.push(ConfigError::file(
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
                    Err(e) => errors.extend(e.0),
                }
            }
        }

        // Endpoints.
        let mut endpoints = BTreeMap::new();
        for (name, ep) in &raw.endpoints {
            let field = format!("endpoints.{name}");
            let url = match reqwest::Url::parse(&ep.url.value) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => Some(u),
                Ok(_) | Err(_) => {
                    at(
                        &mut errors,
                        ep.url.referenced.line(),
                        ep.url.referenced.column(),
                        &format!("{field}.url"),
                        "expected an http:// or https:// URL".to_string(),
                    );
                    None
                }
            };
            let secrets = match &ep.secret.value {
                Secrets::One(s) => vec![s.clone()],
                Secrets::Many(v) => v.clone(),
            };
            let mut keys = Vec::new();
            for (i, s) in secrets.iter().enumerate() {
                match SigningKey::parse(s) {
                    Ok(k) => keys.push(k),
                    // The message never includes the secret itself.
                    Err(e) => at(
                        &mut errors,
                        ep.secret.referenced.line(),
                        ep.secret.referenced.column(),
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
                at(
                    &mut errors,
                    ep.secret.referenced.line(),
                    0,
                    &format!("{field}.secret"),
                    "expected at least one secret".into(),
                );
            }
            let mut retry = RetryPolicy::default();
            if let Some(r) = &ep.retry {
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
            }
            if let Some(u) = &url {
                if let Err(msg) = check_endpoint_url(u, ep.allow_insecure, ep.allow_private) {
                    at(
                        &mut errors,
                        ep.url.referenced.line(),
                        ep.url.referenced.column(),
                        &format!("{field}.url"),
                        msg,
                    );
                }
            }
            if let Some(url) = url {
                endpoints.insert(
                    name.clone(),
                    Arc::new(Endpoint {
                        name: name.clone(),
                        url,
                        keys,
                        timeout: ep.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(15)),
                        retry,
                        max_in_flight: ep.max_in_flight.unwrap_or(8).max(1) as usize,
                        ordering: ep.ordering.unwrap_or_default(),
                        hub_secret: ep.hub_secret.clone(),
                        allow_private: ep.allow_private,
                        circuit: CircuitPolicy {
                            failures: ep
                                .circuit
                                .as_ref()
                                .and_then(|c| c.failures)
                                .unwrap_or(5)
                                .max(1),
                            probe_every: ep
                                .circuit
                                .as_ref()
                                .and_then(|c| c.probe_every)
                                .map(|d| d.0)
                                .unwrap_or(Duration::from_secs(30)),
                            disable_after: ep
                                .circuit
                                .as_ref()
                                .and_then(|c| c.disable_after)
                                .map(|d| d.0),
                        },
                    }),
                );
            }
        }

        // Sources.
        let mut sources = Vec::new();
        for (name, src) in &raw.sources {
            let field = format!("sources.{name}");
            let wanted = match &src.connector.value {
                ConnectorRef::Name(n) => n,
                ConnectorRef::Inline(rc) => {
                    // A one-off connector: validated like a file's, with
                    // locations in the bridge file, named after the source.
                    match resolve_connector(file, &original, rc, Some(name)) {
                        Ok(c) => match resolve_source(name, src, Arc::new(c), &raw.endpoints) {
                            Ok(s) => sources.push(Arc::new(s)),
                            Err(errs) => {
                                for (line, column, field, msg) in errs {
                                    at(&mut errors, line, column, &field, msg);
                                }
                            }
                        },
                        Err(e) => errors.extend(e.0.into_iter().map(|mut e| {
                            e.field = format!("{field}.connector.{}", e.field);
                            e
                        })),
                    }
                    continue;
                }
            };
            let Some(connector) = connectors.get(wanted).cloned() else {
                let known: Vec<&str> = connectors.keys().map(String::as_str).collect();
                at(
                    &mut errors,
                    src.connector.referenced.line(),
                    src.connector.referenced.column(),
                    &format!("{field}.connector"),
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
            };
            match resolve_source(name, src, connector, &raw.endpoints) {
                Ok(s) => sources.push(Arc::new(s)),
                Err(errs) => {
                    for (line, column, field, msg) in errs {
                        at(&mut errors, line, column, &field, msg);
                    }
                }
            }
        }

        let mut hosts = BTreeMap::new();
        for (name, h) in &raw.hosts {
            hosts.insert(
                name.clone(),
                HostQuota {
                    rate: h.rate,
                    burst: h.burst.unwrap_or(1).max(1),
                    max_in_flight: h.max_in_flight,
                },
            );
        }

        let admin_listen = match &raw.admin {
            None => None,
            Some(a) => match super::operator::parse_listen(file, &original, &a.listen) {
                Ok(addr) => Some(addr),
                Err(e) => {
                    errors.push(e);
                    None
                }
            },
        };

        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let state_dir = super::operator::state_dir_of(file, raw.state_dir.as_deref());
        Ok(Config {
            file: file.to_path_buf(),
            state_dir,
            admin_listen,
            admin_token: raw
                .admin
                .as_ref()
                .and_then(|a| a.token.clone())
                .filter(|t| !t.is_empty()),
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

type Problems = Vec<(u64, u64, String, String)>;

fn resolve_source(
    name: &str,
    src: &raw::RawSource,
    connector: Arc<Connector>,
    endpoints: &BTreeMap<String, raw::RawEndpoint>,
) -> Result<Source, Problems> {
    let field = format!("sources.{name}");
    let mut errs: Problems = Vec::new();
    let cfile = connector.file.display().to_string();

    // `with` values, checked against the declared params.
    let mut given: Map<String, Value> = Map::new();
    for (k, v) in &src.with {
        match connector.params.get(k) {
            None => errs.push((
                v.referenced.line(),
                v.referenced.column(),
                format!("{field}.with.{k}"),
                format!(
                    "connector `{}` ({cfile}) declares no param `{k}`; declared: {}",
                    connector.name,
                    connector
                        .params
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
            Some(p) => {
                given.insert(k.clone(), coerce(&v.value, p.default.as_ref()));
            }
        }
    }

    // for_each: one instance per combination of values.
    let mut combos: Vec<Vec<(String, Value)>> = vec![vec![]];
    let mut discovered = false;
    let empty = BTreeMap::new();
    let lists = match src.for_each.as_ref().map(|f| &f.value) {
        Some(raw::ForEach::Static(m)) => m,
        Some(raw::ForEach::Discover) => {
            discovered = true;
            if connector.discover.is_none() {
                let fe = src.for_each.as_ref().expect("matched");
                errs.push((
                    fe.referenced.line(),
                    fe.referenced.column(),
                    format!("{field}.for_each"),
                    format!(
                        "connector `{}` ({cfile}) has no `discover:` block to list instances with",
                        connector.name
                    ),
                ));
            }
            &empty
        }
        None => &empty,
    };
    if let Some(fe) = &src.for_each {
        for (k, values) in lists {
            let Some(p) = connector.params.get(k) else {
                errs.push((
                    fe.referenced.line(),
                    fe.referenced.column(),
                    format!("{field}.for_each.{k}"),
                    format!(
                        "connector `{}` ({cfile}) declares no param `{k}`",
                        connector.name
                    ),
                ));
                continue;
            };
            if values.is_empty() {
                errs.push((
                    fe.referenced.line(),
                    fe.referenced.column(),
                    format!("{field}.for_each.{k}"),
                    "expected a non-empty list".into(),
                ));
                continue;
            }
            if let Some(bad) = values
                .iter()
                .find(|v| v.is_array() || v.is_object() || v.is_null())
            {
                errs.push((
                    fe.referenced.line(),
                    fe.referenced.column(),
                    format!("{field}.for_each.{k}"),
                    format!("expected a list of scalars, found `{bad}`"),
                ));
                continue;
            }
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push((k.clone(), coerce(v, p.default.as_ref())));
                        c
                    })
                })
                .collect();
        }
    }

    let mut instances = Vec::new();
    let mut names = BTreeSet::new();
    for combo in combos {
        let mut vars = Map::new();
        for (k, p) in &connector.params {
            if let Some(d) = &p.default {
                vars.insert(k.clone(), d.clone());
            }
        }
        vars.extend(given.clone());
        let inst_name = if combo.is_empty() {
            "default".to_string()
        } else {
            combo
                .iter()
                .map(|(_, v)| scalar_text(v))
                .collect::<Vec<_>>()
                .join(",")
        };
        for (k, v) in combo {
            vars.insert(k, v);
        }
        if !names.insert(inst_name.clone()) {
            continue; // duplicates in the list: one instance
        }
        let secrets = secrets_of(&connector, &vars);
        instances.push(Instance {
            key: format!("{name}/{inst_name}"),
            name: inst_name,
            vars,
            secrets,
        });
    }
    let mut base_vars = Map::new();
    for (k, p) in &connector.params {
        if let Some(d) = &p.default {
            base_vars.insert(k.clone(), d.clone());
        }
    }
    base_vars.extend(given.clone());
    if discovered {
        instances.clear();
    }
    let discovered_keys: BTreeSet<&str> = connector
        .discover
        .as_ref()
        .filter(|_| discovered)
        .map(|d| d.with.iter().map(|(k, _)| k.as_str()).collect())
        .unwrap_or_default();
    if let Some(first) = instances
        .first()
        .map(|i| &i.vars)
        .or(discovered.then_some(&base_vars))
    {
        for (k, p) in &connector.params {
            if p.required && !first.contains_key(k) && !discovered_keys.contains(k.as_str()) {
                errs.push((
                    src.connector.referenced.line(),
                    src.connector.referenced.column(),
                    format!("{field}.with"),
                    format!(
                        "connector `{}` requires param `{k}` ({cfile}:{}); give it in `with:` or `for_each:`",
                        connector.name, p.line
                    ),
                ));
            }
        }
    }

    let schedule = match (&src.schedule, &connector.schedule) {
        (Some(s), _) => Some(s.0.clone()),
        (None, Some(s)) => Some(s.clone()),
        (None, None) => {
            errs.push((
                src.connector.referenced.line(),
                0,
                format!("{field}.schedule"),
                format!(
                    "connector `{}` has no default schedule; give `schedule:` (e.g. `every 1m`)",
                    connector.name
                ),
            ));
            None
        }
    };

    let routes: Vec<Route> = match &src.deliver_to.value {
        DeliverTo::All(v) => v
            .iter()
            .map(|e| Route {
                endpoint: e.clone(),
                types: None,
            })
            .collect(),
        DeliverTo::ByType(m) => m
            .iter()
            .map(|(e, t)| Route {
                endpoint: e.clone(),
                types: Some(t.iter().cloned().collect()),
            })
            .collect(),
    };
    if routes.is_empty() {
        errs.push((
            src.deliver_to.referenced.line(),
            src.deliver_to.referenced.column(),
            format!("{field}.deliver_to"),
            "expected at least one endpoint".into(),
        ));
    }
    let emitted: BTreeSet<&str> = connector.emit.iter().map(|e| e.kind.source()).collect();
    // A templated type (`ticket.{{ change }}`) can be anything: no check.
    let templated = connector
        .emit
        .iter()
        .any(|e| matches!(e.kind, EventType::Template(..)));
    for r in &routes {
        if !endpoints.contains_key(&r.endpoint) {
            errs.push((
                src.deliver_to.referenced.line(),
                src.deliver_to.referenced.column(),
                format!("{field}.deliver_to"),
                format!(
                    "no endpoint named `{}` (defined: {})",
                    r.endpoint,
                    if endpoints.is_empty() {
                        "none".into()
                    } else {
                        endpoints.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                ),
            ));
        }
        for t in r.types.iter().flatten() {
            if !templated && !emitted.contains(t.as_str()) {
                errs.push((
                    src.deliver_to.referenced.line(),
                    src.deliver_to.referenced.column(),
                    format!("{field}.deliver_to.{}", r.endpoint),
                    format!(
                        "connector `{}` never emits `{t}` (it emits: {})",
                        connector.name,
                        emitted.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
    }

    if !errs.is_empty() {
        return Err(errs);
    }
    let discover_schedule = src
        .discover_schedule
        .as_ref()
        .map(|s| s.0.clone())
        .or_else(|| connector.discover.as_ref().map(|d| d.schedule.clone()));
    Ok(Source {
        name: name.to_string(),
        connector,
        schedule: schedule.expect("checked above"),
        instances,
        routes,
        discover_schedule,
        discovered,
        base_vars,
        retention: src.retention.map(|d| d.0).unwrap_or(DEFAULT_RETENTION),
    })
}

/// Gives a value the type of the param's default: `"50"` from `${VAR}`
/// becomes `50` when the default is a number, `"true"` becomes `true`.
fn coerce(v: &Value, default: Option<&Value>) -> Value {
    match (v, default) {
        (Value::String(s), Some(Value::Number(_))) => s
            .parse::<serde_json::Number>()
            .map(Value::Number)
            .unwrap_or_else(|_| v.clone()),
        (Value::String(s), Some(Value::Bool(_))) => s
            .parse::<bool>()
            .map(Value::Bool)
            .unwrap_or_else(|_| v.clone()),
        _ => v.clone(),
    }
}

/// A scalar as plain text (strings without quotes).
pub fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Transport safety of an endpoint URL: `https` unless the host is
/// loopback (or `allow_insecure`), and no private or link-local address
/// literal unless `allow_private` (names are checked when they resolve).
fn check_endpoint_url(
    url: &reqwest::Url,
    allow_insecure: bool,
    allow_private: bool,
) -> Result<(), String> {
    let host = url.host();
    let loopback = match host {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if url.scheme() == "http" && !loopback && !allow_insecure {
        return Err(format!(
            "`http://` to `{}` would send events and signatures in clear text; use `https://`, or set `allow_insecure: true`",
            url.host_str().unwrap_or("")
        ));
    }
    let ip: Option<std::net::IpAddr> = match host {
        Some(url::Host::Ipv4(ip)) => Some(ip.into()),
        Some(url::Host::Ipv6(ip)) => Some(ip.into()),
        _ => None,
    };
    if let Some(ip) = ip {
        if crate::deliver::guard::is_private(ip) && !allow_private {
            return Err(format!(
                "{ip} is a private or link-local address; endpoints there are refused (SSRF guard) unless `allow_private: true`"
            ));
        }
    }
    Ok(())
}

/// Reads and validates one connector file.
pub fn load_connector(file: &Path) -> Result<Connector, ConfigErrors> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| ConfigError::file(file, format!("cannot read the file: {e}")))?;
    let raw: RawConnector =
        serde_saphyr::from_str(&text).map_err(|e| ConfigError::from_yaml(file, &text, &e))?;
    let mut c = resolve_connector(file, &text, &raw, None)?;
    c.definition = serde_saphyr::from_str(&text).unwrap_or_default();
    Ok(c)
}

/// Validates a connector. `inline_name` is the source's name for a connector
/// written inline in bridge.yaml (`text` is then the bridge file's).
fn resolve_connector(
    file: &Path,
    text: &str,
    raw: &RawConnector,
    inline_name: Option<&str>,
) -> Result<Connector, ConfigErrors> {
    let mut errors = Vec::new();
    let name = match (&raw.name, inline_name) {
        (Some(n), _) => n.value.clone(),
        (None, Some(n)) => n.to_string(),
        (None, None) => {
            errors.push(ConfigError::at(
                file,
                text,
                1,
                0,
                "name",
                "a connector file needs `name:` (what sources refer to)",
            ));
            String::new()
        }
    };
    let mut engine = Engine::new();
    let params: BTreeMap<String, Param> = raw
        .params
        .iter()
        .map(|(k, p)| {
            let line = text
                .lines()
                .position(|l| l.trim_start().starts_with(&format!("{k}:")))
                .map(|i| i as u64 + 1)
                .unwrap_or(0);
            (
                k.clone(),
                Param {
                    required: p.required,
                    secret: p.secret,
                    default: p.default.clone(),
                    line,
                },
            )
        })
        .collect();
    let param_names: BTreeSet<String> = params.keys().cloned().collect();
    let detect = raw.detect.value;

    // Compiles a template after checking that it only uses known variables.
    let compile = |engine: &mut Engine,
                   src: &Spanned<raw::TemplateSrc>,
                   field: &str,
                   extra: &[&str],
                   errors: &mut Vec<ConfigError>|
     -> Option<Tpl> {
        check_vars(
            file,
            text,
            &template::variables_of_template(&src.value.0),
            &param_names,
            extra,
            src,
            field,
            errors,
        );
        match engine.template(&src.value.0) {
            Ok(t) => Some(t),
            Err(e) => {
                errors.push(ConfigError::at(
                    file,
                    text,
                    src.referenced.line(),
                    src.referenced.column(),
                    field,
                    e,
                ));
                None
            }
        }
    };

    // Finds the line of a `key:` for fields that carry no location of their own.
    let line_of = |key: &str| -> u64 {
        text.lines()
            .position(|l| l.trim_start().starts_with(&format!("{key}:")))
            .map(|i| i as u64 + 1)
            .unwrap_or(0)
    };
    let compile_plain = |engine: &mut Engine,
                         src: &raw::TemplateSrc,
                         key: &str,
                         field: &str,
                         extra: &[&str],
                         errors: &mut Vec<ConfigError>|
     -> Option<Tpl> {
        let line = line_of(key);
        check_vars_at(
            file,
            text,
            &template::variables_of_template(&src.0),
            &param_names,
            extra,
            (line, 0),
            field,
            errors,
        );
        match engine.template(&src.0) {
            Ok(t) => Some(t),
            Err(e) => {
                errors.push(ConfigError::at(file, text, line, 0, field, e));
                None
            }
        }
    };

    let req = &raw.request;
    let url = compile(
        &mut engine,
        &req.url,
        "request.url",
        REQUEST_BUILTINS,
        &mut errors,
    );
    let mut query = Vec::new();
    for (k, v) in &req.query {
        if let Some(t) = compile(
            &mut engine,
            v,
            &format!("request.query.{k}"),
            REQUEST_BUILTINS,
            &mut errors,
        ) {
            query.push((k.clone(), t));
        }
    }
    let mut headers = Vec::new();
    for (k, v) in &req.headers {
        if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
            errors.push(ConfigError::at(
                file,
                text,
                v.referenced.line(),
                0,
                &format!("request.headers.{k}"),
                format!("`{k}` is not a valid header name"),
            ));
            continue;
        }
        if let Some(t) = compile(
            &mut engine,
            v,
            &format!("request.headers.{k}"),
            REQUEST_BUILTINS,
            &mut errors,
        ) {
            headers.push((k.clone(), t));
        }
    }
    let bodies = [
        req.body.as_ref().map(|b| b.referenced.line()),
        req.json.as_ref().map(|b| b.referenced.line()),
        req.form.as_ref().map(|b| b.referenced.line()),
    ];
    if bodies.iter().flatten().count() > 1 {
        errors.push(ConfigError::at(
            file,
            text,
            bodies.iter().flatten().copied().max().unwrap_or(0),
            0,
            "request",
            "give at most one of `body` (raw text), `json` and `form`",
        ));
    }
    let body = if let Some(b) = &req.body {
        compile(
            &mut engine,
            b,
            "request.body",
            REQUEST_BUILTINS,
            &mut errors,
        )
        .map(Body::Raw)
    } else if let Some(j) = &req.json {
        check_vars(
            file,
            text,
            &template::variables_of_value(&j.value.0),
            &param_names,
            REQUEST_BUILTINS,
            j,
            "request.json",
            &mut errors,
        );
        match engine.value_template(&j.value.0) {
            Ok(t) => Some(Body::Json(t)),
            Err(e) => {
                errors.push(ConfigError::at(
                    file,
                    text,
                    j.referenced.line(),
                    j.referenced.column(),
                    "request.json",
                    e,
                ));
                None
            }
        }
    } else if let Some(f) = &req.form {
        let mut fields = Vec::new();
        for (k, v) in &f.value {
            if let Some(t) = compile_plain(
                &mut engine,
                v,
                k,
                &format!("request.form.{k}"),
                REQUEST_BUILTINS,
                &mut errors,
            ) {
                fields.push((k.clone(), t));
            }
        }
        Some(Body::Form(fields))
    } else {
        None
    };
    let method = match &req.method {
        None => reqwest::Method::GET,
        Some(m) => match reqwest::Method::from_bytes(m.value.to_ascii_uppercase().as_bytes()) {
            Ok(m) => m,
            Err(_) => {
                errors.push(ConfigError::at(
                    file,
                    text,
                    m.referenced.line(),
                    m.referenced.column(),
                    "request.method",
                    format!("`{}` is not an HTTP method", m.value),
                ));
                reqwest::Method::GET
            }
        },
    };
    let cp =
        |engine: &mut Engine, t: &raw::TemplateSrc, key: &str, errors: &mut Vec<ConfigError>| {
            compile_plain(
                engine,
                t,
                key,
                &format!("request.auth.{key}"),
                REQUEST_BUILTINS,
                errors,
            )
        };
    let auth_at = req
        .auth
        .as_ref()
        .map_or((0, 0), |a| (a.referenced.line(), a.referenced.column()));
    let auth = match req.auth.as_ref().map(|a| &a.value) {
        None => None,
        Some(raw::RawAuth::Bearer { token }) => {
            cp(&mut engine, token, "token", &mut errors).map(Auth::Bearer)
        }
        Some(raw::RawAuth::Basic { username, password }) => {
            let u = cp(&mut engine, username, "username", &mut errors);
            let p = password
                .as_ref()
                .and_then(|p| cp(&mut engine, p, "password", &mut errors));
            u.map(|u| Auth::Basic(u, p))
        }
        Some(raw::RawAuth::ApiKey {
            location,
            name,
            value,
        }) => {
            if *location == KeyLocation::Header
                && reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
            {
                // The auth block's own `name:`, not the file's first one
                // (the connector's name).
                let (line, column) = super::error::key_in_node(text, auth_at.0, auth_at.1, "name")
                    .unwrap_or(auth_at);
                errors.push(ConfigError::at(
                    file,
                    text,
                    line,
                    column,
                    "request.auth.name",
                    format!("`{name}` is not a valid header name"),
                ));
            }
            cp(&mut engine, value, "value", &mut errors).map(|value| Auth::ApiKey {
                location: *location,
                name: name.clone(),
                value,
            })
        }
        Some(raw::RawAuth::Oauth2 {
            token_url,
            client_id,
            client_secret,
            scope,
            params: extra,
            client_auth,
        }) => {
            let token_url = cp(&mut engine, token_url, "token_url", &mut errors);
            let client_id = cp(&mut engine, client_id, "client_id", &mut errors);
            let client_secret = cp(&mut engine, client_secret, "client_secret", &mut errors);
            let scope = scope
                .as_ref()
                .and_then(|s| cp(&mut engine, s, "scope", &mut errors));
            let mut ps = Vec::new();
            for (k, v) in extra {
                if let Some(t) = cp(&mut engine, v, k, &mut errors) {
                    ps.push((k.clone(), t));
                }
            }
            match (token_url, client_id, client_secret) {
                (Some(token_url), Some(client_id), Some(client_secret)) => {
                    Some(Auth::OAuth2(OAuth2 {
                        token_url,
                        client_id,
                        client_secret,
                        scope,
                        params: ps,
                        client_auth: *client_auth,
                    }))
                }
                _ => None,
            }
        }
    };

    let item_vars: &[&str] = &["item", "cursor", "now"];
    let id = raw
        .id
        .as_ref()
        .and_then(|t| compile(&mut engine, t, "id", item_vars, &mut errors));
    let version = raw
        .version
        .as_ref()
        .and_then(|t| compile(&mut engine, t, "version", item_vars, &mut errors));
    let mut lookback = None;
    let cursor = match &raw.cursor {
        None => None,
        Some(c) => {
            lookback = c.lookback.map(|d| d.0);
            match (&c.from, &c.max) {
                (Some(p), None) => Some(CursorSpec::From(
                    JsonPath::parse(&p.value.0).expect("checked at parse"),
                )),
                (None, Some(t)) => compile(&mut engine, t, "cursor.max", item_vars, &mut errors)
                    .map(CursorSpec::Max),
                _ => {
                    errors.push(ConfigError::at(file, text, line_of("cursor"), 0, "cursor", "give exactly one of `from` (a JSONPath to an opaque cursor) and `max` (a template over items)"));
                    None
                }
            }
        }
    };
    let items = raw
        .items
        .as_ref()
        .map(|p| JsonPath::parse(&p.value.0).expect("checked at parse"));
    let watch = raw
        .watch
        .as_ref()
        .map(|p| JsonPath::parse(&p.value.0).expect("checked at parse"));
    let paginate = match &raw.paginate {
        None => None,
        Some(p) => {
            let line = line_of("paginate");
            let mut styles = Vec::new();
            match (&p.cursor_from, &p.param) {
                (Some(from), Some(param)) => styles.push(PageStyle::Cursor {
                    from: JsonPath::parse(&from.value.0).expect("checked at parse"),
                    param: param.clone(),
                }),
                (None, None) => {}
                _ => errors.push(ConfigError::at(
                    file,
                    text,
                    line,
                    0,
                    "paginate",
                    "the cursor style needs both `cursor_from` (JSONPath of the next cursor) and `param` (the query parameter that carries it)",
                )),
            }
            if let Some(n) = &p.next_url {
                styles.push(PageStyle::NextUrl(
                    JsonPath::parse(&n.value.0).expect("checked at parse"),
                ));
            }
            if p.link_header == Some(true) {
                styles.push(PageStyle::Link);
            }
            if let Some(pg) = &p.page {
                styles.push(PageStyle::Page {
                    param: pg.param.clone(),
                    start: pg.start.unwrap_or(1),
                    size: pg.size.map(|n| (pg.size_param.clone(), n.max(1))),
                });
            }
            if let Some(o) = &p.offset {
                styles.push(PageStyle::Offset {
                    param: o.param.clone(),
                    limit_param: o.limit_param.clone(),
                    limit: o.limit.max(1),
                });
            }
            let stop_when = p.stop_when.as_ref().and_then(|w| {
                check_vars(
                    file,
                    text,
                    &template::variables_of_condition(&w.value.0),
                    &param_names,
                    &["page", "count", "now"],
                    w,
                    "paginate.stop_when",
                    &mut errors,
                );
                engine.condition(&w.value.0).ok()
            });
            if styles.len() != 1 {
                errors.push(ConfigError::at(
                    file,
                    text,
                    line,
                    0,
                    "paginate",
                    format!(
                        "expected exactly one paging style (`cursor_from` + `param`, `next_url`, `link_header: true`, `page`, `offset`), found {}",
                        styles.len()
                    ),
                ));
                None
            } else {
                Some(Paginate {
                    style: styles.pop().expect("one"),
                    stop_when,
                    max_pages: p.max_pages.unwrap_or(100).max(1),
                    allow_hosts: p
                        .allow_hosts
                        .iter()
                        .map(|h| h.to_ascii_lowercase())
                        .collect(),
                })
            }
        }
    };
    if matches!(
        paginate.as_ref().map(|p| &p.style),
        Some(PageStyle::Page { .. } | PageStyle::Offset { .. })
    ) && items.is_none()
    {
        errors.push(ConfigError::at(
            file,
            text,
            line_of("paginate"),
            0,
            "paginate",
            "`page` and `offset` paging need `items:` to see when a page is empty",
        ));
    }

    let detect_line = raw.detect.referenced.line();
    let mode_err = |errors: &mut Vec<ConfigError>, msg: &str| {
        errors.push(ConfigError::at(
            file,
            text,
            detect_line,
            raw.detect.referenced.column(),
            "detect",
            msg.to_string(),
        ));
    };
    match detect {
        DetectMode::New | DetectMode::Changes => {
            if items.is_none() {
                mode_err(&mut errors, "`detect: new` and `detect: changes` need `items:` (a JSONPath to the list, e.g. `$.transactions[*]`)");
            }
            if raw.id.is_none() {
                mode_err(&mut errors, "`detect: new` and `detect: changes` need `id:` (a template naming what makes an item unique, e.g. `{{ item.id }}`)");
            }
            if raw.watch.is_some() {
                mode_err(&mut errors, "`watch` belongs to `detect: snapshot`");
            }
            if detect == DetectMode::New && raw.version.is_some() {
                mode_err(
                    &mut errors,
                    "`version` belongs to `detect: changes` (`detect: new` emits each id once)",
                );
            }
        }
        DetectMode::Snapshot => {
            if raw.items.is_some()
                || raw.id.is_some()
                || raw.cursor.is_some()
                || raw.paginate.is_some()
                || raw.version.is_some()
            {
                mode_err(&mut errors, "`detect: snapshot` watches one resource: `items`, `id`, `version`, `cursor` and `paginate` belong to `detect: new` / `changes`");
            }
        }
    }

    let when_vars: &[&str] = match detect {
        DetectMode::New => &["item", "cursor", "now"],
        DetectMode::Changes => &["item", "previous", "change", "changed", "cursor", "now"],
        DetectMode::Snapshot => &["previous", "current", "resource", "now"],
    };
    let mut emit = Vec::new();
    if raw.emit.is_empty() {
        mode_err(
            &mut errors,
            "`emit:` is empty: give at least one `- type: …` rule",
        );
    }
    for (i, e) in raw.emit.iter().enumerate() {
        let when = match &e.when {
            None => None,
            Some(w) => {
                check_vars(
                    file,
                    text,
                    &template::variables_of_condition(&w.value.0),
                    &param_names,
                    when_vars,
                    w,
                    &format!("emit[{i}].when"),
                    &mut errors,
                );
                match engine.condition(&w.value.0) {
                    Ok(c) => Some(c),
                    Err(msg) => {
                        errors.push(ConfigError::at(
                            file,
                            text,
                            w.referenced.line(),
                            w.referenced.column(),
                            &format!("emit[{i}].when"),
                            msg,
                        ));
                        None
                    }
                }
            }
        };
        let data = match &e.data {
            None => None,
            Some(d) => {
                check_vars(
                    file,
                    text,
                    &template::variables_of_value(&d.value.0),
                    &param_names,
                    when_vars,
                    d,
                    &format!("emit[{i}].data"),
                    &mut errors,
                );
                engine.value_template(&d.value.0).ok()
            }
        };
        let src = e.kind.value.trim().to_string();
        let kind = if src.contains("{{") || src.contains("{%") {
            let spanned = Spanned {
                value: raw::TemplateSrc(src.clone()),
                referenced: e.kind.referenced,
                defined: e.kind.defined,
            };
            compile(
                &mut engine,
                &spanned,
                &format!("emit[{i}].type"),
                when_vars,
                &mut errors,
            )
            .map(|t| EventType::Template(t, src.clone()))
        } else if src.is_empty() || src.contains(char::is_whitespace) {
            errors.push(ConfigError::at(
                file,
                text,
                e.kind.referenced.line(),
                e.kind.referenced.column(),
                &format!("emit[{i}].type"),
                "expected an event type such as `bank.balance.changed` (no spaces)",
            ));
            None
        } else {
            Some(EventType::Fixed(src))
        };
        if let Some(kind) = kind {
            emit.push(EmitRule { kind, when, data });
        }
    }

    let discover = match &raw.discover {
        None => None,
        Some(d) => resolve_discover(file, text, raw, d, &name, &param_names, &mut errors),
    };

    let id_value = raw.id.as_ref().and_then(|t| {
        match engine.value_template(&Value::String(t.value.0.clone())) {
            Ok(v @ ValueTpl::Native(_)) => Some(v),
            _ => None,
        }
    });

    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Connector {
        discover,
        definition: Value::Null,
        name,
        file: file.to_path_buf(),
        engine,
        params,
        schedule: raw.schedule.as_ref().map(|s| s.0.clone()),
        rate_limit: raw.rate_limit,
        request: RequestSpec {
            method,
            url: url.expect("no errors"),
            query,
            headers,
            body,
            auth,
            timeout: req.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(30)),
            max_response_bytes: req.max_response_bytes.unwrap_or(10 * 1024 * 1024),
        },
        format: raw
            .response
            .as_ref()
            .and_then(|r| r.format)
            .unwrap_or_default(),
        paginate,
        items_parent: raw
            .items
            .as_ref()
            .and_then(|p| p.value.0.trim().strip_suffix("[*]").map(str::to_string))
            .and_then(|p| JsonPath::parse(&p).ok()),
        items,
        id_value,
        id,
        version,
        watch,
        cursor,
        lookback,
        detect,
        baseline: raw.baseline.unwrap_or_default(),
        seen_limit: raw.seen_limit.unwrap_or(10_000).max(1),
        seen_ttl: raw.seen_ttl.map(|d| d.0),
        emit,
    })
}

/// Resolves `discover:` as a listing connector of its own (see [`Discover`]).
fn resolve_discover(
    file: &Path,
    text: &str,
    raw: &RawConnector,
    d: &raw::RawDiscover,
    name: &str,
    param_names: &BTreeSet<String>,
    errors: &mut Vec<ConfigError>,
) -> Option<Discover> {
    let lister_raw = RawConnector {
        name: Some(Spanned {
            value: format!("{name}/discover"),
            referenced: d.name.referenced,
            defined: d.name.defined,
        }),
        description: None,
        params: raw.params.clone(),
        schedule: None,
        rate_limit: raw.rate_limit,
        request: d.request.clone(),
        discover: None,
        response: d.response.clone(),
        paginate: d.paginate.clone(),
        items: Some(d.items.clone()),
        id: Some(d.name.clone()),
        version: None,
        watch: None,
        cursor: None,
        detect: Spanned {
            value: DetectMode::New,
            referenced: d.items.referenced,
            defined: d.items.defined,
        },
        baseline: None,
        seen_limit: None,
        seen_ttl: None,
        emit: vec![raw::RawEmit {
            kind: Spanned {
                value: "discovered".into(),
                referenced: d.name.referenced,
                defined: d.name.defined,
            },
            when: None,
            data: None,
        }],
    };
    let mut lister = match resolve_connector(file, text, &lister_raw, Some(name)) {
        Ok(c) => c,
        Err(e) => {
            errors.extend(e.0.into_iter().map(|mut e| {
                e.field = format!("discover.{}", e.field);
                e
            }));
            return None;
        }
    };
    let mut with = Vec::new();
    for (k, t) in &d.with {
        let field = format!("discover.with.{k}");
        if !param_names.contains(k) {
            errors.push(ConfigError::at(
                file,
                text,
                t.referenced.line(),
                t.referenced.column(),
                &field,
                format!(
                    "no param `{k}` is declared; declared: {}",
                    param_names.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
            continue;
        }
        check_vars(
            file,
            text,
            &template::variables_of_template(&t.value.0),
            param_names,
            &["item", "now"],
            t,
            &field,
            errors,
        );
        match lister.engine.template(&t.value.0) {
            Ok(tpl) => with.push((k.clone(), tpl)),
            Err(e) => errors.push(ConfigError::at(
                file,
                text,
                t.referenced.line(),
                t.referenced.column(),
                &field,
                e,
            )),
        }
    }
    Some(Discover {
        lister: Box::new(lister),
        with,
        schedule: d
            .schedule
            .as_ref()
            .map(|s| s.0.clone())
            .unwrap_or_else(|| Schedule::parse("every 10m").expect("valid")),
    })
}

/// Reports template variables that are neither params nor builtins: a typo
/// in a template must fail at load, not render as an error at 3 a.m.
#[allow(clippy::too_many_arguments)]
fn check_vars<T>(
    file: &Path,
    text: &str,
    used: &BTreeSet<String>,
    params: &BTreeSet<String>,
    builtins: &[&str],
    at: &Spanned<T>,
    field: &str,
    errors: &mut Vec<ConfigError>,
) {
    let location = (at.referenced.line(), at.referenced.column());
    check_vars_at(file, text, used, params, builtins, location, field, errors);
}

/// [`check_vars`] for a value without a span of its own (`line`, `column`).
#[allow(clippy::too_many_arguments)]
fn check_vars_at(
    file: &Path,
    text: &str,
    used: &BTreeSet<String>,
    params: &BTreeSet<String>,
    builtins: &[&str],
    (line, column): (u64, u64),
    field: &str,
    errors: &mut Vec<ConfigError>,
) {
    for v in used {
        if !params.contains(v) && !builtins.contains(&v.as_str()) {
            let mut known: Vec<String> = params.iter().cloned().collect();
            known.extend(builtins.iter().map(|s| s.to_string()));
            errors.push(ConfigError::at(
                file,
                text,
                line,
                column,
                field,
                format!(
                    "unknown variable `{v}`; expected a declared param or one of: {}",
                    known.join(", ")
                ),
            ));
        }
    }
}

/// Expands `dir/*.yaml`-style patterns (a `*` in the file name only),
/// sorted, relative to `base`.
fn expand_glob(base: &Path, pattern: &str) -> Result<Vec<PathBuf>, String> {
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
            Err(format!(
                "connector file `{}` does not exist",
                path.display()
            ))
        };
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    if dir.to_string_lossy().contains('*') {
        return Err(format!(
            "`{pattern}`: `*` is only supported in the file name"
        ));
    }
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list `{}`: {e}", dir.display()))?;
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

    #[test]
    fn coercion_follows_the_default_type() {
        assert_eq!(
            coerce(&Value::from("50"), Some(&Value::from(100))),
            Value::from(50)
        );
        assert_eq!(
            coerce(&Value::from("x"), Some(&Value::from(100))),
            Value::from("x")
        );
        assert_eq!(
            coerce(&Value::from("true"), Some(&Value::from(false))),
            Value::from(true)
        );
    }
}
