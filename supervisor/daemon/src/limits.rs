//! Rate limits: token buckets (a burst, then a steady refill), one per
//! worker, user, calling uid or audit identity.
//!
//! Owns: the bucket arithmetic, the count of what a bucket refused since
//! it last let something through (so the next report can say how much was
//! suppressed), and keyed sets of buckets that stay small (a bucket that
//! has refilled completely holds nothing worth keeping and is dropped).
//!
//! Must never: let more through than burst + rate × time, or grow without
//! bound with the number of keys ever seen.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use warden_policy::config::RateLimits;
pub use warden_policy::Bucket;
use warden_policy::Rate;

/// One key's bucket, and the reports of it refusing.
#[derive(Debug)]
pub struct Limited {
    pub bucket: Bucket,
    pub reports: Reporter,
}

/// A bucket per key (user, uid, worker), all with one rate. Idle buckets
/// are dropped when the set grows, so its size follows the keys active in
/// the last refill period, not every key ever seen.
#[derive(Debug)]
pub struct Keyed<K> {
    rate: Rate,
    buckets: Mutex<HashMap<K, Limited>>,
}

impl<K: Eq + Hash + Clone> Keyed<K> {
    pub fn new(rate: Rate) -> Self {
        Keyed {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `f` on `key`'s bucket.
    pub fn with<T>(&self, key: &K, f: impl FnOnce(&mut Limited) -> T) -> T {
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= 1024 && !map.contains_key(key) {
            map.retain(|_, l| !(l.bucket.is_idle(now) && l.reports.pending() == 0));
        }
        let l = map.entry(key.clone()).or_insert_with(|| Limited {
            bucket: Bucket::new(self.rate),
            reports: Reporter::new(REPORT_EVERY),
        });
        f(l)
    }

    /// [`Bucket::admit`] on `key`'s bucket.
    pub fn admit(&self, key: &K) -> Option<u64> {
        self.with(key, |l| l.bucket.admit(Instant::now()))
    }

    /// Buckets held now.
    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How often hitting one limit for one key is reported, at most.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// The daemon-wide limits on what tenants ask of it.
#[derive(Debug)]
pub struct Limiters {
    pub spawns_per_user: Keyed<String>,
    pub spawns_per_caller: Keyed<u32>,
    pub auth_denied_per_peer: Keyed<u32>,
}

impl Limiters {
    pub fn new(limits: &RateLimits) -> Self {
        Limiters {
            spawns_per_user: Keyed::new(limits.spawns_per_user),
            spawns_per_caller: Keyed::new(limits.spawns_per_caller),
            auth_denied_per_peer: Keyed::new(limits.auth_denied_per_peer),
        }
    }
}

/// Reports of a limit being hit, themselves limited: the first refusal is
/// reported at once, later ones at most once per `every`, each report
/// counting the refusals since the previous one.
#[derive(Debug)]
pub struct Reporter {
    every: Duration,
    last: Option<Instant>,
    count: u64,
}

impl Reporter {
    pub fn new(every: Duration) -> Self {
        Reporter {
            every,
            last: None,
            count: 0,
        }
    }

    /// Counts one refusal; returns the count to report when a report is due.
    pub fn refused(&mut self, now: Instant) -> Option<u64> {
        self.count += 1;
        let due = self.last.is_none_or(|t| now.saturating_duration_since(t) >= self.every);
        due.then(|| {
            self.last = Some(now);
            std::mem::take(&mut self.count)
        })
    }

    /// Refusals not reported yet.
    pub fn pending(&self) -> u64 {
        self.count
    }

    /// The refusals not reported yet, when there are some and a report is
    /// due (for saying the rest once a flood has ended).
    pub fn due(&mut self, now: Instant) -> Option<u64> {
        let due = self.count > 0 && self.last.is_none_or(|t| now.saturating_duration_since(t) >= self.every);
        due.then(|| {
            self.last = Some(now);
            std::mem::take(&mut self.count)
        })
    }

    pub fn take_pending(&mut self) -> u64 {
        std::mem::take(&mut self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_buckets_forget_idle_keys() {
        let k = Keyed::<u32>::new(Rate::new(1, 1000.0));
        for uid in 0..5000 {
            k.admit(&uid);
            if uid % 1000 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert!(k.len() <= 2048, "{}", k.len());
        assert_eq!(k.admit(&7), Some(0));
        assert_eq!(k.admit(&7), None);
    }

    #[test]
    fn reports_of_a_limit_are_limited_and_count_what_they_cover() {
        let t0 = Instant::now();
        let mut r = Reporter::new(Duration::from_secs(10));
        assert_eq!(r.refused(t0), Some(1));
        assert_eq!(r.refused(t0 + Duration::from_secs(1)), None);
        assert_eq!(r.refused(t0 + Duration::from_secs(2)), None);
        assert_eq!(r.refused(t0 + Duration::from_secs(10)), Some(3));
        assert_eq!(r.pending(), 0);
    }
}
