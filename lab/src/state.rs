//! The record of a running lab, `<state dir>/lab.json`: written before anything is created and
//! updated as daemons start, so a later `down` (or `up`) finds everything even after a crash.
use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::plan::LabSpec;

pub const STATE_FILE: &str = "lab.json";

/// A background process of the lab.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DaemonRecord {
    /// `apiserver`, or `agent`/`node` with the node name.
    pub role: String,
    pub node: Option<String>,
    pub pid: u32,
    pub log: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabState {
    pub spec: LabSpec,
    /// Unix seconds when `up` started.
    pub started: u64,
    /// Set once `up` finished and the lab is ready.
    pub ready: bool,
    /// The API server as seen from the host (`https://127.0.0.1:PORT`).
    pub apiserver: Option<String>,
    pub daemons: Vec<DaemonRecord>,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATE_FILE)
}

pub fn load(state_dir: &Path) -> Result<Option<LabState>> {
    let file = path(state_dir);
    match fs::read(&file) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is not a lab state file", file.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("reading {}", file.display())),
    }
}

/// Writes the state atomically (temporary file, then rename).
pub fn save(state_dir: &Path, state: &LabState) -> Result<()> {
    fs::create_dir_all(state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
    let file = path(state_dir);
    let tmp = state_dir.join(format!("{STATE_FILE}.tmp"));
    let mut out = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    out.write_all(&serde_json::to_vec_pretty(state)?)?;
    out.sync_all()?;
    fs::rename(&tmp, &file).with_context(|| format!("writing {}", file.display()))
}
