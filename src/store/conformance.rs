//! The conformance suite of the storage seam: what every backend must do,
//! written once. Each check takes a [`Fixture`] (a fresh, empty store that
//! can be closed and opened again) and the `suite!` macro at the end runs
//! every check against every backend.

use std::future::Future;

use super::backup;
use super::retention;
use super::*;

/// A fresh store of one backend, and the means to reopen it (a restart).
pub trait Fixture: Sized {
    /// Whether the backend can run here (a server backend needs its
    /// server); when not, the check says it skipped and returns.
    fn available(_check: &str) -> impl Future<Output = bool> {
        async { true }
    }
    fn open() -> impl Future<Output = Self>;
    fn store(&self) -> Store;
    /// Closes the store (every clone of [`Fixture::store`] must be dropped
    /// first) and opens it again on the same data.
    fn reopen(&mut self) -> impl Future<Output = ()>;
    /// The length of an instance's state record as the backend stores it.
    fn state_record_len(&self, instance: &str) -> impl Future<Output = usize>;
    /// Writes a state record the way versions before per-id records did
    /// (sets inline); it must read back whole after [`Fixture::reopen`].
    fn write_legacy_state(&self, instance: &str, json: &str) -> impl Future<Output = ()>;
}

pub struct SledFixture {
    dir: tempfile::TempDir,
    store: Option<Store>,
}

impl Fixture for SledFixture {
    async fn open() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Some(Store::open(dir.path()).unwrap());
        SledFixture { dir, store }
    }
    fn store(&self) -> Store {
        self.store.clone().unwrap()
    }
    async fn reopen(&mut self) {
        self.store.take();
        // sled's flusher thread lets go of the directory's lock a moment
        // after the last handle drops: wait for it, with a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(self.dir.path()) {
                Ok(s) => {
                    self.store = Some(s);
                    return;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot reopen the store: {e}"),
            }
        }
    }
    async fn state_record_len(&self, instance: &str) -> usize {
        match self.store() {
            Store::Sled(s) => s.state_record_len(instance),
            Store::Postgres(_) => unreachable!(),
        }
    }
    async fn write_legacy_state(&self, instance: &str, json: &str) {
        match self.store() {
            Store::Sled(s) => s.write_legacy_state(instance, json),
            Store::Postgres(_) => unreachable!(),
        }
    }
}

/// A fresh PostgreSQL schema of its own (`pollhook_test_<random>`) on the
/// server at `POLLHOOK_TEST_DATABASE_URL`, dropped when the fixture goes.
pub struct PgFixture {
    schema: String,
    store: Option<Store>,
}

impl Fixture for PgFixture {
    async fn available(check: &str) -> bool {
        super::postgres::testing::available(check).await
    }
    async fn open() -> Self {
        let schema = super::postgres::testing::fresh_schema();
        let mut f = PgFixture {
            schema,
            store: None,
        };
        f.reopen().await;
        f
    }
    fn store(&self) -> Store {
        self.store.clone().unwrap()
    }
    /// Drops the pool (every connection) and connects again.
    async fn reopen(&mut self) {
        self.store.take();
        let url = super::postgres::testing::url();
        self.store = Some(Store::open_postgres(&url, &self.schema).await.unwrap());
    }
    async fn state_record_len(&self, instance: &str) -> usize {
        match self.store() {
            Store::Postgres(s) => s.state_record_len(instance).await,
            Store::Sled(_) => unreachable!(),
        }
    }
    async fn write_legacy_state(&self, instance: &str, json: &str) {
        match self.store() {
            Store::Postgres(s) => s.write_legacy_state(instance, json).await,
            Store::Sled(_) => unreachable!(),
        }
    }
}

impl Drop for PgFixture {
    fn drop(&mut self) {
        self.store.take();
        super::postgres::testing::drop_schema(&self.schema);
    }
}

fn entry(instance: &str, seq: u64) -> OutboxEntry {
    OutboxEntry {
        event_id: format!("msg_{instance}_{seq}"),
        instance: instance.into(),
        kind: "t".into(),
        sequence: seq,
        body: format!("{{\"n\":{seq}}}"),
        attempts: 0,
        next_attempt_ms: 0,
        created_ms: 1000 + seq as i64,
        last_error: None,
    }
}

/// An attempt at `at_ms`, to endpoint `a` or `b` by `n`'s parity (also the
/// sled history's own tests).
pub(crate) fn attempt(n: u64, at_ms: i64) -> AttemptRecord {
    AttemptRecord {
        event_id: format!("msg_{n}"),
        endpoint: if n % 2 == 0 { "a" } else { "b" }.into(),
        instance: "s/i".into(),
        kind: "t".into(),
        attempt: 1,
        at_ms,
        status: Some(200),
        latency_ms: 1,
        outcome: "delivered".into(),
        error: None,
    }
}

async fn sequences(store: &Store, endpoint: &str) -> Vec<(String, u64)> {
    store
        .outbox_page(endpoint, None, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, e)| (e.instance, e.sequence))
        .collect()
}

/// A state with `n` seen ids and `n / 10` known items of about 100 bytes.
fn big_state(n: usize) -> InstanceState {
    let mut s = InstanceState {
        initialized: true,
        cursor: Some("c1".into()),
        sequence: 7,
        ..Default::default()
    };
    for i in 0..n {
        s.seen.push_back(format!("id-{i:06}"));
        s.seen_at.push_back(1_000 + i as i64);
    }
    for i in 0..n / 10 {
        s.known.insert(
            format!("k-{i:05}"),
            KnownItem {
                version: "v1".into(),
                item: serde_json::json!({ "n": i, "pad": "x".repeat(90) }),
            },
        );
    }
    s
}

/// Seen ids and known items are records of their own: the state record
/// stays small however many there are, a poll's commit changes only the
/// ones that came, went or changed, and the state reads back whole (also
/// after a restart, in a backup, and gone with the state).
pub async fn seen_ids_and_known_items_are_records_of_their_own<F: Fixture>() {
    let mut f = F::open().await;
    let store = f.store();
    let big = big_state(5_000);
    store
        .commit_fenced("s/i", &InstanceState::default(), &big, &[], None)
        .await
        .unwrap();
    let len = f.state_record_len("s/i").await;
    assert!(len < 300, "the state record holds the sets ({len} bytes)");
    assert_eq!(store.load_state("s/i").await.unwrap(), big);
    // One id forgotten, one new; one item changed, one gone, one new.
    let mut next = big.clone();
    next.seen.pop_front();
    next.seen_at.pop_front();
    next.seen.push_back("id-new".into());
    next.seen_at.push_back(999_999);
    next.known.get_mut("k-00007").unwrap().version = "v2".into();
    next.known.remove("k-00008");
    next.known.insert(
        "k-new".into(),
        KnownItem {
            version: "v1".into(),
            item: serde_json::json!({ "new": true }),
        },
    );
    next.cursor = Some("c2".into());
    store
        .commit_fenced("s/i", &big, &next, &[("ep".into(), entry("s/i", 8))], None)
        .await
        .unwrap();
    assert_eq!(store.load_state("s/i").await.unwrap(), next);
    drop(store);
    f.reopen().await;
    let store = f.store();
    assert_eq!(store.load_state("s/i").await.unwrap(), next);
    assert_eq!(
        store.all_states().await.unwrap(),
        vec![("s/i".to_string(), next.clone())]
    );
    // A whole write replaces the sets (an import, a seeded baseline).
    let small = big_state(20);
    store.commit_poll("s/i", &small, &[]).await.unwrap();
    assert_eq!(store.load_state("s/i").await.unwrap(), small);
    store.remove_state("s/i").await.unwrap();
    assert_eq!(
        store.load_state("s/i").await.unwrap(),
        InstanceState::default()
    );
    store.commit_poll("s/i", &small, &[]).await.unwrap();
    assert_eq!(store.load_state("s/i").await.unwrap(), small);
}

/// A state written before seen ids and known items had records of their
/// own (inline, `seen_at` shorter than `seen`) reads back whole after the
/// split; the ids without a time count as seen at the split.
pub async fn states_written_before_the_split_keep_their_sets<F: Fixture>() {
    let mut f = F::open().await;
    let before = crate::now_ms();
    f.write_legacy_state(
        "s/old",
        r#"{"initialized":true,"cursor":"c","seen":["a","b","c"],"seen_at":[5,6],
            "seen_evicted":2,"known":{"x":{"version":"1","item":{"n":1}}},"sequence":3}"#,
    )
    .await;
    f.reopen().await;
    let store = f.store();
    let s = store.load_state("s/old").await.unwrap();
    let times: std::collections::BTreeMap<&str, i64> = s
        .seen
        .iter()
        .map(String::as_str)
        .zip(s.seen_at.iter().copied())
        .collect();
    assert_eq!(times.len(), 3, "{s:?}");
    assert_eq!((times["b"], times["c"]), (5, 6));
    assert!(times["a"] >= before, "{s:?}");
    assert_eq!(s.known["x"].version, "1");
    assert_eq!((s.sequence, s.seen_evicted), (3, 2));
    assert_eq!(s.cursor.as_deref(), Some("c"));
    assert!(f.state_record_len("s/old").await < 200);
}

pub async fn commit_writes_state_and_outbox_together_durably<F: Fixture>() {
    let mut f = F::open().await;
    let state = InstanceState {
        cursor: Some("c1".into()),
        initialized: true,
        sequence: 2,
        ..Default::default()
    };
    let d = vec![
        ("a".to_string(), entry("s/i", 1)),
        ("b".to_string(), entry("s/i", 1)),
        ("a".to_string(), entry("s/i", 2)),
    ];
    let keys = f.store().commit_poll("s/i", &state, &d).await.unwrap();
    assert_eq!(keys.len(), 3);
    assert_eq!(
        (keys[0].endpoint.as_str(), keys[1].endpoint.as_str()),
        ("a", "b")
    );
    assert!(keys[0].seq < keys[2].seq, "keys follow detection order");
    f.reopen().await;
    let store = f.store();
    assert_eq!(store.load_state("s/i").await.unwrap(), state);
    assert_eq!(
        sequences(&store, "a").await,
        [("s/i".into(), 1), ("s/i".into(), 2)]
    );
    assert_eq!(store.outbox_stats("b").await.unwrap(), (1, Some(1001)));
    // A prefix of another endpoint's name does not leak in.
    assert_eq!(store.outbox_stats("").await.unwrap(), (0, None));
    assert_eq!(
        store.load_state("s/never").await.unwrap(),
        InstanceState::default()
    );
}

pub async fn next_run_is_kept_apart_from_the_state<F: Fixture>() {
    let mut f = F::open().await;
    let store = f.store();
    store.set_next_run("s/new", 7).await.unwrap();
    assert_eq!(
        store.load_state("s/new").await.unwrap().next_run_ms,
        Some(7)
    );
    let state = InstanceState {
        cursor: Some("c1".into()),
        sequence: 3,
        ..Default::default()
    };
    store.commit_poll("s/i", &state, &[]).await.unwrap();
    store.set_next_run("s/i", 42).await.unwrap();
    // A commit of a state that does not know the new time keeps it.
    store.commit_poll("s/i", &state, &[]).await.unwrap();
    store.flush().await.unwrap();
    drop(store);
    f.reopen().await;
    let store = f.store();
    let want = InstanceState {
        next_run_ms: Some(42),
        ..state
    };
    assert_eq!(store.load_state("s/i").await.unwrap(), want);
    let mut keys = store.state_keys().await.unwrap();
    keys.sort();
    assert_eq!(keys, ["s/i", "s/new"]);
    store.remove_state("s/i").await.unwrap();
    assert_eq!(
        store.load_state("s/i").await.unwrap(),
        InstanceState::default()
    );
    assert_eq!(
        store.all_states().await.unwrap().len(),
        0,
        "s/new has no state"
    );
}

/// Removing a lane's head returns the lane's next head (the worker sends
/// it without reading the lane again), never an entry of another lane or
/// endpoint, and nothing once the lane is empty.
pub async fn a_delivered_head_brings_its_lanes_next_one<F: Fixture>() {
    let f = F::open().await;
    let store = f.store();
    for (inst, seq) in [("s/x", 1), ("s/y", 1), ("s/x", 2), ("s/x", 3)] {
        let st = InstanceState::default();
        store
            .commit_poll(inst, &st, &[("ep".into(), entry(inst, seq))])
            .await
            .unwrap();
    }
    let st = InstanceState::default();
    store
        .commit_poll("s/x", &st, &[("ep2".into(), entry("s/x", 9))])
        .await
        .unwrap();
    let (mut key, head) = store.outbox_head("ep", "s/x").await.unwrap().unwrap();
    assert_eq!(head.sequence, 1);
    let mut got = Vec::new();
    while let Some((k, e)) = store.delivered_next(&key).await.unwrap() {
        assert_eq!((k.endpoint.as_str(), k.instance.as_str()), ("ep", "s/x"));
        assert_eq!(store.outbox_head("ep", "s/x").await.unwrap().unwrap().0, k);
        got.push(e.sequence);
        key = k;
    }
    assert_eq!(got, [2, 3]);
    assert!(store.outbox_head("ep", "s/x").await.unwrap().is_none());
    assert_eq!(sequences(&store, "ep").await, [("s/y".to_string(), 1)]);
    assert_eq!(sequences(&store, "ep2").await, [("s/x".to_string(), 9)]);
}

pub async fn the_outbox_keeps_lanes_in_order<F: Fixture>() {
    let f = F::open().await;
    let store = f.store();
    for (inst, seq) in [("s/x", 1), ("s/y", 1), ("s/x", 2), ("s/y", 2), ("s/x", 3)] {
        let st = InstanceState::default();
        store
            .commit_poll(inst, &st, &[("ep".into(), entry(inst, seq))])
            .await
            .unwrap();
    }
    store
        .commit_poll(
            "s/z",
            &InstanceState::default(),
            &[("ep2".into(), entry("s/z", 1))],
        )
        .await
        .unwrap();
    let inst: Vec<String> = store
        .outbox_instances("ep")
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(inst, ["s/x", "s/y"]);
    let (kx, hx) = store.outbox_head("ep", "s/x").await.unwrap().unwrap();
    assert_eq!((hx.sequence, kx.instance.as_str()), (1, "s/x"));
    // Pages resume after the key given and stay within the endpoint.
    let first = store.outbox_page("ep", None, 2).await.unwrap();
    assert_eq!(first.len(), 2);
    let rest = store
        .outbox_page("ep", Some(&first[1].0), 10)
        .await
        .unwrap();
    assert_eq!(rest.len(), 3);
    let per_lane = |inst: &str| -> Vec<u64> {
        first
            .iter()
            .chain(&rest)
            .filter(|(k, _)| k.instance == inst)
            .map(|(_, e)| e.sequence)
            .collect()
    };
    assert_eq!(per_lane("s/x"), [1, 2, 3]);
    assert_eq!(per_lane("s/y"), [1, 2]);
    // A failed attempt stays at the head with its new count.
    let mut again = hx.clone();
    again.attempts = 1;
    again.next_attempt_ms = 99;
    store.reschedule(&kx, &again).await.unwrap();
    assert_eq!(
        store.outbox_head("ep", "s/x").await.unwrap().unwrap().1,
        again
    );
    // Delivered: the next one is the head.
    store.delivered(&kx).await.unwrap();
    assert_eq!(
        store
            .outbox_head("ep", "s/x")
            .await
            .unwrap()
            .unwrap()
            .1
            .sequence,
        2
    );
    assert_eq!(store.outbox_stats("ep").await.unwrap(), (4, Some(1001)));
    assert!(store.outbox_head("ep", "s/none").await.unwrap().is_none());
}

pub async fn dead_letters_move_replay_and_drop<F: Fixture>() {
    let mut f = F::open().await;
    let store = f.store();
    let keys = store
        .commit_poll(
            "s/i",
            &InstanceState::default(),
            &[("a".into(), entry("s/i", 1)), ("a".into(), entry("s/i", 2))],
        )
        .await
        .unwrap();
    let mut dead = entry("s/i", 1);
    dead.attempts = 5;
    dead.last_error = Some("500".into());
    let letter = DeadLetter {
        endpoint: "a".into(),
        entry: dead,
        dead_at_ms: 10,
    };
    store.dead_letter(&keys[0], &letter).await.unwrap();
    drop(store);
    f.reopen().await;
    let store = f.store();
    assert_eq!(store.outbox_stats("a").await.unwrap().0, 1);
    let letters = store.dead_letters(Some("a")).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].1, letter);
    assert!(store.dead_letters(Some("b")).await.unwrap().is_empty());
    // Replay: back at the end of the queue, same id and body, attempts reset.
    assert_eq!(store.replay_dead(&letters).await.unwrap(), 1);
    assert!(store.dead_letters(None).await.unwrap().is_empty());
    let q = store.outbox_page("a", None, 10).await.unwrap();
    assert_eq!(q.len(), 2);
    let back = &q[1].1;
    assert_eq!(
        (
            back.event_id.as_str(),
            back.attempts,
            back.last_error.clone()
        ),
        ("msg_s/i_1", 0, None)
    );
    assert_eq!(back.body, entry("s/i", 1).body);
    // Drop: gone for good.
    store.dead_letter(&q[0].0, &letter).await.unwrap();
    let letters = store.dead_letters(None).await.unwrap();
    let ks: Vec<EntryKey> = letters.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(store.drop_dead(&ks).await.unwrap(), 1);
    assert!(store.dead_letters(None).await.unwrap().is_empty());
}

/// 12,000 attempts, a restart, 300 more: the newest 10,000 are kept, the
/// history continues. (sled's shared id generator jumps after a reopen;
/// pruning by those ids erased the history before the restart.)
pub async fn history_keeps_the_newest_attempts_across_restarts<F: Fixture>() {
    let mut f = F::open().await;
    let store = f.store();
    for n in 0..12_000 {
        store.record_attempt(&attempt(n, n as i64)).await.unwrap();
    }
    store.flush().await.unwrap();
    drop(store);
    f.reopen().await;
    let store = f.store();
    for n in 12_000..12_300 {
        store.record_attempt(&attempt(n, n as i64)).await.unwrap();
    }
    let all = store
        .attempts(&AttemptQuery {
            limit: Some(usize::MAX),
            ..Default::default()
        })
        .await
        .unwrap();
    // Pruning runs every 100 records: at most 99 more than the bound.
    assert!(
        (ATTEMPTS_KEPT as usize..ATTEMPTS_KEPT as usize + 100).contains(&all.len()),
        "{} attempts kept",
        all.len()
    );
    assert_eq!(all[0].event_id, "msg_12299", "newest first");
    let oldest = &all[all.len() - 1];
    assert!(oldest.at_ms <= 12_300 - ATTEMPTS_KEPT as i64, "{oldest:?}");
    let ones = store
        .attempts(&AttemptQuery {
            endpoint: Some("b".into()),
            limit: Some(3),
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = ones.iter().map(|r| r.event_id.as_str()).collect();
    assert_eq!(ids, ["msg_12299", "msg_12297", "msg_12295"]);
}

pub async fn small_records_round_trip<F: Fixture>() {
    let mut f = F::open().await;
    let store = f.store();
    let mut d = Discovered::default();
    d.instances.insert("acc-1".into(), serde_json::Map::new());
    d.removed.insert("acc-0".into(), 5);
    store.save_discovered("src", &d).await.unwrap();
    assert_eq!(
        store.load_discovered("none").await.unwrap(),
        Discovered::default()
    );
    store.mark_removed("s/a", 100).await.unwrap();
    store.mark_removed("s/a", 200).await.unwrap(); // keeps the earlier time
    store.mark_removed("s/b", 300).await.unwrap();
    store.unmark_removed("s/b").await.unwrap();
    store.disable_endpoint("ep", "410 Gone").await.unwrap();
    drop(store);
    f.reopen().await;
    let store = f.store();
    assert_eq!(store.load_discovered("src").await.unwrap(), d);
    assert_eq!(store.removed().await.unwrap(), [("s/a".to_string(), 100)]);
    assert_eq!(
        store.endpoint_disabled("ep").await.unwrap().as_deref(),
        Some("410 Gone")
    );
    assert!(store.enable_endpoint("ep").await.unwrap());
    assert!(!store.enable_endpoint("ep").await.unwrap());
    assert_eq!(store.endpoint_disabled("ep").await.unwrap(), None);
    store.ping().await.unwrap();
}

pub async fn retention_forgets_what_is_old<F: Fixture>() {
    let f = F::open().await;
    let store = f.store();
    for n in 0..10 {
        store
            .record_attempt(&attempt(n, n as i64 * 100))
            .await
            .unwrap();
    }
    let keys = store
        .commit_poll(
            "s/i",
            &InstanceState::default(),
            &[("a".into(), entry("s/i", 1)), ("a".into(), entry("s/i", 2))],
        )
        .await
        .unwrap();
    for (k, at) in keys.iter().zip([100, 900]) {
        let letter = DeadLetter {
            endpoint: "a".into(),
            entry: entry("s/i", k.seq),
            dead_at_ms: at,
        };
        store.dead_letter(k, &letter).await.unwrap();
    }
    store.mark_removed("s/old", 400).await.unwrap();
    store.mark_removed("s/i", 2000).await.unwrap();
    let policy = retention::Policy {
        history: std::time::Duration::from_millis(500),
        dead_letters: Some(std::time::Duration::from_millis(500)),
    };
    let (swept, errors) = retention::sweep(&store, policy, 1000).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        swept,
        retention::Swept {
            attempts: 5,
            dead_letters: 1,
            states: vec!["s/old".into()],
        }
    );
    let left = store.attempts(&AttemptQuery::default()).await.unwrap();
    assert_eq!(left.len(), 5);
    assert_eq!(store.dead_letters(None).await.unwrap()[0].1.dead_at_ms, 900);
    assert_eq!(store.removed().await.unwrap(), [("s/i".to_string(), 2000)]);
}

pub async fn backups_round_trip_into_an_empty_store<F: Fixture>() {
    let f = F::open().await;
    let store = f.store();
    let state = InstanceState {
        cursor: Some("c".into()),
        initialized: true,
        sequence: 3,
        ..Default::default()
    };
    let keys = store
        .commit_poll(
            "s/i",
            &state,
            &[
                ("a".into(), entry("s/i", 1)),
                ("a".into(), entry("s/i", 2)),
                ("a".into(), entry("s/i", 3)),
            ],
        )
        .await
        .unwrap();
    store.set_next_run("s/i", 77).await.unwrap();
    let letter = DeadLetter {
        endpoint: "a".into(),
        entry: entry("s/i", 1),
        dead_at_ms: 5,
    };
    store.dead_letter(&keys[0], &letter).await.unwrap();
    store.record_attempt(&attempt(1, 1)).await.unwrap();
    store.mark_removed("s/gone", 9).await.unwrap();
    store.disable_endpoint("a", "why").await.unwrap();
    store
        .save_discovered("s", &Discovered::default())
        .await
        .unwrap();
    let mut out = Vec::new();
    let n = backup::export(&store, &mut out).await.unwrap();
    assert_eq!(n, 8);
    let text = String::from_utf8(out.clone()).unwrap();
    let state_line = text.lines().position(|l| l.contains("\"tree\":\"state\""));
    let outbox_line = text.lines().position(|l| l.contains("\"tree\":\"outbox\""));
    assert!(state_line < outbox_line, "state before the outbox:\n{text}");
    // Into a non-empty store: refused, nothing written.
    let e = backup::import(&store, out.as_slice(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotEmpty { .. }), "{e}");

    let g = F::open().await;
    let copy = g.store();
    assert_eq!(
        backup::import(&copy, out.as_slice(), None).await.unwrap(),
        8
    );
    assert_eq!(
        copy.load_state("s/i").await.unwrap(),
        InstanceState {
            next_run_ms: Some(77),
            ..state
        }
    );
    assert_eq!(
        sequences(&copy, "a").await,
        [("s/i".into(), 2), ("s/i".into(), 3)]
    );
    assert_eq!(copy.dead_letters(None).await.unwrap()[0].1, letter);
    assert_eq!(
        copy.attempts(&AttemptQuery::default()).await.unwrap().len(),
        1
    );
    assert_eq!(copy.removed().await.unwrap(), [("s/gone".to_string(), 9)]);
    assert_eq!(
        copy.endpoint_disabled("a").await.unwrap().as_deref(),
        Some("why")
    );
    // The copy exports the same records.
    let mut again = Vec::new();
    backup::export(&copy, &mut again).await.unwrap();
    let body = |t: &str| t.lines().skip(1).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(body(&String::from_utf8(again).unwrap()), body(&text));
}

/// A stored quota gives what it allows and remembers what it gave across
/// a reopen: `1/1h` taken once, then (after a restart) refused with about
/// an hour to wait, and asking again takes nothing more.
pub async fn stored_quotas_survive_a_reopen<F: Fixture>() {
    let mut f = F::open().await;
    let store = f.store();
    let hour = 3_600_000.0;
    assert_eq!(store.take_quota("rate:s/i", hour, 1).await.unwrap(), None);
    // Another key is another quota.
    assert_eq!(store.take_quota("rate:s/j", hour, 1).await.unwrap(), None);
    drop(store);
    f.reopen().await;
    let store = f.store();
    let near_an_hour =
        |d: Option<std::time::Duration>| d.is_some_and(|d| (d.as_secs_f64() - 3600.0).abs() < 60.0);
    let wait = store.take_quota("rate:s/i", hour, 1).await.unwrap();
    assert!(near_an_hour(wait), "{wait:?}");
    let again = store.take_quota("rate:s/i", hour, 1).await.unwrap();
    assert!(near_an_hour(again), "asking took nothing: {again:?}");
    // A burst lets that many go at once.
    for _ in 0..3 {
        assert_eq!(store.take_quota("rate:burst", hour, 3).await.unwrap(), None);
    }
    let wait = store.take_quota("rate:burst", hour, 3).await.unwrap();
    assert!(near_an_hour(wait), "{wait:?}");
}

/// Entries queued without a state (operational events) go at the end of
/// their lane, in order, and survive a reopen.
pub async fn queued_entries_join_their_lane_in_order<F: Fixture>() {
    let mut f = F::open().await;
    let store = f.store();
    let e = |n: u64| OutboxEntry {
        event_id: format!("msg_ops_{n}"),
        instance: "pollhook/ops".into(),
        kind: "pollhook.instance.failing".into(),
        sequence: n,
        body: "{}".into(),
        attempts: 0,
        next_attempt_ms: 0,
        created_ms: n as i64,
        last_error: None,
    };
    store
        .enqueue(&[("ops".into(), e(1)), ("other".into(), e(1))])
        .await
        .unwrap();
    store.enqueue(&[("ops".into(), e(2))]).await.unwrap();
    drop(store);
    f.reopen().await;
    let store = f.store();
    let page = store.outbox_page("ops", None, 10).await.unwrap();
    let seqs: Vec<u64> = page.iter().map(|(_, e)| e.sequence).collect();
    assert_eq!(seqs, [1, 2]);
    assert!(page.iter().all(|(k, _)| k.instance == "pollhook/ops"));
    let head = store
        .outbox_head("ops", "pollhook/ops")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head.1.event_id, "msg_ops_1");
    assert_eq!(store.outbox_stats("other").await.unwrap().0, 1);
}

/// One depth limit for the store and its backups (issue 19: an item 127
/// deep was stored but not read back, which stopped the daemon and the
/// export; one 125 deep was read back but its backup not imported). A
/// snapshot and a known item at [`MAX_DEPTH`] are written, read back after
/// a reopen, exported and imported; one level more is refused before
/// anything is written, as the failure of that write alone.
pub async fn values_at_the_depth_limit_round_trip_and_deeper_are_refused<F: Fixture>() {
    let nested = |n: usize| {
        (0..n).fold(
            serde_json::Value::from(1),
            |v, _| serde_json::json!({ "a": v }),
        )
    };
    let state = |n: usize| InstanceState {
        initialized: true,
        snapshot: Some(crate::store::Snapshot::of(&nested(n))),
        known: [(
            "deep".to_string(),
            KnownItem {
                version: "1".into(),
                item: nested(n),
            },
        )]
        .into(),
        ..Default::default()
    };
    let mut f = F::open().await;
    let store = f.store();
    let at_limit = state(MAX_DEPTH);
    let below = state(MAX_DEPTH - 1);
    store
        .commit_fenced("s/below", &InstanceState::default(), &below, &[], None)
        .await
        .unwrap();
    store
        .commit_fenced(
            "s/deep",
            &InstanceState::default(),
            &at_limit,
            &[("a".into(), entry("s/deep", 1))],
            None,
        )
        .await
        .unwrap();
    for over in [
        InstanceState {
            known: Default::default(),
            ..state(MAX_DEPTH + 1)
        },
        InstanceState {
            snapshot: None,
            ..state(MAX_DEPTH + 1)
        },
    ] {
        let e = store
            .commit_fenced(
                "s/over",
                &InstanceState::default(),
                &over,
                &[("a".into(), entry("s/over", 1))],
                None,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Refused { .. }), "{e}");
        assert!(e.to_string().contains("s/over"), "{e}");
        let e = store.commit_poll("s/over", &over, &[]).await.unwrap_err();
        assert!(matches!(e, StoreError::Refused { .. }), "{e}");
    }
    drop(store);
    f.reopen().await;
    let store = f.store();
    assert_eq!(store.load_state("s/deep").await.unwrap(), at_limit);
    assert_eq!(store.load_state("s/below").await.unwrap(), below);
    assert_eq!(
        store.load_state("s/over").await.unwrap(),
        InstanceState::default(),
        "nothing of a refused commit was written"
    );
    assert_eq!(sequences(&store, "a").await, [("s/deep".to_string(), 1)]);
    let mut out = Vec::new();
    backup::export(&store, &mut out).await.unwrap();
    let g = F::open().await;
    let copy = g.store();
    backup::import(&copy, out.as_slice(), None).await.unwrap();
    assert_eq!(copy.load_state("s/deep").await.unwrap(), at_limit);
    assert_eq!(copy.load_state("s/below").await.unwrap(), below);
}

/// Ids and values that come from upstream, as hostile as they come: a
/// NUL, control characters, 64 KiB, every plane of Unicode, values nested
/// deep. Both backends take them, give them back as written (after a
/// restart, changed and removed as deltas, in a backup), and agree.
pub async fn hostile_ids_and_values_round_trip<F: Fixture>() {
    let mut f = F::open().await;
    let store = f.store();
    let long = "x".repeat(64 * 1024);
    let ids: Vec<String> = vec![
        "a\0b".into(),
        "\0".into(),
        "\u{1}\u{7}\u{1b}[31m\r\n\t\u{7f}".into(),
        format!("{long}-1"),
        format!("{long}-2"),
        "y".repeat(3_000),
        "é ü \u{10FFFF} 🎉 \u{202e}".into(),
        " ".into(),
    ];
    // As deep as the store takes a value ([`MAX_DEPTH`]): the known item
    // holds it one level down.
    let mut deep = serde_json::json!("\0 bottom");
    for _ in 0..MAX_DEPTH - 1 {
        deep = serde_json::json!([deep]);
    }
    let mut s = InstanceState {
        initialized: true,
        cursor: Some(format!("\0{long}")),
        etag: Some("\"\u{1}\"".into()),
        snapshot: Some(crate::store::Snapshot::of(&deep)),
        sequence: 1,
        ..Default::default()
    };
    for (n, id) in ids.iter().enumerate() {
        s.seen.push_back(id.clone());
        s.seen_at.push_back(n as i64);
        s.known.insert(
            id.clone(),
            KnownItem {
                version: format!("v\0{n}"),
                item: serde_json::json!({ "id": id, "deep": deep, "text": long }),
            },
        );
    }
    let mut e = entry("s/i", 1);
    e.body = serde_json::json!({ "data": format!("\0{long}\u{1b}") }).to_string();
    e.last_error = Some("\0\r\nerror".into());
    store
        .commit_fenced(
            "s/i",
            &InstanceState::default(),
            &s,
            &[("ep".into(), e.clone())],
            None,
        )
        .await
        .unwrap();
    assert_eq!(store.load_state("s/i").await.unwrap(), s);
    // Changed as deltas: two ids go, one comes, one item changes.
    let mut next = s.clone();
    next.seen.retain(|id| id != "\0" && !id.ends_with("-1"));
    next.seen_at = (0..next.seen.len() as i64).collect();
    next.seen.push_back("new\0".into());
    next.seen_at.push_back(99);
    next.known.remove("a\0b");
    next.known.get_mut(&format!("{long}-2")).unwrap().version = "v\0changed".into();
    next.sequence = 2;
    store
        .commit_fenced("s/i", &s, &next, &[], None)
        .await
        .unwrap();
    let mut letter_entry = e.clone();
    letter_entry.sequence = 2;
    letter_entry.event_id = "msg_s/i_2".into();
    store
        .enqueue(&[("ep".into(), letter_entry.clone())])
        .await
        .unwrap();
    let mut a = attempt(1, 1);
    a.error = Some(format!("\0{long}"));
    store.record_attempt(&a).await.unwrap();
    store
        .disable_endpoint("ep2", "410 Gone: \0\u{1b}[2J")
        .await
        .unwrap();
    store
        .save_credential("oauth2-refresh:k", "tok\0en\u{7f}")
        .await
        .unwrap();
    let mut d = Discovered::default();
    d.instances.insert(
        "acc".into(),
        serde_json::Map::from_iter([("p".to_string(), serde_json::json!("\0"))]),
    );
    store.save_discovered("src", &d).await.unwrap();
    store.flush().await.unwrap();
    drop(store);
    f.reopen().await;
    let store = f.store();
    assert_eq!(store.load_state("s/i").await.unwrap(), next);
    assert_eq!(
        store.all_states().await.unwrap(),
        vec![("s/i".to_string(), next.clone())]
    );
    let head = store.outbox_head("ep", "s/i").await.unwrap().unwrap();
    assert_eq!(head.1, e);
    assert_eq!(
        store.attempts(&AttemptQuery::default()).await.unwrap(),
        [a.clone()]
    );
    assert_eq!(
        store.endpoint_disabled("ep2").await.unwrap().as_deref(),
        Some("410 Gone: \0\u{1b}[2J")
    );
    assert_eq!(
        store
            .load_credential("oauth2-refresh:k")
            .await
            .unwrap()
            .as_deref(),
        Some("tok\0en\u{7f}")
    );
    assert_eq!(store.load_discovered("src").await.unwrap(), d);
    // An export cursor is bytes: one that is not UTF-8 (past every
    // name here) reads an empty page, not an error.
    let page = store
        .export_page(RecordKind::State, Some(b"s/\xff".to_vec()), 10)
        .await
        .unwrap();
    assert!(page.records.is_empty() && page.next.is_none());
    // A backup carries them into another store of the same backend.
    let mut out = Vec::new();
    backup::export(&store, &mut out).await.unwrap();
    let g = F::open().await;
    let copy = g.store();
    backup::import(&copy, out.as_slice(), None).await.unwrap();
    assert_eq!(copy.load_state("s/i").await.unwrap(), next);
    assert_eq!(
        copy.outbox_page("ep", None, usize::MAX)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, e)| e)
            .collect::<Vec<_>>(),
        [e, letter_entry]
    );
    // Gone with the state.
    store.remove_state("s/i").await.unwrap();
    assert_eq!(
        store.load_state("s/i").await.unwrap(),
        InstanceState::default()
    );
}

/// Names are bounded ([`MAX_NAME_BYTES`]) and hold no NUL: another
/// instance name is refused by every backend alike, with an error naming
/// it (cut short), and nothing of it is written; the other instances are
/// untouched.
pub async fn an_overlong_instance_name_is_refused_alike<F: Fixture>() {
    let f = F::open().await;
    let store = f.store();
    let name = format!("s/{}", "n".repeat(9_000));
    let s = InstanceState {
        initialized: true,
        sequence: 1,
        ..Default::default()
    };
    let e = store
        .commit_fenced(
            "s/ok",
            &InstanceState::default(),
            &s,
            &[("ep".into(), entry("s/ok", 1))],
            None,
        )
        .await;
    e.unwrap();
    for r in [
        store
            .commit_fenced(
                &name,
                &InstanceState::default(),
                &s,
                &[("ep".into(), entry(&name, 1))],
                None,
            )
            .await
            .map(drop),
        store.commit_poll(&name, &s, &[]).await.map(drop),
        store.set_next_run(&name, 5).await,
        store.mark_removed(&name, 5).await,
    ] {
        let e = r.unwrap_err();
        assert!(matches!(e, StoreError::BadName { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("s/nnnn") && text.contains("9002 bytes"),
            "{text}"
        );
        assert!(text.len() < 400, "{text}");
    }
    // A NUL would run into the next part of a key: refused alike too.
    let e = store
        .commit_fenced("s/a\0b", &InstanceState::default(), &s, &[], None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("s/a\\0b"), "{e}");
    assert!(e.to_string().contains("NUL"), "{e}");
    assert_eq!(store.state_keys().await.unwrap(), ["s/ok"]);
    assert_eq!(store.outbox_stats("ep").await.unwrap().0, 1);
    assert!(store.removed().await.unwrap().is_empty());
}

/// Runs every check against one backend's fixture.
macro_rules! suite {
    ($backend:ident, $fixture:ty) => {
        mod $backend {
            suite!(@checks $fixture;
                commit_writes_state_and_outbox_together_durably,
                next_run_is_kept_apart_from_the_state,
                the_outbox_keeps_lanes_in_order,
                dead_letters_move_replay_and_drop,
                history_keeps_the_newest_attempts_across_restarts,
                small_records_round_trip,
                retention_forgets_what_is_old,
                backups_round_trip_into_an_empty_store,
                stored_quotas_survive_a_reopen,
                queued_entries_join_their_lane_in_order,
                seen_ids_and_known_items_are_records_of_their_own,
                a_delivered_head_brings_its_lanes_next_one,
                states_written_before_the_split_keep_their_sets,
                values_at_the_depth_limit_round_trip_and_deeper_are_refused,
                hostile_ids_and_values_round_trip,
                an_overlong_instance_name_is_refused_alike
            );
        }
    };
    (@checks $fixture:ty; $($check:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                use super::Fixture as _;
                if !<$fixture>::available(stringify!($check)).await {
                    return;
                }
                super::$check::<$fixture>().await;
            }
        )*
    };
}

suite!(sled, super::SledFixture);
suite!(postgres, super::PgFixture);
