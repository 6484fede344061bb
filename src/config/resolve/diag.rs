//! One place to collect the problems of one file.

use std::collections::BTreeSet;
use std::path::Path;

use serde_saphyr::Spanned;

use crate::config::error::{ConfigError, ConfigErrors};

/// The problems found in one file so far, with what every message needs:
/// the file's name and its text as written (before `${VAR}`, so excerpts
/// never show a secret). Validation reports every problem at once, so
/// checks push here and go on rather than return at the first.
pub(crate) struct Diag<'a> {
    pub file: &'a Path,
    pub text: &'a str,
    errors: Vec<ConfigError>,
}

/// How many errors there were at some point (see [`Diag::failed_since`]).
#[derive(Clone, Copy)]
pub(crate) struct Mark(usize);

impl<'a> Diag<'a> {
    pub fn new(file: &'a Path, text: &'a str) -> Self {
        Diag {
            file,
            text,
            errors: Vec::new(),
        }
    }

    /// An error at `line`:`column` (0 when unknown) of this file.
    pub fn at(&mut self, line: u64, column: u64, field: &str, message: impl Into<String>) {
        self.errors.push(ConfigError::at(
            self.file, self.text, line, column, field, message,
        ));
    }

    /// An error at a value that knows where it was written.
    pub fn at_span<T>(&mut self, at: &Spanned<T>, field: &str, message: impl Into<String>) {
        self.at(at.referenced.line(), at.referenced.column(), field, message);
    }

    /// An error made elsewhere (another file, another resolution).
    pub fn push(&mut self, error: ConfigError) {
        self.errors.push(error);
    }

    /// Errors found in another file (a connector file named by bridge.yaml).
    pub fn extend(&mut self, errors: ConfigErrors) {
        self.errors.extend(errors.0);
    }

    /// Errors of a nested resolution (an inline or `discover` connector),
    /// their fields under `prefix` (e.g. `discover.`).
    pub fn extend_under(&mut self, prefix: &str, errors: ConfigErrors) {
        self.errors.extend(errors.0.into_iter().map(|mut e| {
            e.field = format!("{prefix}{}", e.field);
            e
        }));
    }

    /// The line of the first `key:` of the file, for values that carry no
    /// location of their own (0 when absent). Only for keys that are
    /// unique in a file: the first `name:` is the connector's.
    pub fn line_of(&self, key: &str) -> u64 {
        let wanted = format!("{key}:");
        self.text
            .lines()
            .position(|l| l.trim_start().starts_with(&wanted))
            .map_or(0, |i| i as u64 + 1)
    }

    /// Reports template variables that are neither params nor builtins: a
    /// typo in a template must fail at load, not render as an error at 3 a.m.
    pub fn check_vars(
        &mut self,
        used: &BTreeSet<String>,
        params: &BTreeSet<String>,
        builtins: &[&str],
        (line, column): (u64, u64),
        field: &str,
    ) {
        for v in used {
            if !params.contains(v) && !builtins.contains(&v.as_str()) {
                let mut known: Vec<String> = params.iter().cloned().collect();
                known.extend(builtins.iter().map(|s| s.to_string()));
                self.at(
                    line,
                    column,
                    field,
                    format!(
                        "unknown variable `{v}`; expected a declared param or one of: {}",
                        known.join(", ")
                    ),
                );
            }
        }
    }

    pub fn mark(&self) -> Mark {
        Mark(self.errors.len())
    }

    /// Whether errors were found since `mark`.
    pub fn failed_since(&self, mark: Mark) -> bool {
        self.errors.len() > mark.0
    }

    /// `value` when no error was found, else every error.
    pub fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value())
        } else {
            Err(ConfigErrors(self.errors))
        }
    }
}
