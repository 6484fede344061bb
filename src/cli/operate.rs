//! The operator's commands: `dlq`, `status`, `endpoint enable`, `state`,
//! `events`. Each reads what it needs of bridge.yaml (`OperatorConfig`)
//! and runs its `operate` operation on the running daemon (through its admin
//! server) or, when none runs, on the stopped store.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use pollhook::config::OperatorConfig;
use pollhook::operate;
use pollhook::store::backup;

use super::output::{print_dlq, print_events, print_json};
use super::setup::runtime;
use super::status::print_status;
use crate::cli::args::{DlqArgs, DlqCommand, StateCommand};

/// What operator commands read of bridge.yaml: the state directory (the
/// store, `admin.addr`), the admin token, the endpoint and source names.
/// Only those fields' `${VAR}`s are resolved, so `status` or `dlq` work
/// without the variables the daemon's sources need.
fn operator(config: &Path) -> anyhow::Result<OperatorConfig> {
    Ok(pollhook::config::load_operator(config)?)
}

/// The running daemon (through its admin server), else the stopped store.
async fn target(op: &OperatorConfig, what: &str) -> anyhow::Result<operate::Target> {
    Ok(operate::Target::find(&op.state_dir, &op.store, op.admin_token.clone(), what).await?)
}

/// An operation's failure, with why the admin token could not be read
/// when the daemon refused for want of it.
fn op_error(op: &OperatorConfig, e: operate::OpError) -> anyhow::Error {
    match (&e, &op.admin_token_error) {
        (operate::OpError::AdminServer(m), Some(why)) if m.contains("token") => {
            anyhow::anyhow!("{e}; the admin token could not be read: {why}")
        }
        _ => e.into(),
    }
}

/// `pollhook endpoint enable NAME`.
pub fn enable_endpoint(config: &Path, name: &str) -> anyhow::Result<ExitCode> {
    let op = operator(config)?;
    if !op.endpoints.contains(name) {
        let known: Vec<&str> = op.endpoints.iter().map(String::as_str).collect();
        bail!(
            "no endpoint named `{name}` in {} (known: {})",
            config.display(),
            known.join(", ")
        );
    }
    let rt = runtime()?;
    let target = rt.block_on(target(&op, "enable an endpoint"))?;
    let out = rt
        .block_on(target.run(&operate::Enable {
            endpoint: name.to_string(),
        }))
        .map_err(|e| op_error(&op, e))?;
    if out.was_disabled {
        println!("endpoint `{name}` enabled: its queued events go out");
    } else {
        println!("endpoint `{name}` was not disabled");
    }
    Ok(ExitCode::SUCCESS)
}

/// `pollhook state export|import`.
pub fn state(config: &Path, command: StateCommand) -> anyhow::Result<ExitCode> {
    let op = operator(config)?;
    match command {
        StateCommand::Export { output } => state_export(&op, output)?,
        StateCommand::Import { file } => state_import(&op, &file)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn state_export(op: &OperatorConfig, output: Option<PathBuf>) -> anyhow::Result<()> {
    let rt = runtime()?;
    let target = rt.block_on(target(op, "export"))?;
    let bytes = rt.block_on(target.export()).map_err(|e| op_error(op, e))?;
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
    Ok(())
}

fn state_import(op: &OperatorConfig, file: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(&op.state_dir)
        .with_context(|| format!("cannot create state_dir {}", op.state_dir.display()))?;
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
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
        rt.block_on(backup::import(
            &store,
            std::io::BufReader::new(f),
            Some(&op.endpoints),
        ))
    }
    .with_context(|| format!("cannot import {}", file.display()))?;
    eprintln!("imported {n} records into {}", op.store);
    Ok(())
}

/// `pollhook dlq list|replay|drop`.
pub fn dlq(config: &Path, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let op = operator(config)?;
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
                .block_on(target.run(&operate::DlqList(filter)))
                .map_err(|e| op_error(&op, e))?;
            if a.json {
                print_json(&rows);
            } else {
                print_dlq(&rows);
            }
        }
        DlqCommand::Replay(_) => print_json(
            &rt.block_on(target.run(&operate::DlqReplay(filter)))
                .map_err(|e| op_error(&op, e))?,
        ),
        DlqCommand::Drop(_) => print_json(
            &rt.block_on(target.run(&operate::DlqDrop(filter)))
                .map_err(|e| op_error(&op, e))?,
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// The filter of a `pollhook dlq` command.
fn dlq_filter(op: &OperatorConfig, a: &DlqArgs) -> anyhow::Result<operate::Filter> {
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
    Ok(operate::Filter {
        id: a.id.clone(),
        endpoint: a.endpoint.clone(),
        sources,
        kind: a.kind.clone(),
        since_ms,
        until_ms: None,
        all: a.all,
    })
}

/// `pollhook status [--json]`.
pub fn status(config: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let op = operator(config)?;
    let s = runtime()?
        .block_on(operate::status(&op.state_dir, op.admin_token.as_deref()))
        .map_err(|e| op_error(&op, e))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print_status(&s);
    }
    Ok(ExitCode::SUCCESS)
}

/// `pollhook events`: recent delivery attempts.
pub fn events(
    config: &Path,
    id: Option<String>,
    endpoint: Option<String>,
    limit: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let op = operator(config)?;
    let q = operate::Events(pollhook::store::AttemptQuery {
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
        print_events(rows);
    }
    Ok(ExitCode::SUCCESS)
}
