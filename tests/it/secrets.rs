//! Secrets learned at run time, and bounds on what upstreams and configs
//! control (issue 19, items 3 and 4): credentials masked whatever their
//! param says, tokens an upstream echoes masked in every encoding, config
//! errors that name references and not values, capped token bodies,
//! template operators and paging, and the SSRF guard's registry table.

use crate::support::*;

/// `pollhook validate` on a bridge whose one endpoint is at `url`.
fn validate_endpoint(url: &str) -> (bool, String) {
    let bridge = format!(
        "sources: {{}}\nendpoints:\n  agent:\n    url: {url}\n    secret: {}\n",
        secret()
    );
    let d = Daemon::new(&bridge, &[]);
    let out = d.command(&["validate"]).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn the_ssrf_guard_refuses_every_special_purpose_block_iana_does_not_call_reachable() {
    for url in [
        "https://[2001:2::1]/hook",    // benchmarking
        "https://[2001:20::1]/hook",   // ORCHIDv2
        "https://[3fff::1]/hook",      // documentation (RFC 9637)
        "https://[5f00::1]/hook",      // SRv6 SIDs
        "https://[100:0:0:1::1]/hook", // dummy IPv6 prefix
        "https://192.0.0.170/hook",    // NAT64/DNS64 discovery
        "https://[::ffff:192.0.0.8]/hook",
    ] {
        let (ok, err) = validate_endpoint(url);
        assert!(!ok && err.contains("SSRF"), "{url}: {err}");
    }
    // Reachable blocks inside refused ones stay allowed.
    for url in [
        "https://[2001:3::1]/hook", // AMT
        "https://[2001:1::1]/hook", // PCP anycast
        "https://192.0.0.9/hook",   // PCP anycast
        "https://[2606:4700::1]/hook",
    ] {
        let (ok, err) = validate_endpoint(url);
        assert!(ok, "{url}: {err}");
    }
}

/// A bridge with one source, `s`, on the connector file `c.yaml`, with
/// `with` (a YAML flow map) and `extra` top-level keys.
fn one_source_bridge(with: &str, every: &str, extra: &str) -> String {
    format!(
        r#"
state_dir: state
admin: {{ listen: "127.0.0.1:0" }}
{extra}
sources:
  s:
    connector: c
    with: {with}
    schedule: every {every}
    deliver_to: [agent]
endpoints:
  agent: {{ url: "http://127.0.0.1:9/hook", secret: {} }}
"#,
        secret()
    )
}

#[test]
fn validate_refuses_an_absurd_max_pages() {
    let connector = |max: &str| {
        format!(
            r#"
name: c
request: {{ url: "http://127.0.0.1:9/items" }}
paginate:
  next_url: $.next
  max_pages: {max}
items: "$.items[*]"
id: "{{{{ item.id }}}}"
detect: new
emit: [{{ type: t.new }}]
"#
        )
    };
    let run = |max: &str| {
        let d = Daemon::new(
            &one_source_bridge("{}", "1m", ""),
            &[("c.yaml", connector(max))],
        );
        let out = d.command(&["validate"]).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = run("1000000");
    assert!(
        !ok && err.contains("paginate.max_pages") && err.contains("1000"),
        "{err}"
    );
    assert!(err.contains("c.yaml:6"), "names the line: {err}");
    let (ok, err) = run("1000");
    assert!(ok, "{err}");
}
