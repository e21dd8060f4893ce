//! Primed inits: a worker's init built up to its command, for the next
//! spawn like a recent one.
//!
//! A worker of a plain profile (no `[claude]` section), once its end is
//! reported, asks for an init primed for its key (not earlier: on few
//! cores the making would slow its run and the writing of its exit): the same user, project, profile, requested
//! limits and profile set. The primer takes a warm init (or makes one),
//! prepares it as that spawn was prepared (the user's directories, the
//! cgroup's limits, the compiled spec) and has it build the sandbox up to
//! the command: the user's binds and files, the listeners, the new root,
//! the rlimits, the worker's uid, no_new_privs and the landlock rules
//! ([`crate::launcher::Pending::prime`]). The next spawn with that key
//! takes it and is prepared from the spec it was built from (the
//! worker id, cgroup and limits are the init's; the uid is checked, the
//! directories made where missing, the disk limit promised, and only the
//! command, argv and environment, is compiled: [`warden_policy::command`]),
//! and, where its spec builds the sandbox the init was primed with
//! ([`warden_policy::LaunchSpec::same_sandbox`]), hands over only its
//! command: the init forks, the worker installs its seccomp filter and
//! execs. Otherwise (the user's uid changed) the spawn is prepared in
//! full, the primed init is let go and the spawn builds its own in that
//! cgroup.
//!
//! A spawn that finds the one for its key being made waits for it (at
//! most [`WAIT`]): what is left of its making is less than building
//! another.
//!
//! Bounds: at most `primed_inits` ready or being made, one per key; one
//! unused for [`IDLE`] is let go, and so is one of an older profile set
//! (it would not match).
//!
//! Must never: hand a spawn an init whose sandbox differs from the spawn's
//! (the same sandbox part, or a new init), hand one init to two spawns,
//! hold more than `primed_inits`, or run anything of the user in a primed
//! init before a spawn takes it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::cgroups::WorkerCgroup;
use crate::launcher::Primed;

use super::spawn::{RequestedLimits, SpawnParams};

/// How long a primed init waits for a spawn before it is let go.
pub const IDLE: Duration = Duration::from_secs(60);

/// How often the daemon lets go of the primed inits that are stale (unused
/// for [`IDLE`], or primed under an older profile set).
pub const SWEEP: Duration = Duration::from_secs(5);

/// How long a spawn waits for the one being made for its key.
pub const WAIT: Duration = Duration::from_millis(20);

/// What a spawn must share with the one an init was primed after.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    user: String,
    project: String,
    profile: String,
    limits: RequestedLimits,
    generation: u64,
}

impl Key {
    /// The profile set's generation it was made in.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn of(p: &SpawnParams, generation: u64) -> Key {
        Key {
            user: p.user.clone(),
            project: p.project.clone(),
            profile: p.profile.clone(),
            limits: p.limits.clone(),
            generation,
        }
    }
}

/// What [`Pool::take`] found for a key.
#[derive(Debug)]
pub enum Found {
    Ready(Entry),
    Coming(oneshot::Receiver<Entry>),
    None,
}

/// One primed init: the worker id it serves, its cgroup (with the limits
/// of its key) and the init (which knows the sandbox it was built for).
#[derive(Debug)]
pub struct Entry {
    pub id: String,
    pub cgroup: WorkerCgroup,
    pub init: Primed,
    pub made: Instant,
}

impl Entry {
    /// Lets the init go and removes its cgroup (blocking).
    pub fn discard(self) {
        let Entry { id, cgroup, init, .. } = self;
        init.discard();
        if let Err(e) = cgroup.discard() {
            tracing::error!(primed = %id, error = %e, "cannot remove the cgroup of a primed init");
        }
    }
}

#[derive(Debug, Default)]
struct State {
    ready: HashMap<Key, Entry>,
    /// Those being made, with the spawn waiting for each, if one is.
    making: HashMap<Key, Option<oneshot::Sender<Entry>>>,
    /// The daemon is ending: none is made any more.
    closed: bool,
}

/// The primed inits, by key.
#[derive(Debug)]
pub struct Pool {
    state: Mutex<State>,
    /// The most ready or being made at once.
    pub wanted: usize,
}

impl Pool {
    pub fn new(wanted: usize) -> Self {
        Pool {
            state: Mutex::default(),
            wanted,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The one primed for `key`: ready (and its init has not ended; one
    /// that ended is returned in the second place, to discard), or coming
    /// (being made: the receiver gets it when it is, unless it cannot be).
    pub fn take(&self, key: &Key) -> (Found, Option<Entry>) {
        let mut s = self.state();
        if let Some(mut e) = s.ready.remove(key) {
            if e.init.process.try_wait().is_some() {
                return (Found::None, Some(e));
            }
            return (Found::Ready(e), None);
        }
        match s.making.get_mut(key) {
            Some(waiter @ None) => {
                let (tx, rx) = oneshot::channel();
                *waiter = Some(tx);
                (Found::Coming(rx), None)
            }
            _ => (Found::None, None),
        }
    }

    /// Whether one may be made for `key` now (then it counts as being made
    /// until [`Pool::put`] or [`Pool::cancel`]).
    pub fn reserve(&self, key: &Key) -> bool {
        let mut s = self.state();
        if self.wanted == 0
            || s.closed
            || s.ready.contains_key(key)
            || s.making.contains_key(key)
            || s.ready.len() + s.making.len() >= self.wanted
        {
            return false;
        }
        s.making.insert(key.clone(), None);
        true
    }

    /// Adds one made for `key` (reserved before); after [`Pool::drain`]
    /// it is handed back, to discard and then [`Pool::cancel`] (until then
    /// it counts as being made, which the daemon's end waits for).
    pub fn put(&self, key: Key, e: Entry) -> Option<Entry> {
        let mut s = self.state();
        if s.closed {
            return Some(e);
        }
        let waiter = s.making.remove(&key).flatten();
        // The spawn waiting for it, if it still does; else it waits here.
        let e = match waiter {
            Some(tx) => match tx.send(e) {
                Ok(()) => return None,
                Err(e) => e,
            },
            None => e,
        };
        s.ready.insert(key, e);
        None
    }

    /// Gives back the reservation of one that could not be made.
    pub fn cancel(&self, key: &Key) {
        self.state().making.remove(key);
    }

    /// The ones unused since `idle` before `now`, or primed under a
    /// profile set older than `generation`, taken out to discard.
    pub fn stale(&self, now: Instant, idle: Duration, generation: u64) -> Vec<Entry> {
        let mut s = self.state();
        let old: Vec<Key> = s
            .ready
            .iter()
            .filter(|(k, e)| k.generation < generation || now.saturating_duration_since(e.made) >= idle)
            .map(|(k, _)| k.clone())
            .collect();
        old.iter().filter_map(|k| s.ready.remove(k)).collect()
    }

    /// How many are being made.
    pub fn making_len(&self) -> usize {
        self.state().making.len()
    }

    /// How many are ready.
    pub fn ready_len(&self) -> usize {
        self.state().ready.len()
    }

    /// Every ready one, for the daemon's end; none is added after.
    pub fn drain(&self) -> Vec<Entry> {
        let mut s = self.state();
        s.closed = true;
        s.ready.drain().map(|(_, e)| e).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use warden_policy::ClaudeRequest;

    fn params(user: &str, pids: Option<u64>) -> SpawnParams {
        SpawnParams {
            user: user.into(),
            project: "default".into(),
            profile: "base".into(),
            command: vec!["true".into()],
            env: BTreeMap::new(),
            limits: RequestedLimits {
                pids,
                ..Default::default()
            },
            interactive: false,
            claude: ClaudeRequest::default(),
            caller_uid: None,
        }
    }

    #[test]
    fn keys_part_users_limits_and_profile_sets() {
        let a = Key::of(&params("alice", None), 0);
        assert_eq!(a, Key::of(&params("alice", None), 0));
        let mut other_command = params("alice", None);
        other_command.command = vec!["false".into()];
        other_command.env.insert("X".into(), "1".into());
        assert_eq!(
            a,
            Key::of(&other_command, 0),
            "the command and env are not the sandbox's"
        );
        assert_ne!(a, Key::of(&params("bob", None), 0));
        assert_ne!(a, Key::of(&params("alice", Some(5)), 0));
        assert_ne!(a, Key::of(&params("alice", None), 1));
    }

    #[test]
    fn reservations_are_one_per_key_and_bounded() {
        let pool = Pool::new(2);
        let (a, b, c) = (
            Key::of(&params("alice", None), 0),
            Key::of(&params("bob", None), 0),
            Key::of(&params("carol", None), 0),
        );
        assert!(pool.reserve(&a));
        assert!(!pool.reserve(&a), "one per key");
        assert!(pool.reserve(&b));
        assert!(!pool.reserve(&c), "at most wanted, made or being made");
        pool.cancel(&b);
        assert!(pool.reserve(&c));
        assert!(!Pool::new(0).reserve(&a), "none when none are wanted");
        assert!(
            matches!(pool.take(&a), (Found::Coming(_), None)),
            "a spawn may wait for one being made"
        );
        assert!(matches!(pool.take(&b), (Found::None, None)));
        pool.cancel(&a);
        assert!(matches!(pool.take(&a), (Found::None, None)));
    }
}
