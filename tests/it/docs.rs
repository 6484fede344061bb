//! The documentation holds together: every relative link of the top-level
//! documents leads to a file of the repository, the README leads to the
//! contract, and nothing points to a design file the repository does not
//! carry. Plain file reading, no binary and no network.

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The documents whose links are checked.
const DOCUMENTS: &[&str] = &["README.md", "CONTRACT.md", "ARCHITECTURE.md"];

/// The targets of the Markdown links of `text` (inline `[text](target)` and
/// reference definitions `[name]: target`), outside code blocks and code
/// spans, with any title and angle brackets removed.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut in_fence = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let prose = without_code_spans(line);
        // Reference definitions: `[name]: target "title"`.
        let t = prose.trim_start();
        if t.starts_with('[') && !t.starts_with("[!") {
            if let Some(end) = t.find("]:") {
                if !t[1..end].contains(']') {
                    if let Some(target) = t[end + 2..].split_whitespace().next() {
                        targets.push(clean(target));
                    }
                    continue;
                }
            }
        }
        // Inline links and images: `](target)`, `](target "title")`.
        let mut rest = prose.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let mut depth = 0usize;
            let mut end = after.len();
            for (j, c) in after.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' if depth == 0 => {
                        end = j;
                        break;
                    }
                    ')' => depth -= 1,
                    _ => {}
                }
            }
            let inside = after[..end].trim();
            if let Some(target) = inside.split_whitespace().next() {
                targets.push(clean(target));
            }
            rest = &after[end.min(after.len())..];
        }
    }
    targets
}

/// `line` with the contents of its `code spans` blanked out.
fn without_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
            out.push(c);
        } else if in_code {
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

fn clean(target: &str) -> String {
    target
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string()
}

/// A link that leaves the repository's files: a URL, a mail address, or an
/// anchor within the same document.
fn is_external(target: &str) -> bool {
    target.is_empty()
        || target.starts_with('#')
        || target.starts_with("//")
        || target.split_once(':').is_some_and(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        })
}

#[test]
fn link_targets_are_read_the_way_markdown_means_them() {
    let text = "See [a](CONTRACT.md#2-the-events) and ![b](<img/x.png> \"t\").\n\
                `[not](a-link.md)` and [web](https://example.com/x).\n\
                [ref]: docs/ref.md \"title\"\n\
                ```\n[code](in-a-block.md)\n```\n";
    assert_eq!(
        link_targets(text),
        [
            "CONTRACT.md#2-the-events",
            "img/x.png",
            "https://example.com/x",
            "docs/ref.md"
        ]
    );
    assert!(is_external("https://example.com/x"));
    assert!(is_external("mailto:a@example.com"));
    assert!(is_external("#1-the-files"));
    assert!(!is_external("CONTRACT.md#2-the-events"));
    assert!(!is_external("tests/it/main.rs"));
}

#[test]
fn relative_links_of_the_documents_lead_to_files_of_the_repository() {
    let root = root().canonicalize().expect("the repository's root exists");
    let mut broken = Vec::new();
    for doc in DOCUMENTS {
        let path = root.join(doc);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{doc} must exist at the repository's root: {e}"));
        let dir = path.parent().expect("a document has a directory");
        for target in link_targets(&text) {
            if is_external(&target) {
                continue;
            }
            let file = target.split('#').next().unwrap_or_default();
            let file = file.split('?').next().unwrap_or_default();
            let resolved = dir.join(file);
            match resolved.canonicalize() {
                Ok(p) if p.starts_with(&root) => {}
                Ok(p) => broken.push(format!(
                    "{doc}: `{target}` leads out of the repository ({})",
                    p.display()
                )),
                Err(_) => broken.push(format!("{doc}: `{target}` leads to no file")),
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));

    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    assert!(
        link_targets(&readme)
            .iter()
            .any(|t| t.split('#').next() == Some("CONTRACT.md")),
        "the README must link to the contract, CONTRACT.md"
    );
}

/// Every file under `dir`, recursively; `target` and hidden entries are
/// skipped.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn no_file_points_to_a_design_document_the_repository_does_not_carry() {
    // Built in pieces, so this file does not name it either.
    let absent = ["DESIGN", ".md"].concat();
    assert!(
        !root().join(&absent).exists(),
        "the contract is CONTRACT.md; {absent} is not part of the repository"
    );
    let mut files = Vec::new();
    // The top-level files (README.md and every other document, Cargo.toml,
    // bridge.yaml, …), then the trees of code, examples and tests.
    for entry in std::fs::read_dir(root())
        .expect("the root is readable")
        .flatten()
    {
        let path = entry.path();
        if path.is_file() {
            files.push(path);
        }
    }
    for dir in ["src", "examples", "tests", "benches", "connectors"] {
        files_under(&root().join(dir), &mut files);
    }
    assert!(
        files.iter().any(|f| f.ends_with("src/main.rs")),
        "the walk found the sources: {files:?}"
    );
    let needle = absent.to_lowercase();
    let mentions: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let bytes = std::fs::read(f).ok()?;
            let text = String::from_utf8_lossy(&bytes).to_lowercase();
            text.lines().position(|l| l.contains(&needle)).map(|n| {
                format!(
                    "{}:{}",
                    f.strip_prefix(root()).unwrap_or(f).display(),
                    n + 1
                )
            })
        })
        .collect();
    assert!(
        mentions.is_empty(),
        "these mention {absent}, which the repository does not carry (point to CONTRACT.md):\n{}",
        mentions.join("\n")
    );
}
