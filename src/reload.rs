//! What a reload (SIGHUP) changes: a pure comparison of the running
//! configuration with the new one. No I/O; the daemon applies the plan.
//!
//! Why compare the configuration *as written* (the YAML trees after
//! `${VAR}` substitution) rather than the compiled runtime types: compiled
//! templates and JSONPaths cannot be compared, and the written form is what
//! the operator changed. Comments, key order and moved lines are not
//! changes; a secret changed in the environment or a `${file:}` is.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde_json::Value;

use crate::config::{Config, Instance, Source};

/// A stable hash of a YAML/JSON tree; object key order does not matter.
pub fn fingerprint(v: &Value) -> u64 {
    fn feed(v: &Value, h: &mut std::collections::hash_map::DefaultHasher) {
        match v {
            Value::Null => 0u8.hash(h),
            Value::Bool(b) => (1u8, b).hash(h),
            Value::Number(n) => (2u8, n.to_string()).hash(h),
            Value::String(s) => (3u8, s).hash(h),
            Value::Array(a) => {
                (4u8, a.len()).hash(h);
                a.iter().for_each(|x| feed(x, h));
            }
            Value::Object(o) => {
                (5u8, o.len()).hash(h);
                let mut keys: Vec<&String> = o.keys().collect();
                keys.sort();
                for k in keys {
                    k.hash(h);
                    feed(&o[k], h);
                }
            }
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    feed(v, &mut h);
    h.finish()
}

/// A source as written: its bridge entry without `for_each` (instances are
/// compared one by one) and its connector's file.
fn source_fingerprint(config: &Config, source: &Source) -> u64 {
    let mut written = config.definition["sources"][&source.name].clone();
    if let Some(o) = written.as_object_mut() {
        if o.get("for_each").and_then(Value::as_str) != Some("discover") {
            o.remove("for_each");
        }
    }
    fingerprint(&Value::Array(vec![
        written,
        source.connector.definition.clone(),
    ]))
}

/// What runs for a configuration: one poll task per static instance, one
/// discovery loop per `for_each: discover` source.
pub struct Unit {
    /// Equal fingerprints: the unit keeps running untouched on a reload.
    pub fingerprint: u64,
    pub source: Arc<Source>,
    /// `None` for a discovering source's loop. The configuration's own
    /// (shared, not copied, by the task that polls it).
    pub instance: Option<Arc<Instance>>,
}

/// Units by key: the instance key (`source/instance`) for static
/// instances, the source name for discovering sources.
pub fn units(config: &Config) -> BTreeMap<Arc<str>, Unit> {
    let mut out = BTreeMap::new();
    for source in &config.sources {
        let fp = source_fingerprint(config, source);
        if source.discovered {
            out.insert(
                Arc::from(source.name.as_str()),
                Unit {
                    fingerprint: fp,
                    source: source.clone(),
                    instance: None,
                },
            );
            continue;
        }
        for inst in &source.instances {
            let vars = Value::Object(inst.vars());
            out.insert(
                inst.key.clone(),
                Unit {
                    fingerprint: fingerprint(&Value::Array(vec![fp.into(), vars])),
                    source: source.clone(),
                    instance: Some(inst.clone()),
                },
            );
        }
    }
    out
}

/// Endpoint fingerprints by name.
pub fn endpoints(config: &Config) -> BTreeMap<String, u64> {
    config
        .endpoints
        .keys()
        .map(|n| (n.clone(), fingerprint(&config.definition["endpoints"][n])))
        .collect()
}

/// Whether a stored instance state belongs to a unit of `units` (a
/// discovering source owns every `source/…` key).
pub fn owns(units: &BTreeMap<Arc<str>, Unit>, state_key: &str) -> bool {
    units.contains_key(state_key)
        || state_key
            .split_once('/')
            .and_then(|(src, _)| units.get(src))
            .is_some_and(|u| u.instance.is_none())
}

/// Why the new configuration cannot be applied without a restart.
pub fn refusal(old: &Config, new: &Config) -> Option<String> {
    if old.state_dir != new.state_dir {
        return Some(format!(
            "state_dir changed ({} → {}): a reload cannot move the store; restart pollhook",
            old.state_dir.display(),
            new.state_dir.display()
        ));
    }
    // The running tasks hold the open store: another backend, database or
    // schema is another store, which only a restart opens.
    (old.store != new.store).then(|| {
        format!(
            "store changed ({} → {}): a reload cannot move the store; restart pollhook",
            old.store, new.store
        )
    })
}

/// What the operator should know before the new configuration runs: parts
/// that need a restart, and changes that will emit events again.
pub fn warnings(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if old.admin_listen != new.admin_listen {
        out.push("admin.listen changed: the admin server keeps its address until a restart".into());
    }
    for source in &new.sources {
        let Some(before) = old.source(&source.name) else {
            continue;
        };
        let (a, b) = (identity(old, before), identity(new, source));
        for (field, why) in REEMITTING {
            let (x, y) = (&a[*field], &b[*field]);
            if x != y {
                out.push(format!(
                    "source `{}`: the connector's `{field}` changed ({} → {}): {why}",
                    source.name,
                    show(x),
                    show(y)
                ));
            }
        }
    }
    out
}

/// Connector fields whose change makes known items look new or changed.
const REEMITTING: &[(&str, &str)] = &[
    ("id", "items will look new and may be emitted again"),
    (
        "detect",
        "what was seen is read differently; items may be emitted again",
    ),
    ("version", "every known item may look updated once"),
    ("watch", "every instance may emit one change"),
    ("watch_key", "every instance may emit one change"),
    ("watch_value", "every instance may emit one change"),
];

/// The connector of a source as written (file or inline).
fn identity(config: &Config, source: &Source) -> Value {
    if source.connector.definition.is_null() {
        config.definition["sources"][&source.name]["connector"].clone()
    } else {
        source.connector.definition.clone()
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "unset".into(),
        Value::String(s) => format!("`{s}`"),
        other => format!("`{other}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fingerprints_ignore_key_order_but_not_values() {
        let a = json!({ "a": 1, "b": [1, "x"], "c": { "d": null } });
        let b = json!({ "c": { "d": null }, "b": [1, "x"], "a": 1 });
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(
            fingerprint(&a),
            fingerprint(&json!({ "a": 2, "b": [1, "x"], "c": { "d": null } }))
        );
        assert_ne!(fingerprint(&json!([1, 2])), fingerprint(&json!([2, 1])));
        assert_ne!(fingerprint(&json!("1")), fingerprint(&json!(1)));
    }

    fn config(dir: &std::path::Path, id: &str, accounts: &str, extra: &str) -> Config {
        std::fs::create_dir_all(dir.join("c")).unwrap();
        std::fs::write(
            dir.join("c/x.yaml"),
            format!(
                "name: x\nparams: {{ account: {{ required: true }} }}\nrequest: {{ url: \"http://127.0.0.1:1/{{{{ account }}}}\" }}\nitems: \"$[*]\"\nid: \"{id}\"\ndetect: new\nemit: [{{ type: x.new }}]\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("bridge.yaml"),
            format!(
                "connectors: [c/*.yaml]\nsources:\n  s:\n    connector: x\n    for_each: {{ account: [{accounts}] }}\n    schedule: every 1m\n    deliver_to: [e]\n{extra}endpoints:\n  e: {{ url: \"http://127.0.0.1:2/\", secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw }}\n"
            ),
        )
        .unwrap();
        Config::load_with_env(&dir.join("bridge.yaml"), &|_| None).unwrap()
    }

    /// The fleet the embedded store's cache is sized to: every static
    /// instance of every source.
    #[test]
    fn the_fleet_counts_the_instances_of_every_source() {
        let dir = tempfile::tempdir().unwrap();
        let extra = "  t:\n    connector: x\n    for_each: { account: [d] }\n    schedule: every 1m\n    deliver_to: [e]\n";
        assert_eq!(
            config(dir.path(), "{{ item.id }}", "a, b, c", extra).fleet(),
            Some(4)
        );
    }

    /// What every instance of a source shares is one map, not a copy per
    /// instance (memory at rest), and each instance still sees its own value
    /// over it, in the params' order.
    #[test]
    fn instances_of_a_source_share_its_variables_and_keep_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("x.yaml"),
            "name: x\nparams: { account: { required: true }, region: { default: us }, page: { default: 10 } }\nrequest: { url: \"http://127.0.0.1:1/{{ account }}\" }\nitems: \"$[*]\"\nid: \"{{ item.id }}\"\ndetect: new\nemit: [{ type: x.new }]\n",
        )
        .unwrap();
        std::fs::write(
            d.join("bridge.yaml"),
            "connectors: [x.yaml]\nsources:\n  s:\n    connector: x\n    with: { region: eu }\n    for_each: { account: [a, b] }\n    schedule: every 1m\n    deliver_to: [e]\nendpoints:\n  e: { url: \"http://127.0.0.1:2/\", secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw }\n",
        )
        .unwrap();
        let c = Config::load_with_env(&d.join("bridge.yaml"), &|_| None).unwrap();
        let s = &c.sources[0];
        let (a, b) = (&s.instances[0], &s.instances[1]);
        assert!(Arc::ptr_eq(&a.base_vars, &b.base_vars));
        assert!(Arc::ptr_eq(&a.base_vars, &s.base_vars));
        assert_eq!(Value::Object(a.own_vars()), json!({ "account": "a" }));
        assert_eq!(
            serde_json::to_string(&b.vars()).unwrap(),
            r#"{"page":10,"region":"eu","account":"b"}"#,
            "the params' defaults, the source's values, then the instance's"
        );
    }

    #[test]
    fn instances_compare_one_by_one_and_id_changes_are_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let a = config(dir.path(), "{{ item.id }}", "a, b", "");
        let ua = units(&a);
        // The list itself is not kept (instances compare one by one).
        assert!(a.definition["sources"]["s"].get("for_each").is_none());
        assert!(a.definition["sources"]["s"].get("connector").is_some());
        // Another instance added: the others are untouched.
        let b = config(dir.path(), "{{ item.id }}", "a, b, c", "");
        let ub = units(&b);
        assert_eq!(ua["s/a"].fingerprint, ub["s/a"].fingerprint);
        assert_eq!(ua["s/b"].fingerprint, ub["s/b"].fingerprint);
        assert!(ub.contains_key("s/c"));
        assert!(warnings(&a, &b).is_empty());
        // A comment or a reordered key is no change either.
        let c = config(dir.path(), "{{ item.id }}", "a, b", "    # a comment\n");
        assert_eq!(ua["s/a"].fingerprint, units(&c)["s/a"].fingerprint);
        // The id template: every instance restarts, and the operator is told.
        let d = config(dir.path(), "{{ item.ref }}", "a, b", "");
        assert_ne!(ua["s/a"].fingerprint, units(&d)["s/a"].fingerprint);
        let w = warnings(&a, &d);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("source `s`") && w[0].contains("`id` changed"),
            "{w:?}"
        );
        assert!(w[0].contains("{{ item.ref }}"), "{w:?}");
        // State ownership.
        assert!(owns(&ua, "s/a"));
        assert!(!owns(&ua, "s/c"));
        assert!(!owns(&ua, "gone/a"));
    }
}
