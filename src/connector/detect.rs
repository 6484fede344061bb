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
use crate::store::Snapshot;
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

/// Why a poll's pages could not be detected: nothing is emitted and the
/// state stays, so the next poll tries again. The messages are the
/// instance's `last_error` and `pollhook test`'s output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetectError {
    /// A snapshot's `watch` found nothing: an error body, not "the watched
    /// part became null".
    #[error("`watch` matches nothing in the response: {preview}")]
    WatchMatchesNothing { preview: String },
    /// The snapshot is deeper than the store keeps.
    #[error("the {what} is nested deeper than {MAX_DEPTH} levels, the most pollhook keeps: refused, nothing emitted: {preview}")]
    TooDeep { what: &'static str, preview: String },
    /// A template of the connector failed to render; `what` says which
    /// field, for which item.
    #[error("{what}: {detail}")]
    Render {
        what: String,
        detail: crate::template::TemplateError,
    },
    /// A key, version (`what`, for `of`) rendered empty: it would make
    /// items the same.
    #[error("`{what}` rendered empty for {of}")]
    Empty { what: &'static str, of: String },
    /// An item's `id` rendered empty or null.
    #[error("`id` rendered empty (or null) for an item on page {page}: {preview}")]
    EmptyId { page: usize, preview: String },
    /// Two items of a watched list have one `watch_key`.
    #[error("`watch_key` gives `{key}` to two items of the watched list: a key must tell the items apart (e.g. add a second field)")]
    DuplicateKey { key: String },
    /// A `type` template rendered something that is not an event type.
    #[error("`type: {written}` rendered `{rendered}`, which is not an event type")]
    NotAnEventType { written: String, rendered: String },
    /// A JSON page without the list's parent.
    #[error("page {page} has no list at `items` (its parent is missing), so it is not a listing: {preview}")]
    NotAListing { page: usize, preview: String },
    /// A listing beyond what an instance can remember at all.
    #[error("the listing has {n} distinct items, more than the {limit} an instance can remember: nothing is emitted (old items would look new); list less (a cursor, a filter)")]
    TooManyListed { n: usize, limit: usize },
    /// A `detect: changes` listing beyond `seen_limit`.
    #[error("the listing has {n} distinct items, more than `seen_limit` ({limit}): they cannot all be remembered, so nothing is emitted (old items would look new); raise `seen_limit` or list less (a cursor, a filter)")]
    BeyondSeenLimit { n: usize, limit: usize },
    /// A list mode without `items` or `id` (refused at load).
    #[error("a list mode without `{0}`")]
    Missing(&'static str),
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
) -> Result<Detection, DetectError> {
    let mut state = prev.clone();
    state.initialized = true;
    let mut run = Run {
        c,
        base: base_context(vars, prev, now),
        prev,
        state,
        out: Out::default(),
        first_run: !prev.initialized,
        baseline: baseline.unwrap_or(c.baseline),
        now,
    };
    match c.detect {
        DetectMode::Snapshot => run.snapshot(pages)?,
        DetectMode::New => run.new_items(pages, listing.xml)?,
        DetectMode::Changes => run.changes(pages, listing)?,
    }
    Ok(Detection {
        state: run.state,
        events: run.out.events,
        notes: run.out.notes,
        refused: run.out.refused,
    })
}

/// What every template of this poll sees besides the item: the instance's
/// variables, the stored cursor and the poll's time.
fn base_context(
    vars: &Map<String, Value>,
    prev: &InstanceState,
    now: DateTime<Utc>,
) -> Map<String, Value> {
    let mut base = vars.clone();
    if let Some(cur) = &prev.cursor {
        base.insert("cursor".into(), Value::String(cur.clone()));
    }
    base.insert(
        "now".into(),
        Value::String(now.to_rfc3339_opts(SecondsFormat::Secs, true)),
    );
    base
}

/// One detection in progress: what each mode reads (connector, base
/// context, previous state) and what it builds (the next state, the
/// events and notes), so the modes are steps that share no loose
/// arguments.
struct Run<'a> {
    c: &'a Connector,
    base: Map<String, Value>,
    prev: &'a InstanceState,
    state: InstanceState,
    out: Out,
    first_run: bool,
    baseline: Baseline,
    now: DateTime<Utc>,
}

impl Run<'_> {
    /// `detect: snapshot`: the watched value against the stored one.
    fn snapshot(&mut self, pages: &[Value]) -> Result<(), DetectError> {
        let c = self.c;
        let resource = pages.first().cloned().unwrap_or(Value::Null);
        let current = watched(c, &self.base, &resource)?;
        if nested_deeper_than(&current, MAX_DEPTH) {
            return Err(DetectError::TooDeep {
                what: if c.watch.is_some() {
                    "watched value"
                } else {
                    "resource"
                },
                preview: preview(&current),
            });
        }
        match self.prev.snapshot.as_ref().map(Snapshot::value) {
            Some(p) if p == current => self.out.note("snapshot", "unchanged"),
            Some(p) => {
                self.state.generation += 1;
                let key = format!("{}:{}", self.state.generation, value_hash(&current));
                let mut ctx = self.base.clone();
                ctx.insert("previous".into(), p.clone());
                ctx.insert("current".into(), current.clone());
                ctx.insert("resource".into(), resource);
                let data = json!({ "previous": p, "current": current });
                let (fired, _) = fire(c, &ctx, &key, &data, &mut self.out.events, false)?;
                self.out.note("snapshot", describe_fired(&fired));
                self.state.snapshot = Some(Snapshot::of(&current));
            }
            None => self.first_snapshot(current, resource)?,
        }
        Ok(())
    }

    /// The first value of a snapshot: the baseline, emitted only when the
    /// baseline says so.
    fn first_snapshot(&mut self, current: Value, resource: Value) -> Result<(), DetectError> {
        self.state.generation = 0;
        if self.baseline == Baseline::Emit {
            // No previous value: rules are evaluated with
            // `previous` undefined; a rule that needs it does not fire.
            let mut ctx = self.base.clone();
            ctx.insert("current".into(), current.clone());
            ctx.insert("resource".into(), resource);
            let data = json!({ "previous": Value::Null, "current": current });
            let key = format!("0:{}", value_hash(&current));
            let (fired, skipped) = fire(self.c, &ctx, &key, &data, &mut self.out.events, true)?;
            self.out.note("snapshot", describe_first(&fired, &skipped));
        } else {
            self.out.note(
                "snapshot",
                "first value: remembered as the baseline, nothing emitted",
            );
        }
        self.state.snapshot = Some(Snapshot::of(&current));
        Ok(())
    }

    /// `detect: new`: every id not seen before is an event.
    fn new_items(&mut self, pages: &[Value], xml: bool) -> Result<(), DetectError> {
        let c = self.c;
        let items = list_items(c, &self.base, pages, xml, &mut self.out)?;
        let refused_ids = std::mem::take(&mut self.out.refused_ids);
        // Ids of this listing are never forgotten: only ids that left
        // it are bounded (by `seen_ttl` and `seen_limit`), so a listing
        // larger than `seen_limit` is remembered whole. Only one beyond
        // what an instance may hold in memory at all is an error,
        // rather than old items announced again every poll.
        let listed = distinct_ids(&items, &refused_ids);
        check_listing_fits(listed.len(), MAX_LISTED_IDS.max(c.seen_limit))?;
        let mut seen: HashSet<String> = self.prev.seen.iter().cloned().collect();
        expire_seen(c, &mut self.state, &mut seen, self.now, &listed);
        for it in &items {
            if !seen.insert(it.id.clone()) {
                self.out.note(&it.id, "seen before");
                continue;
            }
            self.state.seen.push_back(it.id.clone());
            self.state.seen_at.push_back(self.now.timestamp_millis());
            if self.skips_baseline() {
                self.out.note(
                    &it.id,
                    "first poll: remembered as the baseline, nothing emitted",
                );
                continue;
            }
            let mut ctx = self.base.clone();
            ctx.insert("item".into(), it.item.clone());
            let (fired, _) = fire(c, &ctx, &it.id, &it.item, &mut self.out.events, false)?;
            self.out.note(&it.id, describe_fired(&fired));
        }
        forget_beyond(&mut self.state, c.seen_limit, &listed);
        advance_cursor(c, &self.base, self.prev, &mut self.state, pages, &items)
    }

    /// `detect: changes`: each item against its known version, then the
    /// known items no longer listed.
    fn changes(&mut self, pages: &[Value], listing: Listing) -> Result<(), DetectError> {
        let c = self.c;
        let items = list_items(c, &self.base, pages, listing.xml, &mut self.out)?;
        let refused_ids = std::mem::take(&mut self.out.refused_ids);
        // Every item of the listing is kept with its version; one too
        // large to keep is an error, never a storm of `created`.
        check_changes_fit(distinct_ids(&items, &refused_ids).len(), c.seen_limit)?;
        // A refused item is still listed: it keeps its known version
        // and is not deleted.
        let mut present: HashSet<String> = refused_ids.iter().cloned().collect();
        for it in &items {
            if !present.insert(it.id.clone()) {
                self.out
                    .note(&it.id, "listed twice in this poll: the first one counts");
                continue;
            }
            self.change(it)?;
        }
        // Deletions: only from a complete listing of everything (an
        // incremental cursor or a page cap means "not listed" says
        // nothing about existence).
        if listing.complete && c.cursor.is_none() && !self.first_run {
            self.deletions(&present)?;
        } else if !listing.complete {
            self.out.note(
                "listing",
                "incomplete (page cap reached): no item is considered deleted",
            );
        }
        advance_cursor(c, &self.base, self.prev, &mut self.state, pages, &items)
    }

    /// One listed item of `detect: changes`: created, updated or unchanged.
    fn change(&mut self, it: &ListedItem) -> Result<(), DetectError> {
        let c = self.c;
        let mut ctx = self.base.clone();
        ctx.insert("item".into(), it.item.clone());
        let version = item_version(c, &ctx, it)?;
        let known = self.state.known.get(&it.id).cloned();
        let change = match &known {
            Some(k) if k.version == version => {
                self.out.note(&it.id, "unchanged");
                return Ok(());
            }
            Some(_) => "updated",
            None => "created",
        };
        self.state.known.insert(
            it.id.clone(),
            KnownItem {
                version: version.clone(),
                item: it.item.clone(),
            },
        );
        if self.skips_baseline() {
            self.out.note(
                &it.id,
                "first poll: remembered as the baseline, nothing emitted",
            );
            return Ok(());
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
        let (fired, _) = fire(c, &ctx, &key, &data, &mut self.out.events, false)?;
        self.out
            .note(&it.id, format!("{change}; {}", describe_fired(&fired)));
        Ok(())
    }

    /// Every known item not `present` in this (complete) listing: deleted.
    fn deletions(&mut self, present: &HashSet<String>) -> Result<(), DetectError> {
        let gone: Vec<String> = self
            .state
            .known
            .keys()
            .filter(|id| !present.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            let k = self.state.known.remove(&id).expect("listed above");
            let mut ctx = self.base.clone();
            ctx.insert("change".into(), Value::from("deleted"));
            ctx.insert("item".into(), k.item.clone());
            ctx.insert("previous".into(), k.item.clone());
            ctx.insert("changed".into(), json!([]));
            let key = format!("deleted:{id}:{}", k.version);
            let (fired, _) = fire(self.c, &ctx, &key, &k.item, &mut self.out.events, false)?;
            self.out
                .note(&id, format!("deleted; {}", describe_fired(&fired)));
        }
        Ok(())
    }

    /// A first poll whose baseline is `skip` remembers items without
    /// emitting them.
    fn skips_baseline(&self) -> bool {
        self.first_run && self.baseline == Baseline::Skip
    }
}

/// The value a snapshot compares: the resource, or what `watch` matches in
/// it (one node, a list of nodes, or a keyed map with `watch_key`).
fn watched(
    c: &Connector,
    base: &Map<String, Value>,
    resource: &Value,
) -> Result<Value, DetectError> {
    let Some(path) = &c.watch else {
        return Ok(resource.clone());
    };
    let nodes = path.query(resource).all();
    match nodes.len() {
        // Not "the watched part became null": an error body.
        0 => Err(DetectError::WatchMatchesNothing {
            preview: preview(resource),
        }),
        1 if c.watch_key.is_none() => Ok(nodes[0].clone()),
        _ if c.watch_key.is_some() => keyed(c, base, &nodes),
        _ => Ok(Value::Array(nodes.into_iter().cloned().collect())),
    }
}

/// The ids of a listing, refused items included (they are still listed).
fn distinct_ids<'a>(items: &'a [ListedItem], refused_ids: &'a [String]) -> HashSet<&'a str> {
    items
        .iter()
        .map(|it| it.id.as_str())
        .chain(refused_ids.iter().map(String::as_str))
        .collect()
}

/// A `detect: changes` listing must fit `seen_limit`: every item is kept
/// with its version. Pure.
fn check_changes_fit(n: usize, limit: usize) -> Result<(), DetectError> {
    if n > limit {
        return Err(DetectError::BeyondSeenLimit { n, limit });
    }
    Ok(())
}

/// An item's version: its `version` template, or the hash of the item.
fn item_version(
    c: &Connector,
    ctx: &Map<String, Value>,
    it: &ListedItem,
) -> Result<String, DetectError> {
    let Some(t) = &c.version else {
        return Ok(value_hash(&it.item));
    };
    let v = c
        .engine
        .render(t, &Ctx::from_serialize(ctx))
        .map_err(|detail| DetectError::Render {
            what: format!("`version` of item {}", it.id),
            detail,
        })?;
    if v.is_empty() {
        return Err(DetectError::Empty {
            what: "version",
            of: format!("item {}", it.id),
        });
    }
    Ok(v)
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
fn keyed(c: &Connector, base: &Map<String, Value>, nodes: &[&Value]) -> Result<Value, DetectError> {
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
            .map_err(|detail| DetectError::Render {
                what: format!("`watch_key` of {}", preview(item)),
                detail,
            })?;
        if key.trim().is_empty() {
            return Err(DetectError::Empty {
                what: "watch_key",
                of: preview(item),
            });
        }
        let value = match &c.watch_value {
            None => item.clone(),
            Some(t) => c
                .engine
                .render_value(t, &ctx)
                .map_err(|detail| DetectError::Render {
                    what: format!("`watch_value` of {}", preview(item)),
                    detail,
                })?,
        };
        if map.insert(key.clone(), value).is_some() {
            return Err(DetectError::DuplicateKey { key });
        }
    }
    Ok(Value::Object(map.into_iter().collect()))
}

/// One item of a listing with its rendered id.
struct ListedItem {
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
) -> Result<Vec<ListedItem>, DetectError> {
    let items_path = c.items.as_ref().ok_or(DetectError::Missing("items"))?;
    let id_tpl = c.id.as_ref().ok_or(DetectError::Missing("id"))?;
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
                return Err(DetectError::NotAListing {
                    page: page_no + 1,
                    preview: preview(page),
                });
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
                .map_err(|detail| DetectError::Render {
                    what: format!("`id` of an item on page {}", page_no + 1),
                    detail,
                })?;
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
                return Err(DetectError::EmptyId {
                    page: page_no + 1,
                    preview: preview(item),
                });
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
            listed.push(ListedItem {
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
fn check_listing_fits(n: usize, limit: usize) -> Result<(), DetectError> {
    if n > limit {
        return Err(DetectError::TooManyListed { n, limit });
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
    items: &[ListedItem],
) -> Result<(), DetectError> {
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
                    .map_err(|detail| DetectError::Render {
                        what: format!("`cursor.max` of item {}", it.id),
                        detail,
                    })?;
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
) -> Result<(Vec<String>, Vec<String>), DetectError> {
    let ctx = Ctx::from_serialize(ctx);
    let mut fired = Vec::new();
    let mut skipped = Vec::new();
    for rule in &c.emit {
        let ok = match &rule.when {
            None => true,
            Some(w) => match c.engine.test(w, &ctx) {
                Ok(b) => b,
                Err(_) if lenient => false,
                Err(detail) => {
                    return Err(DetectError::Render {
                        what: format!("`when` of `{}`", rule.kind.source()),
                        detail,
                    })
                }
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
                    Err(detail) => {
                        return Err(DetectError::Render {
                            what: format!("`type: {src}`"),
                            detail,
                        })
                    }
                };
                let k = k.trim().to_string();
                if k.is_empty() || k.contains(char::is_whitespace) {
                    return Err(DetectError::NotAnEventType {
                        written: src.to_string(),
                        rendered: k,
                    });
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
                Err(detail) => {
                    return Err(DetectError::Render {
                        what: format!("`data` of `{kind}`"),
                        detail,
                    })
                }
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
        "filtered out: no `when` condition is true, nothing emitted".into()
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
