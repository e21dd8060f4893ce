//! Who is calling, and for which warden users they may act.
//!
//! Owns: turning the peer credentials of a Unix-socket connection
//! (SO_PEERCRED) into a [`Caller`], and the authorization rule of
//! DESIGN.md: root and members of the admin group may do everything;
//! configured service uids may act for any user; anyone else in the socket
//! group only for the warden user of their own login name.
//!
//! Must never: trust anything the client says about itself.

use nix::unistd::{getgrouplist, Gid, Group, Uid, User};
use warden_policy::config::Config;

/// What a caller is allowed to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Admin,
    /// A front end acting for its users.
    Service,
    /// Only for the warden user of this name.
    User(String),
    /// Authenticated but allowed nothing.
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

/// Classifies the peer `uid`.
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
