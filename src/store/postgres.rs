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

use super::records::*;
use super::{Backend, Result, StoreError};

pub mod cluster;

/// The schema's versions, applied in order at open, each in the same
/// transaction as its `schema_migrations` row.
///
/// A hand-written list rather than a migration crate (refinery, sqlx): one
/// backend with a handful of statements does not need a second dependency
/// tree, and the list runs under *our* advisory lock in *our* transaction
/// (refinery takes no lock across processes, so two daemons starting
/// together could both apply version 1). Never edit a released version:
/// add the next one.
/// Moves the rows of the tables of migration 4 (`seen`, `known`, keyed by
/// the id as text) into those of migration 6 (`seen_ids`, `known_items`,
/// keyed by its hash) and drops them. A macro, so that tests can replay it
/// after migration 5 (see `PgStore::write_legacy_state`).
macro_rules! move_ids {
    () => {
        r#"
INSERT INTO seen_ids (instance, key, id, at_ms)
SELECT instance, sha256(convert_to(id, 'UTF8')), convert_to(id, 'UTF8'), at_ms FROM seen
ON CONFLICT (instance, key) DO NOTHING;
INSERT INTO known_items (instance, key, id, value)
SELECT instance, sha256(convert_to(id, 'UTF8')), convert_to(id, 'UTF8'), value FROM known
ON CONFLICT (instance, key) DO NOTHING;
DROP TABLE seen;
DROP TABLE known;
"#
    };
}

const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
CREATE SEQUENCE entry_seq;
CREATE TABLE state (
    instance text COLLATE "C" PRIMARY KEY,
    value json NOT NULL
);
CREATE TABLE next_run (
    instance text COLLATE "C" PRIMARY KEY,
    at_ms bigint NOT NULL
);
CREATE TABLE outbox (
    seq bigint PRIMARY KEY DEFAULT nextval('entry_seq'),
    endpoint text COLLATE "C" NOT NULL,
    instance text COLLATE "C" NOT NULL,
    created_ms bigint NOT NULL,
    value json NOT NULL
);
CREATE INDEX outbox_lane ON outbox (endpoint, instance, seq);
CREATE TABLE dead (
    seq bigint PRIMARY KEY DEFAULT nextval('entry_seq'),
    endpoint text COLLATE "C" NOT NULL,
    instance text COLLATE "C" NOT NULL,
    dead_at_ms bigint NOT NULL,
    value json NOT NULL
);
CREATE INDEX dead_endpoint ON dead (endpoint, instance, seq);
CREATE TABLE attempts (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    event_id text COLLATE "C" NOT NULL,
    endpoint text COLLATE "C" NOT NULL,
    at_ms bigint NOT NULL,
    value json NOT NULL
);
CREATE INDEX attempts_event ON attempts (event_id, id);
CREATE INDEX attempts_endpoint ON attempts (endpoint, id);
CREATE INDEX attempts_at ON attempts (at_ms);
CREATE TABLE discovered (
    source text COLLATE "C" PRIMARY KEY,
    value json NOT NULL
);
CREATE TABLE removed (
    instance text COLLATE "C" PRIMARY KEY,
    delete_at_ms bigint NOT NULL
);
CREATE TABLE disabled (
    endpoint text COLLATE "C" PRIMARY KEY,
    why text NOT NULL
);
"#,
    ),
    (
        2,
        r#"
-- The database's clock, for leases, heartbeats and quotas: one clock for
-- every node, so that skew between machines never matters.
CREATE FUNCTION now_ms() RETURNS bigint LANGUAGE sql VOLATILE
    AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;
-- Nodes of the cluster and their last heartbeat.
CREATE TABLE nodes (
    node text COLLATE "C" PRIMARY KEY,
    started_ms bigint NOT NULL,
    heartbeat_ms bigint NOT NULL,
    info json NOT NULL
);
-- Who polls (and delivers for) an instance, or runs a source's discovery:
-- the owner, the epoch (raised at every claim: the fencing token) and
-- when the lease lapses unless renewed.
CREATE TABLE lease (
    instance text COLLATE "C" PRIMARY KEY,
    owner text COLLATE "C",
    epoch bigint NOT NULL DEFAULT 0,
    until_ms bigint NOT NULL DEFAULT 0
);
CREATE INDEX lease_owner ON lease (owner);
-- Stored rate quotas (see gcra.rs) and a host's pauses and pace, shared
-- by every node.
CREATE TABLE quota (
    key text COLLATE "C" PRIMARY KEY,
    tat_ms double precision NOT NULL DEFAULT 0,
    paused_until_ms bigint NOT NULL DEFAULT 0,
    gap_ms bigint NOT NULL DEFAULT 0,
    gap_until_ms bigint NOT NULL DEFAULT 0
);
"#,
    ),
    (
        3,
        r#"
-- Credentials pollhook keeps for itself (rotated OAuth2 refresh tokens);
-- never exported.
CREATE TABLE credentials (
    key text COLLATE "C" PRIMARY KEY,
    value text NOT NULL
);
"#,
    ),
    (
        4,
        r#"
-- Seen ids (`new`) and known items (`changes`), one row each, apart from
-- the state record: a commit writes the rows that changed, not the whole
-- set (see records::StateWrite).
CREATE TABLE seen (
    instance text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    at_ms bigint NOT NULL,
    PRIMARY KEY (instance, id)
);
CREATE TABLE known (
    instance text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    value json NOT NULL,
    PRIMARY KEY (instance, id)
);
"#,
    ),
    (
        5,
        r#"
-- States written before carry their sets inline: they move out. Times are
-- aligned at the back of `seen` (ids older than `seen_at` count as seen
-- now, as detection counts them).
INSERT INTO seen (instance, id, at_ms)
SELECT s.instance, e.id,
       CASE WHEN e.n > d.missing
            THEN (s.value->'seen_at'->>((e.n - 1 - d.missing)::int))::bigint
            ELSE now_ms() END
FROM state s
CROSS JOIN LATERAL (
    SELECT json_array_length(s.value->'seen')
         - COALESCE(json_array_length(s.value->'seen_at'), 0) AS missing
) d
CROSS JOIN LATERAL json_array_elements_text(s.value->'seen') WITH ORDINALITY AS e(id, n)
WHERE json_typeof(s.value->'seen') = 'array'
ON CONFLICT (instance, id) DO NOTHING;
INSERT INTO known (instance, id, value)
SELECT s.instance, k.key, k.value
FROM state s CROSS JOIN LATERAL json_each(s.value->'known') k
WHERE json_typeof(s.value->'known') = 'object'
ON CONFLICT (instance, id) DO NOTHING;
UPDATE state SET value = (value::jsonb - 'seen' - 'seen_at' - 'known')::json
WHERE value->'seen' IS NOT NULL OR value->'seen_at' IS NOT NULL OR value->'known' IS NOT NULL;
"#,
    ),
    (
        6,
        concat!(
            r#"
-- Item ids come from upstream: any length, any character (a NUL, which
-- `text` cannot hold; 3,000 bytes, more than a btree entry can). They
-- move to tables keyed by the id's SHA-256 (32 bytes, whatever the id),
-- the id itself kept as bytes in a column no index covers.
CREATE TABLE seen_ids (
    instance text COLLATE "C" NOT NULL,
    key bytea NOT NULL,
    id bytea NOT NULL,
    at_ms bigint NOT NULL,
    PRIMARY KEY (instance, key)
);
CREATE TABLE known_items (
    instance text COLLATE "C" NOT NULL,
    key bytea NOT NULL,
    id bytea NOT NULL,
    value json NOT NULL,
    PRIMARY KEY (instance, key)
);
-- Texts that come from outside and are no key (why a receiver disabled
-- an endpoint; a refresh token a token server rotated) are kept as bytes,
-- NUL and all.
ALTER TABLE disabled ALTER COLUMN why TYPE bytea USING convert_to(why, 'UTF8');
ALTER TABLE credentials ALTER COLUMN value TYPE bytea USING convert_to(value, 'UTF8');
"#,
            move_ids!()
        ),
    ),
];

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
    pending_attempts: Arc<std::sync::Mutex<(Vec<AttemptRecord>, Option<std::time::Instant>)>>,
    /// The connection settings, for the `LISTEN` connection, which lives
    /// outside the pool (see [`PgStore::listen`]).
    config: Arc<tokio_postgres::Config>,
    /// The `NOTIFY` channel of this schema: new outbox entries and shared
    /// host pauses are announced there (see [`Notice`]).
    channel: Arc<str>,
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

    /// Writes the attempts waiting for their batch (one round trip), and
    /// keeps the newest [`ATTEMPTS_KEPT`] every 100 attempts or so.
    async fn write_attempts(&self) -> Result<()> {
        let batch = {
            let mut p = self.pending_attempts.lock().expect("attempts lock");
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

impl Backend for PgStore {
    async fn load_state(&self, instance: &str) -> Result<InstanceState> {
        let rows = self
            .query(
                "read state",
                "SELECT (SELECT value::text FROM state WHERE instance = $1),
                        (SELECT at_ms FROM next_run WHERE instance = $1),
                        (SELECT json_agg(json_build_array(encode(id, 'hex'), at_ms))::text
                           FROM seen_ids WHERE instance = $1),
                        (SELECT json_agg(json_build_array(encode(id, 'hex'), value::text))::text
                           FROM known_items WHERE instance = $1)",
                &[&instance],
            )
            .await?;
        Self::state_of(instance, &rows[0], 0)
    }

    async fn all_states(&self) -> Result<Vec<(String, InstanceState)>> {
        let rows = self
            .query(
                "scan state",
                concat!(
                    "SELECT s.instance, ",
                    state_columns!(),
                    " FROM state s LEFT JOIN next_run n ON n.instance = s.instance
                      ORDER BY s.instance"
                ),
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let k: String = r.get(0);
                let s = Self::state_of(&k, r, 1)?;
                Ok((k, s))
            })
            .collect()
    }

    async fn state_keys(&self) -> Result<Vec<String>> {
        let rows = self
            .query(
                "scan state",
                "SELECT instance FROM state UNION SELECT instance FROM next_run ORDER BY 1",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn commit_poll(
        &self,
        instance: &str,
        write: &StateWrite,
        deliveries: &[(String, OutboxEntry)],
        fence: Option<&Fence>,
    ) -> Result<Vec<EntryKey>> {
        const OP: &str = "commit poll";
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err(OP))?;
        if let Some(f) = fence {
            // The lease row's lock is held to the commit: a claim by
            // another node (which raises the epoch) waits for this
            // transaction, or this one sees the raised epoch and stops.
            let st = tx
                .prepare_cached(
                    "SELECT 1 FROM lease WHERE instance = $1 AND owner = $2 AND epoch = $3 FOR UPDATE",
                )
                .await
                .map_err(pg_err(OP))?;
            let held = tx
                .query_opt(&st, &[&instance, &f.owner, &f.epoch])
                .await
                .map_err(pg_err(OP))?;
            if held.is_none() {
                return Err(StoreError::Fenced {
                    instance: instance.to_string(),
                    epoch: f.epoch,
                });
            }
        }
        Self::write_state(&tx, OP, instance, write).await?;
        let ins = tx
            .prepare_cached(
                "INSERT INTO outbox (endpoint, instance, created_ms, value)
                 VALUES ($1, $2, $3, $4::text::json) RETURNING seq",
            )
            .await
            .map_err(pg_err(OP))?;
        let mut keys = Vec::with_capacity(deliveries.len());
        for (ep, e) in deliveries {
            let row = tx
                .query_one(&ins, &[ep, &instance, &e.created_ms, &encode(e)])
                .await
                .map_err(pg_err(OP))?;
            keys.push(entry_key(ep.clone(), instance.to_string(), row.get(0)));
        }
        if !deliveries.is_empty() {
            let endpoints: BTreeSet<&str> = deliveries.iter().map(|(ep, _)| ep.as_str()).collect();
            self.announce_lane(&tx, OP, instance, endpoints).await?;
        }
        tx.commit().await.map_err(pg_err(OP))?;
        Ok(keys)
    }

    async fn load_credential(&self, key: &str) -> Result<Option<String>> {
        let rows = self
            .query(
                "read credential",
                "SELECT value FROM credentials WHERE key = $1",
                &[&key],
            )
            .await?;
        rows.first()
            .map(|r| text_of("a credential", r.get(0)))
            .transpose()
    }

    async fn save_credential(&self, key: &str, value: &str) -> Result<()> {
        self.exec(
            "keep credential",
            "INSERT INTO credentials (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&key, &value.as_bytes()],
        )
        .await
        .map(drop)
    }

    async fn enqueue(&self, deliveries: &[(String, OutboxEntry)]) -> Result<()> {
        const OP: &str = "queue";
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err(OP))?;
        let mut lanes = BTreeSet::new();
        for (ep, e) in deliveries {
            tx.execute(
                "INSERT INTO outbox (endpoint, instance, created_ms, value)
                 VALUES ($1, $2, $3, $4::text::json)",
                &[ep, &e.instance, &e.created_ms, &encode(e)],
            )
            .await
            .map_err(pg_err(OP))?;
            lanes.insert((ep.clone(), e.instance.clone()));
        }
        for (endpoint, instance) in &lanes {
            self.announce_lane(&tx, OP, instance, [endpoint.as_str()])
                .await?;
        }
        tx.commit().await.map_err(pg_err(OP))
    }

    async fn take_quota(
        &self,
        key: &str,
        interval_ms: f64,
        burst: u32,
    ) -> Result<Option<Duration>> {
        const OP: &str = "take quota";
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err(OP))?;
        tx.execute(
            "INSERT INTO quota (key) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&key],
        )
        .await
        .map_err(pg_err(OP))?;
        let row = tx
            .query_one(
                "SELECT tat_ms, now_ms()::float8 FROM quota WHERE key = $1 FOR UPDATE",
                &[&key],
            )
            .await
            .map_err(pg_err(OP))?;
        let (tat, now): (f64, f64) = (row.get(0), row.get(1));
        match crate::gcra::take(now, tat, interval_ms, burst) {
            Ok(next) => {
                tx.execute(
                    "UPDATE quota SET tat_ms = $2 WHERE key = $1",
                    &[&key, &next],
                )
                .await
                .map_err(pg_err(OP))?;
                tx.commit().await.map_err(pg_err(OP))?;
                Ok(None)
            }
            Err(wait) => Ok(Some(Duration::from_millis(wait.max(0.0).ceil() as u64))),
        }
    }

    async fn set_next_run(&self, instance: &str, next_run_ms: i64) -> Result<()> {
        self.exec_relaxed(
            "record next run",
            "INSERT INTO next_run (instance, at_ms) VALUES ($1, $2)
             ON CONFLICT (instance) DO UPDATE SET at_ms = EXCLUDED.at_ms",
            &[&instance, &next_run_ms],
        )
        .await
        .map(drop)
    }

    async fn remove_state(&self, instance: &str) -> Result<()> {
        self.exec(
            "remove state",
            "WITH s AS (DELETE FROM state WHERE instance = $1),
                  e AS (DELETE FROM seen_ids WHERE instance = $1),
                  k AS (DELETE FROM known_items WHERE instance = $1)
             DELETE FROM next_run WHERE instance = $1",
            &[&instance],
        )
        .await
        .map(drop)
    }

    async fn load_discovered(&self, source: &str) -> Result<Discovered> {
        let rows = self
            .query(
                "read discovered",
                "SELECT value::text FROM discovered WHERE source = $1",
                &[&source],
            )
            .await?;
        match rows.first() {
            Some(r) => decode(source, r.get(0)),
            None => Ok(Discovered::default()),
        }
    }

    async fn save_discovered(&self, source: &str, d: &Discovered) -> Result<()> {
        self.exec_relaxed(
            "write discovered",
            "INSERT INTO discovered (source, value) VALUES ($1, $2::text::json)
             ON CONFLICT (source) DO UPDATE SET value = EXCLUDED.value",
            &[&source, &encode(d)],
        )
        .await
        .map(drop)
    }

    async fn mark_removed(&self, instance: &str, delete_at_ms: i64) -> Result<()> {
        self.exec(
            "mark removed",
            "INSERT INTO removed (instance, delete_at_ms) VALUES ($1, $2)
             ON CONFLICT (instance) DO NOTHING",
            &[&instance, &delete_at_ms],
        )
        .await
        .map(drop)
    }

    async fn unmark_removed(&self, instance: &str) -> Result<()> {
        self.exec(
            "unmark removed",
            "DELETE FROM removed WHERE instance = $1",
            &[&instance],
        )
        .await
        .map(drop)
    }

    async fn removed(&self) -> Result<Vec<(String, i64)>> {
        let rows = self
            .query(
                "scan removed",
                "SELECT instance, delete_at_ms FROM removed ORDER BY instance",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn disable_endpoint(&self, endpoint: &str, why: &str) -> Result<()> {
        self.exec_notify(
            "disable endpoint",
            "INSERT INTO disabled (endpoint, why) VALUES ($1, $2)
             ON CONFLICT (endpoint) DO UPDATE SET why = EXCLUDED.why",
            &[&endpoint, &why.as_bytes()],
            Notice::Endpoint(endpoint.to_string()),
        )
        .await
        .map(drop)
    }

    async fn endpoint_disabled(&self, endpoint: &str) -> Result<Option<String>> {
        let rows = self
            .query(
                "read disabled",
                "SELECT why FROM disabled WHERE endpoint = $1",
                &[&endpoint],
            )
            .await?;
        rows.first()
            .map(|r| text_of(&format!("disabled/{endpoint}"), r.get(0)))
            .transpose()
    }

    async fn enable_endpoint(&self, endpoint: &str) -> Result<bool> {
        let n = self
            .exec_notify(
                "enable endpoint",
                "DELETE FROM disabled WHERE endpoint = $1",
                &[&endpoint],
                Notice::Endpoint(endpoint.to_string()),
            )
            .await?;
        Ok(n > 0)
    }

    async fn outbox_instances(&self, endpoint: &str) -> Result<BTreeSet<String>> {
        let rows = self
            .query(
                "scan outbox",
                "SELECT DISTINCT instance FROM outbox WHERE endpoint = $1",
                &[&endpoint],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn outbox_head(
        &self,
        endpoint: &str,
        instance: &str,
    ) -> Result<Option<(EntryKey, OutboxEntry)>> {
        let rows = self
            .query(
                "read outbox head",
                "SELECT seq, value::text FROM outbox WHERE endpoint = $1 AND instance = $2
                 ORDER BY seq LIMIT 1",
                &[&endpoint, &instance],
            )
            .await?;
        match rows.first() {
            None => Ok(None),
            Some(r) => {
                let key = entry_key(endpoint.into(), instance.into(), r.get(0));
                let e = decode(&key_name(&key), r.get(1))?;
                Ok(Some((key, e)))
            }
        }
    }

    async fn outbox_page(
        &self,
        endpoint: &str,
        after: Option<&EntryKey>,
        limit_n: usize,
    ) -> Result<Vec<(EntryKey, OutboxEntry)>> {
        // Row comparison on (instance, seq) uses the index and resumes
        // strictly after the key given, in sled's (lane, detection) order.
        let (inst, seq) = match after {
            Some(k) => (Some(k.instance.as_str()), k.seq as i64),
            None => (None, i64::MIN),
        };
        let rows = self
            .query(
                "scan outbox",
                "SELECT instance, seq, value::text FROM outbox
                 WHERE endpoint = $1 AND ($2::text IS NULL OR (instance, seq) > ($2, $3))
                 ORDER BY instance, seq LIMIT $4",
                &[&endpoint, &inst, &seq, &limit(limit_n)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let key = entry_key(endpoint.into(), r.get(0), r.get(1));
                let e = decode(&key_name(&key), r.get(2))?;
                Ok((key, e))
            })
            .collect()
    }

    async fn outbox_stats(&self, endpoint: &str) -> Result<(u64, Option<i64>)> {
        // The oldest of the lane heads, as sled counts it: a replayed
        // letter at the end of its lane does not make the backlog "older".
        let rows = self
            .query(
                "scan outbox",
                "SELECT (SELECT count(*) FROM outbox WHERE endpoint = $1),
                        (SELECT min(created_ms) FROM (
                            SELECT DISTINCT ON (instance) created_ms FROM outbox
                            WHERE endpoint = $1 ORDER BY instance, seq) heads)",
                &[&endpoint],
            )
            .await?;
        let n: i64 = rows[0].get(0);
        Ok((n as u64, rows[0].get(1)))
    }

    async fn delivered(&self, key: &EntryKey) -> Result<()> {
        self.exec_relaxed(
            "remove delivered",
            "DELETE FROM outbox WHERE seq = $1",
            &[&(key.seq as i64)],
        )
        .await
        .map(drop)
    }

    async fn delivered_next(&self, key: &EntryKey) -> Result<Option<(EntryKey, OutboxEntry)>> {
        // One statement: the delete and the read of the next head. The
        // read sees the lane as it was before the delete (one snapshot),
        // hence `seq > $1` rather than "the first".
        let c = self.relaxed.get().await.map_err(|e| StoreError::Backend {
            op: "remove delivered",
            source: chain(e),
        })?;
        let st = c
            .prepare_cached(
                "WITH d AS (DELETE FROM outbox WHERE seq = $1)
                 SELECT seq, value::text FROM outbox
                 WHERE endpoint = $2 AND instance = $3 AND seq > $1
                 ORDER BY seq LIMIT 1",
            )
            .await
            .map_err(pg_err("remove delivered"))?;
        let rows = c
            .query(&st, &[&(key.seq as i64), &key.endpoint, &key.instance])
            .await
            .map_err(pg_err("remove delivered"))?;
        match rows.first() {
            None => Ok(None),
            Some(r) => {
                let next = entry_key(key.endpoint.clone(), key.instance.clone(), r.get(0));
                let e = decode(&key_name(&next), r.get(1))?;
                Ok(Some((next, e)))
            }
        }
    }

    async fn reschedule(&self, key: &EntryKey, entry: &OutboxEntry) -> Result<()> {
        // An upsert, like sled's insert: the entry is where its key says.
        self.exec_relaxed(
            "reschedule",
            "INSERT INTO outbox (seq, endpoint, instance, created_ms, value)
             VALUES ($1, $2, $3, $4, $5::text::json)
             ON CONFLICT (seq) DO UPDATE SET value = EXCLUDED.value, created_ms = EXCLUDED.created_ms",
            &[
                &(key.seq as i64),
                &key.endpoint,
                &key.instance,
                &entry.created_ms,
                &encode(entry),
            ],
        )
        .await
        .map(drop)
    }

    async fn dead_letter(&self, key: &EntryKey, letter: &DeadLetter) -> Result<()> {
        const OP: &str = "dead-letter";
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err(OP))?;
        let seq = key.seq as i64;
        tx.execute("DELETE FROM outbox WHERE seq = $1", &[&seq])
            .await
            .map_err(pg_err(OP))?;
        let st = tx
            .prepare_cached(
                "INSERT INTO dead (seq, endpoint, instance, dead_at_ms, value)
                 VALUES ($1, $2, $3, $4, $5::text::json)
                 ON CONFLICT (seq) DO UPDATE SET value = EXCLUDED.value,
                     dead_at_ms = EXCLUDED.dead_at_ms",
            )
            .await
            .map_err(pg_err(OP))?;
        tx.execute(
            &st,
            &[
                &seq,
                &key.endpoint,
                &key.instance,
                &letter.dead_at_ms,
                &encode(letter),
            ],
        )
        .await
        .map_err(pg_err(OP))?;
        tx.commit().await.map_err(pg_err(OP))
    }

    async fn dead_letters(&self, endpoint: Option<&str>) -> Result<Vec<(EntryKey, DeadLetter)>> {
        let rows = self
            .query(
                "scan dead letters",
                "SELECT endpoint, instance, seq, value::text FROM dead
                 WHERE $1::text IS NULL OR endpoint = $1
                 ORDER BY endpoint, instance, seq",
                &[&endpoint],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let key = entry_key(r.get(0), r.get(1), r.get(2));
                let d = decode(&key_name(&key), r.get(3))?;
                Ok((key, d))
            })
            .collect()
    }

    async fn replay_dead(&self, letters: &[(EntryKey, DeadLetter)]) -> Result<usize> {
        const OP: &str = "replay";
        let mut c = self.client().await?;
        for (key, letter) in letters {
            let entry = OutboxEntry {
                attempts: 0,
                next_attempt_ms: 0,
                last_error: None,
                ..letter.entry.clone()
            };
            let tx = c.transaction().await.map_err(pg_err(OP))?;
            tx.execute("DELETE FROM dead WHERE seq = $1", &[&(key.seq as i64)])
                .await
                .map_err(pg_err(OP))?;
            tx.execute(
                "INSERT INTO outbox (endpoint, instance, created_ms, value)
                 VALUES ($1, $2, $3, $4::text::json)",
                &[
                    &letter.endpoint,
                    &letter.entry.instance,
                    &entry.created_ms,
                    &encode(&entry),
                ],
            )
            .await
            .map_err(pg_err(OP))?;
            self.announce_lane(&tx, OP, &letter.entry.instance, [letter.endpoint.as_str()])
                .await?;
            tx.commit().await.map_err(pg_err(OP))?;
        }
        Ok(letters.len())
    }

    async fn drop_dead(&self, keys: &[EntryKey]) -> Result<usize> {
        let seqs: Vec<i64> = keys.iter().map(|k| k.seq as i64).collect();
        let n = self
            .exec(
                "drop dead letter",
                "DELETE FROM dead WHERE seq = ANY($1)",
                &[&seqs],
            )
            .await?;
        Ok(n as usize)
    }

    async fn record_attempt(&self, rec: &AttemptRecord) -> Result<()> {
        let due = {
            let mut p = self.pending_attempts.lock().expect("attempts lock");
            p.0.push(rec.clone());
            let first = *p.1.get_or_insert_with(std::time::Instant::now);
            p.0.len() >= ATTEMPT_BATCH || first.elapsed() >= ATTEMPT_DELAY
        };
        if due {
            self.write_attempts().await?;
        }
        Ok(())
    }

    async fn attempts(&self, q: &AttemptQuery) -> Result<Vec<AttemptRecord>> {
        self.write_attempts().await?;
        let rows = self
            .query(
                "scan attempts",
                "SELECT id, value::text FROM attempts
                 WHERE ($1::text IS NULL OR event_id = $1) AND ($2::text IS NULL OR endpoint = $2)
                 ORDER BY id DESC LIMIT $3",
                &[&q.id, &q.endpoint, &limit(q.limit())],
            )
            .await?;
        rows.iter()
            .map(|r| decode(&format!("attempts/{}", r.get::<_, i64>(0)), r.get(1)))
            .collect()
    }

    async fn prune_attempts(&self, before_ms: i64) -> Result<usize> {
        self.write_attempts().await?;
        let n = self
            .exec(
                "prune attempts",
                "DELETE FROM attempts WHERE at_ms < $1",
                &[&before_ms],
            )
            .await?;
        Ok(n as usize)
    }

    async fn export_page(
        &self,
        kind: RecordKind,
        after: Option<Vec<u8>>,
        limit_n: usize,
    ) -> Result<Page> {
        if kind == RecordKind::Attempt {
            self.write_attempts().await?;
        }
        // Every query's first column is what pages are cut on: a name for
        // the named records, a number for the numbered ones (the outbox in
        // detection order across the whole store, which import keeps).
        let (sql, numbered) = match kind {
            RecordKind::Disabled => (
                "SELECT endpoint, why FROM disabled WHERE $1::text IS NULL OR endpoint > $1
                 ORDER BY endpoint LIMIT $2",
                false,
            ),
            RecordKind::State => (
                concat!(
                    "SELECT s.instance, ",
                    state_columns!(),
                    " FROM state s LEFT JOIN next_run n ON n.instance = s.instance
                      WHERE $1::text IS NULL OR s.instance > $1
                      ORDER BY s.instance LIMIT $2"
                ),
                false,
            ),
            RecordKind::Discovered => (
                "SELECT source, value::text FROM discovered
                 WHERE $1::text IS NULL OR source > $1 ORDER BY source LIMIT $2",
                false,
            ),
            RecordKind::Removed => (
                "SELECT instance, delete_at_ms FROM removed
                 WHERE $1::text IS NULL OR instance > $1 ORDER BY instance LIMIT $2",
                false,
            ),
            RecordKind::Outbox => (
                "SELECT seq, endpoint, value::text FROM outbox WHERE seq > $1
                 ORDER BY seq LIMIT $2",
                true,
            ),
            RecordKind::Dead => (
                "SELECT seq, value::text FROM dead WHERE seq > $1 ORDER BY seq LIMIT $2",
                true,
            ),
            RecordKind::Attempt => (
                "SELECT id, value::text FROM attempts WHERE id > $1 ORDER BY id LIMIT $2",
                true,
            ),
        };
        let lim = limit(limit_n);
        let (text, num) = (text_cursor(&after), num_cursor(&after));
        let params: [&(dyn ToSql + Sync); 2] = if numbered {
            [&num, &lim]
        } else {
            [&text, &lim]
        };
        let rows = self.query("scan for export", sql, &params).await?;
        let next = rows.last().map(|r| {
            if numbered {
                r.get::<_, i64>(0).to_be_bytes().to_vec()
            } else {
                r.get::<_, String>(0).into_bytes()
            }
        });
        let records = rows
            .iter()
            .map(|r| record_of(kind, r))
            .collect::<Result<Vec<_>>>()?;
        // A short page is the last one; a full one may be followed by more.
        let next = if records.len() < limit_n { None } else { next };
        Ok(Page { records, next })
    }

    async fn count_records(&self) -> Result<usize> {
        let rows = self
            .query(
                "count records",
                "SELECT (SELECT count(*) FROM state) + (SELECT count(*) FROM next_run)
                      + (SELECT count(*) FROM seen_ids) + (SELECT count(*) FROM known_items)
                      + (SELECT count(*) FROM outbox) + (SELECT count(*) FROM dead)
                      + (SELECT count(*) FROM attempts) + (SELECT count(*) FROM discovered)
                      + (SELECT count(*) FROM removed) + (SELECT count(*) FROM disabled)",
                &[],
            )
            .await?;
        let n: i64 = rows[0].get(0);
        Ok(n as usize)
    }

    async fn import_records(&self, records: Vec<Record>) -> Result<usize> {
        const OP: &str = "import";
        let n = records.len();
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err(OP))?;
        for r in records {
            match r {
                Record::Disabled { endpoint, why } => {
                    tx.execute(
                        "INSERT INTO disabled (endpoint, why) VALUES ($1, $2)
                         ON CONFLICT (endpoint) DO UPDATE SET why = EXCLUDED.why",
                        &[&endpoint, &why.as_bytes()],
                    )
                    .await
                }
                Record::State { instance, value } => {
                    if let Some(t) = value.next_run_ms {
                        tx.execute(
                            "INSERT INTO next_run (instance, at_ms) VALUES ($1, $2)
                             ON CONFLICT (instance) DO UPDATE SET at_ms = EXCLUDED.at_ms",
                            &[&instance, &t],
                        )
                        .await
                        .map_err(pg_err(OP))?;
                    }
                    let w = StateWrite::whole(&value, crate::now_ms());
                    Self::write_state(&tx, OP, &instance, &w).await?;
                    Ok(1)
                }
                Record::Discovered { source, value } => {
                    tx.execute(
                        "INSERT INTO discovered (source, value) VALUES ($1, $2::text::json)
                         ON CONFLICT (source) DO UPDATE SET value = EXCLUDED.value",
                        &[&source, &encode(&value)],
                    )
                    .await
                }
                Record::Removed {
                    instance,
                    delete_at_ms,
                } => {
                    tx.execute(
                        "INSERT INTO removed (instance, delete_at_ms) VALUES ($1, $2)
                         ON CONFLICT (instance) DO UPDATE SET delete_at_ms = EXCLUDED.delete_at_ms",
                        &[&instance, &delete_at_ms],
                    )
                    .await
                }
                Record::Outbox { endpoint, value } => {
                    tx.execute(
                        "INSERT INTO outbox (endpoint, instance, created_ms, value)
                         VALUES ($1, $2, $3, $4::text::json)",
                        &[
                            &endpoint,
                            &value.instance,
                            &value.created_ms,
                            &encode(&value),
                        ],
                    )
                    .await
                }
                Record::Dead { value } => {
                    tx.execute(
                        "INSERT INTO dead (endpoint, instance, dead_at_ms, value)
                         VALUES ($1, $2, $3, $4::text::json)",
                        &[
                            &value.endpoint,
                            &value.entry.instance,
                            &value.dead_at_ms,
                            &encode(&value),
                        ],
                    )
                    .await
                }
                Record::Attempt { value } => {
                    tx.execute(
                        "INSERT INTO attempts (event_id, endpoint, at_ms, value)
                         VALUES ($1, $2, $3, $4::text::json)",
                        &[
                            &value.event_id,
                            &value.endpoint,
                            &value.at_ms,
                            &encode(&value),
                        ],
                    )
                    .await
                }
            }
            .map_err(pg_err(OP))?;
        }
        tx.commit().await.map_err(pg_err(OP))?;
        Ok(n)
    }

    /// Bounded: `/readyz` must answer "not ready" soon when the server is
    /// gone, not after the pool's connect and wait timeouts.
    async fn ping(&self) -> Result<()> {
        match tokio::time::timeout(PING_TIMEOUT, self.query("ping", "SELECT 1", &[])).await {
            Ok(r) => r.map(drop),
            Err(_) => Err(StoreError::Backend {
                op: "ping",
                source: format!("no answer from PostgreSQL in {} s", PING_TIMEOUT.as_secs()).into(),
            }),
        }
    }

    /// Every commit that must be durable already is (see the module
    /// doc); what waits is the history's last batch.
    async fn flush(&self) -> Result<()> {
        self.write_attempts().await
    }
}

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
mod tests {
    use super::*;

    /// The server's refusal of the data it was given (here a duplicate
    /// key, whose `DETAIL` is a line of its own) is `Refused`, on one line;
    /// a failure of the server or the query is not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_data_is_told_apart_on_one_line() {
        if !testing::available("refused_data_is_told_apart_on_one_line").await {
            return;
        }
        let (c, conn) = tokio_postgres::connect(&testing::url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let e = c
            .batch_execute("CREATE TEMP TABLE t (k int PRIMARY KEY); INSERT INTO t VALUES (1), (1)")
            .await
            .unwrap_err();
        let e = pg_err("commit poll")(e);
        assert!(matches!(e, StoreError::Refused { .. }), "{e}");
        let text = e.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(
            text.contains("already exists"),
            "the DETAIL is kept: {text}"
        );
        let e = c
            .batch_execute("SELECT * FROM no_such_table")
            .await
            .unwrap_err();
        assert!(matches!(
            pg_err("load state")(e),
            StoreError::Backend { .. }
        ));
    }

    #[test]
    fn notices_read_back_and_channels_fit_a_name() {
        for n in [
            Notice::Outbox {
                endpoint: "agent".into(),
                instance: "bank/acc-1".into(),
            },
            Notice::Pace("api.example.com:8443".into()),
            Notice::Endpoint("agent".into()),
            Notice::Leases,
        ] {
            assert_eq!(Notice::decode(&n.encode()), Some(n));
        }
        assert_eq!(Notice::decode("x\ty"), None);
        assert_eq!(Notice::decode("o\tonly"), None);
        assert_eq!(Notice::decode("p\th\textra"), None);
        assert_eq!(channel_of("pollhook"), "pollhook_pollhook");
        let long = channel_of(&"a".repeat(63));
        assert!(long.len() <= 63, "{long}");
        assert_ne!(long, channel_of(&"b".repeat(63)));
    }

    #[test]
    fn urls_lose_their_password_and_schemas_must_be_plain() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("host=h user=u"), "host=h user=u");
        assert!(valid_schema("pollhook"));
        assert!(valid_schema("_a1"));
        for bad in ["", "1a", "Pollhook", "a-b", "a\"; DROP", &"a".repeat(64)] {
            assert!(!valid_schema(bad), "{bad}");
        }
    }

    /// Store errors are shown with `{}`: they must say the cause, not only
    /// tokio-postgres' "error connecting to server", and never the password.
    #[tokio::test]
    async fn open_errors_say_why_without_the_password() {
        let e = PgStore::open("postgres://u:hunter2@127.0.0.1:1/db", "pollhook")
            .await
            .err()
            .expect("nothing listens on port 1")
            .to_string();
        assert!(e.contains("refused"), "{e}");
        assert!(e.contains("u:***@127.0.0.1:1/db"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = PgStore::open("postgres://u@127.0.0.1:1/db", "Bad-Name")
            .await
            .err()
            .expect("a bad schema name")
            .to_string();
        assert!(e.contains("lower-case identifier"), "{e}");
    }

    /// Many more concurrent commits than pooled connections: they queue for
    /// a connection, none is lost, keys are distinct and each lane keeps
    /// its order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_share_the_pool_and_all_land() {
        if !testing::available("concurrent_commits_share_the_pool_and_all_land").await {
            return;
        }
        let schema = testing::fresh_schema();
        let store = PgStore::open(&testing::url(), &schema).await.unwrap();
        let check = async move {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..200 {
                let store = store.clone();
                tasks.spawn(async move {
                    let inst = format!("s/{i}");
                    let e = |n: u64| OutboxEntry {
                        event_id: format!("msg_{i}_{n}"),
                        instance: inst.clone(),
                        kind: "t".into(),
                        sequence: n,
                        body: "{}".into(),
                        attempts: 0,
                        next_attempt_ms: 0,
                        created_ms: n as i64,
                        last_error: None,
                    };
                    let st = InstanceState {
                        sequence: 2,
                        ..Default::default()
                    };
                    store
                        .commit_poll(
                            &inst,
                            &StateWrite::whole(&st, 0),
                            &[("ep".into(), e(1)), ("ep".into(), e(2))],
                            None,
                        )
                        .await
                        .unwrap()
                });
            }
            let mut seqs = BTreeSet::new();
            while let Some(keys) = tasks.join_next().await {
                let keys = keys.unwrap();
                assert!(keys[0].seq < keys[1].seq);
                seqs.extend(keys.iter().map(|k| k.seq));
            }
            assert_eq!(seqs.len(), 400, "distinct keys");
            assert_eq!(store.outbox_stats("ep").await.unwrap(), (400, Some(1)));
            assert_eq!(store.state_keys().await.unwrap().len(), 200);
            let page = store.outbox_page("ep", None, usize::MAX).await.unwrap();
            for pair in page.chunks(2) {
                assert_eq!(pair[0].0.instance, pair[1].0.instance);
                assert_eq!((pair[0].1.sequence, pair[1].1.sequence), (1, 2));
            }
        };
        let outcome = tokio::spawn(check).await;
        testing::drop_schema(&schema);
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    /// A schema at version 5 (ids as text keys, texts as text) upgrades at
    /// open: its seen ids, known items, disabled endpoints and credentials
    /// read back as they were, and take what version 5 could not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_5_schema_upgrades_with_its_records() {
        if !testing::available("a_version_5_schema_upgrades_with_its_records").await {
            return;
        }
        let schema = testing::fresh_schema();
        let (url, schema2) = (testing::url(), schema.clone());
        let check = async move {
            let schema = schema2;
            let (c, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            let conn = tokio::spawn(conn);
            c.batch_execute(&format!(
                "CREATE SCHEMA \"{schema}\"; SET search_path TO \"{schema}\";
                 CREATE TABLE schema_migrations (
                     version integer PRIMARY KEY,
                     applied_at timestamptz NOT NULL DEFAULT now());"
            ))
            .await
            .unwrap();
            for (v, sql) in MIGRATIONS.iter().filter(|m| m.0 <= 5) {
                c.batch_execute(sql).await.unwrap();
                c.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[v])
                    .await
                    .unwrap();
            }
            c.batch_execute(
                r#"INSERT INTO state (instance, value) VALUES ('s/i', '{"initialized":true,"sequence":2}');
                   INSERT INTO seen (instance, id, at_ms) VALUES ('s/i', 'a', 1), ('s/i', 'é', 2);
                   INSERT INTO known (instance, id, value) VALUES ('s/i', 'k', '{"version":"1","item":{"n":1}}');
                   INSERT INTO disabled (endpoint, why) VALUES ('ep', '410 Gone');
                   INSERT INTO credentials (key, value) VALUES ('oauth2-refresh:x', 'tok');"#,
            )
            .await
            .unwrap();
            drop(c);
            let _ = conn.await;
            let store = PgStore::open(&testing::url(), &schema).await.unwrap();
            let s = store.load_state("s/i").await.unwrap();
            assert_eq!(s.seen, ["a", "é"]);
            assert_eq!(s.seen_at, [1, 2]);
            assert_eq!(s.known["k"].item, serde_json::json!({ "n": 1 }));
            assert_eq!(s.sequence, 2);
            assert_eq!(
                store.endpoint_disabled("ep").await.unwrap().as_deref(),
                Some("410 Gone")
            );
            assert_eq!(
                store
                    .load_credential("oauth2-refresh:x")
                    .await
                    .unwrap()
                    .as_deref(),
                Some("tok")
            );
            // The same ids written again are the same rows (same keys).
            let mut next = s.clone();
            next.seen_at = [7, 8].into();
            next.seen.push_back("n\0ul".into());
            next.seen_at.push_back(9);
            store
                .commit_poll("s/i", &StateWrite::between(&s, &next, 10), &[], None)
                .await
                .unwrap();
            assert_eq!(store.load_state("s/i").await.unwrap(), next);
            assert_eq!(store.count_records().await.unwrap(), 1 + 3 + 1 + 1);
        };
        let outcome = tokio::spawn(check).await;
        testing::drop_schema(&schema);
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    /// Pruning deletes the rows of removed keys that nobody else holds and
    /// whose outbox is empty, says which stay, and tells every node.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pruning_keeps_rows_held_elsewhere_or_with_queued_events() {
        if !testing::available("pruning_keeps_rows_held_elsewhere_or_with_queued_events").await {
            return;
        }
        let schema = testing::fresh_schema();
        let store = PgStore::open(&testing::url(), &schema).await.unwrap();
        let check = async move {
            let keys: Vec<String> = ["s/free", "s/mine", "s/theirs", "s/queued", "s/kept"]
                .map(String::from)
                .into();
            store.ensure_leases(&keys).await.unwrap();
            // "a" holds everything but s/free; "b" then takes s/theirs.
            store.claim("a", 60_000, 4).await.unwrap();
            store
                .release("a", &["s/free".to_string(), "s/theirs".to_string()])
                .await
                .unwrap();
            store
                .exec(
                    "test",
                    "UPDATE lease SET owner = 'b', until_ms = now_ms() + 60000 WHERE instance = 's/theirs'",
                    &[],
                )
                .await
                .unwrap();
            let e = OutboxEntry {
                event_id: "msg_q".into(),
                instance: "s/queued".into(),
                kind: "t".into(),
                sequence: 1,
                body: "{}".into(),
                attempts: 0,
                next_attempt_ms: 0,
                created_ms: 1,
                last_error: None,
            };
            store
                .commit_poll(
                    "s/queued",
                    &StateWrite::whole(&InstanceState::default(), 0),
                    &[("ep".into(), e)],
                    None,
                )
                .await
                .unwrap();
            let (tx, mut notices) = tokio::sync::mpsc::channel(16);
            let listener = {
                let store = store.clone();
                tokio::spawn(async move { store.listen(tx).await })
            };
            // LISTEN is in place once a notice sent after it arrives.
            loop {
                store.share_pace("h", None, None).await.unwrap();
                if let Ok(Some(_)) =
                    tokio::time::timeout(Duration::from_millis(200), notices.recv()).await
                {
                    break;
                }
            }
            let gone: Vec<String> = keys[..4].to_vec();
            let (pruned, kept) = store.prune_leases("a", &gone).await.unwrap();
            assert_eq!(pruned, 2);
            assert_eq!(
                kept,
                ["s/queued", "s/theirs"]
                    .map(String::from)
                    .into_iter()
                    .collect()
            );
            let left: BTreeSet<String> = store
                .leases()
                .await
                .unwrap()
                .into_iter()
                .map(|l| l.key)
                .collect();
            assert_eq!(
                left,
                ["s/kept", "s/queued", "s/theirs"]
                    .map(String::from)
                    .into_iter()
                    .collect()
            );
            let heard = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    if notices.recv().await == Some(Notice::Leases) {
                        return;
                    }
                }
            })
            .await;
            assert!(heard.is_ok(), "no notice of the pruning");
            // Nothing to prune: no notice, nothing gone.
            assert_eq!(store.prune_leases("a", &[]).await.unwrap().0, 0);
            listener.abort();
        };
        let outcome = tokio::spawn(check).await;
        testing::drop_schema(&schema);
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    /// Leases: a claim takes only free or lapsed rows and raises the epoch;
    /// a commit fenced by a stale epoch writes nothing; renewal keeps a
    /// lapsed lease nobody claimed under the same epoch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leases_are_claimed_once_and_stale_commits_are_refused() {
        if !testing::available("leases_are_claimed_once_and_stale_commits_are_refused").await {
            return;
        }
        let schema = testing::fresh_schema();
        let store = PgStore::open(&testing::url(), &schema).await.unwrap();
        let check = async move {
            let keys: Vec<String> = (0..4).map(|i| format!("s/{i}")).collect();
            store.ensure_leases(&keys).await.unwrap();
            store.ensure_leases(&keys).await.unwrap();
            assert_eq!(store.lease_count().await.unwrap(), 4);
            // Two nodes claiming at once never take the same row.
            let (a, b) = tokio::join!(store.claim("a", 60_000, 3), store.claim("b", 60_000, 3));
            let (a, b) = (a.unwrap(), b.unwrap());
            assert_eq!(a.len() + b.len(), 4, "{a:?} {b:?}");
            let ka: BTreeSet<_> = a.iter().map(|x| x.0.clone()).collect();
            assert!(b.iter().all(|x| !ka.contains(&x.0)), "{a:?} {b:?}");
            assert!(a.iter().chain(&b).all(|x| x.1 == 1), "first epoch is 1");
            // Nothing is free now.
            assert!(store.claim("c", 60_000, 4).await.unwrap().is_empty());
            let (key, epoch) = a[0].clone();
            let state = |cursor: &str| InstanceState {
                cursor: Some(cursor.into()),
                ..Default::default()
            };
            let fence = |owner: &str, epoch: i64| Fence {
                owner: owner.into(),
                epoch,
            };
            store
                .commit_poll(
                    &key,
                    &StateWrite::whole(&state("mine"), 0),
                    &[],
                    Some(&fence("a", epoch)),
                )
                .await
                .unwrap();
            // "a" stalls past its lease: it lapses and "c" claims it.
            store
                .exec(
                    "test",
                    "UPDATE lease SET until_ms = 0 WHERE instance = $1",
                    &[&key],
                )
                .await
                .unwrap();
            let got = store.claim("c", 60_000, 1).await.unwrap();
            assert_eq!(got, vec![(key.clone(), epoch + 1)]);
            let e = store
                .commit_poll(
                    &key,
                    &StateWrite::whole(&state("stale"), 0),
                    &[],
                    Some(&fence("a", epoch)),
                )
                .await
                .unwrap_err();
            assert!(matches!(e, StoreError::Fenced { .. }), "{e}");
            assert!(e.to_string().contains("no longer holds its lease"), "{e}");
            assert_eq!(
                store.load_state(&key).await.unwrap().cursor.as_deref(),
                Some("mine"),
                "the stale commit wrote nothing"
            );
            store
                .commit_poll(
                    &key,
                    &StateWrite::whole(&state("new"), 0),
                    &[],
                    Some(&fence("c", epoch + 1)),
                )
                .await
                .unwrap();
            // "a" renews: it keeps what it still holds, not the lost one.
            let renewed: BTreeSet<_> = store
                .renew("a", 60_000)
                .await
                .unwrap()
                .into_iter()
                .map(|x| x.0)
                .collect();
            assert!(
                !renewed.contains(&key) && renewed.len() == a.len() - 1,
                "{renewed:?}"
            );
            // Released leases are claimable at once, with a new epoch.
            store
                .release("b", &b.iter().map(|x| x.0.clone()).collect::<Vec<_>>())
                .await
                .unwrap();
            let again = store.claim("c", 60_000, 10).await.unwrap();
            assert_eq!(again.len(), b.len());
            assert!(again.iter().all(|x| x.1 == 2));
            // Heartbeats count live nodes; a node that leaves is not counted.
            assert_eq!(store.heartbeat("a", 1, 60_000).await.unwrap(), 1);
            assert_eq!(store.heartbeat("c", 1, 60_000).await.unwrap(), 2);
            store.leave("a").await.unwrap();
            assert_eq!(store.heartbeat("c", 1, 60_000).await.unwrap(), 1);
            let nodes = store.nodes().await.unwrap();
            assert_eq!(nodes.len(), 1);
            assert_eq!(nodes[0].leases as usize, 1 + b.len(), "{nodes:?}");
        };
        let outcome = tokio::spawn(check).await;
        testing::drop_schema(&schema);
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    /// A host's quota booked by several nodes at once: the starts it hands
    /// out keep the rate and burst together, and a shared pause holds them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn host_bookings_keep_the_rate_across_stores_and_pauses_hold_them() {
        if !testing::available("host_bookings_keep_the_rate_across_stores_and_pauses_hold_them")
            .await
        {
            return;
        }
        let schema = testing::fresh_schema();
        let a = PgStore::open(&testing::url(), &schema).await.unwrap();
        let b = PgStore::open(&testing::url(), &schema).await.unwrap();
        let check = async move {
            // 20/s, burst 5, booked 30 times from two stores at once. Each
            // start is when the booking returned plus the wait it was given.
            let t0 = std::time::Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..30 {
                let s = if i % 2 == 0 { a.clone() } else { b.clone() };
                tasks.spawn(async move {
                    let w = s.book("host:h", 50.0, 5, false).await.unwrap();
                    (t0.elapsed() + w).as_millis()
                });
            }
            let mut starts: Vec<u128> = Vec::new();
            while let Some(w) = tasks.join_next().await {
                starts.push(w.unwrap());
            }
            starts.sort();
            // 5 at once, then one per 50 ms: the last starts ~1.25 s after
            // the first.
            assert!(starts[29] - starts[0] >= 1200, "{starts:?}");
            // (10 ms of slack for measuring on this side of the round trip.)
            for (i, s) in starts.iter().enumerate() {
                let within = starts[i..].iter().filter(|x| **x < s + 990).count();
                assert!(within <= 25, "{within} starts in a second: {starts:?}");
            }
            // A pause shared by one node holds the other's next booking.
            a.share_pace("p", Some(Duration::from_secs(30)), None)
                .await
                .unwrap();
            let w = b.book("host:p", 10.0, 1, false).await.unwrap();
            assert!(w >= Duration::from_secs(29), "{w:?}");
            let paces = b.paces().await.unwrap();
            assert_eq!(paces.len(), 1, "{paces:?}");
            assert_eq!(paces[0].host, "p");
            assert!(paces[0].paused_for >= Duration::from_secs(29));
        };
        let outcome = tokio::spawn(check).await;
        testing::drop_schema(&schema);
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    /// Two processes starting together on an empty schema: the advisory
    /// lock lets one migrate while the other waits, and both open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_stores_opening_one_empty_schema_at_once_both_succeed() {
        if !testing::available("two_stores_opening_one_empty_schema_at_once_both_succeed").await {
            return;
        }
        let url = testing::url();
        let schema = testing::fresh_schema();
        let (a, b) = tokio::join!(PgStore::open(&url, &schema), PgStore::open(&url, &schema));
        let (url2, schema2) = (url.clone(), schema.clone());
        let check = async move {
            let (url, schema) = (url2, schema2);
            let (a, b) = (a.unwrap(), b.unwrap());
            a.set_next_run("s/i", 5).await.unwrap();
            assert_eq!(b.load_state("s/i").await.unwrap().next_run_ms, Some(5));
            let rows = a
                .query(
                    "test",
                    "SELECT version FROM schema_migrations ORDER BY version",
                    &[],
                )
                .await
                .unwrap();
            let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
            let want: Vec<i32> = MIGRATIONS.iter().map(|m| m.0).collect();
            assert_eq!(versions, want, "each version applied once");
            // Opening again applies nothing and still works.
            let c = PgStore::open(&url, &schema).await.unwrap();
            c.ping().await.unwrap();
        };
        // The schema goes whether the checks pass or not.
        let outcome = tokio::spawn(check).await;
        testing::drop_schema(&schema);
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// What nodes tell each other through `NOTIFY` on the schema's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// New outbox entries of `instance` for `endpoint` (a commit, a replay).
    Outbox { endpoint: String, instance: String },
    /// A host's shared pause or pace changed (see `PgStore::share_pace`).
    Pace(String),
    /// An endpoint was disabled or enabled again: every node's worker
    /// reads which it is now.
    Endpoint(String),
    /// Lease rows of removed instances were pruned: a node whose
    /// configuration still has one adds it back.
    Leases,
}

impl Notice {
    /// One line: `o\t<endpoint>\t<instance>` or `p\t<host>` (names never
    /// hold a tab: configuration names are identifiers, hosts are hosts).
    fn encode(&self) -> String {
        match self {
            Notice::Outbox { endpoint, instance } => format!("o\t{endpoint}\t{instance}"),
            Notice::Pace(host) => format!("p\t{host}"),
            Notice::Endpoint(name) => format!("e\t{name}"),
            Notice::Leases => "l".to_string(),
        }
    }

    fn decode(text: &str) -> Option<Notice> {
        if text == "l" {
            return Some(Notice::Leases);
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
