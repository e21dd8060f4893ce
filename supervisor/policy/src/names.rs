//! Validation of the names that become paths: warden user names and project
//! names. A name that passes can be used as one path component as is.

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} name is empty")]
    Empty { what: &'static str },
    #[error("{what} name is longer than {max} bytes")]
    TooLong { what: &'static str, max: usize },
    #[error("{what} name {name:?} must not start with '-' or '.'")]
    BadStart { what: &'static str, name: String },
    #[error("{what} name {name:?} may only contain letters, digits, '.', '_' and '-'")]
    BadChar { what: &'static str, name: String },
}

fn check(what: &'static str, name: &str, max: usize, lowercase_only: bool) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.len() > max {
        return Err(NameError::TooLong { what, max });
    }
    // A leading '-' reads as an option to tools; a leading '.' covers "." and
    // ".." (and hidden files) in one rule.
    if name.starts_with('-') || name.starts_with('.') {
        return Err(NameError::BadStart {
            what,
            name: name.to_string(),
        });
    }
    let ok = |c: char| {
        (c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
            || (!lowercase_only && c.is_ascii_uppercase())
    };
    if !name.chars().all(ok) {
        return Err(NameError::BadChar {
            what,
            name: name.to_string(),
        });
    }
    Ok(())
}

/// A warden user name: like a POSIX login name, lowercase, at most 32 bytes,
/// so that it can name the worker in its synthesized /etc/passwd.
pub fn check_user(name: &str) -> Result<(), NameError> {
    check("user", name, 32, true)
}

/// A profile name, as it names the directory of a user's tree for that
/// profile (profiles are checked more strictly when loaded).
pub fn check_profile(name: &str) -> Result<(), NameError> {
    check("profile", name, 64, true)
}

/// A project name: one directory under the user's workspace.
pub fn check_project(name: &str) -> Result<(), NameError> {
    check("project", name, 64, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        for ok in ["alice", "bob-2", "svc_web", "a.b"] {
            assert_eq!(check_user(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "..",
            ".",
            "-rf",
            "a/b",
            "a\0b",
            "Alice",
            "a b",
            "../etc",
            &"x".repeat(33),
        ] {
            assert!(check_user(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn project_names() {
        assert_eq!(check_project("MyApp-2"), Ok(()));
        for bad in ["", "..", "a/b", "-x", ".git", "a\0", &"p".repeat(65)] {
            assert!(check_project(bad).is_err(), "{bad:?}");
        }
    }
}
