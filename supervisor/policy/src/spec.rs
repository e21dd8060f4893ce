//! The launch spec: everything `warden-launch` needs to build one worker's
//! sandbox, fully resolved (no variables, no profile lookups, the seccomp
//! program already compiled). The daemon writes it as JSON to an inherited
//! fd; it is never passed in argv or the environment.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::PolicyError;
use crate::names;
use crate::network::{NetworkMode, GATEWAY_PORT, HTTP_PROXY_PORT, SOCKS_PORT};
use crate::profile::{Access, FsRule, Profile};
use crate::seccomp::{self, Arch};

/// Bumped whenever the launcher cannot read an older spec correctly.
pub const SPEC_VERSION: u32 = 4;

/// What the daemon asks for: who, where, what to run.
#[derive(Debug, Clone)]
pub struct SpawnRequest {
    pub worker_id: String,
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    pub project: String,
    pub argv: Vec<String>,
    /// Variables the client asked for; each must be in the profile's `pass` list.
    pub env: BTreeMap<String, String>,
    /// The user's home and project workspace on the host (already created).
    pub home_dir: PathBuf,
    pub workspace_dir: PathBuf,
    /// `cgroup.procs` files the launcher joins before anything else runs.
    pub cgroup_procs: Vec<PathBuf>,
    /// Host paths no profile may expose (warden's state dir, its socket dir).
    pub protected: Vec<PathBuf>,
    /// Files warden provides at a fixed path inside (Claude Code's binary
    /// and managed settings), always read-only, executable where asked.
    pub extra_binds: Vec<Bind>,
}

/// A host path made visible inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    pub source: PathBuf,
    pub target: String,
    pub access: Access,
    /// A profile path missing on this host is skipped; the user's own
    /// directories must exist.
    pub required: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub name: String,
    /// `None`: unlimited.
    pub value: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockSpec {
    /// Refuse to start the worker if the kernel offers less.
    pub min_abi: u32,
    /// Paths inside the sandbox and their rights.
    pub rules: Vec<FsRule>,
    /// Restrict TCP bind/connect to these (loopback) ports.
    pub restrict_tcp: bool,
    pub tcp_connect: Vec<u16>,
    pub tcp_bind: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompSpec {
    pub arch: String,
    /// The resolved allowlist, for reports and `profile explain`.
    pub allowed: Vec<String>,
    /// The BPF program as (code, jt, jf, k). Denied calls return
    /// `SECCOMP_RET_USER_NOTIF`: the worker's process installs it with a
    /// listener, which it hands to its init; the init answers every denied
    /// call with EPERM and reports them on a pipe to the daemon.
    pub program: Vec<(u16, u8, u8, u32)>,
    /// The init's reports: a burst, then one per `report_interval_us`
    /// (the rest are counted, in the next report's `suppressed`).
    pub report_burst: u64,
    pub report_interval_us: u64,
}

impl SeccompSpec {
    /// The rate the init reports denials at.
    pub fn report_rate(&self) -> crate::Rate {
        #[allow(clippy::cast_precision_loss)] // Intervals far below 2^52 µs.
        let per_second = 1e6 / self.report_interval_us.max(1) as f64;
        crate::Rate::new(self.report_burst, per_second)
    }

    /// Sets the report rate (from the daemon's `rate_limits.worker_denials`).
    pub fn set_report_rate(&mut self, rate: crate::Rate) {
        self.report_burst = rate.burst;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // A positive interval in µs.
        let interval = (1e6 / rate.per_second.max(1e-6)).round() as u64;
        self.report_interval_us = interval.max(1);
    }
}

/// One line on a worker's denial pipe, from its init to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenialReport {
    /// The call's name (or `syscall_N`), or `(suppressed)` for a last count.
    pub syscall: String,
    /// The calling process, in the worker's PID namespace.
    pub pid: u32,
    /// Denials not reported since the previous report.
    pub suppressed: u64,
}

/// A file the launcher writes into the new root (read-only inside).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyntheticFile {
    pub path: String,
    pub content: String,
}

/// What a listener on the worker's loopback is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerKind {
    HttpProxy,
    Socks,
    Gateway,
}

/// A listening TCP socket the launcher creates on 127.0.0.1 inside the
/// worker's network namespace and hands to the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    pub kind: ListenerKind,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub version: u32,
    pub worker_id: String,
    pub profile: String,
    /// sha256 of the resolved profile, so an event can say which policy ran.
    pub policy_digest: String,
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    /// The worker's listeners, in the order their descriptors go to the
    /// daemon (after the denial pipe). Empty in mode `none`.
    pub listeners: Vec<Listener>,
    pub binds: Vec<Bind>,
    pub tmp_size: u64,
    /// `/etc/passwd`, `/etc/group`, `/etc/hosts`, `/etc/resolv.conf`.
    pub files: Vec<SyntheticFile>,
    pub rlimits: Vec<Rlimit>,
    pub landlock: LandlockSpec,
    pub seccomp: SeccompSpec,
    pub timeout_secs: Option<u64>,
    pub cgroup_procs: Vec<PathBuf>,
}

/// Paths the launcher builds itself rather than binding from the host.
const SYNTHESIZED: &[&str] = &[
    "/dev",
    "/proc",
    "/tmp",
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/resolv.conf",
];

/// The proxy environment of a `proxy` worker: common tools (curl, git, pip,
/// npm, node, cargo, Claude Code) send their traffic to wardend's proxy.
fn proxy_env() -> Vec<(&'static str, String)> {
    let http = format!("http://127.0.0.1:{HTTP_PROXY_PORT}");
    let socks = format!("socks5h://127.0.0.1:{SOCKS_PORT}");
    let local = "localhost,127.0.0.1,::1".to_string();
    vec![
        ("HTTP_PROXY", http.clone()),
        ("HTTPS_PROXY", http.clone()),
        ("ALL_PROXY", socks.clone()),
        ("NO_PROXY", local.clone()),
        // curl reads only the lower-case http_proxy.
        ("http_proxy", http.clone()),
        ("https_proxy", http.clone()),
        ("all_proxy", socks),
        ("no_proxy", local),
        // Node's own fetch and http honour the variables with this (Node 22.21, 24).
        ("NODE_USE_ENV_PROXY", "1".into()),
        ("npm_config_proxy", http.clone()),
        ("npm_config_https_proxy", http),
    ]
}

fn substitute(s: &str, vars: &BTreeMap<&str, String>) -> String {
    let mut out = s.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("${{{k}}}"), v);
    }
    out
}

fn is_beneath(path: &str, dir: &str) -> bool {
    path == dir || path.starts_with(&format!("{dir}/"))
}

/// Digest of a resolved profile (stable: serde_json of a struct with
/// ordered collections).
pub fn policy_digest(profile: &Profile) -> String {
    let json = serde_json::to_vec(profile).unwrap_or_default();
    let hash = Sha256::digest(&json);
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compiles `profile` for `req` into a launch spec for `arch`.
/// The profile's rlimits, with the disk limit as the largest file a
/// worker may write (RLIMIT_FSIZE): a second line under the project quota,
/// and the only one on a file system outside the user's tree that the
/// profile makes writable.
fn rlimits(limits: &crate::profile::Limits) -> Vec<Rlimit> {
    let mut map = limits.rlimits.clone();
    if let Some(disk) = limits.disk {
        let fsize = map.entry("fsize".to_string()).or_insert(None);
        *fsize = Some(fsize.map_or(disk, |v| v.min(disk)));
    }
    map.into_iter().map(|(name, value)| Rlimit { name, value }).collect()
}

/// The worker's home and workspace inside its sandbox, and the variables
/// profile paths and values may use.
struct Places {
    home: String,
    workspace: String,
    vars: BTreeMap<&'static str, String>,
}

fn places(req: &SpawnRequest) -> Places {
    let home = format!("/home/{}", req.user);
    let workspace = format!("/workspace/{}", req.project);
    let vars = BTreeMap::from([
        ("HOME", home.clone()),
        ("WORKSPACE", workspace.clone()),
        ("TMP", "/tmp".to_string()),
        ("USER", req.user.clone()),
    ]);
    Places { home, workspace, vars }
}

/// The command part of the spec [`compile`] makes for `req` under
/// `profile`: the argv (checked) and the environment: the profile's fixed
/// values, then what the client may pass, then the identity warden
/// guarantees (and, in mode `proxy`, the proxy's address). A spawn served
/// by an init primed for its sandbox needs only this.
pub fn command(profile: &Profile, req: &SpawnRequest) -> Result<LaunchCommand, PolicyError> {
    command_in(profile, req, &places(req))
}

fn command_in(profile: &Profile, req: &SpawnRequest, places: &Places) -> Result<LaunchCommand, PolicyError> {
    let bad = |m: String| PolicyError::Request(m);
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(bad("the command is empty".into()));
    }
    if req.argv.iter().any(|a| a.contains('\0')) {
        return Err(bad("an argument contains NUL".into()));
    }
    let vars = &places.vars;
    let mut env: BTreeMap<String, String> = profile
        .environment
        .set
        .iter()
        .map(|(k, v)| (k.clone(), substitute(v, vars)))
        .collect();
    for (k, v) in &req.env {
        if !profile.environment.pass.contains(k) {
            return Err(bad(format!(
                "environment variable {k} is not allowed by profile {}",
                profile.name
            )));
        }
        if v.contains('\0') {
            return Err(bad(format!("environment variable {k} contains NUL")));
        }
        env.insert(k.clone(), v.clone());
    }
    env.insert("HOME".into(), places.home.clone());
    env.insert("USER".into(), req.user.clone());
    env.insert("LOGNAME".into(), req.user.clone());
    env.insert("PWD".into(), places.workspace.clone());
    env.entry("TMPDIR".into()).or_insert_with(|| "/tmp".into());
    if profile.network.mode == NetworkMode::Proxy {
        for (k, v) in proxy_env() {
            env.insert(k.into(), v);
        }
    }
    Ok(LaunchCommand {
        argv: req.argv.clone(),
        env: env.into_iter().collect(),
    })
}

pub fn compile(profile: &Profile, req: &SpawnRequest, arch: Arch) -> Result<LaunchSpec, PolicyError> {
    let bad = |m: String| PolicyError::Request(m);
    names::check_user(&req.user).map_err(|e| bad(e.to_string()))?;
    names::check_project(&req.project).map_err(|e| bad(e.to_string()))?;
    if req.uid == 0 || req.gid == 0 {
        return Err(bad("a worker never runs as uid or gid 0".into()));
    }
    let here = places(req);
    let LaunchCommand { argv, env } = command_in(profile, req, &here)?;
    let Places { home, workspace, vars } = here;

    // Landlock rules: every profile path, variables resolved.
    let mut rules: Vec<FsRule> = profile
        .filesystem
        .iter()
        .map(|r| FsRule {
            path: substitute(&r.path, &vars),
            access: r.access,
        })
        .collect();

    // The files the launcher writes are readable, whatever the profile lists.
    for f in ["/etc/passwd", "/etc/group", "/etc/hosts", "/etc/resolv.conf"] {
        if !rules.iter().any(|r| r.path == f) {
            rules.push(FsRule {
                path: f.into(),
                access: Access::READ,
            });
        }
    }

    // Mounts: the user's directories, then every profile path that is not
    // inside them or synthesized by the launcher.
    let mut binds = vec![
        Bind {
            source: req.home_dir.clone(),
            target: home.clone(),
            access: Access {
                read: true,
                write: true,
                exec: rules.iter().any(|r| is_beneath(&home, &r.path) && r.access.exec),
            },
            required: true,
        },
        Bind {
            source: req.workspace_dir.clone(),
            target: workspace.clone(),
            access: Access {
                read: true,
                write: true,
                exec: rules.iter().any(|r| is_beneath(&workspace, &r.path) && r.access.exec),
            },
            required: true,
        },
    ];
    for r in &rules {
        let inside_own = [home.as_str(), workspace.as_str()]
            .iter()
            .chain(SYNTHESIZED)
            .any(|d| is_beneath(&r.path, d));
        if inside_own {
            continue;
        }
        for p in &req.protected {
            let p = p.to_string_lossy();
            if is_beneath(&p, &r.path) || is_beneath(&r.path, &p) {
                return Err(bad(format!(
                    "profile {} grants {} which would expose warden's own {}",
                    profile.name, r.path, p
                )));
            }
        }
        binds.push(Bind {
            source: PathBuf::from(&r.path),
            target: r.path.clone(),
            access: r.access,
            required: false,
        });
    }
    for b in &req.extra_binds {
        if !b.target.starts_with('/') || b.target.split('/').any(|c| c == "..") {
            return Err(bad(format!("invalid bind target {}", b.target)));
        }
        // Read-only always; executable where asked (the claude binary).
        let access = Access {
            read: true,
            write: false,
            exec: b.access.exec,
        };
        binds.push(Bind {
            access,
            required: true,
            ..b.clone()
        });
        rules.push(FsRule {
            path: b.target.clone(),
            access,
        });
    }
    binds.sort_by(|a, b| a.target.cmp(&b.target));

    let net = &profile.network;
    let mut listeners = Vec::new();
    if net.mode == NetworkMode::Proxy {
        listeners.push(Listener {
            kind: ListenerKind::HttpProxy,
            port: HTTP_PROXY_PORT,
        });
        listeners.push(Listener {
            kind: ListenerKind::Socks,
            port: SOCKS_PORT,
        });
    }
    // Claude Code talks to the API through its gateway, in every mode: the
    // agent's own requests, with a credential that works nowhere else.
    if profile.claude.is_some() {
        listeners.push(Listener {
            kind: ListenerKind::Gateway,
            port: GATEWAY_PORT,
        });
    }

    let hostname = format!("warden-{}", req.user);
    let passwd = format!(
        "root:x:0:0:root:/root:/usr/sbin/nologin\n{u}:x:{uid}:{gid}:warden user {u}:{home}:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        u = req.user,
        uid = req.uid,
        gid = req.gid,
    );
    let group = format!(
        "root:x:0:\n{u}:x:{gid}:\nnogroup:x:65534:\n",
        u = req.user,
        gid = req.gid
    );
    let hosts = format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n");
    // No resolver is reachable inside: a tool that ignores the proxy fails at
    // once (connection refused) instead of waiting or leaking.
    let resolv = match net.mode {
        NetworkMode::Proxy => {
            "# warden: no DNS inside this sandbox. Names are resolved by wardend's proxy\n\
             # (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY in the environment).\n"
        }
        NetworkMode::None => "# warden: no DNS inside this sandbox: its profile has no network.\n",
    }
    .to_string()
        + "nameserver 127.0.0.1\noptions attempts:1 timeout:1\n";
    let file = |path: &str, content: String| SyntheticFile {
        path: path.into(),
        content,
    };

    let allowed = seccomp::allowed_calls(&profile.seccomp);
    let program = seccomp::compiled(&allowed, net.udp, arch)
        .into_iter()
        .map(|i| (i.code, i.jt, i.jf, i.k))
        .collect();

    let mut seccomp = SeccompSpec {
        arch: arch.name().to_string(),
        allowed,
        program,
        report_burst: 0,
        report_interval_us: 0,
    };
    // The daemon sets its configured rate over this default.
    seccomp.set_report_rate(crate::config::RateLimits::default().worker_denials);

    Ok(LaunchSpec {
        version: SPEC_VERSION,
        worker_id: req.worker_id.clone(),
        profile: profile.name.clone(),
        policy_digest: policy_digest(profile),
        user: req.user.clone(),
        uid: req.uid,
        gid: req.gid,
        hostname,
        argv,
        env,
        cwd: workspace,
        binds,
        tmp_size: profile.limits.tmpfs_size,
        files: vec![
            file("/etc/passwd", passwd),
            file("/etc/group", group),
            file("/etc/hosts", hosts),
            file("/etc/resolv.conf", resolv),
        ],
        rlimits: rlimits(&profile.limits),
        landlock: LandlockSpec {
            min_abi: profile.landlock_min_abi,
            rules,
            // Profiles that allow sockets require ABI 4 (checked when loaded).
            restrict_tcp: profile.landlock_min_abi >= 4,
            // The worker's own servers, and warden's listeners.
            tcp_connect: net
                .tcp_bind
                .iter()
                .copied()
                .chain(listeners.iter().map(|l| l.port))
                .collect(),
            tcp_bind: net.tcp_bind.iter().copied().collect(),
        },
        listeners,
        seccomp,
        timeout_secs: profile.limits.timeout_secs,
        cgroup_procs: req.cgroup_procs.clone(),
    })
}

impl LaunchSpec {
    /// The spec as the launcher reads it.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The first frame on the spec pipe: the spec without its command
    /// (argv and env empty), everything the init builds before the command
    /// arrives. Two specs whose sandbox parts are equal, byte for byte,
    /// build the same sandbox.
    pub fn sandbox_json(&self) -> Vec<u8> {
        self.sandbox().to_json()
    }

    /// The spec without its command (argv and env empty).
    fn sandbox(&self) -> LaunchSpec {
        LaunchSpec {
            argv: Vec::new(),
            env: Vec::new(),
            ..self.clone()
        }
    }

    /// Whether `other` builds the same sandbox as this spec: all of it but
    /// the command is equal (what [`sandbox_json`](Self::sandbox_json)
    /// writes is then equal byte for byte).
    pub fn same_sandbox(&self, other: &LaunchSpec) -> bool {
        self.sandbox() == other.sandbox()
    }

    /// The second frame on the spec pipe.
    pub fn command(&self) -> LaunchCommand {
        LaunchCommand {
            argv: self.argv.clone(),
            env: self.env.clone(),
        }
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ProfileSet;

    fn req() -> SpawnRequest {
        SpawnRequest {
            worker_id: "w1".into(),
            user: "alice".into(),
            uid: 200_001,
            gid: 200_001,
            project: "demo".into(),
            argv: vec!["/bin/true".into()],
            env: BTreeMap::new(),
            home_dir: "/var/lib/warden/users/alice/profiles/base/home".into(),
            workspace_dir: "/var/lib/warden/users/alice/profiles/base/workspace/demo".into(),
            cgroup_procs: vec![],
            protected: vec!["/var/lib/warden".into(), "/run/warden".into()],
            extra_binds: vec![],
        }
    }

    /// Every shipped profile loads, resolves and compiles for both
    /// architectures into a non-trivial, enforcing policy.
    #[test]
    fn every_shipped_profile_compiles_for_x86_64_and_aarch64() {
        let set = ProfileSet::embedded().unwrap();
        let names: Vec<&str> = set.names().collect();
        assert_eq!(names, ["base", "claude-code", "offline", "strict"]);
        for profile in set.iter() {
            for arch in Arch::ALL {
                let spec = compile(profile, &req(), arch)
                    .unwrap_or_else(|e| panic!("{} on {}: {e}", profile.name, arch.name()));
                assert!(spec.seccomp.program.len() > 100, "{}", profile.name);
                assert!(!spec.landlock.rules.is_empty());
                assert!(spec.landlock.min_abi >= 1);
                assert!(!spec.seccomp.allowed.iter().any(|c| c == "ptrace"));
                assert!(spec.binds.iter().any(|b| b.target == "/workspace/demo"));
                let back = LaunchSpec::from_json(&spec.to_json()).unwrap();
                assert_eq!(back, spec);
            }
        }
    }

    #[test]
    fn the_command_alone_is_what_compile_makes_and_leaves_the_sandbox_as_it_is() {
        let set = ProfileSet::embedded().unwrap();
        for profile in set.iter() {
            let first = compile(profile, &req(), Arch::X86_64).unwrap();
            let mut other = req();
            other.argv = vec!["/bin/echo".into(), "hi".into()];
            if let Some(k) = profile.environment.pass.iter().next() {
                other.env.insert(k.clone(), "x".into());
            }
            let second = compile(profile, &other, Arch::X86_64).unwrap();
            assert_eq!(command(profile, &other).unwrap(), second.command(), "{}", profile.name);
            assert!(first.same_sandbox(&second), "{}", profile.name);
            assert_eq!(first.sandbox_json(), second.sandbox_json());
            let mut uid = req();
            uid.uid += 1;
            assert!(!first.same_sandbox(&compile(profile, &uid, Arch::X86_64).unwrap()));
            // The command's own checks are compile's.
            let mut empty = req();
            empty.argv.clear();
            assert!(command(profile, &empty).unwrap_err().to_string().contains("empty"));
            let mut smuggled = req();
            smuggled.env.insert("LD_PRELOAD".into(), "/x.so".into());
            assert!(command(profile, &smuggled).is_err());
        }
    }

    #[test]
    fn a_disk_limit_is_also_the_largest_file() {
        let mut sources = crate::Source::embedded();
        for (name, text) in [
            ("small", "extends = \"base\"\n[limits]\ndisk = \"1G\"\n"),
            ("smaller", "extends = \"small\"\n[limits.rlimits]\nfsize = 536870912\n"),
            ("bogus", "extends = \"base\"\n[limits]\ndisk = \"lots\"\n"),
        ] {
            sources.push(crate::Source {
                name: name.into(),
                origin: format!("test:{name}"),
                text: text.into(),
            });
        }
        let e = ProfileSet::from_sources(sources.clone()).unwrap_err().to_string();
        assert!(e.contains("test:bogus"), "{e}");
        sources.pop();
        let set = ProfileSet::from_sources(sources).unwrap();
        let fsize = |name: &str| {
            let spec = compile(set.get(name).unwrap(), &req(), Arch::X86_64).unwrap();
            spec.rlimits.iter().find(|r| r.name == "fsize").and_then(|r| r.value)
        };
        assert_eq!(set.get("small").unwrap().limits.disk, Some(1 << 30));
        assert_eq!(fsize("small"), Some(1 << 30));
        assert_eq!(fsize("smaller"), Some(512 << 20), "a lower fsize of the profile stays");
        assert_eq!(fsize("base"), None);
    }

    #[test]
    fn variables_resolve_and_env_is_filtered() {
        let set = ProfileSet::embedded().unwrap();
        let p = set.get("claude-code").unwrap();
        let spec = compile(p, &req(), Arch::X86_64).unwrap();
        assert!(spec
            .landlock
            .rules
            .iter()
            .any(|r| r.path == "/workspace/demo" && r.access.write));
        assert!(spec
            .landlock
            .rules
            .iter()
            .any(|r| r.path == "/home/alice" && r.access.write));
        let env: BTreeMap<_, _> = spec.env.iter().cloned().collect();
        assert_eq!(env["HOME"], "/home/alice");
        assert_eq!(spec.cwd, "/workspace/demo");
        assert!(spec.files[0].content.contains("alice:x:200001:200001:"));

        let mut r = req();
        r.env.insert("LD_PRELOAD".into(), "/tmp/x.so".into());
        let e = compile(p, &r, Arch::X86_64).unwrap_err().to_string();
        assert!(e.contains("LD_PRELOAD is not allowed"), "{e}");
    }

    #[test]
    fn bad_requests_are_refused() {
        let set = ProfileSet::embedded().unwrap();
        let p = set.get("base").unwrap();
        let mut r = req();
        r.user = "../root".into();
        assert!(compile(p, &r, Arch::X86_64).is_err());
        let mut r = req();
        r.uid = 0;
        assert!(compile(p, &r, Arch::X86_64).is_err());
        let mut r = req();
        r.argv.clear();
        assert!(compile(p, &r, Arch::X86_64).is_err());
    }

    #[test]
    fn a_profile_may_not_expose_wardens_state() {
        let set = ProfileSet::embedded().unwrap();
        let p = set
            .check(crate::Source {
                name: "leaky".into(),
                origin: "leaky.toml".into(),
                text: "extends = \"base\"\n[filesystem]\nread_only = [\"/var\"]\n".into(),
            })
            .unwrap();
        let e = compile(&p, &req(), Arch::X86_64).unwrap_err().to_string();
        assert!(e.contains("would expose warden's own /var/lib/warden"), "{e}");
    }
}

/// The command of a worker: the second frame on the spec pipe (see
/// [`frame`]), after the sandbox part of its [`LaunchSpec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchCommand {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl LaunchCommand {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The largest frame the init reads from its spec pipe.
pub const MAX_FRAME: usize = 16 << 20;

/// One frame of the spec pipe: a little-endian u32 length, then that many
/// bytes of JSON. The pipe carries two: the [`LaunchSpec`]'s sandbox part
/// ([`LaunchSpec::sandbox_json`]), then its [`LaunchCommand`]. The init
/// builds the sandbox from the first, writes [`LaunchReport::Primed`] and
/// waits for the second (a primed init waits there until a spawn with the
/// same sandbox part takes it); EOF instead ends it.
pub fn frame(json: &[u8]) -> Vec<u8> {
    let len = u32::try_from(json.len()).unwrap_or(u32::MAX);
    let mut v = Vec::with_capacity(json.len() + 4);
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(json);
    v
}

/// What `warden-launch` writes on its report pipe: zero or more records, one
/// JSON object per line. EOF with no `Failed` record means the worker was
/// exec'd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LaunchReport {
    /// The sandbox is built up to the command: the init waits for it.
    Primed,
    /// The sandbox is in place: what was actually enforced.
    Enforced(Enforced),
    /// Setup failed at `stage`; the worker never ran.
    Failed { stage: String, errno: i32, message: String },
}

/// A request to the launch server (`warden-launch --serve`): one
/// SOCK_SEQPACKET message of JSON, with the descriptors of
/// [`LaunchRequest::FDS`] attached (SCM_RIGHTS) in that order, then
/// `cgroups` directories of the worker's cgroup: one of cgroup v2
/// (`into_cgroup`: the kernel creates the init in it, `CLONE_INTO_CGROUP`)
/// or one per controller of v1 (the init moves itself into each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchRequest {
    pub cgroups: usize,
    pub into_cgroup: bool,
}

impl LaunchRequest {
    /// What each attached descriptor is, in order: the worker's stdio, the
    /// report socket (records, then EOF at exec), the status pipe (the
    /// init writes its exit code there as one byte before it exits) and
    /// the pipe the spec arrives on.
    pub const FDS: [&'static str; 6] = ["stdin", "stdout", "stderr", "report", "status", "spec"];

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The launch server's answer to a [`LaunchRequest`]: the worker's init was
/// created (its pidfd attached), or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LaunchReply {
    /// The init's pid as the host sees it.
    Started {
        pid: u32,
    },
    Failed {
        stage: String,
        errno: i32,
        message: String,
    },
}

impl LaunchReply {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The sandbox as the kernel enforces it, reported just before exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enforced {
    pub landlock_abi: u32,
    pub landlock_fs: bool,
    pub landlock_tcp: bool,
    pub landlock_scoped: bool,
    pub seccomp_filter_len: usize,
    pub namespaces: Vec<String>,
    pub no_new_privs: bool,
    pub capabilities_empty: bool,
    pub uid: u32,
    pub gid: u32,
    /// The ports of the listeners handed to the daemon, in the spec's order.
    #[serde(default)]
    pub listeners: Vec<u16>,
    /// When each stage of the setup ended (CLOCK_MONOTONIC), in order.
    #[serde(default)]
    pub marks: Vec<Mark>,
}

/// The end of a setup stage, on CLOCK_MONOTONIC (one clock for the
/// daemon and the launcher).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub stage: String,
    pub at_ns: u64,
}

impl LaunchReport {
    pub fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}
