//! What the host gates count and tell: counters for `/metrics`, a gate's
//! report for `/status`, and the long pauses for whoever listens
//! (operational events).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde::Serialize;

/// What a host's gate counted.
#[derive(Default)]
pub struct HostStats {
    pub requests: AtomicU64,
    /// `429` and `503` answers.
    pub throttled: AtomicU64,
    /// Times the host was paused by its answers.
    pub pauses: AtomicU64,
    /// `429` answers alone.
    pub too_many: AtomicU64,
    /// Milliseconds of pause imposed in all (overlapping pauses counted once).
    pub paused_ms: AtomicU64,
}

/// A host's gate as `/status` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct HostReport {
    pub requests: u64,
    pub throttled: u64,
    /// `429 Too Many Requests` answers.
    pub too_many_requests: u64,
    pub pauses: u64,
    /// Time paused in all, in milliseconds.
    pub paused_ms_total: u64,
    /// Milliseconds until the pause ends, when paused.
    pub paused_for_ms: Option<u64>,
    /// Spacing imposed by the host's `RateLimit-*` headers or learned from
    /// its refusals, if any.
    pub spacing_ms: Option<u64>,
}

/// Told of each pause a host imposed by its answers (`Retry-After`,
/// `RateLimit-Remaining: 0`), so that long ones can be announced; the
/// daemon passes its operational events (`opsevents::Ops`). Quota owns
/// the seam, so it needs to know nothing of who listens.
pub trait PauseListener: Send + Sync {
    fn host_paused(&self, host: &str, status: u16, pause: Duration);
}
