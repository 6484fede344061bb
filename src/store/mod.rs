//! The store: everything pollhook remembers, behind one seam.
//!
//! [`Backend`] is the set of operations the daemon needs, written once as a
//! trait with the records beside it ([`records`]); [`Store`] is the handle
//! the rest of the crate holds, dispatching to the configured backend.
//! Backends: [`sled`] (embedded, the default) and [`postgres`] (a shared
//! PostgreSQL database). What is written once for
//! every backend: backups ([`backup`]) and retention ([`retention`]), on
//! top of the seam; and the conformance suite (`conformance.rs`), which
//! every backend must pass.
//!
//! Beside it, the coordination seam ([`Coordination`], `coordination.rs`):
//! what the nodes sharing a store agree on (leases, bookings, wake-ups),
//! with a PostgreSQL implementation and an in-process one ([`SingleNode`])
//! for sled; [`Store::coordination`] gives the one that fits.
//!
//! The one invariant this module exists for: [`Backend::commit_poll`]
//! writes an instance's new state (cursor, seen ids, snapshot) and the
//! outbox entries of the events that state change produced in ONE
//! transaction, durable before it returns. A crash either loses both (the
//! next poll detects the change again) or keeps both (the outbox delivers
//! it). A cursor never moves past an undelivered change.
//!
//! Every operation is async: a backend that blocks (sled's flushes, scans
//! and transactions) runs that part on tokio's blocking pool, never on the
//! async workers that poll and deliver.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::Path;

pub mod backup;
mod coordination;
mod postgres;
mod records;
pub mod retention;
mod single_node;
pub mod sled;

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod coordination_conformance;

pub use coordination::{
    Booked, Claimed, Coordination, Coordinator, HostPace, LeaseRow, NodeRow, Notice,
};
pub use postgres::valid_schema;
pub use records::*;
pub use single_node::SingleNode;

/// Store errors name the operation and say the backend's own error: most
/// are logged or shown on `/status` with `{}` alone, where a `#[source]`
/// would be lost, and "no space left on device" is what an operator needs.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}")]
    Open {
        path: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Another process (a running daemon) has the embedded store open.
    #[error("cannot open the store at {path}: another process (a running daemon) has it open")]
    Locked { path: String },
    #[error("store {op} failed: {source}")]
    Backend {
        op: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("store record {key} is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("backup line {line}: {detail}")]
    Backup { line: usize, detail: String },
    #[error("cannot write the backup")]
    Write(#[source] std::io::Error),
    #[error("commit of {instance} refused: this node no longer holds its lease (epoch {epoch}); the node that took it over polls it now")]
    Fenced { instance: String, epoch: i64 },
    #[error("instance `{name}` refused: {why}")]
    BadName { name: String, why: String },
    #[error("the store already holds {records} records: import goes into an empty store (a new, empty state_dir: move the current one away first)")]
    NotEmpty { records: usize },
    /// The store refused what it was given (a value nested too deep, a
    /// key the database cannot hold): the failure of the instance or
    /// record that brought it, not of the store, which takes other writes.
    #[error("store {op} refused {what}: {detail}")]
    Refused {
        op: &'static str,
        what: String,
        detail: String,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The longest instance name (`source/instance`) a store takes, in bytes.
/// A name is a key of several records and an index entry on PostgreSQL
/// (at most ~2,700 bytes), and it travels in notices (8,000 bytes); names
/// come from upstream with `for_each: discover`, so they are bounded here,
/// alike for every backend, and discovery refuses longer ones first.
pub const MAX_NAME_BYTES: usize = 1024;

/// Refuses an instance name longer than [`MAX_NAME_BYTES`] or holding a
/// NUL (no store keeps it apart from the next part of a key), alike for
/// every backend, naming its start (the error is logged and shown: never
/// the whole of a long one).
fn check_name(instance: &str) -> Result<()> {
    let why = if instance.len() > MAX_NAME_BYTES {
        format!(
            "{} bytes, a name longer than {MAX_NAME_BYTES} bytes cannot be a store key",
            instance.len()
        )
    } else if instance.contains('\0') {
        "a name with a NUL byte cannot be a store key".to_string()
    } else {
        return Ok(());
    };
    let mut cut = instance.len().min(64);
    while !instance.is_char_boundary(cut) {
        cut -= 1;
    }
    let more = if cut < instance.len() { "…" } else { "" };
    Err(StoreError::BadName {
        name: format!("{}{more}", instance[..cut].escape_debug()),
        why,
    })
}

/// The operations pollhook needs from a store. Each backend implements all
/// of them with the same meaning; `conformance.rs` checks that it does.
///
/// Writes not said to be durable may be lost in a crash, and the doc of
/// each says why that is harmless.
pub trait Backend: Clone + Send + Sync + 'static {
    // --- instance state -------------------------------------------------

    /// The stored state of an instance (default when it never polled),
    /// with its next run time.
    fn load_state(&self, instance: &str) -> impl Future<Output = Result<InstanceState>> + Send;

    /// Every stored instance state (backups, tests).
    fn all_states(&self) -> impl Future<Output = Result<Vec<(String, InstanceState)>>> + Send;

    /// Keys of every instance with a state or a next run time.
    fn state_keys(&self) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// THE transaction: the instance's new state (its record and the
    /// changes to its per-id records, see [`StateWrite`]) and its events'
    /// outbox entries (endpoint, entry), atomically and durably. Returns
    /// each entry's key, in the order given.
    ///
    /// With a `fence` (a cluster's lease), the transaction first checks,
    /// under the lease row's lock, that the lease is still the fence's
    /// owner's with the same epoch, and otherwise writes nothing and
    /// fails with [`StoreError::Fenced`]. A backend with one writer (sled)
    /// has no leases and ignores it.
    fn commit_poll(
        &self,
        instance: &str,
        write: &StateWrite,
        deliveries: &[(String, OutboxEntry)],
        fence: Option<&Fence>,
    ) -> impl Future<Output = Result<Vec<EntryKey>>> + Send;

    /// A credential pollhook keeps for itself (an OAuth2 provider's
    /// rotated refresh token). Never exported in backups.
    fn load_credential(&self, key: &str) -> impl Future<Output = Result<Option<String>>> + Send;

    /// Keeps a credential, durably before it returns (a rotated refresh
    /// token lost in a crash breaks the grant).
    fn save_credential(&self, key: &str, value: &str) -> impl Future<Output = Result<()>> + Send;

    /// Queues entries that no instance state goes with (pollhook's own
    /// operational events, lane `pollhook/ops`), each at the end of its
    /// endpoint's lane of the entry's `instance`, in one durable
    /// transaction.
    fn enqueue(
        &self,
        deliveries: &[(String, OutboxEntry)],
    ) -> impl Future<Output = Result<()>> + Send;

    /// Takes a request's slot of a stored rate quota if it allows one now
    /// (see [`crate::gcra::take`]): one request every `interval_ms`,
    /// `burst` at once after an idle spell. `None`: taken, go; `Some(wait)`:
    /// not before `wait`, nothing taken. Durable: what was taken survives a
    /// restart, which is the point of storing it (a `4/1d` quota must not
    /// be spent again by restarting).
    fn take_quota(
        &self,
        key: &str,
        interval_ms: f64,
        burst: u32,
    ) -> impl Future<Output = Result<Option<std::time::Duration>>> + Send;

    /// When an instance's next poll is due, kept apart from its state so
    /// that it costs one small write per poll whatever the state's size.
    /// Not durable: losing it means one poll at start (or none, `skip`).
    /// A backend may write it later, with others (PostgreSQL does, in
    /// batches): this handle reads it back at once; another process sees
    /// it once the instance's lease is given back or the store flushed.
    fn set_next_run(
        &self,
        instance: &str,
        next_run_ms: i64,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Forgets an instance's state and next run. Its undelivered events
    /// stay in the outbox.
    fn remove_state(&self, instance: &str) -> impl Future<Output = Result<()>> + Send;

    // --- discovery and removed instances ---------------------------------

    /// What a discovering source found last (empty when it never did).
    fn load_discovered(&self, source: &str) -> impl Future<Output = Result<Discovered>> + Send;

    /// Records what a discovering source found. Not durable: losing it
    /// means the next discovery finds the same again.
    fn save_discovered(
        &self,
        source: &str,
        d: &Discovered,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Marks an instance no source polls any more; its state may be
    /// deleted after `delete_at_ms`. A mark already there keeps its time.
    fn mark_removed(
        &self,
        instance: &str,
        delete_at_ms: i64,
    ) -> impl Future<Output = Result<()>> + Send;

    /// An instance polled again: its state is kept.
    fn unmark_removed(&self, instance: &str) -> impl Future<Output = Result<()>> + Send;

    /// Instances marked removed, with when their state may be deleted.
    fn removed(&self) -> impl Future<Output = Result<Vec<(String, i64)>>> + Send;

    // --- endpoints --------------------------------------------------------

    /// Records that an endpoint is disabled and why. Durable: a restart
    /// must not send to an endpoint that said `410 Gone`.
    fn disable_endpoint(
        &self,
        endpoint: &str,
        why: &str,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Why an endpoint is disabled, if it is.
    fn endpoint_disabled(
        &self,
        endpoint: &str,
    ) -> impl Future<Output = Result<Option<String>>> + Send;

    /// Enables an endpoint again (durable); whether it was disabled.
    fn enable_endpoint(&self, endpoint: &str) -> impl Future<Output = Result<bool>> + Send;

    // --- the outbox -------------------------------------------------------

    /// The instances with pending entries for an endpoint.
    fn outbox_instances(
        &self,
        endpoint: &str,
    ) -> impl Future<Output = Result<BTreeSet<String>>> + Send;

    /// The first pending entry of one instance for an endpoint.
    fn outbox_head(
        &self,
        endpoint: &str,
        instance: &str,
    ) -> impl Future<Output = Result<Option<(EntryKey, OutboxEntry)>>> + Send;

    /// Up to `limit` pending entries of an endpoint after `after` (from the
    /// start when `None`), in detection order per instance.
    fn outbox_page(
        &self,
        endpoint: &str,
        after: Option<&EntryKey>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(EntryKey, OutboxEntry)>>> + Send;

    /// How many entries an endpoint has pending, and when the oldest was
    /// detected. A scan: workers call it at start, not per scrape.
    fn outbox_stats(
        &self,
        endpoint: &str,
    ) -> impl Future<Output = Result<(u64, Option<i64>)>> + Send;

    /// A delivered entry leaves the outbox. Not durable: a lost removal
    /// means a redelivery with the same `webhook-id`, which receivers drop.
    fn delivered(&self, key: &EntryKey) -> impl Future<Output = Result<()>> + Send;

    /// [`Backend::delivered`] for the head of its lane, returning the
    /// lane's next head (as [`Backend::outbox_head`] would): what an
    /// ordered worker sends next, in one round trip where the backend can.
    fn delivered_next(
        &self,
        key: &EntryKey,
    ) -> impl Future<Output = Result<Option<(EntryKey, OutboxEntry)>>> + Send;

    /// A failed attempt: the entry stays with its new attempt count and time.
    fn reschedule(
        &self,
        key: &EntryKey,
        entry: &OutboxEntry,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The last attempt failed: the entry moves to the dead letters in one
    /// durable transaction (never in both, never in neither).
    fn dead_letter(
        &self,
        key: &EntryKey,
        letter: &DeadLetter,
    ) -> impl Future<Output = Result<()>> + Send;

    // --- dead letters -----------------------------------------------------

    /// Dead letters, of one endpoint or all, by endpoint then age.
    fn dead_letters(
        &self,
        endpoint: Option<&str>,
    ) -> impl Future<Output = Result<Vec<(EntryKey, DeadLetter)>>> + Send;

    /// Puts dead letters back at the end of their endpoint's outbox with
    /// attempts reset and the same `webhook-id` and body, each in one
    /// durable transaction. Returns how many.
    fn replay_dead(
        &self,
        letters: &[(EntryKey, DeadLetter)],
    ) -> impl Future<Output = Result<usize>> + Send;

    /// Deletes dead letters for good (durable). Returns how many.
    fn drop_dead(&self, keys: &[EntryKey]) -> impl Future<Output = Result<usize>> + Send;

    // --- delivery history ---------------------------------------------------

    /// Records a delivery attempt (not durable: history, not state) and
    /// keeps at most [`ATTEMPTS_KEPT`], the oldest going first.
    fn record_attempt(&self, rec: &AttemptRecord) -> impl Future<Output = Result<()>> + Send;

    /// Up to `q.limit` attempts of one event and/or endpoint (all when
    /// `None`), newest first.
    fn attempts(&self, q: &AttemptQuery)
        -> impl Future<Output = Result<Vec<AttemptRecord>>> + Send;

    /// Forgets attempts made before `before_ms`. Returns how many.
    fn prune_attempts(&self, before_ms: i64) -> impl Future<Output = Result<usize>> + Send;

    // --- backups and care ---------------------------------------------------

    /// One page of one kind of record, for backups (see [`backup`]).
    fn export_page(
        &self,
        kind: RecordKind,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> impl Future<Output = Result<Page>> + Send;

    /// How many records the store holds (an import needs zero).
    fn count_records(&self) -> impl Future<Output = Result<usize>> + Send;

    /// Writes records read from a backup, in order (outbox entries keep
    /// their relative order), then makes them durable.
    fn import_records(&self, records: Vec<Record>) -> impl Future<Output = Result<usize>> + Send;

    /// Whether the store answers a read (for `/readyz`).
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;

    /// Makes every write so far durable (shutdown, CLI operations).
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;
}

/// Where the store is, as `store:` in bridge.yaml says: what the daemon
/// and the operator commands on a stopped daemon open.
#[derive(Clone, PartialEq)]
pub enum Location {
    /// The embedded store in this directory (`state_dir`).
    Sled(std::path::PathBuf),
    /// A PostgreSQL database and the schema of pollhook's tables.
    Postgres { url: String, schema: String },
}

impl Location {
    /// Opens the store there.
    pub async fn open(&self) -> Result<Store> {
        self.open_for(None).await
    }

    /// Opens the store for a fleet of `instances` (`None`: not known):
    /// the embedded store sizes its cache to it (see [`sled::cache_for`]).
    pub async fn open_for(&self, instances: Option<usize>) -> Result<Store> {
        match self {
            Location::Sled(dir) => Ok(Store::Sled(sled::SledStore::open_with_cache(
                dir,
                sled::cache_for(instances),
            )?)),
            Location::Postgres { url, schema } => Store::open_postgres(url, schema).await,
        }
    }
}

/// For logs and messages: the URL's password is never shown.
impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sled(dir) => write!(f, "{}", dir.display()),
            Location::Postgres { url, schema } => {
                write!(f, "{} (schema {schema})", postgres::redact(url))
            }
        }
    }
}

/// As [`Display`](std::fmt::Display): a `{:?}` must not leak the password
/// either.
impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Location({self})")
    }
}

/// The store the daemon holds: one of the backends. Cheap to clone.
#[derive(Clone)]
pub enum Store {
    Sled(sled::SledStore),
    Postgres(postgres::PgStore),
}

/// Calls the same operation on whichever backend the store is.
macro_rules! dispatch {
    ($self:ident, $b:ident => $call:expr) => {
        match $self {
            Store::Sled($b) => $call,
            Store::Postgres($b) => $call,
        }
    };
}

impl Store {
    /// Opens (or creates) the embedded store in `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        Ok(Store::Sled(sled::SledStore::open(dir)?))
    }

    /// Connects to PostgreSQL at `url` and uses the PostgreSQL schema
    /// `schema` (created, and migrated to this version, if needed).
    pub async fn open_postgres(url: &str, schema: &str) -> Result<Store> {
        Ok(Store::Postgres(postgres::PgStore::open(url, schema).await?))
    }

    pub async fn load_state(&self, instance: &str) -> Result<InstanceState> {
        dispatch!(self, b => b.load_state(instance).await)
    }
    pub async fn all_states(&self) -> Result<Vec<(String, InstanceState)>> {
        dispatch!(self, b => b.all_states().await)
    }
    pub async fn state_keys(&self) -> Result<Vec<String>> {
        dispatch!(self, b => b.state_keys().await)
    }
    /// Commits `state` whole, replacing what the store had of the
    /// instance (a seeded baseline, tests). Polls commit what changed
    /// with [`Store::commit_fenced`].
    pub async fn commit_poll(
        &self,
        instance: &str,
        state: &InstanceState,
        deliveries: &[(String, OutboxEntry)],
    ) -> Result<Vec<EntryKey>> {
        check_name(instance)?;
        let w = StateWrite::whole(state, crate::now_ms());
        w.check_depth(instance)?;
        dispatch!(self, b => b.commit_poll(instance, &w, deliveries, None).await)
    }
    /// A poll's commit: `next` written as what changed since `prev` (the
    /// state this poller loaded or last committed: the store's, since it
    /// is the instance's only writer), under a cluster lease if any (see
    /// [`Fence`]).
    pub async fn commit_fenced(
        &self,
        instance: &str,
        prev: &InstanceState,
        next: &InstanceState,
        deliveries: &[(String, OutboxEntry)],
        fence: Option<&Fence>,
    ) -> Result<Vec<EntryKey>> {
        check_name(instance)?;
        let w = StateWrite::between(prev, next, crate::now_ms());
        w.check_depth(instance)?;
        dispatch!(self, b => b.commit_poll(instance, &w, deliveries, fence).await)
    }
    pub async fn take_quota(
        &self,
        key: &str,
        interval_ms: f64,
        burst: u32,
    ) -> Result<Option<std::time::Duration>> {
        dispatch!(self, b => b.take_quota(key, interval_ms, burst).await)
    }
    pub async fn load_credential(&self, key: &str) -> Result<Option<String>> {
        dispatch!(self, b => b.load_credential(key).await)
    }
    pub async fn save_credential(&self, key: &str, value: &str) -> Result<()> {
        dispatch!(self, b => b.save_credential(key, value).await)
    }
    pub async fn enqueue(&self, deliveries: &[(String, OutboxEntry)]) -> Result<()> {
        dispatch!(self, b => b.enqueue(deliveries).await)
    }
    pub async fn set_next_run(&self, instance: &str, next_run_ms: i64) -> Result<()> {
        check_name(instance)?;
        dispatch!(self, b => b.set_next_run(instance, next_run_ms).await)
    }
    pub async fn remove_state(&self, instance: &str) -> Result<()> {
        dispatch!(self, b => b.remove_state(instance).await)
    }
    pub async fn load_discovered(&self, source: &str) -> Result<Discovered> {
        dispatch!(self, b => b.load_discovered(source).await)
    }
    pub async fn save_discovered(&self, source: &str, d: &Discovered) -> Result<()> {
        dispatch!(self, b => b.save_discovered(source, d).await)
    }
    pub async fn mark_removed(&self, instance: &str, delete_at_ms: i64) -> Result<()> {
        check_name(instance)?;
        dispatch!(self, b => b.mark_removed(instance, delete_at_ms).await)
    }
    pub async fn unmark_removed(&self, instance: &str) -> Result<()> {
        dispatch!(self, b => b.unmark_removed(instance).await)
    }
    pub async fn removed(&self) -> Result<Vec<(String, i64)>> {
        dispatch!(self, b => b.removed().await)
    }
    pub async fn disable_endpoint(&self, endpoint: &str, why: &str) -> Result<()> {
        dispatch!(self, b => b.disable_endpoint(endpoint, why).await)
    }
    pub async fn endpoint_disabled(&self, endpoint: &str) -> Result<Option<String>> {
        dispatch!(self, b => b.endpoint_disabled(endpoint).await)
    }
    pub async fn enable_endpoint(&self, endpoint: &str) -> Result<bool> {
        dispatch!(self, b => b.enable_endpoint(endpoint).await)
    }
    pub async fn outbox_instances(&self, endpoint: &str) -> Result<BTreeSet<String>> {
        dispatch!(self, b => b.outbox_instances(endpoint).await)
    }
    pub async fn outbox_head(
        &self,
        endpoint: &str,
        instance: &str,
    ) -> Result<Option<(EntryKey, OutboxEntry)>> {
        dispatch!(self, b => b.outbox_head(endpoint, instance).await)
    }
    pub async fn outbox_page(
        &self,
        endpoint: &str,
        after: Option<&EntryKey>,
        limit: usize,
    ) -> Result<Vec<(EntryKey, OutboxEntry)>> {
        dispatch!(self, b => b.outbox_page(endpoint, after, limit).await)
    }
    pub async fn outbox_stats(&self, endpoint: &str) -> Result<(u64, Option<i64>)> {
        dispatch!(self, b => b.outbox_stats(endpoint).await)
    }
    pub async fn delivered(&self, key: &EntryKey) -> Result<()> {
        dispatch!(self, b => b.delivered(key).await)
    }
    pub async fn delivered_next(&self, key: &EntryKey) -> Result<Option<(EntryKey, OutboxEntry)>> {
        dispatch!(self, b => b.delivered_next(key).await)
    }
    pub async fn reschedule(&self, key: &EntryKey, entry: &OutboxEntry) -> Result<()> {
        dispatch!(self, b => b.reschedule(key, entry).await)
    }
    pub async fn dead_letter(&self, key: &EntryKey, letter: &DeadLetter) -> Result<()> {
        dispatch!(self, b => b.dead_letter(key, letter).await)
    }
    pub async fn dead_letters(
        &self,
        endpoint: Option<&str>,
    ) -> Result<Vec<(EntryKey, DeadLetter)>> {
        dispatch!(self, b => b.dead_letters(endpoint).await)
    }
    pub async fn replay_dead(&self, letters: &[(EntryKey, DeadLetter)]) -> Result<usize> {
        dispatch!(self, b => b.replay_dead(letters).await)
    }
    pub async fn drop_dead(&self, keys: &[EntryKey]) -> Result<usize> {
        dispatch!(self, b => b.drop_dead(keys).await)
    }
    pub async fn record_attempt(&self, rec: &AttemptRecord) -> Result<()> {
        dispatch!(self, b => b.record_attempt(rec).await)
    }
    pub async fn attempts(&self, q: &AttemptQuery) -> Result<Vec<AttemptRecord>> {
        dispatch!(self, b => b.attempts(q).await)
    }
    pub async fn prune_attempts(&self, before_ms: i64) -> Result<usize> {
        dispatch!(self, b => b.prune_attempts(before_ms).await)
    }
    pub async fn export_page(
        &self,
        kind: RecordKind,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Page> {
        dispatch!(self, b => b.export_page(kind, after, limit).await)
    }
    pub async fn count_records(&self) -> Result<usize> {
        dispatch!(self, b => b.count_records().await)
    }
    pub async fn import_records(&self, records: Vec<Record>) -> Result<usize> {
        dispatch!(self, b => b.import_records(records).await)
    }
    pub async fn ping(&self) -> Result<()> {
        dispatch!(self, b => b.ping().await)
    }
    pub async fn flush(&self) -> Result<()> {
        dispatch!(self, b => b.flush().await)
    }
}
