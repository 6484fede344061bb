//! One endpoint's delivery worker.
//!
//! It walks the endpoint's outbox in detection order and sends, at most
//! `max_in_flight` at once, the *head* event of each instance: while an
//! instance's event is in flight or waiting for a retry, that instance's
//! later events wait, so an agent never sees a balance go 120 → 80 → 100.
//! Other instances are not held up. Each endpoint has its own worker, so a
//! dead endpoint never delays another.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderValue, CONTENT_TYPE, USER_AGENT};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::retry::{classify, Outcome};
use super::sign::signature_header;
use crate::config::Endpoint;
use crate::status::Status;
use crate::store::{DeadLetter, EntryKey, OutboxEntry, Store};

/// Everything one endpoint's worker needs.
pub struct Worker {
    pub endpoint: Arc<Endpoint>,
    pub store: Store,
    /// Shared client; built with redirects disabled (a 3xx is a failure).
    pub client: reqwest::Client,
    pub status: Arc<Status>,
    /// Poked by pollers after they commit events for this endpoint.
    pub wake: Arc<Notify>,
}

/// The user agent of deliveries and polls.
pub const USER_AGENT_VALUE: &str = concat!("pollhook/", env!("CARGO_PKG_VERSION"));

/// A client for deliveries: no redirects, no proxies from the environment
/// surprising an operator.
pub fn delivery_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(USER_AGENT_VALUE)
        .build()
        .expect("a TLS backend is compiled in")
}

impl Worker {
    /// Runs until `shutdown`; then stops sending and returns once in-flight
    /// attempts have finished (the caller bounds that wait).
    pub async fn run(self, shutdown: CancellationToken) {
        let ep = self.endpoint.clone();
        let mut in_flight: JoinSet<(EntryKey, OutboxEntry, Outcome)> = JoinSet::new();
        let mut busy: HashSet<String> = HashSet::new();
        loop {
            let mut next_due: Option<i64> = None;
            if !shutdown.is_cancelled() {
                let now = crate::now_ms();
                let mut blocked = busy.clone();
                for item in self.store.outbox(&ep.name) {
                    let (key, entry) = match item {
                        Ok(x) => x,
                        Err(e) => {
                            error!(endpoint = %ep.name, error = %format!("{e:#}"), "cannot read the outbox");
                            continue;
                        }
                    };
                    if !blocked.insert(entry.instance.clone()) {
                        continue; // an earlier event of this instance goes first
                    }
                    if entry.next_attempt_ms > now {
                        next_due = Some(
                            next_due
                                .map_or(entry.next_attempt_ms, |d| d.min(entry.next_attempt_ms)),
                        );
                        continue;
                    }
                    if in_flight.len() >= ep.max_in_flight {
                        break; // a completion wakes us up again
                    }
                    busy.insert(entry.instance.clone());
                    let client = self.client.clone();
                    let endpoint = ep.clone();
                    in_flight.spawn(async move {
                        let outcome = attempt(&client, &endpoint, &entry).await;
                        (key, entry, outcome)
                    });
                }
            } else if in_flight.is_empty() {
                return;
            }
            let sleep = async {
                match next_due {
                    Some(t) => {
                        tokio::time::sleep(Duration::from_millis(
                            (t - crate::now_ms()).max(0) as u64
                        ))
                        .await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(done) = in_flight.join_next() => {
                    match done {
                        Ok((key, entry, outcome)) => {
                            busy.remove(&entry.instance);
                            self.settle(key, entry, outcome).await;
                        }
                        Err(e) => error!(endpoint = %ep.name, error = %e, "delivery task failed"),
                    }
                }
                _ = self.wake.notified() => {}
                _ = sleep => {}
                _ = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
            }
        }
    }

    /// Records an attempt's outcome: delivered, rescheduled or dead-lettered.
    async fn settle(&self, key: EntryKey, mut entry: OutboxEntry, outcome: Outcome) {
        let ep = &self.endpoint;
        entry.attempts += 1;
        match outcome {
            Outcome::Delivered => {
                debug!(endpoint = %ep.name, event = %entry.event_id, instance = %entry.instance, attempts = entry.attempts, "delivered");
                if let Err(e) = self.store.delivered(&key) {
                    error!(endpoint = %ep.name, error = %format!("{e:#}"), "cannot remove a delivered event from the outbox; it will be delivered again");
                }
                self.status.endpoint(&ep.name, |s| {
                    s.delivered += 1;
                    s.last_success_ms = Some(crate::now_ms());
                });
            }
            Outcome::Failed(reason) => {
                self.status.endpoint(&ep.name, |s| {
                    s.failed_attempts += 1;
                    s.last_error = Some(reason.clone());
                });
                let unit: f64 = rand::random();
                match ep.retry.delay_after(entry.attempts, unit) {
                    Some(delay) => {
                        warn!(
                            endpoint = %ep.name, event = %entry.event_id, instance = %entry.instance,
                            attempt = entry.attempts, max_attempts = ep.retry.max_attempts,
                            retry_in = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
                            "delivery failed: {reason}"
                        );
                        entry.next_attempt_ms = crate::now_ms() + delay.as_millis() as i64;
                        entry.last_error = Some(reason);
                        if let Err(e) = self.store.reschedule(&key, &entry) {
                            error!(endpoint = %ep.name, error = %format!("{e:#}"), "cannot record a failed attempt");
                        }
                    }
                    None => {
                        error!(
                            endpoint = %ep.name, event = %entry.event_id, instance = %entry.instance,
                            attempts = entry.attempts,
                            "delivery failed for the last time, moved to dead letters: {reason}"
                        );
                        entry.last_error = Some(reason);
                        let letter = DeadLetter {
                            endpoint: ep.name.clone(),
                            entry,
                            dead_at_ms: crate::now_ms(),
                        };
                        match self.store.dead_letter(&key, &letter).await {
                            Ok(()) => self.status.endpoint(&ep.name, |s| s.dead_lettered += 1),
                            Err(e) => {
                                error!(endpoint = %ep.name, error = %format!("{e:#}"), "cannot dead-letter an event; it stays in the outbox")
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One signed POST. Never reads more than a little of the response.
async fn attempt(client: &reqwest::Client, ep: &Endpoint, entry: &OutboxEntry) -> Outcome {
    let timestamp = chrono::Utc::now().timestamp();
    let signature = signature_header(&ep.keys, &entry.event_id, timestamp, entry.body.as_bytes());
    let result = client
        .post(ep.url.clone())
        .timeout(ep.timeout)
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header(USER_AGENT, USER_AGENT_VALUE)
        .header("webhook-id", &entry.event_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(entry.body.clone())
        .send()
        .await;
    match result {
        Ok(resp) => classify(resp.status().as_u16()),
        Err(e) if e.is_timeout() => Outcome::Failed(format!(
            "timed out after {}",
            humantime::format_duration(ep.timeout)
        )),
        Err(e) if e.is_connect() => Outcome::Failed("cannot connect to the endpoint".into()),
        Err(e) => {
            let mut msg = "request failed".to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            Outcome::Failed(msg)
        }
    }
}
