//! The seccomp part of a policy: named groups of system calls (in the spirit
//! of systemd's `@system-service`), the calls warden never allows, and the
//! compilation of a profile's allowlist into a BPF program for one
//! architecture.
//!
//! The filter is an allowlist. A call that is not allowed fails with EPERM; a
//! call newer than this build's syscall table fails with ENOSYS, so that libc
//! falls back to an older call instead of treating EPERM as fatal. A few calls
//! are allowed only with safe arguments (see [`compile`]).

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
    SeccompFilter, SeccompRule, TargetArch,
};

use crate::error::PolicyError;

/// A named group: what it is for, and its calls with a note where the
/// reason to allow a call is not obvious.
#[derive(Debug)]
pub struct Group {
    pub name: &'static str,
    pub about: &'static str,
    pub calls: &'static [&'static str],
}

/// The groups a profile can name in `[seccomp] groups`.
pub const GROUPS: &[Group] = &[
    Group {
        name: "default",
        about: "what every dynamically linked program needs to start and exit",
        calls: &[
            "arch_prctl", // x86_64 TLS setup by the dynamic loader
            "brk",
            "exit",
            "exit_group",
            "getrandom",
            "mmap",
            "mprotect",
            "munmap",
            "mremap",
            "madvise",
            "msync",
            "mincore",
            "membarrier",
            "rseq",
            "set_robust_list",
            "get_robust_list",
            "set_tid_address",
            "futex",
            "futex_waitv",
            "futex_wait",
            "futex_wake",
            "futex_requeue",
            "restart_syscall",
            "sched_yield",
            "sched_getaffinity",
            "sched_setaffinity",
            "sched_getparam",
            "sched_getscheduler",
            "sched_get_priority_min",
            "sched_get_priority_max",
            "sched_rr_get_interval",
            "getcpu",
            "uname",
            "sysinfo",
            "getpid",
            "getppid",
            "gettid",
            "getuid",
            "geteuid",
            "getgid",
            "getegid",
            "getresuid",
            "getresgid",
            "getgroups",
            "getrlimit",
            "prlimit64", // lowering limits only: raising above the hard limit needs a capability
            "setrlimit",
            "getrusage",
            "times",
            "capget",
            "prctl", // PR_SET_NAME, PR_SET_PDEATHSIG...; privileged options need capabilities
            "pkey_alloc",
            "pkey_free",
            "pkey_mprotect",
            "mseal",
            "mlock",
            "mlock2",
            "munlock",
            "mlockall",
            "munlockall", // bounded by RLIMIT_MEMLOCK
            "get_mempolicy",
            "set_mempolicy",
            "mbind",
            "set_mempolicy_home_node",
            "map_shadow_stack", // x86 CET shadow stacks for the process itself
        ],
    },
    Group {
        name: "io",
        about: "reading and writing open files, pipes and polling",
        calls: &[
            "read",
            "write",
            "readv",
            "writev",
            "pread64",
            "pwrite64",
            "preadv",
            "pwritev",
            "preadv2",
            "pwritev2",
            "lseek",
            "close",
            "close_range",
            "dup",
            "dup2",
            "dup3",
            "pipe",
            "pipe2",
            "fcntl",
            "ioctl", // only with safe requests: TIOCSTI and TIOCLINUX are refused by argument
            "poll",
            "ppoll",
            "select",
            "pselect6",
            "epoll_create",
            "epoll_create1",
            "epoll_ctl",
            "epoll_wait",
            "epoll_pwait",
            "epoll_pwait2",
            "eventfd",
            "eventfd2",
            "sendfile",
            "splice",
            "tee",
            "vmsplice",
            "copy_file_range",
            "fadvise64",
            "readahead",
            "memfd_create",
            "memfd_secret",
            // Linux AIO (not io_uring): no kernel attack surface of note, used by databases
            "io_setup",
            "io_destroy",
            "io_submit",
            "io_getevents",
            "io_pgetevents",
            "io_cancel",
        ],
    },
    Group {
        name: "file-system",
        about: "path-based file operations; landlock decides which paths",
        calls: &[
            "open",
            "openat",
            "openat2",
            "creat",
            "stat",
            "lstat",
            "fstat",
            "newfstatat",
            "statx",
            "statfs",
            "fstatfs",
            "access",
            "faccessat",
            "faccessat2",
            "readlink",
            "readlinkat",
            "getdents",
            "getdents64",
            "mkdir",
            "mkdirat",
            "rmdir",
            "unlink",
            "unlinkat",
            "rename",
            "renameat",
            "renameat2",
            "link",
            "linkat",
            "symlink",
            "symlinkat",
            "chmod",
            "fchmod",
            "fchmodat",
            "fchmodat2",
            "chown",
            "fchown",
            "fchownat",
            "lchown",
            "truncate",
            "ftruncate",
            "fallocate",
            "fsync",
            "fdatasync",
            "sync",
            "syncfs",
            "sync_file_range",
            "utime",
            "utimes",
            "utimensat",
            "futimesat",
            "getcwd",
            "chdir",
            "fchdir",
            "umask",
            "flock",
            "mknod",
            "mknodat", // FIFOs and sockets; device nodes need CAP_MKNOD, which no worker has
            "inotify_init",
            "inotify_init1",
            "inotify_add_watch",
            "inotify_rm_watch",
            "getxattr",
            "lgetxattr",
            "fgetxattr",
            "listxattr",
            "llistxattr",
            "flistxattr",
            "getxattrat",
            "listxattrat",
            "setxattr",
            "lsetxattr",
            "fsetxattr",
            "removexattr",
            "lremovexattr",
            "fremovexattr",
            "setxattrat",
            "removexattrat", // user.* only without capabilities
            "file_getattr",
            "file_setattr",
        ],
    },
    Group {
        name: "process",
        about: "creating, running and waiting for processes and threads",
        calls: &[
            "fork",
            "vfork",
            "clone",  // only without namespace flags (checked by argument)
            "clone3", // always ENOSYS: its flags are in memory seccomp cannot read, so libc falls back to clone
            "execve",
            "execveat",
            "wait4",
            "waitid",
            "kill",
            "tkill",
            "tgkill",
            "getpgid",
            "setpgid",
            "getpgrp",
            "getsid",
            "setsid",
            "getpriority",
            "setpriority", // raising priority needs CAP_SYS_NICE
            "sched_setparam",
            "sched_setscheduler",
            "sched_getattr",
            "sched_setattr",
            "pidfd_open",
            "pidfd_send_signal",
            "ioprio_get",
            "ioprio_set",
            // Changing to one's own ids: without capabilities nothing else is possible,
            // and tools such as sudo-less installers probe these.
            "setuid",
            "setgid",
            "setreuid",
            "setregid",
            "setresuid",
            "setresgid",
            "setgroups",
            "setfsuid",
            "setfsgid",
        ],
    },
    Group {
        name: "signal",
        about: "signal handling",
        calls: &[
            "rt_sigaction",
            "rt_sigprocmask",
            "rt_sigreturn",
            "rt_sigsuspend",
            "rt_sigpending",
            "rt_sigtimedwait",
            "rt_sigqueueinfo",
            "rt_tgsigqueueinfo",
            "sigaltstack",
            "pause",
            "alarm",
            "signalfd",
            "signalfd4",
        ],
    },
    Group {
        name: "time",
        about: "clocks and timers (reading, never setting the system clock)",
        calls: &[
            "clock_gettime",
            "clock_getres",
            "clock_nanosleep",
            "nanosleep",
            "gettimeofday",
            "time",
            "timer_create",
            "timer_settime",
            "timer_gettime",
            "timer_getoverrun",
            "timer_delete",
            "timerfd_create",
            "timerfd_settime",
            "timerfd_gettime",
            "getitimer",
            "setitimer",
        ],
    },
    Group {
        name: "ipc",
        about: "System V and POSIX IPC, private to the worker's IPC namespace",
        calls: &[
            "shmget",
            "shmat",
            "shmdt",
            "shmctl",
            "semget",
            "semop",
            "semtimedop",
            "semctl",
            "msgget",
            "msgsnd",
            "msgrcv",
            "msgctl",
            "mq_open",
            "mq_unlink",
            "mq_timedsend",
            "mq_timedreceive",
            "mq_notify",
            "mq_getsetattr",
        ],
    },
    Group {
        name: "network",
        about: "sockets; families are checked by argument, TCP ports by landlock",
        calls: &[
            "socket", // AF_UNIX, AF_INET/6 stream (and datagram if udp), AF_NETLINK route only
            "socketpair",
            "bind",
            "connect",
            "listen",
            "accept",
            "accept4",
            "getsockname",
            "getpeername",
            "sendto",
            "recvfrom",
            "sendmsg",
            "recvmsg",
            "sendmmsg",
            "recvmmsg",
            "shutdown",
            "setsockopt",
            "getsockopt",
        ],
    },
    Group {
        name: "sandbox",
        about: "a worker may sandbox itself further (nested landlock and seccomp)",
        calls: &[
            "landlock_create_ruleset",
            "landlock_add_rule",
            "landlock_restrict_self",
            "seccomp", // only adds filters; no_new_privs is already set
        ],
    },
];

/// Calls no profile may allow, and why. These are the kernel's largest attack
/// surfaces or ways out of the sandbox; a profile naming one in `allow` is
/// rejected when it is loaded.
pub const NEVER_ALLOWED: &[(&str, &str)] = &[
    (
        "io_uring_setup",
        "io_uring bypasses seccomp for the operations it submits",
    ),
    (
        "io_uring_enter",
        "io_uring bypasses seccomp for the operations it submits",
    ),
    (
        "io_uring_register",
        "io_uring bypasses seccomp for the operations it submits",
    ),
    ("ptrace", "tracing another process reads and changes its memory"),
    ("process_vm_readv", "reads another process's memory"),
    ("process_vm_writev", "writes another process's memory"),
    ("process_madvise", "acts on another process's memory"),
    ("pidfd_getfd", "steals file descriptors from another process"),
    ("kcmp", "probes other processes' kernel objects"),
    ("mount", "changes the mount table"),
    ("umount2", "changes the mount table"),
    ("pivot_root", "changes the root"),
    ("chroot", "changes the root"),
    ("move_mount", "changes the mount table"),
    ("open_tree", "changes the mount table"),
    ("open_tree_attr", "changes the mount table"),
    ("fsopen", "changes the mount table"),
    ("fsmount", "changes the mount table"),
    ("fsconfig", "changes the mount table"),
    ("fspick", "changes the mount table"),
    ("mount_setattr", "changes the mount table"),
    (
        "unshare",
        "new namespaces (user namespaces above all) widen the kernel surface",
    ),
    ("setns", "enters another namespace"),
    ("bpf", "loads programs into the kernel"),
    (
        "perf_event_open",
        "a long record of kernel vulnerabilities and side channels",
    ),
    ("keyctl", "the kernel keyring is shared across the host"),
    ("add_key", "the kernel keyring is shared across the host"),
    ("request_key", "the kernel keyring is shared across the host"),
    ("userfaultfd", "makes kernel races easy to win"),
    (
        "open_by_handle_at",
        "opens files by handle, bypassing path-based checks",
    ),
    ("name_to_handle_at", "pairs with open_by_handle_at"),
    ("init_module", "loads kernel code"),
    ("finit_module", "loads kernel code"),
    ("delete_module", "unloads kernel code"),
    ("kexec_load", "replaces the kernel"),
    ("kexec_file_load", "replaces the kernel"),
    ("reboot", "host administration"),
    ("swapon", "host administration"),
    ("swapoff", "host administration"),
    ("acct", "host administration"),
    ("quotactl", "host administration"),
    ("quotactl_fd", "host administration"),
    ("syslog", "reads kernel logs"),
    ("settimeofday", "sets the host clock"),
    ("clock_settime", "sets the host clock"),
    ("clock_adjtime", "sets the host clock"),
    ("adjtimex", "sets the host clock"),
    ("iopl", "direct hardware access"),
    ("ioperm", "direct hardware access"),
    ("vhangup", "hangs up terminals"),
    ("lookup_dcookie", "kernel profiling internals"),
    ("fanotify_init", "watches the whole file system"),
    ("personality", "can turn off address-space randomization"),
    ("uselib", "obsolete loader entry point"),
    ("nfsservctl", "obsolete"),
    ("sethostname", "host identity"),
    ("setdomainname", "host identity"),
    ("lsm_set_self_attr", "changes LSM attributes"),
];

// Argument values used by the argument checks.
const CLONE_NAMESPACE_FLAGS: u64 = 0x0200_0000 // CLONE_NEWCGROUP
    | 0x0002_0000 // CLONE_NEWNS
    | 0x0400_0000 // CLONE_NEWUTS
    | 0x0800_0000 // CLONE_NEWIPC
    | 0x1000_0000 // CLONE_NEWUSER
    | 0x2000_0000 // CLONE_NEWPID
    | 0x4000_0000 // CLONE_NEWNET
    | 0x0000_0080; // CLONE_NEWTIME
const TIOCSTI: u64 = 0x5412;
const TIOCLINUX: u64 = 0x541C;
const AF_UNIX: u64 = 1;
const AF_INET: u64 = 2;
const AF_INET6: u64 = 10;
const AF_NETLINK: u64 = 16;
const SOCK_STREAM: u64 = 1;
const SOCK_DGRAM: u64 = 2;
const SOCK_TYPE_MASK: u64 = 0xf;
const NETLINK_ROUTE: u64 = 0;
const ENOSYS: u32 = 38;
const EPERM: u32 = 1;

pub fn group(name: &str) -> Option<&'static Group> {
    GROUPS.iter().find(|g| g.name == name)
}

pub fn group_names() -> Vec<&'static str> {
    GROUPS.iter().map(|g| g.name).collect()
}

pub fn never_allowed(name: &str) -> Option<&'static str> {
    NEVER_ALLOWED.iter().find(|(n, _)| *n == name).map(|(_, why)| *why)
}

/// The architectures warden compiles filters for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    fn target(self) -> TargetArch {
        match self {
            Arch::X86_64 => TargetArch::x86_64,
            Arch::Aarch64 => TargetArch::aarch64,
        }
    }

    /// The number of a call on this architecture, if it exists there.
    pub fn number(self, name: &str) -> Option<i64> {
        match self {
            Arch::X86_64 => name.parse::<syscalls::x86_64::Sysno>().ok().map(|s| i64::from(s.id())),
            Arch::Aarch64 => name.parse::<syscalls::aarch64::Sysno>().ok().map(|s| i64::from(s.id())),
        }
    }

    /// The name of call `nr` on this architecture (for denial reports).
    pub fn name_of(self, nr: i64) -> Option<&'static str> {
        let nr = i32::try_from(nr).ok()?;
        match self {
            Arch::X86_64 => syscalls::x86_64::Sysno::new(usize::try_from(nr).ok()?).map(|s| s.name()),
            Arch::Aarch64 => syscalls::aarch64::Sysno::new(usize::try_from(nr).ok()?).map(|s| s.name()),
        }
    }

    /// The highest call number this build knows; anything above is ENOSYS.
    fn last(self) -> u32 {
        let id = match self {
            Arch::X86_64 => syscalls::x86_64::Sysno::last().id(),
            Arch::Aarch64 => syscalls::aarch64::Sysno::last().id(),
        };
        u32::try_from(id).unwrap_or(u32::MAX)
    }
}

/// A name known on at least one supported architecture.
pub fn is_known_syscall(name: &str) -> bool {
    Arch::ALL.iter().any(|a| a.number(name).is_some())
}

fn cond(arg: u8, len: Len, op: Op, value: u64) -> Cond {
    // Only fails for arg > 5, which these constant call sites never pass.
    Cond::new(arg, len, op, value).expect("argument index is below 6")
}

fn rule(conds: Vec<Cond>) -> SeccompRule {
    SeccompRule::new(conds).expect("a rule with at least one condition")
}

/// The argument checks for calls that are only safe with some arguments.
/// `None` means "no argument check: allow the call".
fn argument_rules(name: &str, udp: bool) -> Option<Vec<SeccompRule>> {
    match name {
        // A worker must not create namespaces: user namespaces expose most of
        // the kernel's privileged code to it.
        "clone" => Some(vec![rule(vec![cond(
            0,
            Len::Qword,
            Op::MaskedEq(CLONE_NAMESPACE_FLAGS),
            0,
        )])]),
        // TIOCSTI pushes keystrokes into the terminal's input queue, a classic
        // escape from a sandbox sharing a terminal; TIOCLINUX can do the same.
        // The kernel reads the request as 32 bits, so compare 32 bits.
        "ioctl" => Some(vec![rule(vec![
            cond(1, Len::Dword, Op::Ne, TIOCSTI),
            cond(1, Len::Dword, Op::Ne, TIOCLINUX),
        ])]),
        "socket" => {
            let mut rules = vec![
                rule(vec![cond(0, Len::Dword, Op::Eq, AF_UNIX)]),
                rule(vec![
                    cond(0, Len::Dword, Op::Eq, AF_INET),
                    cond(1, Len::Dword, Op::MaskedEq(SOCK_TYPE_MASK), SOCK_STREAM),
                ]),
                rule(vec![
                    cond(0, Len::Dword, Op::Eq, AF_INET6),
                    cond(1, Len::Dword, Op::MaskedEq(SOCK_TYPE_MASK), SOCK_STREAM),
                ]),
                // getaddrinfo() asks rtnetlink which address families are up.
                rule(vec![
                    cond(0, Len::Dword, Op::Eq, AF_NETLINK),
                    cond(2, Len::Dword, Op::Eq, NETLINK_ROUTE),
                ]),
            ];
            if udp {
                for family in [AF_INET, AF_INET6] {
                    rules.push(rule(vec![
                        cond(0, Len::Dword, Op::Eq, family),
                        cond(1, Len::Dword, Op::MaskedEq(SOCK_TYPE_MASK), SOCK_DGRAM),
                    ]));
                }
            }
            Some(rules)
        }
        _ => None,
    }
}

/// The resolved allowlist of a policy: group members plus `allow`, minus
/// `deny`, minus everything warden never allows. Sorted, deduplicated.
pub fn allowed_calls(policy: &crate::SeccompPolicy) -> Vec<String> {
    let mut calls: std::collections::BTreeSet<String> = policy
        .groups
        .iter()
        .filter_map(|g| group(g))
        .flat_map(|g| g.calls.iter().map(|c| (*c).to_string()))
        .chain(policy.allow.iter().cloned())
        .collect();
    calls.retain(|c| !policy.deny.contains(c) && never_allowed(c).is_none());
    calls.into_iter().collect()
}

/// Compiles an allowlist into a BPF program for `arch`. Calls that do not
/// exist on `arch` are skipped (e.g. `open` on aarch64).
pub fn compile(allowed: &[String], udp: bool, arch: Arch) -> Result<BpfProgram, PolicyError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for name in allowed {
        if name == "clone3" {
            continue; // answered with ENOSYS by the prologue below
        }
        if let Some(nr) = arch.number(name) {
            rules.insert(nr, argument_rules(name, udp).unwrap_or_default());
        }
    }
    let filter = SeccompFilter::new(rules, SeccompAction::Errno(EPERM), SeccompAction::Allow, arch.target()).map_err(
        |source| PolicyError::Seccomp {
            arch: arch.name(),
            source,
        },
    )?;
    let mut program: BpfProgram = filter.try_into().map_err(|source| PolicyError::Seccomp {
        arch: arch.name(),
        source,
    })?;

    // seccompiler's program starts with a 3-instruction architecture check
    // (load arch, jump if equal, kill). Right after it we answer ENOSYS for
    // call numbers above the known table (new calls, and x32 calls on x86_64,
    // whose numbers have bit 30 set) and for clone3.
    let mut prologue = vec![
        stmt(BPF_LD_W_ABS, 0), // seccomp_data.nr
        jump(BPF_JGT_K, arch.last(), 0, 1),
        stmt(BPF_RET_K, SECCOMP_RET_ERRNO | ENOSYS),
    ];
    if let Some(nr) = arch.number("clone3") {
        if allowed.iter().any(|c| c == "clone3") {
            prologue.push(jump(BPF_JEQ_K, u32::try_from(nr).unwrap_or(u32::MAX), 0, 1));
            prologue.push(stmt(BPF_RET_K, SECCOMP_RET_ERRNO | ENOSYS));
        }
    }
    debug_assert_eq!(program[2].code, BPF_RET_K);
    program.splice(3..3, prologue);
    Ok(program)
}

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JGT_K: u16 = 0x25;
const BPF_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_member_exists_somewhere() {
        for g in GROUPS {
            for c in g.calls {
                assert!(is_known_syscall(c), "group {} names unknown call {c}", g.name);
                assert!(never_allowed(c).is_none(), "group {} allows forbidden {c}", g.name);
            }
        }
        for (c, _) in NEVER_ALLOWED {
            assert!(
                is_known_syscall(c) || *c == "open_tree_attr",
                "never-allowed list names unknown call {c}"
            );
        }
    }

    #[test]
    fn compiles_for_both_architectures_with_the_enosys_prologue() {
        let all: Vec<String> = GROUPS
            .iter()
            .flat_map(|g| g.calls.iter().map(|c| (*c).to_string()))
            .collect();
        for arch in Arch::ALL {
            let prog = compile(&all, true, arch).unwrap();
            assert!(prog.len() > 200 && prog.len() < 4096, "{}: {}", arch.name(), prog.len());
            assert_eq!(prog[3].code, BPF_LD_W_ABS);
            assert_eq!(prog[4].k, arch.last());
            assert_eq!(prog[5].k, SECCOMP_RET_ERRNO | ENOSYS);
        }
        assert!(Arch::Aarch64.number("open").is_none());
        assert_eq!(Arch::X86_64.number("open"), Some(2));
        assert_eq!(Arch::X86_64.name_of(101), Some("ptrace"));
    }
}
