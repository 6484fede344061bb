//! The `pollhook` command line. Thin: parse arguments, set up logging and
//! signals, call the library.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use pollhook::config::{Config, ConfigErrors, OperatorConfig};
use pollhook::deliver::sign::{self, SigningKey};
use pollhook::store::backup;
use pollhook::{dryrun, ops};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "pollhook",
    version,
    about = "Webhooks for APIs that have none."
)]
struct Cli {
    /// The bridge file.
    #[arg(
        short,
        long,
        global = true,
        env = "POLLHOOK_CONFIG",
        default_value = "bridge.yaml"
    )]
    config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGINT or SIGTERM.
    Run,
    /// Check bridge.yaml and every connector; exit 0 when valid.
    Validate,
    /// Poll a source once and print what it would emit; touches no state.
    /// Poll once and show what would happen: requests (secrets masked),
    /// pages, records and why each is or is not emitted, the exact events,
    /// the cursor before and after. Touches no state unless `--seed`.
    Test {
        /// A source of the bridge file, or a connector file (`*.yaml`) to
        /// try without a bridge, with its params given by `--with`.
        target: String,
        /// Only this instance (a `for_each` value); default: every instance.
        #[arg(long)]
        instance: Option<String>,
        /// A param value for a connector file: `--with key=value` (repeat).
        #[arg(long = "with", value_name = "KEY=VALUE")]
        with: Vec<String>,
        /// Store what this poll finds as the instances' baseline (cursor,
        /// seen ids, snapshot) without emitting anything, so that the first
        /// run of the daemon starts from here. Only instances without state
        /// are seeded; the daemon must be stopped (the store is locked).
        #[arg(long)]
        seed: bool,
    },
    /// Print the JSON Schema of bridge.yaml (default) or of connector
    /// files, generated from the types the config is read into, for editors.
    Schema {
        #[arg(value_enum, default_value_t = SchemaKind::Bridge)]
        kind: SchemaKind,
    },
    /// Dead letters: events whose attempts ran out. Works while the daemon
    /// runs (through its admin server) and on a stopped store.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// The running daemon's status as tables (instances, endpoints, hosts).
    Status {
        /// Print the JSON of `/status`.
        #[arg(long)]
        json: bool,
    },
    /// Endpoints disabled by a `410 Gone` stay so across restarts until
    /// enabled here.
    Endpoint {
        #[command(subcommand)]
        command: EndpointCommand,
    },
    /// Back up or restore the store (instance states, cursors, seen sets,
    /// outbox, dead letters, history) as JSON lines.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Recent delivery attempts (time, status code, latency, error).
    Events {
        /// Only this event (`webhook-id`).
        #[arg(long)]
        id: Option<String>,
        /// Only this endpoint.
        #[arg(long)]
        endpoint: Option<String>,
        /// Most attempts shown, newest first.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Secrets for endpoints.
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// Check a webhook signature (for receiver authors). The body is read
    /// from stdin.
    Verify {
        /// The endpoint's `whsec_` secret, or the `whpk_` public key of an
        /// Ed25519 (`v1a`) endpoint.
        #[arg(long, env = "POLLHOOK_VERIFY_SECRET")]
        secret: String,
        #[arg(long)]
        id: String,
        #[arg(long)]
        timestamp: i64,
        #[arg(long)]
        signature: String,
        /// How far `--timestamp` may be from now (replay protection, as
        /// Standard Webhooks verifiers do).
        #[arg(long, default_value = "5m")]
        tolerance: String,
    },
}

#[derive(Subcommand)]
enum EndpointCommand {
    /// Send to an endpoint again after a `410 Gone` or
    /// `circuit.disable_after` disabled it (its queued events go out).
    Enable {
        /// The endpoint's name in bridge.yaml.
        name: String,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// Write a backup. Works while the daemon runs (through its admin
    /// server) and on a stopped store.
    Export {
        /// The file to write (atomically); standard output without it.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Restore a backup into an empty state_dir; the daemon must be stopped.
    Import {
        /// A file written by `pollhook state export` (`-` for standard input).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters.
    List(DlqArgs),
    /// Deliver dead letters again, with their original `webhook-id`.
    Replay(DlqArgs),
    /// Delete dead letters for good.
    Drop(DlqArgs),
}

#[derive(clap::Args)]
struct DlqArgs {
    /// One event (`webhook-id`).
    #[arg(long)]
    id: Option<String>,
    #[arg(long)]
    endpoint: Option<String>,
    /// Events of this source (repeat for several).
    #[arg(long)]
    source: Vec<String>,
    /// Events of the sources using this connector.
    #[arg(long)]
    connector: Option<String>,
    /// Event type.
    #[arg(long = "type")]
    kind: Option<String>,
    /// Dead-lettered within this long (`30m`, `2h`, `7d`).
    #[arg(long)]
    since: Option<String>,
    /// Replay or drop every dead letter (needed when no criterion is given).
    #[arg(long)]
    all: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum SchemaKind {
    /// bridge.yaml (inline connectors included).
    Bridge,
    /// A connector file.
    Connector,
}

#[derive(Subcommand)]
enum SecretCommand {
    /// Print a new random `whsec_…` secret (or, with `--ed25519`, a
    /// `whsk_…` signing key for bridge.yaml and its `whpk_…` public key for
    /// the receiver).
    Generate {
        #[arg(long)]
        ed25519: bool,
    },
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            if let Some(errs) = e.downcast_ref::<ConfigErrors>() {
                eprintln!("{errs}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("POLLHOOK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        // Outside data must not forge lines (see `pollhook::logfmt`).
        LogFormat::Text => builder.fmt_fields(pollhook::logfmt::EscapedFields).init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Secret {
            command: SecretCommand::Generate { ed25519 },
        } => {
            if ed25519 {
                let (sk, pk) = SigningKey::generate_ed25519();
                println!("secret key (bridge.yaml): {sk}");
                println!("public key (receiver):    {pk}");
            } else {
                println!("{}", SigningKey::generate());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            secret,
            id,
            timestamp,
            signature,
            tolerance,
        } => {
            let key = sign::VerifyKey::parse(&secret).context("--secret")?;
            let tolerance = pollhook::schedule::parse_duration(&tolerance)
                .map_err(anyhow::Error::msg)
                .context("--tolerance")?
                .as_secs() as i64;
            let mut body = Vec::new();
            std::io::stdin().read_to_end(&mut body)?;
            let now = chrono::Utc::now().timestamp();
            let check =
                |b: &[u8]| sign::verify(&key, &id, timestamp, b, &signature, now, tolerance);
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
        Command::Endpoint {
            command: EndpointCommand::Enable { name },
        } => {
            let op = operator(&cli.config)?;
            if !op.endpoints.contains(&name) {
                let known: Vec<&str> = op.endpoints.iter().map(String::as_str).collect();
                bail!(
                    "no endpoint named `{name}` in {} (known: {})",
                    cli.config.display(),
                    known.join(", ")
                );
            }
            let rt = runtime()?;
            let target = rt.block_on(target(&op, "enable an endpoint"))?;
            let out = rt
                .block_on(target.run(&ops::Enable {
                    endpoint: name.clone(),
                }))
                .map_err(|e| op_error(&op, e))?;
            if out.was_disabled {
                println!("endpoint `{name}` enabled: its queued events go out");
            } else {
                println!("endpoint `{name}` was not disabled");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::State { command } => {
            let op = operator(&cli.config)?;
            match command {
                StateCommand::Export { output } => {
                    let rt = runtime()?;
                    let target = rt.block_on(target(&op, "export"))?;
                    let bytes = rt.block_on(target.export()).map_err(|e| op_error(&op, e))?;
                    match output {
                        None => {
                            use std::io::Write as _;
                            std::io::stdout().write_all(&bytes)?;
                        }
                        Some(path) => {
                            // Written aside then renamed: a failed export
                            // never leaves half a backup under the name.
                            let tmp = path.with_extension("partial");
                            std::fs::write(&tmp, &bytes)
                                .with_context(|| format!("cannot write {}", tmp.display()))?;
                            std::fs::rename(&tmp, &path)
                                .with_context(|| format!("cannot write {}", path.display()))?;
                            let lines = bytes.iter().filter(|b| **b == b'\n').count();
                            eprintln!(
                                "wrote {} ({} records)",
                                path.display(),
                                lines.saturating_sub(1)
                            );
                        }
                    }
                }
                StateCommand::Import { file } => {
                    std::fs::create_dir_all(&op.state_dir).with_context(|| {
                        format!("cannot create state_dir {}", op.state_dir.display())
                    })?;
                    let rt = runtime()?;
                    let store = rt.block_on(op.store.open()).map_err(|e| match e {
                        pollhook::store::StoreError::Locked { .. } => {
                            anyhow::anyhow!("{e} (stop the daemon before importing)")
                        }
                        e => anyhow::Error::new(e),
                    })?;
                    let n = if file.as_os_str() == "-" {
                        rt.block_on(backup::import(
                            &store,
                            std::io::stdin().lock(),
                            Some(&op.endpoints),
                        ))
                    } else {
                        let f = std::fs::File::open(&file)
                            .with_context(|| format!("cannot read {}", file.display()))?;
                        rt.block_on(backup::import(
                            &store,
                            std::io::BufReader::new(f),
                            Some(&op.endpoints),
                        ))
                    }
                    .with_context(|| format!("cannot import {}", file.display()))?;
                    eprintln!("imported {n} records into {}", op.store);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { command } => {
            let op = operator(&cli.config)?;
            let (args, what) = match &command {
                DlqCommand::List(a) => (a, "list dead letters"),
                DlqCommand::Replay(a) => (a, "replay dead letters"),
                DlqCommand::Drop(a) => (a, "drop dead letters"),
            };
            let filter = dlq_filter(&op, args)?;
            let rt = runtime()?;
            let target = rt.block_on(target(&op, what))?;
            match command {
                DlqCommand::List(a) => {
                    let rows = rt
                        .block_on(target.run(&ops::DlqList(filter)))
                        .map_err(|e| op_error(&op, e))?;
                    if a.json {
                        print_json(&rows);
                    } else {
                        print_dlq(&rows);
                    }
                }
                DlqCommand::Replay(_) => print_json(
                    &rt.block_on(target.run(&ops::DlqReplay(filter)))
                        .map_err(|e| op_error(&op, e))?,
                ),
                DlqCommand::Drop(_) => print_json(
                    &rt.block_on(target.run(&ops::DlqDrop(filter)))
                        .map_err(|e| op_error(&op, e))?,
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let op = operator(&cli.config)?;
            let s = runtime()?
                .block_on(ops::status(&op.state_dir, op.admin_token.as_deref()))
                .map_err(|e| op_error(&op, e))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Events {
            id,
            endpoint,
            limit,
            json,
        } => {
            let op = operator(&cli.config)?;
            let q = ops::Events(pollhook::store::AttemptQuery {
                id,
                endpoint,
                limit: Some(limit),
            });
            let rt = runtime()?;
            let target = rt.block_on(target(&op, "show the delivery history"))?;
            let rows = rt.block_on(target.run(&q)).map_err(|e| op_error(&op, e))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for r in rows {
                    println!(
                        "{}  {}  {}  attempt {}  {}  {} ms  {}{}",
                        chrono::DateTime::from_timestamp_millis(r.at_ms)
                            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                            .unwrap_or_default(),
                        r.event_id,
                        r.endpoint,
                        r.attempt,
                        r.status.map(|s| s.to_string()).unwrap_or("-".into()),
                        r.latency_ms,
                        r.outcome,
                        r.error.map(|e| format!(": {e}")).unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema { kind } => {
            let schema = match kind {
                SchemaKind::Bridge => pollhook::config::schema::bridge_schema(),
                SchemaKind::Connector => pollhook::config::schema::connector_schema(),
            };
            println!("{}", serde_json::to_string_pretty(&schema)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate => {
            let config = Config::load(&cli.config)?;
            let instances: usize = config.sources.iter().map(|s| s.instances.len()).sum();
            for w in &config.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "{}: OK ({} connectors, {} sources, {} instances, {} endpoints)",
                cli.config.display(),
                config.connectors.len(),
                config.sources.len(),
                instances,
                config.endpoints.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => {
            let config = Config::load(&cli.config)?;
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
        Command::Test {
            target,
            instance,
            with,
            seed,
        } => {
            let is_file = target.ends_with(".yaml") || target.ends_with(".yml");
            if is_file {
                if seed {
                    bail!("--seed needs a source of the bridge file (its state_dir), not a connector file");
                }
                let path = PathBuf::from(&target);
                let connector = pollhook::config::resolve::load_connector(&path)?;
                let mut pairs = Vec::new();
                for w in &with {
                    let Some((k, v)) = w.split_once('=') else {
                        bail!("--with `{w}`: expected KEY=VALUE");
                    };
                    pairs.push((k.trim().to_string(), v.to_string()));
                }
                let source = pollhook::config::Source::for_connector(connector.into(), &pairs)
                    .map_err(anyhow::Error::msg)?;
                let hosts = pollhook::quota::HostGates::new(&Default::default());
                let report = runtime()?.block_on(dryrun::run(
                    &source,
                    &hosts,
                    instance.as_deref(),
                    None,
                    None,
                ))?;
                Ok(print_report(&report, false))
            } else {
                if !with.is_empty() {
                    bail!("--with is for connector files; a source takes its params from `with:` in {}", cli.config.display());
                }
                let config = Config::load(&cli.config)?;
                let Some(src) = config.source(&target) else {
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
                    Some(rt.block_on(config.store.open()).context(
                        "--seed opens the store: is the daemon running? (stop it first)",
                    )?)
                } else {
                    None
                };
                let hosts = pollhook::quota::HostGates::new(&config.hosts);
                let report = rt.block_on(dryrun::run(
                    src,
                    &hosts,
                    instance.as_deref(),
                    store.as_ref(),
                    config.user_agent.as_deref(),
                ))?;
                if let Some(store) = &store {
                    rt.block_on(store.flush())?;
                }
                Ok(print_report(&report, seed))
            }
        }
    }
}

/// Milliseconds since the epoch as "12s ago" / "in 3s" / "now", seen at
/// `now_ms`.
fn relative(ms: Option<i64>, now_ms: i64) -> String {
    let Some(ms) = ms else {
        return "-".into();
    };
    let d = ms - now_ms;
    let text = humantime::format_duration(std::time::Duration::from_secs(
        (d.unsigned_abs() / 1000).max(if d.unsigned_abs() >= 1000 { 1 } else { 0 }),
    ))
    .to_string();
    let text = if text == "0s" {
        "now".to_string()
    } else {
        text
    };
    if text == "now" {
        text
    } else if d >= 0 {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

fn print_status(s: &pollhook::admin::StatusReport) {
    let now = pollhook::now_ms();
    let clustered = s.cluster.is_some();
    let mut rows = vec![[
        "INSTANCE",
        "NODE",
        "LAST POLL",
        "NEXT POLL",
        "OK",
        "304",
        "FAILED",
        "EVENTS",
        "INTERVAL",
        "CURSOR",
        "ERROR",
    ]
    .map(String::from)
    .to_vec()];
    for (k, i) in &s.instances {
        rows.push(vec![
            k.clone(),
            i.node.clone().unwrap_or("-".into()),
            relative(i.last_poll_ms, now),
            relative(i.next_poll_ms, now),
            i.polls_ok.to_string(),
            i.polls_not_modified.to_string(),
            i.polls_failed.to_string(),
            i.events.to_string(),
            i.effective_interval_ms
                .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                .unwrap_or("-".into()),
            i.cursor.clone().unwrap_or("-".into()),
            i.last_error
                .clone()
                .or(i.last_warning.clone())
                .unwrap_or_default(),
        ]);
    }
    if !clustered {
        // One process: no node column.
        for r in &mut rows {
            r.remove(1);
        }
    }
    table(&rows);
    println!();
    let mut rows = vec![[
        "ENDPOINT",
        "QUEUE",
        "DEAD",
        "DELIVERED",
        "FAILED",
        "CIRCUIT",
        "LAST ERROR",
    ]
    .map(String::from)
    .to_vec()];
    for (k, e) in &s.endpoints {
        rows.push(vec![
            k.clone(),
            e.queue_depth.to_string(),
            e.dead_letters.to_string(),
            e.delivered.to_string(),
            e.failed_attempts.to_string(),
            if let Some(d) = &e.disabled {
                format!("disabled: {d}")
            } else if e.circuit_open {
                "open".into()
            } else {
                "closed".into()
            },
            e.last_error.clone().unwrap_or_default(),
        ]);
    }
    table(&rows);
    if !s.hosts.is_empty() {
        println!();
        let mut rows = vec![["HOST", "REQUESTS", "THROTTLED", "PAUSES", "PAUSED"]
            .map(String::from)
            .to_vec()];
        for (k, h) in &s.hosts {
            rows.push(vec![
                k.clone(),
                h.requests.to_string(),
                h.throttled.to_string(),
                h.pauses.to_string(),
                h.paused_for_ms
                    .map(|ms| format!("{ms} ms"))
                    .unwrap_or("-".into()),
            ]);
        }
        table(&rows);
    }
    if let Some(c) = &s.cluster {
        println!();
        let mut rows = vec![["NODE", "LEASES", "HEARTBEAT", "STARTED"]
            .map(String::from)
            .to_vec()];
        for n in &c.nodes {
            let name = if n.node == c.node {
                format!("{} (this node)", n.node)
            } else {
                n.node.clone()
            };
            rows.push(vec![
                name,
                n.leases.to_string(),
                relative(Some(now - n.heartbeat_age_ms), now),
                relative(Some(n.started_ms), now),
            ]);
        }
        table(&rows);
        if !c.unheld.is_empty() {
            println!("not held by any node now: {}", c.unheld.join(", "));
        }
        if let Some(e) = &c.error {
            println!("cannot read the cluster: {e}");
        }
    }
    if let Some(e) = &s.store.error {
        println!();
        println!("STORE UNAVAILABLE: {e}");
    }
}

/// Left-aligned columns.
fn table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |x| x.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, x)| format!("{x:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// What operator commands read of bridge.yaml: the state directory (the
/// store, `admin.addr`), the admin token, the endpoint and source names.
/// Only those fields' `${VAR}`s are resolved, so `status` or `dlq` work
/// without the variables the daemon's sources need.
fn operator(config: &std::path::Path) -> anyhow::Result<OperatorConfig> {
    Ok(pollhook::config::load_operator(config)?)
}

/// The running daemon (through its admin server), else the stopped store.
async fn target(op: &OperatorConfig, what: &str) -> anyhow::Result<ops::Target> {
    Ok(ops::Target::find(&op.state_dir, &op.store, op.admin_token.clone(), what).await?)
}

/// An operation's failure, with why the admin token could not be read
/// when the daemon refused for want of it.
fn op_error(op: &OperatorConfig, e: ops::OpError) -> anyhow::Error {
    match (&e, &op.admin_token_error) {
        (ops::OpError::Daemon(m), Some(why)) if m.contains("token") => {
            anyhow::anyhow!("{e}; the admin token could not be read: {why}")
        }
        _ => e.into(),
    }
}

/// The filter of a `pollhook dlq` command.
fn dlq_filter(op: &OperatorConfig, a: &DlqArgs) -> anyhow::Result<ops::Filter> {
    let mut sources = a.source.clone();
    if let Some(c) = &a.connector {
        let using: Vec<String> = op
            .sources
            .iter()
            .filter(|(_, connector)| *connector == c)
            .map(|(s, _)| s.clone())
            .collect();
        if using.is_empty() {
            bail!("no source uses a connector named `{c}`");
        }
        sources.extend(using);
    }
    let since_ms = match &a.since {
        Some(s) => {
            let d = pollhook::schedule::parse_duration(s).map_err(anyhow::Error::msg)?;
            Some(pollhook::now_ms() - d.as_millis() as i64)
        }
        None => None,
    };
    Ok(ops::Filter {
        id: a.id.clone(),
        endpoint: a.endpoint.clone(),
        sources,
        kind: a.kind.clone(),
        since_ms,
        until_ms: None,
        all: a.all,
    })
}

/// Prints a reply as pretty JSON.
fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn print_dlq(rows: &[ops::Listed]) {
    if rows.is_empty() {
        println!("no dead letters");
    }
    for r in rows {
        println!(
            "{}  {}  {}  {}  #{}  {} attempts  dead since {}  {}",
            r.id,
            r.endpoint,
            r.instance,
            r.kind,
            r.sequence,
            r.attempts,
            chrono::DateTime::from_timestamp_millis(r.dead_at_ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default(),
            r.last_error.as_deref().unwrap_or_default()
        );
    }
}

/// glibc gives each thread that allocates its own malloc arena, and keeps
/// what each arena once held. With two async workers, sled's threads and
/// the blocking pool, that was 20 of 132 MiB at 10,000 instances (the
/// scale bench with `MALLOC_ARENA_MAX=2`: 113 MiB). Two arenas serve two
/// cores. Called first thing in `main`, before any thread starts; an
/// operator's `MALLOC_ARENA_MAX` still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tunable of the allocator; no thread
        // but this one exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Store writes and template rendering use the blocking pool. Its
        // default of 512 threads, each with its own malloc arena, costs
        // memory for no gain on a disk that takes one write at a time.
        .max_blocking_threads(32)
        .build()?)
}

/// SIGTERM/SIGINT drain and stop (a second one exits at once); SIGHUP
/// reloads the configuration.
async fn watch_signals(shutdown: CancellationToken, reload: std::sync::Arc<tokio::sync::Notify>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let mut hup = signal(SignalKind::hangup()).expect("install SIGHUP handler");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                reload.notify_one();
            }
        }
    }
    tracing::info!("signal received: shutting down (send again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting without draining");
    std::process::exit(130);
}

/// Prints a `pollhook test` report; its exit status.
fn print_report(r: &dryrun::Report, seeding: bool) -> ExitCode {
    if let Some(d) = &r.discovery {
        println!("== {}: discovering instances", r.source);
        match &d.error {
            Some(e) => println!("   discovery failed: {e}"),
            None => {
                println!("   {} instance(s) found", d.found.len());
                for (name, params) in &d.found {
                    println!("   - {name} ({})", params.join(", "));
                }
            }
        }
    }
    if !seeding {
        println!(
            "(dry run: from an empty state, with `baseline: emit` so that the first poll shows the events it would send; the daemon follows the connector's `baseline`)"
        );
    }
    for i in &r.instances {
        println!("== {} (connector {})", i.key, r.connector);
        for q in &i.requests {
            println!(
                "   {} {} -> {} ({} bytes{})",
                q.method,
                q.url,
                q.status,
                q.bytes,
                q.records
                    .map(|n| format!(", {n} records"))
                    .unwrap_or_default()
            );
        }
        if let Some(w) = &i.warning {
            println!("   warning: {w}");
        }
        if let Some(e) = &i.error {
            println!("   {e}");
            continue;
        }
        match &i.seeded {
            Some(dryrun::Seeded::AlreadyHad { cursor }) => {
                println!(
                    "   already has state (cursor {}): not seeded",
                    cursor.as_deref().unwrap_or("(none)")
                );
                continue;
            }
            Some(dryrun::Seeded::Stored {
                cursor,
                seen,
                known,
                snapshot,
            }) => {
                println!(
                    "   seeded: cursor {}, {seen} ids remembered, {known} items known{}",
                    cursor.as_deref().unwrap_or("(none)"),
                    if *snapshot { ", snapshot stored" } else { "" }
                );
                continue;
            }
            None => {}
        }
        for (record, outcome) in &i.notes {
            println!("   record {record}: {outcome}");
        }
        println!(
            "   cursor: {} -> {}",
            i.cursor_before.as_deref().unwrap_or("(none)"),
            i.cursor_after.as_deref().unwrap_or("(none)")
        );
        println!("   {} event(s):", i.events.len());
        for (id, body) in &i.events {
            println!("   webhook-id {id}: {body}");
        }
    }
    if r.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::relative;

    #[test]
    fn relative_times_read_naturally() {
        let now = 1_000_000;
        assert_eq!(relative(Some(now + 3_000), now), "in 3s");
        assert_eq!(relative(Some(now - 12_000), now), "12s ago");
        assert_eq!(relative(Some(now + 400), now), "now");
        assert_eq!(relative(Some(now), now), "now");
        assert_eq!(relative(None, now), "-");
    }
}
