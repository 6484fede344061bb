//! A connector (a file, inline in bridge.yaml, or a `discover:` block)
//! into a [`Connector`]: its templates compiled in its own engine, and
//! every variable they use checked against its params.

mod discover;
mod emit;
mod paging;
mod request;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;
use serde_json_path::JsonPath;
use serde_saphyr::Spanned;

use super::diag::Diag;
use crate::config::error::ConfigErrors;
use crate::config::raw::{RawConnector, TemplateSrc};
use crate::connector::spec::{Connector, Param};
use crate::template::{self, Engine, Tpl, ValueTpl};

/// Variables every request template may use besides the params.
const REQUEST_BUILTINS: &[&str] = &["cursor", "now"];

/// Variables of the templates over one item (`id`, `version`, `cursor.max`).
const ITEM_VARS: &[&str] = &["item", "cursor", "now"];

/// What compiling a connector's templates needs: where errors go, the
/// engine the templates are compiled into, and the declared params (the
/// variables a template may use besides builtins).
struct Cx<'a> {
    diag: Diag<'a>,
    engine: Engine,
    params: BTreeSet<String>,
}

impl Cx<'_> {
    /// Compiles a template after checking that it only uses known variables.
    fn template(
        &mut self,
        src: &Spanned<TemplateSrc>,
        field: &str,
        builtins: &[&str],
    ) -> Option<Tpl> {
        self.check_vars(
            &template::variables_of_template(&src.value.0),
            builtins,
            src,
            field,
        );
        match self.engine.template(&src.value.0) {
            Ok(t) => Some(t),
            Err(e) => {
                self.diag.at_span(src, field, e.to_string());
                None
            }
        }
    }

    /// [`Cx::template`] for a template without a location of its own (in a
    /// map or an enum serde does not locate): reported at the line of `key:`.
    fn template_at_key(
        &mut self,
        src: &TemplateSrc,
        key: &str,
        field: &str,
        builtins: &[&str],
    ) -> Option<Tpl> {
        let line = self.diag.line_of(key);
        let used = template::variables_of_template(&src.0);
        self.diag
            .check_vars(&used, &self.params, builtins, (line, 0), field);
        match self.engine.template(&src.0) {
            Ok(t) => Some(t),
            Err(e) => {
                self.diag.at(line, 0, field, e.to_string());
                None
            }
        }
    }

    /// Reports variables of `used` that are neither params nor `builtins`.
    fn check_vars<T>(
        &mut self,
        used: &BTreeSet<String>,
        builtins: &[&str],
        at: &Spanned<T>,
        field: &str,
    ) {
        let location = (at.referenced.line(), at.referenced.column());
        self.diag
            .check_vars(used, &self.params, builtins, location, field);
    }
}

/// Validates a connector. `inline_name` is the source's name for a connector
/// written inline in bridge.yaml (`text` is then the bridge file's).
pub(crate) fn resolve_connector(
    file: &Path,
    text: &str,
    raw: &RawConnector,
    inline_name: Option<&str>,
) -> Result<Connector, ConfigErrors> {
    let mut diag = Diag::new(file, text);
    let name = connector_name(&mut diag, raw, inline_name);
    let params = params_of(&diag, raw);
    let mut cx = Cx {
        diag,
        engine: Engine::new(),
        params: params.keys().cloned().collect(),
    };
    let request = request::resolve_request(&mut cx, &raw.request);
    let id = raw
        .id
        .as_ref()
        .and_then(|t| cx.template(t, "id", ITEM_VARS));
    let version = raw
        .version
        .as_ref()
        .and_then(|t| cx.template(t, "version", ITEM_VARS));
    let (cursor, lookback) = paging::cursor(&mut cx, raw);
    let items = raw.items.as_ref().map(|p| checked_path(&p.value.0));
    let watch = raw.watch.as_ref().map(|p| checked_path(&p.value.0));
    let watch_key = raw
        .watch_key
        .as_ref()
        .and_then(|t| cx.template(t, "watch_key", ITEM_VARS));
    let watch_value = watch_value(&mut cx, raw);
    let paginate = paging::paginate(&mut cx, raw, items.is_some());
    emit::check_detect(&mut cx, raw);
    let emit = emit::emit_rules(&mut cx, raw);
    let discover = raw
        .discover
        .as_ref()
        .and_then(|d| discover::resolve_discover(&mut cx, raw, d, &name));
    let id_value = id_value(&mut cx, raw);
    let Cx { diag, engine, .. } = cx;
    diag.finish(|| Connector {
        discover,
        definition: Value::Null,
        name,
        file: file.to_path_buf(),
        engine,
        params,
        schedule: raw.schedule.as_ref().map(|s| s.0.clone()),
        rate_limit: raw.rate_limit,
        poll_hints: raw.poll_hints.unwrap_or(true),
        request: request.expect("no errors"),
        format: raw
            .response
            .as_ref()
            .and_then(|r| r.format)
            .unwrap_or_default(),
        paginate,
        items_parent: items_parent(raw),
        items,
        columnar: raw.columnar.as_ref().is_some_and(|c| c.value),
        id_value,
        id,
        version,
        watch,
        watch_key,
        watch_value,
        cursor,
        lookback,
        detect: raw.detect.value,
        baseline: raw.baseline.unwrap_or_default(),
        seen_limit: raw.seen_limit.unwrap_or(10_000).max(1),
        seen_ttl: raw.seen_ttl.map(|d| d.0),
        emit,
    })
}

/// The connector's name: its `name:`, else (inline in bridge.yaml) its
/// source's; a connector file without one is an error.
fn connector_name(diag: &mut Diag, raw: &RawConnector, inline_name: Option<&str>) -> String {
    match (&raw.name, inline_name) {
        (Some(n), _) => n.value.clone(),
        (None, Some(n)) => n.to_string(),
        (None, None) => {
            diag.at(
                1,
                0,
                "name",
                "a connector file needs `name:` (what sources refer to)",
            );
            String::new()
        }
    }
}

/// `watch_value`: a value template of the item's variables.
fn watch_value(cx: &mut Cx, raw: &RawConnector) -> Option<ValueTpl> {
    let v = raw.watch_value.as_ref()?;
    cx.check_vars(
        &template::variables_of_value(&v.value.0),
        ITEM_VARS,
        v,
        "watch_value",
    );
    match cx.engine.value_template(&v.value.0) {
        Ok(t) => Some(t),
        Err(e) => {
            cx.diag.at_span(v, "watch_value", e.to_string());
            None
        }
    }
}

/// `id` as a value when it is one lone expression: detection evaluates
/// it only to tell a null id from the text "None". Its errors were said
/// for `id` already.
fn id_value(cx: &mut Cx, raw: &RawConnector) -> Option<ValueTpl> {
    let t = raw.id.as_ref()?;
    match cx.engine.value_template(&Value::String(t.value.0.clone())) {
        Ok(v @ ValueTpl::Native(_)) => Some(v),
        _ => None,
    }
}

/// The parent of `items` when it ends in `[*]`: a page without it is not
/// a listing (`DetectError::NotAListing`), unlike one with an empty list.
fn items_parent(raw: &RawConnector) -> Option<JsonPath> {
    raw.items
        .as_ref()
        .and_then(|p| p.value.0.trim().strip_suffix("[*]").map(str::to_string))
        .and_then(|p| JsonPath::parse(&p).ok())
}

/// The declared params, each with its line for "missing param" messages;
/// those the request sends as credentials are secret, declared so or not.
fn params_of(diag: &Diag, raw: &RawConnector) -> BTreeMap<String, Param> {
    let mut params: BTreeMap<String, Param> = raw
        .params
        .iter()
        .map(|(k, p)| {
            let param = Param {
                required: p.required,
                secret: p.secret,
                default: p.default.clone(),
                line: diag.line_of(k),
            };
            (k.clone(), param)
        })
        .collect();
    for k in request::credential_params(&raw.request) {
        if let Some(p) = params.get_mut(&k) {
            p.secret = true;
        }
    }
    params
}

/// A JSONPath that `raw::JsonPathSrc` already parsed once.
fn checked_path(src: &str) -> JsonPath {
    JsonPath::parse(src).expect("checked at parse")
}
