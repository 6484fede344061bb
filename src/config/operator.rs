//! What operator commands (`status`, `dlq`, `events`, `state export`,
//! `endpoint enable`) need of bridge.yaml: where the store is and how to
//! reach the running daemon's admin server.
//!
//! They must work where the daemon's full environment is missing: from an
//! operator's shell, a `${BANK_URL}` only the sources use is unset, and so
//! are `$STATE_DIRECTORY` and `$CREDENTIALS_DIRECTORY`, which systemd sets
//! for the service alone. So only the fields read here have to resolve; the
//! rest of the file is not validated (`pollhook validate` does that).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::env::interpolate_partial;
use super::error::{ConfigError, ConfigErrors};

/// The part of bridge.yaml operator commands use.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// The bridge file it was read from.
    pub file: PathBuf,
    /// Directory of the embedded store (and of `admin.addr`).
    pub state_dir: PathBuf,
    /// The store (`store.backend`): what commands on a stopped daemon open.
    pub store: crate::store::Location,
    /// `admin.listen`, if set.
    pub admin_listen: Option<SocketAddr>,
    /// `admin.token`, if set, readable, and not `none`.
    pub admin_token: Option<String>,
    /// Why `admin.token` could not be read (an unset variable, a missing
    /// credential). Not an error by itself: commands on a stopped store need
    /// no token; one that reaches a daemon which answers 401 should say this.
    pub admin_token_error: Option<ConfigErrors>,
    /// Endpoint names, to check a name given on the command line.
    pub endpoints: BTreeSet<String>,
    /// Source name → the name of its connector (`dlq --connector`). An
    /// inline connector is named by its `name:`, else after its source.
    pub sources: BTreeMap<String, String>,
}

/// Where systemd puts the directories of the example unit
/// (`examples/systemd/pollhook.service`), used when the variable naming
/// them is unset (an operator's shell) and the directory exists.
#[derive(Debug, Clone)]
pub struct SystemdDirs {
    /// `$STATE_DIRECTORY` of `StateDirectory=pollhook`.
    pub state_directory: PathBuf,
    /// `$CREDENTIALS_DIRECTORY` of the `pollhook.service` unit (readable by
    /// root while the service runs).
    pub credentials_directory: PathBuf,
}

impl Default for SystemdDirs {
    fn default() -> Self {
        SystemdDirs {
            state_directory: PathBuf::from("/var/lib/pollhook"),
            credentials_directory: PathBuf::from("/run/credentials/pollhook.service"),
        }
    }
}

/// Reads what operator commands need of `file`, from the process
/// environment (see [`load_operator_with_env`]).
pub fn load_operator(file: &Path) -> Result<OperatorConfig, ConfigErrors> {
    load_operator_with_env(
        file,
        &|name| std::env::var(name).ok(),
        &SystemdDirs::default(),
    )
}

/// [`load_operator`] with an explicit environment and systemd directories.
///
/// Only `state_dir`, `admin.listen`, `admin.token` and, with
/// `store.backend: postgres`, `store.url` and `store.schema` are
/// interpolated for real: a variable used elsewhere may be unset. An unset
/// `$STATE_DIRECTORY` / `$CREDENTIALS_DIRECTORY` falls back to `systemd`'s
/// directory when it exists. `state_dir` and `admin.listen` are needed by
/// every command, so a problem there is an error; a problem with
/// `admin.token` is kept in [`OperatorConfig::admin_token_error`].
pub fn load_operator_with_env(
    file: &Path,
    lookup: &dyn Fn(&str) -> Option<String>,
    systemd: &SystemdDirs,
) -> Result<OperatorConfig, ConfigErrors> {
    let original = read_file(file)?;
    let fallback = |dir: &Path| {
        dir.is_dir()
            .then(|| dir.to_str().map(str::to_string))
            .flatten()
    };
    let lookup = |name: &str| {
        lookup(name).or_else(|| match name {
            "STATE_DIRECTORY" => fallback(&systemd.state_directory),
            "CREDENTIALS_DIRECTORY" => fallback(&systemd.credentials_directory),
            _ => None,
        })
    };
    let (text, failed) = interpolate_partial(file, &original, &lookup);
    let failed_at = |field: &str| -> Vec<ConfigError> {
        failed
            .iter()
            .filter(|e| e.field == field)
            .cloned()
            .collect()
    };
    let raw: RawOperator =
        serde_saphyr::from_str(&text).map_err(|e| ConfigError::from_yaml(file, &original, &e))?;
    let store_raw = raw.store.unwrap_or_default();
    let postgres = store_raw.backend.as_deref() == Some("postgres");
    let admin = raw.admin.unwrap_or_default();
    let mut errors = needed_failures(&failed_at, postgres, systemd);
    let admin_listen = match &admin.listen {
        Some(l) if errors.is_empty() => match parse_listen(file, &original, l) {
            Ok(a) => Some(a),
            Err(e) => {
                errors.push(e);
                None
            }
        },
        _ => None,
    };
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let (admin_token, admin_token_error) = operator_token(
        file,
        &original,
        admin.token.as_ref(),
        failed_at("admin.token"),
    );
    // Checked by the daemon's `Config::load`; here only read, so an
    // unusable value fails when the store is opened, with the store's error.
    let postgres_at = match (postgres, store_raw.url) {
        (true, Some(url)) => Some((url, store_raw.schema)),
        (true, None) => {
            return Err(ConfigErrors(vec![ConfigError::file(
                file,
                "store: `backend: postgres` needs `url`",
            )]))
        }
        (false, _) => None,
    };
    let store = location_of(file, raw.state_dir.as_deref(), postgres_at);
    Ok(OperatorConfig {
        state_dir: state_dir_of(file, raw.state_dir.as_deref()),
        store,
        file: file.to_path_buf(),
        admin_listen,
        admin_token,
        admin_token_error,
        endpoints: raw.endpoints.into_keys().collect(),
        sources: connector_names(raw.sources),
    })
}

/// The failed substitutions of the fields every operator command needs
/// (`state_dir`, `admin.listen`; `store.url` and `store.schema` with
/// PostgreSQL): those are errors, the others' are not. An unset
/// `$STATE_DIRECTORY` says how to give the unit's directory.
fn needed_failures(
    failed_at: &dyn Fn(&str) -> Vec<ConfigError>,
    postgres: bool,
    systemd: &SystemdDirs,
) -> Vec<ConfigError> {
    let mut errors = failed_at("state_dir");
    for e in &mut errors {
        if e.message.contains("`STATE_DIRECTORY`") {
            e.message.push_str(&format!(
                "; systemd sets it for the service only: give the unit's state directory, e.g. `STATE_DIRECTORY={} pollhook …`",
                systemd.state_directory.display()
            ));
        }
    }
    errors.extend(failed_at("admin.listen"));
    if postgres {
        errors.extend(failed_at("store.url"));
        errors.extend(failed_at("store.schema"));
    }
    errors
}

/// `admin.token` read as the daemon reads it (`token: none`, an empty
/// token refused), but a problem (`failed`: its substitution's errors) is
/// not an error here: see [`OperatorConfig::admin_token_error`].
fn operator_token(
    file: &Path,
    original: &str,
    token: Option<&Spanned<Option<String>>>,
    failed: Vec<ConfigError>,
) -> (Option<String>, Option<ConfigErrors>) {
    if !failed.is_empty() {
        return (None, Some(ConfigErrors(failed)));
    }
    match admin_auth(file, original, token) {
        Ok(AdminAuth::Token(t)) => (Some(t), None),
        Ok(_) => (None, None),
        Err(e) => (None, Some(ConfigErrors(vec![e]))),
    }
}

/// Source name → its connector's name: a file's name, or an inline
/// connector's `name:` (else the source's own name).
fn connector_names(sources: BTreeMap<String, RawOperatorSource>) -> BTreeMap<String, String> {
    sources
        .into_iter()
        .filter_map(|(name, s)| {
            let connector = match s.connector {
                serde_json::Value::String(c) => c,
                serde_json::Value::Object(m) => m
                    .get("name")
                    .and_then(|n| n.as_str())
                    .map_or_else(|| name.clone(), str::to_string),
                _ => return None,
            };
            Some((name, connector))
        })
        .collect()
}

/// Reads a configuration file whole; the one message for a file that
/// cannot be read, whichever loader reads it.
pub(super) fn read_file(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file)
        .map_err(|e| ConfigError::file(file, format!("cannot read the file: {e}")))
}

/// The store `store:` names: PostgreSQL at `url` (`postgres`: the URL and
/// the schema, `pollhook` unless given), else the embedded store in
/// `state_dir`. The daemon's [`super::Config`] and operator commands both
/// decide it here, so a command on a stopped daemon opens the daemon's
/// store.
pub(super) fn location_of(
    file: &Path,
    state_dir: Option<&str>,
    postgres: Option<(String, Option<String>)>,
) -> crate::store::Location {
    match postgres {
        Some((url, schema)) => crate::store::Location::Postgres {
            url,
            schema: schema.unwrap_or_else(|| DEFAULT_SCHEMA.to_string()),
        },
        None => crate::store::Location::Sled(state_dir_of(file, state_dir)),
    }
}

/// `store.schema` when not given.
const DEFAULT_SCHEMA: &str = "pollhook";

/// `state_dir`, relative to the bridge file's directory; `state` by default.
pub(super) fn state_dir_of(file: &Path, state_dir: Option<&str>) -> PathBuf {
    file.parent()
        .unwrap_or(Path::new("."))
        .join(state_dir.unwrap_or("state"))
}

/// `admin.listen` as an address.
pub(super) fn parse_listen(
    file: &Path,
    text: &str,
    listen: &Spanned<String>,
) -> Result<SocketAddr, ConfigError> {
    listen.value.parse::<SocketAddr>().map_err(|_| {
        ConfigError::at(
            file,
            text,
            listen.referenced.line(),
            listen.referenced.column(),
            "admin.listen",
            format!(
                "expected `ip:port` such as `127.0.0.1:9464`, got `{}`",
                listen.value
            ),
        )
    })
}

/// What `admin.token` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AdminAuth {
    /// No `token:` at all: fine on loopback, refused on any other address.
    Unset,
    /// `token: none`: no authentication, on purpose.
    Disabled,
    /// Every admin route but `/healthz` needs this bearer token.
    Token(String),
}

/// Reads `admin.token`. An empty token (an unset `${ADMIN_TOKEN:-}`, a
/// bare `token:`) is an error rather than no authentication: a missing
/// secret must never open the admin routes silently. A token that cannot
/// be sent in an `Authorization` header (a control character, such as the
/// newline of a two-line secret file) is refused too.
pub(super) fn admin_auth(
    file: &Path,
    text: &str,
    token: Option<&Spanned<Option<String>>>,
) -> Result<AdminAuth, ConfigError> {
    let Some(token) = token else {
        return Ok(AdminAuth::Unset);
    };
    let error = |message: &str| {
        ConfigError::at(
            file,
            text,
            token.referenced.line(),
            token.referenced.column(),
            "admin.token",
            message,
        )
    };
    match token.value.as_deref() {
        Some("none") if written_as_none(text, token) => Ok(AdminAuth::Disabled),
        None => Err(error(EMPTY_TOKEN)),
        Some(t) if t.trim().is_empty() => Err(error(EMPTY_TOKEN)),
        Some(t) if t.chars().any(char::is_control) => Err(error(
            "holds a control character (a newline?), which an `Authorization` header cannot carry",
        )),
        Some(t) => Ok(AdminAuth::Token(t.to_string())),
    }
}

/// Whether the file itself says `token: none` (plain or quoted), rather
/// than a `${VAR}` whose value is `none`: a substituted value is always a
/// literal token, so a variable cannot turn authentication off.
fn written_as_none(text: &str, token: &Spanned<Option<String>>) -> bool {
    let (line, column) = (token.referenced.line(), token.referenced.column());
    let Some(line) = text.lines().nth((line as usize).saturating_sub(1)) else {
        return false;
    };
    let rest: String = line
        .chars()
        .skip((column as usize).saturating_sub(1))
        .collect();
    let rest = rest.trim_start();
    ["none", "\"none\"", "'none'"].iter().any(|w| {
        rest.strip_prefix(w).is_some_and(|after| {
            after
                .chars()
                .next()
                .is_none_or(|c| c.is_whitespace() || matches!(c, ',' | '}' | '#' | '"' | '\''))
        })
    })
}

const EMPTY_TOKEN: &str = "empty (as an unset `${VAR:-}` gives), which would turn authentication off: give a token (e.g. `\"${credential:admin_token}\"`), or write `token: none` to run without one";

/// The admin server on an address other hosts can reach must ask for a
/// token, or be told explicitly (`token: none`) that it need not: its
/// routes replay, drop and export events.
pub(super) fn check_listen_auth(
    file: &Path,
    text: &str,
    listen: &Spanned<String>,
    addr: SocketAddr,
    auth: &AdminAuth,
) -> Result<(), ConfigError> {
    if *auth != AdminAuth::Unset || addr.ip().to_canonical().is_loopback() {
        return Ok(());
    }
    Err(ConfigError::at(
        file,
        text,
        listen.referenced.line(),
        listen.referenced.column(),
        "admin.listen",
        format!(
            "`{addr}` is not a loopback address, and the admin server has no `token`: anyone who reaches it could replay, drop and export events; set `admin.token` (e.g. `\"${{credential:admin_token}}\"`), or write `token: none` to serve it without authentication on purpose"
        ),
    ))
}

/// The fields read, nothing else: unknown fields are ignored on purpose
/// (the daemon's `RawBridge` denies them), so that a file a newer or older
/// daemon accepts still serves operator commands.
#[derive(Deserialize)]
struct RawOperator {
    #[serde(default)]
    state_dir: Option<String>,
    #[serde(default)]
    admin: Option<RawOperatorAdmin>,
    #[serde(default)]
    store: Option<RawOperatorStore>,
    #[serde(default)]
    sources: BTreeMap<String, RawOperatorSource>,
    #[serde(default)]
    endpoints: BTreeMap<String, serde::de::IgnoredAny>,
}

/// `store:`: where it is (retention settings are the daemon's).
#[derive(Deserialize, Default)]
struct RawOperatorStore {
    #[serde(default)]
    backend: Option<String>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    schema: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawOperatorAdmin {
    #[serde(default)]
    listen: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "super::raw::present")]
    token: Option<Spanned<Option<String>>>,
}

#[derive(Deserialize)]
struct RawOperatorSource {
    #[serde(default)]
    connector: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIDGE: &str = "state_dir: ${STATE_DIRECTORY}
admin: { listen: \"127.0.0.1:9464\", token: \"${credential:admin_token}\" }
connectors: [\"connectors/*.yaml\"]
sources:
  balances:
    connector: bank-balance
    with: { base_url: \"${BANK_URL}\", account: acc-1 }
    deliver_to: [agent]
  oneoff:
    connector: { request: { url: \"${ONEOFF_URL}\" }, detect: snapshot, emit: [{ type: t }] }
    deliver_to: [agent]
endpoints:
  agent: { url: \"${AGENT_URL}\", secret: \"${credential:agent_secret}\" }
  audit: { url: [${A}, ${B}], secret: x }
";

    struct Fixture {
        dir: tempfile::TempDir,
        file: PathBuf,
        systemd: SystemdDirs,
    }

    fn fixture(bridge: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bridge.yaml");
        std::fs::write(&file, bridge).unwrap();
        let systemd = SystemdDirs {
            state_directory: dir.path().join("var-lib-pollhook"),
            credentials_directory: dir.path().join("run-credentials"),
        };
        Fixture { dir, file, systemd }
    }

    fn env<'a>(vars: &'a [(&'a str, String)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |n| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone())
    }

    #[test]
    fn only_the_operator_fields_need_their_variables() {
        let f = fixture(BRIDGE);
        let creds = f.dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        std::fs::write(creds.join("admin_token"), "t0ken\n").unwrap();
        let vars = [
            ("STATE_DIRECTORY", "/srv/state".to_string()),
            ("CREDENTIALS_DIRECTORY", creds.display().to_string()),
        ];
        // BANK_URL, ONEOFF_URL, AGENT_URL, A, B and the agent_secret
        // credential are all missing: no matter.
        let op = load_operator_with_env(&f.file, &env(&vars), &f.systemd).unwrap();
        assert_eq!(op.state_dir, PathBuf::from("/srv/state"));
        assert_eq!(op.admin_listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(op.admin_token.as_deref(), Some("t0ken"));
        assert!(op.admin_token_error.is_none());
        assert_eq!(
            op.endpoints.iter().map(String::as_str).collect::<Vec<_>>(),
            ["agent", "audit"]
        );
        assert_eq!(op.sources["balances"], "bank-balance");
        assert_eq!(op.sources["oneoff"], "oneoff", "inline: the source's name");
    }

    #[test]
    fn systemd_directories_fall_back_when_unset_and_present() {
        let f = fixture(BRIDGE);
        // Neither variable set nor directory present: state_dir is an
        // error naming the variable and the way out; the token is not.
        let err = load_operator_with_env(&f.file, &env(&[]), &f.systemd)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bridge.yaml:1:")
                && err.contains("field `state_dir`")
                && err.contains("`STATE_DIRECTORY` is not set")
                && err.contains("STATE_DIRECTORY=")
                && !err.contains("admin"),
            "{err}"
        );
        // The systemd directories exist (as they do on the service's host).
        std::fs::create_dir(&f.systemd.state_directory).unwrap();
        let op = load_operator_with_env(&f.file, &env(&[]), &f.systemd).unwrap();
        assert_eq!(op.state_dir, f.systemd.state_directory);
        assert_eq!(op.admin_token, None);
        let why = op.admin_token_error.unwrap().to_string();
        assert!(
            why.contains("field `admin.token`") && why.contains("CREDENTIALS_DIRECTORY"),
            "{why}"
        );
        std::fs::create_dir(&f.systemd.credentials_directory).unwrap();
        std::fs::write(f.systemd.credentials_directory.join("admin_token"), "s").unwrap();
        let op = load_operator_with_env(&f.file, &env(&[]), &f.systemd).unwrap();
        assert_eq!(op.admin_token.as_deref(), Some("s"));
    }

    #[test]
    fn defaults_relative_paths_and_bad_listen() {
        let f = fixture("sources: {}\n");
        let op = load_operator_with_env(&f.file, &env(&[]), &f.systemd).unwrap();
        assert_eq!(op.state_dir, f.dir.path().join("state"));
        assert_eq!((op.admin_listen, op.admin_token), (None, None));
        let f = fixture("state_dir: data\nadmin:\n  listen: ${LISTEN:-nowhere}\n  token: \"\"\n");
        let err = load_operator_with_env(&f.file, &env(&[]), &f.systemd)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bridge.yaml:3:") && err.contains("expected `ip:port`"),
            "{err}"
        );
        let vars = [("LISTEN", "127.0.0.1:1".to_string())];
        let op = load_operator_with_env(&f.file, &env(&vars), &f.systemd).unwrap();
        assert_eq!(op.state_dir, f.dir.path().join("data"));
        assert_eq!(op.admin_token, None);
        let why = op.admin_token_error.unwrap().to_string();
        assert!(
            why.contains("bridge.yaml:4:") && why.contains("token: none"),
            "an empty token is an error, not no token: {why}"
        );
        let f = fixture("admin: { listen: \"0.0.0.0:1\", token: none }\n");
        let op = load_operator_with_env(&f.file, &env(&[]), &f.systemd).unwrap();
        assert_eq!(op.admin_token, None);
        let f = fixture("admin:\n  listen: \"127.0.0.1:1\"\n  token: 'none' # on purpose\n");
        let op = load_operator_with_env(&f.file, &env(&[]), &f.systemd).unwrap();
        assert_eq!(op.admin_token, None);
        // A variable whose value is `none` gives the token `none`: only the
        // file itself may turn authentication off.
        for bridge in [
            "admin: { listen: \"127.0.0.1:1\", token: \"${T}\" }\n",
            "admin: { listen: \"127.0.0.1:1\", token: ${T} }\n",
            "admin:\n  listen: \"127.0.0.1:1\"\n  token: none${T2:-}\n",
        ] {
            let f = fixture(bridge);
            let vars = [("T", "none".to_string())];
            let op = load_operator_with_env(&f.file, &env(&vars), &f.systemd).unwrap();
            assert_eq!(op.admin_token.as_deref(), Some("none"), "{bridge}");
        }
        let f = fixture("admin: { listen: \"0.0.0.0:1\", token: none }\n");
        let op = load_operator_with_env(&f.file, &env(&[]), &f.systemd).unwrap();
        assert_eq!(
            (op.admin_token, op.admin_token_error.is_none()),
            (None, true)
        );
    }
}
