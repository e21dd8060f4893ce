//! Errors of the policy crate. Every error that comes from a file carries the
//! file, line and column an admin has to look at.

use std::fmt;
use std::path::PathBuf;

/// A place in a profile source: `origin` is the file path (or `embedded:NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub origin: String,
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// Turns a byte offset into 1-based line and column (columns count chars).
    pub fn from_offset(origin: &str, text: &str, offset: usize) -> Self {
        let offset = offset.min(text.len());
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = text[line_start..offset].chars().count() + 1;
        Location {
            origin: origin.to_string(),
            line,
            column,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.origin, self.line, self.column)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A profile that does not parse or does not validate.
    #[error("{at}: {message}")]
    Invalid { at: Location, message: String },

    #[error("Cannot read profile {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("Cannot read the configuration {path}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("Cannot read profile directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("Unknown profile {0:?}")]
    UnknownProfile(String),

    /// A spawn request that the profile cannot serve (bad name, bad env, ...).
    #[error("Invalid spawn request: {0}")]
    Request(String),
}
