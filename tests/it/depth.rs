//! Issue 19, "a single item must never stop an instance, a node or the
//! cluster": a big listing, an item nested too deep, a backup of whatever
//! the store accepts, one instance's failing commit and the node's
//! readiness. Each through the real binary, a real upstream and real
//! stores (sled; PostgreSQL where it is about PostgreSQL).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Router;

use crate::support::*;

/// A listing larger than `seen_limit` (the probes: 10,100 items for the
/// default 10,000 first re-announced old items every poll, then emitted
/// nothing at all). Ids still listed are always remembered, so the three
/// new items are announced once each and nothing old comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_larger_than_seen_limit_is_remembered_whole() {
    let size = Arc::new(AtomicU64::new(10_100));
    let app = Router::new()
        .route(
            "/items",
            get(|State(n): State<Arc<AtomicU64>>| async move {
                let items: Vec<_> = (0..n.load(Ordering::SeqCst))
                    .map(|i| serde_json::json!({ "id": format!("it-{i}") }))
                    .collect();
                axum::Json(serde_json::json!({ "items": items }))
            }),
        )
        .with_state(size.clone());
    let addr = serve(app).await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    // The default `seen_limit` (10,000).
    let connector = r#"
name: listing
params: { base_url: { required: true } }
request: { url: "{{ base_url }}/items" }
items: "$.items[*]"
id: "{{ item.id }}"
detect: new
emit: [{ type: item.created }]
"#;
    let bridge = format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
sources:
  list:
    connector: listing
    with: {{ base_url: "http://{addr}" }}
    schedule: every 300ms
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{}", secret: "{}" }}
"#,
        rx.url,
        secret()
    );
    let mut d = Daemon::new(&bridge, &[("listing.yaml", connector.to_string())]);
    d.start().await;
    // The baseline, then the same listing again: nothing announced.
    d.wait_polls(&["list/default"], 3).await;
    let s = d.status().await;
    assert_eq!(
        s["instances"]["list/default"]["last_error"],
        serde_json::Value::Null,
        "{s:#}"
    );
    assert!(rx.all().is_empty(), "{} events", rx.all().len());
    // Three new items: three events, once each.
    size.store(10_103, Ordering::SeqCst);
    wait_for("the three new items", Duration::from_secs(30), || {
        rx.accepted().len() >= 3
    })
    .await;
    let polls = polls_of(&d.status().await, "list/default");
    d.wait_polls(&["list/default"], polls + 3).await;
    let mut ids: Vec<String> = rx
        .accepted()
        .iter()
        .map(|e| e.body["data"]["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["it-10100", "it-10101", "it-10102"]);
    let s = d.status().await;
    assert_eq!(
        s["instances"]["list/default"]["last_error"],
        serde_json::Value::Null,
        "{s:#}"
    );
    assert_eq!(s["instances"]["list/default"]["seen_evicted"], 0, "{s:#}");
    assert!(d.terminate().success());
}
