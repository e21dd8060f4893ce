//! What a `[claude]` worker needs around its sandbox, prepared before it
//! starts: the `claude` binary, the user's API credentials, Claude Code's
//! managed settings and the workspace's CLAUDE.md.
//!
//! Must never: hand one user's credentials to another user's worker, accept
//! a credentials file anyone but root could have written or read, or follow
//! a symlink the user planted when writing into the user's workspace.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use warden_policy::config::Config;
use warden_policy::{Access, Bind, ClaudePolicy, ClaudeRequest};

use super::session::Start;
use crate::users::Identity;

/// Where the claude binary appears inside a worker.
pub const BINARY_INSIDE: &str = "/opt/claude-code/bin/claude";

/// Where a `[claude]` spawn went wrong, for the client.
#[derive(Debug, thiserror::Error)]
pub enum ClaudeError {
    /// The request asks for more than the profile's `[claude]` allows.
    #[error("Invalid spawn request: {0}")]
    Request(String),
    #[error("No claude binary: {0}")]
    Binary(String),
    #[error("Credentials file {path} is refused: {why}")]
    Credentials { path: PathBuf, why: String },
    #[error("No API credential for user {user}: put one in {}/{user} (or {}/default)", dir.display(), dir.display())]
    NoCredential { user: String, dir: PathBuf },
    #[error("Cannot prepare {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// The `claude` binary, resolved to the real file (npm installs a symlink),
/// which is what the sandbox mounts read-only and executable.
pub fn binary(config: &Config) -> Result<PathBuf, ClaudeError> {
    let candidate = match &config.claude_binary {
        Some(p) => p.clone(),
        None => std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join("claude"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| config.claude_install_dir.join("node_modules/.bin/claude")),
    };
    let real = std::fs::canonicalize(&candidate).map_err(|e| {
        ClaudeError::Binary(format!(
            "{} ({e}); set claude_binary in wardend.toml or install @anthropic-ai/claude-code under {}",
            candidate.display(),
            config.claude_install_dir.display()
        ))
    })?;
    let meta = std::fs::metadata(&real).map_err(|e| ClaudeError::Binary(format!("{}: {e}", real.display())))?;
    if !meta.is_file() || meta.mode() & 0o111 == 0 {
        return Err(ClaudeError::Binary(format!(
            "{} is not an executable file",
            real.display()
        )));
    }
    Ok(real)
}

/// A user's API credential: it stays in the daemon, whose gateway adds it
/// to the worker's requests. Its Debug output shows the kind only.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// An API key, sent as `x-api-key`.
    ApiKey(String),
    /// A bearer token for an LLM gateway (`ANTHROPIC_AUTH_TOKEN`).
    AuthToken(String),
    /// A Claude subscription's OAuth token (`CLAUDE_CODE_OAUTH_TOKEN`).
    OAuthToken(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.variable())
    }
}

impl Credential {
    /// The variable Claude Code reads this kind of credential from (the
    /// worker gets a placeholder in it).
    pub fn variable(&self) -> &'static str {
        match self {
            Credential::ApiKey(_) => "ANTHROPIC_API_KEY",
            Credential::AuthToken(_) => "ANTHROPIC_AUTH_TOKEN",
            Credential::OAuthToken(_) => "CLAUDE_CODE_OAUTH_TOKEN",
        }
    }

    pub fn secret(&self) -> &str {
        match self {
            Credential::ApiKey(s) | Credential::AuthToken(s) | Credential::OAuthToken(s) => s,
        }
    }
}

/// `user`'s credential: from `<dir>/<user>`, else `<dir>/default`; none
/// when neither exists.
///
/// A file holds a bare API key, or one `NAME=value` line where NAME is
/// `ANTHROPIC_API_KEY`, `ANTHROPIC_AUTH_TOKEN` or `CLAUDE_CODE_OAUTH_TOKEN`.
pub fn credentials(dir: &Path, user: &str) -> Result<Option<Credential>, ClaudeError> {
    const NAMES: &[&str] = &["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN"];
    for name in [user, "default"] {
        let path = dir.join(name);
        let refuse = |why: String| ClaudeError::Credentials {
            path: path.clone(),
            why,
        };
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(refuse(e.to_string())),
        };
        let meta = file.metadata().map_err(|e| refuse(e.to_string()))?;
        if !meta.is_file() || meta.uid() != 0 || meta.mode() & 0o077 != 0 {
            return Err(refuse(format!(
                "it must be a regular file owned by root with mode 0600 (it is uid {}, mode {:o})",
                meta.uid(),
                meta.mode() & 0o7777
            )));
        }
        let text = std::io::read_to_string(file).map_err(|e| refuse(e.to_string()))?;
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        let credential = match lines.next() {
            None => return Err(refuse("it holds no credential".into())),
            Some(line) => match line.split_once('=') {
                Some((k, v)) => {
                    let v = v.trim().to_string();
                    match k.trim() {
                        "ANTHROPIC_API_KEY" => Credential::ApiKey(v),
                        "ANTHROPIC_AUTH_TOKEN" => Credential::AuthToken(v),
                        "CLAUDE_CODE_OAUTH_TOKEN" => Credential::OAuthToken(v),
                        k => return Err(refuse(format!("unknown name {k:?}; expected one of {NAMES:?}"))),
                    }
                }
                None => Credential::ApiKey(line.to_string()),
            },
        };
        if lines.next().is_some() {
            return Err(refuse("it must hold one credential, on one line".into()));
        }
        let secret = credential.secret();
        if secret.is_empty() || secret.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(refuse("an empty or malformed value".into()));
        }
        return Ok(Some(credential));
    }
    Ok(None)
}

/// A credential for the worker that is worthless anywhere but at its own
/// gateway: `warden-` and 32 random hex digits, new for every worker.
pub fn placeholder() -> Result<String, ClaudeError> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| ClaudeError::Io {
            what: "a placeholder credential from /dev/urandom".into(),
            source,
        })?;
    Ok(std::iter::once("warden-".to_string())
        .chain(bytes.iter().map(|b| format!("{b:02x}")))
        .collect())
}

/// What the gateway of a `[claude]` worker needs: the real credential, the
/// placeholder the worker holds instead, where to forward, which models.
#[derive(Clone)]
pub struct GatewaySetup {
    pub credential: Credential,
    pub placeholder: String,
    pub upstream: warden_policy::HttpUrl,
    /// The models requests may name (None: any).
    pub models: Option<std::collections::BTreeSet<String>>,
    /// The API's own tools requests may list (the profile's `server_tools`).
    pub server_tools: std::collections::BTreeSet<warden_policy::ServerTool>,
}

impl std::fmt::Debug for GatewaySetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewaySetup")
            .field("credential", &self.credential)
            .field("upstream", &self.upstream.text)
            .field("models", &self.models)
            .field("server_tools", &self.server_tools)
            .finish_non_exhaustive()
    }
}

/// What a `[claude]` spawn runs, mounts, passes and keeps.
#[derive(Debug)]
pub struct Prepared {
    /// The claude binary (inside) and the policy's arguments.
    pub argv: Vec<String>,
    /// The binary and the managed settings, at their fixed paths inside.
    pub binds: Vec<Bind>,
    /// ANTHROPIC_BASE_URL (the worker's gateway) and the placeholder
    /// credential: nothing the worker could use elsewhere.
    pub env: Vec<(String, String)>,
    pub start: Start,
    /// For the worker's gateway, in the daemon.
    pub gateway: GatewaySetup,
}

/// Prepares a `[claude]` spawn for `user`: the profile's policy narrowed
/// by the request, the binary, the workspace's CLAUDE.md, managed settings,
/// and the gateway (the user's credential, a placeholder for the worker,
/// the upstream). `prompt` is the spawn request's command.
pub fn prepare(
    config: &Config,
    profile_policy: &ClaudePolicy,
    request: &ClaudeRequest,
    user: &str,
    prompt: &[String],
    id: Identity,
    workspace: &Path,
) -> Result<Prepared, ClaudeError> {
    let policy = profile_policy.narrowed(request).map_err(ClaudeError::Request)?;
    // At a fixed path inside, wherever it is installed on the host (even
    // under /tmp, which is private inside).
    let mut binds = vec![Bind {
        source: binary(config)?,
        target: BINARY_INSIDE.into(),
        access: Access {
            exec: true,
            ..Access::READ
        },
        required: true,
    }];
    if let Some(md) = &policy.claude_md {
        place_claude_md(workspace, md, id.uid, id.gid)?;
    }
    if let Some(json) = &policy.effective_managed_settings() {
        binds.push(Bind {
            source: managed_settings(&config.state_dir, json)?,
            target: "/etc/claude-code/managed-settings.json".into(),
            access: Access::READ,
            required: true,
        });
    }
    let credential = credentials(&config.credentials_dir, user)?.ok_or_else(|| ClaudeError::NoCredential {
        user: user.to_string(),
        dir: config.credentials_dir.clone(),
    })?;
    let placeholder = placeholder()?;
    let mut env = vec![
        (
            "ANTHROPIC_BASE_URL".to_string(),
            format!("http://127.0.0.1:{}", warden_policy::network::GATEWAY_PORT),
        ),
        (credential.variable().to_string(), placeholder.clone()),
    ];
    // With the models restricted, Claude Code's background requests (which
    // default to a small model) use the profile's model too.
    let models: Option<std::collections::BTreeSet<String>> = policy.model.as_ref().map(|m| {
        std::iter::once(m.clone())
            .chain(policy.models.iter().cloned())
            .collect()
    });
    if let Some(m) = &policy.model {
        for var in ["ANTHROPIC_SMALL_FAST_MODEL", "ANTHROPIC_DEFAULT_HAIKU_MODEL"] {
            env.push((var.to_string(), m.clone()));
        }
    }
    let gateway = GatewaySetup {
        credential,
        placeholder,
        upstream: policy
            .base_url
            .clone()
            .unwrap_or_else(|| config.gateway.upstream.clone()),
        models,
        server_tools: policy.server_tools.clone(),
    };
    Ok(Prepared {
        argv: std::iter::once(BINARY_INSIDE.to_string())
            .chain(policy.args())
            .collect(),
        binds,
        env,
        start: Start {
            policy,
            prompt: (!prompt.is_empty()).then(|| prompt.join(" ")),
        },
        gateway,
    })
}

/// Writes the managed settings (JSON) once per content under the state dir
/// and returns the file, mounted read-only into the worker.
pub fn managed_settings(state_dir: &Path, json: &str) -> Result<PathBuf, ClaudeError> {
    let io = |source| ClaudeError::Io {
        what: "Claude Code's managed settings".into(),
        source,
    };
    let dir = state_dir.join("claude");
    std::fs::create_dir_all(&dir).map_err(io)?;
    let digest = Sha256::digest(json.as_bytes());
    let name: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let path = dir.join(format!("managed-settings-{name}.json"));
    if !path.exists() {
        // Concurrent spawns may write the same content: each its own temp file.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tmp = dir.join(format!(".managed-settings-{name}.{}.{n}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(json.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
    }
    Ok(path)
}

/// Places the profile's CLAUDE.md in a workspace that has none, owned by
/// the user. Never follows or replaces what is there (a symlink included).
pub fn place_claude_md(workspace: &Path, text: &str, uid: u32, gid: u32) -> Result<(), ClaudeError> {
    let path = workspace.join("CLAUDE.md");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(source) => {
            return Err(ClaudeError::Io {
                what: path.display().to_string(),
                source,
            })
        }
    };
    let io = |source| ClaudeError::Io {
        what: path.display().to_string(),
        source,
    };
    std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }

    #[test]
    fn credentials_are_per_user_then_default_and_root_only() {
        let d = tempfile::tempdir().unwrap();
        assert!(credentials(d.path(), "alice").unwrap().is_none());
        write(d.path(), "default", "sk-shared\n", 0o600);
        write(d.path(), "alice", "# alice\nANTHROPIC_API_KEY=sk-alice\n", 0o600);
        write(d.path(), "olga", "CLAUDE_CODE_OAUTH_TOKEN=sk-ant-oat-olga\n", 0o600);
        assert_eq!(
            credentials(d.path(), "alice").unwrap(),
            Some(Credential::ApiKey("sk-alice".into()))
        );
        assert_eq!(
            credentials(d.path(), "bob").unwrap(),
            Some(Credential::ApiKey("sk-shared".into()))
        );
        let olga = credentials(d.path(), "olga").unwrap().unwrap();
        assert_eq!(olga, Credential::OAuthToken("sk-ant-oat-olga".into()));
        assert_eq!(
            format!("{olga:?}"),
            "CLAUDE_CODE_OAUTH_TOKEN",
            "Debug never shows the secret"
        );
        write(d.path(), "two", "ANTHROPIC_API_KEY=a\nANTHROPIC_AUTH_TOKEN=b\n", 0o600);
        assert!(credentials(d.path(), "two")
            .unwrap_err()
            .to_string()
            .contains("one credential"));
        let p = placeholder().unwrap();
        assert!(p.starts_with("warden-") && p.len() == 39, "{p}");
        assert_ne!(p, placeholder().unwrap());
        write(d.path(), "carol", "sk-carol", 0o644);
        let e = credentials(d.path(), "carol").unwrap_err().to_string();
        assert!(e.contains("mode 0600") && e.contains("644"), "{e}");
        write(d.path(), "dave", "PATH=/evil\n", 0o600);
        assert!(credentials(d.path(), "dave")
            .unwrap_err()
            .to_string()
            .contains("unknown name"));
        std::os::unix::fs::symlink(d.path().join("alice"), d.path().join("eve")).unwrap();
        assert!(credentials(d.path(), "eve").is_err(), "a symlink is refused");
    }

    #[test]
    fn claude_md_never_replaces_or_follows() {
        let d = tempfile::tempdir().unwrap();
        place_claude_md(d.path(), "hello", 0, 0).unwrap();
        place_claude_md(d.path(), "other", 0, 0).unwrap();
        assert_eq!(std::fs::read_to_string(d.path().join("CLAUDE.md")).unwrap(), "hello");
        let e = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/warden-claude-md-target", e.path().join("CLAUDE.md")).unwrap();
        place_claude_md(e.path(), "x", 0, 0).unwrap();
        assert!(!Path::new("/etc/warden-claude-md-target").exists());
    }
}
