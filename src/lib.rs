//! pollhook: webhooks for APIs that have none.
//!
//! pollhook polls APIs that can only be polled, recognises what changed, and
//! delivers signed [Standard Webhooks](https://www.standardwebhooks.com/)
//! events to agent endpoints, at least once and without ever losing a
//! detected change. `ARCHITECTURE.md` at the repository root has the
//! bird's-eye view; in short, data flows one way:
//!
//! ```text
//! schedule → poll (connector::fetch) → detect (connector::detect, pure)
//!          → store::Store::commit_fenced (state + outbox, ONE transaction)
//!          → deliver::worker (sign, POST, retry, dead-letter)
//! ```
//!
//! Module map (every module, one line each):
//! - [`access`]: who may talk to the admin server (Host, Origin, sessions).
//! - [`admin`]: the admin server's routes, operations and [`admin::dashboard`].
//! - [`cluster`]: the node every daemon is: leases, heartbeats, wake-ups, on the coordination seam.
//! - [`config`]: YAML, `${VAR}`, validation with `file:line` errors into the runtime types.
//! - [`connector`]: resolved connectors, fetching pages, detection, masking, cassettes, scaffolds.
//! - [`daemon`]: `pollhook run`: lifecycle, the supervisor, shutdown.
//! - [`deliver`]: signing, retries, the SSRF guard, endpoint policy (pure) and the workers.
//! - [`discover`]: `for_each: discover`, instances found at run time.
//! - [`dryrun`]: `pollhook test`, as a typed report.
//! - [`event`]: the wire format, defined once.
//! - [`gcra`]: pure GCRA reservations.
//! - [`hints`]: what an answer says about polling again (pure).
//! - [`logfmt`]: text log fields with control characters escaped.
//! - [`notify`]: the systemd notify protocol.
//! - [`operate`]: operator verbs (dead letters, history, enable, backups), for admin and CLI.
//! - [`opsevents`]: operational events (`operations:`), queued in the outbox.
//! - [`poll`]: one instance's loop: schedule, fetch, detect, commit.
//! - [`quota`]: politeness: host gates, rate limits, what answers advise.
//! - [`reload`]: what changed between two configurations (pure).
//! - [`runtime`]: what every stage shares at run time (`Shared`, `Live`, `Tasks`, `Source`).
//! - [`schedule`]: `every <duration>` and cron schedules (pure).
//! - [`status`]: in-memory status, every metric ([`status::metrics`]), the `/status` report.
//! - [`store`]: the storage seam (sled, PostgreSQL) and the coordination seam beside it.
//! - [`template`]: the Jinja-style template engine used by every connector.
//! - [`wake`]: wake-ups of delivery workers, by endpoint (the bottom layer).

pub mod access;
pub mod admin;
pub mod cluster;
pub mod config;
pub mod connector;
pub mod daemon;
pub mod deliver;
pub mod discover;
pub mod dryrun;
pub mod event;
pub mod gcra;
pub mod hints;
pub mod logfmt;
pub mod memory;
pub mod notify;
pub mod operate;
pub mod opsevents;
pub mod poll;
pub mod quota;
pub mod reload;
pub mod runtime;
pub mod schedule;
pub mod status;
pub mod store;
pub mod template;
pub mod wake;

/// Milliseconds since the Unix epoch, the one clock unit stored on disk.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// reqwest's error chain without the URL (callers print it once, masked):
/// what kind of failure, then each cause. Shared by polls, token requests
/// and deliveries.
pub(crate) fn transport_detail(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    if e.is_timeout() {
        parts.push("request timed out".to_string());
    } else if e.is_connect() {
        parts.push("cannot connect".to_string());
    } else if e.is_body() || e.is_decode() {
        parts.push("error reading the response body".to_string());
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let t = s.to_string();
        if !parts.contains(&t) {
            parts.push(t);
        }
        source = s.source();
    }
    if parts.is_empty() {
        parts.push("request failed".into());
    }
    parts.join(": ")
}
