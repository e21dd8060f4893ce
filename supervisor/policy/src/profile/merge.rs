//! Resolution: a profile's `extends` chain, merged file by file from the
//! root down, then the checks that only the merged result can answer.

use std::collections::BTreeMap;

use super::file::RawProfile;
use super::{Access, Parsed, Profile};
use crate::error::PolicyError;
use crate::NetworkMode;

/// Resolves `name` through its extends chain. Parents are looked up first
/// among `parsed`, then among already-resolved `known` profiles.
pub(super) fn resolve(
    name: &str,
    parsed: &BTreeMap<String, Parsed>,
    known: &BTreeMap<String, Profile>,
) -> Result<Profile, PolicyError> {
    let leaf = &parsed[name];
    // Walk up the chain, collecting the files to apply (leaf first).
    let mut chain: Vec<&Parsed> = vec![leaf];
    let mut base: Option<Profile> = None;
    let mut current = leaf;
    while let Some(parent) = &current.raw.extends {
        let pname = &parent.get_ref().0;
        if chain.iter().any(|p| &p.source.name == pname) {
            return Err(current.invalid(
                parent.span(),
                format!("profile {pname:?} extends itself through {name:?}"),
            ));
        }
        if let Some(p) = parsed.get(pname) {
            chain.push(p);
            current = p;
        } else if let Some(p) = known.get(pname) {
            base = Some(p.clone());
            break;
        } else {
            return Err(current.invalid(parent.span(), format!("profile extends unknown profile {pname:?}")));
        }
    }
    let mut prof = base.unwrap_or_else(|| Profile::empty(name, &leaf.source.origin));
    let mut ancestors: Vec<String> = chain[1..].iter().map(|p| p.source.name.clone()).collect();
    if !prof.name.is_empty() && prof.name != name {
        ancestors.push(prof.name.clone());
        ancestors.extend(prof.extends.iter().cloned());
    }
    for p in chain.iter().rev() {
        merge(&mut prof, &p.raw);
    }
    prof.name = name.to_string();
    prof.origin.clone_from(&leaf.source.origin);
    prof.extends = ancestors;
    validate(leaf, &prof)?;
    Ok(prof)
}

/// Applies one file on top of the profile it extends: lists add, scalars
/// override. Every value is already typed and checked.
fn merge(base: &mut Profile, r: &RawProfile) {
    if let Some(d) = &r.description {
        base.description.clone_from(d);
    }
    // Who may use it: a file that says replaces what it extends says.
    if let Some(users) = &r.users {
        base.access.users = Some(users.iter().map(|u| u.0.clone()).collect());
    }
    if let Some(groups) = &r.groups {
        base.access.groups = Some(groups.iter().map(|g| g.0.clone()).collect());
    }
    if let Some(abi) = r.landlock.min_abi {
        base.landlock_min_abi = abi.0;
    }
    let mut grant = |paths: &[super::file::ProfilePath], access: Access| {
        for p in paths {
            match base.filesystem.iter_mut().find(|rule| rule.path == p.0) {
                Some(rule) => rule.access = rule.access.union(access),
                None => base.filesystem.push(super::FsRule {
                    path: p.0.clone(),
                    access,
                }),
            }
        }
    };
    let ro = Access::READ;
    grant(&r.filesystem.read_only, ro);
    grant(&r.filesystem.read_write, Access { write: true, ..ro });
    grant(&r.filesystem.exec, Access { exec: true, ..ro });

    let net = &mut base.network;
    if let Some(m) = &r.network.mode {
        net.mode = *m.get_ref();
    }
    for rule in &r.network.allow {
        if !net.allow.contains(rule) {
            net.allow.push(rule.clone());
        }
    }
    for rule in &r.network.deny {
        if !net.deny.contains(rule) {
            net.deny.push(rule.clone());
        }
    }
    net.tcp_connect.extend(r.network.tcp_connect.iter().map(|p| p.0));
    net.tcp_bind.extend(r.network.tcp_bind.iter().map(|p| p.0));
    if let Some(u) = r.network.udp {
        net.udp = u;
    }

    let sc = &mut base.seccomp;
    sc.groups.extend(r.seccomp.groups.iter().map(|g| g.0.clone()));
    sc.allow.extend(r.seccomp.allow.iter().map(|c| c.0.clone()));
    sc.deny.extend(r.seccomp.deny.iter().map(|c| c.0.clone()));

    let (l, raw) = (&mut base.limits, &r.limits);
    if let Some(v) = raw.memory {
        l.memory = Some(v.0);
    }
    if let Some(v) = &raw.memory_swap {
        l.memory_swap = Some(v.get_ref().0);
    }
    if let Some(v) = raw.tmpfs_size {
        l.tmpfs_size = v.0;
    }
    if let Some(v) = raw.disk {
        l.disk = Some(v.0);
    }
    if let Some(v) = raw.pids {
        l.pids = Some(v.0);
    }
    if let Some(v) = raw.cpu_quota {
        l.cpu_quota_us = Some(v.0);
    }
    if let Some(v) = raw.cpu_weight {
        l.cpu_weight = Some(v.0);
    }
    if let Some(v) = raw.timeout {
        l.timeout_secs = Some(v.0);
    }
    for (n, v) in &raw.rlimits {
        l.rlimits.insert(n.0.clone(), v.0);
    }

    let env = &mut base.environment;
    env.pass.extend(r.environment.pass.iter().map(|n| n.0.clone()));
    for (n, v) in &r.environment.set {
        env.set.insert(n.0.clone(), v.0.clone());
    }

    if let Some(c) = &r.claude {
        let claude = base.claude.get_or_insert_with(Default::default);
        if let Some(m) = c.permission_mode {
            claude.permission_mode = m;
        }
        if c.model.is_some() {
            claude.model.clone_from(&c.model);
        }
        claude.models.extend(c.models.iter().cloned());
        claude.allowed_tools.extend(c.allowed_tools.iter().cloned());
        claude.disallowed_tools.extend(c.disallowed_tools.iter().cloned());
        claude.server_tools.extend(c.server_tools.iter().copied());
        if c.max_turns.is_some() {
            claude.max_turns = c.max_turns;
        }
        if c.append_system_prompt.is_some() {
            claude.append_system_prompt.clone_from(&c.append_system_prompt);
        }
        if let Some(u) = &c.base_url {
            // The gateway's upstream: wardend, not the worker, talks to it.
            claude.base_url = Some(u.clone());
        }
        if c.claude_md.is_some() {
            claude.claude_md.clone_from(&c.claude_md);
        }
        if let Some(t) = &c.managed_settings {
            // A TOML table always has a JSON form.
            claude.managed_settings = serde_json::to_string_pretty(t).ok();
        }
        if let Some(t) = c.approval_timeout {
            claude.approval_timeout_secs = t.0;
        }
        claude.auto_allow.extend(c.auto_allow.iter().cloned());
        claude.auto_deny.extend(c.auto_deny.iter().cloned());
    }
}

/// Checks the merged result: a profile that would give an unenforced or
/// useless sandbox is an error, never a silently weaker one.
fn validate(p: &Parsed, prof: &Profile) -> Result<(), PolicyError> {
    let whole = 0..0;
    if prof.seccomp.groups.is_empty() && prof.seccomp.allow.is_empty() {
        return Err(p.invalid(whole, "the seccomp allowlist is empty: list groups in [seccomp] groups"));
    }
    if !prof.filesystem.iter().any(|r| r.access.exec) {
        return Err(p.invalid(
            whole,
            "no path is executable: a worker could not start; add [filesystem] exec paths",
        ));
    }
    if let (Some(m), Some(s)) = (prof.limits.memory, prof.limits.memory_swap) {
        if s < m {
            let span = p.raw.limits.memory_swap.as_ref().map_or(whole, toml::Spanned::span);
            return Err(p.invalid(span, "memory_swap (memory plus swap) must be at least memory"));
        }
    }
    let sockets = crate::seccomp::allowed_calls(&prof.seccomp)
        .iter()
        .any(|c| c == "socket");
    if sockets && prof.landlock_min_abi < 4 {
        let span = p.raw.network.mode.as_ref().map_or(whole, toml::Spanned::span);
        return Err(p.invalid(
            span,
            "a profile that allows sockets needs landlock ABI 4 or later, which limits the loopback ports a worker \
             binds and connects to: set [landlock] min_abi = 4 or more",
        ));
    }
    if prof.network.mode == NetworkMode::Proxy && !sockets {
        let span = p.raw.network.mode.as_ref().map_or(whole, toml::Spanned::span);
        return Err(p.invalid(
            span,
            "network mode \"proxy\" needs sockets: add the \"network\" group to [seccomp] groups, or use mode \"none\"",
        ));
    }
    Ok(())
}
