//! What comes from upstream never stops more than itself, and the lease
//! table keeps only what is configured: a discovered name too long to be
//! a key, item ids no PostgreSQL `text` index takes (a NUL, 3,000 bytes),
//! lease rows of removed instances, and a node giving back leases that are
//! busy (a long poll, a slow delivery).
//!
//! Needs PostgreSQL (see `postgres.rs`); each test uses a schema of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::postgres::{connect, url, Schema};
use crate::support::*;

/// An upstream of accounts, each a list of item ids; requests of the
/// items wait `delay` (a long poll) and are counted.
#[derive(Default)]
struct Upstream {
    accounts: Mutex<BTreeMap<String, Vec<String>>>,
    delay: Mutex<Duration>,
    polls: AtomicU64,
    in_flight: Mutex<BTreeMap<String, u32>>,
    overlaps: AtomicU64,
}

async fn listing(State(u): State<Arc<Upstream>>) -> Json<Value> {
    let names: Vec<Value> = u
        .accounts
        .lock()
        .unwrap()
        .keys()
        .map(|a| json!({ "name": a }))
        .collect();
    Json(json!({ "accounts": names }))
}

async fn items(State(u): State<Arc<Upstream>>, Path(acc): Path<String>) -> Json<Value> {
    {
        let mut f = u.in_flight.lock().unwrap();
        let n = f.entry(acc.clone()).or_default();
        if *n > 0 {
            u.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        *n += 1;
    }
    u.polls.fetch_add(1, Ordering::SeqCst);
    let delay = *u.delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    *u.in_flight.lock().unwrap().get_mut(&acc).unwrap() -= 1;
    let ids = u
        .accounts
        .lock()
        .unwrap()
        .get(&acc)
        .cloned()
        .unwrap_or_default();
    let list: Vec<Value> = ids
        .iter()
        .map(|id| json!({ "id": id, "account": acc }))
        .collect();
    Json(json!({ "items": list }))
}

async fn start_upstream() -> (Arc<Upstream>, SocketAddr) {
    let u = Arc::new(Upstream::default());
    let app = Router::new()
        .route("/acc", get(listing))
        .route("/acc/{acc}/items", get(items))
        .with_state(u.clone());
    (u, serve(app).await)
}

const CONNECTOR: &str = r#"
name: items
params:
  base_url: { required: true }
  account: { required: true }
request:
  url: "{{ base_url }}/acc/{{ account }}/items"
  timeout: 60s
items: "$.items[*]"
id: "{{ item.id }}"
detect: new
baseline: emit
emit:
  - type: item.created
"#;

fn discovering_connector() -> String {
    format!(
        "{CONNECTOR}discover:\n  request: {{ url: \"{{{{ base_url }}}}/acc\" }}\n  items: \"$.accounts[*]\"\n  name: \"{{{{ item.name }}}}\"\n  with: {{ account: \"{{{{ item.name }}}}\" }}\n  schedule: every 1s\n"
    )
}

/// A bridge on the PostgreSQL store (`store` is the store line) with one
/// source `src` of `for_each` (a YAML value).
fn bridge(addr: SocketAddr, store: &str, for_each: &str, rx: &Receiver) -> String {
    format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
{store}
sources:
  src:
    connector: items
    with: {{ base_url: "http://{addr}" }}
    for_each: {for_each}
    schedule: every 200ms
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{}", secret: {} }}
"#,
        rx.url,
        secret()
    )
}

fn pg_store(schema: &Schema) -> String {
    format!(
        "store: {{ backend: postgres, url: \"{}\", schema: {}, lease: 3s }}",
        url(),
        schema.0
    )
}

/// The item ids delivered (verified), each once per webhook-id.
fn delivered_items(rx: &Receiver) -> BTreeSet<String> {
    rx.accepted()
        .iter()
        .filter(|d| d.verified)
        .filter_map(|d| d.body["data"]["id"].as_str().map(str::to_string))
        .collect()
}

/// The lease rows of the test's schema: key → owner.
async fn leases(db: &tokio_postgres::Client, schema: &Schema) -> BTreeMap<String, Option<String>> {
    db.query(
        &format!("SELECT instance, owner FROM \"{}\".lease", schema.0),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// A discovered name of 9,000 characters is refused, that item alone, by
/// name (its start); every node keeps its leases, and every other
/// instance is polled and delivered, including one discovered after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_discovered_name_is_refused_and_every_other_instance_runs() {
    let Some(db) = connect().await else {
        return;
    };
    let schema = Schema::fresh();
    let (up, addr) = start_upstream().await;
    // Random letters: a repeated one would compress into an index entry.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let long: String = "LONG"
        .chars()
        .chain((0..8_996).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'a' + (x % 26) as u8) as char
        }))
        .collect();
    {
        let mut a = up.accounts.lock().unwrap();
        a.insert("a1".into(), vec!["a1-1".into()]);
        a.insert(long.clone(), vec!["long-1".into()]);
        a.insert("a2".into(), vec!["a2-1".into()]);
    }
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let config = bridge(addr, &pg_store(&schema), "discover", &rx);
    let mut nodes: Vec<Daemon> = (0..2)
        .map(|_| Daemon::new(&config, &[("items.yaml", discovering_connector())]))
        .collect();
    for n in &mut nodes {
        n.start().await;
    }
    wait_for("the items of a1 and a2", Duration::from_secs(40), || {
        let got = delivered_items(&rx);
        got.contains("a1-1") && got.contains("a2-1")
    })
    .await;
    // Found after the long name was listed (and refused) several times.
    up.accounts
        .lock()
        .unwrap()
        .insert("a3".into(), vec!["a3-1".into()]);
    wait_for("the item of a3", Duration::from_secs(40), || {
        delivered_items(&rx).contains("a3-1")
    })
    .await;
    assert!(!delivered_items(&rx).contains("long-1"));
    // Every lease is held: none lapsed for the long name.
    let rows = leases(&db, &schema).await;
    assert!(rows.keys().all(|k| k.len() < 100), "{rows:?}");
    for key in ["src/a1", "src/a2", "src/a3", "discover:src"] {
        assert!(
            rows.get(key).is_some_and(|o| o.is_some()),
            "{key}: {rows:?}"
        );
    }
    let log: String = nodes.iter().map(|n| n.log()).collect();
    assert!(
        log.contains("too long for an instance") && log.contains(&long[..64]),
        "{log}"
    );
    assert!(!log.contains(&long[..65]), "the whole name was logged");
    assert!(!log.contains("cannot keep the leases"), "{log}");
    for n in &mut nodes {
        assert!(n.terminate().success());
    }
}

/// Item ids with a NUL, control characters, or 3,000 characters: both
/// stores commit them and deliver their events, and the instance goes on
/// (a later item is delivered too). The stores agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_ids_no_text_index_takes_are_delivered_by_both_stores() {
    let Some(_db) = connect().await else {
        return;
    };
    let hostile = vec![
        "nul\0id".to_string(),
        "ctl\u{1b}[2J\r\n".to_string(),
        "y".repeat(3_000),
        "fine".to_string(),
    ];
    let mut got = Vec::new();
    for backend in ["sled", "postgres"] {
        let schema = Schema::fresh();
        let (up, addr) = start_upstream().await;
        up.accounts
            .lock()
            .unwrap()
            .insert("a1".into(), hostile.clone());
        let rx = Receiver::start(&secret(), Plan::Always(204)).await;
        let store = if backend == "postgres" {
            pg_store(&schema)
        } else {
            String::new()
        };
        let config = bridge(addr, &store, "{ account: [a1] }", &rx);
        let mut d = Daemon::new(&config, &[("items.yaml", CONNECTOR.to_string())]);
        d.start().await;
        wait_for(
            &format!("{backend}: every hostile id delivered"),
            Duration::from_secs(30),
            || delivered_items(&rx).len() == hostile.len(),
        )
        .await;
        up.accounts
            .lock()
            .unwrap()
            .get_mut("a1")
            .unwrap()
            .push("later".into());
        wait_for(
            &format!("{backend}: the later item"),
            Duration::from_secs(30),
            || delivered_items(&rx).contains("later"),
        )
        .await;
        let s = d.status().await;
        assert!(
            s["instances"]["src/a1"]["last_error"].is_null(),
            "{backend}: {s:#}"
        );
        // Polls after the commit find every id seen: nothing is sent twice.
        let polls = up.polls.load(Ordering::SeqCst);
        wait_for("three more polls", Duration::from_secs(30), || {
            up.polls.load(Ordering::SeqCst) >= polls + 3
        })
        .await;
        let ids: Vec<String> = rx.accepted().iter().map(|d| d.id.clone()).collect();
        let distinct: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(ids.len(), distinct.len(), "{backend}: an event sent twice");
        assert!(d.terminate().success());
        got.push(delivered_items(&rx));
    }
    assert_eq!(got[0], got[1], "the stores disagree");
}

/// Lease rows of instances removed by a reload, and of instances that
/// left a discovered list, are pruned; those still configured stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_rows_of_removed_instances_are_pruned() {
    let Some(db) = connect().await else {
        return;
    };
    let schema = Schema::fresh();
    let (up, addr) = start_upstream().await;
    {
        let mut a = up.accounts.lock().unwrap();
        for acc in ["d1", "d2", "d3"] {
            a.insert(acc.into(), vec![format!("{acc}-1")]);
        }
    }
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let config = |accounts: &str| {
        let listed = bridge(addr, &pg_store(&schema), accounts, &rx);
        listed.replace(
            "endpoints:",
            &format!(
                "  found:\n    connector: disc\n    with: {{ base_url: \"http://{addr}\" }}\n    for_each: discover\n    schedule: every 200ms\n    deliver_to: [agent]\nendpoints:"
            ),
        )
    };
    let files = [
        ("items.yaml", CONNECTOR.to_string()),
        (
            "disc.yaml",
            discovering_connector().replace("name: items", "name: disc"),
        ),
    ];
    let mut d = Daemon::new(&config("{ account: [d1, d2, d3] }"), &files);
    d.start().await;
    let keys = |rows: &BTreeMap<String, Option<String>>| -> BTreeSet<String> {
        rows.keys().cloned().collect()
    };
    let all: BTreeSet<String> = [
        "src/d1",
        "src/d2",
        "src/d3",
        "found/d1",
        "found/d2",
        "found/d3",
        "discover:found",
    ]
    .map(String::from)
    .into();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while keys(&leases(&db, &schema).await) != all || delivered_items(&rx).len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}\n{}",
            leases(&db, &schema).await,
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A reload removes two listed instances; the listing drops one.
    std::fs::write(d.config(), config("{ account: [d1] }")).unwrap();
    unsafe { libc::kill(d.pid().unwrap() as i32, libc::SIGHUP) };
    up.accounts.lock().unwrap().remove("d2");
    let want: BTreeSet<String> = ["src/d1", "found/d1", "found/d3", "discover:found"]
        .map(String::from)
        .into();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while keys(&leases(&db, &schema).await) != want {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}\n{}",
            leases(&db, &schema).await,
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What stays is still held and polled.
    let polls = up.polls.load(Ordering::SeqCst);
    wait_for("more polls", Duration::from_secs(30), || {
        up.polls.load(Ordering::SeqCst) >= polls + 4
    })
    .await;
    assert!(leases(&db, &schema)
        .await
        .values()
        .all(|owner| owner.is_some()));
    assert!(d.log().contains("lease rows of removed instances pruned"));
    assert!(d.terminate().success());
    // A stop is no removal: the rows stay for the next start.
    assert_eq!(keys(&leases(&db, &schema).await), want);
}

/// A node gives leases back while they are busy (a poll that takes a
/// second, a delivery the receiver holds for a second), first to a node
/// that joins, then all of them as it stops (SIGTERM): what is in flight
/// finishes where it started, no instance is polled by two nodes at once,
/// every item is delivered, and none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_leases_are_drained_without_losing_or_repeating_anything() {
    let Some(db) = connect().await else {
        return;
    };
    let schema = Schema::fresh();
    let (up, addr) = start_upstream().await;
    *up.delay.lock().unwrap() = Duration::from_millis(1000);
    let accounts = ["k1", "k2", "k3", "k4"];
    for acc in accounts {
        up.accounts
            .lock()
            .unwrap()
            .insert(acc.into(), vec![format!("{acc}-0")]);
    }
    let rx = Receiver::start(&secret(), Plan::Slow(Duration::from_millis(1000))).await;
    let config = bridge(
        addr,
        &pg_store(&schema),
        "{ account: [k1, k2, k3, k4] }",
        &rx,
    );
    let files = [("items.yaml", CONNECTOR.to_string())];
    // Items keep coming, one every 150 ms, round the accounts.
    let adding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let adder = {
        let (up, adding) = (up.clone(), adding.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while adding.load(Ordering::SeqCst) {
                n += 1;
                let acc = accounts[n % accounts.len()];
                up.accounts
                    .lock()
                    .unwrap()
                    .get_mut(acc)
                    .unwrap()
                    .push(format!("{acc}-{n}"));
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };
    let owners = || async {
        leases(&db, &schema)
            .await
            .into_iter()
            .filter(|(k, _)| k.starts_with("src/"))
            .filter_map(|(_, o)| o)
            .collect::<BTreeSet<String>>()
    };
    let mut a = Daemon::new(&config, &files);
    a.start().await;
    wait_for(
        "deliveries from the first node",
        Duration::from_secs(30),
        || rx.all().len() >= 4,
    )
    .await;
    // A second node joins while every lease of the first is busy.
    let mut b = Daemon::new(&config, &files);
    b.start().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while owners().await.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the leases were never shared: {:?}\n{}",
            leases(&db, &schema).await,
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Some were busy when they had to go, and went once done.
    assert!(a.log().contains("giving leases back"), "{}", a.log());
    assert!(a.log().contains("leases busy"), "{}", a.log());
    // Both nodes deliver for a while; then the first stops mid-flight.
    let seen = rx.all().len();
    wait_for("more deliveries from both", Duration::from_secs(30), || {
        rx.all().len() >= seen + 8
    })
    .await;
    assert!(a.terminate().success());
    // The second node takes everything over.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while owners().await.len() != 1 || leases(&db, &schema).await.values().any(|o| o.is_none()) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            leases(&db, &schema).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    adding.store(false, Ordering::SeqCst);
    adder.await.unwrap();
    let all_items: BTreeSet<String> = up
        .accounts
        .lock()
        .unwrap()
        .values()
        .flatten()
        .cloned()
        .collect();
    let received = |rx: &Receiver| -> BTreeSet<String> {
        rx.all()
            .iter()
            .filter_map(|d| d.body["data"]["id"].as_str().map(str::to_string))
            .collect()
    };
    wait_for("every item delivered", Duration::from_secs(90), || {
        received(&rx) == all_items
    })
    .await;
    assert!(rx.all().iter().all(|d| d.verified));
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for d in rx.all() {
        *per_id.entry(d.id.clone()).or_default() += 1;
    }
    let twice: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}\n{}", b.log());
    assert_eq!(
        up.overlaps.load(Ordering::SeqCst),
        0,
        "an instance polled by two nodes at once"
    );
    assert!(b.terminate().success());
}
