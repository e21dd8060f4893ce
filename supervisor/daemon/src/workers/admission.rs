//! Admission: the caps on running workers, per user and in all.
//!
//! Owns: the count of reserved worker slots. A spawn reserves its slot
//! before any work starts, under one lock with the check, and the slot is
//! released when the worker has ended or the spawn failed (when its
//! [`Slot`] drops).
//!
//! Must never: admit more workers than a cap allows, under any
//! concurrency, or keep a slot whose worker is gone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Why a spawn was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("Too many workers: {running} running, the limit is {limit}")]
    TooMany { running: usize, limit: u32 },
    #[error("Too many workers for user {user}: {running} running, the limit is {limit}")]
    TooManyForUser { user: String, running: usize, limit: u32 },
    #[error("Too many spawns by {who} (rate_limits.{limit}); try again in {retry_secs} s")]
    Rate {
        who: String,
        limit: &'static str,
        retry_secs: u64,
    },
    #[error(
        "User {user} has written more to the audit log than its audit_budget allows; spawns resume in {retry_secs} s"
    )]
    AuditBudget { user: String, retry_secs: u64 },
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_user: HashMap<String, usize>,
}

/// The reserved slots and the caps they are held to.
#[derive(Debug)]
pub struct Admission {
    max_total: u32,
    max_per_user: u32,
    counts: Arc<Mutex<Counts>>,
}

/// One reserved slot; dropping it releases the slot.
#[derive(Debug)]
pub struct Slot {
    user: String,
    counts: Arc<Mutex<Counts>>,
}

impl Admission {
    pub fn new(max_total: u32, max_per_user: u32) -> Self {
        Admission {
            max_total,
            max_per_user,
            counts: Arc::default(),
        }
    }

    /// Reserves a slot for a worker of `user`, or says which cap is full.
    pub fn admit(&self, user: &str) -> Result<Slot, AdmissionError> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= self.max_total as usize {
            return Err(AdmissionError::TooMany {
                running: c.total,
                limit: self.max_total,
            });
        }
        let mine = c.per_user.get(user).copied().unwrap_or(0);
        if mine >= self.max_per_user as usize {
            return Err(AdmissionError::TooManyForUser {
                user: user.to_string(),
                running: mine,
                limit: self.max_per_user,
            });
        }
        c.total += 1;
        *c.per_user.entry(user.to_string()).or_default() += 1;
        Ok(Slot {
            user: user.to_string(),
            counts: self.counts.clone(),
        })
    }

    /// Slots reserved now (running workers and spawns under way).
    pub fn reserved(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_user.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_user.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_and_slots_come_back() {
        let a = Admission::new(3, 2);
        let a1 = a.admit("alice").unwrap();
        let _a2 = a.admit("alice").unwrap();
        assert_eq!(
            a.admit("alice").unwrap_err(),
            AdmissionError::TooManyForUser {
                user: "alice".into(),
                running: 2,
                limit: 2
            }
        );
        let _b1 = a.admit("bob").unwrap();
        assert!(matches!(
            a.admit("carol"),
            Err(AdmissionError::TooMany { running: 3, .. })
        ));
        drop(a1);
        assert_eq!(a.reserved(), 2);
        let _a3 = a.admit("alice").unwrap();
    }

    #[test]
    fn concurrent_spawns_never_exceed_a_cap() {
        let a = Arc::new(Admission::new(100, 8));
        let admitted: Vec<Slot> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..40).map(|_| s.spawn(|| a.admit("alice").ok())).collect();
            handles.into_iter().filter_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(admitted.len(), 8);
        drop(admitted);
        assert_eq!(a.reserved(), 0);
    }
}
