//! The audit log: every event, as one JSON line, appended before it is
//! published, in `/var/log/warden/audit.jsonl` (path configurable).
//!
//! Owns: sequence numbers (they never repeat or go back, across restarts and
//! rotations), durability (a line is written and fdatasync'ed before
//! [`AuditLog::append`] returns), rotation by size keeping a configured
//! number of files (`audit.jsonl.1` is the newest rotated one), and repair
//! after a crash (a torn last line is cut off and reported).
//!
//! Must never: publish an event that is not on disk, or hand out a sequence
//! number twice.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

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

#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
}

/// The `seq` of a JSON line, if it is a complete event.
fn seq_of(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("seq")?
        .as_u64()
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
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        let mut recovery = Recovery::default();
        let text = std::fs::read(path).map_err(err)?;
        // The valid prefix: complete lines that parse.
        let mut good = 0usize;
        for line in text.split_inclusive(|b| *b == b'\n') {
            if !line.ends_with(b"\n") {
                break;
            }
            match std::str::from_utf8(line).ok().and_then(seq_of) {
                Some(seq) => {
                    recovery.last_seq = seq;
                    good += line.len();
                }
                None => break,
            }
        }
        if good < text.len() {
            recovery.torn_bytes = (text.len() - good) as u64;
            file.set_len(good as u64).map_err(err)?;
            file.sync_data().map_err(err)?;
        }
        if recovery.last_seq == 0 {
            recovery.last_seq = (1..=keep).find_map(|i| last_seq_in(&rotated(path, i))).unwrap_or(0);
        }
        let log = AuditLog {
            path: path.to_path_buf(),
            file,
            size: good as u64,
            max_bytes,
            keep,
        };
        Ok((log, recovery))
    }

    /// Appends one line (without its newline) durably; rotates first when the
    /// file would grow beyond its size.
    pub fn append(&mut self, line: &str) -> Result<(), AuditError> {
        let path = self.path.clone();
        let err = |source| AuditError::Write {
            path: path.clone(),
            source,
        };
        if self.size > 0 && self.size + line.len() as u64 + 1 > self.max_bytes {
            self.rotate().map_err(err)?;
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.file.write_all(&buf).map_err(err)?;
        self.file.sync_data().map_err(err)?;
        self.size += buf.len() as u64;
        Ok(())
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
        self.file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)?;
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

    /// Reads complete events with `seq >= from` from every file, oldest first,
    /// calling `f` on each line until it returns false.
    pub fn replay(path: &Path, keep: usize, from: u64, mut f: impl FnMut(u64, &str) -> bool) {
        for file in Self::files(path, keep) {
            let Ok(fh) = File::open(&file) else { continue };
            for line in BufReader::new(fh).lines() {
                let Ok(line) = line else { break };
                let Some(seq) = seq_of(&line) else { continue };
                if seq >= from && !f(seq, &line) {
                    return;
                }
            }
        }
    }
}

fn rotated(path: &Path, i: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

fn last_seq_in(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().rev().find_map(seq_of)
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
            log.append(&line(1)).unwrap();
            log.append(&line(2)).unwrap();
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
            log.append(&line(seq)).unwrap();
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
        // A restart right after a rotation (the new file still empty) finds
        // the last seq in the newest rotated file.
        drop(log);
        std::fs::rename(&p, rotated(&p, 1)).unwrap();
        std::fs::write(&p, "").unwrap();
        let (_, r) = AuditLog::open(&p, 300, 2).unwrap();
        assert_eq!(r.last_seq, 20);
    }
}
