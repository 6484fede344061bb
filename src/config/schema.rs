//! JSON Schemas of `bridge.yaml` and of connector files, generated from the
//! serde types of [`super::raw`] (`pollhook schema`), for editors that
//! validate and complete YAML against a schema (e.g. VS Code's YAML
//! extension: `# yaml-language-server: $schema=bridge.schema.json`).
//!
//! The derived parts follow the serde attributes (`deny_unknown_fields`
//! becomes `additionalProperties: false`, doc comments become descriptions;
//! the values with a syntax say theirs in schemars attributes), and the
//! types with a hand-written `Deserialize` describe themselves by hand
//! beside it (`raw.rs`, `raw/values.rs`). The schema checks shapes, not
//! meaning: a well-formed cron line that never fires, an unknown time zone
//! or a template calling an unknown filter pass it and are still reported
//! by `pollhook validate`.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

use super::raw::{RawBridge, RawConnector};

/// The self-contained schema of `T`: draft 2020-12, definitions under `$defs`.
fn schema_for<T: JsonSchema>(title: &str, description: &str) -> Value {
    let schema = SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<T>();
    let Value::Object(generated) = schema.to_value() else {
        unreachable!("a struct's schema is an object")
    };
    // `$schema`, `title` and `description` first, for whoever reads it.
    let mut object = Map::new();
    object.insert("$schema".into(), generated["$schema"].clone());
    object.insert("title".into(), json!(title));
    object.insert("description".into(), json!(description));
    for (k, v) in generated {
        object.entry(k).or_insert(v);
    }
    Value::Object(object)
}

/// JSON Schema (draft 2020-12) of bridge.yaml.
pub fn bridge_schema() -> Value {
    schema_for::<RawBridge>(
        "pollhook bridge.yaml",
        "The operator's file: what to poll (sources of connectors), where events go (endpoints), and shared quotas (hosts). `${VAR}` placeholders are substituted before the file is read.",
    )
}

/// JSON Schema of a connector file.
pub fn connector_schema() -> Value {
    let mut value = schema_for::<RawConnector>(
        "pollhook connector",
        "A connector file: how to poll one kind of API (request, pagination, detection) and which events to emit.",
    );
    // `name` is optional in the type only because a connector written inline
    // in bridge.yaml takes its source's name; a file must give it.
    let object = value.as_object_mut().expect("object");
    if let Some(name) = object
        .get_mut("properties")
        .and_then(|p| p.get_mut("name"))
        .and_then(Value::as_object_mut)
    {
        name.insert("type".into(), json!("string"));
        name.remove("default");
    }
    let required = object.entry("required").or_insert_with(|| json!([]));
    if let Some(list) = required.as_array_mut() {
        if !list.contains(&json!("name")) {
            list.insert(0, json!("name"));
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    fn yaml(text: &str) -> Value {
        serde_saphyr::from_str::<Value>(text).unwrap_or_else(|e| panic!("not YAML: {e}\n{text}"))
    }

    fn validator(schema: &Value) -> jsonschema::Validator {
        jsonschema::draft202012::new(schema).expect("the generated schema is a valid schema")
    }

    /// The schema's errors for `doc`, one per line (empty when valid).
    fn errors(v: &jsonschema::Validator, doc: &Value) -> String {
        v.iter_errors(doc)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// bridge.yaml's `${VAR}`s replaced by plausible values.
    fn interpolated(file: &Path) -> String {
        let text = std::fs::read_to_string(file).unwrap();
        let lookup = |name: &str| -> Option<String> {
            Some(if name.ends_with("_URL") {
                "http://127.0.0.1:1".into()
            } else if name.ends_with("_SECRET") {
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()
            } else {
                "x".into()
            })
        };
        crate::config::env::interpolate(file, &text, &lookup).expect("interpolates")
    }

    #[test]
    fn schemas_are_self_contained_draft_2020_12() {
        for schema in [bridge_schema(), connector_schema()] {
            assert_eq!(
                schema["$schema"],
                "https://json-schema.org/draft/2020-12/schema"
            );
            assert!(schema["title"].is_string());
            assert!(schema.get("$id").is_none());
            // Every reference points into the document's own `$defs`.
            let text = schema.to_string();
            for (i, _) in text.match_indices("\"$ref\":\"") {
                let target = &text[i + 8..];
                let target = &target[..target.find('"').unwrap()];
                let name = target
                    .strip_prefix("#/$defs/")
                    .unwrap_or_else(|| panic!("foreign $ref {target}"));
                assert!(schema["$defs"].get(name).is_some(), "dangling {target}");
            }
            validator(&schema);
        }
        // The bridge schema carries the connector's, for inline connectors.
        assert!(bridge_schema()["$defs"].get("Connector").is_some());
        assert_eq!(connector_schema()["required"][0], "name");
    }

    #[test]
    fn deny_unknown_fields_becomes_additional_properties_false() {
        let b = bridge_schema();
        assert_eq!(b["additionalProperties"], false);
        for def in [
            "Source",
            "Endpoint",
            "Connector",
            "Request",
            "Paginate",
            "Emit",
        ] {
            assert_eq!(b["$defs"][def]["additionalProperties"], false, "{def}");
        }
        // Doc comments are descriptions.
        assert!(b["properties"]["sources"]["description"]
            .as_str()
            .unwrap()
            .contains("What to poll"));
    }

    #[test]
    fn every_connector_file_validates() {
        let v = validator(&connector_schema());
        let mut n = 0;
        for entry in std::fs::read_dir(root().join("connectors")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let doc = yaml(&std::fs::read_to_string(&path).unwrap());
                let errs = errors(&v, &doc);
                assert!(errs.is_empty(), "{}:\n{errs}", path.display());
                n += 1;
            }
        }
        assert!(n >= 5, "found {n} connector files");
    }

    #[test]
    fn the_example_bridge_validates() {
        let text = interpolated(&root().join("bridge.yaml"));
        let errs = errors(&validator(&bridge_schema()), &yaml(&text));
        assert!(errs.is_empty(), "{errs}");
        // And the parser agrees.
        serde_saphyr::from_str::<RawBridge>(&text).expect("the parser accepts it");
    }

    const CONNECTOR: &str = "
name: c
request: { url: 'https://example.com/x' }
detect: snapshot
emit: [{ type: thing.changed }]
";

    const BRIDGE: &str = "
sources:
  s:
    connector: c
    deliver_to: [agent]
endpoints:
  agent: { url: 'http://127.0.0.1:1', secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw }
";

    /// `base` with `path` (dotted) set to the YAML value `value`, or removed
    /// when `value` is None.
    fn edit(base: &str, path: &str, value: Option<&str>) -> Value {
        let mut doc = yaml(base);
        let keys: Vec<&str> = path.split('.').collect();
        let (last, parents) = keys.split_last().unwrap();
        let mut node = &mut doc;
        for k in parents {
            node = node
                .as_object_mut()
                .unwrap()
                .entry(k.to_string())
                .or_insert_with(|| json!({}));
        }
        let map = node.as_object_mut().unwrap();
        match value {
            Some(v) => {
                map.insert(last.to_string(), yaml(&format!("v: {v}"))["v"].clone());
            }
            None => {
                map.remove(*last);
            }
        }
        doc
    }

    /// Checks that the schema and the parser agree on `doc`: both accept it
    /// (`ok`) or both reject it.
    fn agree<T: for<'de> serde::Deserialize<'de>>(
        v: &jsonschema::Validator,
        doc: &Value,
        ok: bool,
    ) {
        let text = serde_json::to_string(doc).unwrap();
        let parsed = serde_saphyr::from_str::<T>(&text);
        let errs = errors(v, doc);
        assert_eq!(
            parsed.is_ok(),
            ok,
            "parser on {text}: {:?}",
            parsed.err().map(|e| e.to_string())
        );
        assert_eq!(errs.is_empty(), ok, "schema on {text}: {errs}");
    }

    #[test]
    fn invalid_documents_do_not_validate() {
        let c = validator(&connector_schema());
        let b = validator(&bridge_schema());
        agree::<RawConnector>(&c, &yaml(CONNECTOR), true);
        agree::<RawBridge>(&b, &yaml(BRIDGE), true);
        // Unknown top-level key.
        agree::<RawConnector>(&c, &edit(CONNECTOR, "detect_mode", Some("new")), false);
        agree::<RawBridge>(&b, &edit(BRIDGE, "source", Some("{}")), false);
        // Unknown detection mode.
        agree::<RawConnector>(&c, &edit(CONNECTOR, "detect", Some("sometimes")), false);
        // Unknown auth type, and a known one with a missing or unknown field.
        agree::<RawConnector>(
            &c,
            &edit(CONNECTOR, "request.auth", Some("{type: nope}")),
            false,
        );
        let auth = |a: &str| edit(CONNECTOR, "request.auth", Some(a));
        agree::<RawConnector>(&c, &auth("{type: bearer, token: t}"), true);
        agree::<RawConnector>(&c, &auth("{type: bearer}"), false);
        agree::<RawConnector>(&c, &auth("{type: bearer, token: t, user: u}"), false);
        agree::<RawConnector>(
            &c,
            &auth("{type: api_key, in: query, name: k, value: v}"),
            true,
        );
        agree::<RawConnector>(
            &c,
            &auth("{type: api_key, in: body, name: k, value: v}"),
            false,
        );
        agree::<RawConnector>(
            &c,
            &auth(
                "{type: oauth2, token_url: u, client_id: i, client_secret: s, client_auth: body}",
            ),
            true,
        );
        // A source without `deliver_to`.
        agree::<RawBridge>(&b, &edit(BRIDGE, "sources.s.deliver_to", None), false);
        // Missing required connector keys.
        for key in ["request", "detect", "emit"] {
            agree::<RawConnector>(&c, &edit(CONNECTOR, key, None), false);
        }
        // A connector file needs a name (checked after parsing, so only the
        // schema of a file says so; an inline connector needs none).
        let nameless = edit(CONNECTOR, "name", None);
        assert!(!errors(&c, &nameless).is_empty());
        let inline = edit(
            BRIDGE,
            "sources.s.connector",
            Some(&serde_json::to_string(&nameless).unwrap()),
        );
        agree::<RawBridge>(&b, &inline, true);
        let bad_inline = edit(
            BRIDGE,
            "sources.s.connector",
            Some(&serde_json::to_string(&edit(CONNECTOR, "detect", Some("sometimes"))).unwrap()),
        );
        agree::<RawBridge>(&b, &bad_inline, false);
    }

    /// The hand-written forms: the schema accepts what the parser accepts.
    #[test]
    fn hand_written_forms_match_the_parser() {
        let c = validator(&connector_schema());
        let b = validator(&bridge_schema());
        let conn = |path: &str, value: &str, ok: bool| {
            agree::<RawConnector>(&c, &edit(CONNECTOR, path, Some(value)), ok)
        };
        let bridge = |path: &str, value: &str, ok: bool| {
            agree::<RawBridge>(&b, &edit(BRIDGE, path, Some(value)), ok)
        };
        // Schedules.
        for (s, ok) in [
            ("every 30s", true),
            ("every 1h 30m", true),
            ("'*/5 * * * *'", true),
            ("'cron */10 * * * * *'", true),
            ("'0 9 * * 1-5'", true),
            ("every30s", false),
            ("30s", false),
            ("every", false),
            ("'* * *'", false),
            ("{ every: 30s }", true),
            ("{ cron: '0 9 * * 1-5', tz: Europe/Paris, active: ['Mon-Fri 08:00-18:00'], jitter: 10s, catch_up: skip }", true),
            ("{ every: 30s, cron: '0 9 * * *' }", false),
            ("{ jitter: 10s }", false),
            ("{ every: 30s, catch_up: sometimes }", false),
            ("{ every: 30s, active: [] }", false),
            ("{ every: 30s, often: true }", false),
            ("{ every: 30s, jitter: soon }", false),
            ("[every 30s]", false),
        ] {
            conn("schedule", s, ok);
        }
        // Durations and rates.
        for (d, ok) in [
            ("10s", true),
            ("250ms", true),
            ("1h 30m", true),
            ("1.5s", true),
            ("0", true),
            ("'0'", true),
            ("30", false),
            ("ten seconds", false),
            ("10 parsecs", false),
        ] {
            conn("cursor.lookback", d, ok);
        }
        // Timeouts: more than 0 (the 1h cap is the parser's alone).
        for (d, ok) in [("10s", true), ("1h", true), ("0", false), ("0s", false)] {
            conn("request.timeout", d, ok);
        }
        for (r, ok) in [
            ("10/s", true),
            ("60/min", true),
            ("5/2s", true),
            ("fast", false),
            ("60", false),
            ("0/s", false),
        ] {
            conn("rate_limit", r, ok);
            bridge("sources.s.rate_limit", r, ok);
        }
        conn("columnar", "true", true);
        conn("columnar", "'$.rows'", false);
        conn("paginate", "{ link_header: true, conditional: true }", true);
        conn(
            "paginate",
            "{ link_header: true, conditional: sometimes }",
            false,
        );
        // Templates take scalars; JSONPaths and conditions strings.
        conn(
            "request.query",
            "{ limit: 100, all: true, q: '{{ x }}' }",
            true,
        );
        conn("request.query", "{ q: [1] }", false);
        conn("items", "'$.items[*]'", true);
        conn(
            "emit",
            "[{ type: t, when: 'a == 1', data: { n: '{{ a }}', k: [1, {b: 2}] } }]",
            true,
        );
        conn("emit", "[{ type: t, when: [a] }]", false);
        conn("emit", "[{ type: t, when: true }]", true);
        conn("emit", "[{ type: t, when: ~, data: ~ }]", true);
        conn("request.query", "{ q: ~ }", false);
        conn("schedule", "~", true);
        // `name: ~` parses (as no name), but a connector file needs one.
        let null_name = edit(CONNECTOR, "name", Some("~"));
        serde_saphyr::from_str::<RawConnector>(&null_name.to_string()).unwrap();
        assert!(!errors(&c, &null_name).is_empty());
        conn("response", "{ format: xml }", true);
        conn("response", "{ format: yaml }", false);
        // deliver_to, secrets, for_each, connector.
        for (d, ok) in [
            ("agent", true),
            ("[agent, audit]", true),
            ("{ agent: [a.b, c.d] }", true),
            ("{ agent: a.b }", false),
            ("42", false),
        ] {
            bridge("sources.s.deliver_to", d, ok);
        }
        bridge("endpoints.agent.secret", "[whsec_a, whsec_b]", true);
        bridge("endpoints.agent.secret", "{ a: b }", false);
        bridge("sources.s.for_each", "discover", true);
        bridge("sources.s.for_each", "{ account: [a, b, 3] }", true);
        bridge("sources.s.for_each", "everything", false);
        bridge("sources.s.connector", "[c]", false);
        bridge(
            "hosts",
            "{ api.example.com: { rate: 20/s, burst: 5 } }",
            true,
        );
        bridge("hosts", "{ api.example.com: { rate: lots } }", false);
    }
}
