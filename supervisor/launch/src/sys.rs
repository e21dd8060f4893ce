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

/// Moves descriptor `fd` to number `to`, close-on-exec, and returns it owned.
pub fn adopt_fd_as(fd: RawFd, to: RawFd) -> Result<std::fs::File, Errno> {
    if fd != to {
        // SAFETY: dup3 only manipulates the descriptor table; `to` is free or
        // a descriptor the launcher does not use (it closes all others later).
        check(libc::c_long::from(unsafe { libc::dup3(fd, to, libc::O_CLOEXEC) }))?;
        // SAFETY: `fd` was handed to us and is replaced by `to`.
        unsafe { libc::close(fd) };
    } else {
        // SAFETY: F_SETFD on a descriptor we were handed.
        check(libc::c_long::from(unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC)
        }))?;
    }
    // SAFETY: `to` is now a valid descriptor owned only by the returned File.
    Ok(unsafe { std::fs::File::from_raw_fd(to) })
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
