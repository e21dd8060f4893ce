//! The bus: events are queued by whoever has one, numbered and written by
//! one writer thread in batches (one fdatasync per batch), then broadcast.
//!
//! Owns: the writer thread and its bounded queue, sequence numbers, each
//! identity's audit budget (a user's, or a calling uid's for refused
//! calls), retention by age, the live broadcast and chunked reading of
//! the log for replays.
//!
//! Must never: publish an event before it is on disk, block a caller on
//! the disk (a full queue drops the event and counts it, in the log), or
//! let one identity write more than its budget (past it, reports are
//! counted instead of written; what must be written, such as a worker's
//! start and exit, is written and paid back before anything else).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{broadcast, oneshot};
use warden_policy::config::Config;
use warden_policy::Rate;

use super::{millis, Event, EventKind};
use crate::audit::{AuditError, AuditLog, Chunk, Cursor, Recovery, MAX_BATCH_BYTES};
use crate::limits::{Bucket, Reporter};

/// Events queued for the writer at most; past it (the disk has fallen far
/// behind), events are dropped and counted.
const QUEUE: usize = 65_536;
/// Events written with one fdatasync at most.
const MAX_BATCH: usize = 4096;
/// How often an identity over its budget is told so, at most.
const BUDGET_REPORT_EVERY: Duration = Duration::from_secs(60);

/// How the bus keeps the log.
#[derive(Debug, Clone)]
pub struct Settings {
    pub path: PathBuf,
    /// Rotate at this size, keeping `keep` rotated files.
    pub max_bytes: u64,
    pub keep: usize,
    /// Delete rotated files older than this.
    pub max_age: Option<Duration>,
    /// Per identity, in bytes.
    pub budget: Rate,
    /// Events a live subscriber may fall behind.
    pub live_capacity: usize,
    /// The group that may read the log (`admin_group`), if it exists.
    pub group: Option<u32>,
}

impl Settings {
    pub fn from_config(c: &Config) -> Settings {
        Settings {
            path: c.audit_log.clone(),
            max_bytes: c.audit_max_bytes,
            keep: c.audit_keep,
            max_age: c.audit_max_age.map(Duration::from_secs),
            budget: c.audit_budget,
            live_capacity: c.events_buffer,
            group: crate::auth::gid_of(&c.admin_group).map(nix::unistd::Gid::as_raw),
        }
    }

    /// A log at `path` with room to spare (for tests and benchmarks).
    pub fn at(path: &Path) -> Settings {
        Settings {
            path: path.to_path_buf(),
            max_bytes: 1 << 30,
            keep: 1,
            max_age: None,
            budget: Rate::new(1 << 40, 1e12),
            live_capacity: 1 << 16,
            group: None,
        }
    }
}

/// Who pays for an event in the audit budget.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Identity {
    User(String),
    Peer(u32),
}

fn identity_of(e: &Event) -> Option<Identity> {
    match &e.kind {
        // Reports of limits come at most every 10 s per limit and key.
        EventKind::RateLimited { .. } => None,
        EventKind::AuthDenied { peer_uid, .. } => Some(Identity::Peer(*peer_uid)),
        _ => e.user.clone().map(Identity::User),
    }
}

/// Whether an event is written even past its identity's budget (it is
/// then paid back before that identity's next report is written). Each
/// of these is bounded by something else: spawns by admission and the
/// spawn rate, decisions by the approval limits, reloads by the admin.
fn must_write(k: &EventKind) -> bool {
    !matches!(
        k,
        EventKind::ResourceSample { .. }
            | EventKind::LimitReached { .. }
            | EventKind::SandboxDenial { .. }
            | EventKind::NetworkDenial { .. }
            | EventKind::ApiUsage { .. }
            | EventKind::AuthDenied { .. }
            | EventKind::ApprovalRequested { .. }
    )
}

/// One identity's budget and the reports of it running out.
#[derive(Debug)]
struct Budget {
    bucket: Bucket,
    reporter: Reporter,
}

/// Told of every event once it is written (the metrics), with the bytes
/// its line took in the log. Called on the writer thread: it must be quick
/// and never block.
pub trait Observer: Send + Sync + std::fmt::Debug {
    fn written(&self, event: &Event, bytes: usize);
}

/// What callers and the writer share.
#[derive(Debug)]
struct Shared {
    observer: std::sync::OnceLock<Arc<dyn Observer>>,
    last_seq: AtomicU64,
    live: broadcast::Sender<Arc<Event>>,
    budgets: Mutex<HashMap<Identity, Budget>>,
    budget: Rate,
    /// Dropped on a full queue since the writer last reported it.
    dropped: AtomicU64,
    written: AtomicU64,
    batches: AtomicU64,
    /// Where the next event will be in the log (for live-only readers).
    end: Mutex<Cursor>,
}

enum Job {
    Event(Box<Event>, Option<oneshot::Sender<Option<Arc<Event>>>>),
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// The bus.
#[derive(Debug)]
pub struct Events {
    queue: SyncSender<Job>,
    shared: Arc<Shared>,
    path: PathBuf,
    keep: usize,
    capacity: u64,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

/// An event on its way to the log: wait for it to be written.
#[derive(Debug)]
pub struct Written(Option<oneshot::Receiver<Option<Arc<Event>>>>);

impl Written {
    /// The event as written (with its sequence number), or None when it
    /// was not (over budget, or the log cannot be written).
    pub async fn written(self) -> Option<Arc<Event>> {
        self.0?.await.ok().flatten()
    }

    /// The same, blocking (never on an async runtime thread).
    pub fn wait(self) -> Option<Arc<Event>> {
        self.0?.blocking_recv().ok().flatten()
    }
}

/// Counters of the bus, for benchmarks and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub written: u64,
    pub batches: u64,
}

impl Events {
    /// Opens the log (repairing a torn end) and starts the writer.
    pub fn open(settings: Settings) -> Result<(Self, Recovery), AuditError> {
        let (mut log, recovery) = AuditLog::open(&settings.path, settings.max_bytes, settings.keep)?;
        log.set_group(settings.group).map_err(|source| AuditError::Open {
            path: settings.path.clone(),
            source,
        })?;
        let shared = Arc::new(Shared {
            last_seq: AtomicU64::new(recovery.last_seq),
            live: broadcast::channel(settings.live_capacity.max(16)).0,
            budgets: Mutex::new(HashMap::new()),
            budget: settings.budget,
            observer: std::sync::OnceLock::new(),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            end: Mutex::new(log.end(recovery.last_seq)),
        });
        let (queue, jobs) = std::sync::mpsc::sync_channel(QUEUE);
        let capacity = log.capacity();
        let writer = Writer {
            log,
            shared: shared.clone(),
            max_age: settings.max_age,
            last_prune: None,
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(&jobs))
            .map_err(|source| AuditError::Open {
                path: settings.path.clone(),
                source,
            })?;
        let events = Events {
            queue,
            shared,
            path: settings.path,
            keep: settings.keep,
            capacity,
        };
        Ok((events, recovery))
    }

    fn draft(worker: Option<&str>, user: Option<&str>, kind: EventKind) -> Event {
        Event {
            seq: 0,
            time_ms: millis(SystemTime::now()),
            worker: worker.map(str::to_string),
            user: user.map(str::to_string),
            kind,
        }
    }

    fn enqueue(&self, job: Job) {
        match self.queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if self.shared.dropped.fetch_add(1, Ordering::SeqCst) == 0 {
                    tracing::error!("the audit log is not keeping up; events are being dropped (and counted)");
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("the audit writer is gone; event dropped");
            }
        }
    }

    /// Queues an event for the log and its subscribers; returns at once.
    pub fn publish(&self, worker: Option<&str>, user: Option<&str>, kind: EventKind) {
        self.enqueue(Job::Event(Box::new(Self::draft(worker, user, kind)), None));
    }

    /// Queues an event; the returned [`Written`] says when it is on disk.
    pub fn submit(&self, worker: Option<&str>, user: Option<&str>, kind: EventKind) -> Written {
        let (tx, rx) = oneshot::channel();
        self.enqueue(Job::Event(Box::new(Self::draft(worker, user, kind)), Some(tx)));
        Written(Some(rx))
    }

    /// Waits (blocking) until every event queued before is written.
    pub fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if self.queue.send(Job::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.shared.last_seq.load(Ordering::SeqCst)
    }

    /// Has `o` told of every event written from now on (one observer).
    pub fn observe(&self, o: Arc<dyn Observer>) {
        let _ = self.shared.observer.set(o);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.shared.live.subscribe()
    }

    pub fn stats(&self) -> Stats {
        Stats {
            written: self.shared.written.load(Ordering::SeqCst),
            batches: self.shared.batches.load(Ordering::SeqCst),
        }
    }

    /// Bytes the log holds at most.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// How long until `user` is out of debt with its audit budget (what
    /// must be written went past it); None when it is not in debt.
    pub fn budget_debt(&self, user: &str) -> Option<Duration> {
        let mut budgets = self.shared.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let b = budgets.get_mut(&Identity::User(user.to_string()))?;
        let wait = b.bucket.wait_for(0.0, Instant::now());
        (!wait.is_zero()).then_some(wait)
    }

    /// A cursor at the end of the log: it reads only what is written
    /// after this call.
    pub fn end(&self) -> Cursor {
        self.shared.end.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The next chunk of the log for `cursor` (blocking: a bounded read).
    pub fn read_chunk(&self, cursor: &mut Cursor) -> (Vec<Event>, bool) {
        let Chunk { lines, at_end } = AuditLog::read_chunk(&self.path, self.keep, cursor, 512, 8 << 20);
        let events = lines.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
        (events, at_end)
    }

    /// Events with `seq >= from` from the log, oldest first, until `f`
    /// says stop (blocking).
    pub fn replay(&self, from: u64, mut f: impl FnMut(Event) -> bool) {
        AuditLog::replay(&self.path, self.keep, from, |_, line| {
            match serde_json::from_str::<Event>(line) {
                Ok(e) => f(e),
                Err(_) => true,
            }
        });
    }
}

/// The writer thread's state.
struct Writer {
    log: AuditLog,
    shared: Arc<Shared>,
    max_age: Option<Duration>,
    last_prune: Option<Instant>,
}

/// An event of the batch being written.
struct Line {
    event: Event,
    text: String,
    done: Option<oneshot::Sender<Option<Arc<Event>>>>,
}

impl Writer {
    fn run(mut self, jobs: &Receiver<Job>) {
        loop {
            let first = match jobs.recv_timeout(Duration::from_secs(1)) {
                Ok(j) => Some(j),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut batch: Vec<Job> = first.into_iter().collect();
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            self.commit(batch);
            self.prune();
        }
    }

    /// Numbers, budgets, writes (one fdatasync) and then publishes a batch;
    /// answers flushes after.
    fn commit(&mut self, batch: Vec<Job>) {
        let now = Instant::now();
        let mut next = self.shared.last_seq.load(Ordering::SeqCst);
        let mut lines: Vec<Line> = Vec::with_capacity(batch.len());
        let mut flushes = Vec::new();
        let mut bytes = 0usize;
        let shared = self.shared.clone();
        let mut budgets = shared.budgets.lock().unwrap_or_else(|p| p.into_inner());
        if budgets.len() > 4096 {
            budgets.retain(|_, b| !(b.reporter.pending() == 0 && b.bucket.is_idle(now)));
        }
        let mut reports = Vec::new();
        for job in batch {
            let (mut event, done) = match job {
                Job::Event(e, done) => (*e, done),
                Job::Flush(tx) => {
                    flushes.push(tx);
                    continue;
                }
            };
            event.seq = next + 1;
            let text = serde_json::to_string(&event).unwrap_or_default();
            if let Some(id) = identity_of(&event) {
                let b = budgets.entry(id.clone()).or_insert_with(|| Budget {
                    bucket: Bucket::new(self.shared.budget),
                    reporter: Reporter::new(BUDGET_REPORT_EVERY),
                });
                #[allow(clippy::cast_precision_loss)] // Lines are far below 2^52 bytes.
                let cost = text.len() as f64;
                if must_write(&event.kind) {
                    b.bucket.charge(cost, now);
                } else if !b.bucket.take(cost, now) {
                    if let Some(n) = b.reporter.refused(now) {
                        reports.push((id, n, event.worker.clone()));
                    }
                    if let Some(done) = done {
                        let _ = done.send(None);
                    }
                    continue;
                }
            }
            next += 1;
            bytes += text.len();
            lines.push(Line { event, text, done });
            if bytes >= MAX_BATCH_BYTES {
                // A very large batch goes to disk in parts, so a torn write
                // stays within the repair window.
                self.write(std::mem::take(&mut lines));
                bytes = 0;
            }
        }
        // Identities whose flood ended since the last report get the rest
        // of their count said once their reporter allows.
        for (id, b) in budgets.iter_mut() {
            if b.bucket.has_tokens(now) {
                if let Some(n) = b.reporter.due(now) {
                    reports.push((id.clone(), n, None));
                }
            }
        }
        drop(budgets);
        let dropped = self.shared.dropped.swap(0, Ordering::SeqCst);
        if dropped > 0 {
            reports.push((Identity::Peer(u32::MAX), dropped, None));
        }
        for (id, suppressed, worker) in reports {
            let (user, peer_uid, limit) = match id {
                Identity::User(u) => (Some(u), None, "audit_budget"),
                Identity::Peer(u32::MAX) => (None, None, "audit_queue"),
                Identity::Peer(uid) => (None, Some(uid), "audit_budget"),
            };
            let event = Event {
                seq: next + 1,
                time_ms: millis(SystemTime::now()),
                worker,
                user,
                kind: EventKind::RateLimited {
                    limit: limit.into(),
                    suppressed,
                    peer_uid,
                },
            };
            next += 1;
            let text = serde_json::to_string(&event).unwrap_or_default();
            lines.push(Line {
                event,
                text,
                done: None,
            });
        }
        self.write(lines);
        for f in flushes {
            let _ = f.send(());
        }
    }

    fn write(&mut self, lines: Vec<Line>) {
        if lines.is_empty() {
            return;
        }
        let texts: Vec<String> = lines.iter().map(|l| l.text.clone()).collect();
        if let Err(e) = self.log.append(&texts) {
            tracing::error!(error = %e, events = lines.len(), "cannot write the audit log; events dropped");
            for l in lines {
                if let Some(done) = l.done {
                    let _ = done.send(None);
                }
            }
            return;
        }
        self.shared.batches.fetch_add(1, Ordering::SeqCst);
        self.shared.written.fetch_add(lines.len() as u64, Ordering::SeqCst);
        if let Some(last) = lines.last() {
            *self.shared.end.lock().unwrap_or_else(|p| p.into_inner()) = self.log.end(last.event.seq);
        }
        let observer = self.shared.observer.get();
        for l in lines {
            let event = Arc::new(l.event);
            if let Some(o) = observer {
                o.written(&event, l.text.len() + 1);
            }
            self.shared.last_seq.store(event.seq, Ordering::SeqCst);
            // In sequence order, after the write: subscribers only ever see
            // what is on disk.
            let _ = self.shared.live.send(event.clone());
            if let Some(done) = l.done {
                let _ = done.send(Some(event));
            }
        }
    }

    /// Deletes rotated files past their age, at most once a minute.
    fn prune(&mut self) {
        let Some(age) = self.max_age else { return };
        if self.last_prune.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
            return;
        }
        self.last_prune = Some(Instant::now());
        self.log.prune(age);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit_event(n: u64) -> EventKind {
        EventKind::LimitReached {
            limit: "pids_max".into(),
            count: n,
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn events_round_trip_through_the_log_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let (bus, _) = Events::open(Settings::at(&p)).unwrap();
        let mut rx = bus.subscribe();
        bus.publish(None, None, EventKind::DaemonStopping);
        let e = bus
            .submit(Some("w1"), Some("alice"), limit_event(3))
            .written()
            .await
            .unwrap();
        assert_eq!(e.seq, 2);
        assert_eq!(rx.recv().await.unwrap().seq, 1);
        let mut got = Vec::new();
        bus.replay(2, |e| {
            got.push(e);
            true
        });
        assert_eq!(got, vec![(*e).clone()]);
        let line = std::fs::read_to_string(&p).unwrap();
        assert!(
            line.contains(r#""kind":"limit_reached","limit":"pids_max","count":3"#),
            "{line}"
        );
        drop(bus);
        let (bus, r) = Events::open(Settings::at(&p)).unwrap();
        assert_eq!(r.last_seq, 2);
        let e = bus
            .submit(None, None, EventKind::DaemonStopping)
            .written()
            .await
            .unwrap();
        assert_eq!(e.seq, 3);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_burst_is_written_in_few_batches_with_dense_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let (bus, _) = Events::open(Settings::at(&p)).unwrap();
        let bus = Arc::new(bus);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for i in 0..2500 {
                        bus.publish(Some(&format!("w{t}")), Some("alice"), limit_event(i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        bus.flush();
        let stats = bus.stats();
        assert_eq!(stats.written, 10_000);
        assert!(stats.batches < 10_000, "group commit: {stats:?}");
        let mut seqs = Vec::new();
        bus.replay(1, |e| {
            seqs.push(e.seq);
            true
        });
        assert_eq!(seqs, (1..=10_000).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_user_past_its_budget_is_counted_not_written_and_others_are_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let settings = Settings {
            budget: Rate::new(4096, 1.0),
            ..Settings::at(&p)
        };
        let (bus, _) = Events::open(settings).unwrap();
        for i in 0..1000 {
            bus.publish(Some("w1"), Some("mallory"), limit_event(i));
        }
        let started = EventKind::WorkerStarted {
            profile: "base".into(),
            policy_digest: String::new(),
            uid: 1,
            cgroup: vec![],
            command: vec!["x".repeat(3000)],
            command_truncated: None,
            landlock_abi: 0,
            landlock_tcp: false,
            landlock_scoped: false,
            seccomp_filter_len: 0,
            namespaces: vec![],
            no_new_privs: true,
            capabilities_empty: true,
            landlock_denials_observable: false,
            seccomp_denials_observable: false,
            disk_limit: None,
            stages: vec![],
        };
        // What must be written is, into debt; the debt shows.
        assert!(bus
            .submit(Some("w2"), Some("mallory"), started.clone())
            .written()
            .await
            .is_some());
        assert!(bus
            .submit(Some("w3"), Some("mallory"), started)
            .written()
            .await
            .is_some());
        assert!(bus.budget_debt("mallory").is_some());
        assert!(bus.budget_debt("alice").is_none());
        for i in 0..10 {
            bus.publish(Some("w9"), Some("alice"), limit_event(i));
        }
        bus.flush();
        let mut mallory = 0;
        let mut alice = 0;
        let mut suppressed = 0;
        bus.replay(1, |e| {
            match (&e.user, &e.kind) {
                (
                    Some(u),
                    EventKind::RateLimited {
                        limit, suppressed: n, ..
                    },
                ) if u == "mallory" => {
                    assert_eq!(limit, "audit_budget");
                    suppressed += n;
                }
                (Some(u), _) if u == "mallory" => mallory += 1,
                (Some(u), _) if u == "alice" => alice += 1,
                _ => {}
            }
            true
        });
        assert_eq!(alice, 10);
        assert!(mallory < 100, "{mallory} of mallory's events written");
        assert!(suppressed >= 1, "the flood is reported");
    }
}
