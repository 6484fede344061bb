//! The `pollhook` command line. Thin: parse arguments and dispatch each
//! subcommand to its function in `cli/` (which sets up logging and
//! signals, calls the library and prints what it returns).

use std::process::ExitCode;

use clap::Parser;
use pollhook::config::ConfigErrors;

mod cli;

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
