//! What PostgreSQL itself spends during a bench run: its processes' CPU,
//! transactions, statements and WAL, and the schema's tables at the end.
//! The server is usually shared (tests of other checkouts may run on it),
//! so every counter here is the whole server's or database's, not only the
//! bench's: a quiet server gives the bench's own cost.

use super::BenchStore;

/// Server-wide counters at one moment; two of them give the run's deltas.
#[derive(Clone, Copy, Debug, Default)]
pub struct PgCounters {
    /// CPU seconds of every `postgres` process (utime + stime), plus what
    /// its exited children (backends of closed connections) left in the
    /// postmaster's cutime + cstime.
    pub cpu_s: f64,
    /// `xact_commit + xact_rollback` of the database.
    pub xacts: u64,
    /// Executions recorded by `pg_stat_statements` in the database, when
    /// the extension is loaded (`shared_preload_libraries`) and created.
    pub statements: Option<u64>,
    /// `pg_current_wal_lsn()` as a byte position.
    pub wal_bytes: u64,
}

/// One table of the bench's schema at the end of a run.
#[derive(Clone, Debug)]
pub struct TableStat {
    pub name: String,
    /// `pg_table_size` (heap, TOAST, free space and visibility maps).
    pub table_bytes: u64,
    pub index_bytes: u64,
    pub live_tuples: u64,
    pub dead_tuples: u64,
    /// `n_tup_upd` and `n_tup_hot_upd` (since the schema was made: the
    /// bench's own schema): how many updates were heap-only, leaving no
    /// index entry and a dead version pruned within its page.
    pub updates: u64,
    pub hot_updates: u64,
}

/// The deltas between two [`PgCounters`], per poll where that helps.
#[derive(Clone, Copy, Debug)]
pub struct PgRun {
    /// PostgreSQL's CPU as a share of one core over `wall` seconds.
    pub cpu_share: f64,
    pub xacts: u64,
    pub statements: Option<u64>,
    pub wal_bytes: u64,
    pub polls: u64,
}

impl PgRun {
    pub fn between(a: &PgCounters, b: &PgCounters, wall: f64, polls: u64) -> PgRun {
        PgRun {
            cpu_share: (b.cpu_s - a.cpu_s).max(0.0) / wall.max(1e-9),
            xacts: b.xacts.saturating_sub(a.xacts),
            statements: a
                .statements
                .zip(b.statements)
                .map(|(a, b)| b.saturating_sub(a)),
            wal_bytes: b.wal_bytes.saturating_sub(a.wal_bytes),
            polls,
        }
    }

    fn per_poll(&self, v: u64) -> f64 {
        v as f64 / self.polls.max(1) as f64
    }

    /// The line the scale bench prints.
    pub fn line(&self) -> String {
        format!(
            "  PostgreSQL itself: {:.1}% of one core (every postgres process), per poll {:.2} transactions, {} statements, {:.0} WAL bytes ({} polls; {} transactions, {:.1} MiB WAL in the window, the whole server's)",
            self.cpu_share * 100.0,
            self.per_poll(self.xacts),
            match self.statements {
                Some(s) => format!("{:.2}", self.per_poll(s)),
                None => "n/a (pg_stat_statements not loaded)".to_string(),
            },
            self.per_poll(self.wal_bytes),
            self.polls,
            self.xacts,
            self.wal_bytes as f64 / (1024.0 * 1024.0),
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "cpu_pct_of_one_core": self.cpu_share * 100.0,
            "transactions": self.xacts,
            "transactions_per_poll": self.per_poll(self.xacts),
            "statements": self.statements,
            "statements_per_poll": self.statements.map(|s| self.per_poll(s)),
            "wal_bytes": self.wal_bytes,
            "wal_bytes_per_poll": self.per_poll(self.wal_bytes),
            "polls": self.polls,
        })
    }
}

/// The `/proc/<pid>/stat` fields after the command name, or `None` when the
/// process is gone or not PostgreSQL's.
fn postgres_stat(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, tail) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1;
    if comm != "postgres" {
        return None;
    }
    Some(tail.split_whitespace().map(str::to_string).collect())
}

/// CPU seconds of every `postgres` process on this machine (see
/// [`PgCounters::cpu_s`]). Each live process counts its own time; a
/// backend that exited counts through its parent's cutime/cstime, which
/// covers closed connections without counting a live one twice.
pub fn postgres_cpu_s() -> f64 {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut ticks = 0.0;
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Some(f) = postgres_stat(pid) else {
            continue;
        };
        // After ')': 0 state, 11 utime, 12 stime, 13 cutime, 14 cstime.
        let at = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        ticks += at(11) + at(12) + at(13) + at(14);
    }
    ticks / 100.0
}

impl BenchStore {
    /// Runs `sql` with `psql -At`; `None` when psql reports an error (a
    /// missing extension, say).
    fn try_psql(&self, sql: &str) -> Option<String> {
        let out = std::process::Command::new("psql")
            .arg(&self.url)
            .args(["-v", "ON_ERROR_STOP=1", "-Atc", sql])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The server's counters now; `None` when psql fails (a server out of
    /// connections, say), so a run reports "n/a" rather than zeros.
    pub fn counters(&self) -> Option<PgCounters> {
        let row = self.try_psql(
            "SELECT xact_commit + xact_rollback, \
             pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint \
             FROM pg_stat_database WHERE datname = current_database()",
        )?;
        let mut cols = row.split('|').map(|v| v.parse::<u64>().unwrap_or(0));
        let xacts = cols.next().unwrap_or(0);
        let wal_bytes = cols.next().unwrap_or(0);
        let statements = self
            .try_psql(
                "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .and_then(|v| v.parse().ok());
        Some(PgCounters {
            cpu_s: postgres_cpu_s(),
            xacts,
            statements,
            wal_bytes,
        })
    }

    /// The schema's tables: sizes, live and dead tuples (the statistics
    /// collector's view, which lags by up to a second or so).
    pub fn tables(&self) -> Vec<TableStat> {
        let rows = self
            .try_psql(&format!(
                "SELECT relname, pg_table_size(relid), pg_indexes_size(relid), n_live_tup, n_dead_tup, \
                 n_tup_upd, n_tup_hot_upd \
                 FROM pg_stat_user_tables WHERE schemaname = '{}' ORDER BY relname",
                self.schema
            ))
            .unwrap_or_default();
        rows.lines()
            .filter_map(|l| {
                let c: Vec<&str> = l.split('|').collect();
                let n = |i: usize| c.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
                (c.len() == 7).then(|| TableStat {
                    name: c[0].to_string(),
                    table_bytes: n(1),
                    index_bytes: n(2),
                    live_tuples: n(3),
                    dead_tuples: n(4),
                    updates: n(5),
                    hot_updates: n(6),
                })
            })
            .collect()
    }
}

/// The line the scale bench prints for the schema's tables.
pub fn tables_line(tables: &[TableStat]) -> String {
    let kib = |b: u64| b as f64 / 1024.0;
    format!(
        "  PostgreSQL tables at the end (table KiB / index KiB / live / dead tuples): {}",
        tables
            .iter()
            .map(|t| format!(
                "{} {:.0}/{:.0}/{}/{}",
                t.name,
                kib(t.table_bytes),
                kib(t.index_bytes),
                t.live_tuples,
                t.dead_tuples
            ))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The line the scale bench prints beside [`tables_line`] for the
/// tables every round and every poll update (the leases' renewals, the
/// next run times): how many of their updates were HOT, and the dead
/// tuples left for vacuum (migration 7's fillfactor and autovacuum).
pub fn hot_line(tables: &[TableStat]) -> String {
    format!(
        "  PostgreSQL HOT updates (HOT / all updates, dead tuples at the end): {}",
        tables
            .iter()
            .filter(|t| t.name == "lease" || t.name == "next_run")
            .map(|t| format!(
                "{} {}/{} HOT, {} dead",
                t.name, t.hot_updates, t.updates, t.dead_tuples
            ))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

pub fn tables_json(tables: &[TableStat]) -> serde_json::Value {
    tables
        .iter()
        .map(|t| {
            serde_json::json!({
                "table": t.name,
                "table_bytes": t.table_bytes,
                "index_bytes": t.index_bytes,
                "live_tuples": t.live_tuples,
                "dead_tuples": t.dead_tuples,
                "updates": t.updates,
                "hot_updates": t.hot_updates,
            })
        })
        .collect()
}
