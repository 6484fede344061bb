//! The embedded store's delivery history: a bounded log of
//! [`AttemptRecord`]s in two files beside sled's, not in a sled tree.
//!
//! Why not a tree: sled 0.34 keeps the pages of every tree it has touched
//! in memory, whatever its `cache_capacity`. The history is written once
//! per delivery and read only when someone asks (`pollhook events`, the
//! dashboard), yet as a tree its 10,000 records held 6–10 MiB of the idle
//! daemon's memory, and grew it by 100–250 KiB a minute until full
//! (README, "Benchmarks"). As a file it costs a handle and three counters
//! at rest; the kernel's page cache holds what is read, and gives it back.
//!
//! Layout, under `<state_dir>/history/`:
//! - `attempts.log`: the newest records, one line each: the record's id
//!   (dense, increasing), a space, its JSON. Appended to, never rewritten
//!   except by a time prune;
//! - `attempts.old.log`: the segment before it. When `attempts.log` holds
//!   [`ATTEMPTS_KEPT`] records it becomes `attempts.old.log` (a rename,
//!   dropping the older one) and a new one starts.
//!
//! Only the newest [`ATTEMPTS_KEPT`] ids are shown: the files hold between
//! that and twice as many, and what is older than the window is skipped
//! when read. Appends are not synced one by one (the history is a record
//! of what happened, and losing its last half second in a power cut loses
//! no event); [`AttemptLog::sync`] makes them durable at shutdown. A line
//! torn by a crash is cut off when the log is opened; a line that does not
//! parse is skipped where it is read.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::store::records::{AttemptQuery, AttemptRecord, ATTEMPTS_KEPT};

const CURRENT: &str = "attempts.log";
const OLD: &str = "attempts.old.log";

/// The history log. Cheap to share behind an `Arc`; every method blocks
/// (file I/O), so callers run them on tokio's blocking pool.
pub(super) struct AttemptLog {
    dir: PathBuf,
    /// The appender's side: one writer at a time. Readers take it only to
    /// open the files and note their lengths, then read without it (see
    /// [`AttemptLog::snapshot`]).
    inner: Mutex<Inner>,
}

struct Inner {
    /// `attempts.log`, opened for appending.
    file: File,
    /// Its length in bytes: what a reader may read of it (every line up
    /// to there is whole).
    len: u64,
    /// Records in `attempts.log` and in `attempts.old.log`.
    in_current: u64,
    in_old: u64,
    /// The id the next record gets.
    next_id: u64,
}

/// The files as they stood at one moment: open handles (a rename or a
/// prune after it does not change what they read) and how much of each
/// holds whole lines.
struct Snapshot {
    old: Option<(File, u64)>,
    current: (File, u64),
    /// Ids up to this one are outside the window of the newest
    /// [`ATTEMPTS_KEPT`].
    hidden_up_to: u64,
}

/// One line: the id, a space, the record's JSON. The id alone, so that
/// lines outside a window are passed over without parsing their JSON.
fn id_of(line: &[u8]) -> Option<(u64, &[u8])> {
    let sp = line.iter().position(|b| *b == b' ')?;
    let id = std::str::from_utf8(&line[..sp]).ok()?.parse().ok()?;
    Some((id, &line[sp + 1..]))
}

fn parse_line(line: &[u8]) -> Option<(u64, AttemptRecord)> {
    let (id, json) = id_of(line)?;
    Some((id, serde_json::from_slice(json).ok()?))
}

fn line_of(id: u64, rec: &AttemptRecord) -> Vec<u8> {
    let mut line = format!("{id} ").into_bytes();
    serde_json::to_writer(&mut line, rec).expect("a record always serializes");
    line.push(b'\n');
    line
}

/// Whole lines of the first `len` bytes of `file`, in order, from its
/// start (a handle is read more than once).
fn lines(file: &File, len: u64) -> io::Result<impl Iterator<Item = io::Result<Vec<u8>>> + '_> {
    (&*file).seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::new(file.take(len));
    Ok(std::iter::from_fn(move || {
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => None,
            Ok(_) if line.last() == Some(&b'\n') => {
                line.pop();
                Some(Ok(line))
            }
            Ok(_) => None, // a torn tail: not a record
            Err(e) => Some(Err(e)),
        }
    }))
}

/// The whole lines of the first `len` bytes of `file`, newest first,
/// reading backwards in blocks: showing the last five attempts reads the
/// file's end, not all of it.
fn lines_backwards(file: &File, len: u64) -> impl Iterator<Item = io::Result<Vec<u8>>> + '_ {
    const BLOCK: u64 = 64 * 1024;
    let mut pos = len;
    // Bytes read but not yet split: the start of `pending` is a partial
    // line until the block before it is read.
    let mut pending: Vec<u8> = Vec::new();
    let mut ready: Vec<Vec<u8>> = Vec::new();
    let mut file = file;
    let mut at_end = true;
    std::iter::from_fn(move || loop {
        if let Some(line) = ready.pop() {
            return Some(Ok(line));
        }
        if pos == 0 {
            if pending.is_empty() {
                return None;
            }
            return Some(Ok(std::mem::take(&mut pending)));
        }
        let start = pos.saturating_sub(BLOCK);
        let mut block = vec![0; (pos - start) as usize];
        if let Err(e) = file
            .seek(SeekFrom::Start(start))
            .and_then(|_| file.read_exact(&mut block))
        {
            pos = 0;
            pending.clear();
            return Some(Err(e));
        }
        pos = start;
        block.extend_from_slice(&pending);
        // The last byte of the snapshot is a newline: drop it, so that
        // splitting yields lines, not a trailing empty one.
        if std::mem::take(&mut at_end) && block.last() == Some(&b'\n') {
            block.pop();
        }
        let mut parts: Vec<&[u8]> = block.split(|b| *b == b'\n').collect();
        // The first part may continue in the block before.
        pending = parts.remove(0).to_vec();
        // `ready` pops from its end: oldest first in it, newest popped first.
        ready = parts.into_iter().map(<[u8]>::to_vec).collect();
        if pos == 0 && !pending.is_empty() {
            ready.insert(0, std::mem::take(&mut pending));
        }
    })
}

/// Counts the lines of a file, and the id of its last one.
fn scan(path: &Path) -> io::Result<(u64, Option<u64>)> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, None)),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let (mut n, mut last) = (0, None);
    for line in lines(&file, len)? {
        let line = line?;
        n += 1;
        if let Some((id, _)) = id_of(&line) {
            last = Some(id);
        }
    }
    Ok((n, last))
}

/// Cuts a line torn by a crash off the end of `path`. Returns the length
/// of what stays.
fn cut_torn_tail(path: &Path) -> io::Result<u64> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let len = file.metadata()?.len();
    let mut keep = len;
    let mut byte = [0u8; 1];
    while keep > 0 {
        file.seek(SeekFrom::Start(keep - 1))?;
        file.read_exact(&mut byte)?;
        if byte[0] == b'\n' {
            break;
        }
        keep -= 1;
    }
    if keep < len {
        file.set_len(keep)?;
    }
    Ok(keep)
}

/// Makes `recs` (oldest first) the whole log in `dir`, ids from 1: written
/// aside, synced, then renamed into place, so that a crash leaves either
/// the log before or this one (the migration from the sled tree).
pub(super) fn replace(dir: &Path, recs: &[AttemptRecord]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{CURRENT}.tmp"));
    let mut out = BufWriter::new(File::create(&tmp)?);
    for (n, rec) in recs.iter().enumerate() {
        out.write_all(&line_of(n as u64 + 1, rec))?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_data()?;
    match fs::remove_file(dir.join(OLD)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    fs::rename(&tmp, dir.join(CURRENT))
}

impl AttemptLog {
    /// Opens (or creates) the log in `dir`.
    pub(super) fn open(dir: &Path) -> io::Result<AttemptLog> {
        fs::create_dir_all(dir)?;
        let len = cut_torn_tail(&dir.join(CURRENT))?;
        let (in_current, last_current) = scan(&dir.join(CURRENT))?;
        let (in_old, last_old) = scan(&dir.join(OLD))?;
        let last = last_current.or(last_old).unwrap_or(0);
        let file = OpenOptions::new().append(true).open(dir.join(CURRENT))?;
        Ok(AttemptLog {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                file,
                len,
                in_current,
                in_old,
                next_id: last + 1,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic mid-append leaves at worst a torn line, which readers
        // skip: the log stays usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends records, in order, each with the next id.
    pub(super) fn append(&self, recs: &[AttemptRecord]) -> io::Result<()> {
        let mut inner = self.lock();
        for rec in recs {
            if inner.in_current >= ATTEMPTS_KEPT {
                self.rotate(&mut inner)?;
            }
            let line = line_of(inner.next_id, rec);
            if let Err(e) = inner.file.write_all(&line) {
                // A part written (a full disk) would join the next line
                // into one that does not parse: take it back.
                let _ = inner.file.set_len(inner.len);
                return Err(e);
            }
            inner.len += line.len() as u64;
            inner.in_current += 1;
            inner.next_id += 1;
        }
        Ok(())
    }

    /// `attempts.log` becomes `attempts.old.log`; a new one starts.
    fn rotate(&self, inner: &mut Inner) -> io::Result<()> {
        fs::rename(self.dir.join(CURRENT), self.dir.join(OLD))?;
        inner.file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.dir.join(CURRENT))?;
        inner.in_old = inner.in_current;
        inner.in_current = 0;
        inner.len = 0;
        Ok(())
    }

    fn snapshot(&self) -> io::Result<Snapshot> {
        let inner = self.lock();
        let old = match File::open(self.dir.join(OLD)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Some((f, len))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Snapshot {
            old,
            current: (File::open(self.dir.join(CURRENT))?, inner.len),
            hidden_up_to: inner.next_id.saturating_sub(1 + ATTEMPTS_KEPT),
        })
    }

    /// The newest records that match, newest first, at most `q.limit()`.
    pub(super) fn newest(&self, q: &AttemptQuery) -> io::Result<Vec<AttemptRecord>> {
        let snap = self.snapshot()?;
        let mut out = Vec::new();
        let segments = [Some(&snap.current), snap.old.as_ref()];
        for (file, len) in segments.into_iter().flatten() {
            for line in lines_backwards(file, *len) {
                let Some((id, rec)) = parse_line(&line?) else {
                    continue;
                };
                if id <= snap.hidden_up_to {
                    return Ok(out);
                }
                if q.matches(&rec) {
                    out.push(rec);
                    if out.len() >= q.limit() {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Up to `limit` records with ids after `after`, oldest first, and the
    /// id to continue after (`None`: the last page). For backups.
    pub(super) fn page(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> io::Result<(Vec<AttemptRecord>, Option<u64>)> {
        let snap = self.snapshot()?;
        let from = after.unwrap_or(0).max(snap.hidden_up_to);
        let mut out = Vec::new();
        let mut last = None;
        let segments = [snap.old.as_ref(), Some(&snap.current)];
        for (file, len) in segments.into_iter().flatten() {
            for line in lines(file, *len)? {
                let line = line?;
                let Some((id, json)) = id_of(&line).filter(|(id, _)| *id > from) else {
                    continue;
                };
                let Ok(rec) = serde_json::from_slice(json) else {
                    continue;
                };
                if out.len() >= limit {
                    return Ok((out, last));
                }
                out.push(rec);
                last = Some(id);
            }
        }
        Ok((out, None))
    }

    /// How many records are shown.
    pub(super) fn len(&self) -> usize {
        let inner = self.lock();
        (inner.in_current + inner.in_old).min(ATTEMPTS_KEPT) as usize
    }

    /// Forgets the records of attempts made before `before_ms`: each file
    /// that holds one is rewritten without them (a new file renamed over
    /// it). Returns how many were forgotten.
    pub(super) fn prune_before(&self, before_ms: i64) -> io::Result<usize> {
        let mut inner = self.lock();
        let mut gone = 0;
        for name in [OLD, CURRENT] {
            let path = self.dir.join(name);
            let Ok(file) = File::open(&path) else {
                continue;
            };
            let len = if name == CURRENT {
                inner.len
            } else {
                file.metadata()?.len()
            };
            let mut old_here = 0;
            for line in lines(&file, len)? {
                if parse_line(&line?).is_some_and(|(_, r)| r.at_ms < before_ms) {
                    old_here += 1;
                }
            }
            if old_here == 0 {
                continue;
            }
            let tmp = self.dir.join(format!("{name}.tmp"));
            let mut out = BufWriter::new(File::create(&tmp)?);
            let (mut kept, mut kept_len) = (0, 0);
            for line in lines(&file, len)? {
                let line = line?;
                if parse_line(&line).is_some_and(|(_, r)| r.at_ms >= before_ms) {
                    out.write_all(&line)?;
                    out.write_all(b"\n")?;
                    kept += 1;
                    kept_len += line.len() as u64 + 1;
                }
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_data()?;
            fs::rename(&tmp, &path)?;
            gone += old_here;
            if name == CURRENT {
                inner.file = OpenOptions::new().append(true).open(&path)?;
                inner.len = kept_len;
                inner.in_current = kept;
            } else {
                inner.in_old = kept;
            }
        }
        Ok(gone)
    }

    /// Makes every append so far durable.
    pub(super) fn sync(&self) -> io::Result<()> {
        self.lock().file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u64) -> AttemptRecord {
        crate::store::conformance::attempt(n, n as i64)
    }

    fn all(log: &AttemptLog) -> Vec<String> {
        let q = AttemptQuery {
            limit: Some(usize::MAX),
            ..Default::default()
        };
        log.newest(&q)
            .unwrap()
            .into_iter()
            .map(|r| r.event_id)
            .collect()
    }

    /// Reading backwards in 64 KiB blocks finds every line once, in
    /// reverse, whatever line straddles a block's edge; a torn tail past
    /// the snapshot's length is not read.
    #[test]
    fn lines_read_backwards_across_blocks_are_every_line_reversed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut text = Vec::new();
        let mut want = Vec::new();
        for n in 0..5_000u32 {
            // Lengths vary so that lines straddle the block edges.
            let line = format!("{n} {}", "x".repeat((n % 97) as usize));
            text.extend_from_slice(line.as_bytes());
            text.push(b'\n');
            want.push(line.into_bytes());
        }
        let len = text.len() as u64;
        text.extend_from_slice(b"torn");
        fs::write(&path, &text).unwrap();
        let file = File::open(&path).unwrap();
        let got: Vec<Vec<u8>> = lines_backwards(&file, len).map(|l| l.unwrap()).collect();
        want.reverse();
        assert_eq!(got.len(), want.len());
        assert!(got == want);
        let forward: Vec<Vec<u8>> = lines(&file, len + 4).unwrap().map(|l| l.unwrap()).collect();
        want.reverse();
        assert!(forward == want, "a torn tail is not a line");
        assert_eq!(lines_backwards(&file, 0).count(), 0);
    }

    /// Past twice the bound the oldest segment is dropped, and only the
    /// newest [`ATTEMPTS_KEPT`] are shown, before and after a reopen; ids
    /// go on from the last one.
    #[test]
    fn the_newest_are_kept_across_segments_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let total = 2 * ATTEMPTS_KEPT + 10;
        {
            let log = AttemptLog::open(dir.path()).unwrap();
            let recs: Vec<_> = (0..total).map(rec).collect();
            log.append(&recs).unwrap();
            assert_eq!(log.len(), ATTEMPTS_KEPT as usize);
        }
        let log = AttemptLog::open(dir.path()).unwrap();
        let shown = all(&log);
        assert_eq!(shown.len(), ATTEMPTS_KEPT as usize);
        assert_eq!(shown[0], format!("msg_{}", total - 1));
        assert_eq!(
            shown.last().unwrap(),
            &format!("msg_{}", total - ATTEMPTS_KEPT)
        );
        log.append(&[rec(total)]).unwrap();
        let (page, next) = log.page(None, 3).unwrap();
        let ids: Vec<_> = page.iter().map(|r| r.at_ms as u64).collect();
        let first = total + 1 - ATTEMPTS_KEPT;
        assert_eq!(ids, [first, first + 1, first + 2]);
        let (rest, end) = log.page(next, usize::MAX).unwrap();
        assert_eq!(rest.len(), ATTEMPTS_KEPT as usize - 3);
        assert_eq!(rest.last().unwrap().at_ms as u64, total);
        assert_eq!(end, None);
    }

    /// A line torn by a crash is cut off at open, and the next record
    /// starts a line of its own.
    #[test]
    fn a_torn_line_is_cut_off_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = AttemptLog::open(dir.path()).unwrap();
            log.append(&[rec(1), rec(2)]).unwrap();
        }
        let path = dir.path().join(CURRENT);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"3 {\"event_id\":\"msg_").unwrap();
        drop(f);
        let log = AttemptLog::open(dir.path()).unwrap();
        log.append(&[rec(4)]).unwrap();
        assert_eq!(all(&log), ["msg_4", "msg_2", "msg_1"]);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("1 ") && text.contains("\n3 {") && text.ends_with("}\n"));
    }

    /// Pruning by time rewrites both segments without what is older, and
    /// appending goes on in the rewritten file.
    #[test]
    fn pruning_by_time_forgets_the_older_records_of_both_segments() {
        let dir = tempfile::tempdir().unwrap();
        let log = AttemptLog::open(dir.path()).unwrap();
        let recs: Vec<_> = (0..ATTEMPTS_KEPT + 5).map(rec).collect();
        log.append(&recs).unwrap();
        assert_eq!(log.prune_before(3).unwrap(), 3);
        assert_eq!(log.prune_before(3).unwrap(), 0);
        assert_eq!(
            log.prune_before(ATTEMPTS_KEPT as i64 + 2).unwrap(),
            ATTEMPTS_KEPT as usize - 1
        );
        log.append(&[rec(ATTEMPTS_KEPT + 5)]).unwrap();
        let n = ATTEMPTS_KEPT;
        assert_eq!(
            all(&log),
            [n + 5, n + 4, n + 3, n + 2].map(|i| format!("msg_{i}"))
        );
        assert_eq!(log.len(), 4);
        let q = AttemptQuery {
            endpoint: Some("b".into()),
            limit: Some(1),
            ..Default::default()
        };
        assert_eq!(
            log.newest(&q).unwrap()[0].event_id,
            format!("msg_{}", n + 5)
        );
    }
}
