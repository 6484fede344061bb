//! `pollhook test`: one poll of each instance of a source, from an empty
//! state, reporting the requests made, what each record would do, and the
//! exact event bodies; or, with a store (`--seed`), committing the first
//! state without events. Returns a typed [`Report`]; printing it is the
//! CLI's business. Every text in the report is already masked.

pub mod polls;

use chrono::Utc;

use crate::config::Source;
use crate::connector::auth::TokenCache;
use crate::connector::detect::detect;
use crate::connector::fetch::{fetch, FetchEnv};
use crate::connector::mask;
use crate::connector::spec::Baseline;
use crate::quota::HostGates;
use crate::store::{InstanceState, Store};

/// What a dry run found.
#[derive(Debug, Default)]
pub struct Report {
    pub source: String,
    pub connector: String,
    /// `for_each: discover`: the discovery, before the instances.
    pub discovery: Option<Discovery>,
    pub instances: Vec<InstanceReport>,
}

impl Report {
    /// Whether anything failed (the command's exit status).
    pub fn failed(&self) -> bool {
        self.discovery.as_ref().is_some_and(|d| d.error.is_some())
            || self.instances.iter().any(|i| i.error.is_some())
    }
}

#[derive(Debug, Default)]
pub struct Discovery {
    /// Instance names and their params as `key=value`.
    pub found: Vec<(String, Vec<String>)>,
    pub error: Option<String>,
}

/// One instance's dry run.
#[derive(Debug, Default)]
pub struct InstanceReport {
    pub key: String,
    /// Each request: method, URL, status, bytes, records.
    pub requests: Vec<Request>,
    pub warning: Option<String>,
    /// Poll or detection failure.
    pub error: Option<String>,
    /// What each record of the listing would do.
    pub notes: Vec<(String, String)>,
    pub cursor_before: Option<String>,
    pub cursor_after: Option<String>,
    /// `(webhook-id, body)` of each event that would be sent.
    pub events: Vec<(String, String)>,
    /// `--seed`: what was stored, or why nothing was.
    pub seeded: Option<Seeded>,
}

#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub url: String,
    pub status: u16,
    pub bytes: usize,
    pub records: Option<usize>,
}

#[derive(Debug)]
pub enum Seeded {
    /// The instance already had state: left alone.
    AlreadyHad { cursor: Option<String> },
    Stored {
        cursor: Option<String>,
        seen: usize,
        known: usize,
        snapshot: bool,
    },
}

/// Why a dry run could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum DryRunError {
    #[error("source `{source_name}` has no instance `{wanted}` (instances: {known})")]
    NoInstance {
        source_name: String,
        wanted: String,
        known: String,
    },
    #[error("source `{0}` discovers its instances (`for_each: discover`): several polls, record and replay take a source with listed instances")]
    Discovered(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// The instances to poll: `only`, or all of them.
fn chosen(
    src: &Source,
    instances: &[std::sync::Arc<crate::config::Instance>],
    only: Option<&str>,
) -> Result<Vec<std::sync::Arc<crate::config::Instance>>, DryRunError> {
    if let Some(o) = only {
        if !instances.iter().any(|i| i.name() == o) {
            let names: Vec<&str> = instances.iter().map(|i| i.name()).collect();
            return Err(DryRunError::NoInstance {
                source_name: src.name.clone(),
                wanted: o.to_string(),
                known: names.join(", "),
            });
        }
    }
    Ok(instances
        .iter()
        .filter(|i| only.is_none_or(|o| o == i.name()))
        .cloned()
        .collect())
}

/// The requests of a poll as the report shows them (masked by `m`).
fn requests_of(
    fetched: &crate::connector::fetch::Fetched,
    m: &dyn Fn(&str) -> String,
) -> Vec<Request> {
    fetched
        .log
        .iter()
        .map(|l| Request {
            method: l.method.to_string(),
            url: m(&l.url),
            status: l.status,
            bytes: l.bytes,
            records: l.items,
        })
        .collect()
}

/// Polls each instance of `src` (only `only` when given) once.
///
/// Without `store`, detection starts from an empty state with the
/// baseline forced to `emit` (the report says so), to show what would be
/// sent. With `store`, it starts from the stored state with the baseline
/// skipped and commits that state without events (seeding).
pub async fn run(
    src: &Source,
    hosts: &HostGates,
    only: Option<&str>,
    store: Option<&Store>,
    user_agent: Option<&str>,
) -> Result<Report, DryRunError> {
    let user_agent: Option<std::sync::Arc<str>> = user_agent.map(Into::into);
    let client = crate::daemon::poll_client();
    let tokens = TokenCache::default();
    let env = FetchEnv {
        client: &client,
        hosts,
        rate_limit: None,
        tokens: &tokens,
        user_agent: user_agent.clone(),
    };
    let mut report = Report {
        source: src.name.clone(),
        connector: src.connector.name.clone(),
        ..Default::default()
    };
    let mut instances = src.instances.clone();
    if src.discovered {
        let (d, found) = discovery(src, &env).await;
        let failed = d.error.is_some();
        report.discovery = Some(d);
        if failed {
            return Ok(report);
        }
        instances.extend(found);
    }
    for inst in &chosen(src, &instances, only)? {
        report
            .instances
            .push(dry_run_instance(src, inst, &env, store).await?);
    }
    Ok(report)
}

/// `for_each: discover`: the listing as the report shows it (masked) and
/// the instances it found.
async fn discovery(
    src: &Source,
    env: &FetchEnv<'_>,
) -> (Discovery, Vec<std::sync::Arc<crate::config::Instance>>) {
    let mut d = Discovery::default();
    let mut instances = Vec::new();
    match crate::discover::discover(src, env, Utc::now()).await {
        Ok(found) => {
            for f in &found {
                let params = f
                    .with
                    .iter()
                    .map(|(k, v)| format!("{k}={}", crate::config::scalar_text(v)))
                    .collect();
                d.found.push((f.name.clone(), params));
                instances.push(std::sync::Arc::new(
                    src.discovered_instance(&f.name, &f.with),
                ));
            }
        }
        Err(e) => {
            let secrets = src.discovered_instance("-", &Default::default()).secrets;
            d.error = Some(mask(&e.to_string(), &secrets));
        }
    }
    (d, instances)
}

/// One instance's poll, detection and (with `store`) seeding. A failed
/// poll or detection is the instance's report; only the store failing
/// stops the whole run.
async fn dry_run_instance(
    src: &Source,
    inst: &crate::config::Instance,
    env: &FetchEnv<'_>,
    store: Option<&Store>,
) -> Result<InstanceReport, DryRunError> {
    let mut r = InstanceReport {
        key: inst.key.to_string(),
        ..Default::default()
    };
    let m = |t: &str| mask(t, &inst.secrets);
    let empty = InstanceState::default();
    let now = Utc::now();
    let fetched = match fetch(&src.connector, inst, &empty, env, now).await {
        Ok(f) => f,
        Err(e) => {
            r.error = Some(format!("poll failed: {}", m(&e.to_string())));
            return Ok(r);
        }
    };
    r.requests = requests_of(&fetched, &m);
    r.warning = fetched.warning.as_deref().map(m);
    let (from, baseline) = match store {
        Some(store) => {
            let stored = store.load_state(&inst.key).await?;
            if stored.initialized {
                r.seeded = Some(Seeded::AlreadyHad {
                    cursor: stored.cursor,
                });
                return Ok(r);
            }
            (stored, Baseline::Skip)
        }
        None => (empty.clone(), Baseline::Emit),
    };
    let d = match detect(
        &src.connector,
        &inst.vars(),
        &from,
        &fetched.pages,
        now,
        Some(baseline),
        fetched.listing(),
    ) {
        Ok(d) => d,
        Err(e) => {
            r.error = Some(format!("detection failed: {}", m(&e.to_string())));
            return Ok(r);
        }
    };
    r.notes = d
        .notes
        .iter()
        .map(|n| (n.record.to_string(), n.outcome.to_string()))
        .collect();
    let (next, events) = crate::poll::prepare_commit(src, inst, &from, d, &fetched, now);
    r.cursor_before = from.cursor.clone();
    r.cursor_after = next.cursor.clone();
    if let Some(store) = store {
        store.commit_poll(&inst.key, &next, &[]).await?;
        r.seeded = Some(Seeded::Stored {
            cursor: next.cursor.clone(),
            seen: next.seen.len(),
            known: next.known.len(),
            snapshot: next.snapshot.is_some(),
        });
    } else {
        r.events = events
            .iter()
            .map(|e| (e.id.clone(), m(&e.body())))
            .collect();
    }
    Ok(r)
}
