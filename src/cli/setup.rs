//! The process: logging, the allocator's arenas, the tokio runtime and the
//! signals.

use tokio_util::sync::CancellationToken;

use crate::cli::args::LogFormat;

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("POLLHOOK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        // Outside data must not forge lines (see `pollhook::logfmt`).
        LogFormat::Text => builder.fmt_fields(pollhook::logfmt::EscapedFields).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Asks the kernel to map the daemon's code as it runs, page by page.
///
/// On a fault in a file mapping the kernel maps the pages around the one
/// asked for too (fault-around, 64 KiB), when they are in the page cache,
/// which the binary's are. Code that runs is spread thinly over a 16 MB
/// binary, so the resident code grew with what lay beside it: at rest,
/// 11 of the daemon's 16 MiB were its own code pages. `MADV_RANDOM` on the
/// executable's code mappings turns that off for them (and readahead,
/// which a binary in the page cache does not need): what is resident is
/// what ran. The price is a minor fault per first-run page instead of one
/// per 16 (a few thousand at start, each a microsecond). Pages already
/// mapped (the start so far) stay. Best effort: without `/proc`, nothing
/// changes.
pub fn map_code_as_it_runs() {
    #[cfg(target_os = "linux")]
    for (start, len) in own_code_mappings() {
        // SAFETY: advice on a range of this process's own mappings, as
        // listed by the kernel; MADV_RANDOM changes how faults are
        // served, not what the pages hold.
        unsafe {
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_RANDOM);
        }
    }
}

/// The executable's own code mappings (start, length), from
/// `/proc/self/maps`.
#[cfg(target_os = "linux")]
fn own_code_mappings() -> Vec<(usize, usize)> {
    let (Ok(maps), Ok(exe)) = (
        std::fs::read_to_string("/proc/self/maps"),
        std::fs::read_link("/proc/self/exe"),
    ) else {
        return Vec::new();
    };
    maps.lines()
        .filter_map(|line| {
            // `start-end perms offset dev inode   path`: the path is the
            // first `/` on (no field before it holds one).
            let mut fields = line.split_ascii_whitespace();
            let (range, perms) = (fields.next()?, fields.next()?);
            let path = &line[line.find('/')?..];
            if !perms.contains('x') || std::path::Path::new(path) != exe {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let a = usize::from_str_radix(a, 16).ok()?;
            let b = usize::from_str_radix(b, 16).ok()?;
            Some((a, b.checked_sub(a)?))
        })
        .collect()
}

/// glibc gives each thread that allocates its own malloc arena, and keeps
/// what each arena once held. With two async workers, sled's threads and
/// the blocking pool, that was 20 of 132 MiB at 10,000 instances (the
/// scale bench with `MALLOC_ARENA_MAX=2`: 113 MiB). Two arenas serve two
/// cores. Called first thing in `main`, before any thread starts; an
/// operator's `MALLOC_ARENA_MAX` still wins.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tunable of the allocator; no thread
        // but this one exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// `--worker-threads` (`POLLHOOK_WORKER_THREADS`), set once by `main`.
static WORKER_THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Records `--worker-threads`; `None` keeps the default.
pub fn set_worker_threads(n: Option<usize>) {
    if let Some(n) = n {
        let _ = WORKER_THREADS.set(n);
    }
}

/// The runtime's worker threads: the flag, else [`default_worker_threads`].
fn worker_threads() -> usize {
    WORKER_THREADS.get().copied().unwrap_or_else(|| {
        default_worker_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// One per core, tokio's own default. Measured with the idle bench (50
/// balances every second, README "Benchmarks"): one worker instead of two
/// changed neither CPU (1.13% both) nor peak RSS beyond noise, so the
/// setting exists for operators who pin the daemon to fewer cores, and the
/// default stays what scales (the scale bench keeps both busy).
pub fn default_worker_threads(cores: usize) -> usize {
    cores.max(1)
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(worker_threads())
        // Store writes and template rendering use the blocking pool. Its
        // default of 512 threads, each with its own malloc arena, costs
        // memory for no gain on a disk that takes one write at a time.
        .max_blocking_threads(32)
        .build()?)
}

/// SIGTERM/SIGINT drain and stop (a second one exits at once); SIGHUP
/// reloads the configuration.
pub async fn watch_signals(
    shutdown: CancellationToken,
    reload: std::sync::Arc<tokio::sync::Notify>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let mut hup = signal(SignalKind::hangup()).expect("install SIGHUP handler");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                reload.notify_one();
            }
        }
    }
    tracing::info!("signal received: shutting down (send again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting without draining");
    std::process::exit(130);
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The executable's code is found and, once advised, served page by
    /// page: the kernel shows the advice as `rr` among the mapping's
    /// flags (`/proc/self/smaps`).
    #[test]
    fn the_executables_code_is_mapped_as_it_runs() {
        let code = super::own_code_mappings();
        assert!(!code.is_empty(), "no code mapping of /proc/self/exe found");
        super::map_code_as_it_runs();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        for (start, _) in code {
            let head = format!("{start:x}-");
            let lines: Vec<&str> = smaps.lines().collect();
            let at = lines
                .iter()
                .position(|l| l.starts_with(&head))
                .unwrap_or_else(|| panic!("{head} not in smaps"));
            // Each mapping's block ends with its flags.
            let flags = lines[at..]
                .iter()
                .find(|l| l.starts_with("VmFlags:"))
                .unwrap_or_else(|| panic!("no flags for {head}"));
            assert!(flags.split_whitespace().any(|f| f == "rr"), "{flags}");
        }
    }
}
