//! The PostgreSQL backend (tokio-postgres 0.7 through a deadpool-postgres
//! 0.14 pool). The only file that knows PostgreSQL.
//!
//! Everything lives in one PostgreSQL schema (default `pollhook`), so
//! several stores can share a database and tests get a schema each. Every
//! connection sets `search_path` to that schema alone, so the SQL below is
//! unqualified and can never touch another schema's tables.
//!
//! Tables (records are `json`, the same serde JSON sled stores, so backups
//! are identical in shape and need no per-backend codec):
//! - `state`:    instance → [`InstanceState`] (without `next_run_ms`). One
//!   row per instance: the row that leases will later extend (`owner`,
//!   `epoch`, `lease_until`) without touching the records;
//! - `next_run`: instance → next due time (ms), apart from the state so that
//!   the per-poll write is one small row, not the whole seen set;
//! - `outbox`:   `seq` (from the shared sequence `entry_seq`, i.e. a
//!   `bigserial`) with `endpoint`, `instance`, `created_ms` beside the
//!   [`OutboxEntry`]; an index on (endpoint, instance, seq) makes an
//!   instance's head one index probe and keeps lanes in detection order;
//! - `dead`:     the same key → [`DeadLetter`] (a dead letter keeps the `seq`
//!   it had in the outbox; imported ones draw a new one from `entry_seq`,
//!   so a key never names two entries);
//! - `attempts`: an identity id (newest = largest) → [`AttemptRecord`];
//! - `seen_ids`, `known_items`: an instance's seen ids and known items,
//!   one row each, keyed by (instance, SHA-256 of the id), the id kept as
//!   bytes: an id from upstream may hold a NUL (which `text` cannot) or be
//!   longer than a btree entry (~2,700 bytes), and must stop nothing;
//! - `discovered`, `removed`, `disabled`: by source, instance, endpoint.
//!
//! Key columns use `COLLATE "C"`: byte order, the order sled's keys have,
//! so pages and exports sort the same on both backends and no locale can
//! change the order of an index under a running daemon.
//!
//! Records are `json`, not `jsonb`: `json` keeps the text as written (key
//! order, number spelling), so a snapshot read back is byte-for-byte the
//! one stored, as with sled; nothing queries inside the records, so
//! `jsonb`'s operators would buy nothing.
//!
//! Durability: a commit is durable when it returns (`synchronous_commit`
//! as the server has it, `on` by default), so [`Backend::flush`] has
//! nothing to do. The writes the seam documents as not durable (next run,
//! delivered, reschedule, discovered, attempts) commit with
//! `synchronous_commit = off`: they are still atomic and ordered in the
//! WAL, only the last few hundred milliseconds may be lost in a crash,
//! which their docs say is harmless; one fsync per delivered event would
//! cap throughput at the disk's fsync rate, as a sled flush would.
//!
//! No TLS for now (`NoTls`): the database is expected on the same host or
//! a private network. TLS is a connector away (`tokio-postgres-rustls`)
//! when a deployment needs it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use serde::{Deserialize, Serialize};
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;

use super::coordination::Notice;
use super::records::*;
use super::{Backend, Result, StoreError};

pub mod coordination;

/// Moves the rows of the tables of migration 4 (`seen`, `known`, keyed by
/// the id as text) into those of migration 6 (`seen_ids`, `known_items`,
/// keyed by its hash) and drops them. A macro, so that tests can replay it
/// after migration 5 (see `PgStore::write_legacy_state`).
macro_rules! move_ids {
    () => {
        include_str!("migrations/0006_move_ids.sql")
    };
}

mod migrations;
use migrations::MIGRATIONS;

/// The first key of the two-key advisory lock that serialises migrations
/// (the second is the schema's hash): "pollhook" in ASCII, so it does not
/// collide with another application's locks in the same database.
const MIGRATION_LOCK: i32 = 0x706f_6c6c;

/// Connections in the pool. Each poll commit and delivery holds one for a
/// few round trips; 16 keeps the server's backends few per daemon.
const POOL_SIZE: usize = 16;

/// Attempts written together (see `PgStore::pending_attempts`).
const ATTEMPT_BATCH: usize = 64;
/// The longest an attempt waits for its batch while others come.
const ATTEMPT_DELAY: Duration = Duration::from_millis(200);

/// Next run times waiting to be written, by instance, and when the
/// oldest came (see `PgStore::pending_next_runs`).
type NextRuns = (BTreeMap<String, i64>, Option<std::time::Instant>);

/// Next run times written together (see `PgStore::pending_next_runs`).
const NEXT_RUN_BATCH: usize = 512;
/// The longest a next run time waits for its batch while others come.
const NEXT_RUN_DELAY: Duration = Duration::from_secs(1);

/// Connections for the relaxed writes (see [`PgStore::exec_relaxed`]).
const RELAXED_POOL_SIZE: usize = 8;

/// A driver or pool error whose text is its whole chain of causes.
///
/// tokio-postgres says only "db error" or "error connecting to server" in
/// its `Display` and keeps the server's message ("relation … does not
/// exist", "could not extend file: No space left on device") and the I/O
/// cause in `source()`; store errors are mostly shown with `{}` alone, so
/// the chain is spelled out here once. The original stays the `source`.
#[derive(Debug)]
struct PgError {
    text: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

fn chain(
    e: impl std::error::Error + Send + Sync + 'static,
) -> Box<dyn std::error::Error + Send + Sync> {
    let mut text = one_line(&e.to_string());
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = one_line(&c.to_string());
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    Box::new(PgError {
        text,
        source: Box::new(e),
    })
}

/// The server's message on one line: a `DETAIL` or `HINT` comes on lines
/// of their own, which would split a log line or a `last_error`.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether the server refused the data it was given rather than failed:
/// a data exception (class 22: an invalid byte, a value too long), an
/// integrity constraint (23), a program limit (54: an index row too
/// large). The other writes go on; see [`StoreError::Refused`].
fn refused_data(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| matches!(&c.code()[..2], "22" | "23" | "54"))
}

/// How long [`Backend::ping`] waits for the server.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

fn pg_err(op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |e| {
        if refused_data(&e) {
            StoreError::Refused {
                op,
                what: "what it was given".into(),
                detail: chain(e).to_string(),
            }
        } else {
            StoreError::Backend {
                op,
                source: chain(e),
            }
        }
    }
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        detail: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("store records always serialize")
}

/// The URL without its password, for errors and logs.
pub(crate) fn redact(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let Some(at) = url[start..].find('@').map(|i| start + i) else {
        return url.to_string();
    };
    match url[start..at].find(':') {
        Some(colon) => format!("{}:***{}", &url[..start + colon], &url[at..]),
        None => url.to_string(),
    }
}

/// A schema name is put in SQL text (DDL and `search_path` cannot take
/// parameters), so only plain lower-case identifiers are accepted.
pub fn valid_schema(schema: &str) -> bool {
    let mut chars = schema.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && schema.len() <= 63
}

/// `usize` limits (`usize::MAX` for "all") as SQL `LIMIT`s.
fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The PostgreSQL store. Cheap to clone (the pool is reference-counted).
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// Connections whose session commits with `synchronous_commit = off`,
    /// for the writes the seam says may be lost in a crash: each is one
    /// autocommitted statement, one round trip (a `SET LOCAL` in a
    /// transaction would be four: the delivery path's bottleneck).
    relaxed: Pool,
    /// Attempts recorded by this process, to prune every 100th. Not the
    /// row id: identity values have gaps (rolled back inserts, cached
    /// values lost at a server restart), so "every id divisible by 100"
    /// could skip pruning for a long time.
    attempts_recorded: Arc<AtomicU64>,
    /// Attempts not written yet, and when the oldest came: history is not
    /// durable (the seam says so), so attempts are written in batches, one
    /// multi-row insert per [`ATTEMPT_BATCH`] or [`ATTEMPT_DELAY`],
    /// instead of one round trip per delivery. Reads of the history
    /// (`attempts`, exports, pruning, `flush`) write the batch first.
    pending_attempts: Arc<parking_lot::Mutex<(Vec<AttemptRecord>, Option<std::time::Instant>)>>,
    /// The connection settings, for the `LISTEN` connection, which lives
    /// outside the pool (see `Coordination::listen`).
    config: Arc<tokio_postgres::Config>,
    /// The `NOTIFY` channel of this schema: new outbox entries and shared
    /// host pauses are announced there (see [`Notice`]).
    channel: Arc<str>,
    /// Per node, the fingerprint of its leases at its last full renewal
    /// (how many, and a sum of hashes): a round whose fingerprint is the
    /// same lists nothing (see `Coordination::renew_changed`).
    renewals: Arc<parking_lot::Mutex<std::collections::HashMap<String, (i64, i64)>>>,
    /// Next run times not written yet, and when the oldest came. Every
    /// poll of a longer `every` records its next run (for a restart or
    /// another node to find its slot): one statement per poll was the
    /// most of the database's work for polls answered 304. They may be
    /// lost in a crash (the seam says so; the instance is then polled at
    /// once rather than at its slot), so they are written together, one
    /// statement per [`NEXT_RUN_BATCH`] or [`NEXT_RUN_DELAY`], and before
    /// anything that reads them: a lease given back, a state loaded, a
    /// flush.
    pending_next_runs: Arc<parking_lot::Mutex<NextRuns>>,
    /// Held while a batch of next runs is written: a reader that must see
    /// its instances' runs (a release, a state read) waits for a batch in
    /// flight, which may hold them. Checking only what is still waiting,
    /// a release could overtake the batch that held its instances' runs,
    /// and the next holder read the run before, already past, and poll
    /// at once: twice within an interval.
    next_run_writes: Arc<tokio::sync::Mutex<()>>,
}

impl PgStore {
    /// Connects, creates the schema if needed and applies the migrations
    /// it lacks under an advisory lock, so two processes opening the same
    /// schema at once never both apply a version.
    pub async fn open(url: &str, schema: &str) -> Result<PgStore> {
        let open_err = |source: Box<dyn std::error::Error + Send + Sync>| StoreError::Open {
            path: format!("{} (schema {schema})", redact(url)),
            source,
        };
        if !valid_schema(schema) {
            return Err(open_err(
                "the schema name must be a lower-case identifier ([a-z_][a-z0-9_]*, at most 63 bytes)"
                    .into(),
            ));
        }
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| open_err(chain(e)))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        // Our schema alone: unqualified names resolve there and nowhere
        // else (not `public`).
        config.options(format!("-c search_path={schema}"));
        if config.get_application_name().is_none() {
            config.application_name("pollhook");
        }
        let build = |config: tokio_postgres::Config, size: usize| {
            let manager = Manager::from_config(
                config,
                NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(Duration::from_secs(30)))
                .create_timeout(Some(Duration::from_secs(15)))
                .build()
                .map_err(|e| open_err(chain(e)))
        };
        let pool = build(config.clone(), POOL_SIZE)?;
        let mut relaxed_config = config.clone();
        relaxed_config.options(format!("-c search_path={schema} -c synchronous_commit=off"));
        let relaxed = build(relaxed_config, RELAXED_POOL_SIZE)?;
        let store = PgStore {
            pool,
            relaxed,
            attempts_recorded: Arc::new(AtomicU64::new(0)),
            pending_attempts: Arc::default(),
            config: Arc::new(config),
            channel: channel_of(schema).into(),
            renewals: Arc::default(),
            pending_next_runs: Arc::default(),
            next_run_writes: Arc::default(),
        };
        store
            .migrate(schema)
            .await
            .map_err(|e| open_err(Box::new(e)))?;
        Ok(store)
    }

    async fn client(&self) -> Result<Object> {
        self.pool.get().await.map_err(|e| StoreError::Backend {
            op: "connect",
            source: chain(e),
        })
    }

    /// Applies the missing migrations in one transaction holding
    /// `pg_advisory_xact_lock`: a second process waits for the first to
    /// commit, then finds every version applied. The lock comes before
    /// `CREATE SCHEMA IF NOT EXISTS`, which itself races (two creators
    /// can both pass the "not exists" and one fails on the catalog's
    /// unique index).
    async fn migrate(&self, schema: &str) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err("migrate"))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[&MIGRATION_LOCK, &schema],
        )
        .await
        .map_err(pg_err("migrate: lock"))?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             SET LOCAL search_path TO \"{schema}\";
             CREATE TABLE IF NOT EXISTS schema_migrations (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );"
        ))
        .await
        .map_err(pg_err("migrate: schema"))?;
        let current: i32 = tx
            .query_one(
                "SELECT coalesce(max(version), 0) FROM schema_migrations",
                &[],
            )
            .await
            .map_err(pg_err("migrate: version"))?
            .get(0);
        let newest = MIGRATIONS.last().map_or(0, |m| m.0);
        if current > newest {
            return Err(StoreError::Backend {
                op: "migrate",
                source: format!(
                    "schema {schema} is at version {current}, newer than this pollhook knows ({newest}): \
                     a newer pollhook migrated it"
                )
                .into(),
            });
        }
        for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            tx.batch_execute(sql)
                .await
                .map_err(pg_err("migrate: apply"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(pg_err("migrate: record"))?;
        }
        tx.commit().await.map_err(pg_err("migrate: commit"))
    }

    /// One statement, committed durably. Returns the rows affected.
    async fn exec(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        let c = self.client().await?;
        let st = c.prepare_cached(sql).await.map_err(pg_err(op))?;
        c.execute(&st, params).await.map_err(pg_err(op))
    }

    /// Tells every node `notice` when `tx` commits (and never if it does not).
    async fn notify(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        op: &'static str,
        notice: &Notice,
    ) -> Result<()> {
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&&*self.channel, &notice.encode()],
        )
        .await
        .map(drop)
        .map_err(pg_err(op))
    }

    /// New outbox entries of `instance` for `endpoints`, in `tx`: the lane
    /// has a lease row (so some node delivers it), and the nodes hear of
    /// the entries at commit.
    async fn announce_lane(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        op: &'static str,
        instance: &str,
        endpoints: impl IntoIterator<Item = &str>,
    ) -> Result<()> {
        tx.execute(
            "INSERT INTO lease (instance) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&instance],
        )
        .await
        .map_err(pg_err(op))?;
        for endpoint in endpoints {
            let notice = Notice::Outbox {
                endpoint: endpoint.to_string(),
                instance: instance.to_string(),
            };
            self.notify(tx, op, &notice).await?;
        }
        Ok(())
    }

    /// One statement and a notice to every node, committed together
    /// (durably): the nodes hear of the change only if it happened.
    async fn exec_notify(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        notice: Notice,
    ) -> Result<u64> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err(op))?;
        let st = tx.prepare_cached(sql).await.map_err(pg_err(op))?;
        let n = tx.execute(&st, params).await.map_err(pg_err(op))?;
        self.notify(&tx, op, &notice).await?;
        tx.commit().await.map_err(pg_err(op))?;
        Ok(n)
    }

    /// One statement committed with `synchronous_commit = off`: for the
    /// writes the seam says may be lost in a crash (see the module doc),
    /// autocommitted on a connection of the relaxed pool.
    async fn exec_relaxed(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        let c = self.relaxed.get().await.map_err(|e| StoreError::Backend {
            op: "connect",
            source: chain(e),
        })?;
        let st = c.prepare_cached(sql).await.map_err(pg_err(op))?;
        c.execute(&st, params).await.map_err(pg_err(op))
    }

    async fn query(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let c = self.client().await?;
        let st = c.prepare_cached(sql).await.map_err(pg_err(op))?;
        c.query(&st, params).await.map_err(pg_err(op))
    }

    /// [`PgStore::query`] on a relaxed connection (see
    /// [`PgStore::exec_relaxed`]): one autocommitted statement that may
    /// be lost in a crash, and that returns rows.
    async fn query_relaxed(
        &self,
        op: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let c = self.relaxed.get().await.map_err(|e| StoreError::Backend {
            op: "connect",
            source: chain(e),
        })?;
        let st = c.prepare_cached(sql).await.map_err(pg_err(op))?;
        c.query(&st, params).await.map_err(pg_err(op))
    }

    /// Writes the next run times waiting for their batch (one statement;
    /// in key order, so two nodes writing at once lock rows in the same
    /// order).
    async fn write_next_runs(&self) -> Result<()> {
        let _writing = self.next_run_writes.lock().await;
        self.write_next_runs_now().await
    }

    /// [`PgStore::write_next_runs`], under its lock.
    async fn write_next_runs_now(&self) -> Result<()> {
        let batch = {
            let mut p = self.pending_next_runs.lock();
            p.1 = None;
            std::mem::take(&mut p.0)
        };
        if batch.is_empty() {
            return Ok(());
        }
        let (keys, ats): (Vec<&str>, Vec<i64>) =
            batch.iter().map(|(k, a)| (k.as_str(), *a)).unzip();
        self.exec_relaxed(
            "record next runs",
            "INSERT INTO next_run (instance, at_ms)
             SELECT * FROM unnest($1::text[], $2::bigint[])
             ON CONFLICT (instance) DO UPDATE SET at_ms = EXCLUDED.at_ms",
            &[&keys, &ats],
        )
        .await
        .map(drop)
    }

    /// Keeps `at_ms` as `instance`'s next run, written with its batch.
    async fn queue_next_run(&self, instance: &str, at_ms: i64) -> Result<()> {
        let due = {
            let mut p = self.pending_next_runs.lock();
            p.0.insert(instance.to_string(), at_ms);
            let first = *p.1.get_or_insert_with(std::time::Instant::now);
            p.0.len() >= NEXT_RUN_BATCH || first.elapsed() >= NEXT_RUN_DELAY
        };
        if due {
            self.write_next_runs().await?;
        }
        Ok(())
    }

    /// Writes the next run times waiting if one of `instances` is among
    /// them (their readers must see them).
    async fn write_next_runs_of(&self, instances: &[&str]) -> Result<()> {
        let _writing = self.next_run_writes.lock().await;
        let waiting = {
            let p = self.pending_next_runs.lock();
            instances.iter().any(|i| p.0.contains_key(*i))
        };
        if waiting {
            self.write_next_runs_now().await?;
        }
        Ok(())
    }

    /// Forgets `instance`'s waiting next run (its state is deleted).
    fn drop_next_run(&self, instance: &str) {
        self.pending_next_runs.lock().0.remove(instance);
    }

    /// Writes the attempts waiting for their batch (one round trip), and
    /// keeps the newest [`ATTEMPTS_KEPT`] every 100 attempts or so.
    async fn write_attempts(&self) -> Result<()> {
        let batch = {
            let mut p = self.pending_attempts.lock();
            p.1 = None;
            std::mem::take(&mut p.0)
        };
        if batch.is_empty() {
            return Ok(());
        }
        let mut events = Vec::with_capacity(batch.len());
        let mut endpoints = Vec::with_capacity(batch.len());
        let mut ats = Vec::with_capacity(batch.len());
        let mut values = Vec::with_capacity(batch.len());
        for rec in &batch {
            events.push(rec.event_id.as_str());
            endpoints.push(rec.endpoint.as_str());
            ats.push(rec.at_ms);
            values.push(encode(rec));
        }
        self.exec_relaxed(
            "record attempts",
            "INSERT INTO attempts (event_id, endpoint, at_ms, value)
             SELECT e, p, a, v::json
             FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) WITH ORDINALITY AS t(e, p, a, v, n)
             ORDER BY n",
            &[&events, &endpoints, &ats, &values],
        )
        .await?;
        let before = self.attempts_recorded.fetch_add(batch.len() as u64, SeqCst);
        if before / 100 != (before + batch.len() as u64) / 100 {
            // Keeps the newest ATTEMPTS_KEPT by rank, not by id arithmetic
            // (ids have gaps): one index walk from the newest end.
            self.exec_relaxed(
                "prune attempts",
                "DELETE FROM attempts WHERE id <= (
                     SELECT id FROM attempts ORDER BY id DESC OFFSET $1 LIMIT 1)",
                &[&(ATTEMPTS_KEPT as i64)],
            )
            .await?;
        }
        Ok(())
    }

    /// The length of an instance's state record as stored (tests: what a
    /// commit rewrites).
    #[cfg(test)]
    pub(crate) async fn state_record_len(&self, instance: &str) -> usize {
        let rows = self
            .query(
                "read state",
                "SELECT length(value::text) FROM state WHERE instance = $1",
                &[&instance],
            )
            .await
            .unwrap();
        rows.first().map_or(0, |r| r.get::<_, i32>(0) as usize)
    }

    /// Writes a state record as a version before the split wrote it, then
    /// applies the migration that splits such records (tests).
    #[cfg(test)]
    pub(crate) async fn write_legacy_state(&self, instance: &str, json: &str) {
        let c = self.client().await.unwrap();
        c.execute(
            "INSERT INTO state (instance, value) VALUES ($1, $2::text::json)",
            &[&instance, &json],
        )
        .await
        .unwrap();
        // The tables of the time (migration 4), split into (5), then
        // moved to today's (6).
        let sql = |v: i32| MIGRATIONS.iter().find(|m| m.0 == v).unwrap().1;
        c.batch_execute(sql(4)).await.unwrap();
        c.batch_execute(sql(5)).await.unwrap();
        c.batch_execute(move_ids!()).await.unwrap();
    }

    /// A state from a row of `state_columns!()` starting at column `at`.
    fn state_of(instance: &str, r: &tokio_postgres::Row, at: usize) -> Result<InstanceState> {
        let core: InstanceState = match r.get::<_, Option<&str>>(at) {
            Some(v) => decode(instance, v)?,
            None => InstanceState::default(),
        };
        let seen: Vec<(String, i64)> = match r.get::<_, Option<&str>>(at + 2) {
            Some(v) => decode::<Vec<(String, i64)>>(instance, v)?
                .into_iter()
                .map(|(id, t)| Ok((id_of(instance, &id)?, t)))
                .collect::<Result<_>>()?,
            None => Vec::new(),
        };
        // Each item's value is its own JSON text, so the aggregate adds no
        // nesting: a value as deep as sled takes is read back here too.
        let known: BTreeMap<String, KnownItem> = match r.get::<_, Option<&str>>(at + 3) {
            Some(v) => decode::<Vec<(String, String)>>(instance, v)?
                .into_iter()
                .map(|(id, item)| {
                    let id = id_of(instance, &id)?;
                    let item = decode(&format!("{instance}/{id}"), &item)?;
                    Ok((id, item))
                })
                .collect::<Result<_>>()?,
            None => BTreeMap::new(),
        };
        let mut s = assemble(core, seen, known.into_iter().collect());
        let next_run: Option<i64> = r.get(at + 1);
        if next_run.is_some() {
            s.next_run_ms = next_run;
        }
        Ok(s)
    }

    /// Writes an instance's state within `tx`: its record and the changes
    /// to its per-id rows (`seen`, `known`), a few statements whatever
    /// the number of ids (arrays, not one statement per id).
    async fn write_state(
        tx: &deadpool_postgres::Transaction<'_>,
        op: &'static str,
        instance: &str,
        w: &StateWrite,
    ) -> Result<()> {
        let st = tx
            .prepare_cached(
                "INSERT INTO state (instance, value) VALUES ($1, $2::text::json)
                 ON CONFLICT (instance) DO UPDATE SET value = EXCLUDED.value",
            )
            .await
            .map_err(pg_err(op))?;
        tx.execute(&st, &[&instance, &encode(&w.core)])
            .await
            .map_err(pg_err(op))?;
        let run = |sql: &'static str, params: Vec<Box<dyn ToSql + Sync + Send>>| async move {
            let st = tx.prepare_cached(sql).await.map_err(pg_err(op))?;
            let refs: Vec<&(dyn ToSql + Sync)> = params
                .iter()
                .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                .collect();
            tx.execute(&st, &refs).await.map_err(pg_err(op)).map(drop)
        };
        let inst = || Box::new(instance.to_string()) as Box<dyn ToSql + Sync + Send>;
        let keys = |ids: &mut dyn Iterator<Item = &String>| {
            Box::new(ids.map(|id| id_key(id)).collect::<Vec<_>>()) as Box<dyn ToSql + Sync + Send>
        };
        if w.replace {
            run("DELETE FROM seen_ids WHERE instance = $1", vec![inst()]).await?;
            run("DELETE FROM known_items WHERE instance = $1", vec![inst()]).await?;
        }
        if !w.seen_del.is_empty() {
            run(
                "DELETE FROM seen_ids WHERE instance = $1 AND key = ANY($2)",
                vec![inst(), keys(&mut w.seen_del.iter())],
            )
            .await?;
        }
        if !w.known_del.is_empty() {
            run(
                "DELETE FROM known_items WHERE instance = $1 AND key = ANY($2)",
                vec![inst(), keys(&mut w.known_del.iter())],
            )
            .await?;
        }
        if !w.seen_put.is_empty() {
            let ids: Vec<Vec<u8>> = w
                .seen_put
                .iter()
                .map(|(id, _)| id.as_bytes().to_vec())
                .collect();
            let ats: Vec<i64> = w.seen_put.iter().map(|(_, at)| *at).collect();
            run(
                "INSERT INTO seen_ids (instance, key, id, at_ms)
                 SELECT $1, u.k, u.id, u.at
                 FROM unnest($2::bytea[], $3::bytea[], $4::bigint[]) AS u(k, id, at)
                 ON CONFLICT (instance, key) DO UPDATE SET at_ms = EXCLUDED.at_ms",
                vec![
                    inst(),
                    keys(&mut w.seen_put.iter().map(|(id, _)| id)),
                    Box::new(ids),
                    Box::new(ats),
                ],
            )
            .await?;
        }
        if !w.known_put.is_empty() {
            let ids: Vec<Vec<u8>> = w
                .known_put
                .iter()
                .map(|(id, _)| id.as_bytes().to_vec())
                .collect();
            let items: Vec<String> = w.known_put.iter().map(|(_, item)| encode(item)).collect();
            run(
                "INSERT INTO known_items (instance, key, id, value)
                 SELECT $1, u.k, u.id, u.v::json
                 FROM unnest($2::bytea[], $3::bytea[], $4::text[]) AS u(k, id, v)
                 ON CONFLICT (instance, key) DO UPDATE SET value = EXCLUDED.value",
                vec![
                    inst(),
                    keys(&mut w.known_put.iter().map(|(id, _)| id)),
                    Box::new(ids),
                    Box::new(items),
                ],
            )
            .await?;
        }
        Ok(())
    }
}

/// A state's columns for [`PgStore::state_of`], for a query over `state s`
/// with `next_run n` joined: the record, the next run, the seen ids as
/// `[[id, at_ms], …]` and the known items as `{id: item}`.
macro_rules! state_columns {
    () => {
        "s.value::text, n.at_ms,
         (SELECT json_agg(json_build_array(encode(e.id, 'hex'), e.at_ms))::text
            FROM seen_ids e WHERE e.instance = s.instance),
         (SELECT json_agg(json_build_array(encode(k.id, 'hex'), k.value::text))::text
            FROM known_items k WHERE k.instance = s.instance)"
    };
}

/// The key of a seen id's or known item's row: the id's SHA-256, 32
/// bytes whatever the id holds (see migration 6).
fn id_key(id: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(id.as_bytes()).to_vec()
}

/// A text kept as bytes (see migration 6).
fn text_of(key: &str, bytes: &[u8]) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| StoreError::Corrupt {
        key: key.to_string(),
        detail: "not UTF-8".into(),
    })
}

/// An id read back as `encode(id, 'hex')`.
fn id_of(instance: &str, hex: &str) -> Result<String> {
    let corrupt = |detail: &str| StoreError::Corrupt {
        key: instance.to_string(),
        detail: format!("a seen id or known item: {detail}"),
    };
    let bytes = hex::decode(hex).map_err(|e| match e {
        hex::FromHexError::OddLength => corrupt("odd hex"),
        _ => corrupt("not hex"),
    })?;
    String::from_utf8(bytes).map_err(|_| corrupt("not UTF-8"))
}

fn entry_key(endpoint: String, instance: String, seq: i64) -> EntryKey {
    EntryKey {
        endpoint,
        instance,
        seq: seq as u64,
    }
}

fn key_name(k: &EntryKey) -> String {
    format!("{}/{}/{}", k.endpoint, k.instance, k.seq)
}

/// An export cursor: the last text key, or the last number big-endian.
fn text_cursor(after: &Option<Vec<u8>>) -> Option<String> {
    after
        .as_ref()
        .map(|a| String::from_utf8_lossy(a).into_owned())
}

fn num_cursor(after: &Option<Vec<u8>>) -> i64 {
    after
        .as_ref()
        .and_then(|a| a.as_slice().try_into().ok())
        .map_or(i64::MIN, i64::from_be_bytes)
}

/// One row of an export query (see `export_page`) as its record.
fn record_of(kind: RecordKind, r: &tokio_postgres::Row) -> Result<Record> {
    let numbered_key = |table: &str| format!("{table}/{}", r.get::<_, i64>(0));
    Ok(match kind {
        RecordKind::Disabled => Record::Disabled {
            endpoint: r.get(0),
            why: text_of(&format!("disabled/{}", r.get::<_, &str>(0)), r.get(1))?,
        },
        RecordKind::State => {
            let instance: String = r.get(0);
            let value = PgStore::state_of(&instance, r, 1)?;
            Record::State { instance, value }
        }
        RecordKind::Discovered => {
            let source: String = r.get(0);
            let value = decode(&source, r.get(1))?;
            Record::Discovered { source, value }
        }
        RecordKind::Removed => Record::Removed {
            instance: r.get(0),
            delete_at_ms: r.get(1),
        },
        RecordKind::Outbox => Record::Outbox {
            endpoint: r.get(1),
            value: decode(&numbered_key("outbox"), r.get(2))?,
        },
        RecordKind::Dead => Record::Dead {
            value: decode(&numbered_key("dead"), r.get(1))?,
        },
        RecordKind::Attempt => Record::Attempt {
            value: decode(&numbered_key("attempts"), r.get(1))?,
        },
    })
}

mod backend;

/// What PostgreSQL tests share: the server's URL, whether it answers, and
/// fresh schemas that are dropped afterwards.
#[cfg(test)]
pub(crate) mod testing {
    use std::time::Duration;

    /// Where tests find PostgreSQL.
    pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

    pub fn url() -> String {
        std::env::var("POLLHOOK_TEST_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| DEFAULT_URL.to_string())
    }

    /// Whether PostgreSQL answers at [`url`]; when it does not, says so
    /// and why, so a skipped test is never mistaken for a passed one.
    /// With `POLLHOOK_TEST_REQUIRE_POSTGRES` set or `CI=true` (CI, where
    /// `.ci/run` started the server), a missing server fails the test: a
    /// server that did not start must not turn into a green run.
    pub async fn available(test: &str) -> bool {
        let url = url();
        let tried = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_postgres::connect(&url, tokio_postgres::NoTls),
        )
        .await;
        let why = match tried {
            Ok(Ok((client, conn))) => {
                drop(client);
                drop(conn);
                return true;
            }
            Ok(Err(e)) => super::chain(e).to_string(),
            Err(_) => "no answer in 5 s".to_string(),
        };
        if std::env::var_os("POLLHOOK_TEST_REQUIRE_POSTGRES").is_some_and(|v| !v.is_empty())
            || std::env::var("CI").is_ok_and(|v| v == "true")
        {
            panic!(
                "{test}: no PostgreSQL at {}: {why} (POLLHOOK_TEST_REQUIRE_POSTGRES or CI=true is set)",
                super::redact(&url)
            );
        }
        eprintln!(
            "SKIPPED {test} (no PostgreSQL at {}: {why}; set POLLHOOK_TEST_DATABASE_URL)",
            super::redact(&url)
        );
        false
    }

    /// A schema name no other test uses.
    pub fn fresh_schema() -> String {
        format!("pollhook_test_{:016x}", rand::random::<u64>())
    }

    /// Drops a test schema. Blocking, on a thread of its own with its own
    /// runtime, so that it can run from `Drop` whatever runtime (or none)
    /// the test has.
    pub fn drop_schema(schema: &str) {
        let (url, schema) = (url(), schema.to_string());
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async {
                let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                else {
                    return;
                };
                let conn = tokio::spawn(conn);
                let _ = client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                    .await;
                drop(client);
                let _ = conn.await;
            })
        });
        let _ = done.join();
    }
}

#[cfg(test)]
mod tests;

/// A [`Notice`] as `NOTIFY` sends it on the schema's channel.
impl Notice {
    /// One line: `o\t<endpoint>\t<instance>`, `p\t<host>`, `e\t<endpoint>`,
    /// `l` or `f` (names never hold a tab: configuration names are
    /// identifiers, hosts are hosts).
    fn encode(&self) -> String {
        match self {
            Notice::Outbox { endpoint, instance } => format!("o\t{endpoint}\t{instance}"),
            Notice::Pace(host) => format!("p\t{host}"),
            Notice::Endpoint(name) => format!("e\t{name}"),
            Notice::Leases => "l".to_string(),
            Notice::Freed => "f".to_string(),
        }
    }

    fn decode(text: &str) -> Option<Notice> {
        match text {
            "l" => return Some(Notice::Leases),
            "f" => return Some(Notice::Freed),
            _ => {}
        }
        let mut parts = text.splitn(3, '\t');
        match (parts.next()?, parts.next()?, parts.next()) {
            ("o", endpoint, Some(instance)) => Some(Notice::Outbox {
                endpoint: endpoint.to_string(),
                instance: instance.to_string(),
            }),
            ("p", host, None) => Some(Notice::Pace(host.to_string())),
            ("e", name, None) => Some(Notice::Endpoint(name.to_string())),
            _ => None,
        }
    }
}

/// The schema's `NOTIFY` channel: `pollhook_<schema>`, within the 63 bytes
/// of a PostgreSQL name (a long schema name is hashed, stably).
fn channel_of(schema: &str) -> String {
    let name = format!("pollhook_{schema}");
    if name.len() <= 63 {
        return name;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(schema.as_bytes());
    format!("pollhook_{}", hex::encode(&digest[..16]))
}
