use super::*;
use crate::store::Coordination;

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
        Notice::Freed,
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
        store
            .ensure_leases(&crate::store::coordination::shared(&keys))
            .await
            .unwrap();
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
        store
            .ensure_leases(&crate::store::coordination::shared(&keys))
            .await
            .unwrap();
        store
            .ensure_leases(&crate::store::coordination::shared(&keys))
            .await
            .unwrap();
        assert_eq!(store.lease_count().await.unwrap(), 4);
        // Two nodes claiming at once never take the same row.
        let (a, b) = tokio::join!(store.claim("a", 60_000, 3), store.claim("b", 60_000, 3));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.len() + b.len(), 4, "{a:?} {b:?}");
        let ka: BTreeSet<_> = a.iter().map(|x| x.key.clone()).collect();
        assert!(b.iter().all(|x| !ka.contains(&x.key)), "{a:?} {b:?}");
        assert!(a.iter().chain(&b).all(|x| x.epoch == 1), "first epoch is 1");
        // Nothing is free now.
        assert!(store.claim("c", 60_000, 4).await.unwrap().is_empty());
        let (key, epoch) = (a[0].key.clone(), a[0].epoch);
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
        assert_eq!(
            got.iter()
                .map(|c| (c.key.clone(), c.epoch))
                .collect::<Vec<_>>(),
            vec![(key.clone(), epoch + 1)]
        );
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
            .release("b", &b.iter().map(|x| x.key.clone()).collect::<Vec<_>>())
            .await
            .unwrap();
        let again = store.claim("c", 60_000, 10).await.unwrap();
        assert_eq!(again.len(), b.len());
        assert!(again.iter().all(|x| x.epoch == 2));
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

/// `renew_changed` answers "nothing changed" only when the node's leases
/// are those it was last told of. A lease claimed after a renewal and
/// taken over before the next (the node silent meanwhile: a database
/// outage) is reported lost; so is a failed release. Before, the claim
/// left the fingerprint as at the renewal: with every claimed lease
/// taken back, it matched again, and the node went on polling what
/// another node held (two nodes polled one account after an outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_taken_over_before_the_next_round_is_seen_lost() {
    if !testing::available("a_claim_taken_over_before_the_next_round_is_seen_lost").await {
        return;
    }
    let schema = testing::fresh_schema();
    let store = PgStore::open(&testing::url(), &schema).await.unwrap();
    let check = async move {
        let keys: Vec<String> = (0..3).map(|i| format!("s/{i}")).collect();
        store
            .ensure_leases(&crate::store::coordination::shared(&keys))
            .await
            .unwrap();
        store.heartbeat("a", 1, 60_000).await.unwrap();
        assert_eq!(
            store.renew_changed("a", 60_000).await.unwrap(),
            Some(vec![])
        );
        assert_eq!(store.claim("a", 60_000, 2).await.unwrap().len(), 2);
        // "a" falls silent past its lease; "b" takes everything.
        store
            .exec(
                "test",
                "UPDATE nodes SET heartbeat_ms = 0 WHERE node = 'a'",
                &[],
            )
            .await
            .unwrap();
        store
            .exec("test", "UPDATE lease SET until_ms = 0", &[])
            .await
            .unwrap();
        store.heartbeat("b", 1, 60_000).await.unwrap();
        assert_eq!(
            store.renew_changed("b", 60_000).await.unwrap(),
            Some(vec![])
        );
        assert_eq!(store.claim("b", 60_000, 3).await.unwrap().len(), 3);
        // "a" is back: it holds nothing, and is told so.
        store.heartbeat("a", 1, 60_000).await.unwrap();
        assert_eq!(
            store.renew_changed("a", 60_000).await.unwrap(),
            Some(vec![])
        );
        assert_eq!(store.renew_changed("a", 60_000).await.unwrap(), None);
        // A claim keeps the shortcut: the node knows what it claimed.
        assert_eq!(store.renew_changed("b", 60_000).await.unwrap(), None);
        // A release that fails (a key PostgreSQL refuses) leaves the rows
        // the node's: the next renewal lists them, since the node dropped
        // them from what it holds before asking.
        let refused = vec![keys[0].clone(), "bad\0key".to_string()];
        assert!(store.release("b", &refused).await.is_err());
        let listed = store.renew_changed("b", 60_000).await.unwrap();
        assert_eq!(listed.map(|l| l.len()), Some(3));
    };
    let outcome = tokio::spawn(check).await;
    testing::drop_schema(&schema);
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// A claim says when each instance is due next, as the node giving its
/// lease back stored it (written with the release, not left in that
/// node's batch): the new holder reads the states of the soonest due
/// first. An instance with no stored run says none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_says_when_each_instance_is_due_next() {
    if !testing::available("a_claim_says_when_each_instance_is_due_next").await {
        return;
    }
    let schema = testing::fresh_schema();
    let a = PgStore::open(&testing::url(), &schema).await.unwrap();
    let b = PgStore::open(&testing::url(), &schema).await.unwrap();
    let check = async move {
        let keys: Vec<String> = (0..3).map(|i| format!("s/{i}")).collect();
        a.ensure_leases(&crate::store::coordination::shared(&keys))
            .await
            .unwrap();
        a.heartbeat("a", 1, 60_000).await.unwrap();
        b.heartbeat("b", 1, 60_000).await.unwrap();
        let got = a.claim("a", 60_000, 3).await.unwrap();
        assert!(got.iter().all(|c| c.next_run_ms.is_none()), "{got:?}");
        // Queued for "a"'s next batch, not yet written.
        a.queue_next_run("s/0", 9_000).await.unwrap();
        a.queue_next_run("s/1", 4_000).await.unwrap();
        a.release("a", &keys).await.unwrap();
        let mut again: Vec<(String, Option<i64>)> = b
            .claim("b", 60_000, 3)
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.key, c.next_run_ms))
            .collect();
        again.sort();
        assert_eq!(
            again,
            vec![
                ("s/0".to_string(), Some(9_000)),
                ("s/1".to_string(), Some(4_000)),
                ("s/2".to_string(), None),
            ]
        );
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
    if !testing::available("host_bookings_keep_the_rate_across_stores_and_pauses_hold_them").await {
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
                let w = s.book("host:h", 50.0, 5, 1, false).await.unwrap().wait;
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
        let w = b.book("host:p", 10.0, 1, 1, false).await.unwrap().wait;
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
        // Written with its batch, at the latest when flushed.
        a.flush().await.unwrap();
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

/// HOT updates and dead tuples of one table, as the statistics have them.
async fn hot_updates(store: &PgStore, schema: &str, table: &str) -> (i64, i64) {
    let rows = store
        .query(
            "test",
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
             WHERE schemaname = $1 AND relname = $2",
            &[&schema, &table],
        )
        .await
        .unwrap();
    (rows[0].get(0), rows[0].get(1))
}

/// A lease renewal (every round, every lease held) and a next run
/// recorded (every poll) change no indexed column, and migration 7 leaves
/// half of each page free for the new versions: they are HOT updates (no
/// index entry, no dead tuple for vacuum to find), even when the rows
/// fill many pages. Statistics reach `pg_stat_user_tables` when a session
/// flushes them (at most every second, or when idle after 10 s): read
/// with a deadline, renewing again meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_are_hot_updates() {
    if !testing::available("renewals_are_hot_updates").await {
        return;
    }
    let schema = testing::fresh_schema();
    let store = PgStore::open(&testing::url(), &schema).await.unwrap();
    let s = schema.clone();
    let check = async move {
        let schema = s;
        let rows = store
            .query(
                "test",
                "SELECT c.relname, c.reloptions::text FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname IN ('lease', 'next_run') ORDER BY 1",
                &[&schema],
            )
            .await
            .unwrap();
        for r in &rows {
            let opts: String = r.get(1);
            assert!(opts.contains("fillfactor=50"), "{opts}");
            assert!(
                opts.contains("autovacuum_vacuum_scale_factor=0.05"),
                "{opts}"
            );
        }
        assert_eq!(rows.len(), 2);
        // Enough rows for many pages (a full page cannot take a HOT update).
        let keys: Vec<String> = (0..3_000)
            .map(|i| format!("source/instance-{i:05}"))
            .collect();
        store
            .ensure_leases(&crate::store::coordination::shared(&keys))
            .await
            .unwrap();
        assert_eq!(store.claim("a", 60_000, 3_000).await.unwrap().len(), 3_000);
        for (i, k) in keys.iter().enumerate() {
            store.set_next_run(k, i as i64).await.unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut round = 0;
        loop {
            round += 1;
            assert_eq!(store.renew("a", 60_000).await.unwrap().len(), 3_000);
            for (i, k) in keys.iter().enumerate().step_by(10) {
                store.set_next_run(k, i as i64 + round).await.unwrap();
            }
            let (lease_upd, lease_hot) = hot_updates(&store, &schema, "lease").await;
            let (run_upd, run_hot) = hot_updates(&store, &schema, "next_run").await;
            // The claim's 3,000 updates change `owner` (indexed): not HOT.
            let lease_ok = lease_upd >= 6_000 && lease_hot * 10 >= (lease_upd - 3_000) * 9;
            let run_ok = run_upd >= 300 && run_hot * 10 >= run_upd * 9;
            if lease_ok && run_ok {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "lease: {lease_hot} HOT of {lease_upd} updates; next_run: {run_hot} of {run_upd}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let outcome = tokio::spawn(check).await;
    testing::drop_schema(&schema);
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}
