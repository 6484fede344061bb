//! The daemon on the PostgreSQL store (`store: { backend: postgres }`):
//! a change is detected, committed to PostgreSQL and delivered; its
//! settings are checked at load; a sled store moves to PostgreSQL by
//! `state export` and `state import`.
//!
//! Needs a server at `POLLHOOK_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); without one it says
//! `SKIPPED` and passes, unless `POLLHOOK_TEST_REQUIRE_POSTGRES` is set
//! or `CI=true`. Each run uses a fresh schema and drops it afterwards.

use std::time::Duration;

use crate::support::*;

pub fn url() -> String {
    std::env::var("POLLHOOK_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub async fn connect() -> Option<tokio_postgres::Client> {
    let url = url();
    let tried = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(&url, tokio_postgres::NoTls),
    )
    .await;
    match tried {
        Ok(Ok((client, conn))) => {
            tokio::spawn(conn);
            Some(client)
        }
        other => {
            let why = match other {
                Ok(Err(e)) => format!("{e}: {:?}", std::error::Error::source(&e)),
                _ => "no answer in 5 s".into(),
            };
            if std::env::var_os("POLLHOOK_TEST_REQUIRE_POSTGRES").is_some_and(|v| !v.is_empty())
                || std::env::var("CI").is_ok_and(|v| v == "true")
            {
                panic!("no PostgreSQL at {url}: {why} (POLLHOOK_TEST_REQUIRE_POSTGRES or CI=true is set)");
            }
            eprintln!("SKIPPED (no PostgreSQL at {url}: {why}; set POLLHOOK_TEST_DATABASE_URL)");
            None
        }
    }
}

/// Drops the test's schema however the test ends.
pub struct Schema(pub String);

impl Schema {
    /// A new schema name of this run's own.
    pub fn fresh() -> Schema {
        Schema(format!("pollhook_it_{:016x}", rand::random::<u64>()))
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (url, schema) = (url(), self.0.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    let conn = tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                        .await;
                    drop(c);
                    let _ = conn.await;
                }
            })
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_on_postgres_commits_there_and_delivers() {
    let Some(db) = connect().await else {
        return;
    };
    let schema = Schema(format!("pollhook_it_{:016x}", rand::random::<u64>()));
    let bank = Bank::new(&["acc-0001"]);
    let addr = bank.serve("127.0.0.1:0").await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let endpoints = format!("  agent:\n    url: {}\n    secret: {}", rx.url, secret());
    let store = format!(
        "store: {{ backend: postgres, url: \"{}\", schema: {} }}",
        url(),
        schema.0
    );
    let mut d = Daemon::new(
        &balance_bridge(addr, "50ms", "[agent]", &endpoints, &store),
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.start().await;
    d.wait_polls(&["balances/default"], 1).await;
    bank.set_balance("acc-0001", 42_000);
    wait_for(
        "the change to be delivered",
        Duration::from_secs(20),
        || !rx.accepted().is_empty(),
    )
    .await;
    let got = rx.accepted();
    assert!(got.iter().all(|e| e.verified), "signed as usual");
    // The state is in PostgreSQL, not in a sled store in state_dir.
    let row = db
        .query_one(
            &format!(
                "SELECT count(*), bool_and((value->>'initialized')::bool) FROM \"{}\".state",
                schema.0
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1, "one instance state");
    assert!(row.get::<_, bool>(1), "its baseline committed");
    assert!(
        !d.state_dir().join("db").exists() && !d.state_dir().join("conf").exists(),
        "no sled store was created in state_dir"
    );
    let s = d.status().await;
    assert_eq!(s["endpoints"]["agent"]["queue_depth"], 0, "{s}");
    assert!(d.terminate().success());
    // Operator commands on the stopped daemon open the same PostgreSQL
    // store, not an empty sled store in state_dir.
    let out = d.command(&["state", "export"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"tree\":\"state\"") && text.contains("balances/default"),
        "{text}\n{stderr}"
    );
}

#[test]
fn postgres_settings_are_checked() {
    let bridge =
        |store: &str| format!("state_dir: state\n{store}\nsources: {{}}\nendpoints: {{}}\n");
    for (store, wanted) in [
        ("store:\n  backend: postgres", "store.url"),
        (
            "store:\n  backend: postgres\n  url: postgres://h/db\n  schema: Bad-Name",
            "lower-case identifier",
        ),
        (
            "store:\n  url: postgres://h/db",
            "only for `backend: postgres`",
        ),
        ("store:\n  backend: mysql", "backend"),
    ] {
        let d = Daemon::new(&bridge(store), &[]);
        let out = d.command(&["validate"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{store} was accepted");
        assert!(
            err.contains(wanted),
            "{store}: error lacks `{wanted}`:\n{err}"
        );
    }
}

/// The documented move from the embedded store to PostgreSQL: `state
/// export` of the stopped sled daemon, `store:` switched to postgres,
/// `state import`, start. The instance resumes where it was (no event
/// again, its sequence goes on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_store_moves_to_postgres_by_export_and_import() {
    let Some(_db) = connect().await else {
        return;
    };
    let schema = Schema::fresh();
    let bank = Bank::new(&["acc-0001"]);
    let addr = bank.serve("127.0.0.1:0").await;
    let rx = Receiver::start(&secret(), Plan::Always(204)).await;
    let endpoints = format!("  agent:\n    url: {}\n    secret: {}", rx.url, secret());
    let mut d = Daemon::new(
        &balance_bridge(addr, "50ms", "[agent]", &endpoints, ""),
        &[("bank-balance.yaml", repo_connector("bank-balance.yaml"))],
    );
    d.start().await;
    d.wait_polls(&["balances/default"], 1).await;
    bank.set_balance("acc-0001", 900_000);
    wait_for("the first change", Duration::from_secs(20), || {
        !rx.accepted().is_empty()
    })
    .await;
    assert!(d.terminate().success());
    let seen: Vec<_> = rx
        .accepted()
        .iter()
        .map(|d| (d.id.clone(), d.body.clone()))
        .collect();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let backup = d.dir.path().join("backup.jsonl");
    let out = d
        .command(&["state", "export", "-o", backup.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = format!(
        "store: {{ backend: postgres, url: \"{}\", schema: {} }}",
        url(),
        schema.0
    );
    std::fs::write(
        d.config(),
        balance_bridge(addr, "50ms", "[agent]", &endpoints, &store),
    )
    .unwrap();
    let out = d
        .command(&["state", "import", backup.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.start().await;
    let before = polls_of(&d.status().await, "balances/default");
    d.wait_polls(&["balances/default"], before + 3).await;
    assert_eq!(rx.accepted().len(), 1, "nothing detected again");
    bank.set_balance("acc-0001", 800_000);
    wait_for("the next change", Duration::from_secs(20), || {
        rx.accepted().len() == 2
    })
    .await;
    let got = rx.accepted();
    assert_eq!(got[1].body["sequence"], 2, "the sequence goes on");
    assert_eq!(
        got[1].body["data"]["previous"],
        got[0].body["data"]["current"]
    );
    assert!(d.terminate().success());
}
