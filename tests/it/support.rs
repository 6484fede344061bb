//! Shared helpers: fixture servers (`serve`), a receiver that verifies with
//! the reference Standard Webhooks library (`Receiver`, answering by its
//! `Plan`), the usual bridges (`balance_bridge`, `one_source_bridge`) and
//! repository connectors, the real `pollhook` binary in a temp dir
//! (`Daemon`), and waiting on conditions with deadlines (`wait_for`, never
//! sleeping and hoping).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::Value;

pub use crate::bank::Bank;

/// Waits until `f` is true, failing the test with `what` at the deadline.
pub async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Serves `app` on a free port of 127.0.0.1 in the background.
pub async fn serve(app: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// One webhook as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: Value,
    pub raw: Vec<u8>,
    /// The reference verifier accepted it with the receiver's secret.
    pub verified: bool,
    /// What the receiver answered.
    pub answered: u16,
}

/// How the receiver answers.
pub enum Plan {
    /// Always this status.
    Always(u16),
    /// These statuses in order, then 204.
    Script(VecDeque<u16>),
    /// Fail this share of requests with 500 (deterministic xorshift).
    Flaky { fail_per_mille: u64, rng: u64 },
    /// Hold each request this long, then answer 204. Logged on arrival with
    /// `answered: 0`: whether the sender waited for the answer is its
    /// business.
    Slow(Duration),
}

struct ReceiverState {
    verifier: standardwebhooks::Webhook,
    plan: Plan,
    log: Vec<Delivery>,
}

/// An agent endpoint on 127.0.0.1.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    pub async fn start(secret: &str, plan: Plan) -> Receiver {
        let state = Arc::new(Mutex::new(ReceiverState {
            verifier: standardwebhooks::Webhook::new(secret).unwrap(),
            plan,
            log: Vec::new(),
        }));
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        let addr = serve(app).await;
        Receiver {
            url: format!("http://{addr}/hook"),
            state,
        }
    }

    pub fn set_plan(&self, plan: Plan) {
        self.state.lock().unwrap().plan = plan;
    }

    /// Every request received, in order.
    pub fn all(&self) -> Vec<Delivery> {
        self.state.lock().unwrap().log.clone()
    }

    /// Requests answered with 2xx, in order.
    pub fn accepted(&self) -> Vec<Delivery> {
        self.all()
            .into_iter()
            .filter(|d| (200..300).contains(&d.answered))
            .collect()
    }

    /// Accepted deliveries of one event type.
    pub fn accepted_of(&self, kind: &str) -> Vec<Delivery> {
        self.accepted()
            .into_iter()
            .filter(|d| d.body["type"] == kind)
            .collect()
    }
}

async fn receive(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let (answered, hold) = record(&state, &headers, &body);
    if let Some(d) = hold {
        tokio::time::sleep(d).await;
        return StatusCode::NO_CONTENT;
    }
    StatusCode::from_u16(answered).unwrap()
}

/// Logs a request and decides the answer (and how long to hold it).
fn record(
    state: &Mutex<ReceiverState>,
    headers: &HeaderMap,
    body: &Bytes,
) -> (u16, Option<Duration>) {
    let mut s = state.lock().unwrap();
    let verified = s.verifier.verify(body, headers).is_ok();
    let mut hold = None;
    let answered = match &mut s.plan {
        Plan::Slow(d) => {
            hold = Some(*d);
            0
        }
        Plan::Always(c) => *c,
        Plan::Script(q) => q.pop_front().unwrap_or(204),
        Plan::Flaky {
            fail_per_mille,
            rng,
        } => {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            if *rng % 1000 < *fail_per_mille {
                500
            } else {
                204
            }
        }
    };
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    s.log.push(Delivery {
        id: h("webhook-id"),
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
        raw: body.to_vec(),
        verified,
        answered,
    });
    (answered, hold)
}

/// A bridge with one source, `balances`, polling `acc-0001` of the mock
/// bank at `bank` every `every` with the repository's `bank-balance`
/// connector and delivering to `deliver_to` (a YAML list); `endpoints` is
/// the body of the `endpoints:` block, `extra` more top-level keys.
pub fn balance_bridge(
    bank: impl std::fmt::Display,
    every: &str,
    deliver_to: &str,
    endpoints: &str,
    extra: &str,
) -> String {
    format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
{extra}
sources:
  balances:
    connector: bank-balance
    with: {{ base_url: "http://{bank}", account: acc-0001 }}
    schedule: every {every}
    deliver_to: {deliver_to}
endpoints:
{endpoints}
"#
    )
}

/// A bridge with one source, `source`, polling the test's `connector` at
/// `http://{upstream}` every `every` and delivering to one endpoint,
/// `agent`, at `endpoint`; `extra` holds more top-level keys (a store, no
/// admin server: then it replaces the admin line).
pub fn one_source_bridge(
    source: &str,
    connector: &str,
    upstream: std::net::SocketAddr,
    every: &str,
    endpoint: &str,
    extra: &str,
) -> String {
    let top = if extra.is_empty() {
        r#"admin: { listen: "127.0.0.1:0" }"#
    } else {
        extra
    };
    format!(
        r#"
state_dir: state
{top}
sources:
  {source}:
    connector: {connector}
    with: {{ base_url: "http://{upstream}" }}
    schedule: every {every}
    deliver_to: [agent]
endpoints:
  agent: {{ url: "{endpoint}", secret: "{secret}" }}
"#,
        secret = secret()
    )
}

/// The repository's own connector files, so tests run the real connectors.
pub fn repo_connector(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("connectors")
            .join(name),
    )
    .unwrap()
}

pub fn secret() -> String {
    // A fixed, valid secret; tests that need another generate one.
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string()
}

/// An instance's successful polls in a `/status`: those that read an
/// answer (`polls_ok`) and those answered `304 Not Modified`, which
/// `/status` counts apart.
pub fn polls_of(status: &Value, instance: &str) -> u64 {
    let i = &status["instances"][instance];
    i["polls_ok"].as_u64().unwrap_or(0) + i["polls_not_modified"].as_u64().unwrap_or(0)
}

/// A config directory with the real `pollhook` binary run on it.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    /// Extra environment of every command (`NOTIFY_SOCKET`, …).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    /// The thread copying the daemon's stderr into `log`: joined after an
    /// exit, so that `log()` then holds the last lines too.
    reader: Option<std::thread::JoinHandle<()>>,
    pub admin: Option<String>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pollhook")
}

impl Daemon {
    /// Writes `bridge.yaml` and `connectors/*.yaml` into a new temp dir.
    pub fn new(bridge: &str, connectors: &[(&str, String)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("connectors")).unwrap();
        std::fs::write(dir.path().join("bridge.yaml"), bridge).unwrap();
        for (name, text) in connectors {
            std::fs::write(dir.path().join("connectors").join(name), text).unwrap();
        }
        Daemon {
            dir,
            env: Vec::new(),
            child: None,
            log: Arc::new(Mutex::new(String::new())),
            reader: None,
            admin: None,
        }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("bridge.yaml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A `pollhook` command on this config (for one-shot subcommands).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.arg("--config")
            .arg(self.config())
            .args(args)
            .env("POLLHOOK_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    /// Starts `pollhook run` and waits until its admin server answers.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let addr_file = self.state_dir().join("admin.addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut child = self
            .command(&["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pollhook");
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        self.reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push_str(&(line + "\n"));
            }
        }));
        self.child = Some(child);
        let log = self.log.clone();
        wait_for(
            "pollhook to write admin.addr",
            Duration::from_secs(30),
            || {
                assert!(
                    !log.lock().unwrap().contains("Error"),
                    "pollhook failed to start:\n{}",
                    log.lock().unwrap()
                );
                addr_file.exists()
                    && std::fs::read_to_string(&addr_file).is_ok_and(|s| !s.is_empty())
            },
        )
        .await;
        self.admin = Some(std::fs::read_to_string(&addr_file).unwrap());
    }

    /// `GET /status` of the running daemon.
    pub async fn status(&self) -> Value {
        let url = format!("http://{}/status", self.admin.as_ref().expect("started"));
        serde_json::from_slice(&reqwest::get(url).await.unwrap().bytes().await.unwrap()).unwrap()
    }

    /// Waits until `/status` satisfies `done`, failing with `what` and the
    /// last status at the deadline; returns that status.
    pub async fn wait_status(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status().await;
            if done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "never {what}: {s:#}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every named instance has at least `n` successful polls
    /// (see [`polls_of`]).
    pub async fn wait_polls(&self, instances: &[&str], n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status().await;
            if instances.iter().all(|i| polls_of(&s, i) >= n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "instances {instances:?} never reached {n} polls: {s:#}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The running daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL: no chance to flush or finish anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        self.drain_log();
    }

    /// Waits until everything the exited daemon wrote is in `log`.
    fn drain_log(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let status = c.wait().unwrap();
        self.drain_log();
        status
    }

    /// Waits (blocking) for the daemon to exit by itself; panics past
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        let c = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                self.child = None;
                self.drain_log();
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon did not exit within {timeout:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
