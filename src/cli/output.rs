//! What the CLI prints of the library's replies: `operate` replies (JSON, dead
//! letters, delivery attempts) and a `pollhook test` report
//! (`dryrun::Report`). `/status` is in `status`.

use std::process::ExitCode;

use pollhook::store::AttemptRecord;
use pollhook::{dryrun, operate};

/// Prints a reply as pretty JSON.
pub fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub fn print_dlq(rows: &[operate::Listed]) {
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

/// Delivery attempts, one line each (`pollhook events`).
pub fn print_events(rows: Vec<AttemptRecord>) {
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

/// Prints a `pollhook test` report; its exit status.
pub fn print_report(r: &dryrun::Report, seeding: bool) -> ExitCode {
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
