//! Every metric of `/metrics` in one place: the label sets, the counter
//! and histogram families [`Status`] increments as things happen, the
//! gauges built per scrape, and the text exposition. The admin server only
//! serves what [`exposition`] returns, so each family's name, labels and
//! HELP text are written here once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::prometheus_text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{EndpointStatus, InstanceStatus, Status};
use crate::quota::{HostReport, HostStats};

/// Upper bounds (seconds) of the histograms' buckets: from a 304 on
/// loopback to a delivery that waited out a receiver's outage.
pub const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
    3600.0,
];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS.iter().copied())
}

/// A source's series: labelled by source and connector.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
    pub connector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PollLabels {
    pub(super) source: String,
    pub(super) connector: String,
    pub(super) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct EventLabels {
    pub(super) source: String,
    pub(super) r#type: String,
}

/// An endpoint's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct DeliveryLabels {
    pub(super) endpoint: String,
    pub(super) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OutcomeLabels {
    pub(super) outcome: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// The counters and histograms of `/metrics`, incremented where the event
/// happens and never recomputed from the status maps: a reload removes
/// instances and endpoints from those maps, but a Prometheus counter must
/// not go backwards for the life of the process (a drop reads as a
/// restart, and `rate()` turns it into a spike). A series, once created,
/// stays. Labelled by source, endpoint or host, never by instance: 10,000
/// instances must not make 10,000 series per family.
///
/// Gauges are not here: they describe the present (what runs now, what
/// waits) and are built per scrape by [`exposition`] from the status.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub(super) polls: Family<PollLabels, Counter>,
    /// Poll durations by (source, connector), whatever the outcome.
    pub(super) poll_duration: Histograms<SourceLabels>,
    /// Events detected by (source, type).
    pub(super) events: Family<EventLabels, Counter>,
    pub(super) seen_evicted: Family<SourceLabels, Counter>,
    pub(super) deliveries: Family<DeliveryLabels, Counter>,
    /// Delivery attempts' HTTP round trip, by endpoint.
    pub(super) attempt_duration: Histograms<EndpointLabels>,
    /// From detection to the successful delivery, by endpoint.
    pub(super) delivery_lag: Histograms<EndpointLabels>,
    pub(super) reloads: Family<OutcomeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let reloads: Family<OutcomeLabels, Counter> = Family::default();
        for outcome in ["applied", "refused"] {
            reloads.get_or_create(&OutcomeLabels { outcome }).inc_by(0);
        }
        Metrics {
            polls: Family::default(),
            poll_duration: Family::new_with_constructor(histogram),
            events: Family::default(),
            seen_evicted: Family::default(),
            deliveries: Family::default(),
            attempt_duration: Family::new_with_constructor(histogram),
            delivery_lag: Family::new_with_constructor(histogram),
            reloads,
        }
    }
}

impl Metrics {
    /// Registers the source families (polls, events), in the exposition's
    /// order. The families are shared (`Clone` shares the series), so a
    /// registry can be built per scrape beside that scrape's gauges.
    pub fn register_sources(&self, r: &mut Registry) {
        r.register(
            "pollhook_polls",
            "Polls by outcome (not_modified: a 304 to a conditional request).",
            self.polls.clone(),
        );
        r.register(
            "pollhook_poll_duration_seconds",
            "Time a poll took, from the first request to the commit (pages, throttling waits included).",
            self.poll_duration.clone(),
        );
        r.register(
            "pollhook_events",
            "Events detected and queued for delivery, by type.",
            self.events.clone(),
        );
        r.register(
            "pollhook_seen_evicted",
            "Item ids forgotten because of seen_limit / seen_ttl (detect: new).",
            self.seen_evicted.clone(),
        );
    }

    /// Registers the delivery families.
    pub fn register_deliveries(&self, r: &mut Registry) {
        r.register(
            "pollhook_deliveries",
            "Delivery attempts by outcome (dead_lettered: attempts ran out).",
            self.deliveries.clone(),
        );
        r.register(
            "pollhook_delivery_attempt_duration_seconds",
            "Round trip of a delivery attempt to the endpoint.",
            self.attempt_duration.clone(),
        );
        r.register(
            "pollhook_delivery_latency_seconds",
            "From detection to successful delivery (retries and outages included).",
            self.delivery_lag.clone(),
        );
    }

    /// Registers the reload counter.
    pub fn register_config(&self, r: &mut Registry) {
        r.register(
            "pollhook_config_reloads",
            "Configuration reloads (SIGHUP) by outcome.",
            self.reloads.clone(),
        );
    }
}

/// A host's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: String,
}

/// A gauge of seconds (or any fraction).
type Seconds = Gauge<f64, AtomicU64>;

/// What one scrape reads: the status, and what the admin server gathers
/// beside it (the configured endpoints, the host gates), all in memory.
pub struct Scrape<'a> {
    pub status: &'a Status,
    /// Every configured endpoint with its status.
    pub endpoints: &'a BTreeMap<String, EndpointStatus>,
    /// The host gates' counters, which live as long as the process.
    pub host_counters: &'a BTreeMap<String, Arc<HostStats>>,
    /// The host gates' reports (whether each is paused now).
    pub hosts: &'a BTreeMap<String, HostReport>,
    /// The scrape's time, ms since the epoch.
    pub now_ms: i64,
}

/// `/metrics` in the Prometheus text format (0.0.4), by prometheus-client.
///
/// Counters and histograms are the families that `Status` and the host
/// gates increment as things happen, so they never go backwards. Gauges
/// describe the present and are built here, per scrape, from in-memory
/// status only (no store scan). Instances are aggregated by source (their
/// detail is on `/status`), so the exposition stays small with thousands
/// of instances; each instance is read under its own lock, never copied.
pub fn exposition(s: &Scrape<'_>) -> Result<String, std::fmt::Error> {
    let mut r = Registry::default();
    let m = s.status.metrics();
    m.register_sources(&mut r);
    register_source_gauges(&mut r, &by_source(s.status), s.now_ms);
    m.register_deliveries(&mut r);
    register_endpoint_gauges(&mut r, s.endpoints, s.now_ms);
    register_hosts(&mut r, s.host_counters, s.hosts);
    m.register_config(&mut r);
    register_config_gauge(&mut r, s.status);
    let mut out = String::new();
    encode(&mut out, &r)?;
    Ok(out)
}

/// Seconds from `t` to `now_ms` (0 for a time in the future). Pure.
fn age(now_ms: i64, t: i64) -> f64 {
    (now_ms - t).max(0) as f64 / 1000.0
}

/// A source's instances, aggregated: failing instances, longest effective
/// interval, oldest last success, instances.
#[derive(Debug, Default, PartialEq)]
struct SourceGauges {
    failing: i64,
    interval_ms: Option<u64>,
    oldest_ok_ms: Option<i64>,
    instances: i64,
}

impl SourceGauges {
    /// Counts one instance in. Pure.
    fn add(&mut self, i: &InstanceStatus) {
        self.instances += 1;
        self.failing += i64::from(i.consecutive_failures > 0);
        if let Some(ms) = i.effective_interval_ms {
            self.interval_ms = Some(self.interval_ms.map_or(ms, |x| x.max(ms)));
        }
        if let Some(t) = i.last_ok_ms {
            self.oldest_ok_ms = Some(self.oldest_ok_ms.map_or(t, |x| x.min(t)));
        }
    }
}

/// Every instance aggregated by (source, connector), each read under its
/// own lock and never copied.
fn by_source(status: &Status) -> BTreeMap<SourceLabels, SourceGauges> {
    let mut sources: BTreeMap<SourceLabels, SourceGauges> = BTreeMap::new();
    let mut key = SourceLabels {
        source: String::new(),
        connector: String::new(),
    };
    status.each_instance(|i| {
        key.source.clear();
        key.source.push_str(&i.source);
        key.connector.clear();
        key.connector.push_str(&i.connector);
        if !sources.contains_key(&key) {
            sources.insert(key.clone(), SourceGauges::default());
        }
        sources.get_mut(&key).expect("inserted").add(i);
    });
    sources
}

/// The per-source gauges: staleness, interval, failing and all instances.
fn register_source_gauges(
    r: &mut Registry,
    sources: &BTreeMap<SourceLabels, SourceGauges>,
    now_ms: i64,
) {
    let cursor_age = Family::<SourceLabels, Seconds>::default();
    let interval = Family::<SourceLabels, Seconds>::default();
    let failing = Family::<SourceLabels, Gauge>::default();
    let instances = Family::<SourceLabels, Gauge>::default();
    for (l, x) in sources {
        if let Some(t) = x.oldest_ok_ms {
            cursor_age.get_or_create(l).set(age(now_ms, t));
        }
        if let Some(ms) = x.interval_ms {
            interval.get_or_create(l).set(ms as f64 / 1000.0);
        }
        failing.get_or_create(l).set(x.failing);
        instances.get_or_create(l).set(x.instances);
    }
    r.register(
        "pollhook_cursor_age_seconds",
        "Seconds since the least recently successful instance of a source last polled successfully: how stale the oldest view of the upstream is.",
        cursor_age,
    );
    r.register(
        "pollhook_poll_interval_seconds",
        "Longest time between the starts of an instance's last two polls (stretches when a host quota is scarce).",
        interval,
    );
    r.register(
        "pollhook_instances_failing",
        "Instances whose last poll failed (they back off meanwhile).",
        failing,
    );
    r.register("pollhook_instances", "Instances polled.", instances);
}

/// The per-endpoint gauges: the outbox, dead letters, the circuit.
fn register_endpoint_gauges(
    r: &mut Registry,
    endpoints: &BTreeMap<String, EndpointStatus>,
    now_ms: i64,
) {
    let depth = Family::<EndpointLabels, Gauge>::default();
    let oldest = Family::<EndpointLabels, Seconds>::default();
    let dead = Family::<EndpointLabels, Gauge>::default();
    let open = Family::<EndpointLabels, Gauge>::default();
    for (name, e) in endpoints {
        let l = EndpointLabels {
            endpoint: name.clone(),
        };
        depth.get_or_create(&l).set(e.queue_depth as i64);
        oldest
            .get_or_create(&l)
            .set(e.oldest_pending_ms.map_or(0.0, |t| age(now_ms, t)));
        dead.get_or_create(&l).set(e.dead_letters as i64);
        open.get_or_create(&l)
            .set(i64::from(e.circuit_open || e.disabled.is_some()));
    }
    r.register(
        "pollhook_outbox_depth",
        "Events waiting for delivery.",
        depth,
    );
    r.register(
        "pollhook_outbox_oldest_age_seconds",
        "Age of the oldest event waiting for delivery (0 when none waits).",
        oldest,
    );
    r.register(
        "pollhook_dead_letters",
        "Events whose attempts ran out.",
        dead,
    );
    r.register(
        "pollhook_endpoint_circuit_open",
        "1 while an endpoint's circuit is open (only probes go out) or it is disabled.",
        open,
    );
}

/// The per-host families: the gates' counters and whether each is paused.
fn register_hosts(
    r: &mut Registry,
    counters: &BTreeMap<String, Arc<HostStats>>,
    reports: &BTreeMap<String, HostReport>,
) {
    // Host counters live as long as the process (see `HostGates`), so
    // reading them at the scrape cannot make them go backwards.
    let requests = Family::<HostLabels, Counter>::default();
    let throttled = Family::<HostLabels, Counter>::default();
    let too_many = Family::<HostLabels, Counter>::default();
    let paused_secs = Family::<HostLabels, Counter<f64, AtomicU64>>::default();
    for (host, st) in counters {
        let l = HostLabels { host: host.clone() };
        requests
            .get_or_create(&l)
            .inc_by(st.requests.load(Ordering::Relaxed));
        throttled
            .get_or_create(&l)
            .inc_by(st.throttled.load(Ordering::Relaxed));
        too_many
            .get_or_create(&l)
            .inc_by(st.too_many.load(Ordering::Relaxed));
        paused_secs
            .get_or_create(&l)
            .inc_by(st.paused_ms.load(Ordering::Relaxed) as f64 / 1000.0);
    }
    let paused = Family::<HostLabels, Gauge>::default();
    for (host, h) in reports {
        paused
            .get_or_create(&HostLabels { host: host.clone() })
            .set(i64::from(h.paused_for_ms.is_some()));
    }
    r.register(
        "pollhook_upstream_requests",
        "Requests sent to an upstream host.",
        requests,
    );
    r.register(
        "pollhook_upstream_throttled",
        "429 and 503 answers of an upstream host.",
        throttled,
    );
    r.register(
        "pollhook_upstream_429",
        "429 Too Many Requests answers of an upstream host.",
        too_many,
    );
    r.register(
        "pollhook_upstream_throttled_seconds",
        "Time an upstream host was paused by its Retry-After / RateLimit headers or refusals.",
        paused_secs,
    );
    r.register(
        "pollhook_upstream_paused",
        "1 while an upstream host is paused.",
        paused,
    );
}

/// Whether the last reload was applied.
fn register_config_gauge(r: &mut Registry, status: &Status) {
    let last_ok = Gauge::<i64>::default();
    last_ok.set(i64::from(status.config().last_reload_ok != Some(false)));
    r.register(
        "pollhook_config_last_reload_successful",
        "0 when the last reload was refused (the previous configuration runs).",
        last_ok,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_aggregate_by_source_to_the_worst_of_each() {
        let mut g = SourceGauges::default();
        let mut i = InstanceStatus {
            effective_interval_ms: Some(1_000),
            last_ok_ms: Some(50),
            ..Default::default()
        };
        g.add(&i);
        i.consecutive_failures = 2;
        i.effective_interval_ms = Some(5_000);
        i.last_ok_ms = Some(10);
        g.add(&i);
        i.effective_interval_ms = None;
        i.last_ok_ms = None;
        i.consecutive_failures = 0;
        g.add(&i);
        assert_eq!(
            g,
            SourceGauges {
                failing: 1,
                interval_ms: Some(5_000),
                oldest_ok_ms: Some(10),
                instances: 3,
            }
        );
    }

    #[test]
    fn an_age_is_never_negative() {
        assert_eq!(age(3_500, 1_000), 2.5);
        assert_eq!(age(1_000, 3_500), 0.0);
    }
}
