//! The daemon's only unsafe code: adopting fds received over SCM_RIGHTS or
//! passed by systemd, and handing freed memory back to the kernel. Each
//! block is as small as possible.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

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

/// Gives the memory the allocator holds free back to the kernel, so that
/// after a burst (thousands of workers, a flood of clients) the daemon's
/// RSS is what it uses, not its high-water mark.
pub fn release_free_memory() {
    // SAFETY: malloc_trim(3) only returns free heap pages to the kernel;
    // it has no preconditions and touches no memory the program owns.
    unsafe {
        libc::malloc_trim(0);
    }
}
