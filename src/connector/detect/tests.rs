//! Unit tests of `detect` (kept apart so the module reads as one room).

use super::*;
use std::path::Path;

#[test]
fn cursors_compare_as_what_they_are() {
    use Ordering::*;
    assert_eq!(cmp_cursor("10", "9"), Greater);
    assert_eq!(
        cmp_cursor("1234567890123456789", "1234567890123456788"),
        Greater
    );
    assert_eq!(
        cmp_cursor("2026-11-29T10:00:00.5Z", "2026-11-29T10:00:00Z"),
        Greater
    );
    assert_eq!(
        cmp_cursor("2026-11-29T11:00:00+01:00", "2026-11-29T10:30:00Z"),
        Less
    );
    assert_eq!(cmp_cursor("1.5", "1.25"), Greater);
    assert_eq!(cmp_cursor("b", "a"), Greater);
}

const LISTED: Listing = Listing {
    complete: true,
    xml: false,
};

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
    detect(c, &vars(), prev, &[page], Utc::now(), None, LISTED).unwrap()
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
        LISTED,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("when"), "{err}");
}

const KEYED: &str = r#"
name: k
request: { url: "http://x/" }
detect: snapshot
watch: "$.balances"
watch_key: "{{ item.type }}"
watch_value: "{{ item.amount }}"
emit:
  - type: changed
    data: { before: "{{ previous }}", after: "{{ current }}" }
"#;

#[test]
fn a_keyed_watch_ignores_order_and_keys_previous() {
    let c = connector(KEYED);
    let page = |pairs: &[(&str, i64)]| json!({ "balances": pairs.iter().map(|(t, a)| json!({"type": t, "amount": a, "date": "x"})).collect::<Vec<_>>() });
    let d0 = run(&c, &InstanceState::default(), page(&[("a", 1), ("b", 2)]));
    assert_eq!(
        d0.state.snapshot.as_ref().map(|s| s.value()),
        Some(json!({"a": 1, "b": 2}))
    );
    // Reordered (and another field moved): no change, no write.
    let d1 = run(&c, &d0.state, page(&[("b", 2), ("a", 1)]));
    assert!(d1.events.is_empty() && !d1.changed(&d0.state));
    let d2 = run(&c, &d1.state, page(&[("b", 3), ("a", 1)]));
    assert_eq!(
        d2.events[0].data,
        json!({"before": {"a": 1, "b": 2}, "after": {"a": 1, "b": 3}})
    );
    // The same set in either order has the same change key.
    let d3 = run(&c, &d0.state, page(&[("a", 1), ("b", 3)]));
    assert_eq!(d2.events[0].change_key, d3.events[0].change_key);
    // An empty list is a value; two items with one key an error.
    let d4 = run(&c, &d2.state, page(&[]));
    assert_eq!(
        d4.state.snapshot.as_ref().map(|s| s.value()),
        Some(json!({}))
    );
    let err = detect(
        &c,
        &vars(),
        &d0.state,
        &[page(&[("a", 1), ("a", 2)])],
        Utc::now(),
        None,
        LISTED,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`watch_key` gives `a` to two items"), "{err}");
}

#[test]
fn watch_key_needs_watch_and_snapshot() {
    let load = |yaml: &str| {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.yaml");
        std::fs::write(&p, yaml).unwrap();
        match crate::config::resolve::load_connector(Path::new(&p)) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    let err = load(&KEYED.replace("watch: \"$.balances\"\n", ""));
    assert!(
        err.contains("`watch_key` keys the list that `watch` selects"),
        "{err}"
    );
    let err = load(&KEYED.replace("watch_key: \"{{ item.type }}\"\n", ""));
    assert!(
        err.contains("`watch_value` picks what of each item"),
        "{err}"
    );
    let err = load(&KEYED.replace(
        "watch_key: \"{{ item.type }}\"",
        "watch_key: \"{{ itme.type }}\"",
    ));
    assert!(err.contains("watch_key") && err.contains("itme"), "{err}");
}

/// A first value emitted as the baseline has no `previous`: a rule
/// whose `data` needs it does not fire (and says so); the others do.
#[test]
fn a_baseline_snapshot_skips_rules_that_need_previous() {
    let c = connector(
        r#"
name: s
request: { url: "http://x/" }
detect: snapshot
emit:
  - type: changed
    data: { was: "{{ previous.v }}" }
  - type: seen
    data: { now: "{{ current.v }}" }
"#,
    );
    let d = detect(
        &c,
        &vars(),
        &InstanceState::default(),
        &[json!({"v": 1})],
        Utc::now(),
        Some(Baseline::Emit),
        LISTED,
    )
    .unwrap();
    let kinds: Vec<_> = d.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["seen"]);
    assert!(
            d.notes[0]
                .outcome
                .contains("needing a previous value, which a first value has not, so not emitted: changed (its `data`"),
            "{:?}",
            d.notes
        );
}

/// The probes: a listing larger than `seen_limit` re-announced old
/// items on every poll, then (refused whole) announced nothing at all.
/// Ids still listed are always remembered; `seen_limit` bounds the ids
/// that left the listing; only a listing beyond the hard bound is an
/// error.
#[test]
fn a_listing_is_remembered_whole_and_seen_limit_bounds_the_ids_that_left_it() {
    let c = connector(&NEW.replace("cursor: { max: \"{{ item.n }}\" }\n", ""));
    let page = |ids: &[&str]| json!({ "tx": ids.iter().map(|i| json!({"id": i, "n": 1})).collect::<Vec<_>>() });
    let d0 = run(&c, &InstanceState::default(), page(&["a", "b"]));
    // "b" left the listing: one unlisted id, within the limit of 3.
    let d1 = run(&c, &d0.state, page(&["a", "c", "d"]));
    assert_eq!(d1.events.len(), 2);
    assert_eq!(d1.state.seen, ["a", "b", "c", "d"]);
    assert_eq!(d1.state.seen_evicted, 0);
    // Five listed, more than the limit of 3: all new, all announced,
    // all remembered; of the four that left, the oldest goes.
    let d2 = run(&c, &d1.state, page(&["e", "f", "g", "h", "i"]));
    assert_eq!(d2.events.len(), 5);
    assert_eq!(d2.state.seen, ["b", "c", "d", "e", "f", "g", "h", "i"]);
    assert_eq!(d2.state.seen_evicted, 1);
    // The same listing again: nothing is new; one more item: one event.
    let d3 = run(&c, &d2.state, page(&["e", "f", "g", "h", "i"]));
    assert!(d3.events.is_empty(), "{:?}", d3.events);
    let d4 = run(&c, &d3.state, page(&["e", "f", "g", "h", "i", "j"]));
    let keys: Vec<_> = d4.events.iter().map(|e| e.change_key.as_str()).collect();
    assert_eq!(keys, ["j"]);
    // Beyond the hard bound: an error, no events.
    assert!(check_listing_fits(MAX_LISTED_IDS, MAX_LISTED_IDS).is_ok());
    let err = check_listing_fits(MAX_LISTED_IDS + 1, MAX_LISTED_IDS)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("100001 distinct items, more than the 100000 an instance can remember"),
        "{err}"
    );
}

/// `{"a": …}` nested `n` deep, with an id.
fn deep_item(id: &str, n: usize) -> Value {
    let inner = (1..n).fold(json!(1), |v, _| json!({ "a": v }));
    json!({ "id": id, "n": 1, "a": inner })
}

/// Issue 19: an item nested too deep was stored and then stopped the
/// daemon. It is refused, with a reason; the other items go on, and
/// a known item that is refused is neither changed nor deleted.
#[test]
fn an_item_nested_too_deep_is_refused_and_the_others_go_on() {
    let c = connector(&NEW.replace("cursor: { max: \"{{ item.n }}\" }\n", ""));
    let d0 = run(&c, &InstanceState::default(), json!({"tx": []}));
    let page = json!({"tx": [
        deep_item("ok", MAX_DEPTH - 1),
        deep_item("limit", MAX_DEPTH),
        deep_item("over", MAX_DEPTH + 1),
    ]});
    let d1 = run(&c, &d0.state, page.clone());
    let keys: Vec<_> = d1.events.iter().map(|e| e.change_key.as_str()).collect();
    assert_eq!(keys, ["ok", "limit"]);
    assert_eq!(d1.state.seen, ["ok", "limit"]);
    assert_eq!(d1.refused.len(), 1);
    assert!(
        d1.refused[0].contains("item over on page 1 is nested deeper than 64 levels"),
        "{:?}",
        d1.refused
    );
    // Listed again: refused again, nothing else.
    let d2 = run(&c, &d1.state, page);
    assert!(d2.events.is_empty() && d2.refused.len() == 1);

    let ch = connector(
        r#"
name: ch
request: { url: "http://x/" }
items: "$.tx[*]"
id: "{{ item.id }}"
detect: changes
emit: [{ type: "x.{{ change }}" }]
"#,
    );
    let d0 = run(
        &ch,
        &InstanceState::default(),
        json!({"tx": [{"id": "k", "v": 1}]}),
    );
    let d1 = run(
        &ch,
        &d0.state,
        json!({"tx": [deep_item("k", MAX_DEPTH + 1)]}),
    );
    assert!(d1.events.is_empty(), "not deleted: {:?}", d1.events);
    assert_eq!(d1.state.known, d0.state.known, "the last version kept");
    assert_eq!(d1.refused.len(), 1);

    let snap = connector(SNAP);
    let err = detect(
        &snap,
        &vars(),
        &InstanceState::default(),
        &[deep_item("s", MAX_DEPTH + 1)],
        Utc::now(),
        None,
        LISTED,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("the resource is nested deeper than 64"),
        "{err}"
    );
    run(&snap, &InstanceState::default(), deep_item("s", MAX_DEPTH));
}

#[test]
fn seen_ttl_forgets_only_ids_that_left_the_listing() {
    let c = connector(&format!(
        "{}seen_ttl: 1h\n",
        NEW.replace("cursor: { max: \"{{ item.n }}\" }\n", "")
    ));
    let page = |ids: &[&str]| json!({ "tx": ids.iter().map(|i| json!({"id": i, "n": 1})).collect::<Vec<_>>() });
    let t0 = Utc::now();
    let d0 = detect(
        &c,
        &vars(),
        &InstanceState::default(),
        &[page(&["a", "b"])],
        t0,
        None,
        LISTED,
    )
    .unwrap();
    // Half an hour later "b" has left the listing but is younger than
    // the ttl: kept.
    let soon = t0 + chrono::Duration::minutes(30);
    let d1 = detect(&c, &vars(), &d0.state, &[page(&["a"])], soon, None, LISTED).unwrap();
    assert_eq!(d1.state.seen, ["a", "b"], "b is young");
    let later = t0 + chrono::Duration::hours(2);
    let d1 = detect(&c, &vars(), &d1.state, &[page(&["a"])], later, None, LISTED).unwrap();
    assert_eq!(d1.state.seen, ["a"], "b left and is old; a is listed");
    assert_eq!(d1.state.seen_at.len(), 1);
    assert!(d1.events.is_empty());
    // A state from before `seen_at` existed: its ids count as seen now,
    // none is dropped for want of a time, none is announced again.
    let legacy = InstanceState {
        seen_at: Default::default(),
        ..d0.state.clone()
    };
    let d2 = detect(
        &c,
        &vars(),
        &legacy,
        &[page(&["a", "b"])],
        later,
        None,
        LISTED,
    )
    .unwrap();
    assert!(d2.events.is_empty(), "{:?}", d2.events);
    assert_eq!(d2.state.seen, ["a", "b"]);
    assert_eq!(d2.state.seen_at.len(), 2);
    // Times shorter than ids: the missing ones are the oldest ids', and
    // the times there stay with their ids ("b" is old and unlisted).
    let mut partial = d0.state.clone();
    partial.seen_at = [t0.timestamp_millis()].into();
    let d3 = detect(&c, &vars(), &partial, &[page(&["a"])], later, None, LISTED).unwrap();
    assert_eq!(d3.state.seen, ["a"], "b keeps its own (old) time");
}

#[test]
fn changes_refuses_a_listing_larger_than_it_can_remember() {
    let c = connector(
        r#"
name: ch
request: { url: "http://x/" }
items: "$.tx[*]"
id: "{{ item.id }}"
detect: changes
seen_limit: 2
emit: [{ type: "x.{{ change }}" }]
"#,
    );
    let err = detect(
        &c,
        &vars(),
        &InstanceState::default(),
        &[json!({"tx": [{"id": 1}, {"id": 2}, {"id": 3}]})],
        Utc::now(),
        None,
        LISTED,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("3 distinct items"), "{err}");
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
    // "a" and "b" left the listing: two, within `seen_limit` (3).
    assert_eq!(d2.state.seen, ["a", "b", "c", "d"]);
    assert_eq!(d2.state.seen_evicted, 0);
    let d3 = run(&c, &d2.state, json!({"tx": [{"id": "e", "n": 11}]}));
    assert_eq!(d3.events.len(), 1);
    assert_eq!(
        d3.state.seen,
        ["b", "c", "d", "e"],
        "four left: the oldest goes"
    );
    assert_eq!(d3.state.seen_evicted, 1);
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
        LISTED,
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
        LISTED,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`id`"), "{err}");
}
