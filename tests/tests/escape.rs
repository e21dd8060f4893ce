//! The escape suite: each attack runs as a sandboxed worker under the
//! `claude-code` profile (or a test profile that extends it with tighter
//! limits) and must fail with the specific error the sandbox layer that
//! stops it produces. Needs root: it builds real namespaces, cgroups,
//! landlock rulesets and seccomp filters.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::time::Duration;
use warden_daemon::launcher::Io;

use warden_tests::*;

const PROFILE: &str = "claude-code";

/// claude-code with limits small enough to hit quickly.
const TIGHT: &str = r#"
extends = "claude-code"
[limits]
memory = "64M"
memory_swap = "64M"
pids = 32
"#;

fn host() -> Option<Host> {
    privileged("builds namespaces, cgroups, landlock and seccomp sandboxes").then(|| Host::new(&[("tight", TIGHT)]))
}

/// Runs `warden-attack ARGS` as alice under `profile`; returns its RESULT.
fn attack_as(host: &Host, profile: &str, args: &[&str]) -> String {
    let bin = host.install_attack("alice", "demo");
    let mut argv = vec![bin.as_str()];
    argv.extend_from_slice(args);
    let out = host.run("alice", "demo", profile, &argv);
    out.result().to_string()
}

fn attack(host: &Host, args: &[&str]) -> String {
    attack_as(host, PROFILE, args)
}

/// Runs a landlock-denied attack: asserts the errno, and that the kernel's
/// audit stream reported the denial with its access right (and object).
fn landlock_attack(host: &Host, profile: &str, args: &[&str], errno: &str, access: &str, object: Option<&str>) {
    watch_landlock();
    let bin = host.install_attack("alice", "demo");
    let mut argv = vec![bin.as_str()];
    argv.extend_from_slice(args);
    let w = host.spawn("alice", "demo", profile, &argv).unwrap();
    let id = w.cgroup.id().to_string();
    let out = w.wait(Duration::from_secs(60));
    assert_eq!(out.result(), errno, "{args:?}");
    let matches = |a: &str, o: &str| a == access && object.is_none_or(|want| o == want);
    let seen = landlock_denials_of(&id, Duration::from_secs(30), matches);
    assert!(
        seen.iter().any(|(a, o)| matches(a, o)),
        "{args:?}: landlock denial {access} {object:?} reported, got {seen:?}"
    );
}

/// Runs a seccomp-denied attack: asserts the errno the worker got and that
/// the denial was reported with the call's name.
fn seccomp_attack(host: &Host, args: &[&str], errno: &str, syscall: &str) {
    let bin = host.install_attack("alice", "demo");
    let mut argv = vec![bin.as_str()];
    argv.extend_from_slice(args);
    let out = host.run("alice", "demo", PROFILE, &argv);
    assert_eq!(out.result(), errno, "{args:?}");
    assert!(
        out.denials.iter().any(|d| d == syscall),
        "{args:?}: denial of {syscall} reported, got {:?}",
        out.denials
    );
}

#[test]
fn etc_shadow_does_not_exist_inside() {
    let Some(h) = host() else { return };
    assert_eq!(attack(&h, &["read", "/etc/shadow"]), "ENOENT");
    assert_eq!(attack(&h, &["read", "/etc/sudoers"]), "ENOENT");
    // What is granted is readable: the synthesized passwd names the worker.
    assert_eq!(attack(&h, &["read", "/etc/passwd"]), "OK");
}

#[test]
fn writing_to_etc_fails_read_only() {
    let Some(h) = host() else { return };
    assert_eq!(attack(&h, &["write", "/etc/warden-escape"]), "EROFS");
    assert_eq!(attack(&h, &["write", "/etc/passwd"]), "EROFS");
    assert!(!std::path::Path::new("/etc/warden-escape").exists());
}

#[test]
fn tmp_is_private() {
    let Some(h) = host() else { return };
    let name = format!("/tmp/warden-escape-{}", std::process::id());
    // The write succeeds, into the worker's own tmpfs; the host never sees it.
    assert_eq!(attack(&h, &["write", &name]), "OK");
    assert!(!std::path::Path::new(&name).exists());
}

#[test]
fn another_users_directories_are_invisible() {
    let Some(h) = host() else { return };
    let bob = h.prepare("bob", PROFILE, "demo");
    std::fs::write(bob.workspace.join("secret"), "bob's").unwrap();
    let bob_ws = bob.workspace.display().to_string();
    let bob_home = bob.home.display().to_string();
    let bob_user_dir = bob.home.ancestors().nth(3).unwrap().display().to_string();
    assert_eq!(attack(&h, &["read", &format!("{bob_ws}/secret")]), "ENOENT");
    assert_eq!(attack(&h, &["write", &format!("{bob_ws}/planted")]), "ENOENT");
    assert_eq!(attack(&h, &["write", &format!("{bob_home}/.bashrc")]), "ENOENT");
    assert_eq!(attack(&h, &["list", &bob_user_dir]), "ENOENT");
    assert_eq!(attack(&h, &["list", "/home/bob"]), "ENOENT");
    assert!(!bob.workspace.join("planted").exists());
    // warden's state dir as a whole is not there either.
    assert_eq!(attack(&h, &["list", &h.state.path().display().to_string()]), "ENOENT");
}

#[test]
fn ptrace_and_process_vm_readv_are_denied_by_seccomp() {
    let Some(h) = host() else { return };
    let me = std::process::id().to_string();
    seccomp_attack(&h, &["ptrace", &me], "EPERM", "ptrace");
    seccomp_attack(&h, &["ptrace", "1"], "EPERM", "ptrace");
    seccomp_attack(&h, &["vm_readv", "1"], "EPERM", "process_vm_readv");
}

#[test]
fn mount_namespace_and_root_changes_are_denied() {
    let Some(h) = host() else { return };
    for (a, call) in [
        ("mount", "mount"),
        ("unshare_user", "unshare"),
        ("unshare_mount", "unshare"),
        ("clone_newuser", "clone"),
        ("setns", "setns"),
        ("chroot", "chroot"),
    ] {
        seccomp_attack(&h, &[a], "EPERM", call);
    }
}

#[test]
fn kernel_attack_surface_calls_are_denied() {
    let Some(h) = host() else { return };
    for a in [
        "io_uring_setup",
        // Out of the default groups: host-wide AIO contexts (fs.aio-max-nr).
        "io_setup",
        "bpf",
        "perf_event_open",
        "keyctl",
        "add_key",
        "userfaultfd",
        "open_by_handle_at",
    ] {
        seccomp_attack(&h, &[a], "EPERM", a);
    }
}

#[test]
fn linux_aio_is_opt_in_for_its_host_wide_budget() {
    // Denied by the shipped profiles (above); a site profile that names the
    // `aio` group gets it.
    if !privileged("builds sandboxes") {
        return;
    }
    let h = Host::new(&[(
        "database",
        "extends = \"claude-code\"\ndescription = \"a trusted database workload\"\n[seccomp]\ngroups = [\"aio\"]\n",
    )]);
    assert_eq!(attack_as(&h, "database", &["io_setup"]), "OK");
    assert_eq!(attack_as(&h, PROFILE, &["io_setup"]), "EPERM");
}

#[test]
fn a_worker_cannot_move_its_files_out_of_its_disk_quota() {
    // A user's tree is one project (its disk limit); the owner of a file
    // could otherwise change the file's project id or clear a directory's
    // inherit flag: every call that can is refused, and reported.
    let Some(h) = host() else { return };
    let bin = h.install_attack("alice", "demo");
    let out = h.run("alice", "demo", PROFILE, &[&bin, "projid", "/workspace/demo"]);
    assert_eq!(
        out.result(),
        "fssetxattr=EPERM setflags=EPERM file_setattr=EPERM",
        "{}",
        out.stderr
    );
    for call in ["ioctl", "file_setattr"] {
        assert!(out.denials.iter().any(|d| d == call), "{call}: {:?}", out.denials);
    }
    // The second line, RLIMIT_FSIZE (a disk limit sets it; here set alone,
    // as this host's file system has no project quotas: the VM tier runs
    // the disk limit itself): no file grows past it, sparse or not.
    let h = Host::new(&[("small", "extends = \"base\"\n[limits.rlimits]\nfsize = 1000000\n")]);
    let bin = h.install_attack("alice", "demo");
    let out = h.run("alice", "demo", "small", &[&bin, "fsize", "/tmp/big", "2000000"]);
    assert_eq!(out.result(), "EFBIG");
}

#[test]
fn workers_under_other_profiles_share_no_writable_file() {
    // An offline worker and a networked one of the same user: each profile
    // has its own home and workspaces, so no file, and no unix socket for a
    // live exchange, is common to both (and a bypassPermissions session
    // cannot plant settings that an approval-gated one loads).
    let Some(h) = host() else { return };
    let networked = h.prepare("alice", PROFILE, "demo");
    let out = h.run(
        "alice",
        "demo",
        PROFILE,
        &[
            "sh",
            "-c",
            "mkdir -p $HOME/.claude && echo '{}' > $HOME/.claude/settings.json && echo x > planted",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(networked.workspace.join("planted").exists());
    let listener = std::os::unix::net::UnixListener::bind(networked.home.join("live.sock")).unwrap();
    let id = h.users.identity("alice").unwrap();
    std::os::unix::fs::chown(networked.home.join("live.sock"), Some(id.uid), Some(id.gid)).unwrap();
    // The same profile's next worker sees all of it.
    assert_eq!(attack_as(&h, PROFILE, &["unix", "/home/alice/live.sock"]), "OK");
    assert_eq!(attack_as(&h, PROFILE, &["read", "/workspace/demo/planted"]), "OK");
    // The offline one sees none of it.
    for args in [
        ["unix", "/home/alice/live.sock"],
        ["read", "/home/alice/.claude/settings.json"],
        ["read", "/workspace/demo/planted"],
    ] {
        assert_eq!(attack_as(&h, "offline", &args), "ENOENT", "{args:?}");
    }
    drop(listener);
}

#[test]
fn a_worker_cannot_take_the_hosts_ptys() {
    // kernel.pty.max is one count for the whole host: a worker's private
    // devpts stops it at its own share.
    let Some(h) = host() else { return };
    assert_eq!(attack_as(&h, PROFILE, &["ptys"]), "64 ENOSPC");
}

#[test]
fn sys_shows_only_the_workers_own_cgroup() {
    let Some(h) = host() else { return };
    // Another worker of another user is running meanwhile.
    let other = h
        .spawn_with_stdin("bob", "demo", PROFILE, &["sleep", "30"], Io::Null)
        .unwrap();
    let out = h.run(
        "alice",
        "demo",
        PROFILE,
        &[
            "sh",
            "-c",
            "find /sys/fs/cgroup -mindepth 2 -type d | wc -l; \
             cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max 2>/dev/null; \
             ls /sys/fs/cgroup/pids | grep -c . ; touch /sys/fs/cgroup/x 2>&1; nproc",
        ],
    );
    drop(other);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"0"), "another cgroup is visible: {}", out.stdout);
    // The worker's own limit, where runtimes look for it (v1 or v2).
    assert!(
        lines.contains(&"4294967296"),
        "the worker's memory limit: {}",
        out.stdout
    );
    assert!(out.stdout.contains("Read-only file system"), "{}", out.stdout);
    // CPU topology is still there for runtimes that size themselves.
    assert!(
        lines.last().is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n >= 1)),
        "{}",
        out.stdout
    );
}

#[test]
fn tiocsti_on_a_terminal_is_denied() {
    let Some(h) = host() else { return };
    let pty = nix::pty::openpty(None, None).unwrap();
    let bin = h.install_attack("alice", "demo");
    let stdin = Io::Fd(pty.slave);
    let w = h
        .spawn_with_stdin("alice", "demo", PROFILE, &[&bin, "tiocsti"], stdin)
        .unwrap();
    let out = w.wait(Duration::from_secs(30));
    assert_eq!(out.result(), "EPERM");
    assert!(out.denials.iter().any(|d| d == "ioctl"), "{:?}", out.denials);
    // Nothing was pushed into the terminal's input queue.
    nix::fcntl::fcntl(
        &pty.master,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let mut buf = [0u8; 16];
    let n = std::fs::File::from(pty.master).read(&mut buf).unwrap_or(0);
    assert!(!buf[..n].contains(&b'x'));
}

#[test]
fn processes_outside_cannot_be_signalled() {
    let Some(h) = host() else { return };
    // A host process: not visible in the worker's PID namespace.
    let mut victim = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let r = attack(&h, &["kill", &victim.id().to_string()]);
    assert_eq!(r, "ESRCH");
    assert!(victim.try_wait().unwrap().is_none(), "the host process survived");
    victim.kill().unwrap();
    victim.wait().unwrap();
}

#[test]
fn abstract_unix_sockets_outside_are_unreachable() {
    let Some(h) = host() else { return };
    let name = format!("warden-escape-{}", std::process::id());
    let addr =
        <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name.as_bytes())
            .unwrap();
    let _listener = UnixListener::bind_addr(&addr).unwrap();
    // Abstract names belong to a network namespace: the host's are not in
    // the worker's (landlock's abstract-socket scope, ABI 6, is the second
    // line).
    assert_eq!(attack(&h, &["abstract", &name]), "ECONNREFUSED");
}

#[test]
fn pathname_sockets_outside_are_invisible() {
    let Some(h) = host() else { return };
    let path = format!("/run/warden-escape-{}.sock", std::process::id());
    let _ = std::fs::remove_file(&path);
    let _listener = UnixListener::bind(&path).unwrap();
    assert_eq!(attack(&h, &["unix", &path]), "ENOENT");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn tcp_to_a_host_port_is_denied_and_the_workers_own_ports_are_its_own() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // A profile that lets the worker run a server on that port number.
    let own = format!("extends = \"claude-code\"\n[network]\ntcp_bind = [{port}]\n");
    if !privileged("builds sandboxes") {
        return;
    }
    let h = Host::new(&[("own-port", &own)]);
    let dest = format!("port {port}");
    // Not one of its own ports: landlock refuses the connect (and reports it).
    landlock_attack(
        &h,
        PROFILE,
        &["tcp", &port.to_string()],
        "EACCES",
        "net.connect_tcp",
        Some(&dest),
    );
    // Its own port is on its own loopback: the host's listener is not there.
    assert_eq!(attack_as(&h, "own-port", &["tcp", &port.to_string()]), "ECONNREFUSED");
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "nothing reached the host's listener");
}

#[test]
fn fast_open_mptcp_sctp_raw_icmp_packet_and_netlink_sockets_are_denied() {
    let Some(h) = host() else { return };
    // TCP Fast Open connects without a connect() call: refused by argument.
    seccomp_attack(&h, &["tfo", "443"], "EPERM", "sendto");
    seccomp_attack(&h, &["tfo_connect"], "EPERM", "setsockopt");
    let (inet, inet6, packet, netlink) = ("2", "10", "17", "16");
    let (stream, dgram, raw, seqpacket) = ("1", "2", "3", "5");
    for (what, family, kind, protocol) in [
        ("MPTCP", inet, stream, "262"),
        ("MPTCP over IPv6", inet6, stream, "262"),
        ("SCTP", inet, stream, "132"),
        ("SCTP one-to-many", inet, seqpacket, "132"),
        ("raw IP", inet, raw, "1"),
        ("ICMP ping", inet, dgram, "1"),
        ("ICMPv6 ping", inet6, dgram, "58"),
        ("UDP (the profile has none)", inet, dgram, "0"),
        ("packet", packet, raw, "0"),
        ("netlink sock_diag", netlink, raw, "4"),
        ("netlink audit", netlink, raw, "9"),
    ] {
        let bin = h.install_attack("alice", "demo");
        let out = h.run("alice", "demo", PROFILE, &[&bin, "socket", family, kind, protocol]);
        assert_eq!(out.result(), "EPERM", "{what}");
        assert!(
            out.denials.iter().any(|d| d == "socket"),
            "{what}: reported, got {:?}",
            out.denials
        );
    }
    // What a worker needs stays: TCP, unix sockets, route netlink.
    for (family, kind, protocol) in [
        (inet, stream, "0"),
        (inet6, stream, "6"),
        ("1", stream, "0"),
        (netlink, raw, "0"),
    ] {
        assert_eq!(
            attack(&h, &["socket", family, kind, protocol]),
            "OK",
            "{family} {kind} {protocol}"
        );
    }
}

#[test]
fn udp_and_listening_sockets_stay_in_the_workers_namespace() {
    let udp_profile = "extends = \"claude-code\"\n[network]\nudp = true\n";
    let Some(h) = privileged("builds sandboxes").then(|| Host::new(&[("udp", udp_profile)])) else {
        return;
    };
    // A host UDP service on loopback: the worker's datagram goes to its own
    // loopback, where nothing listens.
    let service = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = service.local_addr().unwrap().port().to_string();
    let bin = h.install_attack("alice", "demo");
    let out = h.run("alice", "demo", "udp", &[&bin, "udp", &port]);
    assert_eq!(out.result(), "OK", "the send itself succeeds, inside");
    service.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 64];
    assert!(service.recv_from(&mut buf).is_err(), "no datagram reached the host");

    // listen() without bind() serves on every address of the worker's own
    // namespace only: the host cannot reach it.
    let dirs = h.prepare("alice", PROFILE, "demo");
    let file = dirs.workspace.join("autobind-port");
    let _ = std::fs::remove_file(&file);
    let w = h
        .spawn(
            "alice",
            "demo",
            PROFILE,
            &[&bin, "listen_autobind", "3", "/workspace/demo/autobind-port"],
        )
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let port = loop {
        if let Some(p) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|p| p.trim().parse::<u16>().ok())
        {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "the worker wrote its port");
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500));
    let out = w.wait(Duration::from_secs(30));
    assert_eq!(
        out.result(),
        "NOBODY",
        "the host's connect to port {port} did not reach the worker"
    );
}

#[test]
fn proc_net_shows_only_the_workers_own_sockets() {
    let Some(h) = host() else { return };
    let _tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let _unix = UnixListener::bind(h.state.path().join("host.sock")).unwrap();
    // Its own namespace holds warden's two proxy listeners (HTTP, SOCKS; a
    // Claude Code worker has its API gateway's too) and nothing of the host's.
    assert_eq!(attack(&h, &["procnet", "tcp"]), "2");
    assert_eq!(attack(&h, &["procnet", "tcp6"]), "0");
    assert_eq!(attack(&h, &["procnet", "unix"]), "0");
    assert_eq!(attack(&h, &["procnet", "udp"]), "0");
}

#[test]
fn a_setuid_root_binary_does_not_raise_privileges() {
    let Some(h) = host() else { return };
    let dirs = h.prepare("alice", PROFILE, "demo");
    let suid = dirs.workspace.join("suid-attack");
    std::fs::copy(bin_dir().join("warden-attack"), &suid).unwrap();
    std::os::unix::fs::chown(&suid, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&suid, std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    let uid = h.users.identity("alice").unwrap().uid;
    let out = h.run("alice", "demo", PROFILE, &["/workspace/demo/suid-attack", "ids"]);
    assert_eq!(out.result(), format!("uid={uid} euid={uid}"));
}

#[test]
fn proc_sys_and_cgroupfs_are_not_writable() {
    let Some(h) = host() else { return };
    assert_eq!(attack(&h, &["write", "/proc/sys/kernel/hostname"]), "EACCES");
    assert_eq!(attack(&h, &["write", "/proc/sys/vm/overcommit_memory"]), "EACCES");
    let cgroup_file = if std::path::Path::new("/sys/fs/cgroup/pids/cgroup.procs").exists() {
        "/sys/fs/cgroup/pids/cgroup.procs"
    } else {
        "/sys/fs/cgroup/cgroup.procs"
    };
    assert_eq!(attack(&h, &["write", cgroup_file]), "EROFS");
}

#[test]
fn the_hosts_proc_1_environ_is_unreachable() {
    let Some(h) = host() else { return };
    // /proc/1 inside is the worker's own init, which dropped privileges and
    // is not dumpable: even its environment is closed to the worker.
    assert_eq!(attack(&h, &["read", "/proc/1/environ"]), "EACCES");
}

#[test]
fn fds_opened_by_the_parent_are_not_inherited() {
    let Some(h) = host() else { return };
    // Opened without O_CLOEXEC, so a plain fork+exec would pass it on.
    let leaked = nix::fcntl::open(
        "/etc/hostname",
        nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    let r = attack(&h, &["fds"]);
    drop(leaked);
    assert_eq!(r, "0,1,2");
}

#[test]
fn a_fork_bomb_stops_at_pids_max_and_the_host_stays_responsive() {
    let Some(h) = host() else { return };
    let bin = h.install_attack("alice", "demo");
    let w = h.spawn("alice", "demo", "tight", &[&bin, "forkbomb"]).unwrap();
    // While the bomb runs, the host still starts and reaps processes.
    let ok = std::process::Command::new("true").status().unwrap();
    assert!(ok.success());
    let out = w.wait(Duration::from_secs(60));
    assert_eq!(out.result(), "EAGAIN");
    assert!(
        out.usage.pids_max_hits > 0,
        "pids.events shows the limit was hit: {:?}",
        out.usage
    );
}

#[test]
fn a_memory_hog_is_oom_killed_and_the_kill_is_seen_in_the_cgroup() {
    let Some(h) = host() else { return };
    let bin = h.install_attack("alice", "demo");
    let out = h.run("alice", "demo", "tight", &[&bin, "memhog", "1024"]);
    assert_eq!(out.code, 128 + libc::SIGKILL, "{out:?}");
    assert!(out.usage.oom_kills >= 1, "{:?}", out.usage);
    assert!(!out.stdout.contains("ALLOCATED"));
}

#[test]
fn proc_self_status_shows_the_sandbox() {
    let Some(h) = host() else { return };
    let r = attack(&h, &["status"]);
    assert!(r.contains("NoNewPrivs: 1"), "{r}");
    assert!(r.contains("Seccomp: 2"), "{r}");
    assert!(r.contains("CapEff: 0000000000000000"), "{r}");
    assert!(r.contains("CapBnd: 0000000000000000"), "{r}");
}

#[test]
fn paths_visible_but_not_granted_are_denied_by_landlock() {
    let Some(h) = host() else { return };
    // "/" exists (it holds the binds) but no rule grants reading it.
    landlock_attack(&h, PROFILE, &["list", "/"], "EACCES", "fs.read_dir", Some("/"));
}

/// A primed init (built up to the command: binds, new root, uid, landlock)
/// runs a command only in the sandbox it was built for. Offered a spec
/// whose sandbox part differs in any byte (one landlock rule fewer,
/// another uid) it is let go, `LaunchError::Mismatch`, and nothing runs;
/// offered its own with another command and env, it runs that command,
/// under the seccomp filter installed after the command arrived.
#[test]
fn a_primed_init_runs_only_the_sandbox_it_was_built_for() {
    use warden_daemon::launcher::LaunchError;
    let Some(h) = host() else { return };
    let p = h.prepared("alice", "demo", PROFILE, &["true"]);
    let prime = || {
        h.launcher
            .start(Some(&p.cgroup), Io::Null, Io::Pipe, Io::Pipe)
            .expect("start an init")
            .prime(&p.spec)
            .expect("prime it")
    };
    type Change = fn(&mut warden_policy::LaunchSpec);
    let changes: [(&str, Change); 2] = [
        ("one landlock rule fewer", |s| {
            s.landlock.rules.pop();
        }),
        ("another uid", |s| s.uid += 1),
    ];
    for (what, change) in changes {
        let init = prime();
        assert_eq!(p.cgroup.pids().len(), 1, "the primed init waits in its cgroup");
        let mut other = p.spec.clone();
        change(&mut other);
        let e = init.go(&other).expect_err(what);
        assert!(matches!(e, LaunchError::Mismatch), "{what}: {e}");
        assert!(p.cgroup.pids().is_empty(), "{what}: the init was let go, nothing ran");
    }
    let init = prime();
    let mut own = p.spec.clone();
    own.argv = [
        "/bin/sh",
        "-c",
        "echo $GREETING; id -u; grep ^Seccomp: /proc/self/status",
    ]
    .map(String::from)
    .to_vec();
    own.env.push(("GREETING".into(), "the second command".into()));
    let launched = init.go(&own).expect("its own sandbox, another command");
    let uid = p.spec.uid;
    let out = h.running(p, launched).wait(Duration::from_secs(20));
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "the second command");
    assert_eq!(lines[1], uid.to_string());
    assert_eq!(lines[2].split_whitespace().collect::<Vec<_>>(), ["Seccomp:", "2"]);
    let marks: Vec<&str> = out.enforced.marks.iter().map(|m| m.stage.as_str()).collect();
    let at = |s: &str| {
        marks
            .iter()
            .position(|m| *m == s)
            .unwrap_or_else(|| panic!("no {s} in {marks:?}"))
    };
    assert!(
        at("landlock") < at("command") && at("command") < at("seccomp"),
        "{marks:?}"
    );
}
