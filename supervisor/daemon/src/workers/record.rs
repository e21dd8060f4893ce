//! Worker records: one small file per running worker in
//! `<state>/workers/`, so that a daemon started after a crash can report
//! the workers it lost.
//!
//! Must never: start a worker whose record is not written (a crash of the
//! daemon would forget it), or report a worker lost twice.
//!
//! Written, not synced: the record is for a daemon that dies while its
//! workers live on (the page cache keeps it); a host that dies takes the
//! workers with it, and their `worker_started` events (durable in the
//! audit log) then have no exit. An fsync here cost every spawn about a
//! millisecond.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What is persisted per running worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub user: String,
    pub project: String,
    pub profile: String,
    pub policy_digest: String,
    pub command: Vec<String>,
    pub uid: u32,
    pub started_ms: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("Cannot write the worker record {path}")]
pub struct RecordError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The records directory.
#[derive(Debug, Clone)]
pub struct Records {
    dir: PathBuf,
}

impl Records {
    pub fn new(dir: PathBuf) -> Self {
        Records { dir }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes `r` (written, then renamed into place: never half a record).
    pub fn save(&self, r: &Record) -> Result<(), RecordError> {
        let path = self.path(&r.id);
        let err = |source| RecordError {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(err)?;
        let json = serde_json::to_vec(r).map_err(|e| err(e.into()))?;
        crate::paths::replace_private(&path, &json, false).map_err(err)
    }

    /// Forgets the record of a worker that ended (it is no longer lost if
    /// the daemon dies).
    pub fn remove(&self, id: &str) {
        if let Err(e) = std::fs::remove_file(self.path(id)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(worker = id, error = %e, "cannot remove a worker record; the next start will report it lost");
            }
        }
    }

    /// Takes every record a previous daemon left: each is returned once
    /// and removed. An unreadable record is logged and removed.
    pub fn take_all(&self) -> Vec<Record> {
        let entries = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok);
        let mut out = Vec::new();
        for entry in entries {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                let _ = std::fs::remove_file(&path); // a temp file of a crashed save
                continue;
            }
            let record = read(&path);
            let _ = std::fs::remove_file(&path);
            match record {
                Ok(r) => out.push(r),
                Err(e) => tracing::error!(path = %path.display(), error = %e, "unreadable worker record removed"),
            }
        }
        out.sort_by_key(|r| r.started_ms);
        out
    }
}

fn read(path: &Path) -> Result<Record, Box<dyn std::error::Error>> {
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, started_ms: u64) -> Record {
        Record {
            id: id.into(),
            user: "alice".into(),
            project: "default".into(),
            profile: "base".into(),
            policy_digest: "d".into(),
            command: vec!["true".into()],
            uid: 200_000,
            started_ms,
        }
    }

    #[test]
    fn records_survive_until_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let r = Records::new(dir.path().join("workers"));
        r.save(&record("w2", 2)).unwrap();
        r.save(&record("w1", 1)).unwrap();
        r.save(&record("w3", 3)).unwrap();
        r.remove("w3");
        std::fs::write(dir.path().join("workers/w9.json"), "{torn").unwrap();
        let ids: Vec<String> = r.take_all().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["w1", "w2"]);
        assert!(r.take_all().is_empty(), "each is reported once");
    }

    #[test]
    fn a_record_that_cannot_be_written_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("workers"), "a file, not a directory").unwrap();
        let e = Records::new(dir.path().join("workers"))
            .save(&record("w1", 1))
            .unwrap_err();
        assert!(e.to_string().starts_with("Cannot write the worker record"), "{e}");
    }
}
