//! A legacy bank API without webhooks: the reference upstream of pollhook's
//! bank example. Shared by the `mock-bank` example and the integration tests
//! (`tests/it` includes this file), so both exercise the same API:
//!
//! - `GET /accounts` → `{"accounts":[{"account_id","currency"}]}`
//! - `GET /accounts/{id}/balance` → `{"account_id","available","currency",
//!   "updated_at"}` with an `ETag`; `If-None-Match` with it → `304`
//! - `GET /accounts/{id}/transactions?since=<cursor>&limit=<n>` →
//!   `{"transactions":[{"id","amount","booked_at"}],"next_cursor":"…"}`;
//!   the cursor is opaque; an empty page returns the same cursor.
//!
//! When a token is set, every request needs `Authorization: Bearer <token>`.
//! When a limit is set, more than that many requests in one wall-clock
//! second get `429` with `Retry-After: 1`, like a real API's quota.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

/// One booked transaction.
#[derive(Clone, Debug)]
pub struct Tx {
    pub id: String,
    /// In cents, to keep sums exact.
    pub amount_cents: i64,
    pub booked_at: String,
}

#[derive(Debug)]
struct Account {
    currency: String,
    available_cents: i64,
    updated_at: String,
    version: u64,
    transactions: Vec<Tx>,
    /// Shown by `GET /accounts` (a closed account still answers directly).
    listed: bool,
}

#[derive(Default)]
struct Inner {
    accounts: BTreeMap<String, Account>,
    /// Every request's path and query, in arrival order.
    requests: Vec<String>,
    /// When each request arrived (same order).
    request_times: Vec<std::time::Instant>,
    /// (second since the epoch, requests in it) for the limit.
    window: (u64, u32),
    /// Requests refused with 429.
    refused: u64,
    next_tx: u64,
}

/// The bank's state; cheap to share.
#[derive(Clone, Default)]
pub struct Bank {
    inner: Arc<Mutex<Inner>>,
    token: Option<String>,
    /// Requests allowed per wall-clock second (`None`: unlimited).
    limit: Option<u32>,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn money(cents: i64) -> Value {
    json!(serde_json::Number::from_f64(cents as f64 / 100.0).unwrap())
}

fn encode_cursor(position: usize) -> String {
    // Opaque to clients on purpose: pollhook must store and send it back as is.
    format!("cur_{:x}", position * 7919 + 13)
}

fn decode_cursor(c: &str) -> Option<usize> {
    let n = usize::from_str_radix(c.strip_prefix("cur_")?, 16).ok()?;
    (n >= 13 && (n - 13) % 7919 == 0).then(|| (n - 13) / 7919)
}

impl Bank {
    /// A bank with these accounts, each with a balance of 500.00 EUR.
    pub fn new(accounts: &[&str]) -> Bank {
        let bank = Bank::default();
        {
            let mut inner = bank.inner.lock().unwrap();
            for a in accounts {
                inner.accounts.insert(
                    a.to_string(),
                    Account {
                        currency: "EUR".into(),
                        available_cents: 50_000,
                        updated_at: now(),
                        version: 1,
                        transactions: vec![],
                        listed: true,
                    },
                );
            }
        }
        bank
    }

    /// Requires `Authorization: Bearer <token>` on every request.
    pub fn with_token(mut self, token: &str) -> Bank {
        self.token = Some(token.to_string());
        self
    }

    pub fn account_ids(&self) -> Vec<String> {
        self.inner
            .lock()
            .unwrap()
            .accounts
            .keys()
            .cloned()
            .collect()
    }

    /// Refuses more than `per_second` requests in any wall-clock second.
    pub fn with_limit(mut self, per_second: u32) -> Bank {
        self.limit = Some(per_second);
        self
    }

    /// Arrival times of every request.
    pub fn request_times(&self) -> Vec<std::time::Instant> {
        self.inner.lock().unwrap().request_times.clone()
    }

    /// Requests refused by the limit.
    pub fn refused(&self) -> u64 {
        self.inner.lock().unwrap().refused
    }

    /// Opens a new account (500.00 EUR), or lists a closed one again.
    pub fn open_account(&self, account: &str) {
        let mut inner = self.inner.lock().unwrap();
        inner
            .accounts
            .entry(account.to_string())
            .or_insert_with(|| Account {
                currency: "EUR".into(),
                available_cents: 50_000,
                updated_at: now(),
                version: 1,
                transactions: vec![],
                listed: true,
            })
            .listed = true;
    }

    /// Closes an account: `GET /accounts` stops listing it.
    pub fn close_account(&self, account: &str) {
        let mut inner = self.inner.lock().unwrap();
        inner
            .accounts
            .get_mut(account)
            .expect("known account")
            .listed = false;
    }

    /// Sets an account's available balance (in cents).
    pub fn set_balance(&self, account: &str, cents: i64) {
        let mut inner = self.inner.lock().unwrap();
        let a = inner.accounts.get_mut(account).expect("known account");
        if a.available_cents != cents {
            a.available_cents = cents;
            a.updated_at = now();
            a.version += 1;
        }
    }

    pub fn balance(&self, account: &str) -> i64 {
        self.inner.lock().unwrap().accounts[account].available_cents
    }

    /// Books `n` transactions (their amounts also move the balance); returns
    /// their ids.
    pub fn book(&self, account: &str, amounts_cents: &[i64]) -> Vec<String> {
        let mut inner = self.inner.lock().unwrap();
        let mut ids = Vec::new();
        for &amount in amounts_cents {
            inner.next_tx += 1;
            let id = format!("tx-{:06}", inner.next_tx);
            let a = inner.accounts.get_mut(account).expect("known account");
            a.transactions.push(Tx {
                id: id.clone(),
                amount_cents: amount,
                booked_at: now(),
            });
            a.available_cents += amount;
            a.updated_at = now();
            a.version += 1;
            ids.push(id);
        }
        ids
    }

    /// Every request seen (path and query), in order.
    pub fn requests(&self) -> Vec<String> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// The HTTP API.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/accounts", get(list_accounts))
            .route("/accounts/{id}/balance", get(balance))
            .route("/accounts/{id}/transactions", get(transactions))
            .with_state(self.clone())
    }

    /// Serves the API on `addr` (port 0 picks a free port) in the background.
    pub async fn serve(&self, addr: &str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind mock bank");
        let local = listener.local_addr().unwrap();
        let app = self.router();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        local
    }

    /// Records the request and checks the token; `Some` is the refusal to send.
    fn refuse(&self, uri: &Uri, headers: &HeaderMap) -> Option<Response> {
        let mut inner = self.inner.lock().unwrap();
        inner.requests.push(uri.to_string());
        inner.request_times.push(std::time::Instant::now());
        if let Some(limit) = self.limit {
            let sec = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            if inner.window.0 != sec {
                inner.window = (sec, 0);
            }
            inner.window.1 += 1;
            if inner.window.1 > limit {
                inner.refused += 1;
                return Some(
                    (
                        StatusCode::TOO_MANY_REQUESTS,
                        [(header::RETRY_AFTER, "1")],
                        Json(json!({"error": "rate limit exceeded"})),
                    )
                        .into_response(),
                );
            }
        }
        drop(inner);
        if let Some(t) = &self.token {
            let ok = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v == format!("Bearer {t}"));
            if !ok {
                return Some(
                    (
                        StatusCode::UNAUTHORIZED,
                        Json(json!({"error": "missing or wrong bearer token"})),
                    )
                        .into_response(),
                );
            }
        }
        None
    }
}

fn not_found(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": format!("no account {id}")})),
    )
        .into_response()
}

async fn list_accounts(State(bank): State<Bank>, uri: Uri, headers: HeaderMap) -> Response {
    if let Some(r) = bank.refuse(&uri, &headers) {
        return r;
    }
    let inner = bank.inner.lock().unwrap();
    let accounts: Vec<Value> = inner
        .accounts
        .iter()
        .filter(|(_, a)| a.listed)
        .map(|(id, a)| json!({"account_id": id, "currency": a.currency}))
        .collect();
    Json(json!({ "accounts": accounts })).into_response()
}

async fn balance(
    State(bank): State<Bank>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = bank.refuse(&uri, &headers) {
        return r;
    }
    let inner = bank.inner.lock().unwrap();
    let Some(a) = inner.accounts.get(&id) else {
        return not_found(&id);
    };
    let etag = format!("\"v{}\"", a.version);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        == Some(etag.as_str())
    {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    let body = json!({
        "account_id": id,
        "available": money(a.available_cents),
        "currency": a.currency,
        "updated_at": a.updated_at,
    });
    ([(header::ETAG, etag)], Json(body)).into_response()
}

#[derive(Deserialize)]
struct TxQuery {
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

async fn transactions(
    State(bank): State<Bank>,
    Path(id): Path<String>,
    Query(q): Query<TxQuery>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = bank.refuse(&uri, &headers) {
        return r;
    }
    let inner = bank.inner.lock().unwrap();
    let Some(a) = inner.accounts.get(&id) else {
        return not_found(&id);
    };
    let start = match q.since.as_deref() {
        None | Some("") => 0,
        Some(c) => match decode_cursor(c) {
            Some(p) if p <= a.transactions.len() => p,
            _ => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": "invalid cursor"})),
                )
                    .into_response()
            }
        },
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let page: Vec<Value> = a.transactions[start..]
        .iter()
        .take(limit)
        .map(|t| json!({"id": t.id, "amount": money(t.amount_cents), "booked_at": t.booked_at}))
        .collect();
    let next = encode_cursor(start + page.len());
    Json(json!({ "transactions": page, "next_cursor": next })).into_response()
}
