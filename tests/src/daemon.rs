//! A real wardend for end-to-end tests: its own socket, state dir, audit
//! log, profiles dir, cgroup parent and uid range.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::bin_dir;

/// How long one wardenctl call of a test may take.
pub const CTL_DEADLINE: Duration = Duration::from_secs(300);

static NEXT_RANGE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

#[derive(Debug)]
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub cgroup_name: String,
    /// Its state directory is a tmpfs of its own (unmounted at the end).
    state_tmpfs: bool,
}

/// Names every test daemon's proxy maps to loopback, where the tests run
/// their servers (the fake Messages API, git, package registries).
pub const TEST_HOSTS: &[&str] = &["anthropic.test", "git.test", "pypi.test", "npm.test", "web.test"];

/// A config value for [`Daemon::config_text`] and [`Daemon::start_with`].
pub fn value(v: impl Into<toml::Value>) -> toml::Value {
    v.into()
}

/// A `rate` value: `{ burst = B, rate = "R" }`.
pub fn rate(burst: i64, per: &str) -> toml::Value {
    let mut t = toml::Table::new();
    t.insert("burst".into(), value(burst));
    t.insert("rate".into(), value(per));
    value(t)
}

/// The default `[rate_limits]` table with `overrides` set in it.
pub fn rate_limits(overrides: &[(&str, toml::Value)]) -> toml::Value {
    let table: toml::Table = warden_policy::config::DEFAULT_CONFIG
        .parse()
        .expect("the default config parses");
    let mut limits = table["rate_limits"].as_table().expect("a [rate_limits] table").clone();
    for (k, v) in overrides {
        assert!(limits.contains_key(*k), "{k} is not a rate limit");
        limits.insert((*k).to_string(), v.clone());
    }
    value(limits)
}

impl Daemon {
    /// The test daemon's wardend.toml: the embedded default with every path
    /// under `dir`, its own cgroup and uid range, short intervals, and then
    /// `edits` (each key must be one of the default's).
    pub fn config_text(dir: &Path, cgroup_name: &str, edits: &[(&str, toml::Value)]) -> String {
        let path = |p: &str| value(dir.join(p).display().to_string());
        // Each daemon its own uids, so that tests running side by side can
        // tell their workers' processes apart.
        let base = 230_000 + 100 * i64::from(NEXT_RANGE.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        let test_values = [
            ("socket", path("run/warden.sock")),
            ("state_dir", path("state")),
            ("profiles_dir", path("profiles")),
            ("audit_log", path("log/audit.jsonl")),
            ("credentials_dir", path("credentials")),
            ("launcher", value(bin_dir().join("warden-launch").display().to_string())),
            ("claude_binary", value(crate::claude_binary().display().to_string())),
            ("socket_group", value("nogroup")),
            ("cgroup_name", value(cgroup_name)),
            ("stop_grace_seconds", value(2)),
            ("max_workers_per_user", value(3)),
            ("sample_interval_seconds", value(1)),
            // Tests count a daemon's cgroups and processes as its workers':
            // none made ahead, but where a test asks for them
            // (daemon::warm_inits_serve_spawns_and_are_made_again,
            // daemon::primed_inits_serve_spawns_like_the_last_one).
            ("warm_inits", value(0)),
            ("primed_inits", value(0)),
            ("uid_min", value(base)),
            ("uid_max", value(base + 99)),
            (
                "hosts",
                value(
                    TEST_HOSTS
                        .iter()
                        .map(|h| ((*h).to_string(), value("127.0.0.1")))
                        .collect::<toml::Table>(),
                ),
            ),
        ];
        let mut table: toml::Table = warden_policy::config::DEFAULT_CONFIG
            .parse()
            .expect("the default config parses");
        for (key, v) in test_values.into_iter().chain(edits.iter().cloned()) {
            assert!(table.contains_key(key), "{key} is not a key of the default config");
            table.insert(key.to_string(), v);
        }
        let text = toml::to_string(&table).expect("a TOML table serializes");
        let config = warden_policy::config::Config::parse("test wardend.toml", &text)
            .unwrap_or_else(|e| panic!("the test config is invalid: {e}"));
        assert!(
            config.state_dir.starts_with(dir),
            "a test daemon keeps its state under {}",
            dir.display()
        );
        text
    }

    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    /// Starts a daemon whose config has each `(key, value)` set on top of
    /// the test config.
    pub fn start_with(config_edits: &[(&str, toml::Value)]) -> Daemon {
        Self::start_on(config_edits, false)
    }

    /// Like [`start_with`](Self::start_with), with the state directory on a
    /// tmpfs of its own (a file system without project quotas).
    pub fn start_with_state_on_tmpfs(config_edits: &[(&str, toml::Value)]) -> Daemon {
        Self::start_on(config_edits, true)
    }

    fn start_on(config_edits: &[(&str, toml::Value)], state_tmpfs: bool) -> Daemon {
        let dir = tempfile::Builder::new().prefix("wardend-test-").tempdir().unwrap();
        if state_tmpfs {
            let state = dir.path().join("state");
            std::fs::create_dir(&state).unwrap();
            nix::mount::mount(
                Some("tmpfs"),
                &state,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some("mode=0700,size=64m"),
            )
            .unwrap();
        }
        // Other users must reach the socket (0660 root:nogroup) through it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(dir.path().join("profiles")).unwrap();
        std::fs::create_dir(dir.path().join("credentials")).unwrap();
        std::fs::set_permissions(dir.path().join("credentials"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let cgroup_name = format!(
            "wardend-test-{}-{}",
            std::process::id(),
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let config = Self::config_text(dir.path(), &cgroup_name, config_edits);
        std::fs::write(dir.path().join("wardend.toml"), config).unwrap();
        let mut d = Daemon {
            dir,
            child: None,
            cgroup_name,
            state_tmpfs,
        };
        d.spawn_daemon();
        d
    }

    pub fn spawn_daemon(&mut self) {
        let child = Command::new(bin_dir().join("wardend"))
            .arg("--config")
            .arg(self.dir.path().join("wardend.toml"))
            .env("WARDEN_LOG", "debug")
            .stderr(std::fs::File::create(self.dir.path().join("wardend.log")).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        // The socket of a killed daemon may still be there: wait until it answers.
        while !self.socket().exists() || !self.ctl(&["profile", "list"]).status.success() {
            assert!(Instant::now() < deadline, "wardend did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon runs").id()
    }

    /// The daemon's resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    /// The most resident memory the daemon has had, in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.status_bytes("VmHWM:")
    }

    /// The daemon's resident anonymous memory (its heap and stacks, not
    /// the pages of its binary it has touched), in bytes.
    pub fn rss_anon(&self) -> u64 {
        self.status_bytes("RssAnon:")
    }

    fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// CPU time the daemon has used (user and system, all its threads).
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command (which may hold spaces) in parentheses.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat; `after` starts at 3.
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        let ticks = field(14) + field(15);
        // SAFETY: sysconf has no memory arguments.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
            .unwrap_or(100)
            .max(1);
        Duration::from_millis(ticks * 1000 / hz)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/warden.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("wardend.log")).unwrap_or_default()
    }

    /// A wardenctl command aimed at this daemon, to run as the caller likes
    /// (spawned, with piped stdio...).
    pub fn ctl_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin_dir().join("wardenctl"));
        c.arg("--socket").arg(self.socket()).args(args);
        c
    }

    /// Runs wardenctl to its end; a call that has not ended after
    /// [`CTL_DEADLINE`] fails the test (a stalled daemon fails a run, it
    /// does not hang it).
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut child = self
            .ctl_command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = crate::drain_bytes(child.stdout.take().expect("stdout"));
        let err = crate::drain_bytes(child.stderr.take().expect("stderr"));
        let Some(status) = crate::wait_until(&mut child, Instant::now() + CTL_DEADLINE) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("wardenctl {args:?} did not end within {CTL_DEADLINE:?}: the daemon stalled");
        };
        Output {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        }
    }

    /// wardenctl as uid/gid 65534 (nobody:nogroup), a member of the socket group.
    pub fn ctl_as_nobody(&self, args: &[&str]) -> Output {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin_dir().join("wardenctl"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap()
    }

    pub fn cgroup_children(&self) -> Vec<String> {
        let dir = PathBuf::from(format!("/sys/fs/cgroup/pids/{}", self.cgroup_name));
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The pids in this daemon's cgroup `id` (none if it is gone).
    pub fn cgroup_procs(&self, id: &str) -> Vec<String> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/pids/{}/{id}/cgroup.procs", self.cgroup_name))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = i32::try_from(self.child.as_ref().unwrap().id()).expect("a pid fits pid_t");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for c in warden_daemon::cgroups::V1_CONTROLLERS {
            let base = PathBuf::from(format!("/sys/fs/cgroup/{c}/{}", self.cgroup_name));
            for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            let _ = std::fs::remove_dir(base);
        }
        if self.state_tmpfs {
            let _ = nix::mount::umount2(&self.dir.path().join("state"), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Daemon {
    /// Kills the daemon with SIGKILL (no cleanup) and waits for it.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Stores `user`'s API key (or `default`'s) in the daemon's root-only
    /// credentials store.
    pub fn set_credentials(&self, user: &str, text: &str) {
        let p = self.dir.path().join("credentials").join(user);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// `wardenctl attach ARGS...` with its stdin and stdout piped to the test.
    pub fn attach(&self, args: &[&str]) -> std::process::Child {
        self.ctl_command(&[&["attach"], args].concat())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Adds (or replaces) a profile in the daemon's profiles dir and reloads.
    pub fn add_profile(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join("profiles").join(format!("{name}.toml")), text).unwrap();
        let out = self.ctl(&["profile", "reload"]);
        assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `user`'s home and workspaces under `profile` (each profile has its
    /// own), on the host.
    pub fn tree(&self, user: &str, profile: &str) -> PathBuf {
        self.dir.path().join(format!("state/users/{user}/profiles/{profile}"))
    }

    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("log/audit.jsonl")
    }

    /// Every event in the audit log (all files, oldest first) as JSON.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        let mut files: Vec<PathBuf> = (1..=16)
            .rev()
            .map(|i| PathBuf::from(format!("{}.{i}", self.audit_log().display())))
            .filter(|p| p.exists())
            .collect();
        files.push(self.audit_log());
        files
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("unparsable audit line {l:?}: {e}")))
            .collect()
    }

    /// `wardenctl events --output json ARGS` as parsed events.
    pub fn events(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut a = vec!["events", "--output", "json"];
        a.extend_from_slice(args);
        let out = self.ctl(&a);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// A gRPC channel to a daemon's socket, for tests that speak gRPC directly.
pub async fn channel(socket: PathBuf) -> tonic::transport::Channel {
    try_channel(socket).await.expect("connect to wardend")
}

/// The same, for a daemon that may not be there (yet, or any more).
pub async fn try_channel(socket: PathBuf) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    connect(endpoint(), socket).await
}

/// A channel whose client takes at most 64 KiB of a stream before its
/// reader does (hyper's default is 2 MiB): a client that stops reading
/// stalls the daemon's sender at once, not after megabytes.
pub async fn small_window_channel(socket: PathBuf) -> tonic::transport::Channel {
    let e = endpoint().initial_stream_window_size(64 << 10);
    connect(e, socket).await.expect("connect to wardend")
}

fn endpoint() -> tonic::transport::Endpoint {
    tonic::transport::Endpoint::try_from("http://wardend.invalid").expect("a valid placeholder URI")
}

async fn connect(
    e: tonic::transport::Endpoint,
    socket: PathBuf,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    e.connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
        let p = socket.clone();
        async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(p).await?)) }
    }))
    .await
}
