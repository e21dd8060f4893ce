//! Test harness: a real host-side setup (users, cgroups, profiles, the real
//! `warden-launch` binary) in a temporary state directory, for tests that
//! run workers in real sandboxes. Needs root; see
//! [`warden_daemon::privileged`].

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use warden_daemon::cgroups::{Cgroups, Usage, WorkerCgroup, V1_CONTROLLERS};
use warden_daemon::disk::Disk;
use warden_daemon::launcher::{Io, LaunchError, Launched, Launcher};
use warden_daemon::users::{UserDirs, Users};
use warden_daemon::workers::spawn::{self, RequestedLimits, SpawnParams};
use warden_policy::config::Config;
use warden_policy::{Enforced, ProfileSet, Source};

pub use warden_daemon::privileged;

pub mod claude;
pub mod daemon;
pub mod fake_anthropic;
pub mod servers;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The uid range test users get (distinct from any real account here).
pub const TEST_UIDS: std::ops::RangeInclusive<u32> = 210_000..=219_999;

/// The real `claude` binary the tests drive: `$WARDEN_CLAUDE_BIN`, else
/// the pinned copy `tests/run-all` installs in the cargo target directory
/// (`claude-code/` next to `debug/`).
pub fn claude_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("WARDEN_CLAUDE_BIN") {
        return PathBuf::from(p);
    }
    let mut target = bin_dir();
    target.pop();
    target.join("claude-code/node_modules/.bin/claude")
}

/// The directory holding this build's binaries (`debug/` in the cargo
/// target directory).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The real launcher binary of this build.
pub fn launcher_path() -> PathBuf {
    let p = bin_dir().join("warden-launch");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --workspace --bins`",
        p.display()
    );
    p
}

/// One test's host: its own state dir, cgroup parent and profile set, and
/// the daemon's own spawn pipeline ([`spawn::prepare`], then
/// [`spawn::Prepared::launch`]) without a daemon around it.
#[derive(Debug)]
pub struct Host {
    pub state: tempfile::TempDir,
    pub config: Config,
    pub users: Users,
    pub cgroups: Cgroups,
    pub disk: Arc<Disk>,
    pub profiles: ProfileSet,
    /// This host's own launch server (the real warden-launch binary).
    pub launcher: Launcher,
    cgroup_parents: Vec<PathBuf>,
}

/// The result of a finished worker.
#[derive(Debug)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub usage: Usage,
    pub enforced: Enforced,
    pub timed_out: bool,
    /// The seccomp denials reported while it ran (syscall names).
    pub denials: Vec<String>,
}

impl Outcome {
    /// The value of the `RESULT` line a warden-attack run printed.
    pub fn result(&self) -> &str {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .unwrap_or_else(|| {
                panic!(
                    "no RESULT line; exit {} stdout {:?} stderr {:?}",
                    self.code, self.stdout, self.stderr
                )
            })
    }
}

/// A running worker.
#[derive(Debug)]
pub struct Running {
    pub launched: Launched,
    pub cgroup: WorkerCgroup,
    denials: Option<std::thread::JoinHandle<Vec<String>>>,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
}

/// Waits for `child` until `deadline`, woken by its pidfd when it exits
/// (no polling delay: warden-bench times runs with this); None: still
/// running at the deadline.
pub fn wait_until(child: &mut std::process::Child, deadline: Instant) -> Option<std::process::ExitStatus> {
    let pidfd = warden_daemon::sys::pidfd_open(child.id()).expect("pidfd_open");
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return Some(s);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let wait = nix::poll::PollTimeout::try_from(left).unwrap_or(nix::poll::PollTimeout::MAX);
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&pidfd),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, wait);
    }
}

fn drain(r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let mut r = r;
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// The bytes `r` gives until its end, read on a thread of their own.
pub fn drain_bytes(r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut r = r;
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

impl Host {
    /// A host with the shipped profiles plus `extra` (name, TOML) ones.
    pub fn new(extra: &[(&str, &str)]) -> Host {
        let state = tempfile::Builder::new()
            .prefix("warden-test-")
            .tempdir()
            .expect("tempdir");
        let disk = Arc::new(Disk::probe(state.path()));
        let users = Users::open(state.path(), TEST_UIDS)
            .expect("users")
            .with_projects(disk.counts());
        let name = format!(
            "warden-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let cgroups = Cgroups::detect(&name).expect("cgroups");
        let cgroup_parents = if cgroups.is_v2() {
            vec![]
        } else {
            V1_CONTROLLERS
                .iter()
                .map(|c| PathBuf::from(format!("/sys/fs/cgroup/{c}/{name}")))
                .collect()
        };
        let mut sources = Source::embedded();
        sources.extend(extra.iter().map(|(n, t)| Source {
            name: (*n).into(),
            origin: format!("test:{n}"),
            text: (*t).into(),
        }));
        let profiles = ProfileSet::from_sources(sources).expect("test profiles");
        let mut config = Config::embedded();
        config.state_dir = state.path().to_path_buf();
        Host {
            state,
            config,
            users,
            cgroups,
            disk,
            profiles,
            launcher: Launcher::new(&launcher_path(), None),
            cgroup_parents,
        }
    }

    /// The user's directories for `project` under `profile` (each profile
    /// has its own).
    pub fn prepare(&self, user: &str, profile: &str, project: &str) -> UserDirs {
        self.users.prepare(user, profile, project).expect("prepare user dirs")
    }

    /// Copies the warden-attack binary into the user's workspace under
    /// every profile of this host, owned by the user; returns its path
    /// inside the sandbox.
    pub fn install_attack(&self, user: &str, project: &str) -> String {
        let id = self.users.identity(user).expect("identity");
        for profile in self.profiles.names() {
            let dst = self.prepare(user, profile, project).workspace.join("warden-attack");
            std::fs::copy(bin_dir().join("warden-attack"), &dst).expect("copy warden-attack");
            std::os::unix::fs::chown(&dst, Some(id.uid), Some(id.gid)).expect("chown");
        }
        format!("/workspace/{project}/warden-attack")
    }

    /// Starts a worker; stdin is /dev/null, stdout and stderr are collected.
    pub fn spawn(&self, user: &str, project: &str, profile: &str, argv: &[&str]) -> Result<Running, LaunchError> {
        self.spawn_with_stdin(user, project, profile, argv, Io::Null)
    }

    /// Like [`spawn`](Self::spawn) with a given stdin (a pty, say).
    pub fn spawn_with_stdin(
        &self,
        user: &str,
        project: &str,
        profile: &str,
        argv: &[&str],
        stdin: Io,
    ) -> Result<Running, LaunchError> {
        let prepared = self.prepared(user, project, profile, argv);
        let launched = match prepared.launch(&self.launcher, stdin, Io::Pipe, Io::Pipe) {
            Ok(l) => l,
            Err(e) => {
                prepared.abandon();
                return Err(e);
            }
        };
        Ok(self.running(prepared, launched))
    }

    /// A worker prepared as the daemon prepares one (its cgroup made, its
    /// spec compiled), not launched.
    pub fn prepared(&self, user: &str, project: &str, profile: &str, argv: &[&str]) -> spawn::Prepared {
        let params = SpawnParams {
            user: user.into(),
            project: project.into(),
            profile: profile.into(),
            command: argv.iter().map(|s| (*s).to_string()).collect(),
            env: Default::default(),
            limits: RequestedLimits::default(),
            interactive: false,
            claude: Default::default(),
            caller_uid: None,
        };
        let mut profile = spawn::resolve(&self.profiles, &params).expect("profile");
        // The command runs itself in the profile's sandbox, also under a
        // [claude] profile: attacks and agent work are the worker here,
        // not prompts for Claude (tests/tests/claude_code.rs runs Claude).
        profile.claude = None;
        let host = spawn::Host {
            config: &self.config,
            users: &self.users,
            cgroups: &self.cgroups,
            disk: &self.disk,
        };
        let worker_id = format!("w{}", NEXT.fetch_add(1, Ordering::SeqCst));
        spawn::prepare(&host, &worker_id, None, None, &profile, &params).expect("prepare")
    }

    /// A worker of `prepared`, launched, as [`Host::spawn`] returns it.
    pub fn running(&self, prepared: spawn::Prepared, mut launched: Launched) -> Running {
        let cgroup = prepared.cgroup;
        register_init(launched.process.id(), cgroup.id());
        let out = drain(launched.stdout.take().expect("stdout"));
        let err = drain(launched.stderr.take().expect("stderr"));
        // The init answers denied calls; collect its reports.
        let denials = launched.denials.take().map(|pipe| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = std::io::Read::read_to_end(&mut std::fs::File::from(pipe), &mut buf);
                warden_daemon::denials::parse(&mut buf)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| r.syscall)
                    .collect::<Vec<_>>()
            })
        });
        Running {
            launched,
            cgroup,
            denials,
            out,
            err,
        }
    }

    /// Runs a worker to completion (killing it after `timeout`).
    pub fn run(&self, user: &str, project: &str, profile: &str, argv: &[&str]) -> Outcome {
        let w = self
            .spawn(user, project, profile, argv)
            .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
        w.wait(Duration::from_secs(60))
    }
}

impl Running {
    /// Waits for the worker (its whole cgroup is killed after `timeout`),
    /// reads usage, then removes its cgroup.
    pub fn wait(mut self, timeout: Duration) -> Outcome {
        let mut timed_out = false;
        let status = match self.launched.process.wait_until(Instant::now() + timeout) {
            Some(s) => s,
            None => {
                timed_out = true;
                let _ = self.cgroup.kill_all(Duration::from_secs(5));
                self.launched.process.wait()
            }
        };
        let usage = self.cgroup.usage();
        self.cgroup.kill_all(Duration::from_secs(5)).expect("kill leftovers");
        self.cgroup.remove().expect("remove cgroup");
        use std::os::unix::process::ExitStatusExt;
        let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        Outcome {
            code,
            stdout: self.out.join().unwrap_or_default(),
            stderr: self.err.join().unwrap_or_default(),
            usage,
            enforced: self.launched.enforced,
            timed_out,
            denials: self
                .denials
                .take()
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default(),
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for id in self.cgroups.existing() {
            let cg = self.cgroups.open(&id);
            let _ = cg.kill_all(Duration::from_secs(5));
            let _ = cg.remove();
        }
        for p in &self.cgroup_parents {
            let _ = std::fs::remove_dir(p);
        }
    }
}

/// Is `path` owned by `uid` on the host?
pub fn owner(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.uid()).unwrap_or(u32::MAX)
}

/// A landlock denial as read from the audit stream, resolved to a worker
/// later (the worker may be gone by the time the record is read).
#[derive(Debug, Clone)]
struct RawDenial {
    domain: Option<String>,
    access: String,
    object: String,
}

#[derive(Debug, Default)]
struct LandlockLog {
    /// Landlock domain to the pid of its creator (a worker's init).
    domains: std::collections::HashMap<String, String>,
    /// A worker's init pid (host) to the worker id, registered at spawn.
    inits: std::collections::HashMap<String, String>,
    denials: Vec<RawDenial>,
}

/// One reader of the kernel audit stream for this test process, as wardend
/// has one. Like wardend, if it turns audit on it adds the task rule
/// `never`; it stays when the process ends (a later test deletes it).
fn landlock_log() -> &'static std::sync::Mutex<LandlockLog> {
    static LOG: std::sync::OnceLock<std::sync::Mutex<LandlockLog>> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        if let Ok((sock, exempted)) = warden_daemon::landlock_audit::open(true) {
            let alone = exempted.is_some();
            std::thread::spawn(move || {
                let log = || landlock_log().lock().unwrap_or_else(|p| p.into_inner());
                warden_daemon::landlock_audit::read(
                    &sock,
                    alone,
                    || false,
                    |domain, pid| {
                        log().domains.insert(domain.to_string(), pid.to_string());
                    },
                    |d| {
                        log().denials.push(RawDenial {
                            domain: d.domain,
                            access: d.access,
                            object: d.object,
                        })
                    },
                );
            });
        }
        std::sync::Mutex::new(LandlockLog::default())
    })
}

/// Starts the shared landlock reader (call before spawning workers).
pub fn watch_landlock() {
    let _ = landlock_log();
}

/// Remembers which worker an init pid (as the host sees it) belongs to.
fn register_init(init_pid: u32, id: &str) {
    landlock_log()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .inits
        .insert(init_pid.to_string(), id.to_string());
}

/// Waits up to `timeout` for a landlock denial of worker `id` matching
/// `pred`; returns every denial of that worker seen so far.
pub fn landlock_denials_of(id: &str, timeout: Duration, pred: impl Fn(&str, &str) -> bool) -> Vec<(String, String)> {
    let until = Instant::now() + timeout;
    loop {
        let mine: Vec<(String, String)> = {
            let log = landlock_log().lock().unwrap_or_else(|p| p.into_inner());
            log.denials
                .iter()
                .filter(|d| {
                    d.domain
                        .as_ref()
                        .and_then(|x| log.domains.get(x))
                        .and_then(|pid| log.inits.get(pid))
                        .is_some_and(|w| w == id)
                })
                .map(|d| (d.access.clone(), d.object.clone()))
                .collect()
        };
        if mine.iter().any(|(a, o)| pred(a, o)) || Instant::now() >= until {
            return mine;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
