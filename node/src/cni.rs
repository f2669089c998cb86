//! Running the node's CNI chain as a container runtime does (CNI spec 1.x): the first
//! `*.conflist` of the config dir by name, each plugin exec'd from the bin dir with the `CNI_*`
//! variables and its network config on stdin (`name`, `cniVersion`, and `prevResult` from the
//! previous plugin on ADD, from the cached ADD result on DEL). DEL runs the chain in reverse.
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// How long one plugin may run.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no *.conflist in {dir}: install the CNI config (e.g. weir-cni's conflist) there")]
    NoConfig { dir: PathBuf },
    #[error("reading CNI config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI config {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("CNI plugin {plugin} ({command}) failed: {message}")]
    Plugin { plugin: String, command: String, message: String },
}

/// A loaded network configuration list.
#[derive(Debug, Clone)]
pub struct NetworkList {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub plugins: Vec<Value>,
}

/// Reads the first `*.conflist` of `dir` in name order.
pub fn load(dir: &Path) -> Result<NetworkList, CniError> {
    let entries =
        std::fs::read_dir(dir).map_err(|source| CniError::Read { path: dir.into(), source })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    files.sort();
    let path = files.into_iter().next().ok_or_else(|| CniError::NoConfig { dir: dir.into() })?;
    let text = std::fs::read_to_string(&path)
        .map_err(|source| CniError::Read { path: path.clone(), source })?;
    parse(&path, &text)
}

fn parse(path: &Path, text: &str) -> Result<NetworkList, CniError> {
    let invalid = |reason: &str| CniError::Invalid { path: path.into(), reason: reason.into() };
    let value: Value = serde_json::from_str(text).map_err(|e| invalid(&e.to_string()))?;
    let name = value["name"].as_str().ok_or_else(|| invalid("no \"name\""))?.to_string();
    let version =
        value["cniVersion"].as_str().ok_or_else(|| invalid("no \"cniVersion\""))?.to_string();
    let plugins = value["plugins"].as_array().cloned().unwrap_or_default();
    if plugins.is_empty() || plugins.iter().any(|p| p["type"].as_str().is_none()) {
        return Err(invalid("\"plugins\" must be a non-empty list of objects with a \"type\""));
    }
    Ok(NetworkList { path: path.into(), name, version, plugins })
}

/// One attachment's parameters.
pub struct Attachment<'a> {
    pub container_id: &'a str,
    pub netns: &'a Path,
    pub ifname: &'a str,
    pub args: &'a str,
}

/// Runs ADD through the chain; returns the final result.
pub async fn add(
    list: &NetworkList,
    bin_dir: &Path,
    att: &Attachment<'_>,
) -> Result<Value, CniError> {
    let mut prev: Option<Value> = None;
    for plugin in &list.plugins {
        let out = exec(list, bin_dir, plugin, "ADD", att, prev.as_ref()).await?;
        prev = Some(out);
    }
    Ok(prev.unwrap_or_else(|| json!({})))
}

/// Runs DEL through the chain in reverse; every plugin runs, the first error is returned.
pub async fn del(
    list: &NetworkList,
    bin_dir: &Path,
    att: &Attachment<'_>,
    cached: Option<&Value>,
) -> Result<(), CniError> {
    let mut first_error = None;
    for plugin in list.plugins.iter().rev() {
        if let Err(err) = exec(list, bin_dir, plugin, "DEL", att, cached).await {
            first_error.get_or_insert(err);
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn exec(
    list: &NetworkList,
    bin_dir: &Path,
    plugin: &Value,
    command: &str,
    att: &Attachment<'_>,
    prev: Option<&Value>,
) -> Result<Value, CniError> {
    let kind = plugin["type"].as_str().unwrap_or_default().to_string();
    let fail = |message: String| CniError::Plugin {
        plugin: kind.clone(),
        command: command.into(),
        message,
    };
    if kind.contains('/') {
        return Err(fail("a plugin type must be a file name in the CNI bin dir".into()));
    }
    let mut config = plugin.clone();
    config["name"] = json!(list.name);
    config["cniVersion"] = json!(list.version);
    if let Some(prev) = prev {
        config["prevResult"] = prev.clone();
    }
    let binary = bin_dir.join(&kind);
    let mut child = tokio::process::Command::new(&binary)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", att.container_id)
        .env("CNI_NETNS", att.netns)
        .env("CNI_IFNAME", att.ifname)
        .env("CNI_ARGS", att.args)
        .env("CNI_PATH", bin_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot run {}: {e}", binary.display())))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = config.to_string();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(input.as_bytes()).await;
    });
    let out = tokio::time::timeout(PLUGIN_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| fail(format!("no answer within {PLUGIN_TIMEOUT:?}")))?
        .map_err(|e| fail(e.to_string()))?;
    let _ = writer.await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let message = serde_json::from_str::<Value>(&stdout)
            .ok()
            .and_then(|v| {
                let msg = v["msg"].as_str()?.to_string();
                Some(match v["details"].as_str() {
                    Some(d) if !d.is_empty() => format!("{msg} ({d}) [code {}]", v["code"]),
                    _ => format!("{msg} [code {}]", v["code"]),
                })
            })
            .unwrap_or_else(|| {
                format!("{} {}{}", out.status, stdout.trim(), String::from_utf8_lossy(&out.stderr))
            });
        return Err(fail(message));
    }
    if command != "ADD" {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout).map_err(|e| fail(format!("result is not JSON ({e}): {stdout}")))
}

/// The first IPv4 address (else the first address) of a CNI result, without its prefix, and
/// all addresses.
pub fn result_ips(result: &Value) -> Vec<String> {
    let mut ips: Vec<String> = result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip["address"].as_str())
                .map(|a| a.split('/').next().unwrap_or(a).to_string())
                .collect()
        })
        .unwrap_or_default();
    ips.sort_by_key(|ip| ip.contains(':'));
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_conflists() {
        let p = Path::new("x.conflist");
        let list = parse(p, r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"weir-cni"}]}"#)
            .unwrap();
        assert_eq!((list.name.as_str(), list.version.as_str()), ("n", "1.0.0"));
        assert!(parse(p, r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#).is_err());
        assert!(parse(p, r#"{"name":"n","plugins":[{"type":"a"}]}"#).is_err());
        assert!(parse(p, "nope").is_err());
    }

    #[test]
    fn ips_v4_first() {
        let r = json!({"ips":[{"address":"fd00::5/128"},{"address":"10.0.0.5/32"}]});
        assert_eq!(result_ips(&r), vec!["10.0.0.5", "fd00::5"]);
    }
}
