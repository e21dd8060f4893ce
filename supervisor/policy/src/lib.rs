//! warden's policy model: sandbox profiles as admins write them, and their
//! compilation into a fully resolved [`LaunchSpec`] that `warden-launch`
//! applies.
//!
//! This crate is pure: it reads text and produces data. It never touches the
//! host (no mounts, no syscalls beyond reading files the caller names) and has
//! no unsafe code, so every rule it produces can be unit-tested on any machine.

#![forbid(unsafe_code)]

mod bucket;
mod claude;
pub mod config;
mod error;
pub mod names;
pub mod network;
mod profile;
pub mod seccomp;
mod spec;
mod units;

pub use bucket::Bucket;
pub use claude::{ClaudePolicy, ClaudeRequest, HttpUrl, PermissionMode, RunsOn, ServerTool, ToolRule};
pub use error::{Location, PolicyError};
pub use network::{Host, NetRule, NetworkMode, NetworkPolicy};
pub use profile::{
    Access, EnvPolicy, FsRule, Limits, Profile, ProfileAccess, ProfileSet, SeccompPolicy, Source, EMBEDDED_PROFILES,
    MAX_LANDLOCK_ABI, RLIMITS, VARIABLES,
};
pub use spec::{
    command, compile, frame, policy_digest, Bind, DenialReport, Enforced, LandlockSpec, LaunchCommand, LaunchReply,
    LaunchReport, LaunchRequest, LaunchSpec, Listener, ListenerKind, Mark, Rlimit, SeccompSpec, SpawnRequest,
    SyntheticFile, MAX_FRAME, SPEC_VERSION,
};
pub use units::{ByteSize, CpuQuota, Rate, Seconds};
