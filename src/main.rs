//! The `pollhook` command line. Thin: parse arguments, set up logging and
//! signals, call the library.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use pollhook::config::{Config, ConfigErrors};
use pollhook::connector::detect::detect;
use pollhook::connector::fetch::{fetch, FetchEnv};
use pollhook::connector::mask;
use pollhook::connector::spec::Baseline;
use pollhook::deliver::sign::{self, SigningKey};
use pollhook::store::InstanceState;
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
        #[arg(long, env = "POLLHOOK_VERIFY_SECRET")]
        secret: String,
        #[arg(long)]
        id: String,
        #[arg(long)]
        timestamp: i64,
        #[arg(long)]
        signature: String,
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
        LogFormat::Text => builder.init(),
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
        } => {
            let key = SigningKey::parse(&secret).context("--secret")?;
            let mut body = Vec::new();
            std::io::stdin().read_to_end(&mut body)?;
            if sign::verify(&key, &id, timestamp, &body, &signature) {
                println!("signature OK");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("signature does NOT match");
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Endpoint {
            command: EndpointCommand::Enable { name },
        } => {
            let config = Config::load(&cli.config)?;
            if !config.endpoints.contains_key(&name) {
                let known: Vec<&str> = config.endpoints.keys().map(String::as_str).collect();
                bail!(
                    "no endpoint named `{name}` in {} (known: {})",
                    cli.config.display(),
                    known.join(", ")
                );
            }
            let q = pollhook::admin::EnableQuery {
                endpoint: name.clone(),
            };
            let out = runtime()?.block_on(operate(&config, "enable", &q))?;
            if out["was_disabled"] == true {
                println!("endpoint `{name}` enabled: its queued events go out");
            } else {
                println!("endpoint `{name}` was not disabled");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::State { command } => {
            let config = Config::load(&cli.config)?;
            match command {
                StateCommand::Export { output } => {
                    let bytes = runtime()?.block_on(export(&config))?;
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
                    std::fs::create_dir_all(&config.state_dir).with_context(|| {
                        format!("cannot create state_dir {}", config.state_dir.display())
                    })?;
                    let store =
                        pollhook::store::Store::open(&config.state_dir).with_context(|| {
                            format!(
                                "cannot open the store at {} (stop the daemon before importing)",
                                config.state_dir.display()
                            )
                        })?;
                    let n = if file.as_os_str() == "-" {
                        store.import(std::io::stdin().lock())
                    } else {
                        let f = std::fs::File::open(&file)
                            .with_context(|| format!("cannot read {}", file.display()))?;
                        store.import(std::io::BufReader::new(f))
                    }
                    .with_context(|| format!("cannot import {}", file.display()))?;
                    eprintln!("imported {n} records into {}", config.state_dir.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { command } => {
            let config = Config::load(&cli.config)?;
            let (op, args) = match &command {
                DlqCommand::List(a) => ("list", a),
                DlqCommand::Replay(a) => ("replay", a),
                DlqCommand::Drop(a) => ("drop", a),
            };
            let filter = dlq_filter(&config, args)?;
            let out = runtime()?.block_on(operate(&config, op, &filter))?;
            print_dlq(op, &out, args.json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let config = Config::load(&cli.config)?;
            let s = runtime()?.block_on(fetch_status(&config))?;
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
            let config = Config::load(&cli.config)?;
            let q = pollhook::dlq::EventsQuery {
                id,
                endpoint,
                limit: Some(limit),
            };
            let out = runtime()?.block_on(operate(&config, "events", &q))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                let rows: Vec<pollhook::store::AttemptRecord> = serde_json::from_value(out)?;
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
            runtime()?.block_on(async {
                let shutdown = CancellationToken::new();
                let reload = std::sync::Arc::new(tokio::sync::Notify::new());
                tokio::spawn(watch_signals(shutdown.clone(), reload.clone()));
                pollhook::daemon::run(config, reload, shutdown).await
            })?;
            Ok(ExitCode::SUCCESS)
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
                runtime()?.block_on(dry_run(&source, &hosts, instance.as_deref(), None))
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
                let store = if seed {
                    std::fs::create_dir_all(&config.state_dir)?;
                    Some(pollhook::store::Store::open(&config.state_dir).context(
                        "--seed opens the store: is the daemon running? (stop it first)",
                    )?)
                } else {
                    None
                };
                let hosts = pollhook::quota::HostGates::new(&config.hosts);
                runtime()?.block_on(dry_run(src, &hosts, instance.as_deref(), store.as_ref()))
            }
        }
    }
}

/// `GET /status` of the running daemon.
async fn fetch_status(config: &Config) -> anyhow::Result<serde_json::Value> {
    let Some(resp) = to_daemon(config, reqwest::Method::GET, "status", None).await? else {
        bail!(
            "no running daemon found ({} is missing or stale; the daemon writes it when `admin.listen` is set)",
            config.state_dir.join("admin.addr").display()
        );
    };
    if !resp.status().is_success() {
        bail!("the admin server answered {}", resp.status());
    }
    Ok(serde_json::from_slice(&resp.bytes().await?)?)
}

/// Milliseconds since the epoch as "12s ago" / "in 3s".
fn relative(ms: &serde_json::Value) -> String {
    let Some(ms) = ms.as_i64() else {
        return "-".into();
    };
    let d = ms - pollhook::now_ms();
    let text = humantime::format_duration(std::time::Duration::from_secs(
        (d.unsigned_abs() / 1000).max(if d.unsigned_abs() >= 1000 { 1 } else { 0 }),
    ))
    .to_string();
    let text = if text == "0s" {
        "now".to_string()
    } else {
        text
    };
    if d >= 0 {
        format!("in {text}")
    } else if text == "now" {
        text
    } else {
        format!("{text} ago")
    }
}

fn print_status(s: &serde_json::Value) {
    let str_of = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let mut rows = vec![[
        "INSTANCE",
        "LAST POLL",
        "NEXT POLL",
        "OK",
        "FAILED",
        "EVENTS",
        "INTERVAL",
        "CURSOR",
        "ERROR",
    ]
    .map(String::from)
    .to_vec()];
    for (k, i) in s["instances"].as_object().into_iter().flatten() {
        rows.push(vec![
            k.clone(),
            relative(&i["last_poll_ms"]),
            relative(&i["next_poll_ms"]),
            i["polls_ok"].to_string(),
            i["polls_failed"].to_string(),
            i["events"].to_string(),
            i["effective_interval_ms"]
                .as_u64()
                .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                .unwrap_or("-".into()),
            str_of(&i["cursor"]),
            i["last_error"]
                .as_str()
                .or(i["last_warning"].as_str())
                .unwrap_or("")
                .to_string(),
        ]);
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
    for (k, e) in s["endpoints"].as_object().into_iter().flatten() {
        rows.push(vec![
            k.clone(),
            e["queue_depth"].to_string(),
            e["dead_letters"].to_string(),
            e["delivered"].to_string(),
            e["failed_attempts"].to_string(),
            if let Some(d) = e["disabled"].as_str() {
                format!("disabled: {d}")
            } else if e["circuit_open"] == true {
                "open".into()
            } else {
                "closed".into()
            },
            e["last_error"].as_str().unwrap_or("").to_string(),
        ]);
    }
    table(&rows);
    if let Some(hosts) = s["hosts"].as_object().filter(|h| !h.is_empty()) {
        println!();
        let mut rows = vec![["HOST", "REQUESTS", "THROTTLED", "PAUSES", "PAUSED"]
            .map(String::from)
            .to_vec()];
        for (k, h) in hosts {
            rows.push(vec![
                k.clone(),
                h["requests"].to_string(),
                h["throttled"].to_string(),
                h["pauses"].to_string(),
                h["paused_for_ms"]
                    .as_u64()
                    .map(|ms| format!("{ms} ms"))
                    .unwrap_or("-".into()),
            ]);
        }
        table(&rows);
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

/// The filter of a `pollhook dlq` command.
fn dlq_filter(config: &Config, a: &DlqArgs) -> anyhow::Result<pollhook::dlq::Filter> {
    let mut sources = a.source.clone();
    if let Some(c) = &a.connector {
        let using: Vec<String> = config
            .sources
            .iter()
            .filter(|s| &s.connector.name == c)
            .map(|s| s.name.clone())
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
    Ok(pollhook::dlq::Filter {
        id: a.id.clone(),
        endpoint: a.endpoint.clone(),
        sources,
        kind: a.kind.clone(),
        since_ms,
        until_ms: None,
        all: a.all,
    })
}

/// Runs a dead-letter or history operation: through the running daemon's
/// admin server when there is one (the daemon holds the store), else on
/// the stopped store directly.
/// A request to the running daemon's admin server, with the config's token.
/// `None` when no daemon runs: no `admin.addr`, or a stale one (the daemon
/// was killed) that refuses the connection.
async fn to_daemon(
    config: &Config,
    method: reqwest::Method,
    path: &str,
    json: Option<Vec<u8>>,
) -> anyhow::Result<Option<reqwest::Response>> {
    let Ok(addr) = std::fs::read_to_string(config.state_dir.join("admin.addr")) else {
        return Ok(None);
    };
    let mut req = reqwest::Client::new().request(method, format!("http://{}/{path}", addr.trim()));
    if let Some(t) = &config.admin_token {
        req = req.bearer_auth(t);
    }
    if let Some(body) = json {
        req = req.header("content-type", "application/json").body(body);
    }
    match req.send().await {
        Ok(r) => Ok(Some(r)),
        Err(e) if e.is_connect() => Ok(None),
        Err(e) => Err(e).context("cannot reach the daemon's admin server"),
    }
}

/// The store of a stopped daemon (a running one holds its lock).
fn stopped_store(config: &Config, what: &str) -> anyhow::Result<pollhook::store::Store> {
    pollhook::store::Store::open(&config.state_dir).with_context(|| {
        format!(
            "cannot open the store at {} (a running daemon holds it; give it `admin.listen` to {what} while it runs)",
            config.state_dir.display()
        )
    })
}

/// `pollhook state export`: through the running daemon's admin server,
/// else from the stopped store.
async fn export(config: &Config) -> anyhow::Result<Vec<u8>> {
    if let Some(r) = to_daemon(config, reqwest::Method::GET, "state/export", None).await? {
        if !r.status().is_success() {
            bail!(
                "the admin server refused the export: {} {}",
                r.status(),
                r.text().await.unwrap_or_default().trim()
            );
        }
        return Ok(r
            .bytes()
            .await
            .context("the admin server's answer")?
            .to_vec());
    }
    let mut out = Vec::new();
    stopped_store(config, "export")?.export(&mut out)?;
    Ok(out)
}

async fn operate<Q: serde::Serialize>(
    config: &Config,
    op: &str,
    query: &Q,
) -> anyhow::Result<serde_json::Value> {
    let path = match op {
        "events" => "events".to_string(),
        "enable" => "endpoints/enable".to_string(),
        other => format!("dlq/{other}"),
    };
    let body = serde_json::to_vec(query)?;
    if let Some(r) = to_daemon(config, reqwest::Method::POST, &path, Some(body)).await? {
        let status = r.status();
        let bytes = r.bytes().await.context("the admin server's answer")?;
        let body: serde_json::Value =
            serde_json::from_slice(&bytes).context("the admin server's answer")?;
        if !status.is_success() {
            bail!(
                "{}",
                body["error"].as_str().unwrap_or("the admin server refused")
            );
        }
        return Ok(body);
    }
    let store = stopped_store(config, "use this command")?;
    let q = serde_json::to_value(query)?;
    let out = match op {
        "list" => serde_json::to_value(pollhook::dlq::list(&store, &serde_json::from_value(q)?)?)?,
        "replay" => {
            let n = pollhook::dlq::replay(&store, &serde_json::from_value(q)?).await?;
            serde_json::json!({ "replayed": n.len() })
        }
        "drop" => {
            let n = pollhook::dlq::drop(&store, &serde_json::from_value(q)?).await?;
            serde_json::json!({ "dropped": n })
        }
        "enable" => {
            let q: pollhook::admin::EnableQuery = serde_json::from_value(q)?;
            serde_json::json!({ "was_disabled": store.enable_endpoint(&q.endpoint)? })
        }
        _ => serde_json::to_value(pollhook::dlq::events(&store, &serde_json::from_value(q)?)?)?,
    };
    store.flush()?;
    Ok(out)
}

fn print_dlq(op: &str, out: &serde_json::Value, json: bool) {
    if json || op != "list" {
        println!("{}", serde_json::to_string_pretty(out).unwrap_or_default());
        return;
    }
    let rows: Vec<pollhook::dlq::Listed> = serde_json::from_value(out.clone()).unwrap_or_default();
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
            r.last_error.unwrap_or_default()
        );
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
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

/// `pollhook test`: one poll per instance, from an empty state (or, with
/// `store`, seeding it), printing the requests, what each record would do,
/// and the exact event bodies.
async fn dry_run(
    src: &pollhook::config::Source,
    hosts: &pollhook::quota::HostGates,
    only: Option<&str>,
    store: Option<&pollhook::store::Store>,
) -> anyhow::Result<ExitCode> {
    let source = src.name.as_str();
    let client = pollhook::daemon::poll_client();
    let tokens = pollhook::connector::auth::TokenCache::default();
    let env = FetchEnv {
        client: &client,
        hosts,
        rate_limit: None,
        tokens: &tokens,
    };
    let mut failed = false;
    let mut matched = false;
    let mut instances = src.instances.clone();
    if src.discovered {
        println!("== {}: discovering instances", src.name);
        match pollhook::discover::discover(src, &env, chrono::Utc::now()).await {
            Ok(found) => {
                println!("   {} instance(s) found", found.len());
                for f in &found {
                    let params: Vec<String> = f
                        .with
                        .iter()
                        .map(|(k, v)| format!("{k}={}", pollhook::config::scalar_text(v)))
                        .collect();
                    println!("   - {} ({})", f.name, params.join(", "));
                    instances.push(src.discovered_instance(&f.name, &f.with));
                }
            }
            Err(e) => {
                let secrets = src.discovered_instance("-", &Default::default()).secrets;
                println!("   discovery failed: {}", mask(&e.to_string(), &secrets));
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    for inst in &instances {
        if only.is_some_and(|o| o != inst.name) {
            continue;
        }
        matched = true;
        println!("== {} (connector {})", inst.key, src.connector.name);
        let state = InstanceState::default();
        let now = chrono::Utc::now();
        let fetched = match fetch(&src.connector, inst, &state, &env, now).await {
            Ok(f) => f,
            Err(e) => {
                println!("   poll failed: {}", mask(&e.to_string(), &inst.secrets));
                failed = true;
                continue;
            }
        };
        for r in &fetched.log {
            println!(
                "   {} {} -> {} ({} bytes{})",
                r.method,
                mask(&r.url, &inst.secrets),
                r.status,
                r.bytes,
                r.items
                    .map(|n| format!(", {n} records"))
                    .unwrap_or_default()
            );
        }
        if let Some(w) = &fetched.warning {
            println!("   warning: {}", mask(w, &inst.secrets));
        }
        // Seeding detects from the stored state with the baseline skipped;
        // a dry run from an empty state with it forced to `emit`, to show
        // what would be sent.
        let (from, baseline) = match store {
            Some(store) => {
                let stored = store.load_state(&inst.key)?;
                if stored.initialized {
                    println!(
                        "   already has state (cursor {}): not seeded",
                        stored.cursor.as_deref().unwrap_or("(none)")
                    );
                    continue;
                }
                (stored, Baseline::Skip)
            }
            None => (state.clone(), Baseline::Emit),
        };
        let d = match detect(
            &src.connector,
            &inst.vars,
            &from,
            &fetched.pages,
            now,
            Some(baseline),
            fetched.listing(),
        ) {
            Ok(d) => d,
            Err(e) => {
                println!("   detection failed: {}", mask(&e, &inst.secrets));
                failed = true;
                continue;
            }
        };
        if let Some(store) = store {
            let (next, _) = pollhook::daemon::prepare_commit(src, inst, &from, d, &fetched, now);
            store.commit_poll(&inst.key, &next, &[]).await?;
            println!(
                "   seeded: cursor {}, {} ids remembered, {} items known{}",
                next.cursor.as_deref().unwrap_or("(none)"),
                next.seen.len(),
                next.known.len(),
                if next.snapshot.is_some() {
                    ", snapshot stored"
                } else {
                    ""
                }
            );
            continue;
        }
        for n in &d.notes {
            println!("   record {}: {}", n.record, n.outcome);
        }
        let (next, events) = pollhook::daemon::prepare_commit(src, inst, &state, d, &fetched, now);
        println!(
            "   cursor: {} -> {}",
            state.cursor.as_deref().unwrap_or("(none)"),
            next.cursor.as_deref().unwrap_or("(none)")
        );
        println!("   {} event(s):", events.len());
        for e in events {
            println!("   webhook-id {}: {}", e.id, mask(&e.body(), &inst.secrets));
        }
    }
    if !matched {
        let names: Vec<&str> = instances.iter().map(|i| i.name.as_str()).collect();
        bail!(
            "source `{source}` has no instance `{}` (instances: {})",
            only.unwrap_or(""),
            names.join(", ")
        );
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
