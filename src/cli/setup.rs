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
