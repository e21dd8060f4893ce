//! The few system calls that neither nix nor the landlock crate wrap, each
//! as a small safe function. All unsafe code of the launcher is here.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;

fn cstr(p: &Path) -> Result<CString, Errno> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| Errno::EINVAL)
}

fn check(ret: libc::c_long) -> Result<libc::c_long, Errno> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

/// Closes every fd from `from` upwards.
pub fn close_from(from: u32) -> Result<(), Errno> {
    // SAFETY: close_range only closes descriptors; the caller owns nothing
    // above `from` that it still uses (it kept its fds below it).
    check(unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32) }).map(drop)
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A detached copy of the mount tree at `fd` (a bind mount not yet attached
/// anywhere), recursive.
pub fn clone_tree(fd: &OwnedFd) -> Result<OwnedFd, Errno> {
    let empty = c"";
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE | libc::AT_EMPTY_PATH as libc::c_uint;
    // SAFETY: `fd` is a valid open descriptor and `empty` a valid C string;
    // on success the kernel returns a new descriptor that we own.
    let ret = check(unsafe { libc::syscall(libc::SYS_open_tree, fd.as_raw_fd(), empty.as_ptr(), flags) })?;
    let raw = RawFd::try_from(ret).map_err(|_| Errno::EBADF)?;
    // SAFETY: ret is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sets mount attributes on a whole detached tree.
pub fn set_tree_attrs(tree: &OwnedFd, set: u64, clear: u64) -> Result<(), Errno> {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    let empty = c"";
    // SAFETY: valid fd, valid C string, and `attr` outlives the call with the
    // size we pass.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// Attaches a detached tree at `target`.
pub fn attach_tree(tree: &OwnedFd, target: &Path) -> Result<(), Errno> {
    let target = cstr(target)?;
    let empty = c"";
    // SAFETY: valid fd and C strings for the duration of the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// The landlock ABI the running kernel offers (0 when landlock is off).
pub fn landlock_abi() -> u32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a NULL attribute and size 0 this call only queries the
    // ABI version; it touches no memory.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(ret).unwrap_or(0)
}

/// Installs a seccomp filter on the calling thread (no_new_privs must be
/// set) with a new user-notification listener, which is returned: the
/// filter hands denied calls to it, for the daemon to answer (with EPERM)
/// and report.
pub fn install_seccomp(program: &[(u16, u8, u8, u32)]) -> Result<OwnedFd, Errno> {
    let filter: Vec<libc::sock_filter> = program
        .iter()
        .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
        .collect();
    let flags = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER;
    let prog = libc::sock_fprog {
        len: u16::try_from(filter.len()).map_err(|_| Errno::E2BIG)?,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `filter`, which outlives the call; the kernel
    // copies the program.
    let ret = check(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &prog as *const libc::sock_fprog,
        )
    })?;
    let raw = RawFd::try_from(ret).map_err(|_| Errno::EBADF)?;
    // SAFETY: with NEW_LISTENER the return value is a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Writes `data` on the report socket with `fds` attached (SCM_RIGHTS).
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> Result<(), Errno> {
    let iov = [std::io::IoSlice::new(data)];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(fds)];
    nix::sys::socket::sendmsg::<()>(sock, &iov, &cmsg, nix::sys::socket::MsgFlags::empty(), None).map(drop)
}

/// A listening TCP socket on 127.0.0.1:`port` of the current network
/// namespace (close-on-exec).
pub fn listen_loopback(port: u16) -> Result<OwnedFd, Errno> {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn};
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port))?;
    listen(&fd, Backlog::new(128)?)?;
    Ok(fd)
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> Result<(), Errno> {
    // SAFETY: socket() has no memory arguments; we own the returned fd.
    let fd = check(libc::c_long::from(unsafe {
        libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
    }))?;
    let raw = RawFd::try_from(fd).map_err(|_| Errno::EBADF)?;
    // SAFETY: fresh descriptor, owned here.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes ifru_flags of `req`.
    check(libc::c_long::from(unsafe {
        libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req)
    }))?;
    // IFF_UP is 1: it fits the short the kernel keeps flags in.
    let up = libc::c_short::try_from(libc::IFF_UP).map_err(|_| Errno::EINVAL)?;
    // SAFETY: reading and writing the flags member the kernel just filled.
    unsafe { req.ifr_ifru.ifru_flags |= up };
    // SAFETY: as above; the kernel reads `req`.
    check(libc::c_long::from(unsafe {
        libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req)
    }))
    .map(drop)
}

/// Resets every signal disposition to default (ignored signals survive exec
/// otherwise, and Rust ignores SIGPIPE).
pub fn reset_signal_dispositions() {
    for sig in 1..32 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL is always sound.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
}

/// Takes ownership of descriptor `fd`, handed to this process by whoever
/// started it, and makes it close-on-exec.
pub fn adopt_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: F_SETFD on a descriptor we were handed; an invalid one fails
    // here and again at its first use, with EBADF.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the descriptor was passed to this process for it alone.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The listening socket systemd passed (socket activation: `LISTEN_PID`
/// is this process and `LISTEN_FDS` at least 1; the socket is fd 3).
pub fn activated_socket() -> Option<OwnedFd> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let n: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || n < 1 {
        return None;
    }
    Some(adopt_fd(3))
}

/// Moves the descriptors `fds` to 0, 1, 2, ... in order (whatever numbers
/// they have now, also numbers among the targets), the first `keep_open`
/// of them inheritable across exec and the rest close-on-exec. Used in
/// the server's child, which owns every descriptor it holds.
pub fn place_fds(fds: &[RawFd], keep_open: usize) -> Result<(), Errno> {
    const ABOVE: RawFd = 64;
    let mut high = Vec::with_capacity(fds.len());
    for &fd in fds {
        // SAFETY: F_DUPFD only duplicates a descriptor we own, onto a free
        // number at or above ABOVE.
        high.push(
            RawFd::try_from(check(libc::c_long::from(unsafe {
                libc::fcntl(fd, libc::F_DUPFD, ABOVE)
            }))?)
            .map_err(|_| Errno::EBADF)?,
        );
    }
    for (target, &fd) in high.iter().enumerate() {
        let target = RawFd::try_from(target).map_err(|_| Errno::EBADF)?;
        let flags = if usize::try_from(target).unwrap_or(usize::MAX) < keep_open {
            0
        } else {
            libc::O_CLOEXEC
        };
        // SAFETY: dup3 replaces `target` (one of the originals, or a number
        // this process owns and no longer uses) with a copy of `fd`.
        check(libc::c_long::from(unsafe { libc::dup3(fd, target, flags) }))?;
    }
    for fd in high {
        // SAFETY: the high copies are ours and used no more.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// The report socket at `fd`, in the server's child before its
/// descriptors are in place (it owns every descriptor it holds).
pub fn file_of(fd: RawFd) -> std::fs::File {
    // SAFETY: the clone's child owns `fd`, handed to it in the request, and
    // nothing else in it uses the number from here on: it exits next.
    unsafe { std::fs::File::from_raw_fd(fd) }
}

/// Moves the calling thread into the cgroup of directory `dir`: through
/// `tasks` (cgroup v1), else `cgroup.procs`, writing "0" (the writer).
pub fn join_cgroup(dir: &OwnedFd) -> Result<(), Errno> {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::Mode;
    let flags = OFlag::O_WRONLY | OFlag::O_CLOEXEC;
    let file = match openat(dir, "tasks", flags, Mode::empty()) {
        Err(Errno::ENOENT) => openat(dir, "cgroup.procs", flags, Mode::empty())?,
        other => other?,
    };
    nix::unistd::write(&file, b"0").map(drop)
}

/// The process a [`clone_init`] made, seen from either side.
pub enum Cloned {
    /// In the child: `in_cgroup` says whether it was created in the
    /// requested cgroup (CLONE_INTO_CGROUP) or must join it itself.
    Child {
        in_cgroup: bool,
    },
    Parent {
        pid: i32,
        pidfd: OwnedFd,
    },
}

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` of `<linux/sched.h>` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Creates a child process, like fork(2), in the new namespaces `flags`
/// (CLONE_NEW*), with a pidfd, and (with `cgroup`, a cgroup v2 directory)
/// created straight in that cgroup. Where clone3 or CLONE_INTO_CGROUP is
/// refused, the legacy clone(2) without a cgroup: the child joins it
/// itself. Only for a single-threaded caller, as fork.
pub fn clone_init(flags: u64, cgroup: Option<RawFd>) -> Result<Cloned, Errno> {
    let exit_signal = u64::try_from(libc::SIGCHLD).map_err(|_| Errno::EINVAL)?;
    let mut pidfd: libc::c_int = -1;
    if let Some(dir) = cgroup {
        let mut args = CloneArgs {
            flags: flags | CLONE_PIDFD | CLONE_INTO_CGROUP,
            pidfd: &mut pidfd as *mut libc::c_int as u64,
            exit_signal,
            cgroup: u64::try_from(dir).map_err(|_| Errno::EBADF)?,
            ..CloneArgs::default()
        };
        // SAFETY: clone3 without CLONE_VM and without a stack duplicates the
        // calling process as fork(2) does; the caller is single-threaded, so
        // the child may go on running Rust code. `args` and `pidfd` outlive
        // the call, and the size passed is that of `args`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut args as *mut CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        match ret {
            0 => return Ok(Cloned::Child { in_cgroup: true }),
            pid if pid > 0 => return parent(pid, pidfd),
            _ => match Errno::last() {
                // No clone3 (a kernel before 5.7, or a filter that hides it),
                // or a cgroup this kernel will not clone into: join by hand.
                Errno::ENOSYS | Errno::E2BIG | Errno::EINVAL | Errno::EOPNOTSUPP | Errno::EPERM => {}
                e => return Err(e),
            },
        }
    }
    // SAFETY: clone(2) with a null stack and no CLONE_VM is fork(2) with
    // flags; the caller is single-threaded. The kernel writes the pidfd
    // (CLONE_PIDFD) through the parent_tid argument, which points at
    // `pidfd`; the child and tls arguments are unused.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags | CLONE_PIDFD | exit_signal,
            0usize,
            &mut pidfd as *mut libc::c_int,
            0usize,
            0usize,
        )
    };
    match ret {
        0 => Ok(Cloned::Child { in_cgroup: false }),
        pid if pid > 0 => parent(pid, pidfd),
        _ => Err(Errno::last()),
    }
}

fn parent(pid: libc::c_long, pidfd: libc::c_int) -> Result<Cloned, Errno> {
    let pid = i32::try_from(pid).map_err(|_| Errno::ESRCH)?;
    // SAFETY: the kernel created this pidfd for us in the clone call.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Cloned::Parent { pid, pidfd })
}

/// One pending notification: a process of the worker waits in a denied call.
#[derive(Debug, Clone, Copy)]
pub struct Notification {
    pub id: u64,
    pub pid: u32,
    pub nr: i32,
    pub arch: u32,
}

/// Takes the next notification (the listener must be readable, or this
/// blocks). Errors when the filter is gone or the caller died (ENOENT).
pub fn notif_recv(listener: &OwnedFd) -> Result<Notification, Errno> {
    // SAFETY: seccomp_notif is plain data; the kernel requires it zeroed.
    let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: the ioctl writes one seccomp_notif into `n`, which we own.
    let ret = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut n) };
    if ret < 0 {
        return Err(Errno::last());
    }
    Ok(Notification {
        id: n.id,
        pid: n.pid,
        nr: n.data.nr,
        arch: n.data.arch,
    })
}

/// Answers a notification: the call fails with `errno`.
pub fn notif_fail(listener: &OwnedFd, id: u64, errno: i32) -> Result<(), Errno> {
    let resp = libc::seccomp_notif_resp {
        id,
        val: 0,
        error: -errno,
        flags: 0,
    };
    // SAFETY: the ioctl reads one seccomp_notif_resp from `resp`.
    let ret = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &resp) };
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// Receives one descriptor sent with [`send_with_fds`] on `sock`; None at
/// EOF (the sender went away without sending).
pub fn recv_fd(sock: RawFd) -> Result<Option<OwnedFd>, Errno> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut buf = [0u8; 16];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        let mut got = None;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: the kernel installed this descriptor for us
                    // in recvmsg; nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    got.get_or_insert(owned);
                }
            }
        }
        return Ok(got);
    }
}
