//! Backups (`pollhook state export` / `state import`), written once for
//! every backend on top of the seam.
//!
//! The format is JSON lines: a header, then one [`Record`] per line, kinds
//! in [`RecordKind::ALL`] order (state before the outbox: see there why).
//! Readable, diffable, and independent of any backend's on-disk format, so
//! it is also how state moves from one backend to another.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use super::records::*;
use super::{Result, Store, StoreError};

/// The version of the backup format this pollhook writes. Format 1 (sled
/// keys in base64) is still read.
pub const BACKUP_FORMAT: u64 = 2;

/// Records fetched per page while exporting: bounds memory whatever the
/// outbox depth.
const PAGE: usize = 1000;

/// Writes a backup of `store` to `out`; returns how many records.
pub async fn export(store: &Store, out: &mut (dyn std::io::Write + Send)) -> Result<usize> {
    let header = serde_json::json!({
        "pollhook_state": BACKUP_FORMAT,
        "pollhook_version": env!("CARGO_PKG_VERSION"),
        "exported_ms": crate::now_ms(),
    });
    writeln!(out, "{header}").map_err(StoreError::Write)?;
    let mut n = 0;
    for kind in RecordKind::ALL {
        let mut after = None;
        loop {
            let page = store.export_page(kind, after, PAGE).await?;
            for r in &page.records {
                let line = serde_json::to_string(r).expect("records serialize");
                writeln!(out, "{line}").map_err(StoreError::Write)?;
                n += 1;
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    out.flush().map_err(StoreError::Write)?;
    Ok(n)
}

/// Reads a backup into `store`, which must be empty. Every line is checked
/// (its kind known, its record readable) before anything is written, so a
/// bad file changes nothing. Returns how many records.
pub async fn import(store: &Store, input: impl std::io::BufRead) -> Result<usize> {
    let records = store.count_records().await?;
    if records > 0 {
        return Err(StoreError::NotEmpty { records });
    }
    let rows = parse(input)?;
    let n = store.import_records(rows).await?;
    store.flush().await?;
    Ok(n)
}

/// Reads and checks every line of a backup (pure but for reading).
pub fn parse(input: impl std::io::BufRead) -> Result<Vec<Record>> {
    let bad = |line: usize, detail: String| StoreError::Backup { line, detail };
    let mut format = None;
    let mut rows = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let no = i + 1;
        let line = line.map_err(|e| bad(no, e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(&line).map_err(|e| bad(no, format!("not JSON: {e}")))?;
        let Some(f) = format else {
            match v["pollhook_state"].as_u64() {
                Some(f @ (1 | BACKUP_FORMAT)) => format = Some(f),
                Some(other) => {
                    return Err(bad(
                        no,
                        format!(
                        "backup format {other}; this pollhook reads formats 1 and {BACKUP_FORMAT}"
                    ),
                    ))
                }
                None => {
                    return Err(bad(
                        no,
                        "not a pollhook state backup (no `pollhook_state` header)".into(),
                    ))
                }
            }
            continue;
        };
        let record = if f == 1 {
            from_format_1(&v).map_err(|d| bad(no, d))?
        } else {
            let tree = v["tree"].as_str().unwrap_or("").to_string();
            Record::deserialize(&v).map_err(|e| {
                if RecordKind::ALL.iter().any(|k| k.name() == tree) {
                    bad(no, format!("not a {tree} record: {e}"))
                } else {
                    bad(
                        no,
                        format!("unknown tree `{tree}` (expected one of {})", kinds()),
                    )
                }
            })?
        };
        rows.push(record);
    }
    Ok(rows)
}

fn kinds() -> String {
    RecordKind::ALL.map(|k| k.name()).join(", ")
}

/// A format 1 line: `{"tree", "key": base64 sled key, "value"}`.
fn from_format_1(v: &Value) -> std::result::Result<Record, String> {
    let tree = v["tree"].as_str().unwrap_or("");
    let key = B64
        .decode(v["key"].as_str().unwrap_or(""))
        .map_err(|e| format!("`key` is not base64: {e}"))?;
    let name = String::from_utf8_lossy(&key).into_owned();
    let value = v["value"].clone();
    let check = |e: serde_json::Error| format!("`value` is not a {tree} record: {e}");
    Ok(match tree {
        "disabled" => Record::Disabled {
            endpoint: name,
            why: serde_json::from_value(value).map_err(check)?,
        },
        "state" => Record::State {
            instance: name,
            value: serde_json::from_value(value).map_err(check)?,
        },
        "discovered" => Record::Discovered {
            source: name,
            value: serde_json::from_value(value).map_err(check)?,
        },
        "removed" => Record::Removed {
            instance: name,
            delete_at_ms: serde_json::from_value(value).map_err(check)?,
        },
        "outbox" => {
            let endpoint = name.split('\0').next().unwrap_or("").to_string();
            Record::Outbox {
                endpoint,
                value: serde_json::from_value(value).map_err(check)?,
            }
        }
        "dead" => Record::Dead {
            value: serde_json::from_value(value).map_err(check)?,
        },
        "attempts" => Record::Attempt {
            value: serde_json::from_value(value).map_err(check)?,
        },
        other => {
            return Err(format!(
                "unknown tree `{other}` (expected one of {})",
                kinds()
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_line_is_named_and_nothing_is_returned() {
        let text = "{\"pollhook_state\":2}\n{\"tree\":\"state\",\"instance\":\"s/i\",\"value\":{}}\n{\"tree\":\"bogus\"}\n";
        let e = parse(text.as_bytes()).unwrap_err().to_string();
        assert!(
            e.contains("line 3") && e.contains("unknown tree `bogus`"),
            "{e}"
        );
        let e = parse("{\"tree\":\"state\"}\n".as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no `pollhook_state` header"), "{e}");
        let e = parse("{\"pollhook_state\":9}\n".as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("format 9"), "{e}");
        let text = "{\"pollhook_state\":2}\n{\"tree\":\"removed\",\"instance\":\"s/i\",\"delete_at_ms\":\"x\"}\n";
        let e = parse(text.as_bytes()).unwrap_err().to_string();
        assert!(
            e.contains("line 2") && e.contains("not a removed record"),
            "{e}"
        );
    }

    #[test]
    fn format_1_backups_are_still_read() {
        let key = B64.encode(b"ep\0s/i\0\0\0\0\0\0\0\0\x07");
        let text = format!(
            "{{\"pollhook_state\":1}}\n{{\"tree\":\"outbox\",\"key\":\"{key}\",\"value\":{{\"event_id\":\"msg_1\",\"instance\":\"s/i\",\"kind\":\"t\",\"sequence\":1,\"body\":\"{{}}\",\"attempts\":0,\"next_attempt_ms\":0,\"created_ms\":0,\"last_error\":null}}}}\n{{\"tree\":\"removed\",\"key\":\"{}\",\"value\":5}}\n",
            B64.encode("s/old")
        );
        let rows = parse(text.as_bytes()).unwrap();
        assert!(
            matches!(&rows[0], Record::Outbox { endpoint, value } if endpoint == "ep" && value.event_id == "msg_1")
        );
        assert_eq!(
            rows[1],
            Record::Removed {
                instance: "s/old".into(),
                delete_at_ms: 5
            }
        );
    }
}
