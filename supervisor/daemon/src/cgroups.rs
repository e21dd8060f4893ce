//! Per-worker cgroups under warden's own part of the hierarchy.
//!
//! Owns: creating a worker's cgroup before its launcher runs user code,
//! writing its limits, reading its usage, killing every process in it and
//! removing it. Two layouts:
//!
//! - **cgroup v2** (production, systemd `Delegate=yes`): the daemon's own
//!   cgroup is delegated to it. Because v2 forbids processes in a cgroup whose
//!   controllers are delegated further, the daemon first moves itself into a
//!   leaf (`<own>/supervisor`), then enables memory, pids and cpu for
//!   `<own>/workers/<id>`. `memory.oom.group` makes an OOM kill take the
//!   whole worker.
//! - **cgroup v1 / hybrid** (this project's test machines): a `warden`
//!   directory in each of the memory, pids, cpu, cpuacct and freezer
//!   hierarchies. v1 has no group OOM kill, so [`WorkerCgroup::kill_all`]
//!   (freeze, SIGKILL everything, thaw) is what the daemon runs when the
//!   OOM counter moves.
//!
//! Must never: create a plain directory and call it a cgroup. The parent is
//! checked to be a cgroup file system, and a new cgroup must show the control
//! files the kernel creates.
//!
//! Why not the cgroups-rs crate: warden needs the v2 delegation dance, the
//! v1 freezer kill and a fake cgroupfs for tests; doing the file I/O here
//! keeps all of that in one short, testable module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("Cannot find a usable cgroup hierarchy: {0}")]
    NoHierarchy(String),
    #[error("{path} is not on a cgroup file system")]
    NotCgroupFs { path: PathBuf },
    #[error("Cannot create cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Created {path} but the kernel did not populate it: not a cgroup")]
    NotPopulated { path: PathBuf },
    #[error("Cannot write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot remove cgroup {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Processes of cgroup {path} survived the kill")]
    Survivors { path: PathBuf },
    #[error("Invalid worker id {0:?}")]
    BadId(String),
}

/// The limits a worker's cgroup gets (from the resolved profile).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory: Option<u64>,
    /// Memory plus swap.
    pub memory_swap: Option<u64>,
    pub pids: Option<u64>,
    /// Microseconds per 100 ms period.
    pub cpu_quota_us: Option<u64>,
    /// 1..=10000 (v2 weight; v1 shares are derived).
    pub cpu_weight: Option<u64>,
}

impl From<&warden_policy::Limits> for CgroupLimits {
    fn from(l: &warden_policy::Limits) -> Self {
        CgroupLimits {
            memory: l.memory,
            memory_swap: l.memory_swap,
            pids: l.pids,
            cpu_quota_us: l.cpu_quota_us,
            cpu_weight: l.cpu_weight,
        }
    }
}

/// Usage read back from a worker's cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub memory_current: u64,
    pub memory_peak: u64,
    pub cpu_usage_ns: u64,
    pub pids_current: u64,
    /// Processes killed by the OOM killer in this cgroup.
    pub oom_kills: u64,
    /// Times a fork failed because pids.max was reached.
    pub pids_max_hits: u64,
    /// CFS periods in which the worker was throttled by its CPU quota.
    pub cpu_throttled: u64,
}

const CPU_PERIOD_US: u64 = 100_000;

/// The v1 controllers warden uses, each its own hierarchy.
pub const V1_CONTROLLERS: [&str; 5] = ["memory", "pids", "cpu", "cpuacct", "freezer"];
const V2_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// Controller name to warden's parent directory in that hierarchy.
    V1(BTreeMap<&'static str, PathBuf>),
    /// `<own>/workers`, with the daemon in `<own>/supervisor`.
    V2 { workers: PathBuf },
}

/// How cgroup directories are checked. `Kernel` verifies the file system
/// type; `Fake` is for unit tests on a tempdir that imitates cgroupfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fs {
    Kernel,
    Fake,
}

/// Creates and finds worker cgroups.
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
    fs: Fs,
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The value of `key` in a flat keyed file ("key value" lines).
fn keyed(path: &Path, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
            })
        })
        .unwrap_or(0)
}

fn check_fs(fs: Fs, path: &Path) -> Result<(), CgroupError> {
    if fs == Fs::Fake {
        return Ok(());
    }
    let st = statfs(path).map_err(|e| CgroupError::Read {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    let t = st.filesystem_type();
    if t == CGROUP_SUPER_MAGIC || t == CGROUP2_SUPER_MAGIC {
        Ok(())
    } else {
        Err(CgroupError::NotCgroupFs {
            path: path.to_path_buf(),
        })
    }
}

/// mkdir a cgroup under a verified parent and check the kernel populated it.
fn make_cgroup(fs: Fs, path: &Path) -> Result<(), CgroupError> {
    if let Some(parent) = path.parent() {
        check_fs(fs, parent)?;
    }
    match std::fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(CgroupError::Create {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    if !path.join("cgroup.procs").exists() {
        return Err(CgroupError::NotPopulated {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Cgroups {
    /// Finds the hierarchy of this host from `/proc/self/mountinfo` and
    /// `/proc/self/cgroup`: pure v2 when its root offers memory, pids and
    /// cpu; otherwise the v1 controllers. `name` is warden's directory in v1
    /// (e.g. "warden"); in v2 the daemon's own delegated cgroup is used.
    pub fn detect(name: &str) -> Result<Self, CgroupError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| CgroupError::Read {
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|source| CgroupError::Read {
            path: "/proc/self/cgroup".into(),
            source,
        })?;
        let mounts = parse_mountinfo(&mountinfo);
        if let Some((root, _)) = mounts.iter().find(|(_, t)| t.is_none()) {
            let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            if V2_CONTROLLERS
                .iter()
                .all(|c| controllers.split_whitespace().any(|x| x == *c))
            {
                let rel = own
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .ok_or_else(|| CgroupError::NoHierarchy("no v2 entry in /proc/self/cgroup".into()))?;
                return Self::v2_delegated(root, rel.trim(), Fs::Kernel);
            }
        }
        let mut parents = BTreeMap::new();
        for c in V1_CONTROLLERS {
            let mount = mounts
                .iter()
                .find(|(_, t)| t.as_deref().is_some_and(|opts| opts.split(',').any(|o| o == c)))
                .map(|(p, _)| p.clone())
                .ok_or_else(|| {
                    CgroupError::NoHierarchy(format!(
                        "no cgroup v1 mount with the {c} controller and no usable cgroup v2"
                    ))
                })?;
            parents.insert(c, mount.join(name));
        }
        Self::v1(parents, Fs::Kernel)
    }

    /// v1 with warden's parent directory per controller (created if needed).
    pub fn v1(parents: BTreeMap<&'static str, PathBuf>, fs: Fs) -> Result<Self, CgroupError> {
        for p in parents.values() {
            make_cgroup(fs, p)?;
        }
        Ok(Cgroups {
            layout: Layout::V1(parents),
            fs,
        })
    }

    /// v2 under the daemon's delegated cgroup `<root>/<own>`: moves the
    /// daemon into `<own>/supervisor`, enables the controllers and creates
    /// `<own>/workers`.
    pub fn v2_delegated(root: &Path, own: &str, fs: Fs) -> Result<Self, CgroupError> {
        let own_dir = root.join(own.trim_start_matches('/'));
        check_fs(fs, &own_dir)?;
        let supervisor = own_dir.join("supervisor");
        make_cgroup(fs, &supervisor)?;
        // Every process of our own cgroup moves into the leaf (the daemon may
        // have helper threads' tgids listed once each).
        for pid in read(&own_dir.join("cgroup.procs"))?
            .lines()
            .filter(|l| !l.trim().is_empty())
        {
            write(&supervisor.join("cgroup.procs"), pid.trim())?;
        }
        let enable = V2_CONTROLLERS
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        write(&own_dir.join("cgroup.subtree_control"), &enable)?;
        let workers = own_dir.join("workers");
        make_cgroup(fs, &workers)?;
        write(&workers.join("cgroup.subtree_control"), &enable)?;
        Ok(Cgroups {
            layout: Layout::V2 { workers },
            fs,
        })
    }

    pub fn is_v2(&self) -> bool {
        matches!(self.layout, Layout::V2 { .. })
    }

    /// Creates the cgroup of worker `id` with `limits`.
    pub fn create(&self, id: &str, limits: &CgroupLimits) -> Result<WorkerCgroup, CgroupError> {
        if !valid_id(id) {
            return Err(CgroupError::BadId(id.to_string()));
        }
        let cg = self.open(id);
        for dir in cg.dirs.values() {
            // 0755 whatever the daemon's umask (the unit's is 0077): the
            // worker reads its own limits there (its /sys/fs/cgroup).
            let made = make_cgroup(self.fs, dir).and_then(|()| {
                std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).map_err(|source| {
                    CgroupError::Create {
                        path: dir.clone(),
                        source,
                    }
                })
            });
            if let Err(e) = made {
                // Not half a cgroup left behind.
                let _ = cg.remove();
                return Err(e);
            }
        }
        if let Err(e) = cg.apply(limits) {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// A handle on the cgroup of worker `id`, whether or not it exists
    /// (used to clean up after a previous run).
    pub fn open(&self, id: &str) -> WorkerCgroup {
        let dirs = match &self.layout {
            Layout::V1(parents) => parents.iter().map(|(c, p)| (*c, p.join(id))).collect(),
            Layout::V2 { workers } => BTreeMap::from([("unified", workers.join(id))]),
        };
        WorkerCgroup {
            id: id.to_string(),
            v2: self.is_v2(),
            dirs,
        }
    }

    /// The ids of worker cgroups that exist now (leftovers after a crash),
    /// in any v1 hierarchy: a crash in the middle of a create leaves some.
    pub fn existing(&self) -> Vec<String> {
        let dirs: Vec<PathBuf> = match &self.layout {
            Layout::V1(parents) => parents.values().cloned().collect(),
            Layout::V2 { workers } => vec![workers.clone()],
        };
        let mut ids: Vec<String> = dirs
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_id(n))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

/// Mount points of cgroup file systems: (path, Some(v1 options) | None for v2).
fn parse_mountinfo(text: &str) -> Vec<(PathBuf, Option<String>)> {
    let mut out = Vec::new();
    for line in text.lines() {
        // fields: id parent major:minor root mountpoint options ... - fstype source superoptions
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mountpoint = left.split_whitespace().nth(4);
        let mut r = right.split_whitespace();
        let (fstype, _src, superopts) = (r.next(), r.next(), r.next());
        match (fstype, mountpoint) {
            (Some("cgroup2"), Some(m)) => out.push((PathBuf::from(m), None)),
            (Some("cgroup"), Some(m)) => out.push((PathBuf::from(m), superopts.map(str::to_string))),
            _ => {}
        }
    }
    out
}

/// One worker's cgroup (one directory per v1 controller, or one in v2).
#[derive(Debug, Clone)]
pub struct WorkerCgroup {
    id: String,
    v2: bool,
    dirs: BTreeMap<&'static str, PathBuf>,
}

impl WorkerCgroup {
    pub fn id(&self) -> &str {
        &self.id
    }

    fn dir(&self, controller: &str) -> &Path {
        if self.v2 {
            &self.dirs["unified"]
        } else {
            &self.dirs[controller]
        }
    }

    /// The `cgroup.procs` files a process writes its pid to, to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.values().map(|d| d.join("cgroup.procs")).collect()
    }

    /// On cgroup v2, the one directory, which a worker's init can be
    /// created in (CLONE_INTO_CGROUP); on v1 None: it joins each itself.
    pub fn v2_dir(&self) -> Option<&Path> {
        self.v2.then(|| self.dir("unified"))
    }

    /// Sets `limits` on a cgroup made ahead of its worker (by
    /// [`Cgroups::create`] with none).
    pub fn limit(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        self.apply(limits)
    }

    /// The directories of this cgroup (one per v1 controller).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs.values().cloned().collect()
    }

    fn apply(&self, l: &CgroupLimits) -> Result<(), CgroupError> {
        if self.v2 {
            let d = self.dir("memory");
            if let Some(m) = l.memory {
                write(&d.join("memory.max"), &m.to_string())?;
                // Swap is what memory+swap allows beyond memory.
                let swap = l.memory_swap.map_or(0, |s| s.saturating_sub(m));
                write(&d.join("memory.swap.max"), &swap.to_string())?;
            }
            // An OOM kill takes every process of the worker, not one victim.
            write(&d.join("memory.oom.group"), "1")?;
            if let Some(p) = l.pids {
                write(&d.join("pids.max"), &p.to_string())?;
            }
            if let Some(q) = l.cpu_quota_us {
                write(&d.join("cpu.max"), &format!("{q} {CPU_PERIOD_US}"))?;
            }
            if let Some(w) = l.cpu_weight {
                write(&d.join("cpu.weight"), &w.to_string())?;
            }
        } else {
            let mem = self.dir("memory");
            if let Some(m) = l.memory {
                write(&mem.join("memory.limit_in_bytes"), &m.to_string())?;
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                // Only present when the kernel accounts swap.
                if memsw.exists() {
                    write(&memsw, &l.memory_swap.unwrap_or(m).max(m).to_string())?;
                }
            }
            if let Some(p) = l.pids {
                write(&self.dir("pids").join("pids.max"), &p.to_string())?;
            }
            let cpu = self.dir("cpu");
            if let Some(q) = l.cpu_quota_us {
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &q.to_string())?;
            }
            if let Some(w) = l.cpu_weight {
                // v2 weight 100 is v1's default 1024 shares.
                let shares = (w * 1024 / 100).clamp(2, 262_144);
                write(&cpu.join("cpu.shares"), &shares.to_string())?;
            }
        }
        Ok(())
    }

    /// Current usage; missing files read as 0 (an older kernel lacks
    /// memory.peak, for instance).
    pub fn usage(&self) -> Usage {
        if self.v2 {
            let d = self.dir("memory");
            Usage {
                memory_current: read_u64(&d.join("memory.current")),
                memory_peak: read_u64(&d.join("memory.peak")),
                cpu_usage_ns: keyed(&d.join("cpu.stat"), "usage_usec") * 1000,
                pids_current: read_u64(&d.join("pids.current")),
                oom_kills: keyed(&d.join("memory.events"), "oom_kill"),
                pids_max_hits: keyed(&d.join("pids.events"), "max"),
                cpu_throttled: keyed(&d.join("cpu.stat"), "nr_throttled"),
            }
        } else {
            let mem = self.dir("memory");
            let pids = self.dir("pids");
            Usage {
                memory_current: read_u64(&mem.join("memory.usage_in_bytes")),
                memory_peak: read_u64(&mem.join("memory.max_usage_in_bytes")),
                cpu_usage_ns: read_u64(&self.dir("cpuacct").join("cpuacct.usage")),
                pids_current: read_u64(&pids.join("pids.current")),
                oom_kills: keyed(&mem.join("memory.oom_control"), "oom_kill"),
                pids_max_hits: keyed(&pids.join("pids.events"), "max"),
                cpu_throttled: keyed(&self.dir("cpu").join("cpu.stat"), "nr_throttled"),
            }
        }
    }

    /// Only the counters of limits hit (the other fields 0): three files,
    /// not seven, for the monitor's twice-a-second look at every running
    /// worker.
    pub fn limits_hit(&self) -> Usage {
        let (memory, pids, cpu) = if self.v2 {
            let d = self.dir("memory");
            (d.join("memory.events"), d.join("pids.events"), d.join("cpu.stat"))
        } else {
            (
                self.dir("memory").join("memory.oom_control"),
                self.dir("pids").join("pids.events"),
                self.dir("cpu").join("cpu.stat"),
            )
        };
        Usage {
            oom_kills: keyed(&memory, "oom_kill"),
            pids_max_hits: keyed(&pids, "max"),
            cpu_throttled: keyed(&cpu, "nr_throttled"),
            ..Usage::default()
        }
    }

    /// The pids in this cgroup now.
    pub fn pids(&self) -> Vec<i32> {
        let d = if self.v2 { self.dir("memory") } else { self.dir("pids") };
        std::fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Kills every process in the cgroup and waits until it is empty.
    /// v2 uses `cgroup.kill`; v1 freezes the cgroup first so that nothing can
    /// fork between reading the list and the kill.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        if self.v2 {
            write(&self.dir("memory").join("cgroup.kill"), "1")?;
        }
        let freezer = (!self.v2).then(|| self.dir("freezer").join("freezer.state"));
        let mut pause = Backoff::default();
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                if let Some(f) = &freezer {
                    let _ = write(f, "THAWED");
                }
                return Ok(());
            }
            if let Some(f) = &freezer {
                write(f, "FROZEN")?;
            }
            for pid in &pids {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            if let Some(f) = &freezer {
                // SIGKILL is delivered once the tasks are thawed.
                write(f, "THAWED")?;
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Survivors {
                    path: self.dir("pids").to_path_buf(),
                });
            }
            pause.sleep();
        }
    }

    /// Kills what is in the cgroup (waiting up to 5 s) and removes it: the
    /// end of a cgroup made ahead for a worker that did not run.
    pub fn discard(&self) -> Result<(), CgroupError> {
        let _ = self.kill_all(Duration::from_secs(5));
        self.remove()
    }

    /// Removes the cgroup (after [`kill_all`](Self::kill_all)); a cgroup that
    /// is already gone is fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for dir in self.dirs.values() {
            let deadline = Instant::now() + Duration::from_secs(1);
            let mut pause = Backoff::default();
            let began = Instant::now();
            let mut tries = 0;
            loop {
                tries += 1;
                match std::fs::remove_dir(dir) {
                    Ok(()) => {
                        tracing::debug!(dir = %dir.display(), tries, took = ?began.elapsed(), "removed cgroup");
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    // Exiting tasks linger for a moment after cgroup.procs is empty.
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                        pause.sleep();
                    }
                    Err(source) => {
                        return Err(CgroupError::Remove {
                            path: dir.clone(),
                            source,
                        })
                    }
                }
            }
        }
        Ok(())
    }
}

/// Waits that start short and double up to 10 ms: the kernel usually
/// finishes with an exiting task within microseconds, and a spawn waits
/// for it on its way out.
#[derive(Debug)]
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_micros(50))
    }
}

impl Backoff {
    fn sleep(&mut self) {
        std::thread::sleep(self.0);
        self.0 = (self.0 * 2).min(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    //! The v2 path against a fake cgroupfs: a tempdir whose "mkdir" is done
    //! by [`FakeKernel`], which populates control files as the kernel does.
    use super::*;

    /// Imitates the kernel side of cgroupfs for the files warden touches.
    struct FakeKernel {
        root: tempfile::TempDir,
    }

    impl FakeKernel {
        fn v2(own: &str, daemon_pids: &[u32]) -> Self {
            let root = tempfile::tempdir().unwrap();
            let k = FakeKernel { root };
            let own_dir = k.root.path().join(own.trim_start_matches('/'));
            k.populate(&own_dir);
            std::fs::write(
                own_dir.join("cgroup.procs"),
                daemon_pids.iter().map(|p| format!("{p}\n")).collect::<String>(),
            )
            .unwrap();
            k
        }

        fn populate(&self, dir: &Path) {
            std::fs::create_dir_all(dir).unwrap();
            for f in [
                "cgroup.procs",
                "cgroup.subtree_control",
                "cgroup.kill",
                "memory.max",
                "memory.swap.max",
                "memory.oom.group",
                "pids.max",
                "cpu.max",
                "cpu.weight",
            ] {
                std::fs::write(dir.join(f), "").unwrap();
            }
        }
    }

    #[test]
    fn v2_moves_the_daemon_into_a_leaf_and_delegates_controllers() {
        let k = FakeKernel::v2("/system.slice/wardend.service", &[4242]);
        let own = k.root.path().join("system.slice/wardend.service");
        // The fake kernel populates the leaves before warden looks at them.
        k.populate(&own.join("supervisor"));
        k.populate(&own.join("workers"));
        let cg = Cgroups::v2_delegated(k.root.path(), "/system.slice/wardend.service", Fs::Fake).unwrap();
        assert!(cg.is_v2());
        assert_eq!(read(&own.join("supervisor/cgroup.procs")).unwrap(), "4242");
        assert_eq!(read(&own.join("cgroup.subtree_control")).unwrap(), "+memory +pids +cpu");
        assert_eq!(
            read(&own.join("workers/cgroup.subtree_control")).unwrap(),
            "+memory +pids +cpu"
        );

        k.populate(&own.join("workers/w1"));
        let limits = CgroupLimits {
            memory: Some(512 << 20),
            memory_swap: Some(768 << 20),
            pids: Some(64),
            cpu_quota_us: Some(150_000),
            cpu_weight: Some(50),
        };
        let w = cg.create("w1", &limits).unwrap();
        let d = own.join("workers/w1");
        assert_eq!(read(&d.join("memory.max")).unwrap(), (512u64 << 20).to_string());
        assert_eq!(read(&d.join("memory.swap.max")).unwrap(), (256u64 << 20).to_string());
        assert_eq!(read(&d.join("memory.oom.group")).unwrap(), "1");
        assert_eq!(read(&d.join("pids.max")).unwrap(), "64");
        assert_eq!(read(&d.join("cpu.max")).unwrap(), "150000 100000");
        assert_eq!(read(&d.join("cpu.weight")).unwrap(), "50");
        assert_eq!(w.procs_files(), vec![d.join("cgroup.procs")]);
        assert_eq!(cg.existing(), vec!["w1".to_string()]);

        // Usage from the v2 files.
        std::fs::write(d.join("memory.current"), "1000\n").unwrap();
        std::fs::write(d.join("memory.peak"), "5000\n").unwrap();
        std::fs::write(d.join("cpu.stat"), "usage_usec 7\nuser_usec 5\nnr_throttled 0\n").unwrap();
        std::fs::write(d.join("pids.current"), "3\n").unwrap();
        std::fs::write(d.join("memory.events"), "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n").unwrap();
        std::fs::write(d.join("pids.events"), "max 9\n").unwrap();
        let u = w.usage();
        assert_eq!(
            u,
            Usage {
                memory_current: 1000,
                memory_peak: 5000,
                cpu_usage_ns: 7000,
                pids_current: 3,
                oom_kills: 1,
                pids_max_hits: 9,
                cpu_throttled: 0,
            }
        );
        // The monitor's twice-a-second look: the counters of limits hit only.
        assert_eq!(
            w.limits_hit(),
            Usage {
                oom_kills: 1,
                pids_max_hits: 9,
                ..Usage::default()
            }
        );

        // Kill uses cgroup.kill; an empty cgroup is then removed. The fake
        // cgroup holds control files a real rmdir would not mind, so clear them.
        std::fs::write(d.join("cgroup.procs"), "").unwrap();
        w.kill_all(Duration::from_secs(1)).unwrap();
        assert_eq!(read(&d.join("cgroup.kill")).unwrap(), "1");
        for e in std::fs::read_dir(&d).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        w.remove().unwrap();
        assert!(!d.exists());
    }

    #[test]
    fn a_directory_the_kernel_did_not_populate_is_not_a_cgroup() {
        let k = FakeKernel::v2("/svc", &[1]);
        let own = k.root.path().join("svc");
        k.populate(&own.join("supervisor"));
        // "workers" is not populated: warden must refuse it.
        let e = Cgroups::v2_delegated(k.root.path(), "/svc", Fs::Fake).unwrap_err();
        assert!(matches!(e, CgroupError::NotPopulated { .. }), "{e}");
    }

    #[test]
    fn the_real_check_refuses_a_plain_directory() {
        let dir = tempfile::tempdir().unwrap();
        let e = Cgroups::v2_delegated(dir.path(), "/", Fs::Kernel).unwrap_err();
        assert!(matches!(e, CgroupError::NotCgroupFs { .. }), "{e}");
    }

    #[test]
    fn worker_ids_are_checked() {
        let k = FakeKernel::v2("/svc", &[1]);
        let own = k.root.path().join("svc");
        k.populate(&own.join("supervisor"));
        k.populate(&own.join("workers"));
        let cg = Cgroups::v2_delegated(k.root.path(), "/svc", Fs::Fake).unwrap();
        for bad in ["", "../x", "a/b", "."] {
            assert!(matches!(
                cg.create(bad, &CgroupLimits::default()),
                Err(CgroupError::BadId(_))
            ));
        }
    }

    #[test]
    fn half_made_v1_cgroups_are_found_and_a_failed_create_leaves_none() {
        let root = tempfile::tempdir().unwrap();
        let mut parents = BTreeMap::new();
        for c in ["cpu", "freezer", "memory", "pids"] {
            let p = root.path().join(c).join("warden");
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("cgroup.procs"), "").unwrap();
            parents.insert(c, p);
        }
        let cgroups = Cgroups::v1(parents.clone(), Fs::Fake).unwrap();
        // A crash in the middle of a create: only some hierarchies have it.
        std::fs::create_dir(parents["cpu"].join("w-half")).unwrap();
        std::fs::create_dir(parents["pids"].join("w-other")).unwrap();
        assert_eq!(cgroups.existing(), vec!["w-half".to_string(), "w-other".to_string()]);
        // A create that fails part way (here: no kernel populates the fake
        // directories) removes what it made.
        assert!(cgroups.create("w-new", &CgroupLimits::default()).is_err());
        for p in parents.values() {
            assert!(!p.join("w-new").exists(), "{}", p.display());
        }
    }

    #[test]
    fn mountinfo_parsing_finds_v1_and_v2() {
        let text = "\
30 25 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
32 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0], (PathBuf::from("/sys/fs/cgroup/memory"), Some("rw,memory".into())));
        assert_eq!(m[1], (PathBuf::from("/sys/fs/cgroup/unified"), None));
    }
}
