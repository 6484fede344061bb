//! `cursor:` (where the next poll resumes) and `paginate:` (more pages
//! within one poll).

use std::time::Duration;

use super::{checked_path, Cx, ITEM_VARS};
use crate::config::raw::RawConnector;
use crate::connector::spec::{CursorSpec, PageStyle, Paginate};
use crate::template;

/// The cursor and its lookback.
pub(super) fn cursor(cx: &mut Cx, raw: &RawConnector) -> (Option<CursorSpec>, Option<Duration>) {
    let Some(c) = &raw.cursor else {
        return (None, None);
    };
    let lookback = c.lookback.map(|d| d.0);
    let cursor = match (&c.from, &c.max) {
        (Some(p), None) => Some(CursorSpec::From(checked_path(&p.value.0))),
        (None, Some(t)) => cx.template(t, "cursor.max", ITEM_VARS).map(CursorSpec::Max),
        _ => {
            let line = cx.diag.line_of("cursor");
            cx.diag.at(
                line,
                0,
                "cursor",
                "give exactly one of `from` (a JSONPath to an opaque cursor) and `max` (a template over items)",
            );
            None
        }
    };
    (cursor, lookback)
}

/// Pages read in one poll when `paginate.max_pages` is not given.
pub const DEFAULT_MAX_PAGES: u32 = 100;
/// The most `paginate.max_pages` may say: each page is a request, and an
/// upstream that always has a next page gets them all every poll.
pub const MAX_PAGES: u32 = 1000;

/// `paginate:`, exactly one style; `page` and `offset` need `items`.
pub(super) fn paginate(cx: &mut Cx, raw: &RawConnector, has_items: bool) -> Option<Paginate> {
    let p = raw.paginate.as_ref()?;
    let line = cx.diag.line_of("paginate");
    let mut styles = Vec::new();
    match (&p.cursor_from, &p.param) {
        (Some(from), Some(param)) => styles.push(PageStyle::Cursor {
            from: checked_path(&from.value.0),
            param: param.clone(),
        }),
        (None, None) => {}
        _ => cx.diag.at(
            line,
            0,
            "paginate",
            "the cursor style needs both `cursor_from` (JSONPath of the next cursor) and `param` (the query parameter that carries it)",
        ),
    }
    if let Some(n) = &p.next_url {
        styles.push(PageStyle::NextUrl(checked_path(&n.value.0)));
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
        cx.check_vars(
            &template::variables_of_condition(&w.value.0),
            &["page", "count", "now"],
            w,
            "paginate.stop_when",
        );
        cx.engine.condition(&w.value.0).ok()
    });
    if styles.len() != 1 {
        cx.diag.at(
            line,
            0,
            "paginate",
            format!(
                "expected exactly one paging style (`cursor_from` + `param`, `next_url`, `link_header: true`, `page`, `offset`), found {}",
                styles.len()
            ),
        );
        return None;
    }
    let style = styles.pop().expect("one");
    if matches!(style, PageStyle::Page { .. } | PageStyle::Offset { .. }) && !has_items {
        cx.diag.at(
            line,
            0,
            "paginate",
            "`page` and `offset` paging need `items:` to see when a page is empty",
        );
    }
    let max_pages = p.max_pages.unwrap_or(DEFAULT_MAX_PAGES).max(1);
    if max_pages > MAX_PAGES {
        let at = match cx.diag.line_of("max_pages") {
            0 => line,
            l => l,
        };
        cx.diag.at(
            at,
            0,
            "paginate.max_pages",
            format!(
                "{max_pages} pages in one poll is more than the {MAX_PAGES} allowed: an upstream that always has a next page would get that many requests per poll (default {DEFAULT_MAX_PAGES})"
            ),
        );
    }
    Some(Paginate {
        style,
        stop_when,
        max_pages: max_pages.min(MAX_PAGES),
        conditional: p.conditional.unwrap_or(false),
        allow_hosts: p
            .allow_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
    })
}
