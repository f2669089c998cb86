//! Delegation to another IPAM plugin (`ipam.type`), as the spec describes: the plugin is found
//! in `CNI_PATH`, exec'd with the same environment (only `CNI_COMMAND` set to the delegated
//! command) and the same network config on stdin. Its result or error is passed through.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;

use crate::error::CniError;

pub fn find(plugin: &str, cni_path: &[PathBuf]) -> Result<PathBuf, CniError> {
    cni_path.iter().map(|dir| dir.join(plugin)).find(|p| p.is_file()).ok_or_else(|| CniError::InvalidEnv {
        msg: format!(
            "the IPAM plugin {plugin:?} (ipam.type) is not in CNI_PATH ({}); install it or fix CNI_PATH",
            cni_path.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":")
        ),
    })
}

/// Runs `plugin` with `command`; returns its parsed stdout (None when it printed nothing).
pub fn exec(binary: &Path, command: &str, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let name = binary.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut child = Command::new(binary)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| CniError::io(format!("starting the IPAM plugin {}", binary.display()), e))?;
    if let Some(mut input) = child.stdin.take() {
        // A plugin that exits without reading stdin is judged by its exit status below.
        let _ = input.write_all(stdin);
    }
    let out = child.wait_with_output().map_err(|e| {
        CniError::io(format!("waiting for the IPAM plugin {}", binary.display()), e)
    })?;
    let parsed: Option<Value> = if out.stdout.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        serde_json::from_slice(&out.stdout).ok()
    };
    if out.status.success() {
        return Ok(parsed);
    }
    match parsed {
        Some(err) if err.get("code").is_some() => Err(CniError::Delegate {
            plugin: name,
            code: err["code"].as_u64().unwrap_or(999) as u32,
            msg: err["msg"].as_str().unwrap_or_default().to_string(),
            details: err["details"].as_str().unwrap_or_default().to_string(),
        }),
        _ => Err(CniError::Delegate {
            plugin: name,
            code: 999,
            msg: format!("{command} failed ({}) without an error object", out.status),
            details: String::from_utf8_lossy(&out.stdout).into_owned(),
        }),
    }
}
