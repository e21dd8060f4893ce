//! The daemon's only unsafe code: adopting fds received over SCM_RIGHTS or
//! passed by systemd, and the seccomp user-notification ioctls. Each block
//! is as small as possible.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

/// Takes ownership of an fd the kernel just handed us in SCM_RIGHTS.
pub fn adopt_received_fd(raw: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed this descriptor for us in recvmsg; nothing
    // else in the process knows or owns it.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// The listening socket systemd passed (socket activation), if any.
pub fn activated_socket() -> Option<std::os::unix::net::UnixListener> {
    let fd = sd_notify::listen_fds().ok()?.next()?;
    // SAFETY: systemd passed this descriptor to us (LISTEN_PID matched) and
    // nothing else in the process owns it.
    Some(unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) })
}

/// One pending notification: a worker's process waits in a denied call.
#[derive(Debug, Clone, Copy)]
pub struct Notification {
    pub id: u64,
    pub pid: u32,
    pub nr: i32,
    pub arch: u32,
}

/// Waits for the next notification (blocking). Errors when the filter is
/// gone (every process of the worker exited) or the fd is not a listener.
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
