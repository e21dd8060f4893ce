//! The daemon's own directories and who may read them.
//!
//! Owns: creating the state directory and its `logs` and `workers`
//! subdirectories (0700: workers see their own directories through bind
//! mounts, never this tree) and the audit log's directory (0750, group
//! `admin_group`), and refusing
//! to start on one that others could write: a worker's output, a record or
//! an audit line planted or swapped by another account would be trusted.
//!
//! Must never: follow a symlink for one of these directories, loosen a
//! mode, or start on a directory that is not root's or that group or
//! others may write.

use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::sys::stat::{fchmod, fstat, Mode};
use nix::unistd::{fchown, Gid};

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("cannot create or open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} is {what}; wardend keeps its state and logs only in root's directories that nobody else may write \
         (chown root {path}; chmod go-w {path})"
    )]
    Unsafe { path: PathBuf, what: String },
}

/// Whether [`secure_dir`] may change an existing directory, or only check it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// The daemon's own (its state directory and what is in it): its mode
    /// and group are set.
    Own,
    /// Perhaps shared with others (the audit log's directory, say
    /// `/var/log`): only checked.
    Check,
}

/// Creates `path` (and its parents) if missing, refuses it unless it is a
/// directory of root's that group and others cannot write, then (when it
/// was created or is the daemon's `Own`) sets its mode to `mode` and, with
/// `group`, its group.
pub fn secure_dir(path: &Path, mode: u32, group: Option<Gid>, existing: Existing) -> Result<(), PathError> {
    let open_err = |source| PathError::Open {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(open_err)?;
    }
    let created = match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(open_err(e)),
    };
    let dir = open(
        path,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR => PathError::Unsafe {
            path: path.to_path_buf(),
            what: "not a directory (a symlink?)".into(),
        },
        e => open_err(std::io::Error::from(e)),
    })?;
    let st = fstat(dir.as_fd()).map_err(|e| open_err(e.into()))?;
    if st.st_uid != 0 {
        return Err(PathError::Unsafe {
            path: path.to_path_buf(),
            what: format!("owned by uid {}", st.st_uid),
        });
    }
    if st.st_mode & 0o022 != 0 {
        return Err(PathError::Unsafe {
            path: path.to_path_buf(),
            what: format!("writable by group or others (mode {:o})", st.st_mode & 0o7777),
        });
    }
    if !created && existing == Existing::Check {
        return Ok(());
    }
    if let Some(gid) = group {
        if st.st_gid != gid.as_raw() {
            fchown(dir.as_fd(), None, Some(gid)).map_err(|e| open_err(e.into()))?;
        }
    }
    if st.st_mode & 0o7777 != mode {
        fchmod(dir.as_fd(), Mode::from_bits_truncate(mode)).map_err(|e| open_err(e.into()))?;
        tracing::info!(path = %path.display(), from = format!("{:o}", st.st_mode & 0o7777), to = format!("{mode:o}"), "set the mode of a directory of wardend");
    }
    Ok(())
}

/// Replaces `path` with `bytes` in one step: written to `<path>.tmp`
/// (mode 0600: the daemon's files are root's), then renamed over it, so a
/// reader or a crash sees the old file or the new one, never half of one.
/// With `sync` the data is on disk before the rename.
pub fn replace_private(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    if sync {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn directories_are_made_private_and_open_ones_refused() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        secure_dir(&state, 0o711, None, Existing::Own).unwrap();
        assert_eq!(std::fs::metadata(&state).unwrap().mode() & 0o7777, 0o711);
        // A readable one is tightened.
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        secure_dir(&state, 0o711, None, Existing::Own).unwrap();
        assert_eq!(std::fs::metadata(&state).unwrap().mode() & 0o7777, 0o711);
        // A group- or world-writable one is refused, and left as it is.
        for open in [0o775, 0o757, 0o1777] {
            std::fs::set_permissions(&state, std::fs::Permissions::from_mode(open)).unwrap();
            let e = secure_dir(&state, 0o711, None, Existing::Own).unwrap_err();
            assert!(matches!(e, PathError::Unsafe { .. }), "{e}");
            assert!(e.to_string().contains("writable by group or others"), "{e}");
            assert_eq!(std::fs::metadata(&state).unwrap().mode() & 0o7777, open);
        }
        // Another owner's, or a symlink, is refused.
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        nix::unistd::chown(&state, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        assert!(secure_dir(&state, 0o711, None, Existing::Own)
            .unwrap_err()
            .to_string()
            .contains("owned by uid 65534"));
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        assert!(secure_dir(&link, 0o711, None, Existing::Own)
            .unwrap_err()
            .to_string()
            .contains("not a directory"));
        // A shared directory is checked, not changed; one it creates gets
        // the mode and group asked for.
        let shared = tmp.path().join("var-log");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        secure_dir(&shared, 0o750, Some(Gid::from_raw(4)), Existing::Check).unwrap();
        let m = std::fs::metadata(&shared).unwrap();
        assert_eq!((m.mode() & 0o7777, m.gid()), (0o755, 0));
        let audit = shared.join("warden");
        secure_dir(&audit, 0o750, Some(Gid::from_raw(4)), Existing::Check).unwrap();
        let m = std::fs::metadata(&audit).unwrap();
        assert_eq!((m.mode() & 0o7777, m.gid()), (0o750, 4));
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(secure_dir(&shared, 0o750, None, Existing::Check).is_err());
    }
}
