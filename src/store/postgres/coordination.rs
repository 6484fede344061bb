//! The coordination seam ([`Coordination`]) on PostgreSQL, for several
//! nodes on one schema: heartbeats, leases, host quotas and pauses, and
//! `LISTEN/NOTIFY`. The
//! policy (how many leases to hold, when to renew) is `crate::cluster`'s;
//! this file is its SQL.
//!
//! Every time here is the database's (`now_ms()`, created by migration 2):
//! nodes on several machines agree on when a lease lapses however their
//! own clocks drift.
//!
//! One heartbeat keeps all of a node's leases (migration 8): a lease is
//! held while its `until_ms` (set at the claim, or by a full renewal) is
//! to come, or while its owner's heartbeat is younger than the owner's
//! lease (see [`held!`]). A round writes the node's row, reads two numbers
//! that say whether its set of leases changed, and lists them only if so;
//! River keeps its job leases flat the same way (one heartbeat per
//! worker, not per job). Safety: a claim takes a silent node's leases
//! only under that node's row lock (`FOR UPDATE`), so it either runs
//! before the node's next heartbeat (which then waits, and the renewal
//! after it sees the loss) or sees that heartbeat and takes nothing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::{pg_err, PgStore};

/// The condition "lease `l` is held" (see the module documentation): its
/// claim's time is to come, or its owner's heartbeat keeps it.
macro_rules! held {
    () => {
        "(l.until_ms > now_ms() OR EXISTS (SELECT 1 FROM nodes h
          WHERE h.node = l.owner AND h.heartbeat_ms + h.lease_ms > now_ms()))"
    };
}

/// A lease's share of the fingerprint that says whether a node's set of
/// leases changed: PostgreSQL's `hashtextextended(instance, epoch)`,
/// shifted so that 100,000 of them sum without overflow.
fn share(hash: i64) -> i64 {
    hash >> 24
}

/// The fingerprint of leases listed with their hash in column 2: how
/// many, and the sum of their shares.
fn fingerprint(rows: &[tokio_postgres::Row]) -> (i64, i64) {
    (
        rows.len() as i64,
        rows.iter().map(|r| share(r.get(2))).sum::<i64>(),
    )
}
use crate::store::coordination::{
    Booked, Claimed, Coordination, HostPace, LeaseRow, NodeRow, Notice,
};
use crate::store::{Fence, Result, StoreError};

impl Coordination for PgStore {
    /// Records that `node` is alive, and returns how many nodes are (a
    /// heartbeat younger than `alive_ms`). Nodes silent for an hour are
    /// forgotten. The heartbeat keeps every lease of `node` for
    /// `alive_ms` (see the module documentation). Committed without
    /// waiting for the disk: a heartbeat lost in a crash only makes the
    /// leases look older, never held longer.
    async fn heartbeat(&self, node: &str, started_ms: i64, alive_ms: i64) -> Result<i64> {
        self.exec_relaxed(
            "heartbeat",
            "WITH gone AS (DELETE FROM nodes WHERE heartbeat_ms < now_ms() - 3600000)
             INSERT INTO nodes (node, started_ms, heartbeat_ms, info, lease_ms)
             VALUES ($1, $2, now_ms(), '{}', $3)
             ON CONFLICT (node) DO UPDATE SET heartbeat_ms = now_ms(), lease_ms = $3",
            &[&node, &started_ms, &alive_ms],
        )
        .await?;
        let rows = self
            .query(
                "count nodes",
                "SELECT count(*) FROM nodes WHERE heartbeat_ms > now_ms() - $1",
                &[&alive_ms],
            )
            .await?;
        Ok(rows[0].get(0))
    }

    /// A node that stops says so: its row goes, so the others count one
    /// node fewer at once.
    async fn leave(&self, node: &str) -> Result<()> {
        self.exec(
            "leave",
            "WITH gone AS (DELETE FROM nodes WHERE node = $1) SELECT pg_notify($2, $3)",
            &[&node, &&*self.channel, &Notice::Freed.encode()],
        )
        .await
        .map(drop)
    }

    /// Tells every node that this one claims from now on.
    async fn settled(&self, _node: &str) -> Result<()> {
        self.exec(
            "announce a settled node",
            "SELECT pg_notify($1, $2)",
            &[&&*self.channel, &Notice::Freed.encode()],
        )
        .await
        .map(drop)
    }

    /// Makes sure every key has a lease row (unowned when new).
    async fn ensure_leases(&self, keys: &[Arc<str>]) -> Result<()> {
        let keys: Vec<&str> = keys.iter().map(|k| &**k).collect();
        self.exec_relaxed(
            "add leases",
            "INSERT INTO lease (instance) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
            &[&keys],
        )
        .await
        .map(drop)
    }

    /// Extends every lease `node` holds by `lease_ms`; returns them with
    /// their epochs. A lease that lapsed but that nobody claimed is still
    /// the node's (same epoch: nobody else polled in between).
    async fn renew(&self, node: &str, lease_ms: i64) -> Result<Vec<(String, i64)>> {
        let rows = self
            .query(
                "renew leases",
                "UPDATE lease SET until_ms = now_ms() + $2 WHERE owner = $1
                 RETURNING instance, epoch, hashtextextended(instance, epoch)",
                &[&node, &lease_ms],
            )
            .await?;
        self.renewals
            .lock()
            .insert(node.to_string(), fingerprint(&rows));
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The node's heartbeat (written just before, each round) keeps its
    /// leases; this only tells whether their set changed since the last
    /// full renewal: how many there are and a sum of their keys' and
    /// epochs' hashes, read through `lease_owner`, no row written. Only
    /// when those differ (a claim, a release, a takeover, a prune) are
    /// the leases renewed and listed.
    async fn renew_changed(&self, node: &str, lease_ms: i64) -> Result<Option<Vec<(String, i64)>>> {
        let rows = self
            .query(
                "check leases",
                "SELECT count(*), coalesce(sum(hashtextextended(instance, epoch) >> 24), 0)::bigint
                 FROM lease WHERE owner = $1",
                &[&node],
            )
            .await?;
        let print = (rows[0].get::<_, i64>(0), rows[0].get::<_, i64>(1));
        if self.renewals.lock().get(node) == Some(&print) {
            return Ok(None);
        }
        self.renew(node, lease_ms).await.map(Some)
    }

    /// How many leases there are (instances with work, and discoveries).
    async fn lease_count(&self) -> Result<i64> {
        let rows = self
            .query("count leases", "SELECT count(*) FROM lease", &[])
            .await?;
        Ok(rows[0].get(0))
    }

    /// Claims up to `n` leases that nobody holds or that lapsed, raising
    /// their epochs. `FOR UPDATE SKIP LOCKED`: nodes claiming at once take
    /// different rows, and a row whose owner is committing under it (the
    /// fenced commit locks it) is left alone. A silent node's row is
    /// locked (`FOR UPDATE`, waiting) so that its heartbeat and this claim
    /// come one after the other (see the module documentation).
    async fn claim(&self, node: &str, lease_ms: i64, n: i64) -> Result<Vec<Claimed>> {
        // A lease given back has no owner and the time it was given back
        // as its `until_ms` (see `release`); one nobody held yet has 0.
        let rows = self
            .query(
                "claim leases",
                "WITH silent AS (
                     SELECT node FROM nodes WHERE heartbeat_ms + lease_ms <= now_ms()
                     FOR UPDATE),
                 free AS (
                     SELECT l.instance,
                            CASE WHEN l.owner IS NULL AND l.until_ms > 0
                                 THEN greatest(now_ms() - l.until_ms, 0) END AS released_ago,
                            l.owner IS NOT NULL AS lapsed,
                            (SELECT r.at_ms FROM next_run r WHERE r.instance = l.instance)
                              AS next_run_ms
                     FROM lease l
                     WHERE l.owner IS NULL
                        OR (l.until_ms < now_ms()
                            AND (l.owner IN (SELECT node FROM silent)
                                 OR NOT EXISTS (SELECT 1 FROM nodes n WHERE n.node = l.owner)))
                     ORDER BY l.until_ms, l.instance
                     LIMIT $3 FOR UPDATE OF l SKIP LOCKED)
                 UPDATE lease l SET owner = $1, epoch = l.epoch + 1, until_ms = now_ms() + $2
                 FROM free WHERE l.instance = free.instance
                 RETURNING l.instance, l.epoch, hashtextextended(l.instance, l.epoch),
                           free.released_ago, free.lapsed, free.next_run_ms",
                &[&node, &lease_ms, &n],
            )
            .await;
        // The node now holds what its last renewal listed and these: so
        // must the fingerprint that `renew_changed` compares with. Left
        // as it was, a claim taken over before the next round (the node
        // silent meanwhile) would leave the count and sum as at the
        // renewal, and the node would go on believing it holds leases
        // another node polls. A claim whose outcome is unknown makes the
        // next renewal a full one.
        let mut renewals = self.renewals.lock();
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                renewals.remove(node);
                return Err(e);
            }
        };
        if let Some((count, sum)) = renewals.get_mut(node) {
            let (n, s) = fingerprint(&rows);
            *count += n;
            *sum += s;
        }
        Ok(rows
            .iter()
            .map(|r| Claimed {
                key: r.get(0),
                epoch: r.get(1),
                released_ago: r
                    .get::<_, Option<i64>>(3)
                    .map(|ms| Duration::from_millis(ms.max(0) as u64)),
                lapsed: r.get(4),
                next_run_ms: r.get(5),
            })
            .collect())
    }

    /// Gives leases back (a node shedding load for a newcomer, or
    /// stopping): the next claim by any node takes them at once.
    async fn release(&self, node: &str, keys: &[String]) -> Result<()> {
        // The node has already dropped these from what it holds. Should
        // this fail (or its outcome be unknown), the rows may still be the
        // node's, kept by its heartbeat, and an unchanged fingerprint
        // would never list them again: nobody would poll them while the
        // node lives. The next renewal is a full one, whatever happens.
        self.renewals.lock().remove(node);
        // The next holder reads when these are due next.
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.write_next_runs_of(&refs).await?;
        // Unowned, with the time they were given back (the next holder
        // learns it, see `claim`); every node hears of it and claims at
        // once rather than at its next round.
        self.query(
            "release leases",
            "WITH r AS (
                 UPDATE lease SET owner = NULL, until_ms = now_ms()
                 WHERE owner = $1 AND instance = ANY($2) RETURNING 1)
             SELECT pg_notify($3, $4) WHERE EXISTS (SELECT 1 FROM r)",
            &[&node, &keys, &&*self.channel, &Notice::Freed.encode()],
        )
        .await
        .map(drop)
    }

    /// Deletes the lease rows of `keys` (no longer configured) that no
    /// other node holds and that have no outbox entries left, and tells
    /// every node. Returns how many went, and the keys whose rows stay.
    async fn prune_leases(&self, node: &str, keys: &[String]) -> Result<(u64, BTreeSet<String>)> {
        const OP: &str = "prune leases";
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err(OP))?;
        let rows = tx
            .query(
                concat!(
                    "WITH d AS (
                     DELETE FROM lease l WHERE l.instance = ANY($1)
                       AND (l.owner IS NULL OR l.owner = $2 OR NOT ",
                    held!(),
                    ")
                       AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.instance = l.instance)
                     RETURNING l.instance)
                 SELECT l.instance, l.instance IN (SELECT instance FROM d)
                 FROM lease l WHERE l.instance = ANY($1)"
                ),
                &[&keys, &node],
            )
            .await
            .map_err(pg_err(OP))?;
        let mut pruned = 0;
        let mut kept = BTreeSet::new();
        for r in &rows {
            if r.get::<_, bool>(1) {
                pruned += 1;
            } else {
                kept.insert(r.get(0));
            }
        }
        if pruned > 0 {
            self.notify(&tx, OP, &Notice::Leases).await?;
        }
        tx.commit().await.map_err(pg_err(OP))?;
        Ok((pruned, kept))
    }

    /// The nodes, newest heartbeat first, with the leases each holds.
    async fn nodes(&self) -> Result<Vec<NodeRow>> {
        let rows = self
            .query(
                "read nodes",
                "SELECT n.node, n.started_ms, now_ms() - n.heartbeat_ms,
                        (SELECT count(*) FROM lease l WHERE l.owner = n.node
                           AND (l.until_ms > now_ms() OR n.heartbeat_ms + n.lease_ms > now_ms()))
                 FROM nodes n ORDER BY n.heartbeat_ms DESC, n.node",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| NodeRow {
                node: r.get(0),
                started_ms: r.get(1),
                heartbeat_age_ms: r.get(2),
                leases: r.get(3),
            })
            .collect())
    }

    /// Every lease.
    async fn leases(&self) -> Result<Vec<LeaseRow>> {
        let rows = self
            .query(
                "read leases",
                "SELECT l.instance, l.owner, l.epoch,
                        greatest(l.until_ms, coalesce(n.heartbeat_ms + n.lease_ms, 0)) - now_ms()
                 FROM lease l LEFT JOIN nodes n ON n.node = l.owner ORDER BY l.instance",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| LeaseRow {
                key: r.get(0),
                owner: r.get(1),
                epoch: r.get(2),
                left_ms: r.get(3),
            })
            .collect())
    }

    /// The first lapse among the leases of nodes whose heartbeat is older
    /// than `silent_ms`: the silent nodes are a handful of rows of
    /// `nodes`, their leases found through `lease_owner`, so with none
    /// silent (the usual case) no lease row is read. A lease lapses when
    /// neither its claim nor its owner's heartbeat keeps it.
    async fn next_lapse(&self, node: &str, silent_ms: i64) -> Result<Option<Duration>> {
        let rows = self
            .query(
                "next lapse",
                "SELECT min(greatest(l.until_ms, n.heartbeat_ms + n.lease_ms)) - now_ms()
                 FROM nodes n JOIN lease l ON l.owner = n.node
                 WHERE n.node <> $1 AND n.heartbeat_ms < now_ms() - $2
                   AND greatest(l.until_ms, n.heartbeat_ms + n.lease_ms) > now_ms()",
                &[&node, &silent_ms],
            )
            .await?;
        let left: Option<i64> = rows[0].get(0);
        Ok(left.map(|ms| Duration::from_millis(ms.max(0) as u64)))
    }

    /// The test of a fenced commit (`commit_poll` makes it under the lease
    /// row's lock), without the lock.
    async fn fence_holds(&self, key: &str, fence: &Fence) -> Result<bool> {
        let rows = self
            .query(
                "check fence",
                "SELECT 1 FROM lease WHERE instance = $1 AND owner = $2 AND epoch = $3",
                &[&key, &fence.owner, &fence.epoch],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    /// Books a run of slots of a quota shared through the database (see
    /// [`crate::gcra::reserve_run`]) in one statement: the row is locked (`FOR UPDATE`
    /// in the first step, so a booking that waited reads the latest
    /// value) only while the statement runs, and the database's clock is
    /// the only one used. The host's shared pause and pace (see
    /// [`Coordination::share_pace`]) hold the slot back and widen the
    /// interval. `durable`: committed with the server's
    /// `synchronous_commit` (a long-window quota) or without waiting for
    /// the disk (a host's per-second rate, where a crash losing the last
    /// few bookings costs nothing). A transaction of five statements
    /// (ensure the row, `SET LOCAL`, read, write, commit) held the row
    /// for five round trips: with every poll of a rate-limited host
    /// booking, that was most of the database's work for polls answered
    /// 304; a run of slots for the requests queued at a busy host makes it
    /// one statement for many polls. The SQL is `gcra::reserve_run`,
    /// written out (the single node calls it; the conformance suite holds
    /// both to the quota).
    async fn book(
        &self,
        key: &str,
        interval_ms: f64,
        burst: u32,
        n: u32,
        durable: bool,
    ) -> Result<Booked> {
        const SQL: &str = "WITH q AS (
                 SELECT key, tat_ms, paused_until_ms::float8 AS paused, now_ms()::float8 AS now,
                        greatest($2::float8,
                                 CASE WHEN gap_until_ms > now_ms() THEN gap_ms ELSE 0 END::float8) AS iv
                 FROM quota WHERE key = $1 FOR UPDATE),
             s AS (
                 SELECT key, tat_ms, iv, now,
                        greatest(now, tat_ms - iv * ($3::int - 1), paused) AS start
                 FROM q)
             UPDATE quota SET tat_ms = greatest(s.tat_ms, s.start) + s.iv * $4::int
             FROM s WHERE quota.key = s.key
             RETURNING s.start - s.now, s.iv";
        const OP: &str = "book quota";
        let burst = i32::try_from(burst.max(1)).unwrap_or(i32::MAX);
        let n = i32::try_from(n.max(1)).unwrap_or(i32::MAX);
        for _ in 0..2 {
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                [&key, &interval_ms, &burst, &n];
            let rows = if durable {
                self.query(OP, SQL, &params).await?
            } else {
                self.query_relaxed(OP, SQL, &params).await?
            };
            if let Some(r) = rows.first() {
                return Ok(Booked::from_ms(r.get(0), r.get(1)));
            }
            // The quota's first booking: its row, then again.
            self.exec_relaxed(
                "add quota",
                "INSERT INTO quota (key) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&key],
            )
            .await?;
        }
        Err(StoreError::Backend {
            op: OP,
            source: format!("the quota row {key} cannot be created").into(),
        })
    }

    /// Shares what one node learned of a host: a pause (`Retry-After`)
    /// and a pace (least time between requests) valid for `gap_for`. Every
    /// node applies it (see [`Coordination::paces`]), at once through `NOTIFY`.
    async fn share_pace(
        &self,
        host: &str,
        pause: Option<Duration>,
        gap: Option<(Duration, Duration)>,
    ) -> Result<()> {
        let pause_ms = pause.map_or(0, |p| p.as_millis() as i64);
        let (gap_ms, gap_for_ms) = gap.map_or((0, 0), |(g, f)| {
            (g.as_millis() as i64, f.as_millis() as i64)
        });
        let key = format!("host:{host}");
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err("share pause"))?;
        tx.execute(
            "INSERT INTO quota AS q (key, paused_until_ms, gap_ms, gap_until_ms)
             VALUES ($1, now_ms() + $2::bigint, $3::bigint,
                     CASE WHEN $3::bigint > 0 THEN now_ms() + $4::bigint ELSE 0 END)
             ON CONFLICT (key) DO UPDATE SET
                 paused_until_ms = greatest(q.paused_until_ms, EXCLUDED.paused_until_ms),
                 gap_ms = CASE WHEN $3::bigint > 0 THEN $3::bigint ELSE q.gap_ms END,
                 gap_until_ms = CASE WHEN $3::bigint > 0 THEN EXCLUDED.gap_until_ms ELSE q.gap_until_ms END",
            &[&key, &pause_ms, &gap_ms, &gap_for_ms],
        )
        .await
        .map_err(pg_err("share pause"))?;
        self.notify(&tx, "share pause", &Notice::Pace(host.to_string()))
            .await?;
        tx.commit().await.map_err(pg_err("share pause"))
    }

    /// Hosts paused or paced now, as any node shared them.
    async fn paces(&self) -> Result<Vec<HostPace>> {
        let rows = self
            .query(
                "read host pauses",
                "SELECT substr(key, 6), greatest(paused_until_ms - now_ms(), 0),
                        CASE WHEN gap_until_ms > now_ms() THEN gap_ms ELSE 0 END
                 FROM quota WHERE key LIKE 'host:%'
                   AND (paused_until_ms > now_ms() OR gap_until_ms > now_ms())",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| HostPace {
                host: r.get(0),
                paused_for: Duration::from_millis(r.get::<_, i64>(1) as u64),
                gap: Some(r.get::<_, i64>(2))
                    .filter(|g| *g > 0)
                    .map(|g| Duration::from_millis(g as u64)),
            })
            .collect())
    }

    /// Listens on this schema's channel on a connection of its own (a
    /// pooled one would be recycled, and its `LISTEN` lost): every notice
    /// goes to `tx` until the connection drops or `tx` closes. The caller
    /// listens again after an error (and rescans: notices sent while
    /// nobody listened are gone).
    async fn listen(&self, tx: tokio::sync::mpsc::Sender<Notice>) -> Result<()> {
        let (client, mut conn) = self
            .config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(pg_err("listen: connect"))?;
        let sql = format!("LISTEN \"{}\"", self.channel);
        {
            let listen = client.batch_execute(&sql);
            // The connection must be driven for LISTEN to complete.
            tokio::pin!(listen);
            loop {
                tokio::select! {
                    r = &mut listen => { r.map_err(pg_err("listen"))?; break; }
                    m = std::future::poll_fn(|cx| conn.poll_message(cx)) => match m {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(pg_err("listen")(e)),
                        None => return Err(closed()),
                    }
                }
            }
        }
        while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if let Some(notice) = Notice::decode(n.payload()) {
                        if tx.send(notice).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(pg_err("listen")(e)),
            }
        }
        drop(client);
        Err(closed())
    }
}

fn closed() -> StoreError {
    StoreError::Backend {
        op: "listen",
        source: "the connection closed".into(),
    }
}
