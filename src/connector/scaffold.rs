//! A starting connector guessed from one request and its answer, for
//! `pollhook new connector --from-curl` / `--from-url`. Pure: a
//! [`CurlRequest`] and an [`Observed`] answer in, the connector's YAML
//! (each guess explained in a comment) out; fetching is the CLI's.
//!
//! What is guessed, in order (see [`guess`]):
//! - auth and secrets ([`plan_request`]): `Authorization: Bearer` →
//!   `auth: bearer`, `Basic`/`-u` → `auth: basic`, an API-key header or
//!   query parameter → `auth: api_key`, a cookie → a secret param. Every
//!   credential becomes a `secret: true` param; its value is never
//!   written (checked: a value that would still appear is an error).
//! - the items ([`find_items`]): the top-level array, or the largest array
//!   of objects, preferring keys such as `data`, `items`, `results`.
//! - the id ([`guess_id`]) and an updated-at field ([`guess_version`]),
//!   which decides `detect`: `changes` with a version, `new` without,
//!   `snapshot` for a single object.
//! - pagination ([`guess_paging`]): a `Link` header, a next-URL field, a
//!   cursor field, a page number.

use serde_json::Value;

use super::curl::CurlRequest;

mod render;
#[cfg(test)]
mod tests;

pub use render::{guess, kind_of};

/// The answer to the one request.
pub struct Observed<'a> {
    /// Response headers (any case).
    pub headers: &'a [(String, String)],
    /// The body as the connector will see it (XML already a tree).
    pub body: &'a Value,
    /// The body was XML (RSS, Atom): `response: { format: xml }`.
    pub xml: bool,
}

/// Why no connector could be written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScaffoldError {
    #[error("`{0}` is not a usable URL: {1}")]
    Url(String, String),
    #[error("connector name `{0}`: use lower-case letters, digits, `-` and `_`")]
    Name(String),
    #[error("a secret ({0}) also appears elsewhere in the request ({1}); move it into a header or query parameter pollhook recognises, or edit the connector by hand")]
    SecretElsewhere(String, &'static str),
}

/// A declared param of the connector.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub secret: bool,
    /// The default written (non-secret params only).
    pub default: Option<String>,
    pub description: String,
}

/// The connector, and what the user should know about it.
#[derive(Debug, Clone)]
pub struct Scaffold {
    pub yaml: String,
    /// One line per guess, for the terminal.
    pub guesses: Vec<String>,
    pub params: Vec<Param>,
}

/// The request's part of the connector: params, auth, headers, query.
#[derive(Debug, Default)]
pub struct RequestPlan {
    pub method: String,
    pub base_url: String,
    pub path: String,
    pub params: Vec<Param>,
    /// The `auth:` flow map, e.g. `{ type: bearer, token: "{{ token }}" }`.
    pub auth: Option<String>,
    pub headers: Vec<(String, String)>,
    pub query: Vec<(String, String)>,
    pub body: Option<Body>,
    pub user_agent: Option<String>,
    pub notes: Vec<String>,
    /// The secret values (never written), with what each was.
    secrets: Vec<(String, String)>,
}

/// The request body as a connector writes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Json(Value),
    Form(Vec<(String, String)>),
    Raw(String),
}

/// Headers pollhook or its HTTP client set by themselves.
const DROPPED_HEADERS: &[&str] = &[
    "content-length",
    "host",
    "accept-encoding",
    "connection",
    "content-type",
];

/// Is a header or query parameter of this name a credential?
pub fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase().replace('-', "_");
    const EXACT: &[&str] = &["key", "sig", "appid", "auth", "jwt"];
    const KEYS: &[&str] = &[
        "app_key",
        "access_key",
        "private_key",
        "client_key",
        "consumer_key",
    ];
    EXACT.contains(&n.as_str())
        || KEYS.iter().any(|k| n.ends_with(k))
        || [
            "token",
            "secret",
            "password",
            "apikey",
            "api_key",
            "session",
            "signature",
        ]
        .iter()
        .any(|w| n.contains(w))
}

/// A param name from a header or query name: `X-API-Key` → `api_key`.
fn param_name(name: &str) -> String {
    let mut n: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if let Some(rest) = n.strip_prefix("x_") {
        n = rest.to_string();
    }
    if n.is_empty() || n.starts_with(|c: char| c.is_ascii_digit()) {
        n.insert_str(0, "p_");
    }
    n
}

impl RequestPlan {
    /// A secret param for `value` (what it was: `what`), named after
    /// `base` (made unique); returns the param's name.
    fn secret(&mut self, base: &str, value: &str, what: String) -> String {
        let mut name = base.to_string();
        let mut n = 2;
        while self.params.iter().any(|p| p.name == name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        self.params.push(Param {
            name: name.clone(),
            secret: true,
            default: None,
            description: format!("secret: {what}"),
        });
        self.secrets.push((value.to_string(), what));
        name
    }

    /// The secret values given on the command line (for the CLI to mask).
    pub fn secret_values(&self) -> Vec<String> {
        self.secrets.iter().map(|(v, _)| v.clone()).collect()
    }
}

/// The request part of the connector: credentials into params, the URL
/// split into `base_url` + path + query.
pub fn plan_request(req: &CurlRequest) -> Result<RequestPlan, ScaffoldError> {
    let full = req.full_url();
    let mut url =
        url::Url::parse(&full).map_err(|e| ScaffoldError::Url(full.clone(), e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ScaffoldError::Url(
            full,
            "not an http(s) URL with a host".into(),
        ));
    }
    let mut p = RequestPlan {
        method: req.method(),
        ..RequestPlan::default()
    };
    // Credentials in the URL (`https://user:pw@host/`) are basic auth.
    let mut user = req.user.clone();
    if !url.username().is_empty() {
        let u = percent(url.username());
        let pw = url.password().map(percent);
        user.get_or_insert(match pw {
            Some(pw) => format!("{u}:{pw}"),
            None => u,
        });
        let _ = url.set_username("");
        let _ = url.set_password(None);
    }
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    p.base_url = format!("{}://{}{port}", url.scheme(), url.host_str().unwrap_or(""));
    p.path = url.path().trim_end_matches('/').to_string();
    if p.path.is_empty() && url.path() == "/" {
        p.path = "/".into();
    }
    p.params.push(Param {
        name: "base_url".into(),
        secret: false,
        default: Some(p.base_url.clone()),
        description: "API root".into(),
    });
    if let Some(u) = &user {
        basic_auth(&mut p, u, "`-u` of the curl command");
    }
    plan_headers(&mut p, req);
    for (k, v) in url.query_pairs() {
        plan_query_pair(&mut p, &k, &v);
    }
    p.body = req.body().map(|b| plan_body(&mut p, req, &b));
    check_no_secret_left(&p)?;
    Ok(p)
}

fn percent(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn basic_auth(p: &mut RequestPlan, userpass: &str, from: &str) {
    let (u, pw) = match userpass.split_once(':') {
        Some((u, pw)) => (u, Some(pw).filter(|pw| !pw.is_empty())),
        None => (userpass, None),
    };
    let un = p.secret("username", u, format!("basic auth user ({from})"));
    let mut auth = format!("{{ type: basic, username: \"{{{{ {un} }}}}\"");
    if let Some(pw) = pw {
        let pn = p.secret("password", pw, format!("basic auth password ({from})"));
        auth.push_str(&format!(", password: \"{{{{ {pn} }}}}\""));
    }
    auth.push_str(" }");
    p.auth = Some(auth);
    p.notes.push(format!(
        "auth: basic, from {from}; user and password are secret params"
    ));
}

fn plan_headers(p: &mut RequestPlan, req: &CurlRequest) {
    for (name, value) in &req.headers {
        let lower = name.to_ascii_lowercase();
        if DROPPED_HEADERS.contains(&lower.as_str()) {
            continue;
        }
        if lower == "authorization" {
            authorization(p, value);
        } else if lower == "user-agent" {
            p.user_agent = Some(value.clone());
        } else if lower == "cookie" {
            let n = p.secret("cookie", value, "the Cookie header".into());
            p.headers.push((name.clone(), format!("{{{{ {n} }}}}")));
            p.notes.push("Cookie header → secret param `cookie`".into());
        } else if is_secret_name(name) {
            let n = p.secret(&param_name(name), value, format!("the {name} header"));
            if p.auth.is_none() {
                p.auth = Some(format!(
                    "{{ type: api_key, in: header, name: {}, value: \"{{{{ {n} }}}}\" }}",
                    yaml_str(name)
                ));
                p.notes.push(format!(
                    "auth: api_key in the {name} header → secret param `{n}`"
                ));
            } else {
                p.headers.push((name.clone(), format!("{{{{ {n} }}}}")));
                p.notes.push(format!("{name} header → secret param `{n}`"));
            }
        } else {
            p.headers.push((name.clone(), value.clone()));
        }
    }
}

/// `Authorization: Bearer x` / `Basic b64` / `Scheme x`.
fn authorization(p: &mut RequestPlan, value: &str) {
    let (scheme, cred) = value.split_once(' ').unwrap_or(("", value));
    let cred = cred.trim();
    if scheme.eq_ignore_ascii_case("bearer") && p.auth.is_none() {
        let n = p.secret(
            "token",
            cred,
            "the bearer token (Authorization header)".into(),
        );
        p.auth = Some(format!("{{ type: bearer, token: \"{{{{ {n} }}}}\" }}"));
        p.notes.push(format!(
            "auth: bearer, from the Authorization header → secret param `{n}`"
        ));
        return;
    }
    if scheme.eq_ignore_ascii_case("basic") && p.auth.is_none() {
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(cred)
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        if let Some(userpass) = decoded {
            // The encoded form is a secret too: never written either.
            p.secrets
                .push((cred.to_string(), "the Authorization header".into()));
            basic_auth(p, &userpass, "the Authorization: Basic header");
            return;
        }
    }
    let n = p.secret("token", cred, "the Authorization header".into());
    let v = if scheme.is_empty() {
        format!("{{{{ {n} }}}}")
    } else {
        format!("{scheme} {{{{ {n} }}}}")
    };
    p.headers.push(("Authorization".into(), v));
    p.notes.push(format!(
        "Authorization header ({scheme}) → secret param `{n}`"
    ));
}

fn plan_query_pair(p: &mut RequestPlan, k: &str, v: &str) {
    if !is_secret_name(k) {
        p.query.push((k.to_string(), v.to_string()));
        return;
    }
    let n = p.secret(&param_name(k), v, format!("the `{k}` query parameter"));
    if p.auth.is_none() {
        p.auth = Some(format!(
            "{{ type: api_key, in: query, name: {}, value: \"{{{{ {n} }}}}\" }}",
            yaml_str(k)
        ));
        p.notes.push(format!(
            "auth: api_key in the `{k}` query parameter → secret param `{n}`"
        ));
    } else {
        p.query.push((k.to_string(), format!("{{{{ {n} }}}}")));
        p.notes
            .push(format!("`{k}` query parameter → secret param `{n}`"));
    }
}

/// The body: JSON (`--json`, or a JSON content type), a form (`a=1&b=2`),
/// else raw text. Values of credential-named keys become secret params.
fn plan_body(p: &mut RequestPlan, req: &CurlRequest, body: &str) -> Body {
    let json_type = req
        .header("content-type")
        .is_some_and(|t| t.to_ascii_lowercase().contains("json"));
    if req.json || json_type {
        if let Ok(mut v) = serde_json::from_str::<Value>(body) {
            if let Value::Object(m) = &mut v {
                for (k, val) in m.iter_mut() {
                    if let (true, Value::String(s)) = (is_secret_name(k), &*val) {
                        let n = p.secret(&param_name(k), &s.clone(), format!("`{k}` of the body"));
                        *val = Value::String(format!("{{{{ {n} }}}}"));
                    }
                }
            }
            return Body::Json(v);
        }
        return Body::Raw(body.to_string());
    }
    let looks_form = !body.is_empty()
        && body
            .split('&')
            .all(|kv| kv.split_once('=').is_some_and(|(k, _)| !k.is_empty()));
    if !looks_form {
        return Body::Raw(body.to_string());
    }
    let mut form = Vec::new();
    for (k, v) in url::form_urlencoded::parse(body.as_bytes()) {
        if is_secret_name(&k) {
            let n = p.secret(&param_name(&k), &v, format!("`{k}` of the form body"));
            form.push((k.into_owned(), format!("{{{{ {n} }}}}")));
        } else {
            form.push((k.into_owned(), v.into_owned()));
        }
    }
    Body::Form(form)
}

/// A secret value that still shows in what will be written (the path, a
/// raw body, another header) is refused rather than written.
fn check_no_secret_left(p: &RequestPlan) -> Result<(), ScaffoldError> {
    let mut places: Vec<(&'static str, String)> = vec![
        ("the URL", format!("{}{}", p.base_url, p.path)),
        ("the headers", format!("{:?}", p.headers)),
        ("the query", format!("{:?}", p.query)),
        ("the user agent", p.user_agent.clone().unwrap_or_default()),
    ];
    if let Some(b) = &p.body {
        places.push(("the body", format!("{b:?}")));
    }
    for (secret, what) in &p.secrets {
        if secret.len() < 4 {
            continue;
        }
        for (place, text) in &places {
            if text.contains(secret.as_str()) {
                return Err(ScaffoldError::SecretElsewhere(what.clone(), place));
            }
        }
    }
    Ok(())
}

/// A string as a YAML double-quoted scalar (JSON's escapes are YAML's).
pub fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// Where the items are: key path from the root (empty: the root array).
#[derive(Debug, Clone, PartialEq)]
pub struct ItemsAt {
    pub path: Vec<String>,
    pub count: usize,
}

impl ItemsAt {
    /// The connector's `items:` JSONPath.
    pub fn jsonpath(&self) -> String {
        let mut s = String::from("$");
        for k in &self.path {
            s.push_str(&path_segment(k));
        }
        s.push_str("[*]");
        s
    }
}

fn is_ident(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn path_segment(k: &str) -> String {
    if is_ident(k) {
        format!(".{k}")
    } else {
        format!(
            "[{}]",
            serde_json::to_string(k)
                .expect("a string")
                .replace('"', "'")
        )
    }
}

/// Keys under which APIs put their listing.
const LIST_KEYS: &[&str] = &[
    "data", "items", "results", "entries", "features", "records", "item", "entry", "value", "hits",
    "objects", "list", "rows", "nodes", "elements", "content",
];

/// The items of a listing: the root array, else the largest array of
/// objects within three levels, one under a [`LIST_KEYS`] key first. In
/// XML, a lone `item`/`entry` element counts as a list of one.
pub fn find_items(body: &Value, xml: bool) -> Option<ItemsAt> {
    if let Value::Array(a) = body {
        return Some(ItemsAt {
            path: vec![],
            count: a.len(),
        });
    }
    let mut found: Vec<(ItemsAt, bool)> = Vec::new();
    collect_arrays(body, &mut Vec::new(), xml, &mut found);
    let preferred = found.iter().any(|(_, p)| *p);
    found
        .into_iter()
        .filter(|(_, p)| *p || !preferred)
        .max_by(|(a, _), (b, _)| a.count.cmp(&b.count).then(b.path.len().cmp(&a.path.len())))
        .map(|(at, _)| at)
}

fn collect_arrays(v: &Value, path: &mut Vec<String>, xml: bool, out: &mut Vec<(ItemsAt, bool)>) {
    let Value::Object(m) = v else { return };
    if path.len() >= 4 {
        return;
    }
    for (k, child) in m {
        let listy = LIST_KEYS.contains(&k.as_str());
        path.push(k.clone());
        match child {
            Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_object) => {
                out.push((
                    ItemsAt {
                        path: path.clone(),
                        count: a.len(),
                    },
                    listy,
                ));
            }
            Value::Array(a) if a.is_empty() && listy => out.push((
                ItemsAt {
                    path: path.clone(),
                    count: 0,
                },
                true,
            )),
            Value::Object(_) if xml && matches!(k.as_str(), "item" | "entry") => out.push((
                ItemsAt {
                    path: path.clone(),
                    count: 1,
                },
                true,
            )),
            Value::Object(_) => collect_arrays(child, path, xml, out),
            _ => {}
        }
        path.pop();
    }
}

/// The items themselves (a lone XML element as one).
pub fn items_of<'a>(body: &'a Value, at: &ItemsAt) -> Vec<&'a Value> {
    let mut v = body;
    for k in &at.path {
        match v.get(k) {
            Some(c) => v = c,
            None => return vec![],
        }
    }
    match v {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    }
}

/// The `id:` template and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Guessed {
    pub template: String,
    pub why: String,
}

/// A template expression for `item.<path>`.
fn item_expr(path: &[&str]) -> String {
    let mut s = String::from("item");
    for k in path {
        if is_ident(k) {
            s.push('.');
            s.push_str(k);
        } else {
            s.push_str(&format!(
                "[{}]",
                serde_json::to_string(k)
                    .expect("a string")
                    .replace('"', "'")
            ));
        }
    }
    s
}

/// The id: `id`, `uuid`, `guid`, `key`, `number`, then a `*_id` field,
/// present and scalar in every item (unique values preferred).
pub fn guess_id(items: &[&Value]) -> Guessed {
    if items.first().is_some_and(|i| !i.is_object()) {
        return Guessed {
            template: "{{ item }}".into(),
            why: "the items are plain values: each is its own id".into(),
        };
    }
    let has = |k: &str| {
        !items.is_empty()
            && items
                .iter()
                .all(|i| i.get(k).is_some_and(|v| v.is_string() || v.is_number()))
    };
    let unique = |k: &str| {
        let mut seen: Vec<String> = items.iter().map(|i| i[k].to_string()).collect();
        seen.sort();
        seen.dedup();
        seen.len() == items.len()
    };
    // RSS: `guid` may carry an isPermaLink attribute (an object with #text).
    if items
        .iter()
        .any(|i| i.get("guid").is_some_and(Value::is_object))
        || (has("guid") && has("link"))
    {
        return Guessed {
            template: "{% if item.guid is defined %}{{ item.guid['#text'] if item.guid is mapping else item.guid }}{% else %}{{ item.link }}{% endif %}".into(),
            why: "`guid` (RSS; an object with `#text` when it has attributes), else `link`".into(),
        };
    }
    let mut candidates: Vec<String> = [
        "id", "uuid", "guid", "key", "number", "_id", "@id", "ID", "Id",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(Value::Object(first)) = items.first() {
        for k in first.keys() {
            let l = k.to_ascii_lowercase();
            if (l.ends_with("_id") || l.ends_with("id") && k.ends_with("Id"))
                && !candidates.contains(k)
            {
                candidates.push(k.clone());
            }
        }
    }
    let present: Vec<&String> = candidates.iter().filter(|k| has(k)).collect();
    if let Some(k) = present.iter().find(|k| unique(k)).or(present.first()) {
        return Guessed {
            template: format!("{{{{ {} }}}}", item_expr(&[k])),
            why: format!(
                "`{k}`: present in every item{}",
                if unique(k) { ", all different" } else { "" }
            ),
        };
    }
    if has("link") {
        return Guessed {
            template: "{{ item.link }}".into(),
            why: "no id field; `link` is in every item".into(),
        };
    }
    Guessed {
        template: "{{ item | tojson }}".into(),
        why: "no id field found: the whole item is its identity (any change makes it \"new\"); put a unique field here".into(),
    }
}

/// Fields that tell when an item last changed.
const UPDATED_KEYS: &[&str] = &[
    "updated_at",
    "updatedAt",
    "modified",
    "modified_at",
    "modifiedAt",
    "last_modified",
    "lastModified",
    "last_updated",
    "lastUpdated",
    "date_modified",
    "dateModified",
    "updated",
    "update_time",
    "updateTime",
    "updated_time",
    "updatedTime",
];

/// An updated-at field of the items: at the top of each item, or one
/// level down (`attributes.updated_at`, GeoJSON's `properties.updated`).
pub fn guess_version(items: &[&Value]) -> Option<Guessed> {
    let first = items.first()?.as_object()?;
    let in_all = |path: &[&str]| {
        items.iter().all(|i| {
            let mut v = *i;
            for k in path {
                match v.get(k) {
                    Some(c) => v = c,
                    None => return false,
                }
            }
            !v.is_null() && !v.is_object() && !v.is_array()
        })
    };
    for k in UPDATED_KEYS {
        if in_all(&[k]) {
            return Some(Guessed {
                template: format!("{{{{ {} }}}}", item_expr(&[k])),
                why: format!("`{k}` changes when an item changes"),
            });
        }
    }
    for (outer, v) in first {
        if !v.is_object() {
            continue;
        }
        for k in UPDATED_KEYS {
            if in_all(&[outer, k]) {
                return Some(Guessed {
                    template: format!("{{{{ {} }}}}", item_expr(&[outer, k])),
                    why: format!("`{outer}.{k}` changes when an item changes"),
                });
            }
        }
    }
    None
}

/// The `paginate:` guessed, and the query parameters the pager sets.
#[derive(Debug, Clone, PartialEq)]
pub struct Paging {
    /// The `paginate:` flow map.
    pub yaml: String,
    pub why: String,
    /// Query parameters to leave to the pager.
    pub pager_params: Vec<String>,
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Objects of a body where paging fields live.
const PAGING_HOLDERS: &[&str] = &[
    "links",
    "_links",
    "paging",
    "pagination",
    "meta",
    "page_info",
    "pageInfo",
    "response_metadata",
    "cursors",
];

const NEXT_URL_KEYS: &[&str] = &[
    "next",
    "next_url",
    "nextUrl",
    "next_page_url",
    "nextPageUrl",
    "next_link",
    "nextLink",
    "@odata.nextLink",
];

const CURSOR_KEYS: &[&str] = &[
    "next_cursor",
    "nextCursor",
    "cursor",
    "after",
    "end_cursor",
    "endCursor",
    "next_page_token",
    "nextPageToken",
    "next_token",
    "nextToken",
    "continuation",
    "continuation_token",
];

/// Query parameters that carry a cursor.
const CURSOR_PARAMS: &[&str] = &[
    "cursor",
    "after",
    "page_token",
    "pageToken",
    "next_token",
    "starting_after",
    "continuation",
];

const PAGE_PARAMS: &[&str] = &["page", "page_number", "pageNumber"];
const SIZE_PARAMS: &[&str] = &[
    "per_page",
    "page_size",
    "pageSize",
    "limit",
    "size",
    "count",
];
const TOTAL_PAGE_KEYS: &[&str] = &[
    "total_pages",
    "totalPages",
    "last_page",
    "lastPage",
    "pages",
    "page_count",
];

/// Candidate paging fields: (JSONPath, key, value), top level and one
/// level into [`PAGING_HOLDERS`] (two for `paging.cursors`).
fn paging_fields(body: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    let Value::Object(m) = body else { return out };
    for (k, v) in m {
        out.push((format!("${}", path_segment(k)), k.clone(), v.clone()));
        if PAGING_HOLDERS.contains(&k.as_str()) {
            if let Value::Object(inner) = v {
                for (ik, iv) in inner {
                    let p = format!("${}{}", path_segment(k), path_segment(ik));
                    out.push((p.clone(), ik.clone(), iv.clone()));
                    if let Value::Object(deeper) = iv {
                        for (dk, dv) in deeper {
                            out.push((
                                format!("{p}{}", path_segment(dk)),
                                format!("{ik}.{dk}"),
                                dv.clone(),
                            ));
                        }
                    }
                }
            }
        }
    }
    out
}

fn looks_like_url(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.starts_with("http://")
            || s.starts_with("https://")
            || s.starts_with('/')
            || s.starts_with('?')
    })
}

/// Pagination: a `Link` header with `rel="next"`, a next-URL field, a
/// cursor field, a page number (a `page` query parameter, or `page` and
/// `total_pages` fields). `query` is the request's.
pub fn guess_paging(
    headers: &[(String, String)],
    body: &Value,
    query: &[(String, String)],
) -> Option<Paging> {
    if header(headers, "link")
        .and_then(super::format::link_next)
        .is_some()
    {
        return Some(Paging {
            yaml: "{ link_header: true, max_pages: 20 }".into(),
            why: "the answer's `Link` header has rel=\"next\" (RFC 8288 paging)".into(),
            pager_params: vec![],
        });
    }
    let fields = paging_fields(body);
    for (path, key, v) in &fields {
        let last = key.rsplit('.').next().unwrap_or(key);
        let urlish_name = ["url", "link", "href"]
            .iter()
            .any(|w| last.to_ascii_lowercase().contains(w));
        let is_next = NEXT_URL_KEYS.contains(&last) || (key.ends_with("next.href"));
        if is_next && (looks_like_url(v) || (v.is_null() && (urlish_name || last == "next"))) {
            return Some(Paging {
                yaml: format!("{{ next_url: {}, max_pages: 20 }}", yaml_str(path)),
                why: format!("`{path}` holds the next page's URL"),
                pager_params: vec![],
            });
        }
        if key == "next" {
            if let Some(href) = v.get("href").filter(|h| looks_like_url(h)) {
                let _ = href;
                let p = format!("{path}.href");
                return Some(Paging {
                    yaml: format!("{{ next_url: {}, max_pages: 20 }}", yaml_str(&p)),
                    why: format!("`{p}` holds the next page's URL (HAL)"),
                    pager_params: vec![],
                });
            }
        }
    }
    for (path, key, v) in &fields {
        let last = key.rsplit('.').next().unwrap_or(key);
        if CURSOR_KEYS.contains(&last)
            && (v.is_string() || v.is_number() || v.is_null())
            && !looks_like_url(v)
        {
            let param = query
                .iter()
                .map(|(k, _)| k.as_str())
                .find(|k| CURSOR_PARAMS.contains(k))
                .map(str::to_string)
                .unwrap_or_else(|| cursor_param_for(last));
            return Some(Paging {
                yaml: format!("{{ cursor_from: {}, param: {}, max_pages: 20 }}", yaml_str(path), yaml_str(&param)),
                why: format!("`{path}` looks like the next page's cursor; sent back as `?{param}=` (check the API's docs for the parameter's name)"),
                pager_params: vec![param],
            });
        }
    }
    page_number(&fields, query)
}

fn cursor_param_for(key: &str) -> String {
    match key {
        "after" => "after",
        "next_page_token" => "page_token",
        "nextPageToken" => "pageToken",
        "next_token" | "nextToken" => "next_token",
        "continuation" | "continuation_token" => "continuation",
        _ => "cursor",
    }
    .into()
}

fn page_number(fields: &[(String, String, Value)], query: &[(String, String)]) -> Option<Paging> {
    let in_query = query
        .iter()
        .find(|(k, _)| PAGE_PARAMS.contains(&k.as_str()));
    let in_body = fields
        .iter()
        .any(|(_, k, _)| PAGE_PARAMS.contains(&k.rsplit('.').next().unwrap_or(k)))
        && fields
            .iter()
            .any(|(_, k, _)| TOTAL_PAGE_KEYS.contains(&k.rsplit('.').next().unwrap_or(k)));
    if in_query.is_none() && !in_body {
        return None;
    }
    let param = in_query.map_or("page".to_string(), |(k, _)| k.clone());
    let start = in_query
        .and_then(|(_, v)| v.parse::<u64>().ok())
        .filter(|n| *n == 0)
        .map_or(1, |_| 0);
    let mut yaml = format!("{{ page: {{ param: {}", yaml_str(&param));
    if start == 0 {
        yaml.push_str(", start: 0");
    }
    let mut pager_params = vec![param.clone()];
    if let Some((k, v)) = query
        .iter()
        .find(|(k, _)| SIZE_PARAMS.contains(&k.as_str()))
    {
        if let Ok(n) = v.parse::<u64>() {
            yaml.push_str(&format!(", size_param: {}, size: {n}", yaml_str(k)));
            pager_params.push(k.clone());
        }
    }
    yaml.push_str(" }, max_pages: 20 }");
    let why = if in_query.is_some() {
        format!("the request has a `{param}` page number; pages are read until one is empty (or shorter than the page size)")
    } else {
        "the answer has `page` and a total page count: page-number paging".into()
    };
    Some(Paging {
        yaml,
        why,
        pager_params,
    })
}
