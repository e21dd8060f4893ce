//! warden-attack: one attack (or one probe) per invocation, run inside a
//! sandboxed worker by the escape suite. Prints exactly one line
//! `RESULT <value>`: `OK` when the operation succeeded, else the errno name
//! (`EPERM`, `EACCES`, ...), so that tests assert the specific denial.
//!
//! This is deliberately raw libc: each attack is the system call an attacker
//! would make, not a library's idea of it.

#![allow(clippy::print_stdout)]

use std::ffi::CString;
use std::io::Read;

fn errno_name(e: i32) -> String {
    format!("{:?}", nix::errno::Errno::from_raw(e))
}

fn last() -> String {
    errno_name(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// A syscall's result as OK or its errno name.
fn res(ret: libc::c_long) -> String {
    if ret < 0 {
        last()
    } else {
        "OK".into()
    }
}

fn io_res<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "OK".into(),
        Err(e) => errno_name(e.raw_os_error().unwrap_or(0)),
    }
}

fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL in arguments")
}

fn arg(args: &[String], i: usize) -> &str {
    args.get(i).map(String::as_str).unwrap_or_else(|| {
        eprintln!("missing argument {i}");
        std::process::exit(2)
    })
}

fn connect_unix(addr: &[u8]) -> String {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return last();
    }
    // SAFETY: sockaddr_un is plain data.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).expect("AF_UNIX fits sa_family_t");
    for (d, s) in sa.sun_path.iter_mut().zip(addr) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sa_family_t>() + addr.len())
        .expect("a sockaddr_un length fits socklen_t");
    // SAFETY: sa is a valid sockaddr_un of at least `len` bytes.
    res(libc::c_long::from(unsafe {
        libc::connect(fd, (&sa as *const libc::sockaddr_un).cast(), len)
    }))
}

#[allow(clippy::too_many_lines)]
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let what = arg(&args, 1);
    let result: String = match what {
        "read" => io_res(std::fs::File::open(arg(&args, 2)).and_then(|mut f| {
            let mut s = Vec::new();
            f.read_to_end(&mut s)
        })),
        "write" => io_res(std::fs::write(arg(&args, 2), "pwned\n")),
        "list" => io_res(std::fs::read_dir(arg(&args, 2)).and_then(|d| d.collect::<Result<Vec<_>, _>>())),
        "ptrace" => {
            let pid: libc::pid_t = arg(&args, 2).parse().unwrap_or(1);
            // SAFETY: PTRACE_ATTACH takes no pointers.
            res(unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0usize, 0usize) })
        }
        "vm_readv" => {
            let pid: libc::pid_t = arg(&args, 2).parse().unwrap_or(1);
            let mut buf = [0u8; 8];
            let local = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: 8,
            };
            let remote = libc::iovec {
                iov_base: 0x400000 as *mut libc::c_void,
                iov_len: 8,
            };
            // SAFETY: local points at our buffer; the kernel validates remote.
            res(unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) } as libc::c_long)
        }
        "mount" => {
            // SAFETY: valid C strings.
            res(libc::c_long::from(unsafe {
                libc::mount(
                    c("tmpfs").as_ptr(),
                    c("/tmp").as_ptr(),
                    c("tmpfs").as_ptr(),
                    0,
                    std::ptr::null(),
                )
            }))
        }
        "unshare_user" => res(libc::c_long::from(unsafe_unshare(libc::CLONE_NEWUSER))),
        "unshare_mount" => res(libc::c_long::from(unsafe_unshare(libc::CLONE_NEWNS))),
        "clone_newuser" => {
            // The raw clone syscall with a namespace flag: seccomp checks the flags.
            // SAFETY: with a NULL stack, clone behaves like fork; the child exits at once.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
                    0usize,
                    0usize,
                    0usize,
                    0usize,
                )
            };
            if r == 0 {
                // SAFETY: in the child, leave immediately.
                unsafe { libc::_exit(0) };
            }
            res(r)
        }
        "setns" => {
            let fd = match std::fs::File::open("/proc/self/ns/uts") {
                Ok(f) => f,
                Err(e) => return print_result(&io_res::<()>(Err(e))),
            };
            // SAFETY: fd is a valid namespace fd.
            res(libc::c_long::from(unsafe {
                libc::setns(std::os::fd::AsRawFd::as_raw_fd(&fd), 0)
            }))
        }
        "chroot" => {
            // SAFETY: valid C string.
            res(libc::c_long::from(unsafe { libc::chroot(c("/tmp").as_ptr()) }))
        }
        "io_uring_setup" => {
            let mut params = [0u8; 120];
            // SAFETY: params is a zeroed io_uring_params-sized buffer.
            res(unsafe { libc::syscall(libc::SYS_io_uring_setup, 8u32, params.as_mut_ptr()) })
        }
        "io_setup" => {
            // Linux AIO contexts come from a host-wide budget (fs.aio-max-nr).
            let mut ctx: libc::c_ulong = 0;
            // SAFETY: io_setup writes one aio_context_t to the address given.
            res(unsafe { libc::syscall(libc::SYS_io_setup, 128u32, &mut ctx as *mut libc::c_ulong) })
        }
        "bpf" => {
            let mut attr = [0u8; 128];
            // SAFETY: BPF_MAP_CREATE (0) with a zeroed attribute buffer.
            res(unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_mut_ptr(), attr.len()) })
        }
        "perf_event_open" => {
            let mut attr = [0u8; 128];
            attr[4..8].copy_from_slice(&128u32.to_ne_bytes()); // attr.size
                                                               // SAFETY: a zeroed perf_event_attr with its size set.
            res(unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_mut_ptr(), 0, -1, -1, 0) })
        }
        "keyctl" => {
            // SAFETY: KEYCTL_GET_KEYRING_ID (0) of the session keyring (-3).
            res(unsafe { libc::syscall(libc::SYS_keyctl, 0, -3i32, 0) })
        }
        "add_key" => {
            // SAFETY: valid C strings and a 1-byte payload.
            res(unsafe {
                libc::syscall(
                    libc::SYS_add_key,
                    c("user").as_ptr(),
                    c("warden").as_ptr(),
                    c("x").as_ptr(),
                    1usize,
                    -3i32,
                )
            })
        }
        "userfaultfd" => {
            // SAFETY: no pointers.
            res(unsafe { libc::syscall(libc::SYS_userfaultfd, 0) })
        }
        "open_by_handle_at" => {
            let mut handle = [0u8; 136];
            handle[0..4].copy_from_slice(&128u32.to_ne_bytes()); // handle_bytes
                                                                 // SAFETY: a zeroed file_handle with room for its bytes.
            res(unsafe { libc::syscall(libc::SYS_open_by_handle_at, libc::AT_FDCWD, handle.as_mut_ptr(), 0) })
        }
        "ptys" => {
            // Pseudo-terminals come from a host-wide count (kernel.pty.max):
            // opens them until refused; prints how many and why.
            let mut held = Vec::new();
            let why = loop {
                match std::fs::OpenOptions::new().read(true).write(true).open("/dev/ptmx") {
                    Ok(f) => held.push(f),
                    Err(e) => break errno_name(e.raw_os_error().unwrap_or(0)),
                }
                if held.len() >= 100_000 {
                    break "none".to_string();
                }
            };
            format!("{} {why}", held.len())
        }
        "projid" => {
            // Moves a file out of its user's project (disk quota) the three
            // ways an owner can: FS_IOC_FSSETXATTR (project id 0, no
            // inherit flag), FS_IOC_SETFLAGS (the inherit flag cleared) and
            // file_setattr(2) (Linux 6.17). Prints each call's result.
            let path = c(arg(&args, 2));
            // SAFETY: a NUL-terminated path; no other pointers.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                println!("RESULT open {}", last());
                return;
            }
            let mut attr = [0u8; 28];
            // SAFETY: FS_IOC_FSGETXATTR writes a 28-byte struct fsxattr.
            unsafe { libc::ioctl(fd, 0x801c_581f, attr.as_mut_ptr()) };
            attr[12..16].copy_from_slice(&0u32.to_ne_bytes());
            attr[1] &= !0x02; // fsx_xflags: FS_XFLAG_PROJINHERIT (0x200)
                              // SAFETY: FS_IOC_FSSETXATTR reads a 28-byte struct fsxattr.
            let fssetxattr = res(libc::c_long::from(unsafe {
                libc::ioctl(fd, 0x401c_5820, attr.as_ptr())
            }));
            let flags: libc::c_long = 0;
            // SAFETY: FS_IOC_SETFLAGS reads a long.
            let setflags = res(libc::c_long::from(unsafe { libc::ioctl(fd, 0x4008_6602, &flags) }));
            // struct file_attr { u64 fa_xflags; u32 fa_extsize, fa_nextents,
            // fa_projid, fa_cowextsize; }
            let fattr = [0u8; 24];
            let empty = c("");
            // SAFETY: an empty path with AT_EMPTY_PATH names fd; the struct
            // is 24 bytes, as passed.
            let file_setattr = res(unsafe {
                libc::syscall(
                    469,
                    fd,
                    empty.as_ptr(),
                    fattr.as_ptr(),
                    fattr.len(),
                    libc::AT_EMPTY_PATH,
                )
            });
            format!("fssetxattr={fssetxattr} setflags={setflags} file_setattr={file_setattr}")
        }
        "fsize" => {
            // Grows a file to the given size (sparse: no blocks), with
            // SIGXFSZ ignored so that RLIMIT_FSIZE shows as EFBIG.
            // SAFETY: ignoring a signal installs no handler code.
            unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
            let size: u64 = arg(&args, 3).parse().unwrap_or(0);
            io_res(std::fs::File::create(arg(&args, 2)).and_then(|f| f.set_len(size)))
        }
        "tiocsti" => {
            let ch = libc::c_char::from_ne_bytes([b'x']);
            // SAFETY: TIOCSTI reads one char from the pointer.
            res(libc::c_long::from(unsafe { libc::ioctl(0, libc::TIOCSTI, &ch) }))
        }
        "kill" => {
            let pid: libc::pid_t = arg(&args, 2).parse().unwrap_or(1);
            // SAFETY: no pointers.
            res(libc::c_long::from(unsafe { libc::kill(pid, libc::SIGKILL) }))
        }
        "abstract" => {
            let mut name = vec![0u8];
            name.extend_from_slice(arg(&args, 2).as_bytes());
            connect_unix(&name)
        }
        "unix" => connect_unix(arg(&args, 2).as_bytes()),
        "tcp" => {
            let port: u16 = arg(&args, 2).parse().unwrap_or(1);
            io_res(std::net::TcpStream::connect(("127.0.0.1", port)))
        }
        // socket(family, type, protocol), as numbers: MPTCP, SCTP, raw, ICMP...
        "socket" => {
            let n = |i| arg(&args, i).parse::<libc::c_int>().unwrap_or(-1);
            // SAFETY: no pointers.
            let fd = unsafe { libc::socket(n(2), n(3), n(4)) };
            res(libc::c_long::from(fd))
        }
        // TCP Fast Open: data with the SYN, no connect() call.
        "tfo" => {
            let port: u16 = arg(&args, 2).parse().unwrap_or(1);
            // SAFETY: plain socket creation.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            let sa = sockaddr_v4(port);
            let msg = b"x";
            // SAFETY: msg and sa are valid for the lengths given.
            res(unsafe {
                libc::sendto(
                    fd,
                    msg.as_ptr().cast(),
                    msg.len(),
                    libc::MSG_FASTOPEN,
                    (&sa as *const libc::sockaddr_in).cast(),
                    socklen_of::<libc::sockaddr_in>(),
                )
            } as libc::c_long)
        }
        // TCP_FASTOPEN_CONNECT: a connect() that lands with the first send.
        "tfo_connect" => {
            // SAFETY: plain socket creation.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            let one: libc::c_int = 1;
            // SAFETY: `one` is a valid int for the option.
            res(libc::c_long::from(unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_FASTOPEN_CONNECT,
                    (&one as *const libc::c_int).cast(),
                    socklen_of::<libc::c_int>(),
                )
            }))
        }
        // listen() without bind(): the kernel picks a port on every address
        // of the worker's namespace. Writes the port to FILE, then says
        // whether anyone connected within SECS.
        "listen_autobind" => {
            let secs: u64 = arg(&args, 2).parse().unwrap_or(2);
            let file = arg(&args, 3).to_string();
            // SAFETY: plain socket calls on our own descriptor.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
            // SAFETY: as above.
            if unsafe { libc::listen(fd, 8) } < 0 {
                last()
            } else {
                // SAFETY: sockaddr_in is plain data; getsockname fills it.
                let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                let mut len = socklen_of::<libc::sockaddr_in>();
                // SAFETY: sa and len are valid for the call.
                unsafe { libc::getsockname(fd, (&mut sa as *mut libc::sockaddr_in).cast(), &mut len) };
                let _ = std::fs::write(&file, u16::from_be(sa.sin_port).to_string());
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
                let mut accepted = false;
                while std::time::Instant::now() < deadline && !accepted {
                    // SAFETY: a NULL address is allowed.
                    accepted = unsafe { libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut()) } >= 0;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                if accepted {
                    "ACCEPTED".into()
                } else {
                    "NOBODY".into()
                }
            }
        }
        "udp" => {
            let port: u16 = arg(&args, 2).parse().unwrap_or(1);
            io_res(
                std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.send_to(b"warden-escape", ("127.0.0.1", port))),
            )
        }
        // The sockets /proc/net shows this worker (lines after the header).
        "procnet" => {
            let text = std::fs::read_to_string(format!("/proc/net/{}", arg(&args, 2))).unwrap_or_default();
            format!("{}", text.lines().count().saturating_sub(1))
        }
        "ids" => {
            // SAFETY: no arguments.
            let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
            format!("uid={uid} euid={euid}")
        }
        "fds" => {
            let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
                .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
                .unwrap_or_default();
            fds.sort_unstable();
            // The last one is read_dir's own descriptor.
            fds.pop();
            fds.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
        }
        "status" => {
            let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            s.lines()
                .filter(|l| {
                    l.starts_with("NoNewPrivs:")
                        || l.starts_with("Seccomp:")
                        || l.starts_with("CapEff:")
                        || l.starts_with("CapBnd:")
                })
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join(";")
        }
        "forkbomb" => forkbomb(),
        "memhog" => {
            let mb: usize = arg(&args, 2).parse().unwrap_or(1024);
            let mut chunks: Vec<Vec<u8>> = Vec::new();
            for i in 0..mb {
                chunks.push(vec![u8::try_from(i % 251).unwrap_or(0) + 1; 1 << 20]);
            }
            format!("ALLOCATED {}", chunks.len())
        }
        "bench_syscalls" | "bench_syscalls_allow_all" | "bench_syscalls_landlock" | "bench_syscalls_landlock_file" => {
            if args[1] != "bench_syscalls" {
                // The cost of seccomp itself: a one-instruction filter that
                // allows everything (the kernel's action cache skips it).
                let allow = [libc::sock_filter {
                    code: 0x06, // BPF_RET | BPF_K
                    jt: 0,
                    jf: 0,
                    k: 0x7fff_0000, // SECCOMP_RET_ALLOW
                }];
                let prog = libc::sock_fprog {
                    len: 1,
                    filter: allow.as_ptr().cast_mut(),
                };
                // SAFETY: prctl with constant arguments; seccomp reads `prog`,
                // which points at `allow`, both alive for the call.
                let installed = unsafe {
                    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
                        && libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog) == 0
                };
                assert!(installed, "cannot install the allow-all filter: {}", last());
            }
            if args[1].starts_with("bench_syscalls_landlock") {
                // The cost of landlock itself: every file system access
                // handled, and /dev granted, as a worker's rules do; or
                // (`_file`) the two files the loop opens granted themselves,
                // so that landlock's check walks no parent directory.
                use landlock::{Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, ABI};
                let all = AccessFs::from_all(ABI::V7);
                let grants: &[(&str, _)] = if args[1].ends_with("_file") {
                    let file = AccessFs::from_file(ABI::V7);
                    &[("/dev/null", file), ("/dev/zero", file)]
                } else {
                    &[("/dev", all)]
                };
                let mut ruleset = Ruleset::default()
                    .handle_access(all)
                    .and_then(|r| r.create())
                    .expect("landlock");
                for (path, access) in grants {
                    let fd = PathFd::new(path).expect("a path to grant");
                    ruleset = ruleset
                        .add_rule(PathBeneath::new(fd, *access))
                        .expect("a landlock rule");
                }
                let status = ruleset.restrict_self().expect("landlock");
                assert_eq!(status.ruleset, landlock::RulesetStatus::FullyEnforced, "landlock");
            }
            // Nanoseconds per call: calls the kernel's seccomp action cache
            // lets through (getppid, getrandom, read, openat and close),
            // and one the filter itself must look at (ioctl: its request
            // is checked).
            let n: u32 = arg(&args, 2).parse().unwrap_or(1_000_000);
            let time = |f: &dyn Fn()| {
                let t = std::time::Instant::now();
                for _ in 0..n {
                    f();
                }
                t.elapsed().as_nanos() as f64 / f64::from(n)
            };
            let early = time(&|| {
                // SAFETY: getppid has no arguments.
                unsafe { libc::syscall(libc::SYS_getppid) };
            });
            let mut b = [0u8; 1];
            let p = b.as_mut_ptr() as usize;
            let late = time(&|| {
                // SAFETY: getrandom writes one byte into `b`, which outlives the loop.
                unsafe { libc::syscall(libc::SYS_getrandom, p as *mut u8, 1usize, 0u32) };
            });
            let (r, w) = nix::unistd::pipe().expect("a pipe");
            let pipe_fd = std::os::fd::AsRawFd::as_raw_fd(&r);
            let mut avail: libc::c_int = 0;
            let avail_p = &mut avail as *mut libc::c_int as usize;
            let ioctl = time(&|| {
                // SAFETY: FIONREAD writes one int into `avail`, which outlives the loop.
                unsafe { libc::ioctl(pipe_fd, libc::FIONREAD, avail_p as *mut libc::c_int) };
            });
            drop((r, w));
            let zero = std::fs::File::open("/dev/zero").expect("/dev/zero");
            let zero_fd = std::os::fd::AsRawFd::as_raw_fd(&zero);
            let read = time(&|| {
                // SAFETY: read writes one byte into `b`, which outlives the loop.
                unsafe { libc::read(zero_fd, p as *mut libc::c_void, 1) };
            });
            let null = c("/dev/null");
            let open_close = time(&|| {
                // SAFETY: a NUL-terminated path; the descriptor is closed at once.
                unsafe { libc::close(libc::openat(libc::AT_FDCWD, null.as_ptr(), libc::O_RDONLY)) };
            });
            format!(
                "getppid={early:.1} getrandom={late:.1} ioctl={ioctl:.1} read={read:.1} openat_close={open_close:.1}"
            )
        }
        other => {
            eprintln!("unknown attack {other}");
            std::process::exit(2)
        }
    };
    print_result(&result);
}

fn print_result(r: &str) {
    println!("RESULT {r}");
}

fn sockaddr_v4(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET fits sa_family_t"),
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).expect("a sockaddr fits socklen_t")
}

fn unsafe_unshare(flags: libc::c_int) -> libc::c_int {
    // SAFETY: unshare takes no pointers.
    unsafe { libc::unshare(flags) }
}

/// Every process forks as fast as it can; the first failure in the original
/// process is reported (EAGAIN when pids.max stops it). Children keep trying
/// for a few seconds, then everyone exits.
fn forkbomb() -> String {
    let start = std::time::Instant::now();
    let mut first_error = None;
    let mut is_child = false;
    while start.elapsed() < std::time::Duration::from_secs(3) {
        // SAFETY: this program is single-threaded.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            is_child = true;
            continue;
        }
        if pid < 0 && first_error.is_none() {
            first_error = Some(last());
            if !is_child {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    if is_child {
        // SAFETY: leave without running destructors in a forked child.
        unsafe { libc::_exit(0) };
    }
    first_error.unwrap_or_else(|| "NO_LIMIT_HIT".into())
}
