//! Sources: a connector run for someone, fanned out into instances, and
//! routed to endpoints. The types are what the daemon schedules; the
//! functions below resolve `sources:` of bridge.yaml into them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::diag::Diag;
use crate::config::raw::{self, DeliverTo, RawSource};
use crate::connector::spec::{scalar_text, Auth, Connector, EventType, Instance};
use crate::quota::Rate;
use crate::runtime::{coerce, Route, Source, DEFAULT_RETENTION};
use crate::schedule::Schedule;
use crate::template::Tpl;

/// Why `pollhook test connector.yaml --with …` cannot make a source of
/// the connector; printed as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForConnectorError {
    /// `--with` a param the connector does not declare.
    #[error("--with {param}=…: connector `{connector}` ({file}) declares no param `{param}`; declared: {declared}")]
    UnknownParam {
        param: String,
        connector: String,
        file: String,
        declared: String,
    },
    /// Required params neither given nor discoverable.
    #[error(
        "connector `{connector}` ({file}) requires {}; give {}",
        quoted(missing),
        flags(missing)
    )]
    Missing {
        connector: String,
        file: String,
        missing: Vec<String>,
    },
}

/// `` `a`, `b` ``. Pure.
fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `--with a=… --with b=…`. Pure.
fn flags(names: &[String]) -> String {
    names
        .iter()
        .map(|k| format!("--with {k}=…"))
        .collect::<Vec<_>>()
        .join(" ")
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
    ) -> Result<Source, ForConnectorError> {
        let file = connector.file.display().to_string();
        let mut base_vars = Map::new();
        for (k, p) in &connector.params {
            if let Some(d) = &p.default {
                base_vars.insert(k.clone(), d.clone());
            }
        }
        for (k, v) in with {
            let Some(p) = connector.params.get(k) else {
                return Err(ForConnectorError::UnknownParam {
                    param: k.clone(),
                    connector: connector.name.clone(),
                    file,
                    declared: connector
                        .params
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                });
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
            return Err(ForConnectorError::Missing {
                connector: connector.name.clone(),
                file,
                missing: missing.into_iter().cloned().collect(),
            });
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
            base_vars: Arc::new(base_vars),
            retention: DEFAULT_RETENTION,
            discover_schedule: connector.discover.as_ref().map(|d| d.schedule.clone()),
            connector,
        };
        if !discovered {
            let inst = source.discovered_instance("default", &Map::new());
            source.instances.push(Arc::new(inst));
        }
        Ok(source)
    }
}

/// Resolves one entry of `sources:` against its connector; `None` when it
/// has errors (reported at the source's lines of bridge.yaml).
pub(super) fn resolve_source(
    diag: &mut Diag,
    name: &str,
    src: &RawSource,
    connector: Arc<Connector>,
    endpoints: &BTreeMap<String, raw::RawEndpoint>,
) -> Option<Source> {
    let field = format!("sources.{name}");
    let mark = diag.mark();
    let given = given_values(diag, &field, src, &connector);
    let discovered = matches!(
        src.for_each.as_ref().map(|f| &f.value),
        Some(raw::ForEach::Discover)
    );
    if discovered && connector.discover.is_none() {
        let fe = src.for_each.as_ref().expect("matched");
        diag.at_span(
            fe,
            &format!("{field}.for_each"),
            format!(
                "connector `{}` ({}) has no `discover:` block to list instances with",
                connector.name,
                connector.file.display()
            ),
        );
    }
    let combos = for_each_combinations(diag, &field, src, &connector);
    let mut base_vars = defaults(&connector);
    base_vars.extend(given.clone());
    let base_vars = Arc::new(base_vars);
    let instances = if discovered {
        vec![]
    } else {
        instances_of(name, &connector, &base_vars, combos)
    };
    check_required(
        diag, &field, src, &connector, &instances, discovered, &base_vars,
    );
    check_bearer(diag, &field, src, &connector, &instances);
    let schedule = schedule_of(diag, &field, src, &connector);
    let routes = routes_of(diag, &field, src, &connector, endpoints);
    if diag.failed_since(mark) {
        return None;
    }
    let discover_schedule = src
        .discover_schedule
        .as_ref()
        .map(|s| s.0.clone())
        .or_else(|| connector.discover.as_ref().map(|d| d.schedule.clone()));
    Some(Source {
        name: name.to_string(),
        connector: with_rate_limit(connector, src.rate_limit),
        schedule: schedule.expect("checked above"),
        // Not `into_iter().map(Arc::new).collect()`: that collects in
        // place, keeping the buffer of the `Instance`s (12 times the size
        // of the `Arc`s it then holds: about 150 bytes per instance for
        // the daemon's life, measured with heaptrack).
        instances: {
            let mut shared = Vec::with_capacity(instances.len());
            shared.extend(instances.into_iter().map(Arc::new));
            shared
        },
        routes,
        discover_schedule,
        discovered,
        base_vars,
        retention: src.retention.map(|d| d.0).unwrap_or(DEFAULT_RETENTION),
    })
}

/// The connector with the source's `rate_limit` in place of its own, when
/// the source sets one. The poller and the supervisor read the limit from
/// the connector, so the source gets a connector of its own (the engine's
/// compiled templates are shared, cheap to clone); without an override the
/// file's connector is shared as is.
fn with_rate_limit(connector: Arc<Connector>, rate: Option<Rate>) -> Arc<Connector> {
    match rate {
        Some(rate) if connector.rate_limit != Some(rate) => {
            let mut own = (*connector).clone();
            own.rate_limit = Some(rate);
            Arc::new(own)
        }
        _ => connector,
    }
}

/// The params' defaults.
fn defaults(connector: &Connector) -> Map<String, Value> {
    let mut vars = Map::new();
    for (k, p) in &connector.params {
        if let Some(d) = &p.default {
            vars.insert(k.clone(), d.clone());
        }
    }
    vars
}

/// `with` values, checked against the declared params and typed like
/// their defaults.
fn given_values(
    diag: &mut Diag,
    field: &str,
    src: &RawSource,
    connector: &Connector,
) -> Map<String, Value> {
    let mut given = Map::new();
    for (k, v) in &src.with {
        match connector.params.get(k) {
            None => diag.at_span(
                v,
                &format!("{field}.with.{k}"),
                format!(
                    "connector `{}` ({}) declares no param `{k}`; declared: {}",
                    connector.name,
                    connector.file.display(),
                    connector
                        .params
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Some(p) => {
                given.insert(k.clone(), coerce(&v.value, p.default.as_ref()));
            }
        }
    }
    given
}

/// `for_each` lists: one combination of param values per instance (the
/// cartesian product of the lists); one empty combination without lists.
fn for_each_combinations(
    diag: &mut Diag,
    field: &str,
    src: &RawSource,
    connector: &Connector,
) -> Vec<Vec<(String, Value)>> {
    let mut combos: Vec<Vec<(String, Value)>> = vec![vec![]];
    let Some(fe) = &src.for_each else {
        return combos;
    };
    let raw::ForEach::Static(lists) = &fe.value else {
        return combos;
    };
    for (k, values) in lists {
        let key_field = format!("{field}.for_each.{k}");
        let Some(p) = connector.params.get(k) else {
            diag.at_span(
                fe,
                &key_field,
                format!(
                    "connector `{}` ({}) declares no param `{k}`",
                    connector.name,
                    connector.file.display()
                ),
            );
            continue;
        };
        if values.is_empty() {
            diag.at_span(fe, &key_field, "expected a non-empty list");
            continue;
        }
        if let Some(bad) = values
            .iter()
            .find(|v| v.is_array() || v.is_object() || v.is_null())
        {
            diag.at_span(
                fe,
                &key_field,
                format!("expected a list of scalars, found `{bad}`"),
            );
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
    combos
}

/// One instance per combination, named after its values (`default`
/// without `for_each`); duplicate combinations make one instance.
fn instances_of(
    source: &str,
    connector: &Connector,
    base_vars: &Arc<Map<String, Value>>,
    combos: Vec<Vec<(String, Value)>>,
) -> Vec<Instance> {
    let mut instances = Vec::new();
    let mut names = BTreeSet::new();
    for combo in combos {
        let inst_name = if combo.is_empty() {
            "default".to_string()
        } else {
            combo
                .iter()
                .map(|(_, v)| scalar_text(v))
                .collect::<Vec<_>>()
                .join(",")
        };
        if !names.insert(inst_name.clone()) {
            continue; // duplicates in the list: one instance
        }
        instances.push(Instance::new(
            source,
            &inst_name,
            connector,
            base_vars.clone(),
            combo,
        ));
    }
    instances
}

/// Every required param has a value: from `with`, `for_each`, or (for
/// `for_each: discover`) the connector's discovery.
fn check_required(
    diag: &mut Diag,
    field: &str,
    src: &RawSource,
    connector: &Connector,
    instances: &[Instance],
    discovered: bool,
    base_vars: &Map<String, Value>,
) {
    let discovered_keys: BTreeSet<&str> = connector
        .discover
        .as_ref()
        .filter(|_| discovered)
        .map(|d| d.with.iter().map(|(k, _)| k.as_str()).collect())
        .unwrap_or_default();
    let Some(first) = instances
        .first()
        .map(Instance::vars)
        .or(discovered.then(|| base_vars.clone()))
    else {
        return;
    };
    for (k, p) in &connector.params {
        if p.required && !first.contains_key(k) && !discovered_keys.contains(k.as_str()) {
            diag.at_span(
                &src.connector,
                &format!("{field}.with"),
                format!(
                    "connector `{}` requires param `{k}` ({}:{}); give it in `with:` or `for_each:`",
                    connector.name,
                    connector.file.display(),
                    p.line
                ),
            );
        }
    }
}

/// A bearer token that a source gives but that renders empty (`token:
/// ${TOKEN}` with `TOKEN` unset or set to nothing) is an error at load,
/// at that `with:` value: a request without `Authorization` is answered
/// 401 at best, and at worst with the API's anonymous (public, smaller)
/// view, which looks like data. A token param the source leaves out keeps
/// the connector's default, and a connector whose default is empty
/// ("empty for none": public GitHub repositories, a sandbox bank) sends
/// no `Authorization` then, as its file says; so does a value written
/// with an empty default, `${VAR:-}` ("none unless set").
fn check_bearer(
    diag: &mut Diag,
    field: &str,
    src: &RawSource,
    connector: &Connector,
    instances: &[Instance],
) {
    let Some(Auth::Bearer(token)) = &connector.request.auth else {
        return;
    };
    // Credential params are secret (see `resolve_connector`).
    let Some((k, v)) = src.with.iter().find(|(k, v)| {
        connector.params.get(*k).is_some_and(|p| p.secret)
            && scalar_text(&v.value).trim().is_empty()
            && !explicit_empty_default(diag.text, v.referenced.line(), k)
    }) else {
        return;
    };
    let Some(instance) = instances
        .iter()
        .find(|i| renders_blank(connector, token, &i.vars()))
    else {
        return;
    };
    diag.at_span(
        v,
        &format!("{field}.with.{k}"),
        format!(
            "`{k}` is empty, so connector `{}` would send no `Authorization: Bearer` token (instance `{}`): an unset or empty ${{VAR}}? To send none on purpose, leave `{k}` out (or write `${{VAR:-}}`, none unless set)",
            connector.name, instance.name()
        ),
    );
}

/// Whether `key`'s value on `line` of the file as written is a reference
/// with an empty default, `${VAR:-}`: "none unless set", on purpose (the
/// bank example's `token: "${BANK_TOKEN:-}"` against a bank that may
/// need none). Anything else that came out empty (`${VAR}` set to
/// nothing, `""`) was meant to be a token. A value this cannot read (on
/// another line, say) is not on purpose.
fn explicit_empty_default(text: &str, line: u64, key: &str) -> bool {
    let Some(row) = text.lines().nth(line.saturating_sub(1) as usize) else {
        return false;
    };
    row.match_indices(&format!("{key}:")).any(|(at, m)| {
        let after_key = at == 0 || !row[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_');
        let value = row[at + m.len()..].trim_start();
        let value = value.strip_prefix(['"', '\'']).unwrap_or(value);
        after_key
            && value
                .strip_prefix("${")
                .and_then(|r| r.split_once('}'))
                .is_some_and(|(reference, _)| reference.ends_with(":-"))
    })
}

/// Whether `token` renders to nothing but blanks with `vars`; a render
/// that fails (a run-time variable) says nothing here.
fn renders_blank(connector: &Connector, token: &Tpl, vars: &Map<String, Value>) -> bool {
    let ctx = minijinja::Value::from_serialize(vars);
    connector
        .engine
        .render(token, &ctx)
        .is_ok_and(|t| t.trim().is_empty())
}

/// The source's schedule, else the connector's default.
fn schedule_of(
    diag: &mut Diag,
    field: &str,
    src: &RawSource,
    connector: &Connector,
) -> Option<Schedule> {
    match (&src.schedule, &connector.schedule) {
        (Some(s), _) => Some(s.0.clone()),
        (None, Some(s)) => Some(s.clone()),
        (None, None) => {
            diag.at(
                src.connector.referenced.line(),
                0,
                &format!("{field}.schedule"),
                format!(
                    "connector `{}` has no default schedule; give `schedule:` (e.g. `every 1m`)",
                    connector.name
                ),
            );
            None
        }
    }
}

/// `deliver_to`: endpoints that exist, and event types the connector emits.
fn routes_of(
    diag: &mut Diag,
    field: &str,
    src: &RawSource,
    connector: &Connector,
    endpoints: &BTreeMap<String, raw::RawEndpoint>,
) -> Vec<Route> {
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
    let at = &src.deliver_to;
    if routes.is_empty() {
        diag.at_span(
            at,
            &format!("{field}.deliver_to"),
            "expected at least one endpoint",
        );
    }
    let emitted: BTreeSet<&str> = connector.emit.iter().map(|e| e.kind.source()).collect();
    // A templated type (`ticket.{{ change }}`) can be anything: no check.
    let templated = connector
        .emit
        .iter()
        .any(|e| matches!(e.kind, EventType::Template(..)));
    for r in &routes {
        if !endpoints.contains_key(&r.endpoint) {
            diag.at_span(
                at,
                &format!("{field}.deliver_to"),
                format!(
                    "no endpoint named `{}` (defined: {})",
                    r.endpoint,
                    if endpoints.is_empty() {
                        "none".into()
                    } else {
                        endpoints.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                ),
            );
        }
        for t in r.types.iter().flatten() {
            if !templated && !emitted.contains(t.as_str()) {
                diag.at_span(
                    at,
                    &format!("{field}.deliver_to.{}", r.endpoint),
                    format!(
                        "connector `{}` never emits `{t}` (it emits: {})",
                        connector.name,
                        emitted.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                );
            }
        }
    }
    routes
}

/// Gives a value the type of the param's default: `"50"` from `${VAR}`
/// becomes `50` when the default is a number, `"true"` becomes `true`.
#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn only_a_reference_with_an_empty_default_is_empty_on_purpose() {
        let text = "a: 1\n    with: { base_url: \"${BANK_URL}\", token: \"${BANK_TOKEN:-}\" }\n      token: ${T}\n      token: ''\n      my_token: ${X:-}\n      token: ${Y:-}\n";
        assert!(explicit_empty_default(text, 2, "token"));
        assert!(!explicit_empty_default(text, 3, "token"));
        assert!(!explicit_empty_default(text, 4, "token"));
        assert!(!explicit_empty_default(text, 5, "token"), "another key");
        assert!(explicit_empty_default(text, 6, "token"));
        assert!(!explicit_empty_default(text, 2, "base_url"));
        assert!(!explicit_empty_default(text, 99, "token"));
    }
}
