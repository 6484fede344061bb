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
//!          → store::Store::commit_poll (state + outbox, ONE transaction)
//!          → deliver::worker (sign, POST, retry, dead-letter)
//! ```
//!
//! Module map:
//! - [`config`]: raw YAML types, `${VAR}` interpolation, validation into
//!   resolved runtime types with `file:line` errors.
//! - [`template`]: the Jinja-style template engine used by every connector.
//! - [`schedule`]: `every <duration>` and cron schedules (pure).
//! - [`connector`]: building requests, fetching pages, and detection.
//! - [`poll`]: one instance's loop: schedule, fetch, detect, commit.
//! - [`event`]: the wire format, defined once.
//! - [`store`]: the storage seam and its backends; the only module that
//!   knows sled.
//! - [`deliver`]: signing and retry policy (pure) and the delivery workers.
//! - [`discover`]: `for_each: discover`, instances found at run time.
//! - [`daemon`]: `pollhook run`: lifecycle, the supervisor, shutdown.
//! - [`ops`]: operator operations (dead letters, history, enable, backups),
//!   typed, shared by the admin server and the CLI.
//! - [`dryrun`]: `pollhook test`, as a typed report.
//! - [`admin`]: `/healthz`, `/readyz`, `/status`, `/metrics`, operations.
//! - [`logfmt`]: text log fields with control characters escaped.

pub mod access;
pub mod admin;
pub mod cluster;
pub mod config;
pub mod connector;
pub mod daemon;
pub mod dashboard;
pub mod deliver;
pub mod discover;
pub mod dryrun;
pub mod event;
pub mod gcra;
pub mod hints;
pub mod logfmt;
pub mod notify;
pub mod ops;
pub mod opsevents;
pub mod poll;
pub mod quota;
pub mod reload;
pub mod schedule;
pub mod status;
pub mod store;
pub mod template;

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
