//! What a running daemon gives back to the system at rest: the
//! allocator's free pages, and the pages of its own code that it no
//! longer runs.
//!
//! Both matter to the daemon that runs next to the agents, where its
//! resident size is what people see (and what the kernel's OOM score
//! weighs): the idle bench's daemon is about 15 MiB, of which the
//! binary's code pages are two thirds.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often a running daemon gives memory back.
pub(crate) const GIVE_BACK_EVERY: Duration = Duration::from_secs(60);

/// Gives memory back ([`give_back_free_memory`], [`give_back_code`]) at
/// once (the daemon starts this once it has started), then every `every`
/// until shutdown (off the async workers: a trim walks the whole heap, a
/// few milliseconds at 100,000 instances).
///
/// Why: glibc's malloc keeps the pages of freed memory inside its heap
/// (only the top of the heap goes back by itself), and a poll allocates
/// and frees all over it, so the resident size crept above what was live:
/// `malloc_trim` called into a node at rest gave back a tenth of its RSS
/// (README, "Benchmarks"). Once a minute costs a trim a minute; the pages
/// it gives back are ones nothing used for a minute.
pub(crate) async fn give_back_memory_every(every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The first tick is at once: what only the start ran goes now.
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let _ = tokio::task::spawn_blocking(|| {
            give_back_free_memory();
            give_back_code();
        })
        .await;
    }
}

/// Returns the allocator's free pages to the system (`malloc_trim`, glibc
/// only; elsewhere nothing).
pub(crate) fn give_back_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's
    // own arenas; it takes no pointer and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Unmaps the pages of the daemon's own code (the executable's
/// `r-xp` mappings) so that only the code it runs from now on comes back:
/// reading the configuration (YAML, schema, templates, error reports),
/// opening the store and starting the servers is code that a daemon at
/// rest never runs again, and a third of the code's resident pages.
/// Linux only (elsewhere nothing). Returns the bytes unmapped.
///
/// What it is: `madvise(MADV_DONTNEED)` on a private, read-only, never
/// written file mapping drops the page-table entries only. The pages stay
/// in the page cache, and the next instruction fetched from one maps it
/// again (a minor fault, with the kernel's fault-around: a few hundred
/// microseconds for the whole working set). Nothing is lost: code pages
/// are never written (no text relocations; a fixed-address binary, see
/// `build.rs`), so the file's bytes are the pages' bytes. A debugger's
/// breakpoints (written into private copies) would be dropped: attach
/// one with that in mind.
///
/// What it buys and what not: the resident size (RSS, and the OOM
/// score) counts mapped pages, so it falls by the code not run since;
/// the page cache is the kernel's and is reclaimed under pressure either
/// way, and a cgroup's memory count (systemd's `MemoryCurrent`) keeps
/// the cached file pages it was charged for.
pub(crate) fn give_back_code() -> usize {
    #[cfg(target_os = "linux")]
    {
        match own_code() {
            Ok(ranges) => ranges
                .into_iter()
                .filter(|&(start, len)| {
                    // SAFETY: (start, len) is a whole mapping of this
                    // process's executable, read and execute only, as
                    // /proc/self/maps listed it just now (code is never
                    // unmapped while the process runs). MADV_DONTNEED on
                    // a private file mapping whose pages were never
                    // written only drops their page-table entries: the
                    // next access maps the same bytes from the page
                    // cache (see the function's documentation).
                    unsafe {
                        libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) == 0
                    }
                })
                .map(|(_, len)| len)
                .sum(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot list the daemon's code mappings");
                0
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    0
}

/// The executable's read-and-execute mappings, as (start, length), from
/// `/proc/self/maps`: those whose device and inode are the executable's
/// (`/proc/self/exe`, which still answers when the file was replaced by
/// an upgrade; the path column then says "(deleted)").
#[cfg(target_os = "linux")]
fn own_code() -> std::io::Result<Vec<(usize, usize)>> {
    use std::os::unix::fs::MetadataExt;
    let exe = std::fs::metadata("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let dev = (libc::major(exe.dev()) as u64, libc::minor(exe.dev()) as u64);
    Ok(code_mappings(&maps, dev, exe.ino()))
}

/// The `r-xp` mappings of the file (`dev` as major and minor, `ino`) in a
/// `/proc/PID/maps` listing, as (start, length). Pure.
pub(crate) fn code_mappings(maps: &str, dev: (u64, u64), ino: u64) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_ascii_whitespace();
            let (range, perms, _offset, d, i) =
                (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            let (major, minor) = d.split_once(':')?;
            let this_dev = (
                u64::from_str_radix(major, 16).ok()?,
                u64::from_str_radix(minor, 16).ok()?,
            );
            if perms != "r-xp" || this_dev != dev || i.parse::<u64>().ok()? != ino {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let (a, b) = (
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            );
            (b > a).then_some((a, b - a))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the executable's own read-and-execute mappings: not its data,
    /// not a library's code, not another file with the same inode on
    /// another device, not anonymous memory, not an empty range.
    #[test]
    fn only_the_executables_code_is_listed() {
        let maps = "\
00200000-0062b000 r--p 00000000 fd:01 4242 /usr/bin/pollhook
0062b000-00fa6000 r-xp 0042a000 fd:01 4242 /usr/bin/pollhook
00fa6000-01109000 r--p 00da4000 fd:01 4242 /usr/bin/pollhook
01109000-0110c000 rw-p 00f06000 fd:01 4242 /usr/bin/pollhook
7f0000000000-7f0000100000 r-xp 00028000 fd:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000200000-7f0000300000 r-xp 00000000 fd:02 4242 /mnt/other
7f0000400000-7f0000500000 rw-p 00000000 00:00 0
7f0000500000-7f0000500000 r-xp 00000000 fd:01 4242 /usr/bin/pollhook
7f0000600000-7f0000700000 r-xp 00000000 fd:01 4242 /usr/bin/pollhook (deleted)
garbage line
";
        assert_eq!(
            code_mappings(maps, (0xfd, 0x01), 4242),
            vec![(0x62b000, 0xfa6000 - 0x62b000), (0x7f0000600000, 0x100000)]
        );
        assert_eq!(code_mappings(maps, (0xfd, 0x01), 1), vec![]);
    }

    /// Resident kilobytes of the mappings starting at `starts`, from
    /// /proc/self/smaps.
    #[cfg(target_os = "linux")]
    fn resident_kib(starts: &[usize]) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut counting = false;
        let mut kib = 0;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ').filter(|(r, _)| r.contains('-')) {
                let start = usize::from_str_radix(range.split('-').next().unwrap(), 16);
                counting = start.is_ok_and(|s| starts.contains(&s));
            } else if let Some(v) = line.strip_prefix("Rss:").filter(|_| counting) {
                kib += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap();
            }
        }
        kib
    }

    /// The running test binary's code is found and given back (fewer of
    /// its pages are resident just after), and the process goes on
    /// running it (this very test returns).
    #[cfg(target_os = "linux")]
    #[test]
    fn the_code_given_back_comes_back_when_run() {
        let code = own_code().unwrap();
        assert!(!code.is_empty(), "the test binary has code mappings");
        let starts: Vec<usize> = code.iter().map(|c| c.0).collect();
        let before = resident_kib(&starts);
        assert_eq!(give_back_code(), code.iter().map(|c| c.1).sum::<usize>());
        let after = resident_kib(&starts);
        assert!(
            after < before,
            "resident code {before} KiB before, {after} KiB after"
        );
        assert_eq!(own_code().unwrap(), code, "the mappings stay");
    }
}
