//! Several `pollhook run` processes on one PostgreSQL store: leases,
//! fencing, failover, discovery run once for the cluster, an endpoint's
//! disable and enable reaching every node, a `Retry-After` and a host
//! quota shared by every node, and a database that goes away under load.
//!
//! The upstream here (a "ledger": a list of items per account) counts, per
//! account, requests in flight at once: two nodes polling one instance at
//! the same time would show as an overlap. The receiver verifies every
//! delivery with the reference Standard Webhooks library.
//!
//! Needs PostgreSQL (see `postgres.rs`); each test uses a schema of its own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::postgres::{connect, url, Schema};
use crate::support::*;

/// The upstream: items per account, requests counted at arrival.
#[derive(Default)]
struct Ledger {
    items: Mutex<BTreeMap<String, Vec<u64>>>,
    in_flight: Mutex<HashMap<String, u32>>,
    /// Requests that arrived while another one of the same account was
    /// being answered.
    overlaps: AtomicU64,
    /// Every request's arrival, by account.
    arrivals: Mutex<Vec<(Instant, String)>>,
    /// Arrivals of the account listing (`GET /acc`, discovery).
    listings: Mutex<Vec<Instant>>,
    /// While set, requests wait (and are counted in `held`).
    hold: AtomicBool,
    held: AtomicU64,
    /// The `User-Agent` of every held request, in arrival order: which
    /// node sent it, when each node is given its own.
    held_by: Mutex<Vec<String>>,
    /// Every request's arrival and `User-Agent`.
    agents: Mutex<Vec<(Instant, String)>>,
    /// While set, the next request is refused with a 429 and
    /// `Retry-After: 6` (and the flag cleared); when and to whom is kept.
    refuse: AtomicBool,
    refused: Mutex<Option<(Instant, String)>>,
}

impl Ledger {
    fn add(&self, account: &str) {
        let mut items = self.items.lock().unwrap();
        let list = items.entry(account.to_string()).or_default();
        list.push(list.len() as u64 + 1);
    }

    /// When `account` was first asked for after `since`.
    fn first_request_after(&self, account: &str, since: Instant) -> Option<Instant> {
        let arrivals = self.arrivals.lock().unwrap();
        arrivals
            .iter()
            .filter(|(t, a)| a == account && *t > since)
            .map(|(t, _)| *t)
            .min()
    }

    fn requests(&self, account: &str) -> usize {
        let a = self.arrivals.lock().unwrap();
        a.iter().filter(|(_, acc)| acc == account).count()
    }
}

/// A request being answered; counted out however it ends (a killed
/// node's connection drops the handler midway).
struct InFlight(Arc<Ledger>, String);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.in_flight.lock().unwrap().get_mut(&self.1).unwrap() -= 1;
    }
}

async fn items(
    State(l): State<Arc<Ledger>>,
    Path(acc): Path<String>,
    headers: HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let ua = headers
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    l.agents.lock().unwrap().push((Instant::now(), ua.clone()));
    if l.refuse.swap(false, Ordering::SeqCst) {
        *l.refused.lock().unwrap() = Some((Instant::now(), ua));
        return (
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "6")],
        )
            .into_response();
    }
    {
        let mut f = l.in_flight.lock().unwrap();
        let n = f.entry(acc.clone()).or_default();
        if *n > 0 {
            l.overlaps.fetch_add(1, Ordering::SeqCst);
            eprintln!(
                "OVERLAP {acc} by {ua} at {:?}",
                std::time::SystemTime::now()
            );
        }
        *n += 1;
    }
    let _counted = InFlight(l.clone(), acc.clone());
    l.arrivals
        .lock()
        .unwrap()
        .push((Instant::now(), acc.clone()));
    if l.hold.load(Ordering::SeqCst) {
        l.held_by.lock().unwrap().push(ua);
        l.held.fetch_add(1, Ordering::SeqCst);
        // Bounded: the test releases the hold within seconds.
        let deadline = Instant::now() + Duration::from_secs(60);
        while l.hold.load(Ordering::SeqCst) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Long enough for two pollers of one instance to overlap.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let list: Vec<Value> = l
        .items
        .lock()
        .unwrap()
        .get(&acc)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|n| json!({ "id": format!("{acc}-{n:03}"), "n": n }))
        .collect();
    Json(json!({ "items": list })).into_response()
}

/// The account listing: every account with items (or opened empty).
async fn listing(State(l): State<Arc<Ledger>>) -> Json<Value> {
    l.listings.lock().unwrap().push(Instant::now());
    let accounts: Vec<Value> = l
        .items
        .lock()
        .unwrap()
        .keys()
        .map(|a| json!({ "account_id": a }))
        .collect();
    Json(json!({ "accounts": accounts }))
}

async fn start_ledger() -> (Arc<Ledger>, SocketAddr) {
    let l = Arc::new(Ledger::default());
    let app = Router::new()
        .route("/acc", get(listing))
        .route("/acc/{acc}/items", get(items))
        .with_state(l.clone());
    (l, serve(app).await)
}

const CONNECTOR: &str = r#"
name: ledger
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
  - type: ledger.item.created
"#;

fn accounts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("a{i:02}")).collect()
}

/// The bridge every node runs: `accounts` of the ledger at `ledger`,
/// polled every `every`, on the PostgreSQL store at `db_url`.
fn bridge(
    ledger: SocketAddr,
    accounts: &[String],
    every: &str,
    rx: &Receiver,
    db_url: &str,
    schema: &str,
    extra: &str,
) -> String {
    format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
store: {{ backend: postgres, url: "{db_url}", schema: {schema}, lease: 3s }}
{extra}
sources:
  ledger:
    connector: ledger
    with: {{ base_url: "http://{ledger}" }}
    for_each: {{ account: [{}] }}
    schedule: every {every}
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{}", secret: {} }}
"#,
        accounts.join(", "),
        rx.url,
        secret()
    )
}

fn node(bridge: &str) -> Daemon {
    Daemon::new(bridge, &[("ledger.yaml", CONNECTOR.to_string())])
}

/// Two nodes polling every 200 ms, each saying who it is in its
/// User-Agent (`node-a`, `node-b`), so the upstream knows which one asked.
fn named_nodes(
    ledger: SocketAddr,
    accs: &[String],
    rx: &Receiver,
    schema: &str,
) -> (Daemon, Daemon) {
    let config = |who: &str| {
        let extra = format!("user_agent: node-{who}");
        bridge(ledger, accs, "200ms", rx, &url(), schema, &extra)
    };
    (node(&config("a")), node(&config("b")))
}

/// Two nodes on `bridge`, started and each holding leases, every account
/// polled once: the node to keep, the one to stop, and the latter's name
/// as the cluster knows it.
async fn two_nodes_polling(
    bridge: &str,
    ledger: &Ledger,
    accs: &[String],
) -> (Daemon, Daemon, String) {
    let (mut a, mut victim) = (node(bridge), node(bridge));
    a.start().await;
    victim.start().await;
    a.wait_status("both nodes holding leases", |s| {
        let h = leases_by_node(s);
        h.len() == 2 && h.iter().all(|n| *n > 0)
    })
    .await;
    wait_for("every account polled", Duration::from_secs(30), || {
        accs.iter().all(|acc| ledger.requests(acc) > 0)
    })
    .await;
    let name = victim.status().await["cluster"]["node"]
        .as_str()
        .unwrap()
        .to_string();
    (a, victim, name)
}

/// What the receiver got, checked: every delivery verified; one body per
/// webhook-id (a second commit of a change, by a stale node, would carry
/// another sequence or time); one webhook-id per item; per instance, items
/// first arrive in order. Returns the items delivered.
fn check_deliveries(rx: &Receiver) -> BTreeSet<String> {
    let all = rx.all();
    assert!(all.iter().all(|d| d.verified), "every delivery verifies");
    let mut body_of: HashMap<String, Vec<u8>> = HashMap::new();
    let mut id_of: HashMap<String, String> = HashMap::new();
    let mut last_n: HashMap<String, u64> = HashMap::new();
    let mut first_seen: BTreeSet<String> = BTreeSet::new();
    for d in &all {
        let prev = body_of.entry(d.id.clone()).or_insert_with(|| d.raw.clone());
        assert_eq!(
            prev,
            &d.raw,
            "webhook-id {} delivered with two bodies:\n{}\n{}",
            d.id,
            String::from_utf8_lossy(prev),
            String::from_utf8_lossy(&d.raw)
        );
        let item = d.body["data"]["id"].as_str().unwrap().to_string();
        let id = id_of.entry(item.clone()).or_insert_with(|| d.id.clone());
        assert_eq!(id, &d.id, "item {item} under two webhook-ids");
        if first_seen.insert(d.id.clone()) {
            let inst = d.body["instance"].as_str().unwrap().to_string();
            let n = d.body["data"]["n"].as_u64().unwrap();
            let last = last_n.entry(inst.clone()).or_default();
            assert!(n > *last, "{inst}: item {n} arrived after item {last}");
            *last = n;
        }
    }
    id_of.into_keys().collect()
}

/// Discovery runs on one node of the cluster: listings never come from
/// several nodes at once (each lists every second; three listing
/// independently would arrive about three times a second). Accounts it
/// finds are polled by whichever node holds them; when the listing node is
/// killed, another lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_runs_once_for_the_cluster() {
    let Some(_db) = connect().await else {
        return;
    };
    let schema = Schema::fresh();
    let (ledger, addr) = start_ledger().await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    for a in accounts(3) {
        ledger.items.lock().unwrap().insert(a, Vec::new());
    }
    let connector = format!(
        "{CONNECTOR}discover:\n  request: {{ url: \"{{{{ base_url }}}}/acc\" }}\n  items: \"$.accounts[*]\"\n  name: \"{{{{ item.account_id }}}}\"\n  with: {{ account: \"{{{{ item.account_id }}}}\" }}\n  schedule: every 1s\n"
    );
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
store: {{ backend: postgres, url: "{}", schema: {}, lease: 3s }}
sources:
  ledger:
    connector: ledger
    with: {{ base_url: "http://{addr}" }}
    for_each: discover
    schedule: every 200ms
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{}", secret: {} }}
"#,
        url(),
        schema.0,
        rx.url,
        secret()
    );
    let mut nodes: Vec<Daemon> = (0..3)
        .map(|_| Daemon::new(&bridge, &[("ledger.yaml", connector.clone())]))
        .collect();
    for n in &mut nodes {
        n.start().await;
    }
    let listings_since = |from: Instant| -> Vec<Instant> {
        let l = ledger.listings.lock().unwrap();
        l.iter().filter(|t| **t >= from).copied().collect()
    };
    let spaced = |times: &[Instant]| {
        times
            .windows(2)
            .all(|w| w[1].duration_since(w[0]) >= Duration::from_millis(500))
    };
    let from = Instant::now();
    wait_for("five listings", Duration::from_secs(30), || {
        listings_since(from).len() >= 5
    })
    .await;
    let seen = listings_since(from);
    assert!(spaced(&seen), "listings from several nodes: {seen:?}");
    // A new account is found by the listing node and polled by its holder.
    ledger.add("a99");
    wait_for("the new account's item", Duration::from_secs(30), || {
        distinct_items(&rx) >= 1
    })
    .await;
    // The listing node dies: another one lists, still alone.
    let lister = {
        let pg = connect().await.unwrap();
        let row = pg
            .query_one(
                &format!(
                    "SELECT owner FROM \"{}\".lease WHERE instance = 'discover:ledger'",
                    schema.0
                ),
                &[],
            )
            .await
            .unwrap();
        row.get::<_, Option<String>>(0).unwrap()
    };
    let mut killed = false;
    for n in &mut nodes {
        let st = n.status().await;
        if st["cluster"]["node"].as_str() == Some(lister.as_str()) {
            n.kill();
            killed = true;
            break;
        }
    }
    assert!(killed, "the listing node {lister} is one of ours");
    let from = Instant::now();
    wait_for(
        "listings from another node",
        Duration::from_secs(30),
        || listings_since(from).len() >= 4,
    )
    .await;
    let seen = listings_since(from);
    assert!(spaced(&seen), "listings from several nodes: {seen:?}");
    ledger.add("a99");
    wait_for("the account's next item", Duration::from_secs(30), || {
        distinct_items(&rx) >= 2
    })
    .await;
    check_deliveries(&rx);
}

/// An endpoint disabled on one node (it answered `410 Gone`) is disabled
/// on every node; `pollhook endpoint enable` through one node's admin
/// server enables it on all, and everything waiting is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_disable_and_enable_reach_every_node() {
    let Some(_db) = connect().await else {
        return;
    };
    let schema = Schema::fresh();
    let (ledger, addr) = start_ledger().await;
    let rx = Receiver::start(&secret(), Plan::Script(vec![410].into())).await;
    let accs = accounts(6);
    let b = bridge(addr, &accs, "100ms", &rx, &url(), &schema.0, "");
    let (mut a, mut b) = (node(&b), node(&b));
    a.start().await;
    b.start().await;
    for d in [&a, &b] {
        d.wait_status("both nodes holding leases", |s| {
            nodes_holding_leases(s) == 2
        })
        .await;
    }
    // One change: its delivery meets the 410, on whichever node holds it.
    ledger.add("a00");
    wait_for("the 410", Duration::from_secs(30), || !rx.all().is_empty()).await;
    for d in [&a, &b] {
        d.wait_status("the endpoint disabled on every node", |s| {
            s["endpoints"]["agent"]["disabled"].is_string()
        })
        .await;
    }
    for acc in &accs {
        ledger.add(acc);
    }
    let out = a
        .command(&["endpoint", "enable", "agent"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "every change, from both nodes",
        Duration::from_secs(30),
        || distinct_items(&rx) == 7,
    )
    .await;
    for d in [&a, &b] {
        d.wait_status("the endpoint enabled on every node", |s| {
            s["endpoints"]["agent"]["disabled"].is_null()
        })
        .await;
    }
    check_deliveries(&rx);
    // `pollhook status` shows the nodes and which one holds each instance.
    let out = a.command(&["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = a.status().await;
    let me = s["cluster"]["node"].as_str().unwrap();
    let other = b.status().await["cluster"]["node"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains(&format!("{me} (this node)")), "{text}");
    assert!(text.contains(&other), "{text}");
    assert!(text.contains("NODE") && text.contains("LEASES"), "{text}");
    let holder = s["instances"]["ledger/a00"]["node"].as_str().unwrap();
    assert!(holder == me || holder == other, "{s}");
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

/// How many distinct items the receiver accepted.
fn distinct_items(rx: &Receiver) -> usize {
    rx.accepted()
        .iter()
        .filter_map(|d| d.body["data"]["id"].as_str().map(str::to_string))
        .collect::<BTreeSet<_>>()
        .len()
}

/// The lease count of each node `/status` lists (nodes without one left out).
fn leases_by_node(s: &Value) -> Vec<i64> {
    s["cluster"]["nodes"]
        .as_array()
        .map(|n| n.iter().filter_map(|n| n["leases"].as_i64()).collect())
        .unwrap_or_default()
}

/// How many nodes hold at least one lease.
fn nodes_holding_leases(s: &Value) -> usize {
    leases_by_node(s).iter().filter(|n| **n > 0).count()
}

/// Three nodes, 120 changes, nodes SIGKILLed and restarted in turn: every
/// change delivered, none under two ids or two bodies, per-instance order
/// kept, and no instance ever polled by two nodes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_everything_while_nodes_are_killed_in_turn() {
    let Some(_db) = connect().await else {
        return;
    };
    let schema = Schema::fresh();
    let (ledger, addr) = start_ledger().await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let accs = accounts(12);
    let b = bridge(addr, &accs, "100ms", &rx, &url(), &schema.0, "");
    let mut nodes: Vec<Daemon> = (0..3).map(|_| node(&b)).collect();
    for n in &mut nodes {
        n.start().await;
    }
    wait_for("every account polled", Duration::from_secs(30), || {
        accs.iter().all(|a| ledger.requests(a) > 0)
    })
    .await;
    // The work is shared: each node holds about a third of the leases.
    nodes[0]
        .wait_status("three nodes sharing the leases", |s| {
            let live: Vec<&Value> = s["cluster"]["nodes"]
                .as_array()
                .map(|n| {
                    n.iter()
                        .filter(|n| n["leases"].as_i64() > Some(0))
                        .collect()
                })
                .unwrap_or_default();
            live.len() == 3 && live.iter().all(|n| n["leases"].as_i64() <= Some(5))
        })
        .await;
    let mut expected = 0;
    for round in 0..10 {
        for a in &accs {
            ledger.add(a);
            expected += 1;
        }
        if round % 3 == 2 {
            let victim = (round / 3) % 3;
            nodes[victim].kill();
            // Changes keep coming while it is dead, then it comes back.
            for a in &accs {
                ledger.add(a);
                expected += 1;
            }
            let killed_at = Instant::now();
            wait_for(
                "the dead node's instances to be polled by the others",
                Duration::from_secs(30),
                || {
                    let arrivals = ledger.arrivals.lock().unwrap();
                    accs.iter()
                        .all(|a| arrivals.iter().any(|(t, acc)| acc == a && *t > killed_at))
                },
            )
            .await;
            nodes[victim].start().await;
        }
        // Paces the changes so that they spread over the kills (the checks
        // below wait on conditions, not on this).
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let want: BTreeSet<String> = accs
        .iter()
        .flat_map(|a| {
            let n = ledger.items.lock().unwrap()[a].len() as u64;
            (1..=n).map(move |i| format!("{a}-{i:03}"))
        })
        .collect();
    assert_eq!(want.len(), expected);
    assert!(expected >= 100);
    wait_for(
        "every change to be delivered",
        Duration::from_secs(90),
        || {
            let got: BTreeSet<String> = rx
                .accepted()
                .iter()
                .filter_map(|d| d.body["data"]["id"].as_str().map(str::to_string))
                .collect();
            got == want
        },
    )
    .await;
    assert_eq!(check_deliveries(&rx), want);
    assert_eq!(
        ledger.overlaps.load(Ordering::SeqCst),
        0,
        "an instance was polled by two nodes at once"
    );
    for n in &mut nodes {
        assert!(n.terminate().success(), "{}", n.log());
    }
}

/// A node stopped (SIGSTOP) in the middle of a poll, past its lease:
/// another node takes the instance, polls and delivers the change; when
/// the stopped node resumes (SIGCONT), its commit is refused and nothing
/// is emitted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_past_its_lease_cannot_commit_when_it_resumes() {
    let Some(_db) = connect().await else {
        return;
    };
    let schema = Schema::fresh();
    let (ledger, addr) = start_ledger().await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let accs = accounts(1);
    let (mut a, mut b) = named_nodes(addr, &accs, &rx, &schema.0);
    a.start().await;
    wait_for("a's first poll", Duration::from_secs(30), || {
        ledger.requests("a00") >= 2
    })
    .await;
    b.start().await;
    b.wait_status("b to see the cluster", |s| {
        s["cluster"]["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 2)
    })
    .await;
    // The next request is held at the upstream. Only once it is held does
    // the upstream get a new item (the held request reads the items when
    // it is let go): a request that slipped in before the hold must not
    // find the change first.
    ledger.hold.store(true, Ordering::SeqCst);
    wait_for(
        "a poll to reach the upstream",
        Duration::from_secs(30),
        || ledger.held.load(Ordering::SeqCst) >= 1,
    )
    .await;
    ledger.add("a00");
    // Its poller is whoever held the lease when it began (a, unless a busy
    // machine made a miss a renewal): that one is stopped. Should it have
    // lost the lease since, its commit is refused all the same.
    let sender = ledger.held_by.lock().unwrap()[0].clone();
    let (stale, taker) = match sender.as_str() {
        "node-a" => (&mut a, &mut b),
        "node-b" => (&mut b, &mut a),
        other => panic!("a held request from {other:?}"),
    };
    let pid = stale.pid().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // The answer waits in the stopped node's socket; it reads it when it
    // wakes.
    ledger.hold.store(false, Ordering::SeqCst);
    wait_for(
        "the other node to take over and deliver the change",
        Duration::from_secs(30),
        || distinct_items(&rx) == 1,
    )
    .await;
    unsafe { libc::kill(pid, libc::SIGCONT) };
    wait_for(
        "the resumed node to find its commit refused",
        Duration::from_secs(30),
        || stale.log().contains("no longer holds its lease"),
    )
    .await;
    // Whatever it does next (it may hold the lease again later), the
    // change went out once: one id, one body.
    ledger.add("a00");
    wait_for("the next change", Duration::from_secs(30), || {
        distinct_items(&rx) >= 2
    })
    .await;
    let got = check_deliveries(&rx);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(stale.terminate().success());
    assert!(taker.terminate().success());
}

/// A `Retry-After` given to one node pauses the host for every node: once
/// the pause has reached the others (a notice through the store), no node
/// asks the host until it ends; then both ask again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_given_to_one_node_pauses_every_node() {
    let Some(_db) = connect().await else {
        return;
    };
    let schema = Schema::fresh();
    let (ledger, addr) = start_ledger().await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let accs = accounts(6);
    let (mut a, mut b) = named_nodes(addr, &accs, &rx, &schema.0);
    a.start().await;
    b.start().await;
    let asked_by = |who: &str, after: Instant| {
        ledger
            .agents
            .lock()
            .unwrap()
            .iter()
            .any(|(t, ua)| *t > after && ua == who)
    };
    let start = Instant::now();
    wait_for("both nodes to poll", Duration::from_secs(60), || {
        asked_by("node-a", start) && asked_by("node-b", start)
    })
    .await;
    ledger.refuse.store(true, Ordering::SeqCst);
    wait_for("a 429 to be given", Duration::from_secs(30), || {
        ledger.refused.lock().unwrap().is_some()
    })
    .await;
    let (at, to) = ledger.refused.lock().unwrap().clone().unwrap();
    // The pause ends 6 s after the answer; both nodes ask again after it.
    let end = at + Duration::from_secs(6);
    wait_for("both nodes to ask again", Duration::from_secs(60), || {
        asked_by("node-a", end) && asked_by("node-b", end)
    })
    .await;
    // A second for the notice to reach the other node (a request it had
    // already sent may still arrive), and a margin for clocks at the end.
    let during: Vec<(Duration, String)> = ledger
        .agents
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| *t > at + Duration::from_secs(1) && *t < end - Duration::from_millis(300))
        .map(|(t, ua)| (*t - at, ua.clone()))
        .collect();
    assert!(
        during.is_empty(),
        "requests during the pause {to} was given: {during:?}"
    );
    assert!(a.terminate().success(), "{}", a.log());
    assert!(b.terminate().success(), "{}", b.log());
}

/// A host quota of 20/s with a burst of 5, three nodes each wanting far
/// more: no second at the upstream carries more than 25 requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_quota_holds_across_three_nodes() {
    let Some(_db) = connect().await else {
        return;
    };
    let schema = Schema::fresh();
    let (ledger, addr) = start_ledger().await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let accs = accounts(9);
    let hosts = format!(
        "hosts:\n  \"127.0.0.1:{}\": {{ rate: 20/s, burst: 5 }}",
        addr.port()
    );
    // Every 50 ms for 9 accounts: 180 requests/s wanted.
    let b = bridge(addr, &accs, "50ms", &rx, &url(), &schema.0, &hosts);
    let mut nodes: Vec<Daemon> = (0..3).map(|_| node(&b)).collect();
    for n in &mut nodes {
        n.start().await;
    }
    nodes[0]
        .wait_status("three nodes holding leases", |s| {
            nodes_holding_leases(s) == 3
        })
        .await;
    let from = Instant::now();
    wait_for("4 s of requests", Duration::from_secs(60), || {
        ledger
            .arrivals
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t >= from)
            .count()
            >= 80
    })
    .await;
    for n in &mut nodes {
        assert!(n.terminate().success(), "{}", n.log());
    }
    let times: Vec<Instant> = ledger
        .arrivals
        .lock()
        .unwrap()
        .iter()
        .map(|(t, _)| *t)
        .collect();
    let mut worst = 0;
    for (i, t) in times.iter().enumerate() {
        let within = times[i..]
            .iter()
            .filter(|u| u.duration_since(*t) < Duration::from_secs(1))
            .count();
        worst = worst.max(within);
    }
    assert!(worst <= 25, "{worst} requests within one second");
    // And the quota is used, not starved: 80 requests came in at most
    // about 4 s (20/s).
    assert!(worst >= 15, "only {worst} in the busiest second");
}

/// A TCP proxy in front of PostgreSQL that the test can cut (every
/// connection dropped, new ones closed at once) and restore: the database
/// going away and coming back, as the nodes see it.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (u, c) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !u.load(Ordering::SeqCst) {
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy { addr, up, conns }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

async fn readyz(d: &Daemon) -> (u16, String) {
    let r = reqwest::get(format!("http://{}/readyz", d.admin.as_ref().unwrap()))
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The database goes away under load and comes back: the nodes say so on
/// `/readyz`, pause, and resume; every change is delivered once, under one
/// id and one body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_going_away_under_load_loses_nothing() {
    let Some(_db) = connect().await else {
        return;
    };
    let schema = Schema::fresh();
    let real: url::Url = url().parse().unwrap();
    let target: SocketAddr = format!(
        "{}:{}",
        real.host_str().unwrap(),
        real.port().unwrap_or(5432)
    )
    .parse()
    .unwrap();
    let proxy = Proxy::start(target).await;
    let mut via = real.clone();
    via.set_port(Some(proxy.addr.port())).unwrap();
    let (ledger, addr) = start_ledger().await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let accs = accounts(4);
    // Each node names itself in its User-Agent: an overlap says who.
    let config = |who: &str| {
        let extra = format!("user_agent: node-{who}");
        bridge(addr, &accs, "100ms", &rx, via.as_str(), &schema.0, &extra)
    };
    let (mut a, mut b) = (node(&config("a")), node(&config("b")));
    a.start().await;
    b.start().await;
    let delivered = |n: usize| {
        let rx = &rx;
        move || distinct_items(rx) >= n
    };
    for acc in &accs {
        ledger.add(acc);
    }
    wait_for("the first changes", Duration::from_secs(30), delivered(4)).await;
    proxy.cut();
    for acc in &accs {
        ledger.add(acc);
    }
    for d in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, body) = readyz(d).await;
            if code == 503 && body.contains("store") {
                break;
            }
            assert!(Instant::now() < deadline, "still ready: {code} {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Past the lease: every node's leases have lapsed by its own clock.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    proxy.restore();
    for acc in &accs {
        ledger.add(acc);
    }
    wait_for(
        "every change after the outage",
        Duration::from_secs(60),
        delivered(12),
    )
    .await;
    for d in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while readyz(d).await.0 != 200 {
            assert!(Instant::now() < deadline, "{:?}", readyz(d).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let got = check_deliveries(&rx);
    assert_eq!(got.len(), 12, "{got:?}");
    assert!(a.terminate().success(), "{}", a.log());
    assert!(b.terminate().success(), "{}", b.log());
    // Which node asked is in the User-Agent, and the overlap's time in
    // the test's output: the logs say what each node believed then.
    assert_eq!(
        ledger.overlaps.load(Ordering::SeqCst),
        0,
        "two polls of one account at once\n=== node a\n{}\n=== node b\n{}",
        a.log(),
        b.log()
    );
}

/// A node SIGKILLed: its leases lapse one lease after its last renewal,
/// and the survivor, which saw it fall silent, claims them then (not at
/// its next regular round) and polls every instance whose run came due
/// meanwhile at once (not spread over the next seconds). Measured
/// against the lapse read from the database, not against a sleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_instances_are_polled_as_soon_as_its_leases_lapse() {
    let Some(db) = connect().await else {
        return;
    };
    let schema = Schema::fresh();
    let (ledger, addr) = start_ledger().await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let accs = accounts(8);
    // Every 1s with a 3s lease: whatever the moment of the kill, each of
    // the dead node's instances is due before its lease lapses.
    let b = bridge(addr, &accs, "1s", &rx, &url(), &schema.0, "");
    let (mut a, mut victim, name) = two_nodes_polling(&b, &ledger, &accs).await;
    victim.kill();
    let killed_at = Instant::now();
    // Its leases and when they lapse, by the database's clock: the later
    // of the claim's time and the node's last heartbeat plus its lease
    // (the heartbeat keeps every lease of its node). Anything it sent
    // before dying has landed by now or never will.
    let rows = db
        .query(
            &format!(
                "SELECT l.instance,
                        greatest(l.until_ms, n.heartbeat_ms + n.lease_ms) - \"{0}\".now_ms()
                 FROM \"{0}\".lease l JOIN \"{0}\".nodes n ON n.node = l.owner
                 WHERE l.owner = $1",
                schema.0
            ),
            &[&name],
        )
        .await
        .unwrap();
    let read_at = Instant::now();
    assert!(!rows.is_empty(), "the dead node held leases");
    let mut lapse = read_at;
    let mut orphans = Vec::new();
    for r in &rows {
        let key: String = r.get(0);
        let left = Duration::from_millis(r.get::<_, i64>(1).max(0) as u64);
        lapse = lapse.max(read_at + left);
        orphans.push(key.split_once('/').unwrap().1.to_string());
    }
    let lease = Duration::from_secs(3);
    // A quarter of the lease: the claim comes 50 ms after the lapse and the
    // poll at once (without either, up to a regular round and a slot
    // later: a second or two here).
    let margin = Duration::from_millis(750);
    let first_after = |acc: &str| ledger.first_request_after(acc, killed_at);
    wait_for(
        "the dead node's instances polled by the survivor",
        lease + margin * 4,
        || orphans.iter().all(|acc| first_after(acc).is_some()),
    )
    .await;
    for acc in &orphans {
        let t = first_after(acc).unwrap();
        assert!(
            t <= lapse + margin,
            "{acc} polled {:?} after its lease lapsed ({:?} after the kill)",
            t.saturating_duration_since(lapse),
            t - killed_at
        );
        assert!(
            t - killed_at <= lease + margin,
            "{acc}: {:?}",
            t - killed_at
        );
    }
    assert_eq!(ledger.overlaps.load(Ordering::SeqCst), 0);
    assert!(a.terminate().success(), "{}", a.log());
}

/// A node drained (SIGTERM) gives its leases back; an instance whose run
/// came due while its lease moved is polled at once by its new holder,
/// not at its own slot (a stopped daemon's missed run is spread over the
/// next seconds, or an interval for a large source). The move is
/// stretched: the survivor is stopped (SIGSTOP) while the victim drains,
/// until every run the victim stored is past by the database's clock,
/// then resumed; its claim (woken by the release's notice, or its round)
/// must be followed by the polls at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_nodes_instances_whose_runs_came_due_are_polled_at_once() {
    let Some(db) = connect().await else {
        return;
    };
    let schema = Schema::fresh();
    let (ledger, addr) = start_ledger().await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let accs = accounts(8);
    // Every 6s: longer than the 5 s over which a restart spreads missed
    // runs, so the next run is stored and "came due" is exact. A 20 s
    // lease: the survivor's pause below stays well within it (a lease
    // given back longer than a lease ago was left by a stopped cluster).
    let b =
        bridge(addr, &accs, "6s", &rx, &url(), &schema.0, "").replace("lease: 3s", "lease: 20s");
    let (mut a, mut victim, name) = two_nodes_polling(&b, &ledger, &accs).await;
    let pid = a.pid().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let owned = db
        .query(
            &format!(
                "SELECT instance FROM \"{0}\".lease WHERE owner = $1",
                schema.0
            ),
            &[&name],
        )
        .await
        .unwrap();
    let orphans: Vec<String> = owned.iter().map(|r| r.get(0)).collect();
    assert!(!orphans.is_empty(), "the victim held leases");
    assert!(victim.terminate().success(), "{}", victim.log());
    // Every run the victim stored as it left, past by the database's clock.
    let left = |rows: Vec<tokio_postgres::Row>| rows[0].get::<_, Option<i64>>(0).unwrap_or(0);
    let next_runs = format!(
        "SELECT max(at_ms - \"{0}\".now_ms()) FROM \"{0}\".next_run WHERE instance = ANY($1)",
        schema.0
    );
    let ms = left(db.query(&next_runs, &[&orphans]).await.unwrap());
    tokio::time::sleep(Duration::from_millis(ms.max(0) as u64 + 100)).await;
    assert!(left(db.query(&next_runs, &[&orphans]).await.unwrap()) < 0);
    let resumed = Instant::now();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let accounts_of: Vec<String> = orphans
        .iter()
        .map(|k| k.split_once('/').unwrap().1.to_string())
        .collect();
    let first_after = |acc: &str| ledger.first_request_after(acc, resumed);
    wait_for(
        "the drained node's instances polled by the survivor",
        Duration::from_secs(30),
        || accounts_of.iter().all(|acc| first_after(acc).is_some()),
    )
    .await;
    // At once: a claim and a poll, not a slot spread over 5 s.
    let margin = Duration::from_millis(1_500);
    for acc in &accounts_of {
        let t = first_after(acc).unwrap() - resumed;
        assert!(
            t <= margin,
            "{acc} polled {t:?} after the survivor resumed\n{}",
            a.log()
        );
    }
    assert_eq!(ledger.overlaps.load(Ordering::SeqCst), 0);
    assert!(a.terminate().success(), "{}", a.log());
}

/// A node joining a running cluster is handed its share without a gap:
/// the others give leases back only once it has settled (it says so),
/// and it claims them as the release wakes it. No lease lies unowned
/// while it settles, and no instance waits for it: given back at the
/// others' next round, leases lay unowned until the newcomer's first
/// claim (up to a third of a lease), and the runs due meanwhile were
/// polled that late (at 100,000 instances, thousands up to 9 s late).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_is_handed_its_share_without_a_gap() {
    let Some(db) = connect().await else {
        return;
    };
    let schema = Schema::fresh();
    let (ledger, addr) = start_ledger().await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let accs = accounts(30);
    // A 15 s lease: a newcomer settles for 5 s, the others' rounds are
    // 5 s apart. Every 6 s: next runs are stored, a hand-over is exact.
    let every = Duration::from_secs(6);
    let b =
        bridge(addr, &accs, "6s", &rx, &url(), &schema.0, "").replace("lease: 3s", "lease: 15s");
    let mut first = node(&b);
    first.start().await;
    wait_for("every account polled", Duration::from_secs(30), || {
        accs.iter().all(|acc| ledger.requests(acc) > 0)
    })
    .await;
    let mut second = node(&b);
    let joined = Instant::now();
    second.start().await;
    // Leases given back more than a second ago and still unowned.
    let unowned = format!(
        "SELECT count(*) FROM \"{0}\".lease WHERE owner IS NULL AND until_ms > 0 \
         AND \"{0}\".now_ms() - until_ms > 1000",
        schema.0
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut most_unowned = 0;
    loop {
        let n: i64 = db.query_one(&unowned, &[]).await.unwrap().get(0);
        most_unowned = most_unowned.max(n);
        let s = second.status().await;
        let held = leases_by_node(&s);
        if held.len() == 2 && held.iter().all(|n| (13..=17).contains(n)) {
            break;
        }
        assert!(Instant::now() < deadline, "no fair share: {held:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        most_unowned, 0,
        "leases lay unowned while the new node settled"
    );
    // A run more past every account's slot: no gap longer than its
    // interval and a margin for the hand-over's round trips.
    let settled = Instant::now();
    tokio::time::sleep(every + Duration::from_secs(1)).await;
    let arrivals = ledger.arrivals.lock().unwrap().clone();
    for acc in &accs {
        let times: Vec<Instant> = arrivals
            .iter()
            .filter(|(t, a)| a == acc && *t <= settled + every)
            .map(|(t, _)| *t)
            .collect();
        let from = times.iter().rposition(|t| *t <= joined).unwrap_or(0);
        for w in times[from..].windows(2) {
            assert!(
                w[1] - w[0] <= every + Duration::from_millis(1_500),
                "{acc} waited {:?} across the join",
                w[1] - w[0]
            );
        }
    }
    assert_eq!(ledger.overlaps.load(Ordering::SeqCst), 0);
    assert!(second.terminate().success(), "{}", second.log());
    assert!(first.terminate().success(), "{}", first.log());
}

/// This node's poll tasks and leases, from its own `/status`.
fn own_tasks_and_leases(s: &Value) -> (i64, i64) {
    let me = s["cluster"]["node"].as_str().unwrap_or_default();
    let leases = s["cluster"]["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["node"] == me))
        .and_then(|n| n["leases"].as_i64())
        .unwrap_or(-1);
    (s["cluster"]["poll_tasks"].as_i64().unwrap_or(-1), leases)
}

/// A node runs a poll task for each instance whose lease it holds and for
/// no other: alone, one per instance; when a second node joins, the
/// leases it gives back take their tasks with them; when that node
/// leaves, the leases come back and so do the tasks, and every instance
/// is polled again. (Before, every node ran a task for every instance of
/// the fleet, waiting for a lease it might never get.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_poll_tasks_follow_its_leases_not_the_fleet() {
    let Some(_db) = connect().await else {
        return;
    };
    let schema = Schema::fresh();
    let (ledger, addr) = start_ledger().await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let accs = accounts(20);
    let b = bridge(addr, &accs, "200ms", &rx, &url(), &schema.0, "");
    let (mut first, mut second) = (node(&b), node(&b));
    first.start().await;
    first
        .wait_status("one task per instance, alone", |s| {
            own_tasks_and_leases(s) == (20, 20)
        })
        .await;
    second.start().await;
    for n in [&first, &second] {
        n.wait_status("tasks only for the leases held, the fleet shared", |s| {
            let (tasks, leases) = own_tasks_and_leases(s);
            tasks == leases && (8..=12).contains(&leases) && nodes_holding_leases(s) == 2
        })
        .await;
    }
    assert!(second.terminate().success(), "{}", second.log());
    first
        .wait_status("the leases given back come with their tasks", |s| {
            own_tasks_and_leases(s) == (20, 20)
        })
        .await;
    let back = Instant::now();
    wait_for(
        "every account polled again",
        Duration::from_secs(30),
        || {
            let arrivals = ledger.arrivals.lock().unwrap();
            accs.iter()
                .all(|a| arrivals.iter().any(|(t, acc)| acc == a && *t > back))
        },
    )
    .await;
    assert_eq!(ledger.overlaps.load(Ordering::SeqCst), 0);
    assert!(first.terminate().success(), "{}", first.log());
}
