//! `pollhook new connector NAME --from-curl '…'` / `--from-url URL`:
//! one request (through the daemon's poll client and the connector
//! transport, its body read under the default 10 MiB cap), the guesses of
//! `pollhook::connector::scaffold`, and a connector file that is checked
//! by the connector loader before it is put in place.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use pollhook::connector::curl::{parse_curl, CurlRequest};
use pollhook::connector::format::{parse_body, Format};
use pollhook::connector::scaffold::{self, Observed};
use pollhook::connector::transport::Transport;

use super::setup::runtime;

/// The most read of the one answer (a connector's default
/// `request.max_response_bytes`).
const MAX_BODY: u64 = 10 * 1024 * 1024;

/// Where the request comes from and where the connector goes.
pub struct NewConnector<'a> {
    pub name: &'a str,
    pub from_curl: Option<&'a str>,
    pub from_url: Option<&'a str>,
    pub out: Option<&'a Path>,
    pub force: bool,
}

/// `pollhook new connector`.
pub fn new_connector(n: &NewConnector<'_>) -> anyhow::Result<ExitCode> {
    let out = n
        .out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("connectors").join(format!("{}.yaml", n.name)));
    if out.exists() && !n.force {
        bail!(
            "{} exists; give `--force` to replace it, or `--out FILE`",
            out.display()
        );
    }
    let req = match (n.from_curl, n.from_url) {
        (Some(c), None) => parse_curl(c).context("--from-curl")?,
        (None, Some(u)) => CurlRequest::from_url(u),
        _ => bail!("give one of --from-curl '<curl command>' and --from-url URL"),
    };
    for w in &req.warnings {
        eprintln!("warning: {w}");
    }
    // Checked before the request: a bad name or URL costs no call.
    scaffold::plan_request(&req)?;
    let (headers, body, xml) = runtime()?.block_on(fetch(&req))?;
    let seen = Observed {
        headers: &headers,
        body: &body,
        xml,
    };
    let s = scaffold::guess(n.name, &req, &seen)?;
    write_checked(&out, &s.yaml)?;
    print_summary(n.name, &out, &s);
    Ok(ExitCode::SUCCESS)
}

/// The one request, as curl would send it; the answer's headers, body as
/// a tree, and whether it was XML. A failure or a non-2xx answer is an
/// error: a connector is guessed from a successful answer.
async fn fetch(
    req: &CurlRequest,
) -> anyhow::Result<(Vec<(String, String)>, serde_json::Value, bool)> {
    let url = req.full_url();
    let secrets = scaffold::plan_request(req)?.secret_values();
    let shown = pollhook::connector::mask(&url, &secrets);
    let client = pollhook::daemon::poll_client();
    let method = reqwest::Method::from_bytes(req.method().as_bytes())
        .with_context(|| format!("method `{}`", req.method()))?;
    let mut b = client.request(method, &url);
    for (k, v) in &req.headers {
        b = b.header(k, v);
    }
    if let Some(u) = &req.user {
        let (user, pw) = u.split_once(':').unwrap_or((u, ""));
        b = b.basic_auth(user, Some(pw).filter(|p| !p.is_empty()));
    }
    if let Some(body) = req.body() {
        if req.json {
            b = b
                .header("content-type", "application/json")
                .header("accept", "application/json");
        } else if req.header("content-type").is_none() {
            b = b.header("content-type", "application/x-www-form-urlencoded");
        }
        b = b.body(body);
    }
    let request = b
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .with_context(|| format!("building the request to {shown}"))?;
    let reply = Transport::Live(&client)
        .send(request, MAX_BODY)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{shown}: {}",
                pollhook::connector::mask(&e.to_string(), &secrets)
            )
        })?;
    let status = reply.status();
    let headers: Vec<(String, String)> = reply
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let bytes = reply
        .read_capped(MAX_BODY)
        .await
        .map_err(|e| anyhow::anyhow!("{shown}: reading the answer: {e} ({MAX_BODY} bytes)"))?;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
        bail!(
            "{shown} answered {status}: {}; a connector is guessed from a successful answer",
            pollhook::connector::mask(text.trim(), &secrets)
        );
    }
    let ct = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str());
    let (value, format) = parse_body(&bytes, ct, Format::Auto)
        .map_err(|e| anyhow::anyhow!("{shown}: the answer is {e}"))?;
    Ok((headers, value, format == Format::Xml))
}

/// Writes `yaml` to `out` only once the connector loader accepts it.
fn write_checked(out: &Path, yaml: &str) -> anyhow::Result<()> {
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file_name = out
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.new.yaml"));
    std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
    if let Err(e) = pollhook::config::resolve::load_connector(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        bail!("the generated connector does not validate (a bug of `pollhook new connector`; please report it):\n{e}");
    }
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

fn print_summary(name: &str, out: &Path, s: &scaffold::Scaffold) {
    println!("wrote {}", out.display());
    println!("guessed:");
    for g in &s.guesses {
        println!("  {g}");
    }
    let env = name.to_ascii_uppercase().replace('-', "_");
    let with: Vec<String> = s
        .params
        .iter()
        .filter(|p| p.secret)
        .map(|p| {
            format!(
                " --with {}=\"${env}_{}\"",
                p.name,
                p.name.to_ascii_uppercase()
            )
        })
        .collect();
    let with = with.concat();
    let f = out.display();
    println!("next:");
    println!("  pollhook test {f}{with}");
    println!("  pollhook record {f}{with} --polls 3 --every 1m --to cassettes/{name}");
    println!("  pollhook test {f}{with} --replay cassettes/{name} --expect cassettes/{name}.txt --update");
}
