//! systemd's notify protocol (`Type=notify`), without a dependency: one
//! datagram per message to `$NOTIFY_SOCKET`. `READY=1` once the store is
//! open and the workers run, `STOPPING=1` when shutdown begins, and
//! `WATCHDOG=1` every half `WatchdogSec` from a task of the runtime, so a
//! wedged runtime stops the pings and systemd restarts the service.
//! Without `$NOTIFY_SOCKET` (not under systemd) everything is a no-op.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A handle on `$NOTIFY_SOCKET`.
pub struct Notifier {
    target: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    /// From the environment systemd sets.
    pub fn from_env() -> Notifier {
        Notifier {
            target: std::env::var("NOTIFY_SOCKET")
                .ok()
                .and_then(|p| Some((UnixDatagram::unbound().ok()?, address(&p)?))),
        }
    }

    /// Sends one message (`READY=1`, `STATUS=…`); errors are ignored: a
    /// missing supervisor must never stop the daemon.
    pub fn send(&self, msg: &str) {
        if let Some((sock, addr)) = &self.target {
            let _ = sock.send_to_addr(msg.as_bytes(), addr);
        }
    }

    /// How often to ping the watchdog: half of `$WATCHDOG_USEC`, when it is
    /// meant for this process (`$WATCHDOG_PID` unset or ours).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.target.as_ref()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
                return None;
            }
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}

/// A path, or `@name` for Linux's abstract namespace.
fn address(path: &str) -> Option<std::os::unix::net::SocketAddr> {
    if let Some(name) = path.strip_prefix('@') {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            return std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok();
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            return None;
        }
    }
    std::os::unix::net::SocketAddr::from_pathname(path).ok()
}
