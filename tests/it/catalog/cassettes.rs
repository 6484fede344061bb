//! The catalog under test: every connector in `connectors/` has a cassette
//! (`connectors/cassettes/<name>/`: `pNNN-MMM.json` exchanges in its API's
//! documented shape, and `with.txt`, the `--with` params of the replay,
//! one `key=value` a line) and the output its replay must print
//! (`connectors/cassettes/<name>.expected.txt`). Each is run through the
//! real binary, no bridge, no network:
//!
//! ```sh
//! pollhook test connectors/<name>.yaml --with k=v … \
//!     --replay connectors/cassettes/<name> --expect connectors/cassettes/<name>.expected.txt
//! ```
//!
//! so a change to a connector that alters an event, a request or a verdict
//! fails here (`--update` rewrites the expected output, to be read before
//! it is committed). Part of `catalog.rs`.

use std::path::{Path, PathBuf};
use std::process::Output;

use super::root;
use crate::support::bin;

/// Polls a catalog cassette holds at least: a baseline, an unchanged
/// listing (or a 304), and one with an item added and one changed.
const MIN_POLLS: usize = 3;

/// A catalog connector and where its cassette is.
struct Entry {
    name: String,
    file: PathBuf,
    cassette: PathBuf,
    expected: PathBuf,
}

/// Every `connectors/*.yaml`, by name.
fn catalog() -> Vec<Entry> {
    let dir = root().join("connectors");
    let mut entries: Vec<Entry> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|file| {
            let name = file.file_stem().unwrap().to_string_lossy().into_owned();
            Entry {
                cassette: dir.join("cassettes").join(&name),
                expected: dir.join("cassettes").join(format!("{name}.expected.txt")),
                name,
                file,
            }
        })
        .collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    entries
}

/// The `--with` params of a cassette (`with.txt`: `key=value` lines,
/// blank lines and `#` comments skipped); none without the file.
fn with_of(cassette: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(cassette.join("with.txt")) else {
        return Vec::new();
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// The distinct poll numbers of a cassette's exchange files.
fn polls_of(cassette: &Path) -> Vec<String> {
    let mut polls: Vec<String> = std::fs::read_dir(cassette)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('p') && n.ends_with(".json") && n.len() == 13)
                .map(|n| n[..4].to_string())
                .collect()
        })
        .unwrap_or_default();
    polls.sort();
    polls.dedup();
    polls
}

/// `pollhook test FILE --with … --replay CASSETTE --expect EXPECTED`, from
/// an empty directory (no bridge.yaml to find).
fn replay(file: &Path, cassette: &Path, expected: &Path) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(bin());
    cmd.current_dir(dir.path())
        .env("POLLHOOK_LOG", "warn")
        .arg("test")
        .arg(file);
    for w in with_of(cassette) {
        cmd.arg("--with").arg(w);
    }
    cmd.arg("--replay")
        .arg(cassette)
        .arg("--expect")
        .arg(expected);
    cmd.output().unwrap()
}

/// Standard output and error of a run, for a failure message.
fn text_of(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn every_catalog_connector_replays_its_cassette_as_expected() {
    let entries = catalog();
    assert!(
        entries.len() >= 14,
        "the catalog's connectors: {:?}",
        entries.iter().map(|e| &e.name).collect::<Vec<_>>()
    );
    let mut failures = Vec::new();
    for e in &entries {
        if !e.cassette.is_dir() {
            failures.push(format!(
                "{}: no cassette: connectors/cassettes/{}/ is missing (record one with `pollhook record`, or write its exchange files by hand; see the README)",
                e.name, e.name
            ));
            continue;
        }
        let polls = polls_of(&e.cassette);
        if polls.len() < MIN_POLLS {
            failures.push(format!(
                "{}: connectors/cassettes/{}/ holds {} poll(s) ({polls:?}), at least {MIN_POLLS} wanted (baseline, unchanged, one added and one changed)",
                e.name, e.name, polls.len()
            ));
            continue;
        }
        if !e.expected.exists() {
            failures.push(format!(
                "{}: no {} (run the replay with --update, then read it)",
                e.name,
                e.expected.display()
            ));
            continue;
        }
        let out = replay(&e.file, &e.cassette, &e.expected);
        let text = text_of(&out);
        if !out.status.success() || !text.contains("(as expected in ") {
            // The diff is at the end of the output: show that part.
            let tail = text
                .find("the output differs")
                .map_or(&text[..], |i| &text[i..]);
            failures.push(format!("{}: exit {:?}\n{tail}", e.name, out.status.code()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} catalog cassette(s) failed:\n\n{}",
        failures.len(),
        entries.len(),
        failures.join("\n\n")
    );
}

/// The same cassette against a copy of a connector whose emit template
/// was altered (one field of the event's data): the replay exits 1 and
/// shows the changed line on both sides.
#[test]
fn an_altered_emit_template_fails_against_the_same_cassette() {
    let entry = catalog()
        .into_iter()
        .find(|e| e.name == "github-issues")
        .expect("github-issues is in the catalog");
    let original = std::fs::read_to_string(&entry.file).unwrap();
    let line = "      title: \"{{ item.title }}\"\n";
    assert!(original.contains(line), "the template to alter is there");
    let altered = original.replacen(line, "      title: \"{{ item.title | upper }}\"\n", 1);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("github-issues.yaml");
    std::fs::write(&file, altered).unwrap();

    // The unaltered file passes (so the failure below is the template's).
    let out = replay(&entry.file, &entry.cassette, &entry.expected);
    assert!(out.status.success(), "{}", text_of(&out));

    let out = replay(&file, &entry.cassette, &entry.expected);
    let text = text_of(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("the output differs from")
            && text.contains("-         \"title\": \"Crash on empty config\",")
            && text.contains("+         \"title\": \"CRASH ON EMPTY CONFIG\","),
        "the diff shows the event's title before and after:\n{text}"
    );
}

/// The params a connector file declares `secret: true` (the catalog
/// writes each param on one line: `  name: { …, secret: true, … }`).
fn secret_params(connector: &str) -> Vec<String> {
    let mut in_params = false;
    let mut out = Vec::new();
    for line in connector.lines() {
        if !line.starts_with(' ') && !line.starts_with('#') && !line.is_empty() {
            in_params = line.starts_with("params:");
            continue;
        }
        if in_params && line.contains("secret: true") {
            if let Some((name, _)) = line.trim().split_once(':') {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// A cassette is committed: no credential in it, in a header or anywhere
/// else. The replay's secret params (`with.txt`) never appear in an
/// exchange file, and every credential header the connector sends is
/// recorded as `***`.
#[test]
fn no_catalog_cassette_holds_a_credential() {
    let mut leaks = Vec::new();
    let mut checked = 0;
    for e in catalog() {
        let secrets = secret_params(&std::fs::read_to_string(&e.file).unwrap());
        let values: Vec<(String, String)> = with_of(&e.cassette)
            .into_iter()
            .filter_map(|w| w.split_once('=').map(|(k, v)| (k.into(), v.into())))
            .filter(|(k, v): &(String, String)| secrets.contains(k) && !v.is_empty())
            .collect();
        let Ok(dir) = std::fs::read_dir(&e.cassette) else {
            continue;
        };
        for f in dir {
            let path = f.unwrap().path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let exchange: serde_json::Value = serde_json::from_str(&text).unwrap();
            for (k, v) in &values {
                checked += 1;
                if text.contains(v.as_str()) {
                    leaks.push(format!("{}: the value of {k}", path.display()));
                }
            }
            let headers = exchange["request_headers"].as_object().cloned();
            for (name, value) in headers.into_iter().flatten() {
                let n = name.to_ascii_lowercase();
                let credential = n == "authorization"
                    || n == "cookie"
                    || ["key", "token", "secret", "consent"]
                        .iter()
                        .any(|w| n.contains(w));
                if credential && value != "***" {
                    leaks.push(format!("{}: header {name} is not masked", path.display()));
                }
            }
        }
    }
    assert!(checked > 0, "some cassette has a secret param to look for");
    assert!(
        leaks.is_empty(),
        "credentials in cassettes:\n{}",
        leaks.join("\n")
    );
}
