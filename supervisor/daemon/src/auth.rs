//! Who is calling, and for which warden users they may act.
//!
//! Owns: turning the peer credentials of a Unix-socket connection
//! (SO_PEERCRED) into a [`Caller`], and the authorization rule of
//! DESIGN.md: root and members of the admin group may do everything;
//! configured service uids may act for any user; anyone else in the socket
//! group only for the warden user of their own login name.
//!
//! Must never: trust anything the client says about itself, or ask the
//! account database on the async runtime's threads (see [`Accounts`]).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::unistd::{getgrouplist, Gid, Group, Uid, User};
use warden_policy::config::Config;

/// What a caller is allowed to be.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Role {
    Admin,
    /// A front end acting for its users.
    Service,
    /// Only for the warden user of this name.
    User(String),
    /// Authenticated but allowed nothing.
    #[default]
    Nobody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub pid: Option<i32>,
    pub role: Role,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Admins and services may act for every warden user.
    pub fn may_act_for_everyone(&self) -> bool {
        matches!(self.role, Role::Admin | Role::Service)
    }

    pub fn may_act_for(&self, user: &str) -> bool {
        match &self.role {
            Role::Admin | Role::Service => true,
            Role::User(own) => own == user,
            Role::Nobody => false,
        }
    }

    /// The warden user a caller acts for when the request names none.
    pub fn default_user(&self) -> Option<&str> {
        match &self.role {
            Role::User(u) => Some(u),
            _ => None,
        }
    }
}

/// The groups `uid` belongs to per the account database.
fn groups_of(user: &User) -> Vec<Gid> {
    let name = std::ffi::CString::new(user.name.as_bytes()).unwrap_or_default();
    getgrouplist(&name, user.gid).unwrap_or_else(|_| vec![user.gid])
}

/// The names of the Unix groups of the account named `login` (none when
/// there is no such account), through NSS.
pub fn group_names_of(login: &str) -> Vec<String> {
    let Ok(Some(user)) = User::from_name(login) else {
        return Vec::new();
    };
    groups_of(&user)
        .into_iter()
        .filter_map(|g| Group::from_gid(g).ok().flatten().map(|g| g.name))
        .collect()
}

/// The gid of `group`, if it exists.
pub fn gid_of(group: &str) -> Option<Gid> {
    Group::from_name(group).ok().flatten().map(|g| g.gid)
}

/// Classifies the peer `uid` (asking the account database: blocking).
pub fn identify(uid: u32, pid: Option<i32>, config: &Config) -> Caller {
    let role = if uid == 0 {
        Role::Admin
    } else {
        match User::from_uid(Uid::from_raw(uid)).ok().flatten() {
            None if config.service_uids.contains(&uid) => Role::Service,
            None => Role::Nobody,
            Some(user) => {
                let groups = groups_of(&user);
                let member = |g: &str| gid_of(g).is_some_and(|gid| groups.contains(&gid));
                if member(&config.admin_group) {
                    Role::Admin
                } else if config.service_uids.contains(&uid) {
                    Role::Service
                } else if member(&config.socket_group) {
                    Role::User(user.name)
                } else {
                    Role::Nobody
                }
            }
        }
    };
    Caller { uid, pid, role }
}

/// How long what the account database said about a uid or a user is
/// trusted: a caller added to or removed from the admin or socket group, or
/// a user's group that a profile names, takes effect within this time.
pub const FRESH: Duration = Duration::from_secs(10);

/// The most uids and users remembered each (past it, the stale ones go,
/// then all): what callers and requests can make the daemon hold is
/// bounded.
const MAX_REMEMBERED: usize = 4096;

type RoleOf = dyn Fn(u32) -> Role + Send + Sync;
type GroupsOf = dyn Fn(&str) -> Vec<String> + Send + Sync;

/// What the account database (NSS) says about callers and warden users,
/// asked off the async threads and remembered for [`FRESH`]. A lookup is
/// a file read at best and a varlink call (systemd-userdbd) or a network
/// round trip (LDAP, SSSD) at worst, and every request needs its caller's
/// role; asked on the runtime's threads, one slow database would stall
/// every client. One lookup runs at a time, so a database that hangs holds
/// one blocking thread, not one per request.
pub struct Accounts {
    role_of: Arc<RoleOf>,
    groups_of: Arc<GroupsOf>,
    fresh: Duration,
    roles: Mutex<Remembered<u32, Role>>,
    groups: Mutex<Remembered<String, Arc<[String]>>>,
    asking: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("fresh", &self.fresh)
            .finish_non_exhaustive()
    }
}

impl Accounts {
    /// The account database as `config` reads it (admin and socket groups,
    /// service uids).
    pub fn new(config: &Config) -> Self {
        let config = config.clone();
        Self::with(
            Arc::new(move |uid| identify(uid, None, &config).role),
            Arc::new(group_names_of),
            FRESH,
        )
    }

    /// Accounts answered by `role_of` and `groups_of`, trusted for `fresh`.
    pub fn with(role_of: Arc<RoleOf>, groups_of: Arc<GroupsOf>, fresh: Duration) -> Self {
        Accounts {
            role_of,
            groups_of,
            fresh,
            roles: Mutex::new(Remembered::default()),
            groups: Mutex::new(Remembered::default()),
            asking: tokio::sync::Mutex::new(()),
        }
    }

    /// The caller with peer credentials `uid` and `pid`.
    pub async fn caller(&self, uid: u32, pid: Option<i32>) -> Caller {
        // Root needs no database.
        let role = if uid == 0 {
            Role::Admin
        } else {
            let ask = self.role_of.clone();
            self.remembered(&self.roles, uid, move |uid| ask(uid)).await
        };
        Caller { uid, pid, role }
    }

    /// The names of the Unix groups of the account named `user` (none when
    /// there is no such account).
    pub async fn group_names(&self, user: &str) -> Arc<[String]> {
        let ask = self.groups_of.clone();
        self.remembered(&self.groups, user.to_string(), move |user: String| ask(&user).into())
            .await
    }

    /// `key`'s value from `map` while fresh, else `ask`ed on a blocking
    /// thread (one at a time) and remembered.
    async fn remembered<K, V>(
        &self,
        map: &Mutex<Remembered<K, V>>,
        key: K,
        ask: impl FnOnce(K) -> V + Send + 'static,
    ) -> V
    where
        K: Hash + Eq + Clone + Send + 'static,
        V: Clone + Default + Send + 'static,
    {
        let lock = || map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = lock().get(&key, self.fresh) {
            return v;
        }
        let _one = self.asking.lock().await;
        // Another request may have asked while this one waited.
        if let Some(v) = lock().get(&key, self.fresh) {
            return v;
        }
        let k = key.clone();
        let Ok(v) = tokio::task::spawn_blocking(move || ask(k)).await else {
            // A lookup that failed: the least answer (nobody, no groups),
            // not remembered.
            return V::default();
        };
        lock().insert(key, v.clone(), self.fresh);
        v
    }
}

/// Answers and when each was asked, at most [`MAX_REMEMBERED`].
struct Remembered<K, V>(HashMap<K, (V, Instant)>);

impl<K, V> Default for Remembered<K, V> {
    fn default() -> Self {
        Remembered(HashMap::new())
    }
}

impl<K: Hash + Eq, V: Clone> Remembered<K, V> {
    fn get(&self, key: &K, fresh: Duration) -> Option<V> {
        self.0
            .get(key)
            .filter(|(_, at)| at.elapsed() < fresh)
            .map(|(v, _)| v.clone())
    }

    fn insert(&mut self, key: K, value: V, fresh: Duration) {
        if self.0.len() >= MAX_REMEMBERED {
            self.0.retain(|_, (_, at)| at.elapsed() < fresh);
            if self.0.len() >= MAX_REMEMBERED {
                self.0.clear();
            }
        }
        self.0.insert(key, (value, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    fn caller(role: Role) -> Caller {
        Caller {
            uid: 1000,
            pid: None,
            role,
        }
    }

    #[test]
    fn the_authorization_rule() {
        assert!(caller(Role::Admin).may_act_for("anyone"));
        assert!(caller(Role::Service).may_act_for("anyone"));
        assert!(caller(Role::User("alice".into())).may_act_for("alice"));
        assert!(!caller(Role::User("alice".into())).may_act_for("bob"));
        assert!(!caller(Role::Nobody).may_act_for("alice"));
    }

    #[test]
    fn root_is_admin_and_unknown_uids_are_nobody() {
        let config = Config::parse("t", warden_policy::config::DEFAULT_CONFIG).unwrap();
        assert_eq!(identify(0, None, &config).role, Role::Admin);
        assert_eq!(identify(3_999_999, None, &config).role, Role::Nobody);
        let mut with_service = config.clone();
        with_service.service_uids = vec![3_999_999];
        assert_eq!(identify(3_999_999, None, &with_service).role, Role::Service);
    }

    fn counting(asked: &Arc<AtomicUsize>, fresh: Duration) -> Accounts {
        let a = asked.clone();
        Accounts::with(
            Arc::new(move |uid| {
                a.fetch_add(1, SeqCst);
                match uid {
                    1000 => Role::User("alice".into()),
                    _ => Role::Nobody,
                }
            }),
            Arc::new(|user| vec![format!("{user}-devs")]),
            fresh,
        )
    }

    #[tokio::test]
    async fn answers_are_remembered_while_fresh_and_asked_again_after() {
        let asked = Arc::new(AtomicUsize::new(0));
        let accounts = counting(&asked, Duration::from_millis(300));
        let alice = accounts.caller(1000, Some(7)).await;
        assert_eq!(
            (alice.uid, alice.pid, alice.role),
            (1000, Some(7), Role::User("alice".into()))
        );
        assert_eq!(accounts.caller(1000, None).await.role, Role::User("alice".into()));
        assert_eq!(accounts.caller(1001, None).await.role, Role::Nobody);
        assert_eq!(asked.load(SeqCst), 2, "alice's second call was answered from memory");
        // Root is never looked up.
        assert_eq!(accounts.caller(0, None).await.role, Role::Admin);
        assert_eq!(asked.load(SeqCst), 2);
        assert_eq!(&*accounts.group_names("alice").await, ["alice-devs".to_string()]);
        std::thread::sleep(Duration::from_millis(350));
        accounts.caller(1000, None).await;
        assert_eq!(asked.load(SeqCst), 3, "a stale answer is asked again");
    }

    #[tokio::test]
    async fn what_is_remembered_is_bounded() {
        let asked = Arc::new(AtomicUsize::new(0));
        let accounts = counting(&asked, Duration::from_secs(3600));
        let last = u32::try_from(MAX_REMEMBERED).unwrap() + 10;
        for uid in 1..=last {
            accounts.caller(uid, None).await;
            accounts.group_names(&format!("u{uid}")).await;
        }
        assert!(accounts.roles.lock().unwrap().0.len() <= MAX_REMEMBERED);
        assert!(accounts.groups.lock().unwrap().0.len() <= MAX_REMEMBERED);
        // Still answering, and from memory for what it kept.
        let before = asked.load(SeqCst);
        accounts.caller(last, None).await;
        assert_eq!(asked.load(SeqCst), before);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_database_holds_one_blocking_thread_and_no_runtime_thread() {
        let runtime = std::thread::current().id();
        let (now, most, inline) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (n, m, i) = (now.clone(), most.clone(), inline.clone());
        let accounts = Arc::new(Accounts::with(
            Arc::new(move |_| {
                if std::thread::current().id() == runtime {
                    i.fetch_add(1, SeqCst);
                }
                m.fetch_max(n.fetch_add(1, SeqCst) + 1, SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                n.fetch_sub(1, SeqCst);
                Role::Nobody
            }),
            Arc::new(|_| Vec::new()),
            FRESH,
        ));
        let lookups: Vec<_> = (1..=6)
            .map(|uid| {
                let a = accounts.clone();
                tokio::spawn(async move { a.caller(uid, None).await })
            })
            .collect();
        for l in lookups {
            assert_eq!(l.await.unwrap().role, Role::Nobody);
        }
        assert_eq!(inline.load(SeqCst), 0, "a lookup ran on the runtime's thread");
        assert_eq!(most.load(SeqCst), 1, "lookups ran one at a time");
    }
}
