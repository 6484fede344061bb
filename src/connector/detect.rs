//! Detection: from the previous state and this poll's pages to the new state
//! and the changes it found. Pure: no I/O, no clock (the time is passed in),
//! so every mode is unit-tested directly.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashSet;

use chrono::{DateTime, SecondsFormat, Utc};
use minijinja::Value as Ctx;
use serde_json::{json, Map, Value};
use serde_json_path::JsonPath;

use super::columns;
use super::fetch::cursor_text;
use crate::connector::spec::{Baseline, Connector, CursorSpec, DetectMode, EventType};
use crate::event::value_hash;
use crate::store::{nested_deeper_than, InstanceState, KnownItem, MAX_DEPTH};

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
    /// Items refused whole (nested deeper than [`MAX_DEPTH`]): why, one
    /// line each. The other items went on; the poll reports these as an
    /// error of the instance.
    pub refused: Vec<String>,
}

impl Detection {
    /// True when something must be written to the store.
    pub fn changed(&self, previous: &InstanceState) -> bool {
        !self.events.is_empty() || &self.state != previous
    }
}

/// What fetching learned about the listing as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listing {
    /// The pages are the whole listing (paging ended on its own, no cap was
    /// hit): only then may `detect: changes` call a missing item deleted.
    pub complete: bool,
    /// The pages were XML: an `items` path ending in `[*]` then also takes a
    /// lone element (a feed with one `<item>`) as a one-item list, since XML
    /// cannot say "a list of one".
    pub xml: bool,
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
    listing: Listing,
) -> Result<Detection, String> {
    let complete = listing.complete;
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
    let mut out = Out::default();

    match c.detect {
        DetectMode::Snapshot => {
            let resource = pages.first().cloned().unwrap_or(Value::Null);
            let current = match &c.watch {
                None => resource.clone(),
                Some(path) => {
                    let nodes = path.query(&resource).all();
                    match nodes.len() {
                        // Not "the watched part became null": an error body.
                        0 => {
                            return Err(format!(
                                "`watch` matches nothing in the response: {}",
                                preview(&resource)
                            ))
                        }
                        1 if c.watch_key.is_none() => nodes[0].clone(),
                        _ if c.watch_key.is_some() => keyed(c, &base, &nodes)?,
                        _ => Value::Array(nodes.into_iter().cloned().collect()),
                    }
                }
            };
            if nested_deeper_than(&current, MAX_DEPTH) {
                return Err(format!(
                    "the {} is nested deeper than {MAX_DEPTH} levels, the most pollhook keeps: refused, nothing emitted: {}",
                    if c.watch.is_some() { "watched value" } else { "resource" },
                    preview(&current)
                ));
            }
            match &prev.snapshot {
                Some(p) if *p == current => out.note("snapshot", "unchanged"),
                Some(p) => {
                    state.generation += 1;
                    let key = format!("{}:{}", state.generation, value_hash(&current));
                    let mut ctx = base.clone();
                    ctx.insert("previous".into(), p.clone());
                    ctx.insert("current".into(), current.clone());
                    ctx.insert("resource".into(), resource.clone());
                    let data = json!({ "previous": p, "current": current });
                    let (fired, _) = fire(c, &ctx, &key, &data, &mut out.events, false)?;
                    out.note("snapshot", describe_fired(&fired));
                    state.snapshot = Some(current);
                }
                None => {
                    state.generation = 0;
                    if baseline == Baseline::Emit {
                        // No previous value: rules are evaluated with
                        // `previous` undefined; a rule that needs it does not fire.
                        let mut ctx = base.clone();
                        ctx.insert("current".into(), current.clone());
                        ctx.insert("resource".into(), resource.clone());
                        let data = json!({ "previous": Value::Null, "current": current });
                        let key = format!("0:{}", value_hash(&current));
                        let (fired, skipped) = fire(c, &ctx, &key, &data, &mut out.events, true)?;
                        out.note("snapshot", describe_first(&fired, &skipped));
                    } else {
                        out.note(
                            "snapshot",
                            "first value: remembered as the baseline, nothing emitted",
                        );
                    }
                    state.snapshot = Some(current);
                }
            }
        }
        DetectMode::New => {
            let items = list_items(c, &base, pages, listing.xml, &mut out)?;
            let refused_ids = std::mem::take(&mut out.refused_ids);
            // Ids of this listing are never forgotten: only ids that left
            // it are bounded (by `seen_ttl` and `seen_limit`), so a listing
            // larger than `seen_limit` is remembered whole. Only one beyond
            // what an instance may hold in memory at all is an error,
            // rather than old items announced again every poll.
            let listed: HashSet<&str> = items
                .iter()
                .map(|it| it.id.as_str())
                .chain(refused_ids.iter().map(String::as_str))
                .collect();
            check_listing_fits(listed.len(), MAX_LISTED_IDS.max(c.seen_limit))?;
            let mut seen: HashSet<String> = prev.seen.iter().cloned().collect();
            expire_seen(c, &mut state, &mut seen, now, &listed);
            for it in &items {
                if !seen.insert(it.id.clone()) {
                    out.note(&it.id, "seen before");
                    continue;
                }
                state.seen.push_back(it.id.clone());
                state.seen_at.push_back(now.timestamp_millis());
                if first_run && baseline == Baseline::Skip {
                    out.note(
                        &it.id,
                        "first poll: remembered as the baseline, nothing emitted",
                    );
                    continue;
                }
                let mut ctx = base.clone();
                ctx.insert("item".into(), it.item.clone());
                let (fired, _) = fire(c, &ctx, &it.id, &it.item, &mut out.events, false)?;
                out.note(&it.id, describe_fired(&fired));
            }
            forget_beyond(&mut state, c.seen_limit, &listed);
            advance_cursor(c, &base, prev, &mut state, pages, &items)?;
        }
        DetectMode::Changes => {
            let items = list_items(c, &base, pages, listing.xml, &mut out)?;
            let refused_ids = std::mem::take(&mut out.refused_ids);
            // Every item of the listing is kept with its version; one too
            // large to keep is an error, never a storm of `created`.
            let distinct: HashSet<&str> = items
                .iter()
                .map(|it| it.id.as_str())
                .chain(refused_ids.iter().map(String::as_str))
                .collect();
            if distinct.len() > c.seen_limit {
                let n = distinct.len();
                let limit = c.seen_limit;
                return Err(format!(
                    "the listing has {n} distinct items, more than `seen_limit` ({limit}): they cannot all be remembered, so nothing is emitted (old items would look new); raise `seen_limit` or list less (a cursor, a filter)"
                ));
            }
            // A refused item is still listed: it keeps its known version
            // and is not deleted.
            let mut present: HashSet<String> = refused_ids.iter().cloned().collect();
            for it in &items {
                if !present.insert(it.id.clone()) {
                    out.note(&it.id, "listed twice in this poll: the first one counts");
                    continue;
                }
                let mut ctx = base.clone();
                ctx.insert("item".into(), it.item.clone());
                let version = match &c.version {
                    None => value_hash(&it.item),
                    Some(t) => {
                        let v = c
                            .engine
                            .render(t, &Ctx::from_serialize(&ctx))
                            .map_err(|e| format!("`version` of item {}: {e}", it.id))?;
                        if v.is_empty() {
                            return Err(format!("`version` rendered empty for item {}", it.id));
                        }
                        v
                    }
                };
                let known = state.known.get(&it.id).cloned();
                let change = match &known {
                    Some(k) if k.version == version => {
                        out.note(&it.id, "unchanged");
                        continue;
                    }
                    Some(_) => "updated",
                    None => "created",
                };
                state.known.insert(
                    it.id.clone(),
                    KnownItem {
                        version: version.clone(),
                        item: it.item.clone(),
                    },
                );
                if first_run && baseline == Baseline::Skip {
                    out.note(
                        &it.id,
                        "first poll: remembered as the baseline, nothing emitted",
                    );
                    continue;
                }
                let previous = known.map(|k| k.item).unwrap_or(Value::Null);
                let changed = changed_fields(&previous, &it.item);
                ctx.insert("change".into(), Value::from(change));
                ctx.insert("previous".into(), previous.clone());
                ctx.insert("changed".into(), json!(changed));
                let data = if change == "created" {
                    it.item.clone()
                } else {
                    json!({ "previous": previous, "current": it.item, "changed": changed })
                };
                let key = format!("{change}:{}:{version}", it.id);
                let (fired, _) = fire(c, &ctx, &key, &data, &mut out.events, false)?;
                out.note(&it.id, format!("{change}; {}", describe_fired(&fired)));
            }
            // Deletions: only from a complete listing of everything (an
            // incremental cursor or a page cap means "not listed" says
            // nothing about existence).
            if complete && c.cursor.is_none() && !first_run {
                let gone: Vec<String> = state
                    .known
                    .keys()
                    .filter(|id| !present.contains(*id))
                    .cloned()
                    .collect();
                for id in gone {
                    let k = state.known.remove(&id).expect("listed above");
                    let mut ctx = base.clone();
                    ctx.insert("change".into(), Value::from("deleted"));
                    ctx.insert("item".into(), k.item.clone());
                    ctx.insert("previous".into(), k.item.clone());
                    ctx.insert("changed".into(), json!([]));
                    let key = format!("deleted:{id}:{}", k.version);
                    let (fired, _) = fire(c, &ctx, &key, &k.item, &mut out.events, false)?;
                    out.note(&id, format!("deleted; {}", describe_fired(&fired)));
                }
            } else if !complete {
                out.note(
                    "listing",
                    "incomplete (page cap reached): no item is considered deleted",
                );
            }
            advance_cursor(c, &base, prev, &mut state, pages, &items)?;
        }
    }
    Ok(Detection {
        state,
        events: out.events,
        notes: out.notes,
        refused: out.refused,
    })
}

#[derive(Default)]
struct Out {
    events: Vec<Detected>,
    notes: Vec<Note>,
    refused: Vec<String>,
    /// Ids of the refused items: still listed.
    refused_ids: Vec<String>,
}

impl Out {
    fn note(&mut self, record: &str, outcome: impl Into<String>) {
        self.notes.push(Note {
            record: record.to_string(),
            outcome: outcome.into(),
        });
    }
}

/// A watched list as a set (`watch_key`): a map from each item's key to
/// its watched value (`watch_value`, or the item), keys in sorted order, so
/// the same items in another order are the same value (and the same hash).
/// `nodes` are what `watch` matched: the items, or one list of them.
fn keyed(c: &Connector, base: &Map<String, Value>, nodes: &[&Value]) -> Result<Value, String> {
    let key_tpl = c.watch_key.as_ref().expect("called with a watch_key");
    let items: Vec<&Value> = match nodes {
        [Value::Array(a)] => a.iter().collect(),
        _ => nodes.to_vec(),
    };
    let mut map = std::collections::BTreeMap::new();
    for item in items {
        let mut ctx = base.clone();
        ctx.insert("item".into(), item.clone());
        let ctx = Ctx::from_serialize(&ctx);
        let key = c
            .engine
            .render(key_tpl, &ctx)
            .map_err(|e| format!("`watch_key` of {}: {e}", preview(item)))?;
        if key.trim().is_empty() {
            return Err(format!("`watch_key` rendered empty for {}", preview(item)));
        }
        let value = match &c.watch_value {
            None => item.clone(),
            Some(t) => c
                .engine
                .render_value(t, &ctx)
                .map_err(|e| format!("`watch_value` of {}: {e}", preview(item)))?,
        };
        if map.insert(key.clone(), value).is_some() {
            return Err(format!(
                "`watch_key` gives `{key}` to two items of the watched list: a key must tell the items apart (e.g. add a second field)"
            ));
        }
    }
    Ok(Value::Object(map.into_iter().collect()))
}

/// One item of a listing with its rendered id.
struct Listed {
    id: String,
    item: Value,
}

/// The items of every page, in order, each with its id. An item nested
/// deeper than [`MAX_DEPTH`] is left out, noted and counted as refused in
/// `out`: one such item must not stop the instance's other items.
fn list_items(
    c: &Connector,
    base: &Map<String, Value>,
    pages: &[Value],
    xml: bool,
    out: &mut Out,
) -> Result<Vec<Listed>, String> {
    let items_path = c.items.as_ref().ok_or("a list mode without `items`")?;
    let id_tpl = c.id.as_ref().ok_or("a list mode without `id`")?;
    let mut listed = Vec::new();
    for (page_no, page) in pages.iter().enumerate() {
        // A JSON page without the list's parent (`{"error": …}` where
        // `{"items": […]}` was expected) is not an empty listing: treating
        // it as one would call every item deleted.
        if let (Some(parent), false) = (
            c.items_parent.as_ref().or(c.columnar.then_some(items_path)),
            xml,
        ) {
            if parent.query(page).is_empty() {
                return Err(format!(
                    "page {} has no list at `items` (its parent is missing), so it is not a listing: {}",
                    page_no + 1,
                    preview(page)
                ));
            }
        }
        let nodes = items_of(c, items_path, page, xml);
        for item in &nodes {
            let item: &Value = item;
            let mut ctx = base.clone();
            ctx.insert("item".into(), item.clone());
            let id = c
                .engine
                .render(id_tpl, &Ctx::from_serialize(&ctx))
                .map_err(|e| format!("`id` of an item on page {}: {e}", page_no + 1))?;
            // A null renders as `None`; only then is the id evaluated as a
            // value to tell a null from an id that is the text "None".
            let null_id = id.eq_ignore_ascii_case("none")
                && c.id_value.as_ref().is_some_and(|v| {
                    c.engine
                        .render_value(v, &Ctx::from_serialize(&ctx))
                        .is_ok_and(|v| v.is_null())
                });
            if id.trim().is_empty() || null_id {
                // An empty id would make every such item "the same" (all
                // but one lost) or, worse, none of them remembered (an
                // event storm): refuse the whole poll instead.
                return Err(format!(
                    "`id` rendered empty (or null) for an item on page {}: {}",
                    page_no + 1,
                    preview(item)
                ));
            }
            if nested_deeper_than(item, MAX_DEPTH) {
                let why = format!(
                    "item {id} on page {} is nested deeper than {MAX_DEPTH} levels, the most pollhook keeps: refused (the other items go on)",
                    page_no + 1
                );
                out.note(&id, why.clone());
                out.refused.push(why);
                out.refused_ids.push(id);
                continue;
            }
            listed.push(Listed {
                id,
                item: item.clone(),
            });
        }
    }
    Ok(listed)
}

/// The items `items` finds on one page: what detection lists and what
/// `pollhook test` counts as records, so both agree. On XML, an `items`
/// path ending in `[*]` also takes a lone element as a list of one (XML
/// cannot say "a list of one"; a feed with one `<entry>` is one record, not
/// the entry's child elements). With `columnar`, each selected object of
/// parallel arrays gives its rows (`columns::rows`), made here, hence owned.
pub fn items_of<'a>(
    c: &Connector,
    items: &JsonPath,
    page: &'a Value,
    xml: bool,
) -> Vec<Cow<'a, Value>> {
    if c.columnar {
        return items
            .query(page)
            .all()
            .into_iter()
            .flat_map(columns::rows)
            .map(Cow::Owned)
            .collect();
    }
    let nodes = match (&c.items_parent, xml) {
        (Some(parent), true) => parent
            .query(page)
            .all()
            .into_iter()
            .flat_map(|n| match n {
                Value::Array(a) => a.iter().collect::<Vec<_>>(),
                other => vec![other],
            })
            .collect(),
        _ => items.query(page).all(),
    };
    nodes.into_iter().map(Cow::Borrowed).collect()
}

/// A short rendering of an item for error messages.
pub(crate) fn preview(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}

/// The most distinct ids one listing of a `detect: new` instance may have.
/// Every id of the latest listing is remembered whatever `seen_limit` says
/// (which bounds only the ids that left it), so this is the hard bound on
/// what an instance holds in memory and writes: ten times the default
/// `seen_limit` (or `seen_limit`, when one is set higher).
pub const MAX_LISTED_IDS: usize = 100_000;

/// A listing of `n` distinct items must fit the hard bound of what an
/// instance remembers, or detection cannot tell old items from new ones.
/// Pure.
fn check_listing_fits(n: usize, limit: usize) -> Result<(), String> {
    if n > limit {
        return Err(format!(
            "the listing has {n} distinct items, more than the {limit} an instance can remember: nothing is emitted (old items would look new); list less (a cursor, a filter)"
        ));
    }
    Ok(())
}

/// Forgets ids older than `seen_ttl` that are not in the current listing,
/// counting them as evictions.
fn expire_seen(
    c: &Connector,
    state: &mut InstanceState,
    seen: &mut HashSet<String>,
    now: DateTime<Utc>,
    listed: &HashSet<&str>,
) {
    // States written before `seen_at` existed: their ids count as seen now.
    while state.seen_at.len() < state.seen.len() {
        state.seen_at.push_front(now.timestamp_millis());
    }
    let Some(ttl) = c.seen_ttl else { return };
    let oldest = now.timestamp_millis() - ttl.as_millis() as i64;
    retain_seen(state, |id, at| {
        let keep = at >= oldest || listed.contains(id);
        if !keep {
            seen.remove(id);
        }
        keep
    });
}

/// Keeps every id of the current listing and at most `limit` of the ids
/// that left it, forgetting the oldest of those first.
fn forget_beyond(state: &mut InstanceState, limit: usize, listed: &HashSet<&str>) {
    let unlisted = state
        .seen
        .iter()
        .filter(|id| !listed.contains(id.as_str()))
        .count();
    let mut excess = unlisted.saturating_sub(limit);
    if excess == 0 {
        return;
    }
    retain_seen(state, |id, _| {
        if excess > 0 && !listed.contains(id) {
            excess -= 1;
            false
        } else {
            true
        }
    });
}

/// Keeps the seen ids (and their times, in step) for which `keep` says so,
/// in order; counts the others as evictions. One pass.
fn retain_seen(state: &mut InstanceState, mut keep: impl FnMut(&str, i64) -> bool) {
    let ids = std::mem::take(&mut state.seen);
    let times = std::mem::take(&mut state.seen_at);
    for (id, at) in ids.into_iter().zip(times) {
        if keep(&id, at) {
            state.seen.push_back(id);
            state.seen_at.push_back(at);
        } else {
            state.seen_evicted += 1;
        }
    }
}

/// Moves the cursor: the API's opaque cursor of the last page, or the
/// greatest `max` value, never backwards.
fn advance_cursor(
    c: &Connector,
    base: &Map<String, Value>,
    prev: &InstanceState,
    state: &mut InstanceState,
    pages: &[Value],
    items: &[Listed],
) -> Result<(), String> {
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
        Some(CursorSpec::Max(t)) => {
            let mut max: Option<String> = None;
            for it in items {
                let mut ctx = base.clone();
                ctx.insert("item".into(), it.item.clone());
                let v = c
                    .engine
                    .render(t, &Ctx::from_serialize(&ctx))
                    .map_err(|e| format!("`cursor.max` of item {}: {e}", it.id))?;
                if !v.is_empty()
                    && max
                        .as_ref()
                        .is_none_or(|m| cmp_cursor(&v, m) == Ordering::Greater)
                {
                    max = Some(v);
                }
            }
            // Never move a max-cursor backwards: an API that returns older
            // items (a `>=` boundary, a lookback window) must not rewind it.
            if let Some(m) = max {
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
    Ok(())
}

/// Dotted paths of the fields that differ between two versions of an item
/// (objects are compared key by key, recursively; anything else as a whole).
pub fn changed_fields(before: &Value, after: &Value) -> Vec<String> {
    fn walk(prefix: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    match (x.get(k), y.get(k)) {
                        (Some(p), Some(q)) => walk(&path, p, q, out),
                        _ => out.push(path),
                    }
                }
            }
            _ if a != b => out.push(if prefix.is_empty() {
                "$".into()
            } else {
                prefix.to_string()
            }),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if before.is_null() {
        return out;
    }
    walk("", before, after, &mut out);
    out
}

/// Evaluates every emit rule; pushes an event per rule that fires. With
/// `lenient` (a baseline snapshot, which has no `previous`), a rule whose
/// `when`, `type` or `data` cannot be evaluated does not fire instead of
/// failing the poll; the second list says which and why.
fn fire(
    c: &Connector,
    ctx: &Map<String, Value>,
    key: &str,
    default_data: &Value,
    events: &mut Vec<Detected>,
    lenient: bool,
) -> Result<(Vec<String>, Vec<String>), String> {
    let ctx = Ctx::from_serialize(ctx);
    let mut fired = Vec::new();
    let mut skipped = Vec::new();
    for rule in &c.emit {
        let ok = match &rule.when {
            None => true,
            Some(w) => match c.engine.test(w, &ctx) {
                Ok(b) => b,
                Err(_) if lenient => false,
                Err(e) => return Err(format!("`when` of `{}`: {e}", rule.kind.source())),
            },
        };
        if !ok {
            continue;
        }
        let kind = match &rule.kind {
            EventType::Fixed(k) => k.clone(),
            EventType::Template(t, src) => {
                let k = match c.engine.render(t, &ctx) {
                    Ok(k) => k,
                    Err(e) if lenient => {
                        skipped.push(format!("`{src}` (its `type`: {e})"));
                        continue;
                    }
                    Err(e) => return Err(format!("`type: {src}`: {e}")),
                };
                let k = k.trim().to_string();
                if k.is_empty() || k.contains(char::is_whitespace) {
                    return Err(format!(
                        "`type: {src}` rendered `{k}`, which is not an event type"
                    ));
                }
                k
            }
        };
        let data = match &rule.data {
            None => default_data.clone(),
            Some(t) => match c.engine.render_value(t, &ctx) {
                Ok(d) => d,
                Err(e) if lenient => {
                    skipped.push(format!("{kind} (its `data`: {e})"));
                    continue;
                }
                Err(e) => return Err(format!("`data` of `{kind}`: {e}")),
            },
        };
        fired.push(kind.clone());
        events.push(Detected {
            kind,
            change_key: key.to_string(),
            data,
        });
    }
    Ok((fired, skipped))
}

/// What a baseline snapshot emitted, and which rules could not fire
/// without a previous value.
fn describe_first(fired: &[String], skipped: &[String]) -> String {
    let emitted = if fired.is_empty() {
        "nothing emitted".to_string()
    } else {
        format!("emits {}", fired.join(", "))
    };
    if skipped.is_empty() {
        if fired.is_empty() {
            return "first value; no rule fires without a previous value: nothing emitted".into();
        }
        return format!("first value; {emitted}");
    }
    format!(
        "first value; {emitted}; needing a previous value, which a first value has not, so not emitted: {}",
        skipped.join(", ")
    )
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
    // Integers exactly (19-digit ids do not survive f64), then timestamps as
    // instants (fractions and offsets do not sort as text), then decimals,
    // then text.
    if let (Ok(x), Ok(y)) = (a.trim().parse::<i128>(), b.trim().parse::<i128>()) {
        return x.cmp(&y);
    }
    if let (Ok(x), Ok(y)) = (
        chrono::DateTime::parse_from_rfc3339(a.trim()),
        chrono::DateTime::parse_from_rfc3339(b.trim()),
    ) {
        return x.cmp(&y);
    }
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
        _ => a.cmp(b),
    }
}

#[cfg(test)]
mod tests;
