//! warden users: their names, their dedicated uid/gid, their directories.
//!
//! Owns: validating user and project names; allocating each warden user a
//! uid (and equal gid) from the configured range, persisted in
//! `<state>/uids.json` so it never changes across restarts; creating
//! `<state>/users/<user>/profiles/<profile>/{home,workspace/<project>}`
//! owned by that uid (one home and set of workspaces per profile: workers
//! under profiles with other network or approval policies share no
//! writable file);
//! where the file system counts project quotas, putting that tree in the
//! user's project (numbered by its uid: see [`crate::disk`]).
//!
//! Must never: hand out uid 0 or a uid/gid that `/etc/passwd` or `/etc/group`
//! already names; follow a symlink while creating or chowning a user's
//! directories (every step is an `openat(O_NOFOLLOW)` relative to the
//! verified parent, so a planted link is an error, not a chown of its target).

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{open, openat, OFlag};
use nix::sys::stat::{fchmod, fstat, mkdirat, Mode};
use nix::unistd::{fchown, Gid, Uid};
use serde::{Deserialize, Serialize};
use warden_policy::names::{self, NameError};

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("The uid range {start}..={end} is invalid: it must not include 0 and start <= end")]
    BadRange { start: u32, end: u32 },
    #[error("No free uid left in {start}..={end}")]
    Exhausted { start: u32, end: u32 },
    #[error("The uid {uid} of warden user {user} is now also used in {file}")]
    Collision { user: String, uid: u32, file: &'static str },
    #[error(
        "{path}:{line}: the subordinate ids of {owner:?} ({start}-{end}) overlap warden's worker uids \
         ({first}-{last}): whoever holds them could run processes as a worker; move uid_min and uid_max in \
         wardend.toml, or that range"
    )]
    SubordinateOverlap {
        path: PathBuf,
        line: usize,
        owner: String,
        start: u64,
        end: u64,
        first: u32,
        last: u32,
    },
    #[error("Cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The uid map {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("Cannot save the uid map {path}")]
    Save {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is a symlink or not a directory; refusing to use it")]
    NotADirectory { path: PathBuf },
    #[error("Cannot prepare {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("The state directory {path} must be owned by root and not writable by others")]
    UnsafeStateDir { path: PathBuf },
    #[error("Cannot put {path} in project {project} (its disk limit)")]
    Project {
        path: PathBuf,
        project: u32,
        #[source]
        source: std::io::Error,
    },
}

/// A warden user's identity on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

/// A user's directories on the host, ready to bind into a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDirs {
    pub home: PathBuf,
    pub workspace: PathBuf,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UidMap {
    version: u32,
    users: BTreeMap<String, u32>,
}

/// The registry of warden users under one state directory.
#[derive(Debug)]
pub struct Users {
    state_dir: PathBuf,
    range: RangeInclusive<u32>,
    map: Mutex<UidMap>,
    /// The host's account databases (parametrized for tests).
    passwd: PathBuf,
    group: PathBuf,
    /// Also ask the account database (NSS: LDAP, SSSD) about each id.
    nss: bool,
    /// Put each user's tree in its project (the file system counts them).
    projects: bool,
    /// When each uid was last found free in the account databases.
    verified: Mutex<std::collections::HashMap<u32, std::time::Instant>>,
    /// [`RECHECK`], or another interval in tests.
    recheck: std::time::Duration,
}

/// How long a uid found free in /etc/passwd, /etc/group and NSS is
/// trusted before it is checked again (each check reads both files and
/// asks NSS, a quarter of a millisecond a spawn): an account an admin
/// creates with a worker's uid stops that user's spawns within this time.
const RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// Checks a subordinate id file (`/etc/subuid`, `/etc/subgid`): no range
/// but warden's own may overlap `range`. Returns whether an entry named
/// `warden` reserves all of it.
pub fn check_subordinate(range: &RangeInclusive<u32>, path: &Path) -> Result<bool, UserError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(UserError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let (first, last) = (u64::from(*range.start()), u64::from(*range.end()));
    let mut reserved = false;
    for (i, l) in text.lines().enumerate() {
        let mut f = l.trim().split(':');
        let (Some(owner), Some(start), Some(count)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let (Ok(start), Ok(count)) = (start.parse::<u64>(), count.parse::<u64>()) else {
            continue;
        };
        if count == 0 {
            continue;
        }
        let end = start + count - 1;
        if owner == "warden" {
            reserved |= start <= first && last <= end;
            continue;
        }
        if start <= last && first <= end {
            return Err(UserError::SubordinateOverlap {
                path: path.to_path_buf(),
                line: i + 1,
                owner: owner.to_string(),
                start,
                end,
                first: *range.start(),
                last: *range.end(),
            });
        }
    }
    Ok(reserved)
}

const MAP_FILE: &str = "uids.json";

impl Users {
    /// Opens (and creates) the registry in `state_dir` with uids from `range`.
    pub fn open(state_dir: &Path, range: RangeInclusive<u32>) -> Result<Self, UserError> {
        for file in ["/etc/subuid", "/etc/subgid"] {
            if !check_subordinate(&range, Path::new(file))? {
                tracing::warn!(
                    "{file} has no entry reserving warden's worker ids {}-{} (add \"warden:{}:{}\"; see README \"Installing under systemd\")",
                    range.start(),
                    range.end(),
                    range.start(),
                    u64::from(*range.end()) - u64::from(*range.start()) + 1
                );
            }
        }
        let mut users = Self::open_with(state_dir, range, Path::new("/etc/passwd"), Path::new("/etc/group"))?;
        users.nss = true;
        Ok(users)
    }

    /// Puts each user's tree in its project from now on (where the file
    /// system counts project quotas: [`crate::disk::Disk::counts`]).
    pub fn with_projects(mut self, on: bool) -> Self {
        self.projects = on;
        self
    }

    pub fn open_with(
        state_dir: &Path,
        range: RangeInclusive<u32>,
        passwd: &Path,
        group: &Path,
    ) -> Result<Self, UserError> {
        if *range.start() == 0 || range.start() > range.end() {
            return Err(UserError::BadRange {
                start: *range.start(),
                end: *range.end(),
            });
        }
        std::fs::create_dir_all(state_dir).map_err(|source| UserError::Read {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let dir = open(
            state_dir,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| UserError::Dir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let st = fstat(dir.as_fd()).map_err(|source| UserError::Dir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        if st.st_uid != 0 || st.st_mode & 0o002 != 0 {
            return Err(UserError::UnsafeStateDir {
                path: state_dir.to_path_buf(),
            });
        }
        let path = state_dir.join(MAP_FILE);
        let map = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str::<UidMap>(&text).map_err(|e| UserError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => UidMap {
                version: 1,
                users: BTreeMap::new(),
            },
            Err(source) => return Err(UserError::Read { path, source }),
        };
        Ok(Users {
            state_dir: state_dir.to_path_buf(),
            range,
            map: Mutex::new(map),
            passwd: passwd.to_path_buf(),
            group: group.to_path_buf(),
            nss: false,
            projects: false,
            verified: Mutex::default(),
            recheck: RECHECK,
        })
    }

    /// The ids the host's account files use.
    fn host_ids(&self, path: &Path) -> Result<Vec<u32>, UserError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(UserError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Ok(text.lines().filter_map(|l| l.split(':').nth(2)?.parse().ok()).collect())
    }

    /// The uid of a known user (none is allocated).
    pub fn known_uid(&self, user: &str) -> Option<u32> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .users
            .get(user)
            .copied()
    }

    /// Every user that has a uid.
    pub fn known(&self) -> Vec<String> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .users
            .keys()
            .cloned()
            .collect()
    }

    /// The identity of `user`, allocating and persisting one on first use.
    pub fn identity(&self, user: &str) -> Result<Identity, UserError> {
        names::check_user(user)?;
        if let Some(uid) = self.known_uid(user) {
            let verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if verified.get(&uid).is_some_and(|at| at.elapsed() < self.recheck) {
                return Ok(Identity { uid, gid: uid });
            }
        }
        let id = self.check_identity(user)?;
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.uid, std::time::Instant::now());
        Ok(id)
    }

    /// [`identity`](Self::identity), checked against the account databases.
    fn check_identity(&self, user: &str) -> Result<Identity, UserError> {
        let taken_uids = self.host_ids(&self.passwd)?;
        let taken_gids = self.host_ids(&self.group)?;
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // The account database beyond the files (LDAP, SSSD).
        let nss_taken = |id: u32| {
            self.nss
                && (matches!(nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(id)), Ok(Some(_)))
                    || matches!(
                        nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(id)),
                        Ok(Some(_))
                    ))
        };
        if let Some(&uid) = map.users.get(user) {
            // An admin may have created an account with our uid since.
            for (ids, file) in [(&taken_uids, "/etc/passwd"), (&taken_gids, "/etc/group")] {
                if ids.contains(&uid) {
                    return Err(UserError::Collision {
                        user: user.to_string(),
                        uid,
                        file,
                    });
                }
            }
            if nss_taken(uid) {
                return Err(UserError::Collision {
                    user: user.to_string(),
                    uid,
                    file: "the account database (NSS)",
                });
            }
            return Ok(Identity { uid, gid: uid });
        }
        let used: Vec<u32> = map.users.values().copied().collect();
        let uid = self
            .range
            .clone()
            .find(|id| !used.contains(id) && !taken_uids.contains(id) && !taken_gids.contains(id) && !nss_taken(*id))
            .ok_or(UserError::Exhausted {
                start: *self.range.start(),
                end: *self.range.end(),
            })?;
        map.users.insert(user.to_string(), uid);
        if let Err(e) = self.save(&map) {
            map.users.remove(user);
            return Err(e);
        }
        Ok(Identity { uid, gid: uid })
    }

    /// Writes the map atomically: a crash leaves the old or the new file.
    fn save(&self, map: &UidMap) -> Result<(), UserError> {
        let path = self.state_dir.join(MAP_FILE);
        let err = |source| UserError::Save {
            path: path.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(map).map_err(|e| err(e.into()))?;
        crate::paths::replace_private(&path, &json, true).map_err(err)
    }

    /// Creates (or checks) the user's directories for `project` under
    /// `profile` and returns their host paths. Idempotent.
    pub fn prepare(&self, user: &str, profile: &str, project: &str) -> Result<UserDirs, UserError> {
        names::check_profile(profile)?;
        names::check_project(project)?;
        let id = self.identity(user)?;
        let state = open(
            &self.state_dir,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| UserError::Dir {
            path: self.state_dir.clone(),
            source,
        })?;
        let root = (0, 0);
        let own = (id.uid, id.gid);
        let mut path = self.state_dir.clone();
        let users = step(&state, &mut path, "users", root)?;
        let user_dir = step(&users, &mut path, user, own)?;
        if self.projects {
            tag_tree(&user_dir, &path, id.uid)?;
        }
        let profiles = step(&user_dir, &mut path, "profiles", own)?;
        let tree = step(&profiles, &mut path, profile, own)?;
        let mut home_path = path.clone();
        step(&tree, &mut home_path, "home", own)?;
        let ws = step(&tree, &mut path, "workspace", own)?;
        step(&ws, &mut path, project, own)?;
        Ok(UserDirs {
            home: home_path,
            workspace: path,
        })
    }
}

/// How deep [`tag_tree`] goes below a user's directory.
const TAG_DEPTH: usize = 128;

/// Puts a user's tree in project `project`: the directories with the
/// inherit flag, so that whatever is created in them joins it. Walks only
/// a tree made before the file system counted projects (its top is not yet
/// in the project), and tags the top last, so that a walk cut short is done
/// again. Never follows a symlink; what cannot be tagged is logged.
fn tag_tree(top: &OwnedFd, path: &Path, project: u32) -> Result<(), UserError> {
    let err = |source: std::io::Error| UserError::Project {
        path: path.to_path_buf(),
        project,
        source,
    };
    if crate::sys::project_of(top.as_fd()).map_err(err)? == project {
        return Ok(());
    }
    let mut missed = 0u64;
    tag_children(top, project, TAG_DEPTH, &mut missed);
    if missed > 0 {
        tracing::warn!(path = %path.display(), project, missed, "files of a user's tree made before its disk limit could not be put in its project; they do not count toward it");
    }
    crate::sys::set_project(top.as_fd(), project, true).map_err(err)
}

fn tag_children(dir: &OwnedFd, project: u32, depth: usize, missed: &mut u64) {
    use nix::sys::stat::{fstatat, SFlag};
    let names: Vec<std::ffi::CString> = match nix::dir::Dir::openat(
        dir,
        ".",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(mut d) => d
            .iter()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_owned())
            .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
            .collect(),
        Err(_) => {
            *missed += 1;
            return;
        }
    };
    for name in names {
        let Ok(st) = fstatat(dir, name.as_c_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        let is_dir = kind == SFlag::S_IFDIR;
        if !is_dir && kind != SFlag::S_IFREG {
            continue;
        }
        // O_NONBLOCK: a file swapped for a FIFO since the stat does not hang us.
        let fd = match openat(
            dir,
            name.as_c_str(),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(_) => {
                *missed += 1;
                continue;
            }
        };
        if is_dir {
            if depth == 0 {
                *missed += 1;
                continue;
            }
            tag_children(&fd, project, depth - 1, missed);
        }
        if crate::sys::set_project(fd.as_fd(), project, is_dir).is_err() {
            *missed += 1;
        }
    }
}

/// One step down: `mkdirat` (if missing), open without following a symlink,
/// check it is a directory, then fix owner and mode through the fd.
fn step(parent: &OwnedFd, path: &mut PathBuf, name: &str, (uid, gid): (u32, u32)) -> Result<OwnedFd, UserError> {
    path.push(name);
    match mkdirat(parent, name, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(source) => {
            return Err(UserError::Dir {
                path: path.clone(),
                source,
            })
        }
    }
    let fd = match openat(
        parent,
        name,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ELOOP | Errno::ENOTDIR) => return Err(UserError::NotADirectory { path: path.clone() }),
        Err(source) => {
            return Err(UserError::Dir {
                path: path.clone(),
                source,
            })
        }
    };
    // Owner and mode are set only where they differ: a change dirties the
    // inode in the file system's journal, and every spawn passes here
    // (the audit log's fdatasync would wait for those blocks too).
    let st = nix::sys::stat::fstat(&fd).map_err(|source| UserError::Dir {
        path: path.clone(),
        source,
    })?;
    if st.st_uid != uid || st.st_gid != gid {
        fchown(&fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(|source| UserError::Dir {
            path: path.clone(),
            source,
        })?;
    }
    if st.st_mode & 0o7777 != 0o700 {
        fchmod(&fd, Mode::from_bits_truncate(0o700)).map_err(|source| UserError::Dir {
            path: path.clone(),
            source,
        })?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new(passwd: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("passwd"), passwd).unwrap();
            std::fs::write(dir.path().join("group"), "root:x:0:\nstaff:x:50:\n").unwrap();
            std::fs::create_dir(dir.path().join("state")).unwrap();
            Fixture { dir }
        }
        fn users(&self, range: RangeInclusive<u32>) -> Result<Users, UserError> {
            Users::open_with(
                &self.dir.path().join("state"),
                range,
                &self.dir.path().join("passwd"),
                &self.dir.path().join("group"),
            )
        }
    }

    #[test]
    fn uids_skip_host_accounts_and_persist() {
        if !crate::privileged("creates root-owned state and chowns to worker uids") {
            return;
        }
        let f = Fixture::new("root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n");
        let users = f.users(999..=1002).unwrap();
        assert_eq!(users.identity("bob").unwrap(), Identity { uid: 999, gid: 999 });
        assert_eq!(users.identity("carol").unwrap().uid, 1001, "1000 is in /etc/passwd");
        assert_eq!(users.identity("bob").unwrap().uid, 999, "stable");
        drop(users);
        let mut again = f.users(999..=1002).unwrap();
        assert_eq!(again.identity("carol").unwrap().uid, 1001, "persisted across restarts");
        assert_eq!(again.identity("dave").unwrap().uid, 1002);
        assert!(matches!(again.identity("erin"), Err(UserError::Exhausted { .. })));
        assert!(matches!(again.identity("../x"), Err(UserError::Name(_))));
        // An admin later creates an account with dave's uid: refuse, do not
        // share, once the uid's last check is RECHECK old.
        std::fs::write(f.dir.path().join("passwd"), "x:x:1002:1002::/:/bin/sh\n").unwrap();
        assert_eq!(again.identity("dave").unwrap().uid, 1002, "checked a moment ago");
        again.recheck = std::time::Duration::ZERO;
        assert!(matches!(
            again.identity("dave"),
            Err(UserError::Collision { uid: 1002, .. })
        ));
    }

    #[test]
    fn range_must_exclude_root() {
        let f = Fixture::new("");
        assert!(matches!(f.users(0..=10), Err(UserError::BadRange { .. })));
    }

    #[test]
    fn directories_are_created_owned_and_private() {
        if !crate::privileged("creates root-owned state and chowns to worker uids") {
            return;
        }
        let f = Fixture::new("");
        let users = f.users(300_000..=300_010).unwrap();
        let dirs = users.prepare("alice", "base", "demo").unwrap();
        let state = f.dir.path().join("state");
        assert_eq!(dirs.home, state.join("users/alice/profiles/base/home"));
        assert_eq!(dirs.workspace, state.join("users/alice/profiles/base/workspace/demo"));
        for p in [state.join("users/alice"), dirs.home.clone(), dirs.workspace.clone()] {
            let m = std::fs::metadata(&p).unwrap();
            assert_eq!(
                (m.uid(), m.gid(), m.mode() & 0o7777),
                (300_000, 300_000, 0o700),
                "{}",
                p.display()
            );
        }
        let users_dir = std::fs::metadata(state.join("users")).unwrap();
        assert_eq!((users_dir.uid(), users_dir.mode() & 0o777), (0, 0o700));
        assert_eq!(users.prepare("alice", "base", "demo").unwrap(), dirs, "idempotent");
        // What is already right is left untouched (no inode change for the
        // journal on every spawn); what is not is made right again.
        let ctime = |p: &Path| std::fs::metadata(p).unwrap().ctime_nsec();
        let before = ctime(&dirs.workspace);
        std::thread::sleep(std::time::Duration::from_millis(20));
        users.prepare("alice", "base", "demo").unwrap();
        assert_eq!(
            ctime(&dirs.workspace),
            before,
            "an unchanged directory is not chowned again"
        );
        std::os::unix::fs::chown(&dirs.home, Some(0), Some(0)).unwrap();
        std::fs::set_permissions(&dirs.workspace, std::fs::Permissions::from_mode(0o755)).unwrap();
        users.prepare("alice", "base", "demo").unwrap();
        for p in [&dirs.home, &dirs.workspace] {
            let m = std::fs::metadata(p).unwrap();
            assert_eq!(
                (m.uid(), m.gid(), m.mode() & 0o7777),
                (300_000, 300_000, 0o700),
                "{}",
                p.display()
            );
        }
        assert!(matches!(users.prepare("alice", "base", ".."), Err(UserError::Name(_))));
        assert!(matches!(users.prepare("alice", "base", "a/b"), Err(UserError::Name(_))));
        assert!(matches!(
            users.prepare("alice", "../x", "demo"),
            Err(UserError::Name(_))
        ));
        // Another profile: another home and workspace, nothing shared.
        let other = users.prepare("alice", "offline", "demo").unwrap();
        assert_eq!(other.home, state.join("users/alice/profiles/offline/home"));
        assert_ne!(other.workspace, dirs.workspace);
    }

    #[test]
    fn a_planted_symlink_is_an_error_not_a_chown_of_its_target() {
        if !crate::privileged("creates root-owned state and chowns to worker uids") {
            return;
        }
        let f = Fixture::new("");
        let users = f.users(300_000..=300_010).unwrap();
        users.prepare("alice", "base", "demo").unwrap();
        let victim = f.dir.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        let ws = f.dir.path().join("state/users/alice/profiles/base/workspace");
        // The user (who owns workspace/) replaces a project dir with a link.
        std::os::unix::fs::symlink(&victim, ws.join("evil")).unwrap();
        let e = users.prepare("alice", "base", "evil").unwrap_err();
        assert!(matches!(e, UserError::NotADirectory { .. }), "{e}");
        assert_eq!(std::fs::metadata(&victim).unwrap().uid(), 0, "target untouched");
        // Higher up too: home replaced by a link.
        std::fs::remove_dir(f.dir.path().join("state/users/alice/profiles/base/home")).unwrap();
        std::os::unix::fs::symlink(&victim, f.dir.path().join("state/users/alice/profiles/base/home")).unwrap();
        assert!(matches!(
            users.prepare("alice", "base", "demo"),
            Err(UserError::NotADirectory { .. })
        ));
        assert_eq!(std::fs::metadata(&victim).unwrap().uid(), 0);
    }

    #[test]
    fn a_world_writable_state_dir_is_refused() {
        if !crate::privileged("creates root-owned state and chowns to worker uids") {
            return;
        }
        let f = Fixture::new("");
        let state = f.dir.path().join("state");
        std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        assert!(matches!(
            f.users(300_000..=300_010),
            Err(UserError::UnsafeStateDir { .. })
        ));
    }

    #[test]
    fn ids_the_account_database_knows_are_skipped() {
        // 65534 (nobody, nogroup) is not in these files, but NSS knows it.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("passwd"), "").unwrap();
        std::fs::write(dir.path().join("group"), "").unwrap();
        std::fs::create_dir(dir.path().join("state")).unwrap();
        let mut users = Users::open_with(
            &dir.path().join("state"),
            65534..=65535,
            &dir.path().join("passwd"),
            &dir.path().join("group"),
        )
        .unwrap();
        users.nss = true;
        assert_eq!(users.identity("carol").unwrap().uid, 65535);
    }

    #[test]
    fn subordinate_ranges_that_overlap_the_workers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("subuid");
        let range = 200_000..=299_999;
        // Debian's useradd: the second and third accounts land in the range.
        std::fs::write(&file, "alice:100000:65536\nbob:165536:65536\ncarol:231072:65536\n").unwrap();
        let e = check_subordinate(&range, &file).unwrap_err().to_string();
        assert!(
            e.contains(":2: the subordinate ids of \"bob\" (165536-231071) overlap"),
            "{e}"
        );
        // Around it, and warden's own reservation, are fine.
        std::fs::write(&file, "alice:100000:65536\nwarden:200000:100000\ndave:300000:65536\n").unwrap();
        assert!(check_subordinate(&range, &file).unwrap());
        std::fs::write(&file, "alice:100000:65536\n").unwrap();
        assert!(!check_subordinate(&range, &file).unwrap());
        assert!(!check_subordinate(&range, &dir.path().join("none")).unwrap());
    }
}
