//! Unit tests of `sled` (kept apart so the module reads as one room).

use super::*;

/// Opens the store at `dir` right after a raw `sled::Db` there was
/// dropped. sled's flusher thread lets go of the directory's lock a
/// moment after the last handle drops (it failed CI once opened at
/// once), so this waits for the lock, with a deadline.
fn open_after_raw(dir: &std::path::Path) -> SledStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match SledStore::open(dir) {
            Ok(s) => return s,
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("cannot open the store after the raw handle: {e}"),
        }
    }
}

#[test]
fn a_store_open_elsewhere_is_locked_and_said_so() {
    let dir = tempfile::tempdir().unwrap();
    let _held = SledStore::open(dir.path()).unwrap();
    let e = SledStore::open(dir.path()).err().expect("opened twice");
    assert!(matches!(e, StoreError::Locked { .. }), "{e}");
    assert!(e.to_string().contains("a running daemon"), "{e}");
}

/// The cache follows the fleet between 1 and 8 MiB, and is full when the
/// fleet is not known.
#[test]
fn the_cache_follows_the_fleet_within_its_bounds() {
    const MIB: u64 = 1024 * 1024;
    assert_eq!(cache_for(None), 8 * MIB);
    assert_eq!(cache_for(Some(0)), MIB);
    assert_eq!(cache_for(Some(50)), MIB);
    assert_eq!(cache_for(Some(20_000)), 20_000 * 84);
    assert_eq!(cache_for(Some(100_000)), 8 * MIB);
    assert_eq!(cache_for(Some(usize::MAX)), 8 * MIB);
}

#[test]
fn keys_round_trip_and_sort_by_lane_then_detection() {
    let k = |i: &str, seq| EntryKey {
        endpoint: "ep".into(),
        instance: i.into(),
        seq,
    };
    for key in [k("s/a", 1), k("s/a\0b", u64::MAX), k("", 0)] {
        assert_eq!(parse_key(&key_bytes(&key)).unwrap(), key);
    }
    assert!(key_bytes(&k("s/a", 9)) < key_bytes(&k("s/a", 10)));
    assert!(key_bytes(&k("s/a", u64::MAX)) < key_bytes(&k("s/b", 0)));
    assert!(parse_key(b"ep\0short").is_err());
}

#[test]
fn outboxes_of_the_old_key_format_are_migrated_in_order() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        let t = db.open_tree("outbox").unwrap();
        for (id, seq) in [(7u64, 1u64), (9, 2)] {
            let mut k = b"ep\0".to_vec();
            k.extend_from_slice(&id.to_be_bytes());
            let e = OutboxEntry {
                event_id: format!("msg_{seq}"),
                instance: "s/i".into(),
                kind: "t".into(),
                sequence: seq,
                body: "{}".into(),
                attempts: 0,
                next_attempt_ms: 0,
                created_ms: 0,
                last_error: None,
            };
            t.insert(k, encode(&e)).unwrap();
        }
        db.flush().unwrap();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = open_after_raw(dir.path());
        let (_, head) = store.outbox_head("ep", "s/i").await.unwrap().unwrap();
        assert_eq!(head.sequence, 1);
        let inst: Vec<String> = store
            .outbox_instances("ep")
            .await
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(inst, ["s/i"]);
        assert_eq!(store.outbox_stats("ep").await.unwrap().0, 2);
    });
}

/// A history kept in the `attempts` tree (before it had its own log)
/// moves into the log, its newest [`ATTEMPTS_KEPT`] in order, and the tree
/// is dropped; new attempts follow it.
#[test]
fn a_history_in_the_old_tree_moves_into_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let rec = |n: u64| crate::store::conformance::attempt(n, n as i64);
    let old = ATTEMPTS_KEPT + 5;
    {
        let db = sled::open(dir.path()).unwrap();
        let t = db.open_tree("attempts").unwrap();
        for n in 1..=old {
            t.insert(n.to_be_bytes(), encode(&rec(n))).unwrap();
        }
        db.flush().unwrap();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let all = AttemptQuery {
        limit: Some(usize::MAX),
        ..Default::default()
    };
    rt.block_on(async {
        let store = open_after_raw(dir.path());
        store.record_attempt(&rec(old + 1)).await.unwrap();
        let shown = store.attempts(&all).await.unwrap();
        assert_eq!(shown.len(), ATTEMPTS_KEPT as usize);
        assert_eq!(shown[0].event_id, format!("msg_{}", old + 1));
        assert_eq!(shown[1].event_id, format!("msg_{old}"));
        assert_eq!(shown.last().unwrap().at_ms, 7);
        // The tree is gone (checked on this handle: a second open of the
        // directory races sled's flusher for its lock; the log's own
        // reopen is `history::tests`).
        assert!(!store
            .db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == b"attempts"));
    });
}

/// 10,000 instances committing their first poll at once on a 2-worker
/// runtime (the daemon's shape on a 2-core machine) must all finish.
/// With sled's `flush_async` per commit this froze (see `GroupFlush`).
/// Run on its own thread so a stall fails the test instead of hanging it.
#[test]
fn ten_thousand_concurrent_commits_do_not_stall() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..10_000 {
                let s = store.clone();
                set.spawn(async move {
                    let key = format!("src/acc-{i}");
                    s.set_next_run(&key, 1).await.unwrap();
                    let state = InstanceState {
                        initialized: true,
                        ..Default::default()
                    };
                    s.commit_poll(&key, &StateWrite::whole(&state, 0), &[], None)
                        .await
                        .unwrap();
                });
            }
            while set.join_next().await.is_some() {}
        });
        let _ = done.send(());
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("10,000 concurrent commits stalled");
}
