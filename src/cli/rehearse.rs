//! Several polls of one source with the state kept between them:
//! `pollhook test --polls N` (live), `pollhook record --to DIR` (live, a
//! cassette written) and `pollhook test --replay DIR` (from a cassette,
//! with `--expect FILE` / `--update` to make a cassette and its output a
//! test). The polls themselves are the library's (`dryrun::polls`); this
//! is their setup (a temporary store), the printed report, and the
//! comparison with an expected output.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use pollhook::config::{Config, Source};
use pollhook::connector::cassette::{Cassette, Recorder};
use pollhook::dryrun::polls::{run_polls, Mode, Plan, PollsReport};
use pollhook::quota::HostGates;

use super::setup::runtime;

/// What is polled: a source of the bridge file, or a connector file with
/// its params.
pub struct Target {
    pub source: Arc<Source>,
    pub hosts: HostGates,
    pub user_agent: Option<String>,
}

impl Target {
    /// `target` as `pollhook test` reads it: a path ending in `.yaml` is a
    /// connector file (params from `--with`), anything else a source.
    pub fn resolve(config_file: &Path, target: &str, with: &[String]) -> anyhow::Result<Target> {
        if target.ends_with(".yaml") || target.ends_with(".yml") {
            let connector = pollhook::config::resolve::load_connector(Path::new(target))?;
            let mut pairs = Vec::new();
            for w in with {
                let Some((k, v)) = w.split_once('=') else {
                    bail!("--with `{w}`: expected KEY=VALUE");
                };
                pairs.push((k.trim().to_string(), v.to_string()));
            }
            let source =
                Source::for_connector(connector.into(), &pairs).map_err(anyhow::Error::msg)?;
            return Ok(Target {
                source: Arc::new(source),
                hosts: HostGates::new(&Default::default()),
                user_agent: None,
            });
        }
        if !with.is_empty() {
            bail!(
                "--with is for connector files; a source takes its params from `with:` in {}",
                config_file.display()
            );
        }
        let config = Config::load(config_file)?;
        let Some(source) = config.source(target) else {
            let names: Vec<&str> = config.sources.iter().map(|s| s.name.as_str()).collect();
            bail!(
                "no source named `{target}` in {} (sources: {})",
                config.file.display(),
                names.join(", ")
            );
        };
        Ok(Target {
            source: source.clone(),
            hosts: HostGates::new(&config.hosts),
            user_agent: config.user_agent.clone(),
        })
    }

    /// Every secret of every instance: masked in a cassette, and from the
    /// URLs compared with it.
    fn secrets(&self) -> Vec<String> {
        self.source
            .instances
            .iter()
            .flat_map(|i| i.secrets.iter().cloned())
            .collect()
    }
}

/// How many polls, how far apart, from where, compared with what.
pub struct Rehearsal<'a> {
    pub instance: Option<&'a str>,
    pub polls: u32,
    pub every: Duration,
    pub replay: Option<&'a Path>,
    pub expect: Option<&'a Path>,
    pub update: bool,
}

/// `pollhook test --polls N` and `pollhook test --replay DIR`.
pub fn test(target: &Target, r: &Rehearsal<'_>) -> anyhow::Result<ExitCode> {
    let cassette = match r.replay {
        Some(dir) => Some(Cassette::load(dir, target.secrets())?),
        None => None,
    };
    let mode = match &cassette {
        Some(c) => Mode::Replay(c),
        None => Mode::Live,
    };
    let report = polls(target, r, mode)?;
    let text = render(&report);
    let Some(expect) = r.expect else {
        print!("{text}");
        return Ok(exit(report.failed()));
    };
    if r.update {
        std::fs::write(expect, &text).with_context(|| format!("writing {}", expect.display()))?;
        print!("{text}");
        println!("(written to {})", expect.display());
        return Ok(ExitCode::SUCCESS);
    }
    let expected = std::fs::read_to_string(expect)
        .with_context(|| format!("reading {} (`--update` writes it)", expect.display()))?;
    match first_difference(&expected, &text) {
        None => {
            print!("{text}");
            println!("(as expected in {})", expect.display());
            Ok(ExitCode::SUCCESS)
        }
        Some(diff) => {
            print!("{text}");
            println!(
                "the output differs from {} (`--update` rewrites it):\n{diff}",
                expect.display()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `pollhook record SOURCE --to DIR`.
pub fn record(target: &Target, r: &Rehearsal<'_>, to: &Path) -> anyhow::Result<ExitCode> {
    let recorder = Recorder::default();
    let report = polls(target, r, Mode::Record(&recorder))?;
    let written = recorder.write(to, &target.secrets())?;
    print!("{}", render(&report));
    println!(
        "recorded {written} exchange(s) of {} poll(s) in {}",
        report.polls.len(),
        to.display()
    );
    Ok(exit(report.failed()))
}

fn exit(failed: bool) -> ExitCode {
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs the polls with a new store in a temporary directory, removed after.
fn polls(target: &Target, r: &Rehearsal<'_>, mode: Mode<'_>) -> anyhow::Result<PollsReport> {
    let dir = TempDir::new()?;
    let rt = runtime()?;
    let report = rt.block_on(async {
        let store = pollhook::store::Store::open(&dir.0)
            .with_context(|| format!("opening a store in {}", dir.0.display()))?;
        let plan = Plan {
            polls: r.polls,
            every: r.every,
            mode,
            only: r.instance,
            user_agent: target.user_agent.as_deref(),
        };
        let report = run_polls(&target.source, &target.hosts, &store, &plan).await?;
        store.flush().await?;
        anyhow::Ok(report)
    })?;
    Ok(report)
}

/// A directory of our own under the system's temporary directory, removed
/// when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("pollhook-test-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The report as text: one section per poll, one block per instance.
/// Deterministic: the same report gives the same bytes (no byte counts,
/// which a replayed body no longer has). Pure.
pub fn render(r: &PollsReport) -> String {
    let mut o = String::new();
    for p in &r.polls {
        let at = p.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let _ = writeln!(o, "== poll {} at {at}", p.number);
        for i in &p.instances {
            let _ = writeln!(o, "-- {} (connector {})", i.key, r.connector);
            for q in &i.requests {
                let what = match (q.status, i.not_modified, q.records) {
                    (304, true, _) => " (not modified)".to_string(),
                    (_, _, Some(n)) => format!(" ({n} records)"),
                    _ => String::new(),
                };
                let _ = writeln!(o, "   {} {} -> {}{what}", q.method, q.url, q.status);
            }
            if let Some(w) = &i.warning {
                let _ = writeln!(o, "   warning: {w}");
            }
            if i.requests.is_empty() && i.error.is_none() {
                // Put off by the connector's `rate_limit`: nothing sent.
                continue;
            }
            if let Some(e) = &i.error {
                let _ = writeln!(o, "   {e}");
                if i.records.is_empty() {
                    continue;
                }
            }
            if i.not_modified {
                let _ = writeln!(o, "   not modified: nothing to detect, the state stays");
                continue;
            }
            for v in &i.records {
                let changed = if v.changed.is_empty() {
                    String::new()
                } else {
                    format!(" (changed: {})", v.changed.join(", "))
                };
                let _ = writeln!(o, "   record {}: {}{changed}", v.record, v.outcome);
                for (when, value) in &v.filtered {
                    let _ = writeln!(o, "     when `{when}` -> {value}");
                }
            }
            let _ = writeln!(
                o,
                "   cursor: {} -> {}",
                i.cursor_before.as_deref().unwrap_or("(none)"),
                i.cursor_after.as_deref().unwrap_or("(none)")
            );
            let _ = writeln!(o, "   {} event(s)", i.events.len());
            for (id, body) in &i.events {
                let _ = writeln!(o, "   webhook-id {id}:");
                let pretty = serde_json::from_str::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| serde_json::to_string_pretty(&v).ok())
                    .unwrap_or_else(|| body.clone());
                for line in pretty.lines() {
                    let _ = writeln!(o, "     {line}");
                }
            }
        }
    }
    o
}

/// Lines of context shown around the first difference.
const CONTEXT: usize = 2;
/// Lines shown of each side from the first difference.
const SHOWN: usize = 6;

/// Where `actual` first departs from `expected`, as a small unified-style
/// diff (`-` expected, `+` actual), or `None` when they are the same.
/// Pure.
pub fn first_difference(expected: &str, actual: &str) -> Option<String> {
    if expected == actual {
        return None;
    }
    let e: Vec<&str> = expected.lines().collect();
    let a: Vec<&str> = actual.lines().collect();
    let at = e
        .iter()
        .zip(&a)
        .position(|(x, y)| x != y)
        .unwrap_or(e.len().min(a.len()));
    let mut out = format!("@@ line {} @@\n", at + 1);
    for line in &e[at.saturating_sub(CONTEXT)..at] {
        let _ = writeln!(out, " {line}");
    }
    for line in e.iter().skip(at).take(SHOWN) {
        let _ = writeln!(out, "-{line}");
    }
    for line in a.iter().skip(at).take(SHOWN) {
        let _ = writeln!(out, "+{line}");
    }
    if e.len() == a.len() && at == e.len() {
        out.push_str("(only the line endings differ)\n");
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_difference_is_shown_with_context() {
        assert_eq!(first_difference("a\nb\n", "a\nb\n"), None);
        let d = first_difference("a\nb\nc\nd\n", "a\nb\nX\nd\n").unwrap();
        assert_eq!(d, "@@ line 3 @@\n a\n b\n-c\n-d\n+X\n+d\n");
        let d = first_difference("a\n", "a\nmore\n").unwrap();
        assert_eq!(d, "@@ line 2 @@\n a\n+more\n");
    }
}
