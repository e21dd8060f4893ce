//! Sandbox profiles: the TOML files admins edit (`/etc/warden/profiles/*.toml`,
//! shipped in `sandbox-profiles/` and embedded in the binary).
//!
//! A profile file is read into typed values ([`file`]: every mistake is
//! reported at its file:line:column), then resolved through its `extends`
//! chain into a [`Profile`] ([`merge`]): the fully merged policy that
//! [`crate::compile`] turns into a launch spec. Merging is additive: a
//! child's lists extend its parent's and its scalars override them, so a
//! profile can only be made narrower by not extending a wider one.

mod file;
mod merge;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::claude::ClaudePolicy;
use crate::error::{Location, PolicyError};
use crate::network::{NetworkMode, NetworkPolicy};
use file::{valid_profile_name, RawProfile};
pub use file::{MAX_LANDLOCK_ABI, RLIMITS, VARIABLES};

/// The shipped profiles, embedded so that wardend works with no files in /etc.
pub const EMBEDDED_PROFILES: &[(&str, &str)] = &[
    ("base", include_str!("../../../../sandbox-profiles/base.toml")),
    (
        "claude-code",
        include_str!("../../../../sandbox-profiles/claude-code.toml"),
    ),
    ("offline", include_str!("../../../../sandbox-profiles/offline.toml")),
    ("strict", include_str!("../../../../sandbox-profiles/strict.toml")),
];

/// One profile file's text and where it came from.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    /// A file path, or `embedded:NAME` for the built-in copy.
    pub origin: String,
    pub text: String,
}

impl Source {
    /// The profiles embedded in the binary, as sources.
    pub fn embedded() -> Vec<Source> {
        EMBEDDED_PROFILES
            .iter()
            .map(|(name, text)| Source {
                name: (*name).to_string(),
                origin: format!("embedded:{name}.toml"),
                text: (*text).to_string(),
            })
            .collect()
    }

    /// Reads one profile file; its name is the file stem.
    pub fn read(path: &Path) -> Result<Source, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        Ok(Source {
            name,
            origin: path.display().to_string(),
            text,
        })
    }
}

// ---------------------------------------------------------------------------
// The resolved model.

/// What a worker may do to a path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

impl Access {
    pub const READ: Access = Access {
        read: true,
        write: false,
        exec: false,
    };

    pub fn union(self, o: Access) -> Access {
        Access {
            read: self.read || o.read,
            write: self.write || o.write,
            exec: self.exec || o.exec,
        }
    }
}

/// A path (possibly with `${VAR}`s) and what the worker may do beneath it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsRule {
    pub path: String,
    pub access: Access,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompPolicy {
    pub groups: BTreeSet<String>,
    pub allow: BTreeSet<String>,
    pub deny: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory: Option<u64>,
    pub memory_swap: Option<u64>,
    pub pids: Option<u64>,
    /// Microseconds of CPU per 100 ms period.
    pub cpu_quota_us: Option<u64>,
    /// 1..=10000, cgroup v2 semantics (v1 shares are derived from it).
    pub cpu_weight: Option<u64>,
    pub tmpfs_size: u64,
    /// What the user's directory tree (home and workspaces) may hold on
    /// disk, enforced by the kernel's project quota; also each file's
    /// largest size (RLIMIT_FSIZE). A per-user override in the config
    /// replaces it.
    pub disk: Option<u64>,
    pub timeout_secs: Option<u64>,
    /// rlimit name to value; `None` means unlimited.
    pub rlimits: BTreeMap<String, Option<u64>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvPolicy {
    /// Variables a spawn request may set.
    pub pass: BTreeSet<String>,
    /// Fixed values (may use `${VAR}`s).
    pub set: BTreeMap<String, String>,
}

/// A profile with its `extends` chain merged and every field validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Profile {
    pub name: String,
    pub origin: String,
    pub description: String,
    /// The profiles this one extends, nearest first.
    pub extends: Vec<String>,
    pub landlock_min_abi: u32,
    pub filesystem: Vec<FsRule>,
    pub network: NetworkPolicy,
    pub seccomp: SeccompPolicy,
    pub limits: Limits,
    pub environment: EnvPolicy,
    /// Set when the profile runs Claude Code.
    pub claude: Option<ClaudePolicy>,
    /// Who may use it.
    pub access: ProfileAccess,
}

/// Who may use a profile: everyone when neither list is set; else the
/// warden users listed and the members of the Unix groups listed (the
/// account whose login name is the warden user's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProfileAccess {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users: Option<BTreeSet<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<BTreeSet<String>>,
}

impl ProfileAccess {
    pub fn is_everyone(&self) -> bool {
        self.users.is_none() && self.groups.is_none()
    }

    /// Whether deciding for `user` needs the groups of its account (an
    /// account database lookup): only when groups are listed and the user
    /// is not listed by name.
    pub fn needs_groups(&self, user: &str) -> bool {
        self.groups.is_some() && !self.users.as_ref().is_some_and(|u| u.contains(user))
    }

    /// Whether warden user `user`, whose account is in `user_groups`, may.
    pub fn allows(&self, user: &str, user_groups: &[String]) -> bool {
        self.is_everyone()
            || self.users.as_ref().is_some_and(|u| u.contains(user))
            || self
                .groups
                .as_ref()
                .is_some_and(|g| user_groups.iter().any(|ug| g.contains(ug)))
    }
}

impl Profile {
    /// What a profile that sets nothing is: the start of every merge.
    fn empty(name: &str, origin: &str) -> Profile {
        Profile {
            name: name.to_string(),
            origin: origin.to_string(),
            description: String::new(),
            extends: Vec::new(),
            landlock_min_abi: 1,
            filesystem: Vec::new(),
            network: NetworkPolicy {
                mode: NetworkMode::None,
                allow: Vec::new(),
                deny: Vec::new(),
                // An allow entry without a port means HTTPS.
                tcp_connect: BTreeSet::from([443]),
                tcp_bind: BTreeSet::new(),
                udp: false,
            },
            seccomp: SeccompPolicy {
                groups: BTreeSet::new(),
                allow: BTreeSet::new(),
                deny: BTreeSet::new(),
            },
            limits: Limits {
                memory: None,
                memory_swap: None,
                pids: None,
                cpu_quota_us: None,
                cpu_weight: None,
                tmpfs_size: 64 << 20,
                disk: None,
                timeout_secs: None,
                rlimits: BTreeMap::new(),
            },
            environment: EnvPolicy {
                pass: BTreeSet::new(),
                set: BTreeMap::new(),
            },
            claude: None,
            access: ProfileAccess::default(),
        }
    }
}

// ---------------------------------------------------------------------------
// Reading files.

/// One file, read into typed values.
struct Parsed {
    source: Source,
    raw: RawProfile,
}

impl Parsed {
    fn read(source: Source) -> Result<Parsed, PolicyError> {
        if !valid_profile_name(&source.name) {
            return Err(PolicyError::Invalid {
                at: Location {
                    origin: source.origin.clone(),
                    line: 1,
                    column: 1,
                },
                message: format!(
                    "invalid profile name {:?}: use lowercase letters, digits, '-' and '_'",
                    source.name
                ),
            });
        }
        let raw: RawProfile = toml::from_str(&source.text).map_err(|e| PolicyError::Invalid {
            at: Location::from_offset(&source.origin, &source.text, e.span().map_or(0, |s| s.start)),
            message: e.message().trim().to_string(),
        })?;
        Ok(Parsed { source, raw })
    }

    fn invalid(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            at: Location::from_offset(&self.source.origin, &self.source.text, span.start),
            message: message.into(),
        }
    }
}

/// All loaded profiles, resolved. Cheap to clone; swapped whole on reload.
#[derive(Debug, Clone, Default)]
pub struct ProfileSet {
    profiles: BTreeMap<String, Profile>,
}

impl ProfileSet {
    /// The profiles embedded in the binary.
    pub fn embedded() -> Result<Self, PolicyError> {
        Self::from_sources(Source::embedded())
    }

    /// The embedded profiles, overridden and extended by the `*.toml` files
    /// of `dir` (a file named like an embedded profile replaces it).
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyError> {
        let mut sources: BTreeMap<String, Source> =
            Source::embedded().into_iter().map(|s| (s.name.clone(), s)).collect();
        let read_dir = |source| PolicyError::ReadDir {
            path: dir.to_path_buf(),
            source,
        };
        for entry in std::fs::read_dir(dir).map_err(read_dir)? {
            let path = entry.map_err(read_dir)?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let source = Source::read(&path)?;
            sources.insert(source.name.clone(), source);
        }
        Self::from_sources(sources.into_values().collect())
    }

    /// Parses, validates and resolves a set of sources (a later source of
    /// the same name replaces an earlier one). One bad source fails the
    /// whole set, so a reload never half-applies.
    pub fn from_sources(sources: Vec<Source>) -> Result<Self, PolicyError> {
        let mut parsed = BTreeMap::new();
        for s in sources {
            let p = Parsed::read(s)?;
            parsed.insert(p.source.name.clone(), p);
        }
        let mut profiles = BTreeMap::new();
        for name in parsed.keys() {
            profiles.insert(name.clone(), merge::resolve(name, &parsed, &BTreeMap::new())?);
        }
        Ok(ProfileSet { profiles })
    }

    /// Validates one file as it would resolve within this set, without
    /// changing the set (`wardenctl profile check FILE`).
    pub fn check(&self, source: Source) -> Result<Profile, PolicyError> {
        let name = source.name.clone();
        let parsed = BTreeMap::from([(name.clone(), Parsed::read(source)?)]);
        merge::resolve(&name, &parsed, &self.profiles)
    }

    pub fn get(&self, name: &str) -> Result<&Profile, PolicyError> {
        self.profiles
            .get(name)
            .ok_or_else(|| PolicyError::UnknownProfile(name.to_string()))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.profiles.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(name: &str, text: &str) -> Source {
        Source {
            name: name.into(),
            origin: format!("{name}.toml"),
            text: text.into(),
        }
    }

    const MINIMAL: &str = r#"
[filesystem]
exec = ["/usr"]
[seccomp]
groups = ["default"]
"#;

    fn err_of(sources: Vec<Source>) -> String {
        ProfileSet::from_sources(sources).unwrap_err().to_string()
    }

    #[test]
    fn access_lists_are_checked_and_inherited() {
        let team = format!("users = [\"bob\"]\ngroups = [\"devs\"]\n{MINIMAL}");
        let set = ProfileSet::from_sources(vec![
            src("open", MINIMAL),
            src("team", &team),
            src("child", "extends = \"team\"\n"),
        ])
        .unwrap();
        assert!(set.get("open").unwrap().access.allows("anyone", &[]));
        let child = &set.get("child").unwrap().access;
        assert!(child.allows("bob", &[]));
        assert!(child.allows("carol", &["devs".to_string()]));
        assert!(!child.allows("carol", &["users".to_string()]));
        // The account database is asked only when groups decide.
        assert!(!set.get("open").unwrap().access.needs_groups("anyone"));
        assert!(!child.needs_groups("bob"));
        assert!(child.needs_groups("carol"));
        let users_only = ProfileAccess {
            users: Some(["bob".to_string()].into()),
            groups: None,
        };
        assert!(!users_only.needs_groups("carol") && !users_only.allows("carol", &[]));
        let e = err_of(vec![src("bad", &format!("users = [\"../x\"]\n{MINIMAL}"))]);
        assert!(e.starts_with("bad.toml:1:"), "{e}");
        let e = err_of(vec![src("bad", &format!("groups = [\"a b\"]\n{MINIMAL}"))]);
        assert!(e.contains("invalid group name"), "{e}");
    }

    #[test]
    fn claude_section_resolves_rules_port_and_arguments() {
        use crate::ClaudeRequest;
        let text = format!(
            "{MINIMAL}[landlock]\nmin_abi = 4\n[network]\nmode = \"none\"\ntcp_connect = [443]\n[claude]\npermission_mode = \"default\"\n\
             model = \"m1\"\nmodels = [\"m2\"]\nmax_turns = 20\nbase_url = \"http://127.0.0.1:8089/x\"\n\
             approval_timeout = \"30s\"\nauto_allow = [\"Read\", \"Bash(git status*)\"]\nauto_deny = [\"Bash(*rm -rf*)\"]\n\
             server_tools = [\"web_search\", \"tool_search\"]\n"
        );
        let set = ProfileSet::from_sources(vec![src("c", &text)]).unwrap();
        let p = set.get("c").unwrap();
        assert!(
            p.network.allow.is_empty(),
            "the API is the gateway's upstream, not a destination of the worker"
        );
        assert_eq!(p.claude.as_ref().unwrap().base_url.as_ref().unwrap().port, 8089);
        let c = p.claude.as_ref().unwrap();
        assert_eq!(c.approval_timeout_secs, 30);
        assert_eq!(
            c.server_tools.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
            ["web_search", "tool_search"]
        );
        // Lists add up along `extends`.
        let child = "extends = \"c\"\n[claude]\nserver_tools = [\"mcp\"]\n";
        let set = ProfileSet::from_sources(vec![src("c", &text), src("d", child)]).unwrap();
        let d = set.get("d").unwrap().claude.clone().unwrap();
        assert_eq!(d.server_tools.len(), 3);
        let args = c.args().join(" ");
        assert!(
            args.contains("--permission-mode default --model m1 --max-turns 20"),
            "{args}"
        );
        assert!(args.ends_with("--permission-prompt-tool stdio"), "{args}");
        let cmd = |c: &str| serde_json::json!({"command": c});
        let decided = |tool: &str, input: &serde_json::Value| {
            c.rule_for(tool, &input.to_string()).map(|(a, r)| (a, r.to_string()))
        };
        assert_eq!(
            decided("Read", &serde_json::json!({"file_path": "/x"})),
            Some((true, "Read".into()))
        );
        assert_eq!(
            decided("Bash", &cmd("git status --short")),
            Some((true, "Bash(git status*)".into()))
        );
        assert_eq!(
            decided("Bash", &cmd("cd / && rm -rf x")),
            Some((false, "Bash(*rm -rf*)".into()))
        );
        assert_eq!(decided("Bash", &cmd("git push")), None);
        assert_eq!(decided("Write", &serde_json::json!({"file_path": "/x"})), None);

        // A request may narrow, never widen.
        let ok = c
            .narrowed(&ClaudeRequest {
                model: Some("m2".into()),
                max_turns: Some(5),
                permission_mode: Some("plan".into()),
                ..ClaudeRequest::default()
            })
            .unwrap();
        assert_eq!(
            (ok.model.as_deref(), ok.max_turns, ok.permission_mode),
            (Some("m2"), Some(5), crate::PermissionMode::Plan)
        );
        for (r, want) in [
            (
                ClaudeRequest {
                    model: Some("m9".into()),
                    ..Default::default()
                },
                "model",
            ),
            (
                ClaudeRequest {
                    max_turns: Some(21),
                    ..Default::default()
                },
                "max_turns",
            ),
            (
                ClaudeRequest {
                    permission_mode: Some("bypassPermissions".into()),
                    ..Default::default()
                },
                "asks less",
            ),
        ] {
            let e = c.narrowed(&r).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn claude_section_errors_name_the_place() {
        let e = err_of(vec![src(
            "c",
            &format!("{MINIMAL}[claude]\npermission_mode = \"yolo\"\n"),
        )]);
        assert!(e.starts_with("c.toml:7:19: unknown permission mode"), "{e}");
        let e = err_of(vec![src("c", &format!("{MINIMAL}[claude]\nbase_url = \"ftp://x\"\n"))]);
        assert!(e.contains("c.toml:7:") && e.contains("not an http"), "{e}");
        let e = err_of(vec![src(
            "c",
            &format!("{MINIMAL}[claude]\nauto_allow = [\"Bash(x\"]\n"),
        )]);
        assert!(
            e.starts_with("c.toml:7:15: \"Bash(x\": expected Tool or Tool(pattern)"),
            "{e}"
        );
        let e = err_of(vec![src(
            "c",
            &format!("{MINIMAL}[claude]\napproval_timeout = \"soon\"\n"),
        )]);
        assert!(e.starts_with("c.toml:7:20: expected a duration"), "{e}");
        let e = err_of(vec![src(
            "c",
            &format!("{MINIMAL}[claude]\nserver_tools = [\"web_search_20250305\"]\n"),
        )]);
        assert!(
            e.starts_with(
                "c.toml:7:17: unknown server tool \"web_search_20250305\"; expected one of web_search, web_fetch"
            ),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_is_rejected_with_line_and_column() {
        let e = err_of(vec![src("a", "[filesystem]\nread_only = []\nwritable = [\"/x\"]\n")]);
        assert!(e.starts_with("a.toml:3:1: unknown field `writable`"), "{e}");
        assert!(e.contains("expected one of"), "{e}");
    }

    #[test]
    fn bad_types_and_values_point_at_the_value() {
        let e = err_of(vec![src("a", &format!("{MINIMAL}[limits]\nmemory = \"lots\"\n"))]);
        assert!(e.starts_with("a.toml:7:10: expected a size"), "{e}");
        let e = err_of(vec![src("a", &format!("{MINIMAL}[network]\ntcp_connect = [70000]\n"))]);
        assert!(e.starts_with("a.toml:7:16:"), "{e}");
        let e = err_of(vec![src("a", &format!("{MINIMAL}[network]\nmode = \"open\"\n"))]);
        assert!(e.contains("expected network mode \"none\" or \"proxy\""), "{e}");
        let e = err_of(vec![src("a", &format!("{MINIMAL}[network]\nmode = \"tcp\"\n"))]);
        assert!(e.starts_with("a.toml:7:8: network mode \"tcp\" was removed"), "{e}");
        let e = err_of(vec![src(
            "a",
            &format!("{MINIMAL}[network]\nallow = [\"ok.com\", \"ev%il.com\"]\n"),
        )]);
        assert!(
            e.starts_with("a.toml:7:20: \"ev%il.com\": the host name contains '%'"),
            "{e}"
        );
        let e = err_of(vec![src("a", &format!("{MINIMAL}[network]\ntcp_bind = [3128]\n"))]);
        assert!(e.contains("port 3128 is taken by warden's proxy"), "{e}");
    }

    #[test]
    fn paths_are_checked() {
        for (bad, msg) in [
            ("relative/x", "expected an absolute path"),
            ("/usr/../etc", "must be normalized"),
            ("/usr//lib", "must be normalized"),
            ("${NOPE}/x", "unknown variable ${NOPE}"),
            ("/", "whole host"),
        ] {
            let e = err_of(vec![src("a", &format!("[filesystem]\nread_only = [\"{bad}\"]\n"))]);
            assert!(e.starts_with("a.toml:2:14:"), "{bad}: {e}");
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }

    #[test]
    fn seccomp_names_are_checked_and_dangerous_calls_refused() {
        let e = err_of(vec![src("a", "[seccomp]\ngroups = [\"nope\"]\n")]);
        assert!(e.contains("unknown seccomp group \"nope\""), "{e}");
        let e = err_of(vec![src("a", "[seccomp]\nallow = [\"frobnicate\"]\n")]);
        assert!(e.contains("unknown system call \"frobnicate\""), "{e}");
        let e = err_of(vec![src("a", "[seccomp]\nallow = [\"ptrace\"]\n")]);
        assert!(e.contains("never allowed by warden"), "{e}");
    }

    #[test]
    fn empty_or_useless_profiles_are_errors() {
        let e = err_of(vec![src("a", "[filesystem]\nexec = [\"/usr\"]\n")]);
        assert!(e.contains("seccomp allowlist is empty"), "{e}");
        let e = err_of(vec![src("a", "[seccomp]\ngroups = [\"default\"]\n")]);
        assert!(e.contains("no path is executable"), "{e}");
        let e = err_of(vec![src(
            "a",
            "[filesystem]\nexec = [\"/usr\"]\n[seccomp]\ngroups = [\"default\", \"network\"]\n",
        )]);
        assert!(e.contains("landlock ABI 4"), "{e}");
        let e = err_of(vec![src(
            "a",
            &format!("{MINIMAL}[landlock]\nmin_abi = 4\n[network]\nmode = \"proxy\"\n"),
        )]);
        assert!(e.contains("network mode \"proxy\" needs sockets"), "{e}");
    }

    #[test]
    fn extends_merges_lists_and_overrides_scalars() {
        let set = ProfileSet::from_sources(vec![
            src("parent", &format!("{MINIMAL}[limits]\npids = 10\nmemory = \"1G\"\n")),
            src(
                "child",
                "extends = \"parent\"\n[filesystem]\nread_only = [\"/etc\"]\nexec = [\"/etc\"]\n[limits]\npids = 5\n",
            ),
        ])
        .unwrap();
        let c = set.get("child").unwrap();
        assert_eq!(c.extends, vec!["parent".to_string()]);
        assert_eq!(c.limits.pids, Some(5));
        assert_eq!(c.limits.memory, Some(1 << 30));
        assert_eq!(c.filesystem.len(), 2);
        let etc = c.filesystem.iter().find(|r| r.path == "/etc").unwrap();
        assert!(etc.access.read && etc.access.exec && !etc.access.write);
    }

    #[test]
    fn extends_errors() {
        let e = err_of(vec![src("a", "extends = \"ghost\"\n")]);
        assert!(
            e.starts_with("a.toml:1:11: profile extends unknown profile \"ghost\""),
            "{e}"
        );
        let e = err_of(vec![src("a", "extends = \"b\"\n"), src("b", "extends = \"a\"\n")]);
        assert!(e.contains("extends itself"), "{e}");
    }

    #[test]
    fn check_resolves_against_the_loaded_set() {
        let set = ProfileSet::embedded().unwrap();
        let p = set
            .check(src("mine", "extends = \"claude-code\"\n[limits]\npids = 64\n"))
            .unwrap();
        assert_eq!(p.limits.pids, Some(64));
        assert!(p.extends.contains(&"claude-code".to_string()));
        assert!(p.extends.contains(&"base".to_string()));
        let e = set
            .check(src("mine", "extends = \"claude-code\"\nbogus = 1\n"))
            .unwrap_err();
        assert!(e.to_string().starts_with("mine.toml:2:1: unknown field `bogus`"), "{e}");
    }

    #[test]
    fn load_dir_overrides_embedded_and_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("strict.toml"),
            "extends = \"base\"\ndescription = \"site strict\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("README"), "not a profile").unwrap();
        let set = ProfileSet::load_dir(dir.path()).unwrap();
        assert_eq!(set.get("strict").unwrap().description, "site strict");
        assert!(set.get("claude-code").is_ok());
        std::fs::write(dir.path().join("bad.toml"), "[limits]\npids = \"many\"\n").unwrap();
        let e = ProfileSet::load_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("bad.toml:2:8:"), "{e}");
    }
}
