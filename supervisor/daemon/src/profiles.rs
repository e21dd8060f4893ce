//! The loaded profile set and its atomic replacement.
//!
//! Owns: the current [`ProfileSet`], swapped whole on SIGHUP or
//! `Profiles.Reload`. A reload that fails keeps the old set. A running
//! worker holds the resolved profile it started with, never a reference
//! into this store.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use warden_policy::{PolicyError, ProfileSet};

#[derive(Debug)]
pub struct Profiles {
    dir: PathBuf,
    current: RwLock<Arc<ProfileSet>>,
    /// Counts the reloads (what was prepared under an older set is stale).
    generation: AtomicU64,
}

impl Profiles {
    /// Loads the embedded profiles plus those in `dir` (if it exists).
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        let set = Self::read(dir)?;
        Ok(Profiles {
            dir: dir.to_path_buf(),
            current: RwLock::new(Arc::new(set)),
            generation: AtomicU64::new(0),
        })
    }

    fn read(dir: &Path) -> Result<ProfileSet, PolicyError> {
        if dir.exists() {
            ProfileSet::load_dir(dir)
        } else {
            ProfileSet::embedded()
        }
    }

    pub fn current(&self) -> Arc<ProfileSet> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many reloads have swapped the set.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Re-reads the directory; on success swaps the set and returns its
    /// names, on failure keeps the old set.
    pub fn reload(&self) -> Result<Vec<String>, PolicyError> {
        let set = Self::read(&self.dir)?;
        let names = set.names().map(str::to_string).collect();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(names)
    }
}
