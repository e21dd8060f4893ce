//! Warm inits: a few workers' inits made ahead of their spawns.
//!
//! A spawn's first steps do not depend on what it asks for: a cgroup, and
//! an init in new namespaces (the network namespace alone takes the kernel
//! a few hundred µs), moved into the cgroup where the kernel cannot create
//! it there (cgroup v1, where the move waits for an RCU grace period: some
//! 10 ms when none passed lately). The supervisor keeps `warm_inits` of
//! them ready; a spawn takes one, gives its cgroup the profile's limits
//! and the init its spec, and another is made in the background. Each
//! serves one worker and is then gone; nothing of a user is in it before
//! its spec.
//!
//! Must never: hand one init to two spawns, hand out an init that ended,
//! or hold more than it was asked to.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::cgroups::WorkerCgroup;
use crate::launcher::Pending;

/// One warm init: the worker id it will serve, its cgroup (no limits yet)
/// and the init waiting for its spec.
#[derive(Debug)]
pub struct Warm {
    pub id: String,
    pub cgroup: WorkerCgroup,
    pub pending: Pending,
}

impl Warm {
    /// Kills the init and removes its cgroup (blocking).
    pub fn discard(self) {
        let Warm {
            id,
            cgroup,
            mut pending,
            ..
        } = self;
        let _ = pending.process.kill(std::time::Duration::from_secs(10));
        if let Err(e) = cgroup.discard() {
            tracing::error!(warm = %id, error = %e, "cannot remove the cgroup of a warm init");
        }
    }
}

/// The warm inits ready for spawns.
#[derive(Debug)]
pub struct Pool {
    ready: Mutex<VecDeque<Warm>>,
    /// How many to keep.
    pub wanted: usize,
    /// Wakes the filler when one was taken.
    pub taken: tokio::sync::Notify,
}

impl Pool {
    pub fn new(wanted: usize) -> Self {
        Pool {
            ready: Mutex::default(),
            wanted,
            taken: tokio::sync::Notify::new(),
        }
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, VecDeque<Warm>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A warm init for a spawn, if one is ready; the ones found ended on
    /// the way are returned for the caller to discard.
    pub fn take(&self) -> (Option<Warm>, Vec<Warm>) {
        let mut ended = Vec::new();
        let found = {
            let mut ready = self.ready();
            loop {
                let Some(mut w) = ready.pop_front() else { break None };
                if w.pending.process.try_wait().is_none() {
                    break Some(w);
                }
                ended.push(w);
            }
        };
        self.taken.notify_one();
        (found, ended)
    }

    /// How many are ready.
    pub fn ready_len(&self) -> usize {
        self.ready().len()
    }

    /// How many are missing.
    pub fn missing(&self) -> usize {
        self.wanted.saturating_sub(self.ready().len())
    }

    /// Adds one made by the filler.
    pub fn put(&self, w: Warm) {
        self.ready().push_back(w);
    }

    /// Every warm init, for the daemon's end.
    pub fn drain(&self) -> Vec<Warm> {
        self.ready().drain(..).collect()
    }
}
