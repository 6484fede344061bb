//! The layering of `src/` (ARCHITECTURE.md, "Layers"), enforced: every
//! `crate::` path of every library file (tests left out), read the way a
//! module-graph tool reads them, must point down the layers.
//! An import that runs up (or sideways, between two modules of one layer)
//! fails the test, naming the file and the arrow.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, top first. A module may import only modules of a lower
/// layer; modules of one layer do not import each other. Keep in step with
/// ARCHITECTURE.md.
const LAYERS: &[&[&str]] = &[
    // Entry points: the binary's CLI, `pollhook test`.
    &["cli", "dryrun"],
    // `pollhook run`: lifecycle and supervisor.
    &["daemon"],
    // The admin server (and its dashboard); reload's comparison of configs.
    &["admin", "reload"],
    // Building the runtime types from YAML; operator verbs.
    &["config", "operate"],
    // The tasks.
    &["discover", "poll"],
    // What every stage shares at run time.
    &["runtime"],
    // Delivery workers.
    &["deliver"],
    // Services the tasks hold.
    &["cluster", "opsevents"],
    &["status"],
    &["connector"],
    &["quota"],
    &["store"],
    // Leaves: they import nothing of the crate.
    &[
        "access", "event", "gcra", "hints", "logfmt", "memory", "notify", "schedule", "template",
        "wake",
    ],
];

/// Arrows allowed to run up, each with its reason. Empty: since quota's
/// host gates book through the coordination seam (`store::Coordinator`),
/// every arrow follows `LAYERS`. Adding one here is a design decision to
/// explain, not a way to make the test pass.
const ALLOWED_UP: &[(&str, &str)] = &[];

/// `#[cfg(test)] mod … { … }` blocks removed (by brace matching).
fn strip_tests(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        let after = &rest[at + "#[cfg(test)]".len()..];
        let t = after.trim_start();
        let t = t.strip_prefix("pub").map_or(t, str::trim_start);
        let is_mod = t
            .strip_prefix("mod")
            .is_some_and(|m| m.starts_with(char::is_whitespace));
        let open = t.find('{');
        let head_ok = is_mod && open.is_some_and(|o| !t[..o].contains(';'));
        if !head_ok {
            out.push_str(&rest[..at + "#[cfg(test)]".len()]);
            rest = after;
            continue;
        }
        out.push_str(&rest[..at]);
        let body = &t[open.unwrap() + 1..];
        let mut depth = 1;
        let mut end = body.len();
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = i + 1;
                break;
            }
        }
        rest = &body[end..];
    }
    out.push_str(rest);
    out
}

/// Line comments removed (doc comments too).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> &str {
    let s = s.trim_start();
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level names a file reaches through `crate::` (`crate::a::…`
/// and each first name of a `crate::{a, b::c}` group).
fn crate_paths(text: &str) -> BTreeSet<String> {
    let text = strip_comments(&strip_tests(text));
    let mut names = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("crate::") {
        // `pollhook_crate::x` or `some_crate::x` is not `crate::`.
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        item_start = false;
                        let n = ident_at(&group[i..]);
                        if !n.is_empty() {
                            names.insert(n.to_string());
                        }
                    }
                    _ => {}
                }
            }
        } else {
            let n = ident_at(rest);
            if !n.is_empty() {
                names.insert(n.to_string());
            }
        }
    }
    names
}

/// The top-level modules of `src` (files and folders, not `main`/`lib`).
fn modules(src: &Path) -> BTreeSet<String> {
    std::fs::read_dir(src)
        .expect("src/")
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            if e.path().is_dir() {
                Some(name)
            } else {
                let m = name.strip_suffix(".rs")?;
                (m != "main" && m != "lib").then(|| m.to_string())
            }
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("readable dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "tests") {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs")
            && p.file_name().is_some_and(|n| n != "tests.rs")
        {
            out.push(p);
        }
    }
}

/// Each arrow `from -> to` between top-level modules, with the first file
/// that makes it.
fn arrows(src: &Path) -> BTreeMap<(String, String), PathBuf> {
    let mods = modules(src);
    let mut found = BTreeMap::new();
    for m in &mods {
        let dir = src.join(m);
        let mut files = Vec::new();
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        } else {
            files.push(src.join(format!("{m}.rs")));
        }
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).expect("readable source");
            for n in crate_paths(&text) {
                if mods.contains(&n) && &n != m {
                    found
                        .entry((m.clone(), n))
                        .or_insert_with(|| f.strip_prefix(src).unwrap_or(&f).to_path_buf());
                }
            }
        }
    }
    found
}

/// What is wrong with these arrows under these layers: modules without a
/// layer, and arrows that do not run down.
fn violations(
    mods: &BTreeSet<String>,
    arrows: &BTreeMap<(String, String), PathBuf>,
    layers: &[&[&str]],
    allowed_up: &[(&str, &str)],
) -> Vec<String> {
    let rank: BTreeMap<&str, usize> = layers
        .iter()
        .enumerate()
        .flat_map(|(i, l)| l.iter().map(move |m| (*m, i)))
        .collect();
    let mut bad = Vec::new();
    for m in mods {
        if !rank.contains_key(m.as_str()) {
            bad.push(format!(
                "src/{m}: a module without a layer (add it to LAYERS and ARCHITECTURE.md)"
            ));
        }
    }
    for ((from, to), file) in arrows {
        let (Some(a), Some(b)) = (rank.get(from.as_str()), rank.get(to.as_str())) else {
            continue;
        };
        if a < b || allowed_up.contains(&(from.as_str(), to.as_str())) {
            continue;
        }
        let how = if a == b { "sideways" } else { "up the layers" };
        bad.push(format!("src/{}: {from} -> {to} runs {how}", file.display()));
    }
    bad
}

#[test]
fn every_import_runs_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    let found = arrows(&src);
    let bad = violations(&mods, &found, LAYERS, ALLOWED_UP);
    assert!(
        bad.is_empty(),
        "imports against the layers:\n{}",
        bad.join("\n")
    );
    // Every temporary exception is still needed (else remove it).
    for (from, to) in ALLOWED_UP {
        assert!(
            found.contains_key(&(from.to_string(), to.to_string())),
            "{from} -> {to} is gone: remove it from ALLOWED_UP"
        );
    }
    // Every layer names modules that exist.
    for m in LAYERS.iter().flat_map(|l| l.iter()) {
        assert!(
            mods.contains(*m),
            "LAYERS names {m}, which src/ does not have"
        );
    }
}

#[test]
fn crate_paths_reads_uses_groups_and_inline_paths_but_not_tests_or_comments() {
    let text = r#"
use crate::store::Store;
use crate::{poll::x, quota::{self, Rate}, wake};
use super::sibling;
fn f() { crate::status::now(); other_crate::event::x(); }
// crate::admin in a comment
/// crate::daemon in a doc comment
#[cfg(test)]
mod tests {
    use crate::config::Config;
    fn g() { let _ = { crate::cluster::x() }; }
}
fn h() { crate::schedule::next(); }
"#;
    let got: Vec<String> = crate_paths(text).into_iter().collect();
    assert_eq!(
        got,
        ["poll", "quota", "schedule", "status", "store", "wake"]
            .map(String::from)
            .to_vec()
    );
}

#[test]
fn an_upward_or_sideways_arrow_is_named_with_its_file() {
    let mods: BTreeSet<String> = ["top", "mid", "peer", "low", "new"]
        .map(String::from)
        .into();
    let layers: &[&[&str]] = &[&["top"], &["mid", "peer"], &["low"]];
    let mut arrows = BTreeMap::new();
    let mut add = |a: &str, b: &str, f: &str| {
        arrows.insert((a.to_string(), b.to_string()), PathBuf::from(f));
    };
    add("top", "low", "top.rs");
    add("mid", "low", "mid/mod.rs");
    add("low", "top", "low/x.rs");
    add("mid", "peer", "mid/y.rs");
    add("low", "mid", "low/z.rs");
    let bad = violations(&mods, &arrows, layers, &[("low", "mid")]);
    assert_eq!(
        bad,
        vec![
            "src/new: a module without a layer (add it to LAYERS and ARCHITECTURE.md)".to_string(),
            "src/low/x.rs: low -> top runs up the layers".to_string(),
            "src/mid/y.rs: mid -> peer runs sideways".to_string(),
        ]
    );
}
