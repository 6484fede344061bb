//! The command line's arguments, as clap reads them: every subcommand,
//! its flags and their help texts. `main.rs` parses them and hands each
//! subcommand to its function in this module's siblings.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "pollhook",
    version,
    about = "Webhooks for APIs that have none."
)]
pub struct Cli {
    /// The bridge file.
    #[arg(
        short,
        long,
        global = true,
        env = "POLLHOOK_CONFIG",
        default_value = "bridge.yaml"
    )]
    pub config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Threads running the daemon's tasks (polls, deliveries, the admin
    /// server); default one per core.
    #[arg(long, global = true, env = "POLLHOOK_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
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
        #[command(flatten)]
        polls: PollsArgs,
    },
    /// Poll a source as the daemon would (quotas, conditional requests,
    /// pages, auth) and write every exchange into a cassette: one JSON file
    /// per request and answer, secrets masked, safe to commit. `pollhook
    /// test SOURCE --replay DIR` runs it again without the network.
    Record {
        /// A source of the bridge file, or a connector file (`*.yaml`)
        /// with its params given by `--with`.
        target: String,
        /// Only this instance (a `for_each` value); default: every instance.
        #[arg(long)]
        instance: Option<String>,
        /// A param value for a connector file: `--with key=value` (repeat).
        #[arg(long = "with", value_name = "KEY=VALUE")]
        with: Vec<String>,
        /// How many polls, the state of each kept for the next.
        #[arg(long, value_name = "N", default_value_t = 1)]
        polls: u32,
        /// The wait between polls (`30s`, `5m`).
        #[arg(long, value_name = "DURATION", default_value = "0s")]
        every: String,
        /// The cassette's directory (its earlier exchange files are replaced).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
    },
    /// Start something new: `new connector NAME --from-curl '…'`.
    New {
        #[command(subcommand)]
        command: NewCommand,
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

/// `pollhook test`'s several polls: live (`--polls`) or from a cassette
/// (`--replay`), with an expected output (`--expect`).
#[derive(clap::Args)]
pub struct PollsArgs {
    /// Poll N times in a row, the state of each poll kept for the next
    /// (from an empty state, with the connector's `baseline`): the
    /// baseline, then 304s and "unchanged", in one command.
    #[arg(long, value_name = "N", conflicts_with_all = ["seed", "replay"])]
    pub polls: Option<u32>,
    /// The wait between `--polls` (`30s`, `5m`).
    #[arg(long, value_name = "DURATION", default_value = "0s")]
    pub every: String,
    /// Run every poll of a cassette (`pollhook record`) through the real
    /// pipeline, answered by the cassette instead of the network, each at
    /// its recorded time: the same cassette prints the same output.
    #[arg(long, value_name = "DIR", conflicts_with = "seed")]
    pub replay: Option<PathBuf>,
    /// Compare the output of `--replay` with FILE; exit 1 on a difference.
    #[arg(long, value_name = "FILE", requires = "replay")]
    pub expect: Option<PathBuf>,
    /// With `--expect`: write the output to FILE instead of comparing.
    #[arg(long, requires = "expect")]
    pub update: bool,
}

#[derive(Subcommand)]
pub enum NewCommand {
    /// Fetch one answer of an API and write a starting connector guessed
    /// from it (auth as secret params, pagination, items, id, detect),
    /// each guess explained in a comment. It validates; try it with
    /// `pollhook test`.
    Connector {
        /// The connector's name (lower-case letters, digits, `-`, `_`).
        name: String,
        /// A curl command (as "Copy as cURL" gives it), quoted as one
        /// argument: `--from-curl 'curl -H "Authorization: Bearer …" https://…'`.
        #[arg(
            long,
            value_name = "CURL",
            conflicts_with = "from_url",
            required_unless_present = "from_url"
        )]
        from_curl: Option<String>,
        /// A URL to GET (the plain case).
        #[arg(long, value_name = "URL")]
        from_url: Option<String>,
        /// Where to write it (default `connectors/NAME.yaml`).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum EndpointCommand {
    /// Send to an endpoint again after a `410 Gone` or
    /// `circuit.disable_after` disabled it (its queued events go out).
    Enable {
        /// The endpoint's name in bridge.yaml.
        name: String,
    },
}

#[derive(Subcommand)]
pub enum StateCommand {
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
pub enum DlqCommand {
    /// List dead letters.
    List(DlqArgs),
    /// Deliver dead letters again, with their original `webhook-id`.
    Replay(DlqArgs),
    /// Delete dead letters for good.
    Drop(DlqArgs),
}

#[derive(clap::Args)]
pub struct DlqArgs {
    /// One event (`webhook-id`).
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Events of this source (repeat for several).
    #[arg(long)]
    pub source: Vec<String>,
    /// Events of the sources using this connector.
    #[arg(long)]
    pub connector: Option<String>,
    /// Event type.
    #[arg(long = "type")]
    pub kind: Option<String>,
    /// Dead-lettered within this long (`30m`, `2h`, `7d`).
    #[arg(long)]
    pub since: Option<String>,
    /// Replay or drop every dead letter (needed when no criterion is given).
    #[arg(long)]
    pub all: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SchemaKind {
    /// bridge.yaml (inline connectors included).
    Bridge,
    /// A connector file.
    Connector,
}

#[derive(Subcommand)]
pub enum SecretCommand {
    /// Print a new random `whsec_…` secret (or, with `--ed25519`, a
    /// `whsk_…` signing key for bridge.yaml and its `whpk_…` public key for
    /// the receiver).
    Generate {
        #[arg(long)]
        ed25519: bool,
    },
}
