//! The init of the worker's PID namespace: builds the sandbox in one
//! straight-line function ([`setup`]), in the order DESIGN.md gives, then
//! forks and execs the worker and stays as its reaper.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use nix::errno::Errno;
use nix::fcntl::{open, openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::stat::Mode;
use nix::unistd::pipe2;
use nix::unistd::{
    chdir, execve, fork, pivot_root, setgroups, sethostname, setresgid, setresuid, setsid, ForkResult, Gid, Pid, Uid,
};
use warden_policy::{Bucket, Enforced, LaunchReport, LaunchSpec, Mark, MAX_LANDLOCK_ABI};

use crate::denials::Denials;
use crate::sys;

/// The steps of the setup, in order; a failure names the one that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Spec,
    Fds,
    Cgroup,
    Namespaces,
    Root,
    Hostname,
    Mounts,
    Network,
    Rlimits,
    Identity,
    Capabilities,
    NoNewPrivs,
    Landlock,
    Command,
    Seccomp,
    Spawn,
    Exec,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Spec => "spec",
            Stage::Fds => "fds",
            Stage::Cgroup => "cgroup",
            Stage::Namespaces => "namespaces",
            Stage::Root => "root",
            Stage::Hostname => "hostname",
            Stage::Mounts => "mounts",
            Stage::Network => "network",
            Stage::Rlimits => "rlimits",
            Stage::Identity => "identity",
            Stage::Capabilities => "capabilities",
            Stage::NoNewPrivs => "no_new_privs",
            Stage::Landlock => "landlock",
            Stage::Command => "command",
            Stage::Seccomp => "seccomp",
            Stage::Spawn => "spawn",
            Stage::Exec => "exec",
        }
    }
}

/// A failed setup step: which, the errno, and what was being done to what.
#[derive(Debug)]
pub struct SetupError {
    pub stage: Stage,
    pub errno: Errno,
    pub message: String,
}

impl SetupError {
    pub fn new(stage: Stage, errno: Errno, message: impl Into<String>) -> Self {
        SetupError {
            stage,
            errno,
            message: message.into(),
        }
    }

    /// An I/O error: its errno; EINVAL for data that is not what it must
    /// be (a spec frame past its size), EIO for anything else without one.
    pub fn io(stage: Stage, e: &std::io::Error, message: impl Into<String>) -> Self {
        let errno = Errno::from_raw(e.raw_os_error().unwrap_or(match e.kind() {
            std::io::ErrorKind::InvalidData => libc::EINVAL,
            _ => libc::EIO,
        }));
        Self::new(stage, errno, format!("{}: {e}", message.into()))
    }
}

/// Shorthand for mapping a nix result to a setup error.
trait At<T> {
    fn at(self, stage: Stage, what: impl FnOnce() -> String) -> Result<T, SetupError>;
}

impl<T> At<T> for nix::Result<T> {
    fn at(self, stage: Stage, what: impl FnOnce() -> String) -> Result<T, SetupError> {
        self.map_err(|e| SetupError::new(stage, e, what()))
    }
}

impl<T> At<T> for std::io::Result<T> {
    fn at(self, stage: Stage, what: impl FnOnce() -> String) -> Result<T, SetupError> {
        self.map_err(|e| SetupError::io(stage, &e, what()))
    }
}

/// Where the host's root is while the new root is assembled.
const OLD: &str = "/oldroot";
/// Where the new root is assembled.
const NEW: &str = "/newroot";

/// What [`prepare_root`] built: the mount namespace, for the daemon.
pub struct Root {
    mount_ns: OwnedFd,
}

/// Runs as PID 1 of the new PID namespace. Never returns.
pub fn init(mut spec: LaunchSpec, mut report: File, marks: Vec<Mark>, root: Root, command: File) -> ! {
    let worker = match setup(&mut spec, &mut report, marks, root, command) {
        Ok(w) => w,
        Err(e) => crate::fail(&mut report, &e, crate::EXIT_SETUP_FAILED),
    };
    // The worker (or its failed exec) holds the other end of the report now.
    drop(report);
    let timeout = spec.timeout_secs.map(Duration::from_secs);
    crate::exit_with_status(crate::supervise(worker.pid, timeout, Some(worker.denials)))
}

/// Builds what every sandbox has, whatever its spec: a private mount tree
/// whose root is a scratch tmpfs (the host's root under OLD), an empty new
/// root at NEW with a fresh /proc of this PID namespace and a minimal /dev
/// (all but /dev/shm), and the namespace's loopback up. A warm init does
/// this before its spawn.
pub fn prepare_root(marks: &mut Vec<Mark>) -> Result<Root, SetupError> {
    // The worker's mount namespace, for the daemon to hold: when the worker
    // ends, the namespace (every mount of its sandbox) is torn down when
    // the daemon lets it go, after the exit is reported, not on the way.
    let mount_ns = open("/proc/self/ns/mnt", OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .at(Stage::Mounts, || "Cannot open the mount namespace".into())?;

    // Nothing we mount may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .at(Stage::Mounts, || "Cannot make / private".into())?;
    // A scratch tmpfs (over /tmp, in this namespace only) becomes the root for
    // a moment; the host root stays reachable under OLD until the end.
    let scratch = "/tmp";
    mount(
        Some("tmpfs"),
        scratch,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=1m,mode=0700"),
    )
    .at(Stage::Mounts, || "Cannot mount the scratch tmpfs".into())?;
    for d in ["oldroot", "newroot"] {
        std::fs::create_dir(format!("{scratch}/{d}")).at(Stage::Mounts, || format!("Cannot create {scratch}/{d}"))?;
    }
    pivot_root(scratch, &format!("{scratch}/oldroot")[..])
        .at(Stage::Mounts, || "Cannot pivot into the scratch tmpfs".into())?;
    chdir("/").at(Stage::Mounts, || "Cannot chdir to /".into())?;
    mount(
        Some("tmpfs"),
        NEW,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=1m,mode=0755"),
    )
    .at(Stage::Mounts, || format!("Cannot mount the new root tmpfs at {NEW}"))?;

    // A fresh /proc of this PID namespace: no host process is visible.
    make_dir(&new_path("/proc"))?;
    mount(
        Some("proc"),
        &new_path("/proc"),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .at(Stage::Mounts, || "Cannot mount /proc".into())?;

    // A minimal /dev (its /dev/shm, sized by the spec, comes later).
    build_dev()?;

    // The namespace's loopback (wardend's listeners on it come with the spec).
    sys::loopback_up().map_err(|e| SetupError::new(Stage::Network, e, "Cannot bring up the loopback interface"))?;
    marks.push(crate::mark(Stage::Root));
    Ok(Root { mount_ns })
}

/// Builds the rest of the sandbox around this process, by its spec, then
/// forks and execs the worker. Each step is here, in the order it happens;
/// returns the worker, whose denied calls the init answers.
fn setup(
    spec: &mut LaunchSpec,
    report: &mut File,
    mut marks: Vec<Mark>,
    root: Root,
    mut command: File,
) -> Result<Started, SetupError> {
    let Root { mount_ns } = root;
    sethostname(&spec.hostname).at(Stage::Hostname, || format!("Cannot set hostname {}", spec.hostname))?;

    // --- Mount namespace: a new root that holds only what the spec lists. ---
    // Host paths: the user's own directories (never through a symlink) and
    // every profile path, read-only unless the profile grants write.
    for bind in &spec.binds {
        bind_host_path(&bind.source, &bind.target, bind.access, bind.required)?;
    }

    // /sys shows the host's whole cgroup tree (other tenants' workers,
    // their memory and CPU): where a profile grants /sys, cover it and show
    // only this worker's own cgroup, where runtimes read their limits.
    own_cgroups(&spec.cgroup_procs)?;

    // /dev/shm, as large as /tmp.
    let shm = new_path("/dev/shm");
    mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("size={},mode=1777", spec.tmp_size).as_str()),
    )
    .at(Stage::Mounts, || "Cannot mount /dev/shm".into())?;

    // A private, size-limited /tmp.
    let tmp = new_path("/tmp");
    make_dir(&tmp)?;
    let tmp_exec = spec.landlock.rules.iter().any(|r| r.path == "/tmp" && r.access.exec);
    let mut tmp_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !tmp_exec {
        tmp_flags |= MsFlags::MS_NOEXEC;
    }
    mount(
        Some("tmpfs"),
        &tmp,
        Some("tmpfs"),
        tmp_flags,
        Some(format!("size={},mode=1777", spec.tmp_size).as_str()),
    )
    .at(Stage::Mounts, || "Cannot mount /tmp".into())?;

    // /etc/passwd and /etc/group naming only root, the worker and nobody;
    // /etc/hosts with only loopback names; /etc/resolv.conf pointing at no
    // resolver. Staged on the scratch tmpfs, bound read-only.
    for (i, file) in spec.files.iter().enumerate() {
        let staged = PathBuf::from(format!("/file-{i}"));
        std::fs::write(&staged, &file.content).at(Stage::Mounts, || format!("Cannot write {}", staged.display()))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o644))
            .at(Stage::Mounts, || format!("Cannot chmod {}", staged.display()))?;
        let target = new_path(&file.path);
        make_mountpoint(&target, false)?;
        bind_tree(
            &staged,
            &target,
            sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV | sys::MOUNT_ATTR_NOEXEC,
        )?;
    }

    // Hidden by construction: /run, /home (but the user's own), /root and
    // warden's state dir are empty or absent. /run exists because programs
    // expect it.
    make_dir(&new_path("/run"))?;

    // --- Network: wardend's listeners on the namespace's loopback.
    // A socket stays in the namespace it was made in: the daemon accepts on
    // these from the host's namespace, and nothing else leaves.
    let listeners = spec
        .listeners
        .iter()
        .map(|l| {
            sys::listen_loopback(l.port).at(Stage::Network, || {
                format!("Cannot listen on 127.0.0.1:{} ({:?})", l.port, l.kind)
            })
        })
        .collect::<Result<Vec<OwnedFd>, SetupError>>()?;
    marks.push(crate::mark(Stage::Network));

    // Switch to the new root and drop the host's root and the scratch tmpfs.
    chdir(NEW).at(Stage::Mounts, || format!("Cannot chdir to {NEW}"))?;
    pivot_root(".", ".").at(Stage::Mounts, || "Cannot pivot into the new root".into())?;
    umount2(".", MntFlags::MNT_DETACH).at(Stage::Mounts, || "Cannot detach the old root".into())?;
    chdir("/").at(Stage::Mounts, || "Cannot chdir to /".into())?;
    // The root directory itself is read-only: a worker creates files only
    // where the profile lets it.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .at(Stage::Mounts, || "Cannot remount / read-only".into())?;
    chdir(spec.cwd.as_str()).at(Stage::Mounts, || format!("Cannot chdir to {}", spec.cwd))?;
    marks.push(crate::mark(Stage::Mounts));

    // --- Resource limits. ---
    for rl in &spec.rlimits {
        let res = rlimit_resource(&rl.name)
            .ok_or_else(|| SetupError::new(Stage::Rlimits, Errno::EINVAL, format!("Unknown rlimit {}", rl.name)))?;
        let v = rl.value.unwrap_or(libc::RLIM_INFINITY);
        setrlimit(res, v, v).at(Stage::Rlimits, || format!("Cannot set rlimit {} to {v}", rl.name))?;
    }

    // --- Identity: the worker's uid/gid, no supplementary groups. ---
    let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));
    if spec.uid == 0 || spec.gid == 0 {
        return Err(SetupError::new(
            Stage::Identity,
            Errno::EPERM,
            "Refusing to run a worker as root",
        ));
    }
    setgroups(&[gid]).at(Stage::Identity, || format!("Cannot set groups to [{gid}]"))?;
    setresgid(gid, gid, gid).at(Stage::Identity, || format!("Cannot set gid {gid}"))?;
    // The bounding set can only be emptied while we still have CAP_SETPCAP.
    caps::clear(None, caps::CapSet::Bounding).map_err(|e| {
        SetupError::new(
            Stage::Capabilities,
            Errno::EPERM,
            format!("Cannot empty the capability bounding set: {e}"),
        )
    })?;
    setresuid(uid, uid, uid).at(Stage::Identity, || format!("Cannot set uid {uid}"))?;
    for set in [
        caps::CapSet::Inheritable,
        caps::CapSet::Ambient,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|e| {
            SetupError::new(
                Stage::Capabilities,
                Errno::EPERM,
                format!("Cannot clear capability set {set:?}: {e}"),
            )
        })?;
    }
    let caps_empty = [
        caps::CapSet::Inheritable,
        caps::CapSet::Ambient,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
        caps::CapSet::Bounding,
    ]
    .into_iter()
    .all(|set| caps::read(None, set).map(|c| c.is_empty()).unwrap_or(false));
    if !caps_empty {
        return Err(SetupError::new(
            Stage::Capabilities,
            Errno::EPERM,
            "A capability set is not empty after dropping privileges",
        ));
    }
    marks.push(crate::mark(Stage::Identity));

    // --- no_new_privs: setuid binaries and file capabilities grant nothing. ---
    nix::sys::prctl::set_no_new_privs().at(Stage::NoNewPrivs, || "Cannot set no_new_privs".into())?;

    // --- Landlock: file system, TCP ports, scoping. Fails closed. ---
    let (landlock_abi, landlock_scoped) = restrict_landlock(spec)?;
    marks.push(crate::mark(Stage::Landlock));

    // --- The command. Everything above is built from the sandbox part of
    // the spec alone; a primed init waits here, as the worker's uid under
    // its landlock rules, until a spawn with the same sandbox part takes
    // it (or the daemon lets it go: EOF). ---
    report
        .write_all(&LaunchReport::Primed.to_line())
        .at(Stage::Command, || "Cannot report the sandbox built".into())?;
    let Some(cmd) = crate::read_command(&mut command)? else {
        std::process::exit(crate::EXIT_SETUP_FAILED);
    };
    drop(command);
    spec.argv = cmd.argv;
    spec.env = cmd.env;
    marks.push(crate::mark(Stage::Command));

    // --- The worker: a child that installs the seccomp filter on itself,
    // last, and hands its listener to us. The init stays outside the
    // filter (it answers the listener: a call of its own that the filter
    // held would wait on itself) but inside everything else.
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)
        .at(Stage::Seccomp, || "Cannot create the listener socket pair".into())?;
    // SAFETY: this process is single-threaded; the child only installs the
    // filter, sends one message and execs.
    #[allow(unsafe_code)]
    let forked = unsafe { fork() };
    let worker = match forked.at(Stage::Spawn, || "Cannot fork the worker".into())? {
        ForkResult::Child => {
            drop(ours);
            drop(listeners);
            let listener = match sys::install_seccomp(&spec.seccomp.program) {
                Ok(l) => l,
                Err(e) => crate::fail(
                    report,
                    &SetupError::new(Stage::Seccomp, e, "Cannot install the seccomp filter"),
                    crate::EXIT_SETUP_FAILED,
                ),
            };
            if let Err(e) = sys::send_with_fds(theirs.as_raw_fd(), b"L", &[listener.as_raw_fd()]) {
                crate::fail(
                    report,
                    &SetupError::new(Stage::Seccomp, e, "Cannot hand the seccomp listener to the init"),
                    crate::EXIT_SETUP_FAILED,
                );
            }
            drop(listener);
            drop(theirs);
            exec_worker(spec, report)
        }
        ForkResult::Parent { child } => child,
    };
    drop(theirs);
    // Nobody may take the listener from us (ptrace, /proc/1/fd, pidfd_getfd
    // all need the init to be dumpable).
    nix::sys::prctl::set_dumpable(false).at(Stage::Seccomp, || "Cannot make the init non-dumpable".into())?;
    // No listener: the child failed before sending it, and reported why.
    let listener = match sys::recv_fd(ours.as_raw_fd()) {
        Ok(Some(l)) => l,
        _ => {
            let _ = nix::sys::wait::waitpid(worker, None);
            std::process::exit(crate::EXIT_SETUP_FAILED);
        }
    };
    drop(ours);
    marks.push(crate::mark(Stage::Seccomp));

    // Reports of denied calls go to the daemon on a pipe of their own,
    // never blocking the init.
    let (reports_r, reports_w) =
        pipe2(OFlag::O_CLOEXEC).at(Stage::Seccomp, || "Cannot create the denial pipe".into())?;
    nix::fcntl::fcntl(&reports_w, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
        .at(Stage::Seccomp, || "Cannot make the denial pipe non-blocking".into())?;
    let enforced = Enforced {
        landlock_abi,
        landlock_fs: true,
        landlock_tcp: spec.landlock.restrict_tcp,
        landlock_scoped,
        seccomp_filter_len: spec.seccomp.program.len(),
        namespaces: namespaces(),
        no_new_privs: true,
        capabilities_empty: caps_empty,
        uid: spec.uid,
        gid: spec.gid,
        listeners: spec.listeners.iter().map(|l| l.port).collect(),
        marks,
    };
    let line = LaunchReport::Enforced(enforced).to_line();
    // The daemon reads the denial reports, holds the mount namespace and
    // serves the proxy; the worker never sees these descriptors.
    let fds: Vec<std::os::fd::RawFd> = [&reports_r, &mount_ns]
        .into_iter()
        .chain(&listeners)
        .map(AsRawFd::as_raw_fd)
        .collect();
    if let Err(e) = sys::send_with_fds(report.as_raw_fd(), &line, &fds) {
        let _ = nix::sys::signal::kill(worker, Signal::SIGKILL);
        return Err(SetupError::new(
            Stage::Seccomp,
            e,
            "Cannot hand the denial pipe and network listeners to the daemon",
        ));
    }
    drop((reports_r, mount_ns));
    drop(listeners);
    let limit = Bucket::new(spec.seccomp.report_rate());
    Ok(Started {
        pid: worker,
        denials: Denials::new(listener, File::from(reports_w), limit),
    })
}

/// The worker, as the init supervises it.
pub struct Started {
    pub pid: Pid,
    pub denials: Denials,
}

fn new_path(p: &str) -> PathBuf {
    PathBuf::from(format!("{NEW}{p}"))
}

fn make_dir(p: &Path) -> Result<(), SetupError> {
    match std::fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(SetupError::io(
            Stage::Mounts,
            &e,
            format!("Cannot create {}", p.display()),
        )),
    }
}

/// Creates the directories leading to `target` and the mountpoint itself
/// (a directory, or an empty file for a file bind).
fn make_mountpoint(target: &Path, dir: bool) -> Result<(), SetupError> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).at(Stage::Mounts, || format!("Cannot create {}", parent.display()))?;
    }
    if target.symlink_metadata().is_ok() {
        return Ok(());
    }
    if dir {
        make_dir(target)
    } else {
        File::create(target)
            .map(drop)
            .at(Stage::Mounts, || format!("Cannot create {}", target.display()))
    }
}

/// Mounts a detached copy of `source` at `target` with `attrs` (recursive).
/// Covers `/sys/fs/cgroup` inside (when the profile shows `/sys`) with
/// the worker's own cgroups only, read-only: on cgroup v2 a cgroup2 file
/// system of its cgroup namespace (rooted at its cgroup), on v1 a tmpfs
/// holding each controller's directory at `/sys/fs/cgroup/<controller>`.
fn own_cgroups(cgroup_procs: &[PathBuf]) -> Result<(), SetupError> {
    const CGROUPFS: &str = "/sys/fs/cgroup";
    let inside = new_path(CGROUPFS);
    if !inside.is_dir() {
        return Ok(());
    }
    let ro = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    // Covered first in both layouts: the kernel will not mount a cgroup2
    // file system straight over the host's (EBUSY, found by the VM tier).
    mount(Some("tmpfs"), &inside, Some("tmpfs"), ro, Some("size=64k,mode=0555"))
        .at(Stage::Mounts, || format!("Cannot cover {CGROUPFS}"))?;
    let attrs = sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV | sys::MOUNT_ATTR_NOEXEC;
    let dirs: Vec<&Path> = cgroup_procs.iter().filter_map(|p| p.parent()).collect();
    if let [_one] = dirs.as_slice() {
        // v2: a cgroup2 file system mounted in the worker's cgroup
        // namespace, whose root is the worker's own cgroup.
        mount(
            Some("cgroup2"),
            &inside,
            Some("cgroup2"),
            ro | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .at(Stage::Mounts, || {
            format!("Cannot mount the worker's cgroup at {CGROUPFS}")
        })?;
    } else {
        for dir in dirs {
            let Some(controller) = dir
                .strip_prefix(CGROUPFS)
                .ok()
                .and_then(|rest| rest.components().next())
                .map(|c| c.as_os_str().to_owned())
            else {
                continue;
            };
            let target = inside.join(&controller);
            make_dir(&target)?;
            bind_tree(&PathBuf::from(format!("{OLD}{}", dir.display())), &target, attrs)?;
        }
        mount(
            None::<&str>,
            &inside,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | ro,
            None::<&str>,
        )
        .at(Stage::Mounts, || format!("Cannot make {CGROUPFS} read-only"))?;
    }
    Ok(())
}

fn bind_tree(source: &Path, target: &Path, attrs: u64) -> Result<(), SetupError> {
    let fd: OwnedFd = open(source, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
        .at(Stage::Mounts, || format!("Cannot open {}", source.display()))?;
    bind_fd(&fd, source, target, attrs)
}

fn bind_fd(fd: &OwnedFd, source: &Path, target: &Path, attrs: u64) -> Result<(), SetupError> {
    let tree = sys::clone_tree(fd).at(Stage::Mounts, || {
        format!("Cannot clone the mount at {}", source.display())
    })?;
    sys::set_tree_attrs(&tree, attrs, 0).at(Stage::Mounts, || {
        format!("Cannot set mount attributes on {}", source.display())
    })?;
    sys::attach_tree(&tree, target).at(Stage::Mounts, || {
        format!("Cannot mount {} at {}", source.display(), target.display())
    })
}

/// Makes one host path visible inside. A host symlink is recreated as the
/// same symlink (Debian's /bin -> usr/bin); a missing optional path is
/// skipped; required paths (the user's own directories, files warden
/// provides) are opened without following any symlink, so a planted link
/// cannot redirect the bind.
fn bind_host_path(
    source: &Path,
    target: &str,
    access: warden_policy::Access,
    required: bool,
) -> Result<(), SetupError> {
    let host = PathBuf::from(format!("{OLD}{}", source.display()));
    let inside = new_path(target);
    let fd: OwnedFd = if required {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        open_no_symlinks(&host, how).at(Stage::Mounts, || {
            format!("Cannot open {} without following symlinks", source.display())
        })?
    } else {
        match std::fs::symlink_metadata(&host) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(SetupError::io(
                    Stage::Mounts,
                    &e,
                    format!("Cannot stat {}", source.display()),
                ))
            }
            Ok(m) if m.file_type().is_symlink() => {
                let link =
                    std::fs::read_link(&host).at(Stage::Mounts, || format!("Cannot read link {}", source.display()))?;
                if let Some(parent) = inside.parent() {
                    std::fs::create_dir_all(parent)
                        .at(Stage::Mounts, || format!("Cannot create {}", parent.display()))?;
                }
                if inside.symlink_metadata().is_err() {
                    symlink(&link, &inside).at(Stage::Mounts, || format!("Cannot create symlink {target}"))?;
                }
                return Ok(());
            }
            Ok(_) => open(
                &host,
                OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
                Mode::empty(),
            )
            .at(Stage::Mounts, || format!("Cannot open {}", source.display()))?,
        }
    };
    let is_dir = nix::sys::stat::fstat(fd.as_fd())
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
        .unwrap_or(false);
    make_mountpoint(&inside, is_dir)?;
    let mut attrs = sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
    if !access.write {
        attrs |= sys::MOUNT_ATTR_RDONLY;
    }
    if !access.exec {
        attrs |= sys::MOUNT_ATTR_NOEXEC;
    }
    bind_fd(&fd, source, &inside, attrs)
}

/// Opens `path` (absolute) as an O_PATH fd without following any symlink:
/// openat2 with RESOLVE_NO_SYMLINKS, or, where a seccomp filter hides
/// openat2 (systemd's RestrictSUIDSGID= answers it with ENOSYS, and
/// wardend.service sets it), one component at a time with O_NOFOLLOW.
fn open_no_symlinks(path: &Path, how: OpenHow) -> nix::Result<OwnedFd> {
    match openat2(nix::fcntl::AT_FDCWD, path, how) {
        Err(Errno::ENOSYS) => walk_no_symlinks(path),
        other => other,
    }
}

/// The fallback of [`open_no_symlinks`]: from "/", one component at a time.
fn walk_no_symlinks(path: &Path) -> nix::Result<OwnedFd> {
    let mut dir = open(
        "/",
        OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_DIRECTORY,
        Mode::empty(),
    )?;
    let parts: Vec<_> = path.components().skip(1).collect();
    for (i, part) in parts.iter().enumerate() {
        let std::path::Component::Normal(name) = part else {
            return Err(Errno::EINVAL);
        };
        let last = i + 1 == parts.len();
        let mut flags = OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
        if !last {
            flags |= OFlag::O_DIRECTORY;
        }
        let fd = nix::fcntl::openat(&dir, *name, flags, Mode::empty())?;
        // O_PATH|O_NOFOLLOW opens a symlink itself: refuse it, as openat2 would.
        let st = nix::sys::stat::fstat(&fd)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(Errno::ELOOP);
        }
        dir = fd;
    }
    Ok(dir)
}

/// Pseudo-terminals one worker may hold at once (a shell, an editor, a few
/// tmux panes need a handful).
const MAX_PTYS: u32 = 64;

/// /dev with the harmless character devices, a private devpts, and the
/// mountpoint of /dev/shm.
fn build_dev() -> Result<(), SetupError> {
    let dev = new_path("/dev");
    make_dir(&dev)?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=0755"),
    )
    .at(Stage::Mounts, || "Cannot mount /dev".into())?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(node);
        make_mountpoint(&target, false)?;
        bind_tree(
            &PathBuf::from(format!("{OLD}/dev/{node}")),
            &target,
            sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NOEXEC,
        )?;
    }
    let pts = dev.join("pts");
    make_dir(&pts)?;
    // newinstance: the worker's ptys are its own, not the host's. They still
    // come from the host-wide kernel.pty.max (less what it reserves for the
    // host's own instance): at most MAX_PTYS each, so that one worker cannot
    // take every other worker's.
    let options = format!("newinstance,ptmxmode=0666,mode=0620,max={MAX_PTYS}");
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(options.as_str()),
    )
    .at(Stage::Mounts, || "Cannot mount /dev/pts".into())?;
    symlink("pts/ptmx", dev.join("ptmx")).at(Stage::Mounts, || "Cannot create /dev/ptmx".into())?;
    make_dir(&dev.join("shm"))?;
    for (name, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(to, dev.join(name)).at(Stage::Mounts, || format!("Cannot create /dev/{name}"))?;
    }
    mount(
        None::<&str>,
        &dev,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .at(Stage::Mounts, || "Cannot remount /dev read-only".into())
}

fn rlimit_resource(name: &str) -> Option<Resource> {
    Some(match name {
        "as" => Resource::RLIMIT_AS,
        "core" => Resource::RLIMIT_CORE,
        "cpu" => Resource::RLIMIT_CPU,
        "data" => Resource::RLIMIT_DATA,
        "fsize" => Resource::RLIMIT_FSIZE,
        "locks" => Resource::RLIMIT_LOCKS,
        "memlock" => Resource::RLIMIT_MEMLOCK,
        "msgqueue" => Resource::RLIMIT_MSGQUEUE,
        "nice" => Resource::RLIMIT_NICE,
        "nofile" => Resource::RLIMIT_NOFILE,
        "nproc" => Resource::RLIMIT_NPROC,
        "rss" => Resource::RLIMIT_RSS,
        "rtprio" => Resource::RLIMIT_RTPRIO,
        "rttime" => Resource::RLIMIT_RTTIME,
        "sigpending" => Resource::RLIMIT_SIGPENDING,
        "stack" => Resource::RLIMIT_STACK,
        _ => return None,
    })
}

fn namespaces() -> Vec<String> {
    ["mnt", "pid", "ipc", "uts", "cgroup", "net"]
        .iter()
        .map(|s| (*s).to_string())
        .collect()
}

fn abi_of(n: u32) -> ABI {
    match n {
        0 => ABI::Unsupported,
        1 => ABI::V1,
        2 => ABI::V2,
        3 => ABI::V3,
        4 => ABI::V4,
        5 => ABI::V5,
        6 => ABI::V6,
        // MAX_LANDLOCK_ABI: a newer kernel is used at the newest ABI this
        // build knows.
        _ => ABI::V7,
    }
}

/// Applies the landlock rules with every requested feature a hard
/// requirement. Returns the ABI used and whether scoping is on.
fn restrict_landlock(spec: &LaunchSpec) -> Result<(u32, bool), SetupError> {
    let l = &spec.landlock;
    let kernel = sys::landlock_abi();
    if kernel < l.min_abi {
        return Err(SetupError::new(
            Stage::Landlock,
            Errno::EOPNOTSUPP,
            format!(
                "The kernel offers landlock ABI {kernel}; profile {} requires at least {}",
                spec.profile, l.min_abi
            ),
        ));
    }
    let used = kernel.min(MAX_LANDLOCK_ABI);
    let abi = abi_of(used);
    let err =
        |what: &str, e: landlock::RulesetError| SetupError::new(Stage::Landlock, Errno::EINVAL, format!("{what}: {e}"));
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| err("Cannot handle file system accesses", e))?;
    if l.restrict_tcp {
        ruleset = ruleset
            .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)
            .map_err(|e| err("Cannot handle TCP accesses", e))?;
    }
    let scoped = used >= 6;
    if scoped {
        ruleset = ruleset
            .scope(Scope::from_all(abi))
            .map_err(|e| err("Cannot scope signals and abstract sockets", e))?;
    }
    let mut created = ruleset
        .create()
        .map_err(|e| err("Cannot create the landlock ruleset", e))?;
    let write = AccessFs::from_write(abi) & !(AccessFs::MakeChar | AccessFs::MakeBlock);
    for rule in &l.rules {
        let fd = match PathFd::new(&rule.path) {
            Ok(fd) => fd,
            // A profile path missing on this host grants nothing.
            Err(_) if std::fs::symlink_metadata(&rule.path).is_err() => continue,
            Err(e) => {
                return Err(SetupError::new(
                    Stage::Landlock,
                    Errno::EINVAL,
                    format!("Cannot open {}: {e}", rule.path),
                ))
            }
        };
        let mut access: BitFlags<AccessFs> = BitFlags::empty();
        if rule.access.read {
            access |= AccessFs::ReadFile | AccessFs::ReadDir;
        }
        if rule.access.write {
            access |= write;
        }
        if rule.access.exec {
            access |= AccessFs::Execute;
        }
        if !Path::new(&rule.path).is_dir() {
            access &= AccessFs::from_file(abi);
        }
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| err(&format!("Cannot add the landlock rule for {}", rule.path), e))?;
    }
    if l.restrict_tcp {
        for &port in &l.tcp_connect {
            created = created
                .add_rule(NetPort::new(port, AccessNet::ConnectTcp))
                .map_err(|e| err(&format!("Cannot allow TCP connect to port {port}"), e))?;
        }
        for &port in &l.tcp_bind {
            created = created
                .add_rule(NetPort::new(port, AccessNet::BindTcp))
                .map_err(|e| err(&format!("Cannot allow TCP bind to port {port}"), e))?;
        }
    }
    if used >= 7 {
        // Denials after exec (the worker's) go to the kernel audit stream,
        // where wardend reads them when audit is on.
        created = created
            .log_new_exec(true)
            .map_err(|e| err("Cannot ask for landlock denial logging", e))?;
    }
    let status = created
        .restrict_self()
        .map_err(|e| err("Cannot enforce the landlock ruleset", e))?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(SetupError::new(
            Stage::Landlock,
            Errno::EOPNOTSUPP,
            format!("The landlock ruleset is {:?}, not fully enforced", status.ruleset),
        ));
    }
    Ok((used, scoped))
}

/// In the forked child: becomes the worker. Never returns.
fn exec_worker(spec: &LaunchSpec, report: &mut File) -> ! {
    // No controlling terminal shared with anyone outside.
    let _ = setsid();
    sys::reset_signal_dispositions();
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);

    let to_c = |s: &str| CString::new(s).unwrap_or_default();
    let argv: Vec<CString> = spec.argv.iter().map(|a| to_c(a)).collect();
    let envp: Vec<CString> = spec.env.iter().map(|(k, v)| to_c(&format!("{k}={v}"))).collect();
    let program = &spec.argv[0];
    let path_var = spec
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or("/usr/bin:/bin", |(_, v)| v.as_str());
    let candidates: Vec<String> = if program.contains('/') {
        vec![program.clone()]
    } else {
        path_var
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| format!("{d}/{program}"))
            .collect()
    };
    let mut last = Errno::ENOENT;
    for c in &candidates {
        let e = match execve(&to_c(c), &argv, &envp) {
            Err(e) => e,
            Ok(never) => match never {},
        };
        // Keep the most telling error: "permission denied" beats "not found".
        if last == Errno::ENOENT || e == Errno::EACCES {
            last = e;
        }
    }
    let e = SetupError::new(Stage::Exec, last, format!("Cannot execute {program}: {}", last.desc()));
    crate::fail(report, &e, if last == Errno::ENOENT { 127 } else { 126 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openat2_fallback_never_follows_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("file"), "x").unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("link")).unwrap();
        std::os::unix::fs::symlink(real.join("file"), real.join("file-link")).unwrap();

        assert!(walk_no_symlinks(&real).is_ok());
        assert!(walk_no_symlinks(&real.join("file")).is_ok());
        // A symlink in the middle or at the end is refused, as openat2's
        // RESOLVE_NO_SYMLINKS refuses it.
        assert!(matches!(
            walk_no_symlinks(&d.path().join("link/file")),
            Err(Errno::ELOOP | Errno::ENOTDIR)
        ));
        assert_eq!(walk_no_symlinks(&real.join("file-link")).unwrap_err(), Errno::ELOOP);
        assert_eq!(walk_no_symlinks(&real.join("missing")).unwrap_err(), Errno::ENOENT);
        assert_eq!(walk_no_symlinks(&real.join("../real")).unwrap_err(), Errno::EINVAL);
    }
}
