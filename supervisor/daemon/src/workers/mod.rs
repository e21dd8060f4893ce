//! Workers: the registry, and each worker's life from spawn to exit.
//!
//! Owns: the registry of workers (running, and a bounded history of exited
//! ones); for each, its cgroup, its launcher process, its standard streams
//! and its final status. A spawn runs in phases ([`spawn`]); admission
//! ([`admission`]) reserves the slot a worker holds until it ends; a record
//! per running worker ([`record`]) lets the next daemon report the workers
//! a crash lost.
//!
//! Must never: block a worker on a slow or vanished client, leave a cgroup
//! behind when a worker ends, or forget a worker silently (a worker that a
//! previous daemon left running is reported as lost).

pub mod admission;
pub mod primed;
pub mod record;
pub mod spawn;
pub mod warm;

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use tokio::sync::watch;
use warden_policy::config::Config;
use warden_policy::{Enforced, NetworkPolicy};

use crate::cgroups::{Cgroups, Usage, WorkerCgroup};
use crate::claude::{Approvals, Decision};
use crate::disk::{Disk, DiskPromise};
use crate::events::{millis, DiskUse, EventKind, Events, ExitReason, NetUsage, StageTime};
use crate::io::{OutputLog, Stdin};
use crate::launcher::{Io, Launcher};
use crate::limits::Limiters;
use crate::net::gateway::{Gateway, Upstream};
use crate::net::resolve::Resolver;
use crate::net::Egress;
use crate::profiles::Profiles;
use crate::usage::{Ledger, Totals};
use crate::users::Users;
use admission::{Admission, AdmissionError, Slot};
use record::{Record, RecordError, Records};
pub use spawn::{RequestedLimits, SpawnParams};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("Unknown worker {0}")]
    NotFound(String),
    #[error(transparent)]
    User(#[from] crate::users::UserError),
    #[error(transparent)]
    Policy(#[from] warden_policy::PolicyError),
    #[error("Limit {field} = {asked} would loosen the profile's {allowed}")]
    LoosenedLimit {
        field: &'static str,
        asked: u64,
        allowed: u64,
    },
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error(transparent)]
    Cgroup(#[from] crate::cgroups::CgroupError),
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
    #[error(transparent)]
    Launch(#[from] crate::launcher::LaunchError),
    #[error(transparent)]
    Claude(#[from] crate::claude::ClaudeError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("Cannot create the output log directory {path}")]
    Logs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
        source: std::io::Error,
    },
    /// A blocking part of a spawn panicked or was cancelled.
    #[error("A spawn task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("The daemon is shutting down")]
    ShuttingDown,
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

/// Limit counters of a worker already reported as events.
#[derive(Debug, Default)]
struct Reported {
    oom_kills: u64,
    pids_max_hits: u64,
    cpu_throttled: u64,
    /// Times its user's tree was seen full, and whether it is now.
    disk_full: u64,
    disk_full_now: bool,
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
    /// Host pid of the worker's init (PID 1 of its namespace; 0 once it
    /// ended or for a worker of a previous daemon). It created the
    /// worker's landlock domain, so audit records name it.
    pub pid: u32,
    /// The init's pidfd: signals reach it, never a process that reused
    /// its pid.
    pidfd: Option<OwnedFd>,
    pub started: SystemTime,
    /// When its spawn request arrived (CLOCK_MONOTONIC, ns): the origin of
    /// the stages in its started and exited events. 0: a worker of a
    /// previous daemon.
    requested_ns: u64,
    pub enforced: Option<Enforced>,
    pub stdout: OutputLog,
    pub stderr: OutputLog,
    pub stdin: Arc<Stdin>,
    exit: watch::Sender<Option<ExitInfo>>,
    stop_requested: AtomicBool,
    cgroup: Option<WorkerCgroup>,
    reported: Mutex<Reported>,
    /// When its usage was last sampled (or it started).
    sampled: Mutex<Instant>,
    /// A non-interactive Claude Code session: the daemon closes its stdin
    /// when Claude reports the result, clients cannot close it earlier.
    pub one_shot_session: bool,
    /// A Claude Code session: clients' stdin lines are checked (only user
    /// messages and interrupts reach Claude).
    pub session: bool,
    /// Claude Code permission requests waiting for `Workers.Approve`.
    approvals: Arc<Approvals>,
    /// The admission slot this worker holds until it ends.
    slot: Mutex<Option<Slot>>,
    /// Where its traffic may go (None for a worker of a previous daemon).
    pub network: Option<NetworkPolicy>,
    /// Its proxy (mode `proxy`): decisions, counters.
    pub egress: Option<Arc<Egress>>,
    /// Its Anthropic API gateway (Claude Code workers).
    pub gateway: Option<Arc<Gateway>>,
    /// The tasks serving its listeners, stopped when it ends.
    net_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The disk limit promised to it on its user's tree, until it ends.
    disk: Mutex<Option<DiskPromise>>,
}

impl Worker {
    /// A worker as its record describes it: not running, no process, no
    /// cgroup. A spawn fills in the live parts; recovery marks it lost.
    fn new(r: Record, logs: &Path) -> Worker {
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
            pidfd: None,
            started: UNIX_EPOCH + Duration::from_millis(r.started_ms),
            requested_ns: 0,
            enforced: None,
            stdin: Arc::default(),
            exit: watch::channel(None).0,
            stop_requested: AtomicBool::new(false),
            cgroup: None,
            reported: Mutex::default(),
            sampled: Mutex::new(Instant::now()),
            approvals: Arc::default(),
            one_shot_session: false,
            session: false,
            slot: Mutex::new(None),
            network: None,
            egress: None,
            gateway: None,
            net_tasks: Mutex::default(),
            disk: Mutex::default(),
        }
    }

    /// A worker of a previous daemon, found in its record: lost.
    fn lost(r: Record, logs: &Path) -> Worker {
        let w = Worker {
            stdout: OutputLog::finished(logs.join(format!("{}.stdout", r.id))),
            stderr: OutputLog::finished(logs.join(format!("{}.stderr", r.id))),
            ..Worker::new(r, logs)
        };
        w.exit.send_replace(Some(ExitInfo::lost()));
        w
    }

    /// The end of a stage of its life, in µs since its spawn request.
    fn stage(&self, stage: &str) -> StageTime {
        StageTime {
            stage: stage.to_string(),
            us: crate::sys::monotonic_ns().saturating_sub(self.requested_ns) / 1000,
        }
    }

    pub fn exit_info(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    /// Resolves when the worker has exited.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.subscribe();
        // The sender lives in the worker itself, which outlives this call.
        let exit = rx.wait_for(Option::is_some).await.ok().and_then(|e| e.clone());
        exit.unwrap_or_else(ExitInfo::lost)
    }

    /// Answers a pending Claude Code permission request of this worker.
    pub fn approve(&self, request_id: &str, decision: Decision) -> Result<(), WorkerError> {
        if self.approvals.decide(request_id, decision) {
            Ok(())
        } else {
            Err(WorkerError::NoApproval(request_id.to_string()))
        }
    }

    /// Only its counters of limits hit (see [`WorkerCgroup::limits_hit`]).
    fn limits_hit(&self) -> Option<Usage> {
        self.cgroup.as_ref().map(WorkerCgroup::limits_hit)
    }

    /// Whether a disk limit was promised to it (its user's tree is watched).
    fn has_disk_limit(&self) -> bool {
        self.disk
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|d| d.bytes.is_some())
    }

    pub fn usage(&self) -> Option<Usage> {
        self.cgroup.as_ref().map(WorkerCgroup::usage)
    }

    /// Its traffic through the proxy so far (mode `proxy` only).
    pub fn net_usage(&self) -> Option<NetUsage> {
        self.egress.as_ref().map(|e| e.usage())
    }

    /// What its user's tree holds on disk, while it runs.
    pub fn disk_usage(&self) -> Option<DiskUse> {
        let d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        d.as_ref()?.usage().map(DiskUse::from)
    }

    /// Its requests and tokens through the API gateway so far.
    pub fn api_usage(&self) -> Option<Totals> {
        self.gateway.as_ref().map(|g| g.totals())
    }
}

/// How often the monitor looks at every running worker's counters of
/// limits hit.
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// Looks at every running worker twice a second (v1 has no group OOM
/// kill: when the OOM counter moves, the rest of the worker is killed
/// here) and samples each one's usage every `sample_interval_seconds`:
/// one thread and one pass for all of them, no task, timer or thread per
/// worker, and the cgroup files are read off the async threads. Ends with
/// the supervisor.
fn monitor(sup: &std::sync::Weak<Supervisor>, runtime: &tokio::runtime::Handle) {
    let mut next = Instant::now();
    loop {
        next += LOOK_EVERY;
        // Late (a long pass, a stopped VM): one look at once, then every
        // period from there, never a burst to catch up.
        next = next.max(Instant::now());
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let Some(this) = sup.upgrade() else { break };
        let every = Duration::from_secs(this.config.sample_interval_seconds);
        for w in this.running() {
            this.look(&w, every, runtime);
        }
    }
}

/// The workers, by id and in the order they started; the exited ones
/// also in the order they exited.
#[derive(Debug, Default)]
struct Registry {
    by_id: BTreeMap<String, Arc<Worker>>,
    order: VecDeque<String>,
    exited: VecDeque<String>,
}

/// The registry and everything a spawn needs.
#[derive(Debug)]
pub struct Supervisor {
    pub config: Config,
    /// Callers' roles and users' groups, from the account database.
    pub accounts: Arc<crate::auth::Accounts>,
    pub users: Users,
    pub cgroups: Cgroups,
    pub profiles: Profiles,
    pub events: Arc<Events>,
    /// Landlock denials are read from the kernel audit stream.
    pub landlock_audit: AtomicBool,
    launcher: Arc<Launcher>,
    registry: Mutex<Registry>,
    admission: Admission,
    records: Records,
    /// Name resolution for every worker's proxy (with the config's hosts).
    resolver: Arc<Resolver>,
    /// The client every worker's API gateway forwards with.
    upstream: Upstream,
    /// API use per user and worker, and the budgets.
    pub ledger: Arc<Ledger>,
    /// Per-user disk limits on the state directory's file system.
    pub disk: Arc<Disk>,
    next: AtomicU64,
    /// Workers' inits made ahead of their spawns.
    warm: warm::Pool,
    /// Workers' inits built up to the command for a spawn like a recent one.
    primed: primed::Pool,
    shutting_down: AtomicBool,
    /// Whether the monitor of running workers has been started.
    monitoring: AtomicBool,
    /// Spawn rates per user and caller, refused-call reports per peer.
    pub limiters: Limiters,
}

impl Supervisor {
    /// How long a streaming client may read nothing before it is cut off.
    pub fn client_timeout(&self) -> Duration {
        Duration::from_secs(self.config.client_timeout_seconds)
    }

    pub fn new(
        config: Config,
        users: Users,
        cgroups: Cgroups,
        profiles: Profiles,
        events: Arc<Events>,
        launcher: Arc<Launcher>,
        upstream: Upstream,
    ) -> Self {
        // Each user's tree is its own project where the file system counts them.
        let disk = Arc::new(Disk::probe(&config.state_dir));
        let users = users.with_projects(disk.counts());
        Supervisor {
            disk,
            upstream,
            ledger: Arc::new(Ledger::open(&config.state_dir.join("usage.json"))),
            admission: Admission::new(config.max_workers, config.max_workers_per_user),
            limiters: Limiters::new(&config.rate_limits),
            records: Records::new(config.state_dir.join("workers")),
            resolver: Arc::new(Resolver::system(config.hosts.clone().into_iter().collect())),
            next: AtomicU64::new(millis(SystemTime::now())),
            warm: warm::Pool::new(config.warm_inits),
            primed: primed::Pool::new(config.primed_inits),
            accounts: Arc::new(crate::auth::Accounts::new(&config)),
            config,
            users,
            cgroups,
            profiles,
            events,
            landlock_audit: AtomicBool::new(false),
            launcher,
            registry: Mutex::default(),
            shutting_down: AtomicBool::new(false),
            monitoring: AtomicBool::new(false),
        }
    }

    /// The registry's gauges, for a metrics scrape.
    pub fn gauges(&self) -> crate::metrics::Gauges {
        let mut g = crate::metrics::Gauges {
            warm: self.warm.ready_len(),
            primed: self.primed.ready_len(),
            ..Default::default()
        };
        for w in self.registry().by_id.values() {
            let state = if w.exit_info().is_some() { "exited" } else { "running" };
            *g.workers.entry((state.to_string(), w.profile.clone())).or_default() += 1;
        }
        g
    }

    /// A new worker id.
    fn new_id(&self) -> String {
        format!("w{:x}", self.next.fetch_add(1, Ordering::SeqCst))
    }

    /// A warm init for a spawn, if one is ready.
    fn take_warm(&self) -> Option<warm::Warm> {
        let (found, ended) = self.warm.take();
        if !ended.is_empty() {
            tokio::task::spawn_blocking(move || ended.into_iter().for_each(warm::Warm::discard));
        }
        found
    }

    /// Keeps `warm_inits` workers' inits made ahead of their spawns, from
    /// now until the daemon stops.
    pub fn keep_warm(self: &Arc<Self>) {
        if self.warm.wanted == 0 {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(500);
            loop {
                while this.warm.missing() > 0 && !this.shutting_down.load(Ordering::SeqCst) {
                    let maker = this.clone();
                    match tokio::task::spawn_blocking(move || maker.make_warm()).await {
                        Ok(Ok(w)) if !this.shutting_down.load(Ordering::SeqCst) => {
                            this.warm.put(w);
                            backoff = Duration::from_millis(500);
                        }
                        Ok(Ok(w)) => {
                            let _ = tokio::task::spawn_blocking(move || w.discard()).await;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, retry_in = ?backoff, "cannot make a warm init; spawns make their own meanwhile");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                        Err(_) => break,
                    }
                }
                if this.shutting_down.load(Ordering::SeqCst) {
                    break;
                }
                this.warm.taken.notified().await;
            }
        });
    }

    /// Lets go, every [`primed::SWEEP`] until the daemon stops, the primed inits
    /// unused for [`primed::IDLE`] or primed under an older profile set.
    pub fn keep_primed(self: &Arc<Self>) {
        if self.primed.wanted == 0 {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(primed::SWEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !this.shutting_down.load(Ordering::SeqCst) {
                tick.tick().await;
                let stale = this
                    .primed
                    .stale(Instant::now(), primed::IDLE, this.profiles.generation());
                if !stale.is_empty() {
                    let _ =
                        tokio::task::spawn_blocking(move || stale.into_iter().for_each(primed::Entry::discard)).await;
                }
            }
        });
    }

    /// One warm init: a new worker id, its cgroup with no limits yet, and
    /// its init in there, waiting for a spec (blocking).
    fn make_warm(&self) -> Result<warm::Warm, WorkerError> {
        let id = self.new_id();
        let cgroup = self.cgroups.create(&id, &crate::cgroups::CgroupLimits::default())?;
        match self.launcher.start(Some(&cgroup), Io::Pipe, Io::Pipe, Io::Pipe) {
            Ok(pending) => Ok(warm::Warm { id, cgroup, pending }),
            Err(e) => {
                let _ = cgroup.discard();
                Err(e.into())
            }
        }
    }

    fn logs_dir(&self) -> PathBuf {
        self.config.state_dir.join("logs")
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &str) -> Result<Arc<Worker>, WorkerError> {
        self.registry()
            .by_id
            .get(id)
            .cloned()
            .ok_or_else(|| WorkerError::NotFound(id.to_string()))
    }

    /// All known workers, newest first.
    pub fn list(&self) -> Vec<Arc<Worker>> {
        let r = self.registry();
        r.order.iter().rev().filter_map(|id| r.by_id.get(id).cloned()).collect()
    }

    fn running(&self) -> Vec<Arc<Worker>> {
        self.list().into_iter().filter(|w| w.exit_info().is_none()).collect()
    }

    /// Adds a worker (one that already exited, lost by a previous daemon,
    /// goes into the history at once).
    fn insert(&self, w: Arc<Worker>) {
        let exited = w.exit_info().is_some();
        let id = w.id.clone();
        {
            let mut r = self.registry();
            r.order.push_back(id.clone());
            r.by_id.insert(id.clone(), w);
        }
        if exited {
            self.retire(&id);
        }
    }

    /// Puts an exited worker into the history and forgets the workers that
    /// exited longest ago (and their output logs) beyond its length: work
    /// in the evicted ones only, not in the whole history, per exit.
    fn retire(&self, id: &str) {
        let mut r = self.registry();
        r.exited.push_back(id.to_string());
        while r.exited.len() > self.config.exited_history {
            let Some(old) = r.exited.pop_front() else { break };
            r.by_id.remove(&old);
            if let Some(i) = r.order.iter().position(|o| *o == old) {
                r.order.remove(i);
            }
            for stream in ["stdout", "stderr"] {
                let _ = std::fs::remove_file(self.logs_dir().join(format!("{old}.{stream}")));
            }
        }
    }

    /// Cleans up after a previous daemon: kills and removes leftover worker
    /// cgroups and adds the workers it recorded, as lost. Returns them.
    pub fn recover(&self) -> Vec<Arc<Worker>> {
        for id in self.cgroups.existing() {
            let cg = self.cgroups.open(&id);
            // A half-made cgroup may lack the freezer: remove what is there
            // whatever the kill said.
            let killed = cg.kill_all(Duration::from_secs(10));
            if let Err(e) = cg.remove() {
                tracing::error!(worker = %id, error = %e, kill = ?killed.err(), "cannot clean up a leftover worker cgroup");
            }
        }
        let lost: Vec<Arc<Worker>> = self
            .records
            .take_all()
            .into_iter()
            .map(|r| Arc::new(Worker::lost(r, &self.logs_dir())))
            .collect();
        for w in &lost {
            tracing::warn!(worker = %w.id, user = %w.user, "worker of a previous daemon was lost and cleaned up");
            self.insert(w.clone());
        }
        lost
    }

    /// Starts the monitor of running workers, once (the first spawn does).
    fn start_monitor(self: &Arc<Self>) {
        if !self.monitoring.swap(true, Ordering::SeqCst) {
            let (sup, runtime) = (Arc::downgrade(self), tokio::runtime::Handle::current());
            let started = std::thread::Builder::new()
                .name("monitor".into())
                .spawn(move || monitor(&sup, &runtime));
            if let Err(e) = started {
                self.monitoring.store(false, Ordering::SeqCst);
                tracing::error!(error = %e, "cannot start the monitor of running workers; the next spawn tries again");
            }
        }
    }

    /// One look at running worker `w`, on the monitor's thread: its
    /// counters of limits hit (and the tree's use where a disk limit was
    /// promised) every time, its usage when a sample is due. A v1 OOM kill
    /// goes to the runtime's blocking threads, so that it holds up no other
    /// worker's look.
    fn look(&self, w: &Worker, sample_every: Duration, runtime: &tokio::runtime::Handle) {
        // Its end reports its last counters.
        if w.exit_info().is_some() {
            return;
        }
        let Some(hits) = w.limits_hit() else { return };
        let oom = self.report_limits(w, &hits);
        // The tree's use, read once a look (a sample reports it too).
        let disk = w.has_disk_limit().then(|| w.disk_usage());
        if let Some(d) = disk {
            self.report_disk(w, d);
        }
        if oom && !self.cgroups.is_v2() {
            if let Some(cg) = w.cgroup.clone() {
                runtime.spawn_blocking(move || cg.kill_all(Duration::from_secs(5)));
            }
        }
        let due = {
            let mut sampled = w.sampled.lock().unwrap_or_else(|p| p.into_inner());
            let due = sampled.elapsed() >= sample_every;
            if due {
                *sampled = Instant::now();
            }
            due
        };
        if due && w.exit_info().is_none() {
            let Some(usage) = w.usage() else { return };
            self.events.publish(
                Some(&w.id),
                Some(&w.user),
                EventKind::ResourceSample {
                    memory_current: usage.memory_current,
                    memory_peak: usage.memory_peak,
                    cpu_usage_us: usage.cpu_usage_ns / 1000,
                    pids: usage.pids_current,
                    network: w.net_usage().map(|n| n.totals()),
                    disk: disk.unwrap_or_else(|| w.disk_usage()),
                },
            );
        }
    }

    /// Publishes a limit-reached event for each counter that moved since the
    /// last report; returns whether the OOM killer struck.
    fn report_limits(&self, w: &Worker, u: &Usage) -> bool {
        let mut guard = w.reported.lock().unwrap_or_else(|p| p.into_inner());
        let r = &mut *guard;
        let mut oom = false;
        for (limit, now, seen) in [
            ("oom_kill", u.oom_kills, &mut r.oom_kills),
            ("pids_max", u.pids_max_hits, &mut r.pids_max_hits),
            ("cpu_throttled", u.cpu_throttled, &mut r.cpu_throttled),
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

    /// Publishes `limit_reached` "disk" each time the user's tree becomes
    /// full (within 1 MiB of its limit, or at its file count).
    fn report_disk(&self, w: &Worker, disk: Option<DiskUse>) {
        let full = disk.is_some_and(|d| d.full());
        let count = {
            let mut r = w.reported.lock().unwrap_or_else(|p| p.into_inner());
            let newly = full && !r.disk_full_now;
            r.disk_full_now = full;
            if !newly {
                return;
            }
            r.disk_full += 1;
            r.disk_full
        };
        self.events.publish(
            Some(&w.id),
            Some(&w.user),
            EventKind::LimitReached {
                limit: "disk".to_string(),
                count,
            },
        );
    }

    /// Records the exit: kills what is left, removes the cgroup and the
    /// record, publishes the exit (on disk before anyone waiting hears of
    /// it) and releases the worker's slot.
    /// `stages` holds the exit path's stages (`exited`, `output`).
    async fn finish(
        &self,
        w: &Worker,
        status: Option<std::process::ExitStatus>,
        timed_out: bool,
        stages: Vec<StageTime>,
    ) {
        use std::os::unix::process::ExitStatusExt;
        let usage = w.usage().unwrap_or_default();
        self.report_limits(w, &usage);
        self.report_disk(w, w.disk_usage());
        // Its promise goes: the project's limit is the other workers' now.
        drop(w.disk.lock().unwrap_or_else(|p| p.into_inner()).take());
        // Its listeners close: nothing more reaches the proxy from it.
        for t in w.net_tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            t.abort();
        }
        // Its cgroup goes while its exit is written (both before anyone
        // waiting hears of it).
        let removal = w.cgroup.clone().map(|cg| {
            let id = w.id.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = cg.kill_all(Duration::from_secs(10)).and_then(|()| cg.remove()) {
                    tracing::error!(worker = %id, error = %e, "cannot remove the worker's cgroup");
                }
            })
        });
        let (code, signal) = match status.map(|s| (s.code(), s.signal())) {
            Some((Some(c), _)) => (c, if c > 128 { c - 128 } else { 0 }),
            Some((None, Some(sig))) => (128 + sig, sig),
            _ => (-1, 0),
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
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let written = self.events.submit(
            Some(&w.id),
            Some(&w.user),
            EventKind::WorkerExited {
                code,
                signal,
                reason,
                duration_ms,
                cpu_time_us: info.cpu_time_us,
                peak_memory: info.peak_memory,
                network: w.net_usage(),
                api: w.api_usage(),
                stages,
            },
        );
        written.written().await;
        if let Some(r) = removal {
            let _ = r.await;
        }
        // Nobody reads it any more; an exited worker kept in the history
        // holds no descriptor.
        w.stdin.close().await;
        self.records.remove(&w.id);
        // The slot is free before anyone waiting hears of the exit.
        w.slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        w.exit.send_replace(Some(info));
        self.retire(&w.id);
    }

    pub fn signal(&self, id: &str, sig: Signal) -> Result<Arc<Worker>, WorkerError> {
        let w = self.get(id)?;
        let (None, Some(pidfd)) = (w.exit_info(), w.pidfd.as_ref()) else {
            return Err(WorkerError::Exited(id.to_string()));
        };
        match crate::sys::pidfd_send_signal(pidfd.as_fd(), sig) {
            Ok(()) => Ok(w),
            // It ended a moment ago; its exit is on the way.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err(WorkerError::Exited(id.to_string())),
            Err(source) => Err(WorkerError::Signal {
                id: id.to_string(),
                source,
            }),
        }
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
        if let Some(cg) = w.cgroup.clone() {
            let _ = tokio::task::spawn_blocking(move || cg.kill_all(Duration::from_secs(10))).await;
        }
        Ok(w.wait().await)
    }

    /// Stops accepting spawns, ends the warm and primed inits and stops every running
    /// worker (SIGTERM).
    pub async fn shutdown(self: &Arc<Self>) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.warm.taken.notify_one();
        let warm = self.warm.drain();
        let primed = self.primed.drain();
        let _ = tokio::task::spawn_blocking(move || {
            warm.into_iter().for_each(warm::Warm::discard);
            primed.into_iter().for_each(primed::Entry::discard);
        })
        .await;
        // Those being primed are let go as they are made (a few ms).
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.primed.making_len() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stops = self.running().into_iter().map(|w| {
            let this = self.clone();
            tokio::spawn(async move { this.stop(&w.id, None).await })
        });
        for s in stops.collect::<Vec<_>>() {
            let _ = s.await;
        }
    }
}

impl crate::landlock_audit::Placement for Supervisor {
    fn by_init(&self, pid: u32) -> Option<(String, String)> {
        let r = self.registry();
        r.by_id
            .values()
            .find(|w| pid != 0 && w.pid == pid)
            .map(|w| (w.id.clone(), w.user.clone()))
    }

    fn user_of(&self, id: &str) -> Option<String> {
        self.get(id).ok().map(|w| w.user.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_worker_comes_back_lost_with_its_output() {
        let logs = tempfile::tempdir().unwrap();
        std::fs::write(logs.path().join("w7.stdout"), "before the crash\n").unwrap();
        let w = Worker::lost(
            Record {
                id: "w7".into(),
                user: "alice".into(),
                project: "default".into(),
                profile: "base".into(),
                policy_digest: "d".into(),
                command: vec!["sleep".into(), "60".into()],
                uid: 200_000,
                started_ms: 1_000,
            },
            logs.path(),
        );
        let exit = w.exit_info().expect("a lost worker has ended");
        assert_eq!((exit.reason, exit.code), (ExitReason::Lost, -1));
        assert_eq!(w.started, UNIX_EPOCH + Duration::from_secs(1));
        assert_eq!((w.stdout.kept(), w.stdout.produced()), (17, 17));
        assert!(w.stdout.is_done() && w.stderr.is_done());
        assert!(matches!(
            w.approve(
                "r1",
                Decision {
                    allow: true,
                    by: "uid 0".into(),
                    message: String::new(),
                }
            ),
            Err(WorkerError::NoApproval(_))
        ));
    }
}
