//! The `pollhook` command line. Thin: parse arguments and dispatch each
//! subcommand to its function in `cli/` (which sets up logging and
//! signals, calls the library and prints what it returns).

use std::process::ExitCode;

use clap::Parser;
use pollhook::config::ConfigErrors;

mod cli;

/// The daemon's allocator is jemalloc, not glibc's: at 100,000 instances
/// on one node it used less CPU and kept less memory (ARCHITECTURE.md,
/// "Dependencies", has the numbers). Only the binary sets it: the library
/// and its tests allocate with the system's.
#[cfg(all(target_os = "linux", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (its `malloc_conf`, under the
/// `_rjem_` prefix the crate builds it with; `_RJEM_MALLOC_CONF` in the
/// environment still overrides each). Two arenas serve the two cores a
/// node is sized for (jemalloc's default, four per core, each holding
/// pages of its own). Freed pages go back to the system after a second
/// (`dirty_decay_ms`, default ten) and are not kept lazily after that
/// (`muzzy_decay_ms: 0`): a node gaining a dead node's share, or starting
/// with every lease, frees most of what the start allocated, and a ten
/// seconds' decay kept that as the node's peak (the scale bench at
/// 100,000 instances: 323.8 MiB peak with the defaults, 292.3 with these).
#[cfg(all(target_os = "linux", not(target_env = "msvc")))]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &u8 = &b"narenas:2,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0];

use cli::args::{Cli, Command, EndpointCommand, NewCommand, SecretCommand};
use cli::{commands, operate};

fn main() -> ExitCode {
    cli::setup::limit_malloc_arenas();
    let cli = Cli::parse();
    cli::setup::init_logging(cli.log_format);
    cli::setup::set_worker_threads(cli.worker_threads.map(usize::from));
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

/// Each subcommand to its function.
fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = cli.config.as_path();
    match cli.command {
        Command::Run => commands::run(config),
        Command::Validate => commands::validate(config),
        Command::Test {
            target,
            instance,
            with,
            seed,
            polls,
        } => commands::test(config, &target, instance.as_deref(), &with, seed, &polls),
        Command::Record {
            target,
            instance,
            with,
            polls,
            every,
            to,
        } => commands::record(
            config,
            &target,
            instance.as_deref(),
            &with,
            polls,
            &every,
            &to,
        ),
        Command::New {
            command:
                NewCommand::Connector {
                    name,
                    from_curl,
                    from_url,
                    out,
                    force,
                },
        } => cli::scaffold::new_connector(&cli::scaffold::NewConnector {
            name: &name,
            from_curl: from_curl.as_deref(),
            from_url: from_url.as_deref(),
            out: out.as_deref(),
            force,
        }),
        Command::Schema { kind } => commands::schema(kind),
        Command::Secret {
            command: SecretCommand::Generate { ed25519 },
        } => commands::generate_secret(ed25519),
        Command::Verify {
            secret,
            id,
            timestamp,
            signature,
            tolerance,
        } => commands::verify(&secret, &id, timestamp, &signature, &tolerance),
        Command::Dlq { command } => operate::dlq(config, command),
        Command::Status { json } => operate::status(config, json),
        Command::Endpoint {
            command: EndpointCommand::Enable { name },
        } => operate::enable_endpoint(config, &name),
        Command::State { command } => operate::state(config, command),
        Command::Events {
            id,
            endpoint,
            limit,
            json,
        } => operate::events(config, id, endpoint, limit, json),
    }
}
