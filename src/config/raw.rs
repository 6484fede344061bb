//! The YAML, as written: serde types for `bridge.yaml` and connector files.
//!
//! Every struct denies unknown fields, so a typo is an error, not a silently
//! ignored setting. Values with a syntax of their own (durations, rates,
//! schedules, JSONPaths, templates) are parsed *while deserializing*, so their
//! errors carry the YAML location. These types never leave `config`: they are
//! validated into the runtime types (`crate::connector::spec`,
//! `crate::deliver::policy`, `crate::quota`, `config::resolve`). A few plain
//! value types (`Rate`, `DetectMode`, …) live in their runtime module and
//! are deserialized here directly: they carry no YAML. The values with a
//! syntax of their own are in `raw/values.rs`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::connector::spec::{Baseline, ClientAuth, DetectMode, KeyLocation};
use crate::deliver::policy::Ordering;
use crate::quota::Rate;

mod values;
pub use values::*;

// ---------------------------------------------------------------- bridge.yaml

/// `bridge.yaml`: the operator's file.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Bridge")]
pub struct RawBridge {
    /// Directory of the embedded store; relative to the config file.
    #[serde(default)]
    pub state_dir: Option<String>,
    /// Admin HTTP server (`/healthz`, `/readyz`, `/status`, `/metrics`).
    #[serde(default)]
    pub admin: Option<RawAdmin>,
    /// Globs of connector files, relative to this file.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub connectors: Vec<Spanned<String>>,
    /// What to poll, for whom.
    #[serde(default)]
    pub sources: BTreeMap<String, RawSource>,
    /// Where events go.
    #[serde(default)]
    pub endpoints: BTreeMap<String, RawEndpoint>,
    /// Quotas shared by every source calling a host.
    #[serde(default)]
    pub hosts: BTreeMap<String, RawHost>,
    /// How long shutdown waits for in-flight polls and deliveries.
    #[serde(default)]
    pub shutdown_timeout: Option<Timeout>,
    /// How long the store keeps history and dead letters.
    #[serde(default)]
    pub store: Option<RawStore>,
    /// The `User-Agent` of every poll (default `pollhook/<version>`); a
    /// connector's `request.user_agent` overrides it. Public APIs often
    /// ask for contact details: `"acme-agents/1.0 (ops@acme.example)"`.
    #[serde(default)]
    pub user_agent: Option<String>,
    /// pollhook's own events (an instance failing, an endpoint disabled, an
    /// event dead-lettered, a host throttling) and where they go.
    #[serde(default)]
    pub operations: Option<RawOperations>,
}

/// `operations:`
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Operations")]
pub struct RawOperations {
    /// Endpoints that receive operational events (`pollhook.*`).
    #[schemars(with = "Vec<String>")]
    pub deliver_to: Spanned<Vec<String>>,
    /// An instance is announced failing after this many failed polls in a
    /// row (default 5)...
    #[serde(default)]
    pub failing_after: Option<u32>,
    /// ...or after failing for this long (default 5m), whichever first.
    #[serde(default)]
    pub failing_for: Option<NonZeroDur>,
    /// A host pausing pollhook (`429`/`503` with `Retry-After`) for at least
    /// this long is announced (default 30s).
    #[serde(default)]
    pub throttled_after: Option<NonZeroDur>,
    /// At most this many operational events a minute (default 30); the
    /// rest are summarized in one `pollhook.ops.suppressed` event.
    #[serde(default)]
    pub max_per_minute: Option<u32>,
}

/// `store:`
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Store")]
pub struct RawStore {
    /// Delivery attempts (`pollhook events`) older than this are forgotten
    /// (default 7d; at most 10,000 are kept in any case).
    #[serde(default)]
    pub history: Option<NonZeroDur>,
    /// Dead letters older than this are deleted (default: kept until
    /// replayed or dropped).
    #[serde(default)]
    pub dead_letters: Option<NonZeroDur>,
    /// `sled` (the default: the embedded store in `state_dir`) or
    /// `postgres` (a PostgreSQL database at `url`).
    #[serde(default)]
    #[schemars(with = "Option<StoreBackend>")]
    pub backend: Option<Spanned<StoreBackend>>,
    /// `postgres`: the connection URL,
    /// `postgres://user:password@host:port/database` (give the password
    /// as `${credential:…}`). No TLS yet: a local or private-network
    /// server.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub url: Option<Spanned<String>>,
    /// `postgres`: the PostgreSQL schema holding pollhook's tables
    /// (default `pollhook`; created and migrated at start). A lower-case
    /// identifier.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub schema: Option<Spanned<String>>,
    /// `postgres`: how long a node owns an instance (polls it, delivers
    /// its events) without renewing its lease (default 15s, from 1s to
    /// 10m). A dead node's instances move to the others after this long;
    /// shorter means faster failover and more renewals per second.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub lease: Option<Spanned<LeaseDur>>,
}

/// `store.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StoreBackend {
    Sled,
    Postgres,
}

/// `admin:`
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Admin")]
pub struct RawAdmin {
    /// `host:port` to listen on; loopback by default.
    #[schemars(with = "String")]
    pub listen: Spanned<String>,
    /// When set, every admin route but `/healthz` needs
    /// `Authorization: Bearer <token>` (give it as `${credential:…}`).
    /// Required when `listen` is not a loopback address: the admin routes
    /// replay, drop and export events. An empty token is an error, not "no
    /// authentication", so that an unset `${ADMIN_TOKEN:-}` cannot turn
    /// authentication off; to run without a token on purpose, write
    /// `token: none` in the file itself (a `${VAR}` whose value is `none`
    /// is the token `none`).
    #[serde(default, deserialize_with = "present")]
    #[schemars(with = "Option<String>")]
    pub token: Option<Spanned<Option<String>>>,
    /// Host names a browser may use for the admin server besides IP
    /// addresses and `localhost` (a reverse proxy's name, say): a request
    /// whose `Host` names anything else is refused, so a site whose name
    /// is rebound to this machine (DNS rebinding) cannot read or act.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub allowed_hosts: Vec<Spanned<String>>,
}

/// A field that is present, even as null (`token:`), is `Some`: only an
/// absent field is `None` (with `#[serde(default)]`), so the two can be
/// told apart.
pub(crate) fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// One entry of `sources:`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Source")]
pub struct RawSource {
    /// Name of a connector found through `connectors:`, or a whole
    /// connector written inline (a one-off that needs no file of its own).
    #[schemars(with = "ConnectorRef")]
    pub connector: Spanned<ConnectorRef>,
    /// Values of the connector's params.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, serde_json::Value>")]
    pub with: BTreeMap<String, Spanned<serde_json::Value>>,
    /// Fan-out: `{ account: [a, b] }`, one instance per value (the cartesian
    /// product when several keys are given), or `discover`: one instance per
    /// item of the connector's `discover` request, refreshed on its schedule.
    #[serde(default)]
    #[schemars(with = "Option<ForEach>")]
    pub for_each: Option<Spanned<ForEach>>,
    /// `for_each: discover`: overrides the connector's `discover.schedule`.
    #[serde(default)]
    pub discover_schedule: Option<ScheduleSpec>,
    /// `for_each: discover`: how long the state of an instance that left the
    /// discovered list is kept (it resumes where it was if it comes back
    /// within that time). Default 7 days.
    #[serde(default)]
    pub retention: Option<Dur>,
    /// Overrides the connector's schedule.
    #[serde(default)]
    pub schedule: Option<ScheduleSpec>,
    /// Overrides the connector's `rate_limit` (per instance): the operator
    /// knows their own quota (a paid plan, a higher tier), which a
    /// connector written for everyone cannot.
    #[serde(default)]
    pub rate_limit: Option<Rate>,
    /// Endpoints: a list (every event type) or a map endpoint → event types.
    #[schemars(with = "DeliverTo")]
    pub deliver_to: Spanned<DeliverTo>,
}

// The forms of one field (`for_each`, `connector`, `deliver_to`, `secret`)
// keep a hand-written `Deserialize` and `JsonSchema` each, rather than
// `#[serde(untagged)]` and a derived schema: an untagged enum buffers the
// value, so an error inside it loses its YAML location and says only "did
// not match any variant" (`tests/it/config_errors.rs` asserts both), and
// schemars would describe it as `anyOf` the variants, not the forms (a lone
// name for a list, `discover` for `ForEach::Discover`).

/// `for_each:` in its two forms.
#[derive(Debug, Clone)]
pub enum ForEach {
    /// Static lists of param values.
    Static(BTreeMap<String, Vec<serde_json::Value>>),
    /// The connector's `discover` request.
    Discover,
}

impl<'de> Deserialize<'de> for ForEach {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ForEach;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a map of param to values (`{ account: [acc-1, acc-2] }`) or `discover`",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ForEach, E> {
                if v == "discover" {
                    Ok(ForEach::Discover)
                } else {
                    Err(E::custom(format!(
                        "expected `discover` or a map of param to values, got `{v}`"
                    )))
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ForEach, A::Error> {
                BTreeMap::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(ForEach::Static)
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for ForEach {
    fn schema_name() -> Cow<'static, str> {
        "ForEach".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "One instance per value: a map param → values (the cartesian product when several), or `discover` (the connector's `discover` request lists them).",
            "oneOf": [
                { "const": "discover" },
                {
                    "type": "object",
                    "additionalProperties": {
                        "type": "array",
                        "items": { "type": ["string", "number", "boolean"] },
                        "minItems": 1,
                    },
                },
            ],
        })
    }
}

/// A connector's `discover:` block: the request that lists the instances of
/// a `for_each: discover` source (e.g. `GET /accounts`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Discover")]
pub struct RawDiscover {
    /// The listing request (same form as the connector's `request`).
    pub request: RawRequest,
    #[serde(default)]
    pub response: Option<RawResponse>,
    #[serde(default)]
    pub paginate: Option<RawPaginate>,
    /// JSONPath of the listed things.
    #[schemars(with = "JsonPathSrc")]
    pub items: Spanned<JsonPathSrc>,
    /// Each instance's name, a template over `item` (unique per source).
    #[schemars(with = "TemplateSrc")]
    pub name: Spanned<TemplateSrc>,
    /// Param values of each instance, templates over `item`.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, TemplateSrc>")]
    pub with: BTreeMap<String, Spanned<TemplateSrc>>,
    /// How often the list is refreshed (default every 10 minutes).
    #[serde(default)]
    pub schedule: Option<ScheduleSpec>,
}

/// `connector:` of a source: a name, or a connector inline.
#[derive(Debug, Clone)]
pub enum ConnectorRef {
    Name(String),
    Inline(Box<RawConnector>),
}

impl<'de> Deserialize<'de> for ConnectorRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ConnectorRef;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a connector name, or a connector written inline (a map with `request:`, `detect:`, `emit:`)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ConnectorRef, E> {
                Ok(ConnectorRef::Name(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ConnectorRef, A::Error> {
                RawConnector::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|c| ConnectorRef::Inline(Box::new(c)))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for ConnectorRef {
    fn schema_name() -> Cow<'static, str> {
        "ConnectorRef".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "The name of a connector found through `connectors:`, or a connector written inline.",
            "oneOf": [
                { "type": "string" },
                generator.subschema_for::<RawConnector>(),
            ],
        })
    }
}

/// `deliver_to:` in its two forms.
#[derive(Debug, Clone)]
pub enum DeliverTo {
    /// `[finance-agent, audit]`: every event type.
    All(Vec<String>),
    /// `{ finance-agent: [bank.balance.low] }`: only these types.
    ByType(BTreeMap<String, Vec<String>>),
}

/// One entry of `endpoints:`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Endpoint")]
pub struct RawEndpoint {
    /// Where to POST events.
    #[schemars(with = "String")]
    pub url: Spanned<String>,
    /// `whsec_…` secret, or a list of them (all sign; rotation).
    #[schemars(with = "Secrets")]
    pub secret: Spanned<Secrets>,
    /// Per-attempt request timeout.
    #[serde(default)]
    pub timeout: Option<Timeout>,
    /// Retry policy.
    #[serde(default)]
    pub retry: Option<RawRetry>,
    /// Concurrent deliveries to this endpoint.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// `none`: events of one instance may overtake each other (more
    /// throughput, no per-instance order); `instance` (default) keeps order.
    #[serde(default)]
    pub ordering: Option<Ordering>,
    /// Also send `X-Hub-Signature-256: sha256=<hex HMAC of the body>` keyed
    /// with this secret, for receivers written for GitHub-style webhooks.
    #[serde(default)]
    pub hub_secret: Option<String>,
    /// Allow `http://` to a host that is not loopback.
    #[serde(default)]
    pub allow_insecure: bool,
    /// Endpoint health: when to stop sending and probe instead.
    #[serde(default)]
    pub circuit: Option<RawCircuit>,
    /// Allow an endpoint in private or link-local address ranges (the SSRF
    /// guard refuses them otherwise).
    #[serde(default)]
    pub allow_private: bool,
}

/// `circuit:` of an endpoint.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCircuit {
    /// Failed attempts in a row that open the circuit (default 5).
    #[serde(default)]
    pub failures: Option<u32>,
    /// While open, one probe delivery this often (default 30s).
    #[serde(default)]
    pub probe_every: Option<NonZeroDur>,
    /// Disable the endpoint after failing continuously this long (off by
    /// default; Svix disables after 5 days).
    #[serde(default)]
    pub disable_after: Option<NonZeroDur>,
}

/// One secret or several.
#[derive(Debug, Clone)]
pub enum Secrets {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for DeliverTo {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DeliverTo;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of endpoint names (`[finance-agent]`) or a map of endpoint to event types (`{ finance-agent: [bank.balance.low] }`)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DeliverTo, E> {
                Ok(DeliverTo::All(vec![v.to_string()]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<DeliverTo, A::Error> {
                Vec::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(DeliverTo::All)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<DeliverTo, A::Error> {
                BTreeMap::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(DeliverTo::ByType)
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for DeliverTo {
    fn schema_name() -> Cow<'static, str> {
        "DeliverTo".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Endpoints: a name or a list of names (every event type), or a map endpoint → the event types it gets.",
            "oneOf": [
                { "type": "string" },
                { "type": "array", "items": { "type": "string" } },
                {
                    "type": "object",
                    "additionalProperties": { "type": "array", "items": { "type": "string" } },
                },
            ],
        })
    }
}

impl<'de> Deserialize<'de> for Secrets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Secrets;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a `whsec_…` secret or a list of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secrets, E> {
                Ok(Secrets::One(v.to_string()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Secrets, A::Error> {
                Vec::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Secrets::Many)
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for Secrets {
    fn schema_name() -> Cow<'static, str> {
        "Secrets".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A Standard Webhooks `whsec_…` secret, or a list of them (each signs; for rotation).",
            "oneOf": [
                { "type": "string" },
                { "type": "array", "items": { "type": "string" } },
            ],
        })
    }
}

/// `retry:` of an endpoint.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Retry")]
pub struct RawRetry {
    /// Attempts in all, the first included; then the event is dead-lettered.
    /// Default: one more than the schedule's delays (8 with Svix's).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Fixed delays after the first, second, … attempt (the last repeats).
    /// Default: Svix's `[5s, 5m, 30m, 2h, 5h, 10h, 10h]`.
    #[serde(default)]
    pub schedule: Option<Vec<Dur>>,
    /// Only `exponential` for now.
    #[serde(default)]
    pub backoff: Option<Backoff>,
    /// Delay before the second attempt.
    #[serde(default)]
    pub first: Option<NonZeroDur>,
    /// Cap on any one delay.
    #[serde(default)]
    pub max: Option<NonZeroDur>,
}

/// Backoff shapes.
#[derive(Debug, Deserialize, Clone, Copy, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    Exponential,
}

/// One entry of `hosts:`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Host")]
pub struct RawHost {
    /// Sustained rate, e.g. `60/min`.
    #[serde(default)]
    pub rate: Option<Rate>,
    /// Requests allowed at once above the rate.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Requests in flight at once to this host.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
}

// ------------------------------------------------------------- connector file

/// A connector file.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Connector")]
pub struct RawConnector {
    /// The name sources refer to (required in a connector file; an inline
    /// connector takes its source's name).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub name: Option<Spanned<String>>,
    /// Free text for humans.
    #[serde(default)]
    pub description: Option<String>,
    /// Declared parameters.
    #[serde(default)]
    pub params: BTreeMap<String, RawParam>,
    /// Default schedule; a source may override it.
    #[serde(default)]
    pub schedule: Option<ScheduleSpec>,
    /// This connector's own quota, per instance (CONTRACT.md); quotas shared
    /// by everything calling a host are `hosts:` in bridge.yaml.
    #[serde(default)]
    pub rate_limit: Option<Rate>,
    /// Honour what the API says about polling it (`X-Poll-Interval`,
    /// `Cache-Control: max-age`, `Expires`) as a floor under the schedule
    /// (default true).
    #[serde(default)]
    pub poll_hints: Option<bool>,
    /// The request of one poll.
    pub request: RawRequest,
    /// How `for_each: discover` sources find their instances.
    #[serde(default)]
    pub discover: Option<RawDiscover>,
    /// How to read the body (`json`, `xml`, `csv`; by Content-Type when absent).
    #[serde(default)]
    pub response: Option<RawResponse>,
    /// Following more pages within one poll.
    #[serde(default)]
    pub paginate: Option<RawPaginate>,
    /// JSONPath to the list of items (`detect: new`).
    #[serde(default)]
    #[schemars(with = "Option<JsonPathSrc>")]
    pub items: Option<Spanned<JsonPathSrc>>,
    /// `items` selects columns, not rows: an object of parallel arrays
    /// (`{"id": [1, 2], "form": ["8-K", "10-Q"]}`) whose `i`-th entries
    /// make the `i`-th item (`{"id": 1, "form": "8-K"}`); `items` then
    /// names the object (`$.filings.recent`), without a final `[*]`.
    #[serde(default)]
    #[schemars(with = "Option<bool>")]
    pub columnar: Option<Spanned<bool>>,
    /// What makes an item unique (`detect: new`).
    #[serde(default)]
    #[schemars(with = "Option<TemplateSrc>")]
    pub id: Option<Spanned<TemplateSrc>>,
    /// `detect: changes`: what tells two versions of an item apart (e.g.
    /// `{{ item.updated_at }}`); the item's hash when absent.
    #[serde(default)]
    #[schemars(with = "Option<TemplateSrc>")]
    pub version: Option<Spanned<TemplateSrc>>,
    /// `detect: snapshot`: watch only this part of the resource.
    #[serde(default)]
    #[schemars(with = "Option<JsonPathSrc>")]
    pub watch: Option<Spanned<JsonPathSrc>>,
    /// `detect: snapshot`: the `watch`ed list is a set, compared as a map
    /// keyed by this template over each `item` (e.g. `{{ item.type }}`), so
    /// the same items in another order are no change, and `previous` and
    /// `current` are keyed, not positional.
    #[serde(default)]
    #[schemars(with = "Option<TemplateSrc>")]
    pub watch_key: Option<Spanned<TemplateSrc>>,
    /// With `watch_key`: what of each item is watched (a value template over
    /// `item`, e.g. `"{{ item.amount }}"`); the whole item when absent.
    #[serde(default)]
    #[schemars(with = "Option<ValueSrc>")]
    pub watch_value: Option<Spanned<ValueSrc>>,
    /// Where the next poll resumes.
    #[serde(default)]
    pub cursor: Option<RawCursor>,
    /// Detection mode.
    #[schemars(with = "DetectMode")]
    pub detect: Spanned<DetectMode>,
    /// First run: remember what exists (`skip`, default) or emit it (`emit`).
    #[serde(default)]
    pub baseline: Option<Baseline>,
    /// How many item ids an instance remembers after they left the listing
    /// (`detect: new`; every id of the latest listing is remembered), or how
    /// many items a listing may have (`detect: changes`).
    #[serde(default)]
    pub seen_limit: Option<usize>,
    /// How long an item id is remembered (`detect: new`); unbounded in age
    /// when absent (the count bound still holds).
    #[serde(default)]
    pub seen_ttl: Option<NonZeroDur>,
    /// Event rules.
    pub emit: Vec<RawEmit>,
}

/// A declared parameter.
#[derive(Debug, Clone, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Param")]
pub struct RawParam {
    /// A source must give it.
    #[serde(default)]
    pub required: bool,
    /// Masked in `pollhook test` output and never logged.
    #[serde(default)]
    pub secret: bool,
    /// Value when the source gives none; its type (number, bool) is the
    /// param's type, so `"${THRESHOLD}"` from the environment becomes a number.
    #[serde(default)]
    pub default: Option<serde_json::Value>,
    /// Free text for humans.
    #[serde(default)]
    pub description: Option<String>,
}

/// `request:`
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Request")]
pub struct RawRequest {
    /// HTTP method, `GET` by default.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub method: Option<Spanned<String>>,
    /// URL template.
    #[schemars(with = "TemplateSrc")]
    pub url: Spanned<TemplateSrc>,
    /// Query parameters; an empty rendered value is left out.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, TemplateSrc>")]
    pub query: BTreeMap<String, Spanned<TemplateSrc>>,
    /// Headers; an empty rendered value is left out.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, TemplateSrc>")]
    pub headers: BTreeMap<String, Spanned<TemplateSrc>>,
    /// Raw body template (sent with `content-type: application/json` unless a
    /// header says otherwise): SOAP envelopes, hand-written JSON-RPC.
    #[serde(default)]
    #[schemars(with = "Option<TemplateSrc>")]
    pub body: Option<Spanned<TemplateSrc>>,
    /// A JSON body written as YAML; every string is a template, and a lone
    /// `{{ expr }}` keeps its type.
    #[serde(default)]
    #[schemars(with = "Option<ValueSrc>")]
    pub json: Option<Spanned<ValueSrc>>,
    /// A form body (`application/x-www-form-urlencoded`); values are templates.
    #[serde(default)]
    #[schemars(with = "Option<BTreeMap<String, TemplateSrc>>")]
    pub form: Option<Spanned<BTreeMap<String, TemplateSrc>>>,
    /// Authentication. Spanned so that errors in its fields, which serde's
    /// tagged enums do not locate, can be pointed at within it.
    #[serde(default)]
    #[schemars(with = "Option<RawAuth>")]
    pub auth: Option<Spanned<RawAuth>>,
    /// Request timeout (default 30s).
    #[serde(default)]
    pub timeout: Option<Timeout>,
    /// Largest response body accepted, in bytes (default 10 MiB).
    #[serde(default)]
    pub max_response_bytes: Option<u64>,
    /// The `User-Agent` of this connector's requests (a template: e.g.
    /// `"{{ app }} ({{ contact }})"`), instead of the bridge's
    /// `user_agent`. Some public APIs refuse requests without a descriptive
    /// one with contact details.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub user_agent: Option<Spanned<TemplateSrc>>,
}

/// `request.auth:`
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[schemars(rename = "Auth")]
pub enum RawAuth {
    /// `Authorization: Bearer <token>`; left out when the token renders
    /// empty (a connector's "empty for none" default). A source that gives
    /// the token's param a value that is empty (`token: ${TOKEN}`, `TOKEN`
    /// unset) is an error at load: to send none, leave the param out (or
    /// write `${TOKEN:-}`, none unless set).
    Bearer { token: TemplateSrc },
    /// HTTP basic auth.
    Basic {
        username: TemplateSrc,
        #[serde(default)]
        password: Option<TemplateSrc>,
    },
    /// An API key in a header or a query parameter.
    ApiKey {
        /// `header` (default) or `query`.
        #[serde(default, rename = "in")]
        location: KeyLocation,
        /// Header or parameter name, e.g. `X-API-Key` or `api_key`.
        name: String,
        value: TemplateSrc,
    },
    /// OAuth2 client credentials (RFC 6749 §4.4): a token is fetched from
    /// `token_url`, cached until shortly before it expires, and fetched again
    /// once when the API answers 401.
    Oauth2 {
        token_url: TemplateSrc,
        client_id: TemplateSrc,
        client_secret: TemplateSrc,
        #[serde(default)]
        scope: Option<TemplateSrc>,
        /// Extra form fields of the token request (e.g. `audience`).
        #[serde(default)]
        params: BTreeMap<String, TemplateSrc>,
        /// How the client authenticates to the token endpoint: `basic`
        /// (default, RFC 6749's recommendation) or `body`.
        #[serde(default)]
        client_auth: ClientAuth,
        /// The `refresh_token` grant (RFC 6749 §6) instead of client
        /// credentials: the refresh token the operator seeds once (from a
        /// file or credential). When the provider rotates it, the newest
        /// one is kept in the store (never in logs or exports) and used
        /// after a restart; a new seed here replaces it.
        #[serde(default)]
        refresh_token: Option<TemplateSrc>,
    },
}

/// `response:`
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Response")]
pub struct RawResponse {
    /// `auto` (default: by Content-Type, then by the first byte), `json`,
    /// `xml` or `csv`. XML and CSV become the same JSON tree JSONPath reads.
    #[serde(default)]
    #[schemars(schema_with = "response_format_schema")]
    pub format: Option<crate::connector::format::Format>,
}

/// `paginate:`: exactly one style (`cursor_from` + `param`, `next_url`,
/// `link_header`, `page`, `offset`), then stop conditions and caps.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Paginate")]
pub struct RawPaginate {
    /// Cursor style: JSONPath of the next page's cursor in each page.
    #[serde(default)]
    #[schemars(with = "Option<JsonPathSrc>")]
    pub cursor_from: Option<Spanned<JsonPathSrc>>,
    /// Cursor style: the query parameter that carries it.
    #[serde(default)]
    pub param: Option<String>,
    /// Next-URL style: JSONPath of the next page's URL (absolute or relative).
    #[serde(default)]
    #[schemars(with = "Option<JsonPathSrc>")]
    pub next_url: Option<Spanned<JsonPathSrc>>,
    /// `Link` header style (RFC 8288 `rel="next"`), as GitHub and GitLab page.
    #[serde(default)]
    pub link_header: Option<bool>,
    /// Page-number style.
    #[serde(default)]
    pub page: Option<RawPageNumber>,
    /// Offset/limit style.
    #[serde(default)]
    pub offset: Option<RawOffset>,
    /// Stop after a page for which this condition (over `page`, the body,
    /// and `count`, its number of items) is true.
    #[serde(default)]
    #[schemars(with = "Option<ConditionSrc>")]
    pub stop_when: Option<Spanned<ConditionSrc>>,
    /// Most pages per poll (default 100). Reaching it is reported on the
    /// instance's status; what was read is still processed.
    #[serde(default)]
    pub max_pages: Option<u32>,
    /// Hosts a next URL may point to besides the first request's host.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// The first page speaks for the whole listing: ask it conditionally
    /// (`If-None-Match` / `If-Modified-Since`, from the last answer's
    /// `ETag` / `Last-Modified`), and take a `304` for "nothing changed"
    /// without reading further pages. Only for an API whose first page's
    /// validator covers the listing, or whose listing is sorted by last
    /// change, newest first (GitHub's notifications): a change on page 2
    /// that leaves page 1 as it was would otherwise go unseen. Default
    /// false: paged listings are read whole.
    #[serde(default)]
    pub conditional: Option<bool>,
}

/// `paginate.page:`
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "PageNumber")]
pub struct RawPageNumber {
    /// Query parameter of the page number.
    pub param: String,
    /// First page number (default 1).
    #[serde(default)]
    pub start: Option<u64>,
    /// Query parameter of the page size, if the API takes one.
    #[serde(default)]
    pub size_param: Option<String>,
    /// Page size: a page with fewer items is the last.
    #[serde(default)]
    pub size: Option<u64>,
}

/// `paginate.offset:`
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Offset")]
pub struct RawOffset {
    /// Query parameter of the offset (starts at 0).
    pub param: String,
    /// Query parameter of the limit, if the API takes one.
    #[serde(default)]
    pub limit_param: Option<String>,
    /// Items per page: the offset grows by it; a shorter page is the last.
    pub limit: u64,
}

/// `cursor:`
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Cursor")]
pub struct RawCursor {
    /// JSONPath into the (last) page: an opaque cursor the API gives.
    #[serde(default)]
    #[schemars(with = "Option<JsonPathSrc>")]
    pub from: Option<Spanned<JsonPathSrc>>,
    /// Template over each item: the greatest value becomes the cursor.
    #[serde(default)]
    #[schemars(with = "Option<TemplateSrc>")]
    pub max: Option<Spanned<TemplateSrc>>,
    /// Ask again for this much before the cursor (a timestamp or epoch
    /// seconds), for APIs whose late writes land behind it; the overlap is
    /// de-duplicated by item id, so it never reaches the agent twice.
    #[serde(default)]
    pub lookback: Option<Dur>,
}

/// One `emit:` rule.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Emit")]
pub struct RawEmit {
    /// Event type, e.g. `bank.balance.changed`; may be a template
    /// (`ticket.{{ change }}`).
    #[serde(rename = "type")]
    #[schemars(with = "String")]
    pub kind: Spanned<String>,
    /// Condition; the event is emitted when it is true.
    #[serde(default)]
    #[schemars(with = "Option<ConditionSrc>")]
    pub when: Option<Spanned<ConditionSrc>>,
    /// The event's `data`, a value template; by default the item (or
    /// `{previous, current}` for snapshots and updates).
    #[serde(default)]
    #[schemars(with = "Option<ValueSrc>")]
    pub data: Option<Spanned<ValueSrc>>,
}

/// `response.format`: [`crate::connector::format::Format`], or null.
fn response_format_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "enum": ["auto", "json", "xml", "csv", null],
    })
}
