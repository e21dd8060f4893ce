//! A spawn, in phases: admit → resolve → prepare → launch → register →
//! watch. [`Supervisor::spawn`] is their table of contents; each phase is
//! one function here, read top to bottom.
//!
//! [`prepare`] and [`Prepared::launch`] are also what the test harness
//! runs workers with, without a daemon: the same pipeline, not a copy.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use warden_policy::config::Config;
use warden_policy::seccomp::Arch;
use warden_policy::{ClaudeRequest, LaunchSpec, Mark, NetworkMode, NetworkPolicy, Profile, ProfileSet, SpawnRequest};

use super::admission::{AdmissionError, Slot};
use super::primed;
use super::record::Record;
use super::warm::Warm;
use super::{Supervisor, Worker, WorkerError};
use crate::cgroups::{CgroupLimits, Cgroups, WorkerCgroup};
use crate::claude::prepare::GatewaySetup;
use crate::claude::session::{self, Session, Start};
use crate::disk::{Disk, DiskPromise};
use crate::events::{clip, logged_command, millis, EventKind, StageTime, Written, MAX_FIELD};
use crate::io::Stdin;
use crate::launcher::{Io, LaunchError, Launched, Launcher};
use crate::limits::Bucket;
use crate::net::gateway::Gateway;
use crate::net::Egress;
use crate::users::Users;

fn rate_error(who: String, limit: &'static str, wait: Duration) -> WorkerError {
    AdmissionError::Rate {
        who,
        limit,
        retry_secs: wait.as_secs() + 1,
    }
    .into()
}

/// Tightening limits a request may ask for (None: keep the profile's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RequestedLimits {
    pub memory: Option<u64>,
    pub memory_swap: Option<u64>,
    pub pids: Option<u64>,
    pub cpu_quota_us: Option<u64>,
    pub timeout_secs: Option<u64>,
}

/// What a spawn request asks for, validated field by field by the API.
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
    pub claude: ClaudeRequest,
    /// The uid that asked (for the per-caller spawn rate); None: the
    /// daemon itself or a test harness.
    pub caller_uid: Option<u32>,
}

/// The host side a worker is prepared on: the daemon's, or a test's.
#[derive(Debug, Clone, Copy)]
pub struct Host<'a> {
    pub config: &'a Config,
    pub users: &'a Users,
    pub cgroups: &'a Cgroups,
    pub disk: &'a Arc<Disk>,
}

/// A worker ready to launch: its compiled spec and its cgroup, created
/// with the profile's limits.
#[derive(Debug)]
pub struct Prepared {
    pub spec: LaunchSpec,
    pub cgroup: WorkerCgroup,
    pub project: String,
    /// Where the worker's traffic may go (its proxy decides by this).
    pub network: NetworkPolicy,
    /// Claude Code workers: what their API gateway needs.
    pub gateway: Option<GatewaySetup>,
    /// Claude Code workers: how the daemon drives the session.
    pub session: Option<Start>,
    /// The disk limit promised on the user's tree (the worker takes it).
    pub disk: Option<DiskPromise>,
}

impl Supervisor {
    /// Starts a worker: returns once the sandbox is in place and the command
    /// exec'd, or with the phase's error (nothing of the worker is left).
    pub async fn spawn(self: &Arc<Self>, p: SpawnParams) -> Result<Arc<Worker>, WorkerError> {
        let begun = crate::sys::monotonic_ns();
        let mark = |stage: &str| Mark {
            stage: stage.to_string(),
            at_ns: crate::sys::monotonic_ns(),
        };
        let slot = self.admit(&p).await?;
        let mut marks = vec![mark("admitted")];
        let profile = resolve(&self.profiles.current(), &p)?;
        let name = profile.name.clone();
        let key = primed::Key::of(&p, self.profiles.generation());
        // For a plain profile, the next spawn like this one gets an init
        // primed after it.
        let again = self.primed.wanted > 0 && profile.claude.is_none();
        // An init primed for a spawn like this one spares it building its
        // sandbox; else a warm init, when one is ready, spares it making
        // its cgroup and namespaces.
        let ahead = self.take_ahead(&key).await;
        // Prepared and launched in one blocking task, with no hop back to
        // the async threads between the two. (Running it on this thread
        // with block_in_place instead was measured: no gain end to end,
        // and 20 KiB more of wardend's memory per idle worker.)
        let this = self.clone();
        let params = p.clone();
        let started = tokio::task::spawn_blocking(move || this.start(&profile, &params, ahead)).await?;
        let (mut prepared, prepared_at, mut launched, init) = match started {
            Ok(started) => started,
            Err(failed) => {
                let Failed { error, worker, failure } = *failed;
                if let Some(failure) = failure {
                    self.spawn_failed(worker.as_deref(), &p.user, &name, failure).await;
                }
                return Err(error);
            }
        };
        marks.push(prepared_at);
        marks.push(init);
        marks.extend(launched.enforced.marks.iter().cloned());
        // The launcher's report ends when the worker's exec closes it.
        marks.push(mark("exec"));
        // In the order they ended: the init builds what every sandbox has
        // while the daemon waits for it (or, warm, before the request:
        // those stages are at 0).
        marks.sort_by_key(|m| m.at_ns);
        let stages = marks
            .into_iter()
            .map(|m| StageTime {
                stage: m.stage,
                us: m.at_ns.saturating_sub(begun) / 1000,
            })
            .collect();
        let (worker, started) = self.register(&mut prepared, &mut launched, &p, slot, (begun, stages));
        let timeout = prepared.spec.timeout_secs.map(Duration::from_secs);
        let interactive = p.interactive;
        let again = again.then_some((key, p));
        self.watch(&worker, launched, prepared.session, interactive, timeout, again);
        // The caller hears of the worker once its start is in the log.
        started.written().await;
        Ok(worker)
    }

    /// What a spawn starts from: an init primed for its key, else a warm
    /// init, else nothing made ahead.
    async fn take_ahead(&self, key: &primed::Key) -> Ahead {
        let (found, ended) = self.primed.take(key);
        if let Some(e) = ended {
            tokio::task::spawn_blocking(move || e.discard());
        }
        let primed = match found {
            primed::Found::Ready(e) => Some(e),
            primed::Found::Coming(rx) => tokio::time::timeout(primed::WAIT, rx).await.ok().and_then(Result::ok),
            primed::Found::None => None,
        };
        match primed {
            Some(e) => Ahead::Primed(e),
            None => self.take_warm().map_or(Ahead::Cold, Ahead::Warm),
        }
    }

    /// Has an init primed, in the background, for the next spawn with
    /// `key` (prepared from `profile` and `p`), unless one is ready or
    /// being made for it or `primed_inits` are.
    fn prime(self: &Arc<Self>, key: primed::Key, profile: Profile, p: SpawnParams) {
        if self.shutting_down.load(Ordering::SeqCst) || !self.primed.reserve(&key) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let warm = this.take_warm();
            let maker = this.clone();
            match tokio::task::spawn_blocking(move || maker.make_primed(&profile, &p, warm)).await {
                Ok(Ok(e)) => {
                    if let Some(e) = this.primed.put(key.clone(), e) {
                        let _ = tokio::task::spawn_blocking(move || e.discard()).await;
                        this.primed.cancel(&key);
                    }
                }
                Ok(Err(e)) => {
                    this.primed.cancel(&key);
                    tracing::info!(error = %e, "cannot prime an init; spawns build their own");
                }
                Err(_) => this.primed.cancel(&key),
            }
        });
    }

    /// An init for spawns like `p`, primed (blocking): `warm`'s, or a new
    /// one, prepared as the spawn is and built up to the command.
    fn make_primed(
        &self,
        profile: &Profile,
        p: &SpawnParams,
        warm: Option<Warm>,
    ) -> Result<primed::Entry, WorkerError> {
        let (id, made, pending) = match warm {
            Some(w) => (w.id, Some(w.cgroup), Some(w.pending)),
            None => (self.new_id(), None, None),
        };
        let mut prepared = match prepare(&self.host(), &id, made.clone(), None, profile, p) {
            Ok(prepared) => prepared,
            Err(e) => {
                if let (Some(cgroup), Some(pending)) = (made, pending) {
                    Warm { id, cgroup, pending }.discard();
                }
                return Err(e);
            }
        };
        // The disk promise is the spawn's to make: nothing of the user runs
        // in a primed init.
        drop(prepared.disk.take());
        let pending = match pending {
            Some(pending) => pending,
            None => match self
                .launcher
                .start(Some(&prepared.cgroup), Io::Pipe, Io::Pipe, Io::Pipe)
            {
                Ok(pending) => pending,
                Err(e) => {
                    prepared.abandon();
                    return Err(e.into());
                }
            },
        };
        match pending.prime(&prepared.spec) {
            Ok(init) => Ok(primed::Entry {
                id,
                cgroup: prepared.cgroup.clone(),
                init,
                made: Instant::now(),
            }),
            Err(e) => {
                prepared.abandon();
                Err(e.into())
            }
        }
    }

    /// Admission: refuses a user in debt with its audit budget or past its
    /// spawn rate (or a caller past its own), then reserves the worker's
    /// slot under the caps. A rate refusal is a `rate_limited` event (at
    /// most one per key every 10 s, counting the refusals in between), in
    /// the audit log before the refusal is answered.
    async fn admit(&self, p: &SpawnParams) -> Result<Slot, WorkerError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(WorkerError::ShuttingDown);
        }
        if let Some(wait) = self.events.budget_debt(&p.user) {
            return Err(AdmissionError::AuditBudget {
                user: p.user.clone(),
                retry_secs: wait.as_secs() + 1,
            }
            .into());
        }
        let now = Instant::now();
        let l = &self.limiters;
        // Both buckets must have a token before either is taken.
        let user_wait = l.spawns_per_user.with(&p.user, |b| b.bucket.wait_for(1.0, now));
        let caller_wait = p.caller_uid.map_or(Duration::ZERO, |uid| {
            l.spawns_per_caller.with(&uid, |b| b.bucket.wait_for(1.0, now))
        });
        if !user_wait.is_zero() {
            if let Some(n) = l.spawns_per_user.with(&p.user, |b| b.reports.refused(now)) {
                self.rate_limited("spawns_per_user", Some(&p.user), None, n)
                    .written()
                    .await;
            }
            return Err(rate_error(format!("user {}", p.user), "spawns_per_user", user_wait));
        }
        if let Some(uid) = p.caller_uid.filter(|_| !caller_wait.is_zero()) {
            if let Some(n) = l.spawns_per_caller.with(&uid, |b| b.reports.refused(now)) {
                self.rate_limited("spawns_per_caller", None, Some(uid), n)
                    .written()
                    .await;
            }
            return Err(rate_error(format!("uid {uid}"), "spawns_per_caller", caller_wait));
        }
        let slot = self.admission.admit(&p.user)?;
        l.spawns_per_user.with(&p.user, |b| b.bucket.take(1.0, now));
        if let Some(uid) = p.caller_uid {
            l.spawns_per_caller.with(&uid, |b| b.bucket.take(1.0, now));
        }
        Ok(slot)
    }

    fn rate_limited(&self, limit: &str, user: Option<&str>, peer_uid: Option<u32>, suppressed: u64) -> Written {
        self.events.submit(
            None,
            user,
            EventKind::RateLimited {
                limit: limit.into(),
                suppressed,
                peer_uid,
            },
        )
    }

    /// Prepares the worker, from what was made `ahead` of it, and launches
    /// it (blocking: file system work and the launch server, off the async
    /// threads). A failure leaves nothing of the worker and says what its
    /// `spawn_failed` event reports, if it has one.
    fn start(&self, profile: &Profile, p: &SpawnParams, ahead: Ahead) -> Result<Started, Box<Failed>> {
        let (id, made) = match ahead.made() {
            Some((id, cgroup)) => (id, Some(cgroup)),
            None => (self.new_id(), None),
        };
        let built = match &ahead {
            Ahead::Primed(e) => Some(e.init.built()),
            _ => None,
        };
        let prepared = match prepare(&self.host(), &id, made, built, profile, p) {
            Ok(prepared) => prepared,
            Err(error) => {
                ahead.discard();
                let failure = matches!(error, WorkerError::Disk(_)).then(|| ("disk".into(), 0, error.to_string()));
                return Err(Box::new(Failed {
                    error,
                    worker: None,
                    failure,
                }));
            }
        };
        let at = Mark {
            stage: "prepared".into(),
            at_ns: crate::sys::monotonic_ns(),
        };
        match self.launch(&prepared, ahead) {
            Ok((launched, init)) => Ok((prepared, at, launched, init)),
            Err(error) => {
                prepared.abandon();
                self.records.remove(&prepared.spec.worker_id);
                let failure = match &error {
                    WorkerError::Launch(LaunchError::Setup {
                        stage, errno, message, ..
                    }) => (stage.clone(), *errno, message.clone()),
                    other => ("spawn".to_string(), 0, other.to_string()),
                };
                Err(Box::new(Failed {
                    error,
                    worker: Some(prepared.spec.worker_id.clone()),
                    failure: Some(failure),
                }))
            }
        }
    }

    /// A `spawn_failed` event (on disk when this returns): the stage that
    /// failed, its errno (0: none) and what it said.
    async fn spawn_failed(
        &self,
        worker: Option<&str>,
        user: &str,
        profile: &str,
        (stage, errno, message): (String, i32, String),
    ) {
        self.events
            .submit(
                worker,
                Some(user),
                EventKind::SpawnFailed {
                    profile: profile.to_string(),
                    stage,
                    errno,
                    message: clip(&message, MAX_FIELD),
                },
            )
            .written()
            .await;
    }

    /// Persists the worker's record, then has the launch server create the
    /// worker's init (unless one was made `ahead`), hands it the spec and
    /// waits for its report (blocking); returns it with the mark of the
    /// init ready. The cgroup is the caller's to remove on failure.
    fn launch(&self, prepared: &Prepared, ahead: Ahead) -> Result<(Launched, Mark), WorkerError> {
        let spec = &prepared.spec;
        let logs = self.logs_dir();
        let setup = || -> Result<(), WorkerError> {
            std::fs::create_dir_all(&logs).map_err(|source| WorkerError::Logs {
                path: logs.clone(),
                source,
            })?;
            self.records.save(&Record {
                id: spec.worker_id.clone(),
                user: spec.user.clone(),
                project: prepared.project.clone(),
                profile: spec.profile.clone(),
                policy_digest: spec.policy_digest.clone(),
                command: spec.argv.clone(),
                uid: spec.uid,
                started_ms: millis(SystemTime::now()),
            })?;
            Ok(())
        };
        if let Err(e) = setup() {
            ahead.discard_init();
            return Err(e);
        }
        let init = || Mark {
            stage: "init".into(),
            at_ns: crate::sys::monotonic_ns(),
        };
        let pending = match ahead {
            // Built from this spawn's sandbox, byte for byte (else let
            // go): only the command is missing.
            Ahead::Primed(e) => {
                let init = init();
                match e.init.go(spec) {
                    Err(LaunchError::Mismatch) => {
                        tracing::info!(worker = %spec.worker_id, "the primed init was built for another sandbox (the user or profile changed); building this one");
                        self.launcher
                            .start(Some(&prepared.cgroup), Io::Pipe, Io::Pipe, Io::Pipe)?
                    }
                    launched => return Ok((launched?, init)),
                }
            }
            Ahead::Warm(w) => w.pending,
            Ahead::Cold => self
                .launcher
                .start(Some(&prepared.cgroup), Io::Pipe, Io::Pipe, Io::Pipe)?,
        };
        let init = init();
        Ok((pending.run(spec)?, init))
    }

    /// Builds the [`Worker`], adds it to the registry and publishes what the
    /// kernel enforces for it.
    fn register(
        &self,
        prepared: &mut Prepared,
        launched: &mut Launched,
        p: &SpawnParams,
        slot: Slot,
        (requested_ns, stages): (u64, Vec<StageTime>),
    ) -> (Arc<Worker>, Written) {
        let spec = &prepared.spec;
        let stdin = launched
            .stdin
            .take()
            .and_then(|s| tokio::net::unix::pipe::Sender::from_file(s).ok());
        let egress = (prepared.network.mode == NetworkMode::Proxy).then(|| {
            Arc::new(Egress::new(
                &spec.worker_id,
                &spec.user,
                &spec.profile,
                prepared.network.clone(),
                self.resolver.clone(),
                self.events.clone(),
                &self.config,
            ))
        });
        let gateway = prepared.gateway.clone().map(|setup| {
            Arc::new(Gateway::new(
                &spec.worker_id,
                &spec.user,
                &spec.profile,
                setup,
                self.upstream.clone(),
                self.ledger.clone(),
                self.events.clone(),
                &self.config,
            ))
        });
        let worker = Arc::new(Worker {
            pid: launched.process.id(),
            pidfd: launched.process.pidfd().try_clone_to_owned().ok(),
            egress,
            gateway,
            network: Some(prepared.network.clone()),
            requested_ns,
            enforced: Some(launched.enforced.clone()),
            stdin: Arc::new(Stdin::new(stdin)),
            cgroup: Some(prepared.cgroup.clone()),
            one_shot_session: prepared.session.is_some() && !p.interactive,
            session: prepared.session.is_some(),
            slot: std::sync::Mutex::new(Some(slot)),
            disk: std::sync::Mutex::new(prepared.disk.take()),
            ..Worker::new(
                Record {
                    id: spec.worker_id.clone(),
                    user: spec.user.clone(),
                    project: prepared.project.clone(),
                    profile: spec.profile.clone(),
                    policy_digest: spec.policy_digest.clone(),
                    command: spec.argv.clone(),
                    uid: spec.uid,
                    started_ms: millis(SystemTime::now()),
                },
                &self.logs_dir(),
            )
        });
        self.insert(worker.clone());
        tracing::info!(worker = %worker.id, user = %worker.user, profile = %worker.profile, pid = worker.pid, "worker started");
        let e = &launched.enforced;
        let (command, command_truncated) = logged_command(&worker.command);
        let started = self.events.submit(
            Some(&worker.id),
            Some(&worker.user),
            EventKind::WorkerStarted {
                profile: worker.profile.clone(),
                policy_digest: worker.policy_digest.clone(),
                uid: worker.uid,
                cgroup: prepared
                    .cgroup
                    .paths()
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
                command,
                command_truncated,
                landlock_abi: e.landlock_abi,
                landlock_tcp: e.landlock_tcp,
                landlock_scoped: e.landlock_scoped,
                seccomp_filter_len: e.seccomp_filter_len,
                namespaces: e.namespaces.clone(),
                no_new_privs: e.no_new_privs,
                capabilities_empty: e.capabilities_empty,
                landlock_denials_observable: self.landlock_audit.load(Ordering::SeqCst) && e.landlock_abi >= 7,
                seccomp_denials_observable: launched.denials.is_some(),
                disk_limit: prepared.spec_disk_limit(),
                stages,
            },
        );
        (worker, started)
    }

    /// What runs alongside the worker until it ends: the denial reporter,
    /// the Claude Code session, the output pumps, the waiter that records
    /// the exit (a timeout when it ran for `timeout`) and then has an init
    /// primed for the next spawn like it (`again`), and the limit monitor.
    fn watch(
        self: &Arc<Self>,
        worker: &Arc<Worker>,
        mut launched: Launched,
        session: Option<Start>,
        interactive: bool,
        timeout: Option<Duration>,
        again: Option<(primed::Key, SpawnParams)>,
    ) {
        let denials = launched.denials.take().map(|pipe| self.report_denials(worker, pipe));
        // The proxy and the API gateway, on listeners in the worker's own
        // network namespace.
        let tasks = crate::net::serve(
            &worker.id,
            worker.egress.as_ref(),
            worker.gateway.as_ref(),
            std::mem::take(&mut launched.listeners),
        );
        worker.net_tasks.lock().unwrap_or_else(|p| p.into_inner()).extend(tasks);
        // Claude Code sessions: the daemon reads the worker's stream-json
        // output to answer its permission requests and end one-shot runs.
        let tap = session.map(|start| {
            // A few reads' worth: past it the pump waits for the driver.
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let limits = &self.config.rate_limits;
            let s = Session {
                worker: worker.id.clone(),
                user: worker.user.clone(),
                events: self.events.clone(),
                stdin: worker.stdin.clone(),
                approvals: worker.approvals.clone(),
                limits: session::Limits {
                    rate: limits.worker_approvals,
                    pending: limits.pending_approvals,
                },
            };
            tokio::spawn(session::drive(s, start, interactive, rx));
            tx
        });
        let cap = self.config.log_max_bytes;
        // The logs count toward the user's disk limit, like its own files.
        let project = self.disk.counts().then_some(worker.uid);
        let stdout = launched
            .stdout
            .take()
            .and_then(|s| tokio::net::unix::pipe::Receiver::from_file(s).ok());
        let stderr = launched
            .stderr
            .take()
            .and_then(|s| tokio::net::unix::pipe::Receiver::from_file(s).ok());
        let pumps = [
            stdout.map(|s| {
                let w = worker.clone();
                tokio::spawn(async move { w.stdout.pump(s, cap, project, tap).await })
            }),
            stderr.map(|s| {
                let w = worker.clone();
                tokio::spawn(async move { w.stderr.pump(s, cap, project, None).await })
            }),
        ];
        let (this, w, process) = (self.clone(), worker.clone(), launched.process);
        let mount_ns = launched.mount_ns.take();
        tokio::spawn(async move {
            let begun = Instant::now();
            // No thread per running worker: its exit is awaited on a pidfd.
            let status = crate::sys::wait_process(process).await;
            let mut stages = vec![w.stage("exited")];
            for p in pumps.into_iter().flatten() {
                let _ = p.await;
            }
            // Its last denial reports (the init's count of those it left
            // out comes at its end) are queued before its exit event: a
            // client that saw the exit has every report of the worker.
            // (Its pipe ends with the init; bounded all the same.)
            if let Some(relay) = denials {
                if tokio::time::timeout(Duration::from_secs(2), relay).await.is_err() {
                    tracing::warn!(worker = %w.id, "its denial reports did not end with its init; its exit is reported before them");
                }
            }
            stages.push(w.stage("output"));
            let timed_out = timeout.is_some_and(|t| begun.elapsed() >= t);
            this.finish(&w, Some(status), timed_out, stages).await;
            // The next spawn like this one finds an init primed, made once
            // this one's end is reported (not while it ran, nor while its
            // exit event was written: on few cores either would wait).
            // Its profile is resolved again, from the set of its key (a
            // resolved profile is kilobytes: not held by every running
            // worker).
            if let Some((key, p)) = again.filter(|(key, _)| this.profiles.generation() == key.generation()) {
                if let Ok(profile) = resolve(&this.profiles.current(), &p) {
                    this.prime(key, profile, p);
                }
            }
            // Its sandbox's mounts go once its end is reported (tearing
            // them down waits for the kernel).
            tokio::task::spawn_blocking(move || drop(mount_ns));
        });
        self.start_monitor();
    }

    /// Makes the worker's denial reports (its init answers the calls)
    /// `sandbox_denial` events, until its init is gone (the task that
    /// does, to be awaited before its exit is reported).
    fn report_denials(&self, worker: &Worker, pipe: std::os::fd::OwnedFd) -> tokio::task::JoinHandle<()> {
        let events = self.events.clone();
        let limit = Bucket::new(self.config.rate_limits.worker_denials);
        let (id, user) = (worker.id.clone(), worker.user.clone());
        tokio::spawn(crate::denials::relay(pipe, limit, move |d| {
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
        }))
    }

    /// The host side of this daemon, for [`prepare`].
    fn host(&self) -> Host<'_> {
        Host {
            config: &self.config,
            users: &self.users,
            cgroups: &self.cgroups,
            disk: &self.disk,
        }
    }
}

/// A worker prepared and launched: what was prepared, its mark, the
/// launch and the mark of its init ready.
type Started = (Prepared, Mark, Launched, Mark);

/// A spawn that failed before its worker ran: the error, and what its
/// `spawn_failed` event reports (the worker id, if it had one; the stage,
/// errno and message), if it has one.
struct Failed {
    error: WorkerError,
    worker: Option<String>,
    failure: Option<(String, i32, String)>,
}

/// What a spawn starts from, made ahead of it.
#[derive(Debug)]
enum Ahead {
    /// An init built up to the command, for a spawn like this one.
    Primed(primed::Entry),
    /// An init in its cgroup and namespaces, waiting for a spec.
    Warm(Warm),
    /// Nothing made ahead.
    Cold,
}

impl Ahead {
    /// The worker id and cgroup made ahead.
    fn made(&self) -> Option<(String, WorkerCgroup)> {
        match self {
            Ahead::Primed(e) => Some((e.id.clone(), e.cgroup.clone())),
            Ahead::Warm(w) => Some((w.id.clone(), w.cgroup.clone())),
            Ahead::Cold => None,
        }
    }

    /// Lets go of what was made ahead, its cgroup included (blocking).
    fn discard(self) {
        match self {
            Ahead::Primed(e) => e.discard(),
            Ahead::Warm(w) => w.discard(),
            Ahead::Cold => {}
        }
    }

    /// Lets go of the init made ahead; its cgroup is the spawn's to remove
    /// (blocking).
    fn discard_init(self) {
        match self {
            Ahead::Primed(e) => e.init.discard(),
            Ahead::Warm(mut w) => {
                let _ = w.pending.process.kill(Duration::from_secs(10));
            }
            Ahead::Cold => {}
        }
    }
}

/// The profile the request names, with the request's limits applied (they
/// may only tighten it).
pub fn resolve(set: &ProfileSet, p: &SpawnParams) -> Result<Profile, WorkerError> {
    let mut profile = set.get(&p.profile)?.clone();
    let (l, r) = (&mut profile.limits, &p.limits);
    l.memory = tighten("memory", l.memory, r.memory)?;
    l.memory_swap = tighten("memory_swap", l.memory_swap, r.memory_swap.or(r.memory))?;
    l.pids = tighten("pids", l.pids, r.pids)?;
    l.cpu_quota_us = tighten("cpu_quota", l.cpu_quota_us, r.cpu_quota_us)?;
    l.timeout_secs = tighten("timeout", l.timeout_secs, r.timeout_secs)?;
    Ok(profile)
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

/// Prepares worker `id` on `host`: the user's uid and directories, Claude
/// Code's files for a `[claude]` profile, the cgroup with the profile's
/// limits (`made` ahead for a warm or primed init, or new), and the spec.
/// For an init primed for this spawn's key, `built` is the spec it was
/// built from, which a spawn like this one compiled: its cgroup has the
/// key's limits, and only the command is this spawn's own (unless the
/// user's uid is not the one it was built for: then all is prepared, and
/// the init is let go at launch). Blocking.
pub fn prepare(
    host: &Host<'_>,
    id: &str,
    made: Option<WorkerCgroup>,
    built: Option<&LaunchSpec>,
    profile: &Profile,
    p: &SpawnParams,
) -> Result<Prepared, WorkerError> {
    let identity = host.users.identity(&p.user)?;
    // The user's disk limit: the config's for this user, else the profile's.
    let disk_limit = host.config.disk_limits.get(&p.user).copied().or(profile.limits.disk);
    let disk = host
        .disk
        .promise(identity.uid, &p.user, &profile.name, id, disk_limit)?;
    let profile = &if disk_limit == profile.limits.disk {
        std::borrow::Cow::Borrowed(profile)
    } else {
        let mut p = profile.clone();
        p.limits.disk = disk_limit;
        std::borrow::Cow::Owned(p)
    };
    let dirs = host.users.prepare(&p.user, &profile.name, &p.project)?;
    // A [claude] profile runs the claude binary; the request's command is
    // its initial prompt.
    let claude = match &profile.claude {
        Some(c) => Some(crate::claude::prepare::prepare(
            host.config,
            c,
            &p.claude,
            &p.user,
            &p.command,
            identity,
            &dirs.workspace,
        )?),
        None => None,
    };
    let (argv, extra_binds) = match &claude {
        Some(c) => (c.argv.clone(), c.binds.clone()),
        None => (p.command.clone(), Vec::new()),
    };
    let built = built.filter(|b| b.uid == identity.uid && b.worker_id == id && claude.is_none() && made.is_some());
    let limits = CgroupLimits::from(&profile.limits);
    // A cgroup made ahead holds its init: the caller's discard of what was
    // made ahead kills the init and removes both.
    let ours = made.is_none();
    let cgroup = match made {
        Some(cg) if built.is_some() => cg,
        Some(cg) => {
            cg.limit(&limits)?;
            cg
        }
        None => host.cgroups.create(id, &limits)?,
    };
    let req = SpawnRequest {
        worker_id: id.to_string(),
        user: p.user.clone(),
        uid: identity.uid,
        gid: identity.gid,
        project: p.project.clone(),
        argv,
        env: p.env.clone(),
        home_dir: dirs.home,
        workspace_dir: dirs.workspace,
        cgroup_procs: cgroup.procs_files(),
        protected: host.config.protected_paths(),
        extra_binds,
    };
    let spec = match built {
        Some(built) => warden_policy::command(profile, &req)
            .map(|c| LaunchSpec {
                argv: c.argv,
                env: c.env,
                ..built.clone()
            })
            .map_err(WorkerError::from),
        None => Arch::host()
            .ok_or(WorkerError::Arch)
            .and_then(|a| Ok(warden_policy::compile(profile, &req, a)?)),
    };
    let mut spec = match spec {
        Ok(spec) => spec,
        Err(e) => {
            if ours {
                let _ = cgroup.remove();
            }
            return Err(e);
        }
    };
    spec.seccomp.set_report_rate(host.config.rate_limits.worker_denials);
    // Claude Code gets its gateway's address and a placeholder credential;
    // the user's real one stays in the daemon, with the gateway.
    let (session, gateway) = match claude {
        Some(c) => {
            for (k, v) in c.env {
                spec.env.retain(|(name, _)| *name != k);
                spec.env.push((k, v));
            }
            (Some(c.start), Some(c.gateway))
        }
        None => (None, None),
    };
    Ok(Prepared {
        spec,
        cgroup,
        project: p.project.clone(),
        network: profile.network.clone(),
        gateway,
        session,
        disk: Some(disk),
    })
}

impl Prepared {
    /// The disk limit promised on the user's tree, if any.
    fn spec_disk_limit(&self) -> Option<u64> {
        self.disk.as_ref().and_then(|d| d.bytes)
    }

    /// Launches this worker with the given stdio (blocking).
    pub fn launch(&self, launcher: &Launcher, stdin: Io, stdout: Io, stderr: Io) -> Result<Launched, LaunchError> {
        launcher.launch(&self.spec, Some(&self.cgroup), stdin, stdout, stderr)
    }

    /// Undoes [`prepare`] for a worker that will not run: kills anything in
    /// its cgroup and removes it.
    pub fn abandon(&self) {
        if let Err(e) = self.cgroup.discard() {
            tracing::error!(worker = %self.spec.worker_id, error = %e, "cannot remove the cgroup of a worker that did not start");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(limits: RequestedLimits) -> SpawnParams {
        SpawnParams {
            user: "alice".into(),
            project: "default".into(),
            profile: "base".into(),
            command: vec!["true".into()],
            env: BTreeMap::new(),
            limits,
            interactive: false,
            claude: ClaudeRequest::default(),
            caller_uid: None,
        }
    }

    #[test]
    fn requests_may_only_tighten() {
        assert_eq!(tighten("pids", Some(10), Some(5)).unwrap(), Some(5));
        assert_eq!(tighten("pids", Some(10), None).unwrap(), Some(10));
        assert_eq!(tighten("pids", None, Some(7)).unwrap(), Some(7));
        assert!(matches!(
            tighten("pids", Some(10), Some(11)),
            Err(WorkerError::LoosenedLimit { .. })
        ));
        let set = ProfileSet::embedded().unwrap();
        let base = set.get("base").unwrap();
        let p = resolve(
            &set,
            &params(RequestedLimits {
                memory: Some(1 << 20),
                pids: Some(3),
                ..Default::default()
            }),
        )
        .unwrap();
        assert_eq!(
            (p.limits.memory, p.limits.memory_swap, p.limits.pids),
            (Some(1 << 20), Some(1 << 20), Some(3))
        );
        assert_eq!(p.limits.timeout_secs, base.limits.timeout_secs);
        let e = resolve(
            &set,
            &params(RequestedLimits {
                pids: Some(100_000),
                ..Default::default()
            }),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "Limit pids = 100000 would loosen the profile's 256");
        let mut unknown = params(RequestedLimits::default());
        unknown.profile = "nope".into();
        assert!(matches!(resolve(&set, &unknown), Err(WorkerError::Policy(_))));
    }
}
