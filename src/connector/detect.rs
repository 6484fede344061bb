//! Detection: from the previous state and this poll's pages to the new state
//! and the changes it found. Pure: no I/O, no clock (the time is passed in),
//! so every mode is unit-tested directly.

use std::cmp::Ordering;
use std::collections::HashSet;

use chrono::{DateTime, SecondsFormat, Utc};
use minijinja::Value as Ctx;
use serde_json::{json, Map, Value};

use super::fetch::cursor_text;
use crate::config::raw::{Baseline, DetectMode};
use crate::config::{Connector, CursorSpec};
use crate::event::value_hash;
use crate::store::InstanceState;

/// A change found by detection, before it gets a sequence number and an id.
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    /// Event type.
    pub kind: String,
    /// What identifies this change (see [`crate::event::event_id`]).
    pub change_key: String,
    /// The event's `data`.
    pub data: Value,
}

/// What happened to one record, for `pollhook test`.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub record: String,
    pub outcome: String,
}

/// The result of detection.
#[derive(Debug, Clone)]
pub struct Detection {
    /// The state to commit.
    pub state: InstanceState,
    /// Changes, in the order they are to be delivered.
    pub events: Vec<Detected>,
    /// Per-record explanations.
    pub notes: Vec<Note>,
}

impl Detection {
    /// True when something must be written to the store.
    pub fn changed(&self, previous: &InstanceState) -> bool {
        !self.events.is_empty() || &self.state != previous
    }
}

/// Runs the connector's detection mode over the pages of one poll.
/// `baseline` overrides the connector's first-run behaviour (`pollhook test`
/// shows what would be emitted, so it forces `emit`).
pub fn detect(
    c: &Connector,
    vars: &Map<String, Value>,
    prev: &InstanceState,
    pages: &[Value],
    now: DateTime<Utc>,
    baseline: Option<Baseline>,
) -> Result<Detection, String> {
    let baseline = baseline.unwrap_or(c.baseline);
    let first_run = !prev.initialized;
    let mut base = vars.clone();
    if let Some(cur) = &prev.cursor {
        base.insert("cursor".into(), Value::String(cur.clone()));
    }
    base.insert(
        "now".into(),
        Value::String(now.to_rfc3339_opts(SecondsFormat::Secs, true)),
    );
    let mut state = prev.clone();
    state.initialized = true;
    let mut events = Vec::new();
    let mut notes = Vec::new();

    match c.detect {
        DetectMode::Snapshot => {
            let current = pages.first().cloned().unwrap_or(Value::Null);
            match &prev.snapshot {
                Some(p) if *p == current => notes.push(Note {
                    record: "snapshot".into(),
                    outcome: "unchanged".into(),
                }),
                Some(p) => {
                    state.generation += 1;
                    let key = format!("{}:{}", state.generation, value_hash(&current));
                    let mut ctx = base.clone();
                    ctx.insert("previous".into(), p.clone());
                    ctx.insert("current".into(), current.clone());
                    let ctx = Ctx::from_serialize(&ctx);
                    let data = json!({ "previous": p, "current": current });
                    let fired = fire(c, &ctx, &key, &data, &mut events)?;
                    notes.push(Note {
                        record: "snapshot".into(),
                        outcome: describe_fired(&fired),
                    });
                    state.snapshot = Some(current);
                }
                None => {
                    state.generation = 0;
                    if baseline == Baseline::Emit {
                        // No previous value: rules are evaluated with
                        // `previous` undefined; a rule that needs it does not fire.
                        let mut ctx = base.clone();
                        ctx.insert("current".into(), current.clone());
                        let ctx = Ctx::from_serialize(&ctx);
                        let data = json!({ "previous": Value::Null, "current": current });
                        let mut fired = Vec::new();
                        for rule in &c.emit {
                            let ok = match &rule.when {
                                None => true,
                                Some(w) => c.engine.test(w, &ctx).unwrap_or(false),
                            };
                            if ok {
                                fired.push(rule.kind.clone());
                                events.push(Detected {
                                    kind: rule.kind.clone(),
                                    change_key: format!("0:{}", value_hash(&current)),
                                    data: data.clone(),
                                });
                            }
                        }
                        notes.push(Note {
                            record: "snapshot".into(),
                            outcome: format!("first value; {}", describe_fired(&fired)),
                        });
                    } else {
                        notes.push(Note {
                            record: "snapshot".into(),
                            outcome: "first value: remembered as the baseline, nothing emitted"
                                .into(),
                        });
                    }
                    state.snapshot = Some(current);
                }
            }
        }
        DetectMode::New => {
            let items_path = c.items.as_ref().ok_or("`detect: new` without `items`")?;
            let id_tpl = c.id.as_ref().ok_or("`detect: new` without `id`")?;
            let mut seen: HashSet<String> = prev.seen.iter().cloned().collect();
            let mut max_cursor: Option<String> = None;
            for (page_no, page) in pages.iter().enumerate() {
                for item in items_path.query(page).all() {
                    let mut ctx = base.clone();
                    ctx.insert("item".into(), item.clone());
                    let ctx = Ctx::from_serialize(&ctx);
                    let id = c
                        .engine
                        .render(id_tpl, &ctx)
                        .map_err(|e| format!("`id` of an item on page {}: {e}", page_no + 1))?;
                    if id.is_empty() {
                        return Err(format!(
                            "`id` rendered empty for an item on page {}",
                            page_no + 1
                        ));
                    }
                    if let Some(CursorSpec::Max(t)) = &c.cursor {
                        let v = c
                            .engine
                            .render(t, &ctx)
                            .map_err(|e| format!("`cursor.max`: {e}"))?;
                        if !v.is_empty()
                            && max_cursor
                                .as_ref()
                                .is_none_or(|m| cmp_cursor(&v, m) == Ordering::Greater)
                        {
                            max_cursor = Some(v);
                        }
                    }
                    if !seen.insert(id.clone()) {
                        notes.push(Note {
                            record: id,
                            outcome: "seen before".into(),
                        });
                        continue;
                    }
                    state.seen.push_back(id.clone());
                    while state.seen.len() > c.seen_limit {
                        state.seen.pop_front();
                        state.seen_evicted += 1;
                    }
                    if first_run && baseline == Baseline::Skip {
                        notes.push(Note {
                            record: id,
                            outcome: "first poll: remembered as the baseline, nothing emitted"
                                .into(),
                        });
                        continue;
                    }
                    let fired = fire(c, &ctx, &id, item, &mut events)?;
                    notes.push(Note {
                        record: id,
                        outcome: describe_fired(&fired),
                    });
                }
            }
            match &c.cursor {
                None => {}
                Some(CursorSpec::From(path)) => {
                    if let Some(v) = pages
                        .iter()
                        .rev()
                        .find_map(|p| path.query(p).first().and_then(cursor_text))
                    {
                        state.cursor = Some(v);
                    }
                }
                Some(CursorSpec::Max(_)) => {
                    // Never move a max-cursor backwards.
                    if let Some(m) = max_cursor {
                        if prev
                            .cursor
                            .as_ref()
                            .is_none_or(|p| cmp_cursor(&m, p) == Ordering::Greater)
                        {
                            state.cursor = Some(m);
                        }
                    }
                }
            }
        }
    }
    Ok(Detection {
        state,
        events,
        notes,
    })
}

/// Evaluates every emit rule; pushes an event per rule that fires.
fn fire(
    c: &Connector,
    ctx: &Ctx,
    key: &str,
    data: &Value,
    events: &mut Vec<Detected>,
) -> Result<Vec<String>, String> {
    let mut fired = Vec::new();
    for rule in &c.emit {
        let ok = match &rule.when {
            None => true,
            Some(w) => c
                .engine
                .test(w, ctx)
                .map_err(|e| format!("`when` of `{}`: {e}", rule.kind))?,
        };
        if ok {
            fired.push(rule.kind.clone());
            events.push(Detected {
                kind: rule.kind.clone(),
                change_key: key.to_string(),
                data: data.clone(),
            });
        }
    }
    Ok(fired)
}

fn describe_fired(fired: &[String]) -> String {
    if fired.is_empty() {
        "changed, but no `when` condition is true: nothing emitted".into()
    } else {
        format!("emits {}", fired.join(", "))
    }
}

/// Orders cursors numerically when both are numbers, else as text (ISO 8601
/// timestamps of one format order correctly as text).
fn cmp_cursor(a: &str, b: &str) -> Ordering {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
        _ => a.cmp(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn connector(yaml: &str) -> Connector {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.yaml");
        std::fs::write(&p, yaml).unwrap();
        crate::config::resolve::load_connector(Path::new(&p)).unwrap()
    }

    fn vars() -> Map<String, Value> {
        json!({"low": 100}).as_object().unwrap().clone()
    }

    const SNAP: &str = r#"
name: s
params: { low: { default: 100 } }
request: { url: "http://x/" }
detect: snapshot
emit:
  - type: changed
    when: "current.available != previous.available"
  - type: low
    when: "current.available < low and previous.available >= low"
"#;

    const NEW: &str = r#"
name: n
params: { low: { default: 100 } }
request: { url: "http://x/" }
items: "$.tx[*]"
id: "{{ item.id }}"
cursor: { max: "{{ item.n }}" }
detect: new
seen_limit: 3
emit: [{ type: created }]
"#;

    fn run(c: &Connector, prev: &InstanceState, page: Value) -> Detection {
        detect(c, &vars(), prev, &[page], Utc::now(), None).unwrap()
    }

    #[test]
    fn snapshot_baseline_then_changes_and_crossings() {
        let c = connector(SNAP);
        let d0 = run(&c, &InstanceState::default(), json!({"available": 150}));
        assert!(d0.events.is_empty());
        assert!(d0.changed(&InstanceState::default()));
        let d1 = run(&c, &d0.state, json!({"available": 90}));
        let kinds: Vec<_> = d1.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["changed", "low"]);
        assert_eq!(
            d1.events[0].data,
            json!({"previous": {"available": 150}, "current": {"available": 90}})
        );
        // Below the threshold already: changed, but no second crossing.
        let d2 = run(&c, &d1.state, json!({"available": 80}));
        let kinds: Vec<_> = d2.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["changed"]);
        // Unchanged: nothing, no state change.
        let d3 = run(&c, &d2.state, json!({"available": 80}));
        assert!(d3.events.is_empty() && !d3.changed(&d2.state));
    }

    #[test]
    fn snapshot_returning_to_an_old_value_gets_a_new_change_key() {
        let c = connector(SNAP);
        let a = run(&c, &InstanceState::default(), json!({"available": 1}));
        let b = run(&c, &a.state, json!({"available": 2}));
        let a2 = run(&c, &b.state, json!({"available": 1}));
        let b2 = run(&c, &a2.state, json!({"available": 2}));
        assert_ne!(b.events[0].change_key, b2.events[0].change_key);
    }

    #[test]
    fn snapshot_missing_field_is_an_error_not_an_event() {
        let c = connector(SNAP);
        let a = run(&c, &InstanceState::default(), json!({"available": 1}));
        let err = detect(
            &c,
            &vars(),
            &a.state,
            &[json!({"oops": true})],
            Utc::now(),
            None,
        )
        .unwrap_err();
        assert!(err.contains("when"), "{err}");
    }

    #[test]
    fn new_items_once_each_with_bounded_seen_set_and_max_cursor() {
        let c = connector(NEW);
        let d0 = run(
            &c,
            &InstanceState::default(),
            json!({"tx": [{"id": "a", "n": 1}]}),
        );
        assert!(d0.events.is_empty(), "baseline skip");
        let d1 = run(
            &c,
            &d0.state,
            json!({"tx": [{"id": "a", "n": 1}, {"id": "b", "n": 2}, {"id": "c", "n": 10}]}),
        );
        let keys: Vec<_> = d1.events.iter().map(|e| e.change_key.as_str()).collect();
        assert_eq!(keys, ["b", "c"]);
        assert_eq!(
            d1.state.cursor.as_deref(),
            Some("10"),
            "numeric max, not text max"
        );
        let d2 = run(
            &c,
            &d1.state,
            json!({"tx": [{"id": "c", "n": 10}, {"id": "d", "n": 3}]}),
        );
        assert_eq!(d2.events.len(), 1);
        assert_eq!(d2.state.cursor.as_deref(), Some("10"), "never backwards");
        assert_eq!(d2.state.seen.len(), 3);
        assert_eq!(d2.state.seen_evicted, 1);
    }

    #[test]
    fn baseline_emit_and_bad_items() {
        let c = connector(NEW);
        let d = detect(
            &c,
            &vars(),
            &InstanceState::default(),
            &[json!({"tx": [{"id": "a", "n": 1}]})],
            Utc::now(),
            Some(Baseline::Emit),
        )
        .unwrap();
        assert_eq!(d.events.len(), 1);
        let err = detect(
            &c,
            &vars(),
            &d.state,
            &[json!({"tx": [{"nope": 1}]})],
            Utc::now(),
            None,
        )
        .unwrap_err();
        assert!(err.contains("`id`"), "{err}");
    }
}
