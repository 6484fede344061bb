//! `detect:` (which fields each mode needs) and the `emit:` rules.

use serde_saphyr::Spanned;

use super::Cx;
use crate::config::raw::{RawConnector, TemplateSrc};
use crate::connector::spec::{DetectMode, EmitRule, EventType};
use crate::template;

/// Reports fields the detection mode needs but lacks, or cannot use.
pub(super) fn check_detect(cx: &mut Cx, raw: &RawConnector) {
    if let Some(c) = raw.columnar.as_ref().filter(|c| c.value) {
        if raw
            .items
            .as_ref()
            .is_some_and(|i| i.value.0.trim().ends_with("[*]"))
        {
            cx.diag.at_span(c, "columnar", "with `columnar: true`, `items` selects the object of columns (e.g. `$.filings.recent`), not their entries: drop the final `[*]`");
        }
    }
    let mut problem = |msg: &str| cx.diag.at_span(&raw.detect, "detect", msg);
    match raw.detect.value {
        DetectMode::New | DetectMode::Changes => {
            if raw.items.is_none() {
                problem("`detect: new` and `detect: changes` need `items:` (a JSONPath to the list, e.g. `$.transactions[*]`)");
            }
            if raw.id.is_none() {
                problem("`detect: new` and `detect: changes` need `id:` (a template naming what makes an item unique, e.g. `{{ item.id }}`)");
            }
            if raw.watch.is_some() || raw.watch_key.is_some() || raw.watch_value.is_some() {
                problem("`watch`, `watch_key` and `watch_value` belong to `detect: snapshot`");
            }
            if raw.detect.value == DetectMode::New && raw.version.is_some() {
                problem(
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
                || raw.columnar.is_some()
            {
                problem("`detect: snapshot` watches one resource: `items`, `columnar`, `id`, `version`, `cursor` and `paginate` belong to `detect: new` / `changes`");
            }
            if raw.watch_key.is_some() && raw.watch.is_none() {
                problem("`watch_key` keys the list that `watch` selects: give `watch:` (e.g. `$.balances[*]`)");
            }
            if raw.watch_value.is_some() && raw.watch_key.is_none() {
                problem(
                    "`watch_value` picks what of each item `watch_key` keys: give `watch_key:` too",
                );
            }
        }
    }
    if raw.emit.is_empty() {
        problem("`emit:` is empty: give at least one `- type: …` rule");
    }
}

/// The `emit:` rules, their templates over the mode's variables.
pub(super) fn emit_rules(cx: &mut Cx, raw: &RawConnector) -> Vec<EmitRule> {
    let vars: &[&str] = match raw.detect.value {
        DetectMode::New => &["item", "cursor", "now"],
        DetectMode::Changes => &["item", "previous", "change", "changed", "cursor", "now"],
        DetectMode::Snapshot => &["previous", "current", "resource", "now"],
    };
    let mut emit = Vec::new();
    for (i, e) in raw.emit.iter().enumerate() {
        let when = e.when.as_ref().and_then(|w| {
            let field = format!("emit[{i}].when");
            cx.check_vars(
                &template::variables_of_condition(&w.value.0),
                vars,
                w,
                &field,
            );
            match cx.engine.condition(&w.value.0) {
                Ok(c) => Some(c),
                Err(msg) => {
                    cx.diag.at_span(w, &field, msg.to_string());
                    None
                }
            }
        });
        let data = e.data.as_ref().and_then(|d| {
            cx.check_vars(
                &template::variables_of_value(&d.value.0),
                vars,
                d,
                &format!("emit[{i}].data"),
            );
            cx.engine.value_template(&d.value.0).ok()
        });
        if let Some(kind) = event_type(cx, &e.kind, &format!("emit[{i}].type"), vars) {
            let when_source = e.when.as_ref().map(|w| w.value.0.clone());
            emit.push(EmitRule {
                kind,
                when,
                when_source,
                data,
            });
        }
    }
    emit
}

/// An event type: fixed, or a template rendered per change.
fn event_type(
    cx: &mut Cx,
    kind: &Spanned<String>,
    field: &str,
    vars: &[&str],
) -> Option<EventType> {
    let src = kind.value.trim().to_string();
    if src.contains("{{") || src.contains("{%") {
        let spanned = Spanned {
            value: TemplateSrc(src.clone()),
            referenced: kind.referenced,
            defined: kind.defined,
        };
        cx.template(&spanned, field, vars)
            .map(|t| EventType::Template(t, src))
    } else if src.is_empty() || src.contains(char::is_whitespace) {
        cx.diag.at_span(
            kind,
            field,
            "expected an event type such as `bank.balance.changed` (no spaces)",
        );
        None
    } else {
        Some(EventType::Fixed(src))
    }
}
