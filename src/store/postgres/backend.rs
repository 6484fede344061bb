//! [`PgStore`] as a [`Backend`]: the operations of the storage seam in SQL.

use super::*;

impl Backend for PgStore {
    async fn load_state(&self, instance: &str) -> Result<InstanceState> {
        self.write_next_runs_of(&[instance]).await?;
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
        self.write_next_runs().await?;
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
        self.write_next_runs().await?;
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
        self.queue_next_run(instance, next_run_ms).await
    }

    async fn remove_state(&self, instance: &str) -> Result<()> {
        self.drop_next_run(instance);
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
            let mut p = self.pending_attempts.lock();
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
        match kind {
            RecordKind::Attempt => self.write_attempts().await?,
            RecordKind::State => self.write_next_runs().await?,
            _ => {}
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
        self.write_next_runs().await?;
        self.write_attempts().await
    }
}
