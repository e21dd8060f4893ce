//! Workers: spawning, output, signals, stopping, waiting, history.
//!
//! Owns: the registry of workers; for each, its cgroup, its launcher
//! process, its stdin, the per-stream output log (in the state dir, bounded)
//! with a live broadcast for attached clients, and its final status.
//!
//! Must never: block a worker on a slow or vanished client (output goes to
//! the log and a lossy broadcast; readers replay from the log), leave a
//! cgroup behind when a worker ends, or forget a worker silently (a worker
//! that a previous daemon left running is reported as lost).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, watch};
use warden_policy::config::Config;
use warden_policy::seccomp::Arch;
use warden_policy::{Enforced, SpawnRequest};

use crate::cgroups::{CgroupLimits, Cgroups, Usage, WorkerCgroup};
use crate::events::{EventKind, Events};
use crate::launcher::{launch, LaunchError};
use crate::profiles::Profiles;
use crate::users::{UserError, Users};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("Unknown worker {0}")]
    NotFound(String),
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Policy(#[from] warden_policy::PolicyError),
    #[error("Limit {field} = {asked} would loosen the profile's {allowed}")]
    LoosenedLimit {
        field: &'static str,
        asked: u64,
        allowed: u64,
    },
    #[error("Too many workers: {running} running, the limit is {limit}")]
    TooMany { running: usize, limit: u32 },
    #[error("Too many workers for user {user}: {running} running, the limit is {limit}")]
    TooManyForUser { user: String, running: usize, limit: u32 },
    #[error(transparent)]
    Cgroup(#[from] crate::cgroups::CgroupError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Claude(#[from] crate::claude::ClaudeError),
    #[error("No pending approval request {0} (already decided, timed out, or never asked)")]
    NoApproval(String),
    #[error("This host's architecture has no seccomp support in warden")]
    Arch,
    #[error("Worker {0} has exited")]
    Exited(String),
    #[error("Cannot signal worker {id}")]
    Signal {
        id: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("The daemon is shutting down")]
    ShuttingDown,
}

/// Why a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    Exited,
    Killed,
    Stopped,
    TimedOut,
    Oom,
    Lost,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: i32,
    pub signal: i32,
    pub reason: ExitReason,
    pub at: SystemTime,
    pub peak_memory: u64,
    pub cpu_time_us: u64,
}

impl ExitInfo {
    /// A worker whose end nobody saw (its daemon died), as of now.
    fn lost() -> ExitInfo {
        ExitInfo {
            code: -1,
            signal: 0,
            reason: ExitReason::Lost,
            at: SystemTime::now(),
            peak_memory: 0,
            cpu_time_us: 0,
        }
    }
}

/// Tightening limits a request may ask for (zero/None: keep the profile's).
#[derive(Debug, Clone, Default)]
pub struct RequestedLimits {
    pub memory: Option<u64>,
    pub memory_swap: Option<u64>,
    pub pids: Option<u64>,
    pub cpu_quota_us: Option<u64>,
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct SpawnParams {
    pub user: String,
    pub project: String,
    pub profile: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub limits: RequestedLimits,
    /// `[claude]` profiles: keep stdin open after the initial prompt.
    pub interactive: bool,
    /// `[claude]` profiles: options that narrow the profile's.
    pub claude: warden_policy::ClaudeRequest,
}

/// What is persisted per running worker, so a restarted daemon can report
/// the workers it lost.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: String,
    user: String,
    project: String,
    profile: String,
    policy_digest: String,
    command: Vec<String>,
    uid: u32,
    started_ms: u64,
}

/// One output stream's log and live feed.
#[derive(Debug)]
pub struct OutputLog {
    pub path: PathBuf,
    /// Bytes produced so far (the offset of the next byte).
    produced: AtomicU64,
    /// Bytes kept in the log file (a prefix of the stream).
    kept: AtomicU64,
    live: broadcast::Sender<Chunk>,
    done: AtomicBool,
}

#[derive(Debug, Clone)]
pub struct Chunk {
    pub offset: u64,
    pub data: Arc<Vec<u8>>,
}

impl OutputLog {
    fn new(path: PathBuf) -> Self {
        OutputLog {
            path,
            produced: AtomicU64::new(0),
            kept: AtomicU64::new(0),
            live: broadcast::channel(1024).0,
            done: AtomicBool::new(false),
        }
    }
    pub fn produced(&self) -> u64 {
        self.produced.load(Ordering::SeqCst)
    }
    pub fn kept(&self) -> u64 {
        self.kept.load(Ordering::SeqCst)
    }
    pub fn subscribe(&self) -> broadcast::Receiver<Chunk> {
        self.live.subscribe()
    }
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }
    /// Reads kept bytes from `from` up to `to`.
    pub async fn read_kept(&self, from: u64, to: u64) -> std::io::Result<Vec<u8>> {
        let to = to.min(self.kept());
        if from >= to {
            return Ok(Vec::new());
        }
        let mut f = tokio::fs::File::open(&self.path).await?;
        tokio::io::AsyncSeekExt::seek(&mut f, std::io::SeekFrom::Start(from)).await?;
        let mut buf = vec![0u8; usize::try_from(to - from).unwrap_or(0)];
        f.read_exact(&mut buf).await?;
        Ok(buf)
    }
}

/// A worker as the daemon knows it.
#[derive(Debug)]
pub struct Worker {
    pub id: String,
    pub user: String,
    pub project: String,
    pub profile: String,
    pub policy_digest: String,
    pub command: Vec<String>,
    pub uid: u32,
    pub pid: u32,
    /// Host pid of the worker's init (PID 1 of its namespace); it created
    /// the worker's landlock domain, so audit records name it.
    pub init_pid: u32,
    pub started: SystemTime,
    pub enforced: Option<Enforced>,
    pub stdout: OutputLog,
    pub stderr: OutputLog,
    stdin: tokio::sync::Mutex<Option<tokio::process::ChildStdin>>,
    exit: watch::Sender<Option<ExitInfo>>,
    stop_requested: AtomicBool,
    cgroup: Option<WorkerCgroup>,
    /// Limit counters already reported (oom kills, pids.max hits, throttled periods).
    reported: Mutex<(u64, u64, u64)>,
    /// A non-interactive Claude Code session: the daemon closes its stdin
    /// when Claude reports the result, clients cannot close it earlier.
    pub one_shot_session: bool,
    /// Claude Code permission requests waiting for `Workers.Approve`.
    pub(crate) approvals: Mutex<HashMap<String, tokio::sync::oneshot::Sender<crate::claude::Decision>>>,
}

impl Worker {
    /// A worker as its persisted record describes it: not running, no
    /// process, no cgroup; spawn fills in the live parts.
    fn from_record(r: Record, logs: &Path) -> Worker {
        Worker {
            stdout: OutputLog::new(logs.join(format!("{}.stdout", r.id))),
            stderr: OutputLog::new(logs.join(format!("{}.stderr", r.id))),
            id: r.id,
            user: r.user,
            project: r.project,
            profile: r.profile,
            policy_digest: r.policy_digest,
            command: r.command,
            uid: r.uid,
            pid: 0,
            init_pid: 0,
            started: UNIX_EPOCH + Duration::from_millis(r.started_ms),
            enforced: None,
            stdin: tokio::sync::Mutex::new(None),
            exit: watch::channel(None).0,
            stop_requested: AtomicBool::new(false),
            cgroup: None,
            reported: Mutex::new((0, 0, 0)),
            approvals: Mutex::new(HashMap::new()),
            one_shot_session: false,
        }
    }

    pub fn exit_info(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    /// Resolves when the worker has exited.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.subscribe();
        loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                return e;
            }
            if rx.changed().await.is_err() {
                // The sender lives in the worker itself; unreachable in practice.
                return self.exit_info().unwrap_or_else(ExitInfo::lost);
            }
        }
    }

    pub async fn write_stdin(&self, data: &[u8]) -> std::io::Result<()> {
        let mut guard = self.stdin.lock().await;
        match guard.as_mut() {
            Some(s) => s.write_all(data).await,
            None => Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stdin is closed")),
        }
    }

    /// Answers a pending Claude Code permission request of this worker.
    pub fn approve(&self, request_id: &str, decision: crate::claude::Decision) -> Result<(), WorkerError> {
        let pending = self
            .approvals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(request_id);
        match pending {
            Some(tx) => tx
                .send(decision)
                .map_err(|_| WorkerError::NoApproval(request_id.to_string())),
            None => Err(WorkerError::NoApproval(request_id.to_string())),
        }
    }

    pub async fn close_stdin(&self) {
        self.stdin.lock().await.take();
    }

    pub fn usage(&self) -> Option<crate::cgroups::Usage> {
        self.cgroup.as_ref().map(WorkerCgroup::usage)
    }
}

pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The registry and everything a spawn needs.
#[derive(Debug)]
pub struct Supervisor {
    pub config: Config,
    pub users: Users,
    pub cgroups: Cgroups,
    pub profiles: Profiles,
    pub events: Arc<Events>,
    /// Landlock denials are read from the kernel audit stream.
    pub landlock_audit: AtomicBool,
    launcher: PathBuf,
    workers: Mutex<BTreeMap<String, Arc<Worker>>>,
    order: Mutex<Vec<String>>,
    next: AtomicU64,
    shutting_down: AtomicBool,
}

fn tighten(field: &'static str, profile: Option<u64>, asked: Option<u64>) -> Result<Option<u64>, WorkerError> {
    match (profile, asked) {
        (_, None) => Ok(profile),
        (None, Some(a)) => Ok(Some(a)),
        (Some(p), Some(a)) if a <= p => Ok(Some(a)),
        (Some(p), Some(a)) => Err(WorkerError::LoosenedLimit {
            field,
            asked: a,
            allowed: p,
        }),
    }
}

impl Supervisor {
    pub fn new(
        config: Config,
        users: Users,
        cgroups: Cgroups,
        profiles: Profiles,
        events: Arc<Events>,
        launcher: PathBuf,
    ) -> Self {
        let start = millis(SystemTime::now());
        Supervisor {
            config,
            users,
            cgroups,
            profiles,
            events,
            landlock_audit: AtomicBool::new(false),
            launcher,
            workers: Mutex::new(BTreeMap::new()),
            order: Mutex::new(Vec::new()),
            next: AtomicU64::new(start),
            shutting_down: AtomicBool::new(false),
        }
    }

    fn records_dir(&self) -> PathBuf {
        self.config.state_dir.join("workers")
    }

    fn logs_dir(&self) -> PathBuf {
        self.config.state_dir.join("logs")
    }

    pub fn get(&self, id: &str) -> Result<Arc<Worker>, WorkerError> {
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| WorkerError::NotFound(id.to_string()))
    }

    /// All known workers, newest first.
    pub fn list(&self) -> Vec<Arc<Worker>> {
        let map = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        let order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        order.iter().rev().filter_map(|id| map.get(id).cloned()).collect()
    }

    fn running(&self) -> Vec<Arc<Worker>> {
        self.list().into_iter().filter(|w| w.exit_info().is_none()).collect()
    }

    fn insert(&self, w: Arc<Worker>) {
        let mut map = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        order.push(w.id.clone());
        map.insert(w.id.clone(), w);
        // Forget the oldest exited workers beyond the configured history.
        let exited: Vec<String> = order
            .iter()
            .filter(|id| map.get(*id).is_some_and(|w| w.exit_info().is_some()))
            .cloned()
            .collect();
        if exited.len() > self.config.exited_history {
            for id in &exited[..exited.len() - self.config.exited_history] {
                map.remove(id);
                order.retain(|o| o != id);
                let _ = std::fs::remove_file(self.logs_dir().join(format!("{id}.stdout")));
                let _ = std::fs::remove_file(self.logs_dir().join(format!("{id}.stderr")));
            }
        }
    }

    /// Cleans up after a previous daemon: kills and removes leftover worker
    /// cgroups and reports the workers it recorded as lost.
    pub fn recover(&self) -> Vec<String> {
        let mut lost = Vec::new();
        for id in self.cgroups.existing() {
            let cg = self.cgroups.open(&id);
            if let Err(e) = cg.kill_all(Duration::from_secs(10)).and_then(|()| cg.remove()) {
                tracing::error!(worker = %id, error = %e, "cannot clean up a leftover worker cgroup");
            }
        }
        let entries = std::fs::read_dir(self.records_dir())
            .into_iter()
            .flatten()
            .filter_map(Result::ok);
        for entry in entries {
            let path = entry.path();
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let _ = std::fs::remove_file(&path);
            let Ok(r) = serde_json::from_str::<Record>(&text) else {
                continue;
            };
            let w = Worker::from_record(r, &self.logs_dir());
            w.exit.send_replace(Some(ExitInfo::lost()));
            let w = Arc::new(w);
            for log in [&w.stdout, &w.stderr] {
                let len = std::fs::metadata(&log.path).map_or(0, |m| m.len());
                log.kept.store(len, Ordering::SeqCst);
                log.produced.store(len, Ordering::SeqCst);
                log.done.store(true, Ordering::SeqCst);
            }
            tracing::warn!(worker = %w.id, user = %w.user, "worker of a previous daemon was lost and cleaned up");
            lost.push(w.id.clone());
            self.insert(w);
        }
        lost
    }

    /// Starts a worker. The user's directories, uid and cgroup are prepared,
    /// the profile compiled and the launcher started; returns once the
    /// sandbox is in place and the command exec'd.
    pub async fn spawn(self: &Arc<Self>, p: SpawnParams) -> Result<Arc<Worker>, WorkerError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(WorkerError::ShuttingDown);
        }
        let running = self.running();
        if running.len() >= self.config.max_workers as usize {
            return Err(WorkerError::TooMany {
                running: running.len(),
                limit: self.config.max_workers,
            });
        }
        let mine = running.iter().filter(|w| w.user == p.user).count();
        if mine >= self.config.max_workers_per_user as usize {
            return Err(WorkerError::TooManyForUser {
                user: p.user.clone(),
                running: mine,
                limit: self.config.max_workers_per_user,
            });
        }
        let set = self.profiles.current();
        let mut profile = set.get(&p.profile)?.clone();
        let l = &mut profile.limits;
        l.memory = tighten("memory", l.memory, p.limits.memory)?;
        l.memory_swap = tighten("memory_swap", l.memory_swap, p.limits.memory_swap.or(p.limits.memory))?;
        l.pids = tighten("pids", l.pids, p.limits.pids)?;
        l.cpu_quota_us = tighten("cpu_quota", l.cpu_quota_us, p.limits.cpu_quota_us)?;
        l.timeout_secs = tighten("timeout", l.timeout_secs, p.limits.timeout_secs)?;

        let timeout = profile.limits.timeout_secs;
        let this = self.clone();
        let params = p.clone();
        let (spec, cgroup, claude_start) = tokio::task::spawn_blocking(move || -> Result<_, WorkerError> {
            let id = this.users.identity(&params.user)?;
            let dirs = this.users.prepare(&params.user, &params.project)?;
            // A [claude] profile runs the claude binary; the request's
            // command is its initial prompt.
            let session = match &profile.claude {
                Some(c) => Some(crate::claude::prepare(&this.config, c, &params, &id, &dirs.workspace)?),
                None => None,
            };
            let (argv, extra_binds, claude_env, claude_start) = match session {
                Some(s) => (s.argv, s.binds, s.env, Some(s.start)),
                None => (params.command.clone(), Vec::new(), Vec::new(), None),
            };
            let worker_id = format!("w{:x}", this.next.fetch_add(1, Ordering::SeqCst));
            let cgroup = this.cgroups.create(&worker_id, &CgroupLimits::from(&profile.limits))?;
            let req = SpawnRequest {
                worker_id,
                user: params.user.clone(),
                uid: id.uid,
                gid: id.gid,
                project: params.project.clone(),
                argv,
                env: params.env.clone(),
                home_dir: dirs.home,
                workspace_dir: dirs.workspace,
                cgroup_procs: cgroup.procs_files(),
                protected: vec![this.config.state_dir.clone(), socket_dir(&this.config.socket)],
                extra_binds,
            };
            match warden_policy::compile(&profile, &req, Arch::host().ok_or(WorkerError::Arch)?) {
                Ok(mut spec) => {
                    // Credentials reach only this worker's environment (never
                    // its workspace, the spec on disk or the audit log).
                    for (k, v) in claude_env {
                        spec.env.retain(|(name, _)| *name != k);
                        spec.env.push((k, v));
                    }
                    Ok((spec, cgroup, claude_start))
                }
                Err(e) => {
                    let _ = cgroup.remove();
                    Err(e.into())
                }
            }
        })
        .await
        .map_err(|_| WorkerError::ShuttingDown)??;

        let logs = self.logs_dir();
        std::fs::create_dir_all(&logs).map_err(|e| WorkerError::Launch(LaunchError::Pipe(e)))?;
        let launcher = self.launcher.clone();
        let spec_for_launch = spec.clone();
        let launched = tokio::task::spawn_blocking(move || {
            launch(
                &launcher,
                &spec_for_launch,
                Stdio::piped(),
                Stdio::piped(),
                Stdio::piped(),
            )
        })
        .await
        .map_err(|_| WorkerError::ShuttingDown)?;
        let mut launched = match launched {
            Ok(l) => l,
            Err(e) => {
                let _ = cgroup.kill_all(Duration::from_secs(5));
                let _ = cgroup.remove();
                let (stage, errno, message) = match &e {
                    LaunchError::Setup {
                        stage, errno, message, ..
                    } => (stage.clone(), *errno, message.clone()),
                    other => ("spawn".to_string(), 0, other.to_string()),
                };
                self.events.publish(
                    Some(&spec.worker_id),
                    Some(&spec.user),
                    EventKind::SpawnFailed {
                        profile: spec.profile.clone(),
                        stage,
                        errno,
                        message,
                    },
                );
                return Err(e.into());
            }
        };
        let started = SystemTime::now();
        let record = Record {
            id: spec.worker_id.clone(),
            user: spec.user.clone(),
            project: p.project.clone(),
            profile: spec.profile.clone(),
            policy_digest: spec.policy_digest.clone(),
            command: spec.argv.clone(),
            uid: spec.uid,
            started_ms: millis(started),
        };
        let _ = std::fs::create_dir_all(self.records_dir());
        let _ = std::fs::write(
            self.records_dir().join(format!("{}.json", record.id)),
            serde_json::to_vec(&record).unwrap_or_default(),
        );

        let seccomp_observable = launched.seccomp_listener.is_some();
        if let Some(listener) = launched.seccomp_listener.take() {
            let events = self.events.clone();
            let (id, user) = (spec.worker_id.clone(), spec.user.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("denials-{id}"))
                .spawn(move || {
                    crate::denials::serve(listener, crate::denials::default_limit(), |d| {
                        events.publish(
                            Some(&id),
                            Some(&user),
                            EventKind::SandboxDenial {
                                layer: "seccomp".into(),
                                syscall: Some(d.syscall),
                                pid: i32::try_from(d.pid).ok(),
                                path: None,
                                access: None,
                                suppressed: d.suppressed,
                            },
                        );
                    });
                });
            if let Err(e) = spawned {
                tracing::error!(worker = %spec.worker_id, error = %e, "cannot start the denial reporter; denied calls will fail with ENOSYS");
            }
        }
        let stdin = launched
            .child
            .stdin
            .take()
            .and_then(|s| tokio::process::ChildStdin::from_std(s).ok());
        let stdout = launched.child.stdout.take();
        let stderr = launched.child.stderr.take();
        let worker = Arc::new(Worker {
            pid: launched.child.id(),
            init_pid: launched.enforced.init_pid,
            started,
            enforced: Some(launched.enforced.clone()),
            stdin: tokio::sync::Mutex::new(stdin),
            cgroup: Some(cgroup),
            one_shot_session: claude_start.is_some() && !p.interactive,
            ..Worker::from_record(record, &logs)
        });
        self.insert(worker.clone());
        tracing::info!(worker = %worker.id, user = %worker.user, profile = %worker.profile, pid = worker.pid, "worker started");
        // Claude Code sessions: the daemon reads the worker's stream-json
        // output to answer its permission requests and end one-shot runs.
        let tap = claude_start.map(|start| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(crate::claude::drive(
                self.events.clone(),
                worker.clone(),
                start,
                p.interactive,
                rx,
            ));
            tx
        });
        let e = &launched.enforced;
        self.events.publish(
            Some(&worker.id),
            Some(&worker.user),
            EventKind::WorkerStarted {
                profile: worker.profile.clone(),
                policy_digest: worker.policy_digest.clone(),
                uid: worker.uid,
                cgroup: worker
                    .cgroup
                    .as_ref()
                    .map(|c| c.paths().iter().map(|p| p.display().to_string()).collect())
                    .unwrap_or_default(),
                command: worker.command.clone(),
                landlock_abi: e.landlock_abi,
                landlock_tcp: e.landlock_tcp,
                landlock_scoped: e.landlock_scoped,
                seccomp_filter_len: e.seccomp_filter_len,
                namespaces: e.namespaces.clone(),
                no_new_privs: e.no_new_privs,
                capabilities_empty: e.capabilities_empty,
                landlock_denials_observable: self.landlock_audit.load(Ordering::SeqCst) && e.landlock_abi >= 7,
                seccomp_denials_observable: seccomp_observable,
            },
        );

        let pumps = [
            stdout
                .and_then(|s| tokio::process::ChildStdout::from_std(s).ok())
                .map(|s| {
                    let w = worker.clone();
                    let cap = self.config.log_max_bytes;
                    tokio::spawn(async move { pump(s, &w.stdout, cap, tap).await })
                }),
            stderr
                .and_then(|s| tokio::process::ChildStderr::from_std(s).ok())
                .map(|s| {
                    let w = worker.clone();
                    let cap = self.config.log_max_bytes;
                    tokio::spawn(async move { pump(s, &w.stderr, cap, None).await })
                }),
        ];
        let this = self.clone();
        let w = worker.clone();
        let mut child = launched.child;
        tokio::spawn(async move {
            let begun = Instant::now();
            let status = tokio::task::spawn_blocking(move || child.wait()).await;
            for p in pumps.into_iter().flatten() {
                let _ = p.await;
            }
            this.finish(
                &w,
                status.ok().and_then(Result::ok),
                timeout.is_some_and(|t| begun.elapsed().as_secs() >= t),
            );
        });
        // Limits are checked twice a second (v1 has no group OOM kill: when
        // the OOM counter moves, the rest of the worker is killed here);
        // usage is sampled every sample_interval_seconds.
        let this = self.clone();
        let w = worker.clone();
        let every = Duration::from_secs(self.config.sample_interval_seconds);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut last_sample = Instant::now();
            loop {
                tick.tick().await;
                if w.exit_info().is_some() {
                    break;
                }
                let Some(usage) = w.usage() else { break };
                let oom = this.report_limits(&w, &usage);
                if oom && !this.cgroups.is_v2() {
                    if let Some(cg) = &w.cgroup {
                        let cg = cg.clone();
                        let _ = tokio::task::spawn_blocking(move || cg.kill_all(Duration::from_secs(5))).await;
                    }
                }
                if last_sample.elapsed() >= every && w.exit_info().is_none() {
                    last_sample = Instant::now();
                    this.events.publish(
                        Some(&w.id),
                        Some(&w.user),
                        EventKind::ResourceSample {
                            memory_current: usage.memory_current,
                            memory_peak: usage.memory_peak,
                            cpu_usage_us: usage.cpu_usage_ns / 1000,
                            pids: usage.pids_current,
                        },
                    );
                }
            }
        });
        Ok(worker)
    }

    /// Records the exit, kills what is left, removes the cgroup.
    /// Publishes a limit-reached event for each counter that moved since the
    /// last report; returns whether the OOM killer struck.
    fn report_limits(&self, w: &Worker, u: &Usage) -> bool {
        let mut guard = w.reported.lock().unwrap_or_else(|p| p.into_inner());
        let r = &mut *guard;
        let mut oom = false;
        for (limit, now, seen) in [
            ("oom_kill", u.oom_kills, &mut r.0),
            ("pids_max", u.pids_max_hits, &mut r.1),
            ("cpu_throttled", u.cpu_throttled, &mut r.2),
        ] {
            if now > *seen {
                *seen = now;
                oom |= limit == "oom_kill";
                self.events.publish(
                    Some(&w.id),
                    Some(&w.user),
                    EventKind::LimitReached {
                        limit: limit.to_string(),
                        count: now,
                    },
                );
            }
        }
        oom
    }

    fn finish(&self, w: &Worker, status: Option<std::process::ExitStatus>, timed_out: bool) {
        use std::os::unix::process::ExitStatusExt;
        let usage = w.usage().unwrap_or_default();
        self.report_limits(w, &usage);
        if let Some(cg) = &w.cgroup {
            if let Err(e) = cg.kill_all(Duration::from_secs(10)).and_then(|()| cg.remove()) {
                tracing::error!(worker = %w.id, error = %e, "cannot remove the worker's cgroup");
            }
        }
        let (code, signal) = match status {
            Some(s) => match (s.code(), s.signal()) {
                (Some(c), _) => (c, if c > 128 { c - 128 } else { 0 }),
                (None, Some(sig)) => (128 + sig, sig),
                _ => (-1, 0),
            },
            None => (-1, 0),
        };
        let reason = if usage.oom_kills > 0 {
            ExitReason::Oom
        } else if w.stop_requested.load(Ordering::SeqCst) {
            ExitReason::Stopped
        } else if timed_out {
            ExitReason::TimedOut
        } else if signal != 0 {
            ExitReason::Killed
        } else {
            ExitReason::Exited
        };
        let info = ExitInfo {
            code,
            signal,
            reason,
            at: SystemTime::now(),
            peak_memory: usage.memory_peak,
            cpu_time_us: usage.cpu_usage_ns / 1000,
        };
        tracing::info!(worker = %w.id, code, signal, reason = ?reason, "worker exited");
        let duration_ms = info
            .at
            .duration_since(w.started)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
        self.events.publish(
            Some(&w.id),
            Some(&w.user),
            EventKind::WorkerExited {
                code,
                signal,
                reason: format!("{reason:?}").to_lowercase().replace("timedout", "timed_out"),
                duration_ms,
                cpu_time_us: info.cpu_time_us,
                peak_memory: info.peak_memory,
            },
        );
        let _ = std::fs::remove_file(self.records_dir().join(format!("{}.json", w.id)));
        w.exit.send_replace(Some(info));
    }

    pub fn signal(&self, id: &str, sig: Signal) -> Result<Arc<Worker>, WorkerError> {
        let w = self.get(id)?;
        if w.exit_info().is_some() || w.pid == 0 {
            return Err(WorkerError::Exited(id.to_string()));
        }
        let pid = i32::try_from(w.pid).unwrap_or(0);
        kill(Pid::from_raw(pid), sig).map_err(|source| WorkerError::Signal {
            id: id.to_string(),
            source,
        })?;
        Ok(w)
    }

    /// SIGTERM, `grace`, then SIGKILL of the whole cgroup; returns the exit.
    pub async fn stop(&self, id: &str, grace: Option<Duration>) -> Result<ExitInfo, WorkerError> {
        let w = self.get(id)?;
        if let Some(e) = w.exit_info() {
            return Ok(e);
        }
        w.stop_requested.store(true, Ordering::SeqCst);
        let grace = grace.unwrap_or(Duration::from_secs(u64::from(self.config.stop_grace_seconds)));
        let _ = self.signal(id, Signal::SIGTERM);
        if let Ok(e) = tokio::time::timeout(grace, w.wait()).await {
            return Ok(e);
        }
        if let Some(cg) = &w.cgroup {
            let cg = cg.clone();
            let _ = tokio::task::spawn_blocking(move || cg.kill_all(Duration::from_secs(10))).await;
        }
        Ok(w.wait().await)
    }

    /// Stops accepting spawns and stops every running worker (SIGTERM).
    pub async fn shutdown(self: &Arc<Self>) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let stops = self.running().into_iter().map(|w| {
            let this = self.clone();
            tokio::spawn(async move { this.stop(&w.id, None).await })
        });
        for s in stops.collect::<Vec<_>>() {
            let _ = s.await;
        }
    }
}

fn socket_dir(socket: &Path) -> PathBuf {
    socket.parent().map_or_else(|| socket.to_path_buf(), Path::to_path_buf)
}

/// Copies one output stream to its log (up to `cap` bytes) and the live feed.
/// Copies a worker's output stream to its log and live subscribers (and to
/// `tap`, the Claude Code session driver, when there is one).
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    log: &OutputLog,
    cap: u64,
    tap: Option<tokio::sync::mpsc::UnboundedSender<Arc<Vec<u8>>>>,
) {
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log.path)
        .await
        .ok();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let data = &buf[..n];
        let offset = log.produced();
        let kept = log.kept();
        if let Some(f) = file.as_mut() {
            if kept == offset && kept < cap {
                let room = usize::try_from(cap - kept).unwrap_or(usize::MAX).min(n);
                if f.write_all(&data[..room]).await.is_ok() {
                    log.kept.fetch_add(room as u64, Ordering::SeqCst);
                }
            }
        }
        log.produced.fetch_add(n as u64, Ordering::SeqCst);
        let data = Arc::new(data.to_vec());
        if let Some(t) = &tap {
            let _ = t.send(data.clone());
        }
        // A lagging receiver loses live chunks, never the worker: it replays from the log.
        let _ = log.live.send(Chunk { offset, data });
    }
    if let Some(mut f) = file {
        let _ = f.flush().await;
    }
    log.done.store(true, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_may_only_tighten() {
        assert_eq!(tighten("pids", Some(10), Some(5)).unwrap(), Some(5));
        assert_eq!(tighten("pids", Some(10), None).unwrap(), Some(10));
        assert_eq!(tighten("pids", None, Some(7)).unwrap(), Some(7));
        assert!(matches!(
            tighten("pids", Some(10), Some(11)),
            Err(WorkerError::LoosenedLimit { .. })
        ));
    }
}
