//! The daemon's only unsafe code: adopting fds received over SCM_RIGHTS or
//! passed by systemd, opening a pidfd, handing freed memory back to the
//! kernel, and the project-quota calls (a directory's project id, a
//! project's limit and use). Each block is as small as possible.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

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

/// A pidfd of process `pid` (readable once it has exited).
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

/// Sends `sig` to the process of `pidfd` (never to a process that reused
/// its pid).
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: nix::sys::signal::Signal) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal(2) with a null siginfo and no flags reads
    // and writes no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Waits for a worker's init to end without holding a thread: on its
/// pidfd, then its status.
pub async fn wait_process(mut process: crate::launcher::Process) -> std::process::ExitStatus {
    if let Ok(fd) = process.pidfd().try_clone_to_owned() {
        // SAFETY: an OwnedFd is open for as long as it lives and always
        // gives the same descriptor; the AsyncFd owns it.
        let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
        if let Ok(fd) = registered {
            let _ = fd.readable().await;
            return process.ended();
        }
    }
    tokio::task::spawn_blocking(move || process.wait())
        .await
        .unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(libc::SIGKILL))
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the launcher stamps the ends
/// of its setup stages with.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

/// `struct fsxattr` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// `FS_IOC_FSGETXATTR` and `FS_IOC_FSSETXATTR` (`_IOR`/`_IOW('X', 31/32, struct fsxattr)`).
const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;
/// New files and directories in a directory with this flag get its project id.
const FS_XFLAG_PROJINHERIT: u32 = 0x0000_0200;

fn fsxattr(fd: BorrowedFd<'_>) -> std::io::Result<FsXattr> {
    let mut a = FsXattr::default();
    // SAFETY: FS_IOC_FSGETXATTR writes one struct fsxattr to the pointer,
    // which points at one we own for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FSGETXATTR, &mut a as *mut FsXattr) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(a)
}

/// The project id of the file `fd` is open on.
pub fn project_of(fd: BorrowedFd<'_>) -> std::io::Result<u32> {
    Ok(fsxattr(fd)?.projid)
}

/// Puts the file `fd` is open on in project `id`; a directory also passes
/// the project on to everything created in it.
pub fn set_project(fd: BorrowedFd<'_>, id: u32, dir: bool) -> std::io::Result<()> {
    let mut a = fsxattr(fd)?;
    a.projid = id;
    if dir {
        a.xflags |= FS_XFLAG_PROJINHERIT;
    }
    // SAFETY: FS_IOC_FSSETXATTR reads one struct fsxattr from the pointer,
    // which points at one we own for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FSSETXATTR, &a as *const FsXattr) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `struct if_dqblk` of `<linux/quota.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct IfDqblk {
    bhardlimit: u64,
    bsoftlimit: u64,
    curspace: u64,
    ihardlimit: u64,
    isoftlimit: u64,
    curinodes: u64,
    btime: u64,
    itime: u64,
    valid: u32,
}

/// `struct fs_qfilestatv` and `struct fs_quota_statv` of `<linux/dqblk_xfs.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct FsQfilestatv {
    ino: u64,
    nblks: u64,
    nextents: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct FsQuotaStatv {
    version: i8,
    pad1: u8,
    flags: u16,
    incoredqs: u32,
    uquota: FsQfilestatv,
    gquota: FsQfilestatv,
    pquota: FsQfilestatv,
    btimelimit: i32,
    itimelimit: i32,
    rtbtimelimit: i32,
    bwarnlimit: u16,
    iwarnlimit: u16,
    rtbwarnlimit: u16,
    pad3: u16,
    pad4: u32,
    pad2: [u64; 7],
}

const PRJQUOTA: u32 = 2;
const Q_GETQUOTA: u32 = 0x80_0007;
const Q_SETQUOTA: u32 = 0x80_0008;
/// `XQM_CMD(8)`: the quota state of the file system, any file system.
const Q_XGETQSTATV: u32 = (b'X' as u32) << 8 | 8;
const FS_QSTATV_VERSION1: i8 = 1;
const FS_QUOTA_PDQ_ACCT: u16 = 0x0010;
const FS_QUOTA_PDQ_ENFD: u16 = 0x0020;
/// `dqb_valid`: the block and inode limits are set.
const QIF_LIMITS: u32 = 1 | 4;
/// Quota blocks are 1 KiB (`QIF_DQBLKSIZE`).
const QIF_DQBLKSIZE: u64 = 1024;

/// `quotactl_fd(2)` (Linux 5.14) on project quotas: the file system is the
/// one `fd` is on, no device path needed.
fn quotactl_prj<T>(fd: BorrowedFd<'_>, cmd: u32, id: u32, data: &mut T) -> std::io::Result<()> {
    let qcmd = (cmd << 8) | PRJQUOTA;
    // SAFETY: each command used here reads or writes exactly one `T` (the
    // struct its man page names) at the pointer, which points at one we
    // own for the duration of the call.
    let r = unsafe { libc::syscall(libc::SYS_quotactl_fd, fd.as_raw_fd(), qcmd, id, data as *mut T) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the file system `fd` is on counts (and enforces) project quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectQuotaState {
    pub accounting: bool,
    pub enforcing: bool,
}

pub fn project_quota_state(fd: BorrowedFd<'_>) -> std::io::Result<ProjectQuotaState> {
    let mut s = FsQuotaStatv {
        version: FS_QSTATV_VERSION1,
        ..FsQuotaStatv::default()
    };
    // Q_XGETQSTATV's id is unused; its command takes the type from the
    // struct, but the call still wants a valid one.
    quotactl_prj(fd, Q_XGETQSTATV, 0, &mut s)?;
    Ok(ProjectQuotaState {
        accounting: s.flags & FS_QUOTA_PDQ_ACCT != 0,
        enforcing: s.flags & FS_QUOTA_PDQ_ENFD != 0,
    })
}

/// A project's use and hard limits (0: none).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProjectQuota {
    pub bytes: u64,
    pub files: u64,
    pub bytes_limit: u64,
    pub files_limit: u64,
}

pub fn project_quota(fd: BorrowedFd<'_>, id: u32) -> std::io::Result<ProjectQuota> {
    let mut q = IfDqblk::default();
    quotactl_prj(fd, Q_GETQUOTA, id, &mut q)?;
    Ok(ProjectQuota {
        bytes: q.curspace,
        files: q.curinodes,
        bytes_limit: q.bhardlimit.saturating_mul(QIF_DQBLKSIZE),
        files_limit: q.ihardlimit,
    })
}

/// Sets a project's hard limits (0: none); soft limits are the same, so
/// that no grace period lets it past.
pub fn set_project_quota(fd: BorrowedFd<'_>, id: u32, bytes: u64, files: u64) -> std::io::Result<()> {
    let blocks = bytes.div_ceil(QIF_DQBLKSIZE);
    let mut q = IfDqblk {
        bhardlimit: blocks,
        bsoftlimit: blocks,
        ihardlimit: files,
        isoftlimit: files,
        valid: QIF_LIMITS,
        ..IfDqblk::default()
    };
    quotactl_prj(fd, Q_SETQUOTA, id, &mut q)
}
