//! A connector as the runtime sees it: built by `config` from the YAML
//! (every template compiled, every cross-reference checked), read by
//! [`super::fetch`], [`super::detect`], [`super::auth`] and `discover`.
//! Living here rather than in `config` keeps the dependency one way:
//! `config` builds these, the runtime never looks at the YAML types.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};
use serde_json_path::JsonPath;

use crate::connector::format::Format;
use crate::quota::Rate;
use crate::schedule::Schedule;
use crate::template::{Cond, Engine, Tpl, ValueTpl};

/// A resolved connector: how to poll one API and what counts as an event.
#[derive(Clone)]
pub struct Connector {
    pub name: String,
    /// The file it came from, for messages.
    pub file: PathBuf,
    /// Its compiled templates.
    pub engine: Engine,
    pub params: BTreeMap<String, Param>,
    pub schedule: Option<Schedule>,
    pub rate_limit: Option<Rate>,
    /// Whether the API's polling hints floor the schedule (see `hints`).
    pub poll_hints: bool,
    pub request: RequestSpec,
    /// How response bodies are read.
    pub format: Format,
    pub paginate: Option<Paginate>,
    pub items: Option<JsonPath>,
    /// `items` selects objects of parallel arrays, each row one item
    /// (`columnar: true`, see `connector::columns`).
    pub columnar: bool,
    /// `items` without a final `[*]`: XML lists of one, and telling an
    /// error body from an empty list.
    pub items_parent: Option<JsonPath>,
    pub id: Option<Tpl>,
    /// The `id` as a value when it is a lone `{{ expr }}`, to refuse null ids.
    pub id_value: Option<ValueTpl>,
    /// `detect: changes`: an item's version; its hash when `None`.
    pub version: Option<Tpl>,
    /// `detect: snapshot`: the watched part of the resource.
    pub watch: Option<JsonPath>,
    /// `detect: snapshot`: the watched list as a map keyed by this
    /// (`watch_key`), each item's watched value (`watch_value`) or itself.
    pub watch_key: Option<Tpl>,
    pub watch_value: Option<ValueTpl>,
    pub cursor: Option<CursorSpec>,
    /// Requests see `cursor` moved back by this much.
    pub lookback: Option<Duration>,
    pub detect: DetectMode,
    pub baseline: Baseline,
    /// Most item ids remembered per instance (`detect: new`).
    pub seen_limit: usize,
    /// Longest an item id is remembered (`detect: new`).
    pub seen_ttl: Option<Duration>,
    pub emit: Vec<EmitRule>,
    /// How `for_each: discover` sources list their instances.
    pub discover: Option<Discover>,
    /// The connector as written (after `${VAR}`), so a reload can tell
    /// whether it changed and what (see `crate::reload`). `Null` for an
    /// inline connector: it is part of its source's definition.
    pub definition: Value,
}

/// A connector's `discover:` block, resolved.
#[derive(Clone)]
pub struct Discover {
    /// The listing request as a connector of its own: its request, paging,
    /// `items`, and its `id` is the instance name template. Reusing the
    /// connector machinery means discovery pages, authenticates and reads
    /// XML exactly like polls do.
    pub lister: Box<Connector>,
    /// Param values per instance, templates over `item` in `lister.engine`.
    pub with: Vec<(String, Tpl)>,
    /// How often the list is refreshed.
    pub schedule: Schedule,
}

/// A declared parameter.
#[derive(Debug, Clone)]
pub struct Param {
    pub required: bool,
    pub secret: bool,
    pub default: Option<Value>,
    /// Line in the connector file, for "missing param" messages.
    pub line: u64,
}

/// The request of one poll, compiled.
#[derive(Clone)]
pub struct RequestSpec {
    pub method: reqwest::Method,
    pub url: Tpl,
    pub query: Vec<(String, Tpl)>,
    pub headers: Vec<(String, Tpl)>,
    pub body: Option<Body>,
    pub auth: Option<Auth>,
    pub timeout: Duration,
    pub max_response_bytes: u64,
    /// No template of the request reads `now`, `uuid()` or `debug()` (see
    /// [`RequestSpec::reads_no_clock`]): an instance's request is then
    /// the same at every poll until its cursor moves, and its poll task
    /// keeps it made rather than rendering it again each time.
    pub steady: bool,
}

impl RequestSpec {
    /// Whether every template of the request (URL, query, headers, body,
    /// authentication) is [`Engine::is_steady`].
    pub fn reads_no_clock(&self, engine: &Engine) -> bool {
        let steady = |t: &Tpl| engine.is_steady(t);
        let pairs = |v: &[(String, Tpl)]| v.iter().all(|(_, t)| steady(t));
        let body = match &self.body {
            None => true,
            Some(Body::Raw(t)) => steady(t),
            Some(Body::Json(v)) => engine.is_steady_value(v),
            Some(Body::Form(f)) => pairs(f),
        };
        let auth = match &self.auth {
            None => true,
            Some(Auth::Bearer(t)) | Some(Auth::ApiKey { value: t, .. }) => steady(t),
            Some(Auth::Basic(u, p)) => steady(u) && p.as_ref().is_none_or(steady),
            Some(Auth::OAuth2(o)) => {
                [&o.token_url, &o.client_id, &o.client_secret]
                    .into_iter()
                    .chain(&o.scope)
                    .chain(&o.refresh_token)
                    .all(steady)
                    && pairs(&o.params)
            }
        };
        steady(&self.url) && pairs(&self.query) && pairs(&self.headers) && body && auth
    }
}

/// A request body.
#[derive(Clone)]
pub enum Body {
    /// Text as rendered (SOAP, hand-written JSON); JSON content type by default.
    Raw(Tpl),
    /// A JSON document rendered from a value template.
    Json(ValueTpl),
    /// `application/x-www-form-urlencoded` fields.
    Form(Vec<(String, Tpl)>),
}

/// Request authentication.
#[derive(Clone)]
pub enum Auth {
    Bearer(Tpl),
    Basic(Tpl, Option<Tpl>),
    ApiKey {
        location: KeyLocation,
        name: String,
        value: Tpl,
    },
    OAuth2(OAuth2),
}

/// OAuth2 client credentials.
#[derive(Clone)]
pub struct OAuth2 {
    pub token_url: Tpl,
    pub client_id: Tpl,
    pub client_secret: Tpl,
    pub scope: Option<Tpl>,
    pub params: Vec<(String, Tpl)>,
    pub client_auth: ClientAuth,
    /// The `refresh_token` grant's seed (else client credentials).
    pub refresh_token: Option<Tpl>,
}

/// Following more pages within one poll.
#[derive(Clone)]
pub struct Paginate {
    pub style: PageStyle,
    /// Stop after a page for which this is true (`page`, `count`).
    pub stop_when: Option<Cond>,
    pub max_pages: u32,
    /// Hosts a next URL may point to besides the first request's.
    pub allow_hosts: Vec<String>,
    /// A `304` to page 1 means the listing did not change
    /// (`paginate.conditional`).
    pub conditional: bool,
}

/// How the next page is asked for.
#[derive(Clone)]
pub enum PageStyle {
    /// An opaque cursor in the body, sent back in a query parameter.
    Cursor { from: JsonPath, param: String },
    /// The next page's URL in the body.
    NextUrl(JsonPath),
    /// RFC 8288 `Link: <…>; rel="next"`.
    Link,
    /// `?page=N` (and an optional page size).
    Page {
        param: String,
        start: u64,
        size: Option<(Option<String>, u64)>,
    },
    /// `?offset=N&limit=M`.
    Offset {
        param: String,
        limit_param: Option<String>,
        limit: u64,
    },
}

/// Where the next poll resumes.
#[derive(Clone)]
pub enum CursorSpec {
    /// An opaque value the API gives, at a JSONPath of the last page.
    From(JsonPath),
    /// The greatest value of a template over the items.
    Max(Tpl),
}

/// One `emit:` rule.
#[derive(Clone)]
pub struct EmitRule {
    pub kind: EventType,
    pub when: Option<Cond>,
    /// `when` as written, for `pollhook test`'s verdicts.
    pub when_source: Option<String>,
    /// `data` template; the default data when `None`.
    pub data: Option<ValueTpl>,
}

/// An event type, fixed or rendered per change.
#[derive(Clone)]
pub enum EventType {
    Fixed(String),
    /// The template and its source (for messages and routing checks).
    Template(Tpl, String),
}

impl EventType {
    /// The type as written in the connector.
    pub fn source(&self) -> &str {
        match self {
            EventType::Fixed(s) | EventType::Template(_, s) => s,
        }
    }
}

// Plain values, deserialized straight from the YAML by `config::raw` (they
// carry nothing of it), so their doc comments are also the JSON Schema's.

/// Where an API key goes.
#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyLocation {
    #[default]
    Header,
    Query,
}

/// How OAuth2 client credentials reach the token endpoint.
#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    #[default]
    Basic,
    Body,
}

/// Detection modes.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DetectMode {
    /// One resource; an event when it (or its `watch`ed part) changes.
    Snapshot,
    /// A list; an event per item id never seen.
    New,
    /// A list; created / updated / deleted per item id.
    Changes,
}

/// First-run behaviour.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    #[default]
    Skip,
    Emit,
}

/// One source × `for_each` entry: polled on its own, with its own state.
#[derive(Debug, Clone)]
pub struct Instance {
    /// `source/instance`, the key of its state and its name in logs.
    /// Shared, not copied: the roster, the supervisor and the status key
    /// their per-instance maps with this one allocation (at 100,000
    /// instances each copy of the key was about 40 bytes per map).
    pub key: Arc<str>,
    /// Where the instance part (`acc-0001`, or `default` without
    /// `for_each`) starts in `key`: see [`Instance::name`]. An offset, not
    /// a split at the first `/`: a source's name may hold one.
    name_at: usize,
    /// The variables every instance of its source shares: the params'
    /// defaults with the source's `with` values. One map per source, not
    /// per instance: 10,000 accounts of one source would otherwise hold
    /// 10,000 copies of the same `base_url` and credentials (about 700 B
    /// each at rest, measured with heaptrack).
    pub base_vars: Arc<Map<String, Value>>,
    /// This instance's own values (its `for_each` combination, or what
    /// discovery gave it), over `base_vars`, as one compact JSON object:
    /// one or two values, kept by every instance of a fleet for the
    /// daemon's life. A map of one was about 190 B, a boxed slice of
    /// `(String, Value)` pairs (three allocations) about 150 B with the
    /// allocator's headers; this text is one allocation of about 30 B.
    /// Read back by [`Instance::vars`] when a request is made.
    own_vars: Box<str>,
    /// Values of secret params, to mask wherever text is shown.
    pub secrets: Vec<String>,
}

impl Instance {
    /// An instance named `name` of source `source`, with its own values over
    /// the source's shared ones; its secrets are read from the merged view.
    pub fn new(
        source: &str,
        name: &str,
        connector: &Connector,
        base_vars: Arc<Map<String, Value>>,
        own_vars: impl IntoIterator<Item = (String, Value)>,
    ) -> Instance {
        let mut inst = Instance {
            key: format!("{source}/{name}").into(),
            name_at: source.len() + 1,
            base_vars,
            own_vars: serde_json::to_string(&own_vars.into_iter().collect::<Map<_, _>>())
                .expect("a JSON map always serializes")
                .into(),
            secrets: vec![],
        };
        inst.secrets = secrets_of(connector, &inst.vars());
        inst
    }

    /// The instance part of the key (`acc-0001`, or `default` without
    /// `for_each`).
    pub fn name(&self) -> &str {
        &self.key[self.name_at..]
    }

    /// Template variables: the connector's params with this instance's
    /// values. A copy, made per poll: what is kept at rest is shared.
    pub fn vars(&self) -> Map<String, Value> {
        let mut vars = (*self.base_vars).clone();
        vars.extend(self.own_vars());
        vars
    }

    /// This instance's own values (see [`Instance::vars`] for all of them).
    pub fn own_vars(&self) -> Map<String, Value> {
        serde_json::from_str(&self.own_vars).expect("written by Instance::new")
    }
}

/// The values of `c`'s secret params in `vars`, to mask wherever text is shown.
pub(crate) fn secrets_of(c: &Connector, vars: &Map<String, Value>) -> Vec<String> {
    c.params
        .iter()
        .filter(|(_, p)| p.secret)
        .filter_map(|(k, _)| vars.get(k).map(scalar_text))
        .filter(|s| !s.is_empty())
        .collect()
}

/// A scalar as plain text (strings without quotes).
pub fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
