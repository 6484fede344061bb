//! Backups (`pollhook state export` / `state import`), written once for
//! every backend on top of the seam.
//!
//! The format is JSON lines: a header, then one [`Record`] per line, kinds
//! in [`RecordKind::ALL`] order (state before the outbox: see there why).
//! Readable, diffable, and independent of any backend's on-disk format, so
//! it is also how state moves from one backend to another.

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead as _, Read as _};

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
/// (see [`parse`]) before anything is written, so a bad file changes
/// nothing. Returns how many records.
pub async fn import(
    store: &Store,
    input: impl std::io::BufRead,
    endpoints: Option<&BTreeSet<String>>,
) -> Result<usize> {
    let records = store.count_records().await?;
    if records > 0 {
        return Err(StoreError::NotEmpty { records });
    }
    let rows = parse(input, endpoints)?;
    let n = store.import_records(rows).await?;
    store.flush().await?;
    Ok(n)
}

/// The longest line a backup may have. An outbox line holds an event's
/// body (itself capped well below this), escaped; a longer line is not a
/// backup pollhook wrote, and is refused before it is read whole.
pub const MAX_LINE: usize = 32 * 1024 * 1024;

/// Reads and checks every line of a backup: the header first (blank lines
/// aside), each record readable as its kind, no record twice (the same
/// instance, source or endpoint, or the same event queued twice for one
/// endpoint), instance keys of the form `source/instance`, and, when
/// `endpoints` is given, outbox entries, dead letters and disabled marks
/// only for endpoints of the configuration (an entry for another would
/// wait forever).
pub fn parse(
    mut input: impl std::io::BufRead,
    endpoints: Option<&BTreeSet<String>>,
) -> Result<Vec<Record>> {
    let bad = |line: usize, detail: String| StoreError::Backup { line, detail };
    let mut format = None;
    let mut rows = Vec::new();
    let mut unique: HashSet<(RecordKind, String, String)> = HashSet::new();
    let mut buf = Vec::new();
    let mut no = 0;
    loop {
        no += 1;
        buf.clear();
        let n = (&mut input)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| bad(no, e.to_string()))?;
        if n == 0 {
            break;
        }
        if buf.len() > MAX_LINE {
            return Err(bad(
                no,
                format!(
                    "longer than {} MiB: not a pollhook backup line",
                    MAX_LINE >> 20
                ),
            ));
        }
        let line = std::str::from_utf8(&buf).map_err(|e| bad(no, format!("not UTF-8: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| bad(no, format!("not JSON: {e}")))?;
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
            from_format_1(&v).map_err(|d| bad(no, d.to_string()))?
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
        check(&record, endpoints, &mut unique).map_err(|d| bad(no, d.to_string()))?;
        rows.push(record);
    }
    if format.is_none() {
        return Err(bad(1, "empty: not a pollhook state backup".into()));
    }
    Ok(rows)
}

/// Why a backup line's record is refused; the message follows the line
/// number in [`StoreError::Backup`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum RecordError {
    #[error("{0:?} is not an instance key (`source/instance`)")]
    InstanceKey(String),
    #[error("{0:?} is not an event id")]
    EventId(String),
    #[error("the body of event {0} is not a JSON object")]
    BodyNotObject(String),
    #[error("the body of event {event} is not JSON: {error}")]
    BodyNotJson { event: String, error: String },
    #[error("{0} is nested deeper than {MAX_DEPTH} levels, the most the store keeps")]
    TooDeep(String),
    #[error("endpoint `{endpoint}` is not in the configuration (known: {known}): its events could never be sent")]
    UnknownEndpoint { endpoint: String, known: String },
    #[error("{0:?} is not an endpoint name")]
    EndpointName(String),
    #[error("{0:?} is not a source name")]
    SourceName(String),
    #[error("a second {kind} record of {what}")]
    Duplicate { kind: &'static str, what: String },
    /// A tree no record kind has.
    #[error("unknown tree `{0}` (expected one of {kinds})", kinds = kinds())]
    UnknownTree(String),
    /// Format 1: the sled key.
    #[error("`key` is not base64: {0}")]
    KeyNotBase64(String),
    /// Format 1: the value of a known tree.
    #[error("`value` is not a {tree} record: {error}")]
    NotARecord { tree: String, error: String },
}

/// One record's checks beyond its shape (see [`parse`]).
fn check(
    r: &Record,
    endpoints: Option<&BTreeSet<String>>,
    unique: &mut HashSet<(RecordKind, String, String)>,
) -> std::result::Result<(), RecordError> {
    // Names and ids are single lines without control characters:
    // pollhook never makes others (discovered names with them are
    // skipped), and one would forge a log line or a header.
    let name = |n: &str| !n.is_empty() && !n.chars().any(char::is_control);
    let instance_key = |k: &str| match k.split_once('/') {
        Some((s, i)) if !s.is_empty() && !i.is_empty() && name(k) => Ok(()),
        _ => Err(RecordError::InstanceKey(k.to_string())),
    };
    let event = |e: &OutboxEntry| {
        if !name(&e.event_id) {
            return Err(RecordError::EventId(e.event_id.clone()));
        }
        // The body is sent as it is: it must be the event's JSON.
        match serde_json::from_str::<Value>(&e.body) {
            Ok(Value::Object(_)) => Ok(()),
            Ok(_) => Err(RecordError::BodyNotObject(e.event_id.clone())),
            Err(err) => Err(RecordError::BodyNotJson {
                event: e.event_id.clone(),
                error: err.to_string(),
            }),
        }
    };
    let deep = |what: String| Err(RecordError::TooDeep(what));
    let endpoint = |e: &str| match endpoints {
        Some(known) if !known.contains(e) => Err(RecordError::UnknownEndpoint {
            endpoint: e.to_string(),
            known: known.iter().cloned().collect::<Vec<_>>().join(", "),
        }),
        _ if !name(e) => Err(RecordError::EndpointName(e.to_string())),
        _ => Ok(()),
    };
    let (a, b) = match r {
        Record::Disabled { endpoint: e, .. } => {
            endpoint(e)?;
            (e.clone(), String::new())
        }
        Record::State { instance, value } => {
            instance_key(instance)?;
            if value
                .snapshot
                .as_ref()
                .is_some_and(|v| nested_deeper_than(&v.value(), MAX_DEPTH))
            {
                return deep(format!("the snapshot of {instance}"));
            }
            for (id, k) in &value.known {
                if nested_deeper_than(&k.item, MAX_DEPTH) {
                    return deep(format!("item {id:?} of {instance}"));
                }
            }
            (instance.clone(), String::new())
        }
        Record::Removed { instance, .. } => {
            instance_key(instance)?;
            (instance.clone(), String::new())
        }
        Record::Discovered { source, .. } => {
            if !name(source) {
                return Err(RecordError::SourceName(source.clone()));
            }
            (source.clone(), String::new())
        }
        Record::Outbox { endpoint: e, value } => {
            endpoint(e)?;
            instance_key(&value.instance)?;
            event(value)?;
            (e.clone(), value.event_id.clone())
        }
        Record::Dead { value } => {
            endpoint(&value.endpoint)?;
            instance_key(&value.entry.instance)?;
            event(&value.entry)?;
            (value.endpoint.clone(), value.entry.event_id.clone())
        }
        Record::Attempt { .. } => return Ok(()),
    };
    if !unique.insert((r.kind(), a.clone(), b.clone())) {
        let what = if b.is_empty() {
            a
        } else {
            format!("{b} for {a}")
        };
        return Err(RecordError::Duplicate {
            kind: r.kind().name(),
            what,
        });
    }
    Ok(())
}

fn kinds() -> String {
    RecordKind::ALL.map(|k| k.name()).join(", ")
}

/// A format 1 line: `{"tree", "key": base64 sled key, "value"}`.
fn from_format_1(v: &Value) -> std::result::Result<Record, RecordError> {
    let tree = v["tree"].as_str().unwrap_or("");
    let key = B64
        .decode(v["key"].as_str().unwrap_or(""))
        .map_err(|e| RecordError::KeyNotBase64(e.to_string()))?;
    let name = String::from_utf8_lossy(&key).into_owned();
    let value = v["value"].clone();
    let check = |e: serde_json::Error| RecordError::NotARecord {
        tree: tree.to_string(),
        error: e.to_string(),
    };
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
        other => return Err(RecordError::UnknownTree(other.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_line_is_named_and_nothing_is_returned() {
        let text = "{\"pollhook_state\":2}\n{\"tree\":\"state\",\"instance\":\"s/i\",\"value\":{}}\n{\"tree\":\"bogus\"}\n";
        let e = parse(text.as_bytes(), None).unwrap_err().to_string();
        assert!(
            e.contains("line 3") && e.contains("unknown tree `bogus`"),
            "{e}"
        );
        let e = parse("{\"tree\":\"state\"}\n".as_bytes(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no `pollhook_state` header"), "{e}");
        let e = parse("{\"pollhook_state\":9}\n".as_bytes(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("format 9"), "{e}");
        let text = "{\"pollhook_state\":2}\n{\"tree\":\"removed\",\"instance\":\"s/i\",\"delete_at_ms\":\"x\"}\n";
        let e = parse(text.as_bytes(), None).unwrap_err().to_string();
        assert!(
            e.contains("line 2") && e.contains("not a removed record"),
            "{e}"
        );
    }

    const OUTBOX: &str = r#"{"tree":"outbox","endpoint":"agent","value":{"event_id":"msg_1","instance":"s/i","kind":"t","sequence":1,"body":"{}","attempts":0,"next_attempt_ms":0,"created_ms":0,"last_error":null}}"#;

    /// The probe's import gaps: a blank first line before records, the
    /// same record twice, an entry for an endpoint the configuration does
    /// not have, a malformed instance key, a huge line.
    #[test]
    fn imports_are_checked_whole_before_anything_is_written() {
        let header = "{\"pollhook_state\":2}";
        let err = |text: &str, eps: Option<&BTreeSet<String>>| {
            parse(text.as_bytes(), eps).unwrap_err().to_string()
        };
        let e = err(&format!("\n{OUTBOX}\n"), None);
        assert!(
            e.contains("line 2") && e.contains("no `pollhook_state` header"),
            "{e}"
        );
        assert!(err("", None).contains("empty"));
        let e = err(&format!("{header}\n{OUTBOX}\n{OUTBOX}\n"), None);
        assert!(
            e.contains("line 3") && e.contains("a second outbox record of msg_1 for agent"),
            "{e}"
        );
        let state = r#"{"tree":"state","instance":"s/i","value":{}}"#;
        let e = err(&format!("{header}\n{state}\n{state}\n"), None);
        assert!(e.contains("a second state record of s/i"), "{e}");
        let known: BTreeSet<String> = ["other".to_string()].into();
        let e = err(&format!("{header}\n{OUTBOX}\n"), Some(&known));
        assert!(
            e.contains("endpoint `agent` is not in the configuration (known: other)"),
            "{e}"
        );
        let e = err(
            &format!("{header}\n{}\n", OUTBOX.replace("s/i", "si")),
            None,
        );
        assert!(e.contains("\"si\" is not an instance key"), "{e}");
        let huge = format!("{header}\n{}\n", "x".repeat(MAX_LINE + 10));
        let e = err(&huge, None);
        assert!(
            e.contains("line 2") && e.contains("longer than 32 MiB"),
            "{e}"
        );
        // Blank lines between records are fine.
        let known: BTreeSet<String> = ["agent".to_string()].into();
        let ok = parse(format!("\n{header}\n\n{OUTBOX}\n").as_bytes(), Some(&known)).unwrap();
        assert_eq!(ok.len(), 1);
    }

    /// The probes: an outbox entry whose body is not JSON and ids holding
    /// a newline were imported; an item nested deeper than the store reads
    /// back would be. Each is refused with its line.
    #[test]
    fn bodies_ids_and_depths_are_checked_with_their_line() {
        let header = "{\"pollhook_state\":2}";
        let err = |record: String| {
            parse(format!("{header}\n{record}\n").as_bytes(), None)
                .unwrap_err()
                .to_string()
        };
        let e = err(OUTBOX.replace(r#""body":"{}""#, r#""body":"not json""#));
        assert!(
            e.contains("line 2") && e.contains("the body of event msg_1 is not JSON"),
            "{e}"
        );
        let e = err(OUTBOX.replace(r#""body":"{}""#, r#""body":"[1]""#));
        assert!(e.contains("not a JSON object"), "{e}");
        let e = err(OUTBOX.replace("msg_1", "msg\\n1"));
        assert!(
            e.contains("line 2") && e.contains(r#""msg\n1" is not an event id"#),
            "{e}"
        );
        let e = err(OUTBOX.replace("s/i", "s/i\\nforged"));
        assert!(e.contains("is not an instance key"), "{e}");
        let e = err(OUTBOX.replace(r#""endpoint":"agent""#, r#""endpoint":"a\ngent""#));
        assert!(e.contains("is not an endpoint name"), "{e}");
        let deep = |n: usize| {
            let item = super::super::records::tests::nested(n);
            let state = InstanceState {
                snapshot: Some(crate::store::Snapshot::of(&item)),
                ..Default::default()
            };
            let known = InstanceState {
                known: [(
                    "x".to_string(),
                    KnownItem {
                        version: "1".into(),
                        item,
                    },
                )]
                .into(),
                ..Default::default()
            };
            [state, known].map(|value| {
                serde_json::to_string(&Record::State {
                    instance: "s/i".into(),
                    value,
                })
                .unwrap()
            })
        };
        for line in deep(MAX_DEPTH) {
            assert_eq!(
                parse(format!("{header}\n{line}\n").as_bytes(), None)
                    .unwrap()
                    .len(),
                1
            );
        }
        let [snapshot, known] = deep(MAX_DEPTH + 1);
        let e = err(snapshot);
        assert!(
            e.contains("line 2") && e.contains("the snapshot of s/i is nested deeper than 64"),
            "{e}"
        );
        let e = err(known);
        assert!(e.contains(r#"item "x" of s/i is nested deeper"#), "{e}");
    }

    #[test]
    fn format_1_backups_are_still_read() {
        let key = B64.encode(b"ep\0s/i\0\0\0\0\0\0\0\0\x07");
        let text = format!(
            "{{\"pollhook_state\":1}}\n{{\"tree\":\"outbox\",\"key\":\"{key}\",\"value\":{{\"event_id\":\"msg_1\",\"instance\":\"s/i\",\"kind\":\"t\",\"sequence\":1,\"body\":\"{{}}\",\"attempts\":0,\"next_attempt_ms\":0,\"created_ms\":0,\"last_error\":null}}}}\n{{\"tree\":\"removed\",\"key\":\"{}\",\"value\":5}}\n",
            B64.encode("s/old")
        );
        let rows = parse(text.as_bytes(), None).unwrap();
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
