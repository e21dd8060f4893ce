//! warden's policy model: sandbox profiles as admins write them, and their
//! compilation into a fully resolved [`LaunchSpec`] that `warden-launch`
//! applies.
//!
//! This crate is pure: it reads text and produces data. It never touches the
//! host (no mounts, no syscalls beyond reading files the caller names) and has
//! no unsafe code, so every rule it produces can be unit-tested on any machine.

#![forbid(unsafe_code)]

pub mod config;
mod error;
pub mod names;
mod profile;
pub mod seccomp;
mod spec;
mod units;

pub use error::{Location, PolicyError};
pub use profile::{
    url_port, Access, ClaudePolicy, ClaudeRequest, EnvPolicy, FsRule, Limits, NetworkMode, NetworkPolicy, Profile,
    ProfileSet, SeccompPolicy, Source, EMBEDDED_PROFILES, PERMISSION_MODES,
};
pub use spec::{
    compile, policy_digest, Bind, Enforced, LandlockSpec, LaunchReport, LaunchSpec, Rlimit, SeccompSpec, SpawnRequest,
    SPEC_VERSION,
};
pub use units::{parse_cpu_quota, parse_duration, parse_size};
