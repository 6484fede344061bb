//! An endpoint's delivery policy as the delivery worker sees it: built by
//! `config` from `endpoints:` in bridge.yaml, read by [`super::worker`].

use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;

use super::retry::RetryPolicy;
use super::sign::SigningKey;

/// A delivery endpoint.
#[derive(Debug)]
pub struct Endpoint {
    pub name: String,
    pub url: reqwest::Url,
    /// Every active signing key (rotation signs with all of them).
    pub keys: Vec<SigningKey>,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub max_in_flight: usize,
    pub ordering: Ordering,
    /// Secret of the optional `X-Hub-Signature-256` header.
    pub hub_secret: Option<String>,
    /// Private address ranges allowed (the SSRF guard is off for it).
    pub allow_private: bool,
    pub circuit: CircuitPolicy,
}

/// When an endpoint stops being sent to.
#[derive(Debug, Clone)]
pub struct CircuitPolicy {
    /// Failed attempts in a row that open the circuit.
    pub failures: u32,
    /// While open, one probe this often.
    pub probe_every: Duration,
    /// Disable after failing continuously this long.
    pub disable_after: Option<Duration>,
}

/// Delivery order of an endpoint.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Ordering {
    /// Per instance, in detection order.
    #[default]
    Instance,
    /// No order: every due event may be sent at once.
    None,
}
