//! Claude Code workers: profiles with a `[claude]` section run the real
//! `claude` CLI headless in the sandbox.
//!
//! - [`prepare`]: before the worker starts, its binary, credentials,
//!   managed settings and CLAUDE.md.
//! - [`session`]: while it runs, the stream-json session the daemon drives
//!   (the initial prompt, permission requests and their approvals).

pub mod prepare;
pub mod session;

pub use prepare::{ClaudeError, BINARY_INSIDE};
pub use session::{Approvals, Decision};
