//! The daemon's only unsafe code: adopting fds received over SCM_RIGHTS or
//! passed by systemd, opening a pidfd, and handing freed memory back to
//! the kernel. Each block is as small as possible.

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

/// A pidfd of the daemon's child `pid` (readable once it has exited).
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new
    // descriptor or -1; it reads and writes no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just created this descriptor for us; nothing else
    // in the process knows or owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits for the daemon's child to exit without holding a thread: on its
/// pidfd, then reaps it (at once: it has exited). Falls back to a thread of
/// the blocking pool where pidfds are missing (Linux before 5.3).
pub async fn wait_child(mut child: std::process::Child) -> std::io::Result<std::process::ExitStatus> {
    if let Ok(fd) = pidfd_open(child.id()) {
        // SAFETY: an OwnedFd is open for as long as it lives and always
        // gives the same descriptor; the AsyncFd owns it.
        let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
        if let Ok(fd) = registered {
            let _ = fd.readable().await;
            return child.wait();
        }
    }
    tokio::task::spawn_blocking(move || child.wait())
        .await
        .map_err(std::io::Error::other)?
}
