//! An "agent" endpoint: receives pollhook's webhooks, verifies each signature
//! with the reference Standard Webhooks library, drops duplicates by
//! `webhook-id`, and prints the event.
//!
//! `AGENT_SECRET=whsec_… cargo run --example receiver -- --listen 127.0.0.1:8082`

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;

struct Agent {
    verifier: standardwebhooks::Webhook,
    seen: Mutex<HashSet<String>>,
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| "127.0.0.1:8082".into());
    let secret =
        std::env::var("AGENT_SECRET").expect("set AGENT_SECRET to the endpoint's whsec_ secret");
    let agent = Arc::new(Agent {
        verifier: standardwebhooks::Webhook::new(&secret)
            .expect("AGENT_SECRET must be a whsec_ secret"),
        seen: Mutex::new(HashSet::new()),
    });
    let app = Router::new()
        .route("/webhook", post(receive))
        .with_state(agent);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .expect("bind receiver");
    println!(
        "[agent] receiving webhooks on http://{}/webhook",
        listener.local_addr().unwrap()
    );
    axum::serve(listener, app).await.unwrap();
}

async fn receive(State(agent): State<Arc<Agent>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if let Err(e) = agent.verifier.verify(&body, &headers) {
        println!("[agent] REJECTED a webhook: signature does not verify ({e:?})");
        return StatusCode::UNAUTHORIZED;
    }
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string();
    if !agent.seen.lock().unwrap().insert(id.clone()) {
        println!("[agent] duplicate {id} ignored");
        return StatusCode::NO_CONTENT;
    }
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    println!(
        "[agent] verified {} {}/{} #{} {}",
        event["type"].as_str().unwrap_or("?"),
        event["source"].as_str().unwrap_or("?"),
        event["instance"].as_str().unwrap_or("?"),
        event["sequence"],
        event["data"]
    );
    StatusCode::NO_CONTENT
}
