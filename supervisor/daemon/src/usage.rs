//! API usage and budgets: what each warden user's (and worker's) requests
//! through the gateway cost, over windows (the UTC day, the UTC month, all
//! time), kept across restarts in `<state>/usage.json`; and the budgets of
//! `wardend.toml` a request is admitted against.
//!
//! Owns: the ledger and its file (written by [`Ledger::flush`], at most a
//! second after a change and at shutdown), the per-user request-rate window
//! and in-flight count, and which exhausted budgets were already announced
//! in their window.
//!
//! Must never: admit a request over a budget (requests already admitted may
//! finish: the overrun is bounded by the user's concurrent requests), or let
//! a user's use count towards another's.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use warden_policy::config::Budget;

/// Tokens as the API reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
    pub cache_creation: u64,
    pub cache_read: u64,
}

impl Tokens {
    /// What counts towards a token budget.
    pub fn billed(&self, count_cache_reads: bool) -> u64 {
        self.input + self.output + self.cache_creation + if count_cache_reads { self.cache_read } else { 0 }
    }
}

impl std::ops::AddAssign for Tokens {
    fn add_assign(&mut self, o: Tokens) {
        self.input += o.input;
        self.output += o.output;
        self.cache_creation += o.cache_creation;
        self.cache_read += o.cache_read;
    }
}

/// Requests and their tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub requests: u64,
    pub tokens: Tokens,
}

impl Totals {
    /// Counts one request and its tokens.
    pub fn add(&mut self, tokens: Tokens) {
        self.requests += 1;
        self.tokens += tokens;
    }
}

/// A user's use over the windows a budget counts in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserUsage {
    /// The UTC day `today` counts (`2026-11-25`).
    pub day: String,
    pub today: Totals,
    /// The UTC month `this_month` counts (`2026-11`).
    pub month: String,
    pub this_month: Totals,
    pub all_time: Totals,
}

impl UserUsage {
    /// Starts new windows when `now` is past the recorded ones.
    fn roll(&mut self, now: SystemTime) {
        let (day, month) = (day_of(now), month_of(now));
        if self.day != day {
            self.day = day;
            self.today = Totals::default();
        }
        if self.month != month {
            self.month = month;
            self.this_month = Totals::default();
        }
    }
}

/// A worker's use, kept for the last [`WORKERS_KEPT`] workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerUsage {
    pub worker: String,
    pub user: String,
    pub totals: Totals,
}

/// Workers whose totals the ledger remembers.
pub const WORKERS_KEPT: usize = 1000;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Book {
    users: BTreeMap<String, UserUsage>,
    workers: VecDeque<WorkerUsage>,
}

/// A user's limiter state (not persisted).
#[derive(Debug, Default)]
struct Pace {
    /// Admission times within the last minute.
    recent: VecDeque<Instant>,
    in_flight: u32,
    /// (budget, window) pairs already announced as exhausted.
    announced: BTreeSet<(&'static str, String)>,
}

/// A budget that refuses a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    /// `tokens_per_day`, `tokens_per_month`, `requests_per_minute`,
    /// `concurrent_requests`.
    pub budget: &'static str,
    pub user: String,
    pub limit: u64,
    pub used: u64,
    pub resets_at: SystemTime,
    /// First refusal by this budget in its window: announce it (once).
    pub first: bool,
}

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.budget {
            "tokens_per_day" => "daily token budget",
            "tokens_per_month" => "monthly token budget",
            "requests_per_minute" => "request rate limit (per minute)",
            _ => "limit on concurrent requests",
        };
        let resets = self.resets_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        write!(
            f,
            "warden: the {what} of user {} is used up ({} of {}); it resets at {} UTC",
            self.user,
            self.used,
            self.limit,
            rfc3339(resets)
        )
    }
}

/// The ledger of every user's API use, shared by every worker's gateway.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    book: Mutex<Book>,
    pace: Mutex<HashMap<String, Pace>>,
    dirty: std::sync::atomic::AtomicBool,
}

/// The most requests of one user in flight through the gateways at once,
/// whatever its budget says (`concurrent_requests` may only be lower).
pub const MAX_IN_FLIGHT: u32 = 1024;

/// A request admitted under a user's budget: holds one of its concurrent
/// requests until dropped.
#[derive(Debug)]
pub struct Ticket {
    ledger: Arc<Ledger>,
    user: String,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut pace = self.ledger.pace.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pace.get_mut(&self.user) {
            p.in_flight = p.in_flight.saturating_sub(1);
        }
    }
}

impl Ledger {
    /// Opens the ledger file (none yet is an empty ledger; an unreadable one
    /// is set aside and reported).
    pub fn open(path: &Path) -> Ledger {
        let book = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                let aside = path.with_extension("json.unreadable");
                tracing::error!(path = %path.display(), error = %e, aside = %aside.display(), "the usage ledger is unreadable; starting a new one");
                let _ = std::fs::rename(path, &aside);
                Book::default()
            }),
            Err(_) => Book::default(),
        };
        Ledger {
            path: path.to_path_buf(),
            book: Mutex::new(book),
            pace: Mutex::default(),
            dirty: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one request of `user` under `budget`, or says which budget
    /// refuses it.
    pub fn admit(
        self: &Arc<Self>,
        user: &str,
        budget: &Budget,
        count_cache_reads: bool,
        now: SystemTime,
    ) -> Result<Ticket, Exhausted> {
        let usage = self.user(user, now);
        let mut pace = self.pace.lock().unwrap_or_else(|p| p.into_inner());
        let p = pace.entry(user.to_string()).or_default();
        let instant = Instant::now();
        while p
            .recent
            .front()
            .is_some_and(|t| instant.duration_since(*t) >= Duration::from_secs(60))
        {
            p.recent.pop_front();
        }
        let day_end = next_day(now);
        let month_end = next_month(now);
        let mut refuse = |budget: &'static str, limit: u64, used: u64, resets_at: SystemTime, window: String| {
            let first = p.announced.insert((budget, window));
            Err(Exhausted {
                budget,
                user: user.to_string(),
                limit,
                used,
                resets_at,
                first,
            })
        };
        if let Some(limit) = budget.tokens_per_day {
            let used = usage.today.tokens.billed(count_cache_reads);
            if used >= limit {
                return refuse("tokens_per_day", limit, used, day_end, usage.day.clone());
            }
        }
        if let Some(limit) = budget.tokens_per_month {
            let used = usage.this_month.tokens.billed(count_cache_reads);
            if used >= limit {
                return refuse("tokens_per_month", limit, used, month_end, usage.month.clone());
            }
        }
        if let Some(limit) = budget.requests_per_minute {
            let used = p.recent.len() as u64;
            if used >= u64::from(limit) {
                let resets = p.recent.front().map_or(instant, |t| *t + Duration::from_secs(60));
                let at = now + resets.saturating_duration_since(instant);
                let minute = (unix_secs(now) / 60).to_string();
                return refuse("requests_per_minute", u64::from(limit), used, at, minute);
            }
        }
        // Whatever the budget, a user's requests in flight are bounded: an
        // exchange outlives its worker's hang-up (and the worker) until the
        // upstream has said what it cost.
        let limit = budget
            .concurrent_requests
            .map_or(MAX_IN_FLIGHT, |l| l.min(MAX_IN_FLIGHT));
        if p.in_flight >= limit {
            let second = unix_secs(now).to_string();
            return refuse(
                "concurrent_requests",
                u64::from(limit),
                u64::from(p.in_flight),
                now,
                second,
            );
        }
        p.recent.push_back(instant);
        p.in_flight += 1;
        Ok(Ticket {
            ledger: self.clone(),
            user: user.to_string(),
        })
    }

    /// Adds one request's tokens to `user`'s windows and to `worker`'s
    /// totals.
    pub fn record(&self, user: &str, worker: &str, tokens: Tokens, now: SystemTime) {
        let mut book = self.book();
        let u = book.users.entry(user.to_string()).or_default();
        u.roll(now);
        u.today.add(tokens);
        u.this_month.add(tokens);
        u.all_time.add(tokens);
        match book.workers.iter_mut().find(|w| w.worker == worker) {
            Some(w) => w.totals.add(tokens),
            None => {
                let mut totals = Totals::default();
                totals.add(tokens);
                book.workers.push_back(WorkerUsage {
                    worker: worker.to_string(),
                    user: user.to_string(),
                    totals,
                });
                while book.workers.len() > WORKERS_KEPT {
                    book.workers.pop_front();
                }
            }
        }
        self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// `user`'s use as of `now`.
    pub fn user(&self, user: &str, now: SystemTime) -> UserUsage {
        let mut u = self.book().users.get(user).cloned().unwrap_or_default();
        u.roll(now);
        u
    }

    /// Every user the ledger knows.
    pub fn users(&self) -> Vec<String> {
        self.book().users.keys().cloned().collect()
    }

    /// The workers the ledger remembers, oldest first.
    pub fn workers(&self) -> Vec<WorkerUsage> {
        self.book().workers.iter().cloned().collect()
    }

    pub fn worker(&self, id: &str) -> Option<Totals> {
        self.book().workers.iter().find(|w| w.worker == id).map(|w| w.totals)
    }

    /// Writes the ledger if it changed (written, synced, renamed into place).
    pub fn flush(&self) -> std::io::Result<()> {
        if !self.dirty.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let json = serde_json::to_vec(&*self.book()).map_err(std::io::Error::other)?;
        crate::paths::replace_private(&self.path, &json, true)
            .inspect_err(|_| self.dirty.store(true, std::sync::atomic::Ordering::SeqCst))
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// (year, month, day) of a count of days since 1970-01-01 (proleptic
/// Gregorian; Howard Hinnant's civil_from_days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a civil date (days_from_civil).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = y - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_of(t: SystemTime) -> i64 {
    i64::try_from(unix_secs(t) / 86_400).unwrap_or(0)
}

fn day_of(t: SystemTime) -> String {
    let (y, m, d) = civil(days_of(t));
    format!("{y:04}-{m:02}-{d:02}")
}

fn month_of(t: SystemTime) -> String {
    let (y, m, _) = civil(days_of(t));
    format!("{y:04}-{m:02}")
}

fn at_day(days: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(days.max(0)).unwrap_or(0) * 86_400)
}

/// The next 00:00 UTC.
fn next_day(t: SystemTime) -> SystemTime {
    at_day(days_of(t) + 1)
}

/// The first of next month, 00:00 UTC.
fn next_month(t: SystemTime) -> SystemTime {
    let (y, m, _) = civil(days_of(t));
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    at_day(days_from_civil(y, m, 1))
}

/// `YYYY-MM-DDTHH:MM:SSZ` of Unix seconds.
pub fn rfc3339(secs: u64) -> String {
    let (y, m, d) = civil(i64::try_from(secs / 86_400).unwrap_or(0));
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    const NOV_25_2026: u64 = 1_795_564_800; // 2026-11-25T00:00:00Z

    #[test]
    fn windows_are_utc_days_and_months() {
        assert_eq!(rfc3339(NOV_25_2026), "2026-11-25T00:00:00Z");
        assert_eq!(day_of(at(NOV_25_2026 + 86_399)), "2026-11-25");
        assert_eq!(month_of(at(NOV_25_2026)), "2026-11");
        assert_eq!(
            rfc3339(unix_secs(next_day(at(NOV_25_2026 + 5)))),
            "2026-11-26T00:00:00Z"
        );
        assert_eq!(rfc3339(unix_secs(next_month(at(NOV_25_2026)))), "2026-12-01T00:00:00Z");
        assert_eq!(
            rfc3339(unix_secs(next_month(at(NOV_25_2026 + 40 * 86_400)))),
            "2027-02-01T00:00:00Z"
        );
        assert_eq!(days_from_civil(2026, 11, 25), days_of(at(NOV_25_2026)));
    }

    #[test]
    fn budgets_refuse_once_used_up_announce_once_and_reset_with_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(Ledger::open(&dir.path().join("usage.json")));
        let budget = Budget {
            tokens_per_day: Some(100),
            ..Budget::default()
        };
        let now = at(NOV_25_2026 + 3600);
        let spend = Tokens {
            input: 60,
            output: 30,
            cache_creation: 5,
            cache_read: 1000,
        };
        drop(ledger.admit("alice", &budget, false, now).unwrap());
        ledger.record("alice", "w1", spend, now);
        // 95 of 100: still admitted (the overrun is bounded by what runs).
        drop(ledger.admit("alice", &budget, false, now).unwrap());
        ledger.record("alice", "w1", spend, now);
        let e = ledger.admit("alice", &budget, false, now).unwrap_err();
        assert_eq!((e.budget, e.limit, e.used, e.first), ("tokens_per_day", 100, 190, true));
        assert_eq!(
            e.to_string(),
            "warden: the daily token budget of user alice is used up (190 of 100); it resets at 2026-11-26T00:00:00Z UTC"
        );
        assert!(
            !ledger.admit("alice", &budget, false, now).unwrap_err().first,
            "announced once"
        );
        // Counting cache reads is the admin's choice.
        assert_eq!(ledger.user("alice", now).today.tokens.billed(true), 2190);
        // Bob is not alice.
        assert!(ledger.admit("bob", &budget, false, now).is_ok());
        // Tomorrow is a new window.
        let tomorrow = at(NOV_25_2026 + 86_400 + 1);
        assert!(ledger.admit("alice", &budget, false, tomorrow).is_ok());
        assert_eq!(ledger.user("alice", tomorrow).this_month.requests, 2);
        assert_eq!(ledger.worker("w1").unwrap().requests, 2);
    }

    #[test]
    fn request_rate_and_concurrency_are_limited() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(Ledger::open(&dir.path().join("usage.json")));
        let now = at(NOV_25_2026);
        let two = Budget {
            concurrent_requests: Some(2),
            ..Budget::default()
        };
        let a = ledger.admit("alice", &two, false, now).unwrap();
        let _b = ledger.admit("alice", &two, false, now).unwrap();
        assert_eq!(
            ledger.admit("alice", &two, false, now).unwrap_err().budget,
            "concurrent_requests"
        );
        drop(a);
        assert!(ledger.admit("alice", &two, false, now).is_ok());
        // No budget: still at most MAX_IN_FLIGHT at once.
        let none = Budget::default();
        let held: Vec<_> = (0..MAX_IN_FLIGHT)
            .map(|_| ledger.admit("dave", &none, false, now).unwrap())
            .collect();
        let over = ledger.admit("dave", &none, false, now).unwrap_err();
        assert_eq!(
            (over.budget, over.limit),
            ("concurrent_requests", u64::from(MAX_IN_FLIGHT))
        );
        drop(held);
        assert!(ledger.admit("dave", &none, false, now).is_ok());
        let rpm = Budget {
            requests_per_minute: Some(3),
            ..Budget::default()
        };
        for _ in 0..3 {
            drop(ledger.admit("carol", &rpm, false, now).unwrap());
        }
        assert_eq!(
            ledger.admit("carol", &rpm, false, now).unwrap_err().budget,
            "requests_per_minute"
        );
    }

    #[test]
    fn the_ledger_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.json");
        let now = at(NOV_25_2026);
        let ledger = Ledger::open(&path);
        ledger.record(
            "alice",
            "w1",
            Tokens {
                input: 7,
                ..Tokens::default()
            },
            now,
        );
        ledger.flush().unwrap();
        let again = Ledger::open(&path);
        assert_eq!(again.user("alice", now).all_time.tokens.input, 7);
        assert_eq!(again.users(), ["alice"]);
        // A torn file is set aside, not fatal.
        std::fs::write(&path, "{torn").unwrap();
        assert!(Ledger::open(&path).users().is_empty());
        assert!(path.with_extension("json.unreadable").exists());
    }
}
