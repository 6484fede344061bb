//! The commands that need no running daemon: `run` (the daemon itself),
//! `validate`, `test`, `schema`, `secret generate`, `verify`.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use pollhook::config::Config;
use pollhook::deliver::sign::{self, SigningKey};
use pollhook::dryrun;
use tokio_util::sync::CancellationToken;

use super::output::print_report;
use super::rehearse::{self, Rehearsal, Target};
use super::setup::{runtime, watch_signals};
use crate::cli::args::SchemaKind;

/// `pollhook run`: the daemon until SIGINT or SIGTERM.
pub fn run(config_file: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_file)?;
    let rt = runtime()?;
    let outcome = rt.block_on(async {
        let shutdown = CancellationToken::new();
        let reload = std::sync::Arc::new(tokio::sync::Notify::new());
        tokio::spawn(watch_signals(shutdown.clone(), reload.clone()));
        pollhook::daemon::run(config, reload, shutdown).await
    });
    // Work still on the blocking pool (a store call that never
    // returns, on a failed disk) must not keep the process alive.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    match outcome {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.is::<pollhook::daemon::StoreGaveUp>() => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(pollhook::daemon::STORE_EXIT))
        }
        Err(e) => Err(e),
    }
}

/// `pollhook validate`.
pub fn validate(config_file: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_file)?;
    let instances: usize = config.sources.iter().map(|s| s.instances.len()).sum();
    for w in &config.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "{}: OK ({} connectors, {} sources, {} instances, {} endpoints)",
        config_file.display(),
        config.connectors.len(),
        config.sources.len(),
        instances,
        config.endpoints.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// `pollhook test`: a source of the bridge file, or a connector file.
pub fn test(
    config_file: &Path,
    target: &str,
    instance: Option<&str>,
    with: &[String],
    seed: bool,
    polls: &crate::cli::args::PollsArgs,
) -> anyhow::Result<ExitCode> {
    if polls.polls.is_some() || polls.replay.is_some() {
        let target = Target::resolve(config_file, target, with)?;
        let r = Rehearsal {
            instance,
            polls: polls.polls.unwrap_or(1),
            every: duration(&polls.every, "--every")?,
            replay: polls.replay.as_deref(),
            expect: polls.expect.as_deref(),
            update: polls.update,
        };
        return rehearse::test(&target, &r);
    }
    let is_file = target.ends_with(".yaml") || target.ends_with(".yml");
    if is_file {
        if seed {
            bail!("--seed needs a source of the bridge file (its state_dir), not a connector file");
        }
        test_connector_file(target, instance, with)
    } else {
        if !with.is_empty() {
            bail!(
                "--with is for connector files; a source takes its params from `with:` in {}",
                config_file.display()
            );
        }
        test_source(config_file, target, instance, seed)
    }
}

/// `pollhook record TARGET --polls N --every D --to DIR`.
pub fn record(
    config_file: &Path,
    target: &str,
    instance: Option<&str>,
    with: &[String],
    polls: u32,
    every: &str,
    to: &Path,
) -> anyhow::Result<ExitCode> {
    let target = Target::resolve(config_file, target, with)?;
    let r = Rehearsal {
        instance,
        polls,
        every: duration(every, "--every")?,
        replay: None,
        expect: None,
        update: false,
    };
    rehearse::record(&target, &r, to)
}

/// A duration argument (`30s`, `5m`).
fn duration(text: &str, flag: &str) -> anyhow::Result<std::time::Duration> {
    humantime::parse_duration(text).with_context(|| format!("{flag} `{text}`: not a duration"))
}

/// `pollhook test connectors/x.yaml --with key=value`.
fn test_connector_file(
    target: &str,
    instance: Option<&str>,
    with: &[String],
) -> anyhow::Result<ExitCode> {
    let path = PathBuf::from(target);
    let connector = pollhook::config::resolve::load_connector(&path)?;
    let mut pairs = Vec::new();
    for w in with {
        let Some((k, v)) = w.split_once('=') else {
            bail!("--with `{w}`: expected KEY=VALUE");
        };
        pairs.push((k.trim().to_string(), v.to_string()));
    }
    let source = pollhook::config::Source::for_connector(connector.into(), &pairs)
        .map_err(anyhow::Error::msg)?;
    let hosts = pollhook::quota::HostGates::new(&Default::default());
    let report = runtime()?.block_on(dryrun::run(&source, &hosts, instance, None, None))?;
    Ok(print_report(&report, false))
}

/// `pollhook test SOURCE [--seed]`.
fn test_source(
    config_file: &Path,
    target: &str,
    instance: Option<&str>,
    seed: bool,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_file)?;
    let Some(src) = config.source(target) else {
        let names: Vec<&str> = config.sources.iter().map(|s| s.name.as_str()).collect();
        bail!(
            "no source named `{target}` in {} (sources: {}); to try a connector file, give its path (`connectors/x.yaml --with key=value`)",
            config.file.display(),
            names.join(", ")
        );
    };
    let rt = runtime()?;
    let store = if seed {
        std::fs::create_dir_all(&config.state_dir)?;
        Some(
            rt.block_on(config.store.open())
                .context("--seed opens the store: is the daemon running? (stop it first)")?,
        )
    } else {
        None
    };
    let hosts = pollhook::quota::HostGates::new(&config.hosts);
    let report = rt.block_on(dryrun::run(
        src,
        &hosts,
        instance,
        store.as_ref(),
        config.user_agent.as_deref(),
    ))?;
    if let Some(store) = &store {
        rt.block_on(store.flush())?;
    }
    Ok(print_report(&report, seed))
}

/// `pollhook schema`.
pub fn schema(kind: SchemaKind) -> anyhow::Result<ExitCode> {
    let schema = match kind {
        SchemaKind::Bridge => pollhook::config::schema::bridge_schema(),
        SchemaKind::Connector => pollhook::config::schema::connector_schema(),
    };
    println!("{}", serde_json::to_string_pretty(&schema)?);
    Ok(ExitCode::SUCCESS)
}

/// `pollhook secret generate [--ed25519]`.
pub fn generate_secret(ed25519: bool) -> anyhow::Result<ExitCode> {
    if ed25519 {
        let (sk, pk) = SigningKey::generate_ed25519();
        println!("secret key (bridge.yaml): {sk}");
        println!("public key (receiver):    {pk}");
    } else {
        println!("{}", SigningKey::generate());
    }
    Ok(ExitCode::SUCCESS)
}

/// `pollhook verify`: checks a signature over the body on stdin.
pub fn verify(
    secret: &str,
    id: &str,
    timestamp: i64,
    signature: &str,
    tolerance: &str,
) -> anyhow::Result<ExitCode> {
    let key = sign::VerifyKey::parse(secret).context("--secret")?;
    let tolerance = pollhook::schedule::parse_duration(tolerance)
        .map_err(anyhow::Error::msg)
        .context("--tolerance")?
        .as_secs() as i64;
    let mut body = Vec::new();
    std::io::stdin().read_to_end(&mut body)?;
    let now = chrono::Utc::now().timestamp();
    let check = |b: &[u8]| sign::verify(&key, id, timestamp, b, signature, now, tolerance);
    match check(&body) {
        Ok(()) => {
            println!("signature OK");
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => println!("{e}"),
    }
    // `echo` and most editors end a file with a newline the sender
    // never signed: say so when that is the only difference.
    let trimmed = body
        .strip_suffix(b"\n")
        .map(|b| b.strip_suffix(b"\r").unwrap_or(b));
    if trimmed.is_some_and(|b| check(b).is_ok()) {
        println!(
            "hint: it matches the body without its trailing newline, which was not part of what was signed; pass the exact bytes received (printf '%s', or curl --data-binary @file with a file that has no final newline)"
        );
    }
    Ok(ExitCode::FAILURE)
}
