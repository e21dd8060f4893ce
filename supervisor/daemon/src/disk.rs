//! Disk limits: each warden user's directory tree (home and workspaces) is
//! one project of the state directory's file system, numbered by the
//! user's uid, and the kernel's project quota holds it to its limit.
//!
//! Owns: what that file system can do (probed once, at start); the limit
//! of each user's project while workers run, which is the largest any of
//! the user's running workers was promised (none, if one of them has no
//! limit); reading a project's use.
//!
//! Must never: start a worker with a disk limit the kernel will not
//! enforce (that is an error for its spawn, never a silent pass); lower a
//! project's limit under a running worker that was promised more.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::sys::{self, ProjectQuota};

/// One file for each this many bytes of a disk limit: files cost inodes,
/// which the whole file system shares, whatever their size.
pub const BYTES_PER_FILE: u64 = 4096;
/// The fewest files a disk limit allows.
const MIN_FILES: u64 = 1024;

/// What the state directory's file system does with project quotas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// Counts each project's use and enforces its limits.
    Enforced,
    /// Counts, but does not enforce (ext4 mounted without `prjquota`).
    Counted,
    /// Neither; why.
    Missing(String),
}

impl std::fmt::Display for Support {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Support::Enforced => f.write_str("project quotas are enforced"),
            Support::Counted => f.write_str("project quotas are counted but not enforced (mount it with prjquota)"),
            Support::Missing(why) => write!(f, "no project quotas ({why})"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(
        "A disk limit of {limit} bytes applies to user {user} (profile {profile}), but the state \
         directory's file system cannot enforce it: {support}. Put the state directory on ext4 with \
         project quotas (tune2fs -O quota,project, mounted with prjquota) or XFS (mounted with \
         prjquota), or remove the limit"
    )]
    Unenforceable {
        user: String,
        profile: String,
        limit: u64,
        support: Support,
    },
    #[error("Cannot set the disk limit of project {project} on {state_dir}")]
    SetLimit {
        project: u32,
        state_dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a worker was promised for its user's tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promise {
    /// Bytes; `None`: no limit.
    pub bytes: Option<u64>,
}

impl Promise {
    /// The project limits (bytes, files) that keep this promise; 0: none.
    pub fn quota(self) -> (u64, u64) {
        self.bytes.map_or((0, 0), |b| (b, (b / BYTES_PER_FILE).max(MIN_FILES)))
    }
}

/// The limit of a project with these workers running: the largest any
/// was promised, and none if one of them has none.
fn project_limit<'a>(promises: impl IntoIterator<Item = &'a Promise>) -> Option<Promise> {
    promises.into_iter().copied().reduce(|a, b| Promise {
        bytes: a.bytes.zip(b.bytes).map(|(x, y)| x.max(y)),
    })
}

/// The state directory's file system and the promises made on it.
#[derive(Debug)]
pub struct Disk {
    state_dir: PathBuf,
    /// The state directory, for quotactl_fd(2).
    fd: Option<OwnedFd>,
    support: Support,
    /// Project to worker to its promise, for the running workers.
    promises: Mutex<BTreeMap<u32, BTreeMap<String, Promise>>>,
}

impl Disk {
    /// Looks at what the file system of `state_dir` can do.
    pub fn probe(state_dir: &Path) -> Disk {
        let fd = std::fs::File::open(state_dir).map(OwnedFd::from);
        let support = match &fd {
            Err(e) => Support::Missing(format!("cannot open it: {}", e.kind())),
            Ok(fd) => match sys::project_quota_state(fd.as_fd()) {
                Ok(s) if s.enforcing => Support::Enforced,
                Ok(s) if s.accounting => Support::Counted,
                Ok(_) => Support::Missing("they are off".into()),
                Err(e) => Support::Missing(match e.raw_os_error() {
                    Some(libc::ESRCH) => "they are off".into(),
                    Some(libc::ENOSYS | libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL) => {
                        "the file system or the kernel has none".into()
                    }
                    _ => format!("cannot ask it: {}", e.kind()),
                }),
            },
        };
        Disk {
            state_dir: state_dir.to_path_buf(),
            fd: fd.ok(),
            support,
            promises: Mutex::default(),
        }
    }

    pub fn support(&self) -> &Support {
        &self.support
    }

    /// Whether users' trees are tagged with their project (its use counts).
    pub fn counts(&self) -> bool {
        matches!(self.support, Support::Enforced | Support::Counted)
    }

    /// Promises `limit` (bytes; `None`: none) on `user`'s tree (project
    /// `project`) to `worker` while it runs, and sets the project's limit
    /// to what its running workers were promised. A limit the file
    /// system cannot enforce is an error.
    pub fn promise(
        self: &Arc<Self>,
        project: u32,
        user: &str,
        profile: &str,
        worker: &str,
        limit: Option<u64>,
    ) -> Result<DiskPromise, DiskError> {
        if let Some(limit) = limit {
            if self.support != Support::Enforced {
                return Err(DiskError::Unenforceable {
                    user: user.to_string(),
                    profile: profile.to_string(),
                    limit,
                    support: self.support.clone(),
                });
            }
        }
        let mut all = self.promises.lock().unwrap_or_else(|p| p.into_inner());
        let mine = all.entry(project).or_default();
        mine.insert(worker.to_string(), Promise { bytes: limit });
        if let Err(e) = self.apply(project, mine) {
            mine.remove(worker);
            return Err(e);
        }
        Ok(DiskPromise {
            disk: self.clone(),
            project,
            worker: worker.to_string(),
            bytes: limit,
        })
    }

    /// Sets the project's limit to what its running workers were promised
    /// (nothing to do where the kernel does not enforce limits).
    fn apply(&self, project: u32, promises: &BTreeMap<String, Promise>) -> Result<(), DiskError> {
        let (Support::Enforced, Some(fd), Some(limit)) = (&self.support, &self.fd, project_limit(promises.values()))
        else {
            return Ok(());
        };
        let (bytes, files) = limit.quota();
        sys::set_project_quota(fd.as_fd(), project, bytes, files).map_err(|source| DiskError::SetLimit {
            project,
            state_dir: self.state_dir.clone(),
            source,
        })
    }

    fn release(&self, project: u32, worker: &str) {
        let mut all = self.promises.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mine) = all.get_mut(&project) else { return };
        mine.remove(worker);
        // With no worker left the limit stays as it was: the files do.
        if let Err(e) = self.apply(project, mine) {
            tracing::error!(project, error = %e, "cannot set a disk limit after a worker ended");
        }
        if mine.is_empty() {
            all.remove(&project);
        }
    }

    /// A project's use and limits, where the file system counts them.
    pub fn usage(&self, project: u32) -> Option<ProjectQuota> {
        if !self.counts() {
            return None;
        }
        sys::project_quota(self.fd.as_ref()?.as_fd(), project).ok()
    }
}

/// A running worker's promise; dropping it (the worker ended, or never
/// started) gives the project back to the others' promises.
#[derive(Debug)]
pub struct DiskPromise {
    disk: Arc<Disk>,
    project: u32,
    worker: String,
    /// What was promised (bytes; `None`: no limit).
    pub bytes: Option<u64>,
}

impl DiskPromise {
    /// The project's use and limits now.
    pub fn usage(&self) -> Option<ProjectQuota> {
        self.disk.usage(self.project)
    }
}

impl Drop for DiskPromise {
    fn drop(&mut self) {
        self.disk.release(self.project, &self.worker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(bytes: Option<u64>) -> Promise {
        Promise { bytes }
    }

    #[test]
    fn a_project_gets_the_largest_promise_and_none_beats_all() {
        assert_eq!(project_limit([]), None);
        assert_eq!(project_limit([&p(Some(5))]), Some(p(Some(5))));
        assert_eq!(project_limit([&p(Some(5)), &p(Some(9)), &p(Some(7))]), Some(p(Some(9))));
        assert_eq!(project_limit([&p(Some(5)), &p(None), &p(Some(7))]), Some(p(None)));
        assert_eq!(p(Some(1 << 30)).quota(), (1 << 30, (1 << 30) / BYTES_PER_FILE));
        assert_eq!(p(Some(4096)).quota(), (4096, MIN_FILES));
        assert_eq!(p(None).quota(), (0, 0));
    }

    #[test]
    fn a_limit_where_the_kernel_cannot_enforce_it_is_refused_and_no_limit_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = Disk::probe(dir.path());
        disk.support = Support::Missing("test".into());
        let disk = Arc::new(disk);
        let e = disk.promise(7, "alice", "small", "w1", Some(1 << 20)).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("user alice (profile small)"), "{text}");
        assert!(text.contains("cannot enforce it: no project quotas (test)"), "{text}");
        let unlimited = disk.promise(7, "alice", "base", "w2", None).unwrap();
        assert_eq!(unlimited.bytes, None);
        assert_eq!(unlimited.usage(), None);
        drop(unlimited);
        assert!(
            disk.promises.lock().unwrap().is_empty(),
            "a dropped promise is released"
        );
    }
}
