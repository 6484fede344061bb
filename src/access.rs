//! Who may talk to the admin server, and how a browser may use its pages.
//!
//! - **Host and Origin** (pure [`host_allowed`], [`origin_allowed`]): a
//!   page of another site whose name was rebound to this machine's address
//!   (DNS rebinding) sends its own name as `Host`; only IP addresses (the
//!   listen address, any one when it listens on every address), `localhost`
//!   and the names of `admin.allowed_hosts` are answered. A request that
//!   carries an `Origin` must come from this server as it was reached, or
//!   from a listed name.
//! - **Headers** ([`HEADERS`], [`csp`]): no framing, no sniffing, no
//!   referrer, and a content security policy that allows the dashboard's
//!   own stylesheets (by hash) and nothing else.
//! - **Sessions** ([`Sessions`]): the dashboard's sign-in gives a random
//!   session id with a bounded lifetime; a reload that changes the token
//!   ends every session.
//! - **Failed attempts** ([`Failures`]): a wrong token (bearer or sign-in)
//!   is logged with the client's address, and a client that keeps failing
//!   waits (GCRA per client).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::Digest;

/// How long a dashboard session lasts after sign-in.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// Sessions kept at most; signing in beyond ends the oldest.
const MAX_SESSIONS: usize = 1000;
/// Failed attempts a client may make at once…
pub const FAILURES_BURST: u32 = 10;
/// …and then one each this long.
pub const FAILURE_PERIOD: Duration = Duration::from_secs(60);
/// Clients remembered at most by the failure limiter.
const MAX_CLIENTS: usize = 100_000;

/// The name in a `Host` header or an origin's authority: the port, and an
/// IPv6 literal's brackets, taken off; lower case, no trailing dot.
pub fn host_name(authority: &str) -> Option<String> {
    let a = authority.trim();
    let name = if let Some(rest) = a.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        inside
    } else {
        match a.rsplit_once(':') {
            Some((n, port)) if is_port(port) => n,
            Some(_) => return None,
            None => a,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let plain = !name.is_empty() && !name.contains(['/', '@', ' ', ':']);
    (plain || name.parse::<IpAddr>().is_ok()).then_some(name)
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// Whether a `Host` header names this admin server listening on `listen`:
/// an IP address (the listen address; any one when it listens on every
/// address; a loopback one when it listens on loopback), `localhost`, or a
/// name of `allowed` (`admin.allowed_hosts`, lower case). A name can be
/// rebound to this machine by whoever owns it; an address cannot, and a
/// page of the address itself is this server's own. The port is not
/// compared: a tunnel or proxy may forward another one.
pub fn host_allowed(host: Option<&str>, listen: IpAddr, allowed: &[String]) -> bool {
    let Some(name) = host.and_then(host_name) else {
        return false;
    };
    if name == "localhost" || allowed.contains(&name) {
        return true;
    }
    let Ok(ip) = name.parse::<IpAddr>() else {
        return false;
    };
    let (ip, listen) = (ip.to_canonical(), listen.to_canonical());
    listen.is_unspecified() || ip == listen || (ip.is_loopback() && listen.is_loopback())
}

/// Whether a request's `Origin` may use the admin server: the origin is
/// this server as it was reached (the same `Host`), or a name of `allowed`
/// (a proxy in front of it). `null` (a sandboxed or file page) never is.
pub fn origin_allowed(origin: &str, host: Option<&str>, allowed: &[String]) -> bool {
    let Some((_, authority)) = origin.split_once("://") else {
        return false;
    };
    let authority = authority.trim_end_matches('/');
    if host.is_some_and(|h| h.trim().eq_ignore_ascii_case(authority)) {
        return true;
    }
    host_name(authority).is_some_and(|n| allowed.contains(&n))
}

/// Checks one `admin.allowed_hosts` entry: a host name or IP address,
/// without scheme, port or path. Returns it as compared (lower case).
pub fn allowed_host_entry(entry: &str) -> Result<String, NotAHostName> {
    let e = entry.trim();
    let bad = e.is_empty()
        || e.contains("://")
        || e.contains(['/', '@', ' ', '*'])
        || (e.contains(':') && e.parse::<Ipv6Addr>().is_err());
    if bad {
        return Err(NotAHostName(entry.to_string()));
    }
    Ok(e.trim_end_matches('.').to_ascii_lowercase())
}

/// An `admin.allowed_hosts` entry that is not a host name (as written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a host name: give the name a browser uses for this admin server, without scheme, port or path (e.g. `pollhook.internal.example`)")]
pub struct NotAHostName(pub String);

/// Headers of every admin answer: no framing by other pages (clickjacking),
/// no content-type sniffing, no referrer to other sites. (`same-origin`,
/// not `no-referrer`: under `no-referrer` a browser sends `Origin: null`
/// with the page's own form posts, which the origin check refuses.)
pub const HEADERS: [(&str, &str); 3] = [
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),
];

/// The content security policy of the admin server's answers: nothing
/// loads or runs but the given inline stylesheets (by their hashes); forms
/// post only to this server; no page may frame it.
pub fn csp(stylesheets: &[&str]) -> String {
    let hashes: Vec<String> = stylesheets
        .iter()
        .map(|s| {
            let d = sha2::Sha256::digest(s.as_bytes());
            format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(d)
            )
        })
        .collect();
    format!(
        "default-src 'none'; style-src {}; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        hashes.join(" ")
    )
}

/// Dashboard sessions: random ids (only their hashes kept), each with an
/// expiry.
#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<[u8; 32], Instant>>,
}

fn digest(id: &str) -> [u8; 32] {
    sha2::Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// A new session, valid until `now + SESSION_LIFETIME`; its id.
    pub fn open(&self, now: Instant) -> String {
        let id = hex::encode(rand::random::<[u8; 32]>());
        let mut live = self.live.lock();
        if live.len() >= MAX_SESSIONS {
            live.retain(|_, until| *until > now);
        }
        if live.len() >= MAX_SESSIONS {
            if let Some(oldest) = live.iter().min_by_key(|(_, u)| **u).map(|(k, _)| *k) {
                live.remove(&oldest);
            }
        }
        live.insert(digest(&id), now + SESSION_LIFETIME);
        id
    }

    /// Whether `id` is a session that has not expired at `now`.
    pub fn valid(&self, id: &str, now: Instant) -> bool {
        let mut live = self.live.lock();
        let key = digest(id);
        match live.get(&key) {
            Some(until) if *until > now => true,
            Some(_) => {
                live.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Ends every session (the token changed).
    pub fn end_all(&self) {
        self.live.lock().clear();
    }

    pub fn len(&self) -> usize {
        self.live.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The client a failure counts against: its IPv4 address, or its IPv6 /64
/// (one machine's usual share).
pub fn client_of(addr: SocketAddr) -> IpAddr {
    match addr.ip().to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Failed token attempts per client: [`FAILURES_BURST`] at once, then one
/// per [`FAILURE_PERIOD`] (GCRA: each failure pushes the client's
/// theoretical arrival time one period on).
#[derive(Default)]
pub struct Failures {
    tat: Mutex<HashMap<IpAddr, Instant>>,
}

impl Failures {
    /// `Some(wait)` while `client` may not try (a correct token included).
    pub fn blocked(&self, client: IpAddr, now: Instant) -> Option<Duration> {
        let tat = *self.tat.lock().get(&client)?;
        // Blocked while the theoretical arrival time is more than the
        // burst ahead (no `Instant` arithmetic below zero: a machine may
        // have booted minutes ago).
        let ahead = tat.checked_duration_since(now)?;
        ahead
            .checked_sub(FAILURE_PERIOD * (FAILURES_BURST - 1))
            .filter(|wait| !wait.is_zero())
    }

    /// Counts a failure; true when it used the client's last attempt (the
    /// next one will wait), so the log says it once.
    pub fn failed(&self, client: IpAddr, now: Instant) -> bool {
        let mut tat = self.tat.lock();
        if tat.len() >= MAX_CLIENTS {
            tat.retain(|_, t| *t > now);
        }
        let t = tat.entry(client).or_insert(now);
        *t = (*t).max(now) + FAILURE_PERIOD;
        drop(tat);
        self.blocked(client, now).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(hosts: &[&str]) -> Vec<String> {
        hosts.iter().map(|h| h.to_string()).collect()
    }

    #[test]
    fn host_names_lose_their_port_and_brackets() {
        assert_eq!(host_name("127.0.0.1:9464").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_name("[::1]:9464").as_deref(), Some("::1"));
        assert_eq!(host_name("[::1]").as_deref(), Some("::1"));
        assert_eq!(host_name("LocalHost.").as_deref(), Some("localhost"));
        assert_eq!(host_name("a.example:80").as_deref(), Some("a.example"));
        assert_eq!(host_name("a.example:x"), None);
        assert_eq!(host_name("[::1]x"), None);
        assert_eq!(host_name(""), None);
    }

    #[test]
    fn only_addresses_localhost_and_listed_names_are_answered() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let none = allowed(&[]);
        let ok = |h: &str, listen: IpAddr, a: &[String]| host_allowed(Some(h), listen, a);
        assert!(ok("127.0.0.1:9464", lo, &none));
        assert!(ok("localhost:9464", lo, &none));
        assert!(ok("127.0.0.1", lo, &none));
        assert!(ok("[::1]:9464", lo, &none), "loopback either way");
        // DNS rebinding: a name that resolves here now.
        assert!(!ok("evil.example:9464", lo, &none));
        assert!(!ok("localhost.evil.example", lo, &none));
        assert!(!ok("10.0.0.5:9464", lo, &none));
        assert!(!host_allowed(None, lo, &none));
        let listed = allowed(&["pollhook.internal"]);
        assert!(ok("POLLHOOK.internal:443", lo, &listed));
        // Listening on every address: any address, but still no names.
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        assert!(ok("10.0.0.5:9464", any, &none));
        assert!(ok("[fd00::5]:9464", "::".parse().unwrap(), &none));
        assert!(!ok("evil.example", any, &none));
        // A specific address: that one.
        let lan: IpAddr = "10.0.0.5".parse().unwrap();
        assert!(ok("10.0.0.5:9464", lan, &none));
        assert!(!ok("10.0.0.6:9464", lan, &none));
        assert!(ok("[::1]:9464", "::1".parse().unwrap(), &none));
        assert!(ok("127.0.0.1:1", "::1".parse().unwrap(), &none));
    }

    #[test]
    fn origins_are_this_server_or_listed() {
        let none = allowed(&[]);
        let host = Some("127.0.0.1:9464");
        assert!(origin_allowed("http://127.0.0.1:9464", host, &none));
        assert!(!origin_allowed("http://127.0.0.1:9465", host, &none));
        assert!(!origin_allowed("http://evil.example", host, &none));
        assert!(!origin_allowed("null", host, &none));
        assert!(origin_allowed(
            "http://[::1]:9464",
            Some("[::1]:9464"),
            &none
        ));
        let listed = allowed(&["pollhook.example"]);
        assert!(origin_allowed("https://pollhook.example", host, &listed));
        assert!(!origin_allowed("https://evil.example", host, &listed));
    }

    #[test]
    fn allowed_host_entries_are_names() {
        assert_eq!(allowed_host_entry("Ops.Example.").unwrap(), "ops.example");
        assert_eq!(allowed_host_entry("::1").unwrap(), "::1");
        assert_eq!(
            allowed_host_entry("https://ops.example").unwrap_err().to_string(),
            "`https://ops.example` is not a host name: give the name a browser uses for this admin server, without scheme, port or path (e.g. `pollhook.internal.example`)"
        );
        for bad in ["", "http://a", "a:80", "a/b", "*.example", "a b"] {
            assert!(allowed_host_entry(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_csp_names_each_stylesheet_by_hash() {
        let c = csp(&["body{}"]);
        assert!(c.contains("frame-ancestors 'none'"), "{c}");
        assert!(c.contains("default-src 'none'"), "{c}");
        // printf 'body{}' | openssl dgst -sha256 -binary | base64
        assert!(
            c.contains("'sha256-fJgEClQWV1hGkK4qHMO0KotTsVnMYMXTq7/suurGyUo='"),
            "{c}"
        );
    }

    #[test]
    fn sessions_are_random_expire_and_end() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let a = s.open(t0);
        let b = s.open(t0);
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(s.valid(&a, t0 + Duration::from_secs(60)));
        assert!(!s.valid("0000", t0));
        assert!(!s.valid(&a, t0 + SESSION_LIFETIME));
        assert!(s.valid(&b, t0));
        s.end_all();
        assert!(!s.valid(&b, t0));
        assert!(s.is_empty());
    }

    #[test]
    fn failures_are_limited_per_client() {
        let f = Failures::default();
        let t0 = Instant::now();
        let c: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        for n in 1..FAILURES_BURST {
            assert!(!f.failed(c, t0), "failure {n}");
            assert_eq!(f.blocked(c, t0), None);
        }
        assert!(f.failed(c, t0), "the last free attempt");
        assert_eq!(f.blocked(c, t0), Some(FAILURE_PERIOD));
        assert_eq!(f.blocked(other, t0), None);
        // One more attempt a period later.
        let t1 = t0 + FAILURE_PERIOD;
        assert_eq!(f.blocked(c, t1), None);
        assert!(f.failed(c, t1));
        assert_eq!(f.blocked(c, t1), Some(FAILURE_PERIOD));
        // IPv6 clients count by /64.
        let a = client_of("[2001:db8::1]:1".parse().unwrap());
        let b = client_of("[2001:db8::ffff]:2".parse().unwrap());
        assert_eq!(a, b);
    }
}
