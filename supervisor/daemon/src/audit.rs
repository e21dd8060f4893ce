//! The audit log: every event, as one JSON line, appended before it is
//! published, in `/var/log/warden/audit.jsonl` (path configurable).
//!
//! Owns: sequence numbers on disk (they never repeat or go back, across
//! restarts and rotations), durability (a batch of lines is written and
//! fdatasync'ed once before [`AuditLog::append`] returns), rotation by
//! size keeping a configured number of files (`audit.jsonl.1` is the
//! newest rotated one) and deleting those older than a configured age,
//! repair after a crash (a torn last line is cut off and reported), and
//! reading the log back in bounded chunks ([`Cursor`]).
//!
//! Must never: publish an event that is not on disk, hand out a sequence
//! number twice, or read more than a chunk's worth per call.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("Cannot open the audit log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot write the audit log {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What opening the log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes of a torn last line that were cut off.
    pub torn_bytes: u64,
    /// The last sequence number on disk (0: none yet).
    pub last_seq: u64,
}

/// How far from its end a log file is checked for a torn write at start.
const TAIL_WINDOW: u64 = 4 << 20;

/// The most a batch adds to the log at once (the writer keeps to it), so a
/// torn write is always within [`TAIL_WINDOW`].
pub const MAX_BATCH_BYTES: usize = 1 << 20;

#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
    /// The group the log's files belong to (they are 0640).
    group: Option<u32>,
}

/// Opens (creating, 0640) a file of the log for appending.
fn open_log_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

/// The `seq` of a JSON line, if it is a complete event. Events are
/// written with `seq` first, so this rarely parses the whole line.
pub fn seq_of(line: &str) -> Option<u64> {
    if let Some(rest) = line.strip_prefix("{\"seq\":") {
        let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if end > 0 && line.ends_with('}') {
            return rest[..end].parse().ok();
        }
    }
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("seq")?
        .as_u64()
}

/// A reader's place in the log: the next sequence number it wants and,
/// once it has read, the file (by inode: rotation renames files, it does
/// not copy them) and byte offset to go on from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub next_seq: u64,
    at: Option<(u64, u64)>,
}

/// What one [`AuditLog::read_chunk`] call returns.
#[derive(Debug, Default)]
pub struct Chunk {
    /// Complete lines with `seq >= next_seq`, oldest first.
    pub lines: Vec<String>,
    /// Whether the reader reached the end of the log as it is now.
    pub at_end: bool,
}

impl Cursor {
    pub fn new(from_seq: u64) -> Self {
        Cursor {
            next_seq: from_seq,
            at: None,
        }
    }
}

impl AuditLog {
    /// A cursor at the end of the log as written so far: the next event
    /// written will be read from it (`next_seq` is the one after `last`).
    pub fn end(&self, last: u64) -> Cursor {
        Cursor {
            next_seq: last + 1,
            at: self.file.metadata().ok().map(|m| (m.ino(), self.size)),
        }
    }
}

impl AuditLog {
    /// Opens (creating) the log, cuts a torn last line, and finds the last
    /// sequence number in it or, when it is empty, in the rotated files.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> Result<(Self, Recovery), AuditError> {
        let err = |source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = open_log_file(path).map_err(err)?;
        let mut recovery = Recovery::default();
        // Only the end can be torn (the log is append-only, and a batch is
        // at most MAX_BATCH_BYTES): check the lines of the last window.
        let len = file.metadata().map_err(err)?.len();
        let start = len.saturating_sub(TAIL_WINDOW);
        let mut tail = Vec::new();
        let mut reader = File::open(path).map_err(err)?;
        reader.seek(SeekFrom::Start(start)).map_err(err)?;
        std::io::Read::read_to_end(&mut reader, &mut tail).map_err(err)?;
        // The window starts at a line: the first (partial) one is skipped.
        let skip = if start == 0 {
            0
        } else {
            tail.iter().position(|b| *b == b'\n').map_or(tail.len(), |i| i + 1)
        };
        let mut good = skip;
        for line in tail[skip..].split_inclusive(|b| *b == b'\n') {
            if !line.ends_with(b"\n") {
                break;
            }
            match std::str::from_utf8(&line[..line.len() - 1]).ok().and_then(seq_of) {
                Some(seq) => {
                    recovery.last_seq = seq;
                    good += line.len();
                }
                None => break,
            }
        }
        let good = start + good as u64;
        if good < len {
            recovery.torn_bytes = len - good;
            file.set_len(good).map_err(err)?;
            file.sync_data().map_err(err)?;
        }
        if recovery.last_seq == 0 {
            recovery.last_seq = (1..=keep).find_map(|i| last_seq_in(&rotated(path, i))).unwrap_or(0);
        }
        let log = AuditLog {
            path: path.to_path_buf(),
            file,
            size: good,
            max_bytes,
            keep,
            group: None,
        };
        log.own_file().map_err(err)?;
        Ok((log, recovery))
    }

    /// Appends lines (each without its newline) durably, with one
    /// fdatasync for the batch (and one before each rotation); rotates
    /// first when a line would grow the file beyond its size.
    pub fn append(&mut self, lines: &[String]) -> Result<(), AuditError> {
        let path = self.path.clone();
        let err = |source| AuditError::Write {
            path: path.clone(),
            source,
        };
        let mut buf = Vec::new();
        for line in lines {
            let len = line.len() as u64 + 1;
            if self.size + buf.len() as u64 > 0 && self.size + buf.len() as u64 + len > self.max_bytes {
                self.file.write_all(&buf).map_err(err)?;
                self.file.sync_data().map_err(err)?;
                self.size += buf.len() as u64;
                buf.clear();
                self.rotate().map_err(err)?;
            }
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
        }
        self.file.write_all(&buf).map_err(err)?;
        self.file.sync_data().map_err(err)?;
        self.size += buf.len() as u64;
        Ok(())
    }

    /// Deletes rotated files last written more than `max_age` ago.
    pub fn prune(&self, max_age: Duration) {
        let Some(cutoff) = SystemTime::now().checked_sub(max_age) else {
            return;
        };
        for i in 1..=self.keep {
            let file = rotated(&self.path, i);
            let old = std::fs::metadata(&file)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < cutoff);
            if old {
                match std::fs::remove_file(&file) {
                    Ok(()) => {
                        tracing::info!(file = %file.display(), "deleted an audit log file past its retention age")
                    }
                    Err(e) => {
                        tracing::error!(file = %file.display(), error = %e, "cannot delete an old audit log file")
                    }
                }
            }
        }
    }

    /// The bytes the log may hold in all: the current file and the kept
    /// rotated ones.
    /// Gives the log's files to `group` (readable by it: 0640), the
    /// current one now and each new one after a rotation.
    pub fn set_group(&mut self, group: Option<u32>) -> std::io::Result<()> {
        self.group = group;
        self.own_file()
    }

    fn own_file(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(gid) = self.group {
            std::os::unix::fs::fchown(&self.file, None, Some(gid))?;
        }
        // Files of an older daemon may have been world-readable.
        self.file.set_permissions(std::fs::Permissions::from_mode(0o640))
    }

    pub fn capacity(&self) -> u64 {
        self.max_bytes.saturating_mul(self.keep as u64 + 1)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let _ = std::fs::remove_file(rotated(&self.path, self.keep));
        for i in (1..self.keep).rev() {
            let from = rotated(&self.path, i);
            if from.exists() {
                std::fs::rename(&from, rotated(&self.path, i + 1))?;
            }
        }
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        }
        self.file = open_log_file(&self.path)?;
        self.own_file()?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.size = 0;
        Ok(())
    }

    /// Every file of the log, oldest first.
    pub fn files(path: &Path, keep: usize) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = (1..=keep)
            .rev()
            .map(|i| rotated(path, i))
            .filter(|p| p.exists())
            .collect();
        v.push(path.to_path_buf());
        v
    }

    /// Reads the next chunk for `cursor`: at most `max_lines` lines, and
    /// at most about `max_scan` bytes of file read, so that one call takes
    /// bounded time and memory however far the reader is behind.
    pub fn read_chunk(path: &Path, keep: usize, cursor: &mut Cursor, max_lines: usize, max_scan: u64) -> Chunk {
        let files: Vec<(PathBuf, u64)> = Self::files(path, keep)
            .into_iter()
            .filter_map(|f| {
                let ino = std::fs::metadata(&f).ok()?.ino();
                Some((f, ino))
            })
            .collect();
        let mut chunk = Chunk::default();
        // Where to start: the remembered place, else the newest file whose
        // first event is not after the one wanted.
        let (mut i, mut offset) = match cursor
            .at
            .and_then(|(ino, off)| files.iter().position(|(_, i)| *i == ino).map(|i| (i, off)))
        {
            Some(place) => place,
            None => {
                let first = files
                    .iter()
                    .rposition(|(f, _)| first_seq_in(f).is_some_and(|s| s <= cursor.next_seq))
                    .unwrap_or(0);
                (first, 0)
            }
        };
        let mut scanned = 0u64;
        while i < files.len() {
            let (file, ino) = &files[i];
            let Ok(mut fh) = File::open(file) else {
                i += 1;
                offset = 0;
                continue;
            };
            if fh.seek(SeekFrom::Start(offset)).is_err() {
                break;
            }
            let mut reader = BufReader::new(fh);
            let mut line = String::new();
            loop {
                line.clear();
                let n = reader.read_line(&mut line).unwrap_or_default();
                // The end, or a line still being written: come back later.
                if n == 0 || !line.ends_with('\n') {
                    break;
                }
                offset += n as u64;
                scanned += n as u64;
                cursor.at = Some((*ino, offset));
                let text = line.trim_end_matches('\n');
                if let Some(seq) = seq_of(text) {
                    if seq >= cursor.next_seq {
                        cursor.next_seq = seq + 1;
                        chunk.lines.push(text.to_string());
                    }
                }
                if chunk.lines.len() >= max_lines || scanned >= max_scan {
                    return chunk;
                }
            }
            if i + 1 == files.len() {
                break;
            }
            i += 1;
            offset = 0;
            cursor.at = Some((files[i].1, 0));
        }
        chunk.at_end = true;
        chunk
    }

    /// Reads complete events with `seq >= from` from every file, oldest first,
    /// calling `f` on each line until it returns false.
    pub fn replay(path: &Path, keep: usize, from: u64, mut f: impl FnMut(u64, &str) -> bool) {
        let mut cursor = Cursor::new(from);
        loop {
            let chunk = Self::read_chunk(path, keep, &mut cursor, 1024, 16 << 20);
            for line in &chunk.lines {
                if let Some(seq) = seq_of(line) {
                    if !f(seq, line) {
                        return;
                    }
                }
            }
            if chunk.at_end {
                return;
            }
        }
    }
}

fn first_seq_in(path: &Path) -> Option<u64> {
    let mut line = String::new();
    BufReader::new(File::open(path).ok()?).read_line(&mut line).ok()?;
    seq_of(line.trim_end_matches('\n'))
}

fn rotated(path: &Path, i: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

fn last_seq_in(path: &Path) -> Option<u64> {
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(TAIL_WINDOW))).ok()?;
    let mut tail = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut tail).ok()?;
    String::from_utf8_lossy(&tail).lines().rev().find_map(seq_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: u64) -> String {
        format!(r#"{{"seq":{seq},"kind":"test","pad":"{}"}}"#, "x".repeat(40))
    }

    #[test]
    fn a_torn_last_line_is_cut_and_seq_continues() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        {
            let (mut log, r) = AuditLog::open(&p, 1 << 20, 3).unwrap();
            assert_eq!(r, Recovery::default());
            log.append(&[line(1), line(2)]).unwrap();
        }
        // A crash mid-write.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(br#"{"seq":3,"kind":"te"#).unwrap();
        drop(f);
        let (_, r) = AuditLog::open(&p, 1 << 20, 3).unwrap();
        assert_eq!(r.last_seq, 2);
        assert_eq!(r.torn_bytes, 19);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn rotation_keeps_n_files_and_replay_sees_every_kept_seq_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let (mut log, _) = AuditLog::open(&p, 300, 2).unwrap();
        for seq in 1..=20 {
            log.append(&[line(seq)]).unwrap();
        }
        assert_eq!(AuditLog::files(&p, 2).len(), 3);
        assert!(!dir.path().join("audit.jsonl.3").exists());
        let mut seen = Vec::new();
        AuditLog::replay(&p, 2, 0, |seq, _| {
            seen.push(seq);
            true
        });
        assert_eq!(*seen.last().unwrap(), 20);
        assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
        // Chunked reading sees the same, a chunk at a time, and picks up
        // where it stopped across files.
        let mut cursor = Cursor::new(3);
        let mut chunked = Vec::new();
        loop {
            let c = AuditLog::read_chunk(&p, 2, &mut cursor, 4, 1 << 20);
            assert!(c.lines.len() <= 4);
            chunked.extend(c.lines.iter().map(|l| seq_of(l).unwrap()));
            if c.at_end {
                break;
            }
        }
        assert_eq!(chunked, seen.iter().copied().filter(|s| *s >= 3).collect::<Vec<_>>());
        // A batch that crosses the size rotates in the middle and loses
        // nothing; a reader's cursor follows the renamed file.
        let mut cursor = Cursor::new(21);
        assert!(AuditLog::read_chunk(&p, 2, &mut cursor, 100, 1 << 20).lines.is_empty());
        log.append(&(21..=26).map(line).collect::<Vec<_>>()).unwrap();
        let got: Vec<u64> = AuditLog::read_chunk(&p, 2, &mut cursor, 100, 1 << 20)
            .lines
            .iter()
            .map(|l| seq_of(l).unwrap())
            .collect();
        assert_eq!(got, (21..=26).collect::<Vec<_>>());
        // A restart right after a rotation (the new file still empty) finds
        // the last seq in the newest rotated file.
        drop(log);
        std::fs::rename(&p, rotated(&p, 1)).unwrap();
        std::fs::write(&p, "").unwrap();
        let (_, r) = AuditLog::open(&p, 300, 2).unwrap();
        assert_eq!(r.last_seq, 26);
    }

    #[test]
    fn rotated_files_past_the_age_are_deleted_and_the_current_one_never() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let (mut log, _) = AuditLog::open(&p, 200, 3).unwrap();
        for seq in 1..=12 {
            log.append(&[line(seq)]).unwrap();
        }
        let old = SystemTime::now() - Duration::from_secs(3 * 86400);
        for f in [rotated(&p, 2), rotated(&p, 3), p.clone()] {
            File::options().write(true).open(&f).unwrap().set_modified(old).unwrap();
        }
        log.prune(Duration::from_secs(86400));
        assert!(rotated(&p, 1).exists());
        assert!(!rotated(&p, 2).exists() && !rotated(&p, 3).exists());
        assert!(p.exists(), "the file being written is kept");
        assert_eq!(log.capacity(), 800);
    }
}
