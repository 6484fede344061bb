//! Several polls in a row, the state of each kept for the next, as the
//! daemon would run them: `pollhook test --polls N` (live), `pollhook
//! record` (live, every exchange kept in a cassette) and `pollhook test
//! --replay` (the cassette answers, nothing goes on the network).
//!
//! Why a store and not a state in memory: the state goes through a real
//! store (sled, in a directory the caller gives, normally a temporary one)
//! between polls, so what the next poll starts from is what the daemon
//! would have read back. Why the cassette's clock: a replay renders `now`,
//! stamps events and names them with the time each recorded poll ran, so
//! the same cassette prints the same report, byte for byte.

use std::time::Duration;

use chrono::{DateTime, DurationRound, Utc};

use super::{DryRunError, Request};
use crate::config::{Instance, Source};
use crate::connector::auth::TokenCache;
use crate::connector::cassette::{Cassette, Recorder};
use crate::connector::detect::{changed_fields, detect};
use crate::connector::fetch::{fetch_via, FetchEnv, PollError};
use crate::connector::mask;
use crate::connector::transport::Transport;
use crate::quota::{HostGates, RateLimit};
use crate::store::{InstanceState, Store};

/// Where the polls' requests go.
#[derive(Clone, Copy)]
pub enum Mode<'a> {
    /// The network (`--polls N`).
    Live,
    /// The network, every exchange kept (`pollhook record`).
    Record(&'a Recorder),
    /// The cassette's polls, in order (`--replay`): as many polls as it
    /// holds, each at its recorded time.
    Replay(&'a Cassette),
}

/// What the polls found.
#[derive(Debug, Default)]
pub struct PollsReport {
    pub source: String,
    pub connector: String,
    pub polls: Vec<PollReport>,
}

impl PollsReport {
    /// Whether some poll of some instance failed.
    pub fn failed(&self) -> bool {
        self.polls
            .iter()
            .flat_map(|p| &p.instances)
            .any(|i| i.error.is_some())
    }
}

/// One round: every instance polled once.
#[derive(Debug)]
pub struct PollReport {
    /// From 1.
    pub number: u32,
    pub at: DateTime<Utc>,
    pub instances: Vec<InstancePoll>,
}

/// One instance's poll.
#[derive(Debug, Default)]
pub struct InstancePoll {
    pub key: String,
    pub requests: Vec<Request>,
    /// A conditional request was answered `304 Not Modified`: nothing was
    /// detected, the state stays.
    pub not_modified: bool,
    pub warning: Option<String>,
    pub error: Option<String>,
    pub records: Vec<Verdict>,
    pub cursor_before: Option<String>,
    pub cursor_after: Option<String>,
    /// `(webhook-id, body)` of each event that would be delivered.
    pub events: Vec<(String, String)>,
}

/// What one record of the listing came to.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub record: String,
    /// Detection's words (`created; emits …`, `unchanged`, `seen before`,
    /// `first poll: remembered as the baseline, …`).
    pub outcome: String,
    /// For an updated item: the fields that changed (dotted paths).
    pub changed: Vec<String>,
    /// For a record no rule emitted for: each rule's `when` as written and
    /// its value.
    pub filtered: Vec<(String, bool)>,
}

/// The polls' settings.
pub struct Plan<'a> {
    /// Live and record: how many rounds (a replay runs the cassette's).
    pub polls: u32,
    /// Live and record: the wait between rounds.
    pub every: Duration,
    pub mode: Mode<'a>,
    /// Only this instance.
    pub only: Option<&'a str>,
    pub user_agent: Option<&'a str>,
}

/// Runs the plan's polls of `src` with the state kept in `store` (which
/// should be empty: each instance starts as the daemon's first poll does,
/// with the connector's own `baseline`).
pub async fn run_polls(
    src: &Source,
    hosts: &HostGates,
    store: &Store,
    plan: &Plan<'_>,
) -> Result<PollsReport, DryRunError> {
    if src.discovered {
        return Err(DryRunError::Discovered(src.name.clone()));
    }
    let instances = super::chosen(src, &src.instances, plan.only)?;
    let client = crate::daemon::poll_client();
    let tokens = TokenCache::default();
    let user_agent: Option<std::sync::Arc<str>> = plan.user_agent.map(Into::into);
    // The connector's `rate_limit` per instance, as the daemon counts it
    // (in the store for slow ones). Not on replay: nothing is sent.
    let limits: Vec<Option<RateLimit>> = instances
        .iter()
        .map(|inst| match (plan.mode, src.connector.rate_limit) {
            (Mode::Replay(_), _) | (_, None) => None,
            (_, Some(r)) => Some(RateLimit::new(r, &inst.key, store)),
        })
        .collect();
    let transport = match plan.mode {
        Mode::Live => Transport::Live(&client),
        Mode::Record(r) => Transport::Record(&client, r),
        Mode::Replay(c) => Transport::Replay(c),
    };
    let rounds = match plan.mode {
        Mode::Replay(c) => c.polls().len() as u32,
        _ => plan.polls,
    };
    let mut report = PollsReport {
        source: src.name.clone(),
        connector: src.connector.name.clone(),
        polls: Vec::new(),
    };
    for number in 1..=rounds {
        if number > 1 && !matches!(plan.mode, Mode::Replay(_)) {
            tokio::time::sleep(plan.every).await;
        }
        let at = round_time(plan.mode, number);
        let mut round = PollReport {
            // On replay, the poll's number in the cassette (a poll that
            // sent nothing while recording left no file).
            number: match plan.mode {
                Mode::Replay(c) => c.polls()[number as usize - 1].poll,
                _ => number,
            },
            at,
            instances: Vec::new(),
        };
        for (inst, limit) in instances.iter().zip(&limits) {
            let env = FetchEnv {
                client: &client,
                hosts,
                rate_limit: limit.as_ref(),
                tokens: &tokens,
                user_agent: user_agent.clone(),
            };
            match plan.mode {
                Mode::Live => {}
                Mode::Record(r) => r.begin_poll(number, at, &inst.key),
                Mode::Replay(c) => c.begin_poll(number as usize - 1, &inst.key),
            }
            let mut poll = poll_one(src, inst, store, &env, transport, at).await?;
            if let Mode::Replay(c) = plan.mode {
                let unasked = c.unasked();
                if !unasked.is_empty() && poll.error.is_none() {
                    poll.error = Some(format!(
                        "the pipeline sent fewer requests than the cassette holds for this poll: {} not asked for",
                        unasked.join(", ")
                    ));
                }
            }
            round.instances.push(poll);
        }
        report.polls.push(round);
    }
    Ok(report)
}

/// The time round `number` runs at: the recorded one on replay, else now
/// to the millisecond, as a cassette keeps it.
fn round_time(mode: Mode<'_>, number: u32) -> DateTime<Utc> {
    match mode {
        Mode::Replay(c) => c.polls()[number as usize - 1].at,
        Mode::Live | Mode::Record(_) => Utc::now()
            .duration_trunc(chrono::Duration::milliseconds(1))
            .unwrap_or_else(|_| Utc::now()),
    }
}

/// One instance's poll: fetch, detect, commit the state (no outbox: the
/// events are only shown).
async fn poll_one(
    src: &Source,
    inst: &Instance,
    store: &Store,
    env: &FetchEnv<'_>,
    transport: Transport<'_>,
    at: DateTime<Utc>,
) -> Result<InstancePoll, DryRunError> {
    let m = |t: &str| mask(t, &inst.secrets);
    let mut r = InstancePoll {
        key: inst.key.to_string(),
        ..Default::default()
    };
    let state = store.load_state(&inst.key).await?;
    r.cursor_before = state.cursor.clone();
    r.cursor_after = state.cursor.clone();
    let fetched = match fetch_via(&src.connector, inst, &state, env, transport, at, None).await {
        Ok(f) => f,
        // Not a failure: the daemon, too, puts the poll off.
        Err(e @ PollError::Deferred { .. }) => {
            r.warning = Some(format!("poll put off: {e}"));
            return Ok(r);
        }
        Err(e) => {
            r.error = Some(format!("poll failed: {}", m(&e.to_string())));
            return Ok(r);
        }
    };
    r.requests = super::requests_of(&fetched, &m);
    r.warning = fetched.warning.as_deref().map(m);
    if fetched.not_modified {
        r.not_modified = true;
        return Ok(r);
    }
    let d = match detect(
        &src.connector,
        &inst.vars(),
        &state,
        &fetched.pages,
        at,
        None,
        fetched.listing(),
    ) {
        Ok(d) => d,
        Err(e) => {
            r.error = Some(format!("detection failed: {}", m(&e.to_string())));
            return Ok(r);
        }
    };
    let notes: Vec<(String, String)> = d
        .notes
        .iter()
        .map(|n| (n.record.clone(), n.outcome.clone()))
        .collect();
    if !d.refused.is_empty() {
        r.error = Some(m(&d.refused.join("; ")));
    }
    let (next, events) = crate::poll::prepare_commit(src, inst, &state, d, &fetched, at);
    r.records = verdicts(&notes, &state, &next, &m);
    let filtered = filtered_by(&src.connector);
    for v in &mut r.records {
        if v.outcome.contains(NO_WHEN_TRUE) {
            v.filtered = filtered.clone();
        }
    }
    r.cursor_after = next.cursor.clone();
    r.events = events
        .iter()
        .map(|e| (e.id.clone(), m(&e.body())))
        .collect();
    // Written as the daemon writes it, when something changed.
    if next != state {
        store.commit_poll(&inst.key, &next, &[]).await?;
    }
    Ok(r)
}

/// How detection says that no rule's `when` held for a record.
const NO_WHEN_TRUE: &str = "no `when` condition is true";

/// Each rule's `when` as written, with the value it had for a record that
/// no rule emitted for: false, every one (a rule without `when` would have
/// fired).
fn filtered_by(c: &crate::connector::spec::Connector) -> Vec<(String, bool)> {
    c.emit
        .iter()
        .filter_map(|r| r.when_source.clone())
        .map(|w| (w, false))
        .collect()
}

/// Detection's notes as verdicts, each updated item with the fields that
/// changed between its known version before and after. Pure.
fn verdicts(
    notes: &[(String, String)],
    before: &InstanceState,
    after: &InstanceState,
    m: &dyn Fn(&str) -> String,
) -> Vec<Verdict> {
    notes
        .iter()
        .map(|(record, outcome)| {
            let changed = match (
                outcome.starts_with("updated"),
                before.known.get(record),
                after.known.get(record),
            ) {
                (true, Some(b), Some(a)) => changed_fields(&b.item, &a.item),
                _ => Vec::new(),
            };
            Verdict {
                record: m(record),
                outcome: m(outcome),
                changed,
                filtered: Vec::new(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::KnownItem;

    #[test]
    fn an_updated_item_names_its_changed_fields() {
        let mut before = InstanceState::default();
        let mut after = InstanceState::default();
        let item = |v: i64| KnownItem {
            version: v.to_string(),
            item: serde_json::json!({"id": "a", "amount": v, "cur": "EUR"}),
        };
        before.known.insert("a".into(), item(1));
        after.known.insert("a".into(), item(2));
        let notes = vec![
            ("a".to_string(), "updated; emits x".to_string()),
            ("b".to_string(), "unchanged".to_string()),
        ];
        let v = verdicts(&notes, &before, &after, &|t: &str| t.to_string());
        assert_eq!(v[0].changed, ["amount"]);
        assert!(v[1].changed.is_empty());
    }
}
