//! The plugin's inputs: the network configuration on stdin and the `CNI_*` environment.
//! Parsing and validation are pure (no I/O) and happen before anything is touched.
//!
//! Contract (codes are the spec's, see docs/cni.md):
//! - stdin that is not a JSON object: 6. A field of the wrong type or an invalid value: 7.
//!   A missing or unknown `cniVersion`: 1. A field weir-cni does not implement (static IPs via
//!   `runtimeConfig.ips`): 2.
//! - `CNI_COMMAND` missing or unknown, `CNI_CONTAINERID`/`CNI_IFNAME`/`CNI_NETNS` missing or
//!   invalid where the command needs them: 4.
//! - `ipam` absent or with `"type": "weir"` selects the built-in IPAM; any other `type` names a
//!   plugin to delegate to (found in `CNI_PATH`).
use std::{net::IpAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::{
    error::CniError,
    ipam::{
        allocator::{Range, RangeSet},
        net::IpNet,
    },
    version::Version,
};

/// Biggest network configuration accepted on stdin.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/weir";
pub const DEFAULT_NODE_STATE_FILE: &str = "/run/weir/node-state.json";
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/weir";
/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub cni_path: Vec<PathBuf>,
}

/// Reads and validates the environment through `get` (std::env::var in the binary).
pub fn parse_env(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
    let invalid = |msg: String| CniError::InvalidEnv { msg };
    let command = match get("CNI_COMMAND").as_deref() {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("VERSION") => Command::Version,
        Some("STATUS") => Command::Status,
        Some("GC") => Command::Gc,
        None | Some("") => {
            return Err(invalid(
                "CNI_COMMAND is not set; set it to ADD, DEL, CHECK, VERSION, STATUS or GC".into(),
            ));
        }
        Some(other) => {
            return Err(invalid(format!(
                "CNI_COMMAND {other:?} is unknown; use ADD, DEL, CHECK, VERSION, STATUS or GC"
            )));
        }
    };
    let cni_path = get("CNI_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect();
    let per_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
    let mut env =
        Env { command, container_id: String::new(), netns: None, ifname: String::new(), cni_path };
    if !per_attachment {
        return Ok(env);
    }
    env.container_id = get("CNI_CONTAINERID").unwrap_or_default();
    validate_container_id(&env.container_id).map_err(invalid)?;
    env.ifname = get("CNI_IFNAME").unwrap_or_default();
    validate_ifname(&env.ifname).map_err(invalid)?;
    env.netns = get("CNI_NETNS").filter(|n| !n.is_empty()).map(PathBuf::from);
    if env.netns.is_none() && command != Command::Del {
        return Err(invalid(
            "CNI_NETNS is not set; it must name the container's network namespace".into(),
        ));
    }
    Ok(env)
}

/// The spec's rule for container IDs and network names: non-empty, a letter or digit first,
/// then letters, digits, `_`, `.` and `-`.
fn is_plain_name(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

pub fn validate_container_id(id: &str) -> Result<(), String> {
    if is_plain_name(id) {
        Ok(())
    } else {
        Err(format!(
            "CNI_CONTAINERID {id:?} is invalid: it must be non-empty, start with a letter or digit \
             and contain only letters, digits, '_', '.' and '-'"
        ))
    }
}

pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("CNI_IFNAME is not set; set the interface name to create, e.g. eth0".into());
    }
    if name.len() > MAX_IFNAME {
        return Err(format!(
            "CNI_IFNAME {name:?} is {} bytes long; interface names have at most {MAX_IFNAME}",
            name.len()
        ));
    }
    if name == "."
        || name == ".."
        || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!("CNI_IFNAME {name:?} is not a valid interface name"));
    }
    Ok(())
}

/// One `{containerID, ifname}` of GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    #[serde(default)]
    cni_version: String,
    #[serde(default)]
    name: String,
    mtu: Option<u32>,
    ipam: Option<Map<String, Value>>,
    dns: Option<Value>,
    prev_result: Option<Value>,
    #[serde(default)]
    runtime_config: Map<String, Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
    bpffs_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRange {
    subnet: String,
    range_start: Option<IpAddr>,
    range_end: Option<IpAddr>,
    gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBuiltinIpam {
    #[serde(default)]
    ranges: Vec<Vec<RawRange>>,
    node_state_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    lock_timeout_seconds: Option<f64>,
}

/// Where addresses come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Ipam {
    /// weir's allocator. `ranges` empty means "read the pod CIDRs from `node_state_file`".
    Builtin {
        ranges: Vec<RangeSet>,
        node_state_file: PathBuf,
        data_dir: PathBuf,
        /// How long to wait for the store's lock before answering 11.
        lock_timeout: Duration,
    },
    /// Another IPAM plugin, exec'd from `CNI_PATH`.
    Delegate { plugin: String },
}

/// A validated network configuration.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub version: Version,
    pub name: String,
    pub mtu: Option<u32>,
    pub ipam: Ipam,
    pub dns: Option<Value>,
    pub prev_result: Option<Value>,
    pub valid_attachments: Option<Vec<Attachment>>,
    pub bpffs_dir: PathBuf,
    /// The bytes as received, passed unchanged to a delegated IPAM plugin.
    pub raw: Vec<u8>,
}

/// Just the `cniVersion` of a config, for answering errors in the caller's version.
pub fn peek_version(bytes: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(bytes).ok()?;
    Some(value.get("cniVersion")?.as_str()?.to_string())
}

pub fn parse_conf(bytes: &[u8]) -> Result<NetConf, CniError> {
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(CniError::Decode {
            msg: format!(
                "the network config on stdin is {} bytes; weir-cni accepts at most {MAX_CONFIG_BYTES}",
                bytes.len()
            ),
        });
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| CniError::Decode {
        msg: format!("the network config on stdin is not valid JSON: {e}"),
    })?;
    if !value.is_object() {
        return Err(CniError::Decode {
            msg: "the network config on stdin must be a JSON object".into(),
        });
    }
    let invalid = |msg: String| CniError::InvalidConfig { msg };
    let raw: RawConf = serde_json::from_value(value)
        .map_err(|e| invalid(format!("invalid network config: {e}")))?;
    let version = Version::parse(&raw.cni_version)?;
    validate_network_name(&raw.name).map_err(invalid)?;
    if let Some(mtu) = raw.mtu.filter(|m| !(68..=65535).contains(m)) {
        return Err(invalid(format!("mtu {mtu} is out of range; use 68 to 65535 or leave it out")));
    }
    if raw.runtime_config.get("ips").and_then(Value::as_array).is_some_and(|ips| !ips.is_empty()) {
        return Err(CniError::UnsupportedField {
            msg: format!(
                "runtimeConfig.ips = {}: static IP requests are not supported by weir-cni; remove the \
                 \"ips\" capability",
                raw.runtime_config["ips"]
            ),
        });
    }
    let ipam = parse_ipam(raw.ipam.as_ref())?;
    Ok(NetConf {
        version,
        name: raw.name,
        mtu: raw.mtu,
        ipam,
        dns: raw.dns,
        prev_result: raw.prev_result,
        valid_attachments: raw.valid_attachments,
        bpffs_dir: raw.bpffs_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_DIR)),
        raw: bytes.to_vec(),
    })
}

fn validate_network_name(name: &str) -> Result<(), String> {
    if is_plain_name(name) {
        Ok(())
    } else {
        Err(format!(
            "network name {name:?} is invalid: set \"name\" to letters, digits, '_', '.', '-' \
             (starting with a letter or digit)"
        ))
    }
}

fn parse_ipam(ipam: Option<&Map<String, Value>>) -> Result<Ipam, CniError> {
    let invalid = |msg: String| CniError::InvalidConfig { msg };
    let empty = Map::new();
    let ipam = ipam.unwrap_or(&empty);
    match ipam.get("type") {
        None => {}
        Some(Value::String(t)) if t == "weir" => {}
        Some(Value::String(t)) if !t.is_empty() && !t.contains('/') => {
            return Ok(Ipam::Delegate { plugin: t.clone() });
        }
        Some(other) => return Err(invalid(format!("ipam.type {other} is not a plugin name"))),
    }
    let raw: RawBuiltinIpam = serde_json::from_value(Value::Object(ipam.clone()))
        .map_err(|e| invalid(format!("invalid ipam section: {e}")))?;
    let mut sets = Vec::new();
    for (index, raw_set) in raw.ranges.iter().enumerate() {
        if raw_set.is_empty() {
            return Err(invalid(format!(
                "ipam.ranges[{index}] is empty; give it at least one subnet"
            )));
        }
        let mut set = Vec::new();
        for raw_range in raw_set {
            let subnet: IpNet =
                raw_range.subnet.parse().map_err(|e| invalid(format!("ipam.ranges: {e}")))?;
            let range = Range {
                subnet: subnet.network(),
                start: raw_range.range_start,
                end: raw_range.range_end,
                gateway: raw_range.gateway,
            };
            for (what, ip) in [("rangeStart", range.start), ("rangeEnd", range.end)] {
                if let Some(ip) = ip.filter(|ip| !subnet.contains(*ip)) {
                    return Err(invalid(format!("ipam.ranges: {what} {ip} is outside {subnet}")));
                }
            }
            if range.capacity() == 0 {
                return Err(invalid(format!("ipam.ranges: {subnet} has no usable address")));
            }
            set.push(range);
        }
        if set.iter().any(|r| r.subnet.is_v4() != set[0].subnet.is_v4()) {
            return Err(invalid(format!(
                "ipam.ranges[{index}] mixes IPv4 and IPv6; use one set per family"
            )));
        }
        sets.push(set);
    }
    if sets.len() > 2 || (sets.len() == 2 && sets[0][0].subnet.is_v4() == sets[1][0].subnet.is_v4())
    {
        return Err(invalid("ipam.ranges: give at most one range set per address family".into()));
    }
    let lock_timeout = match raw.lock_timeout_seconds {
        None => crate::ipam::store::DEFAULT_LOCK_TIMEOUT,
        Some(s) if s > 0.0 && s <= 3600.0 => Duration::from_secs_f64(s),
        Some(s) => {
            return Err(invalid(format!("ipam.lockTimeoutSeconds {s} is out of range (0, 3600]")));
        }
    };
    Ok(Ipam::Builtin {
        lock_timeout,
        ranges: sets,
        node_state_file: raw
            .node_state_file
            .unwrap_or_else(|| PathBuf::from(DEFAULT_NODE_STATE_FILE)),
        data_dir: raw.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        parse_env(|k| map.get(k).cloned())
    }

    #[test]
    fn environment_is_validated_per_command() {
        let ok = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc-1.2_3"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ])
        .unwrap();
        assert_eq!(ok.command, Command::Add);
        assert_eq!(ok.cni_path.len(), 2);
        assert_eq!(env(&[]).unwrap_err().code(), 4);
        assert_eq!(env(&[("CNI_COMMAND", "FROB")]).unwrap_err().code(), 4);
        assert_eq!(env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")]).unwrap_err().code(), 4);
        let long = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "sixteen-bytes-xx"),
        ]);
        assert!(long.unwrap_err().to_string().contains("16 bytes"));
        let bad_id =
            env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "-x"), ("CNI_IFNAME", "eth0")]);
        assert_eq!(bad_id.unwrap_err().code(), 4);
        // DEL may come without a netns; VERSION needs nothing.
        assert!(
            env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0")])
                .is_ok()
        );
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
        assert!(validate_ifname("a/b").is_err() && validate_ifname("..").is_err());
    }

    #[test]
    fn configs_are_validated_with_the_right_codes() {
        let conf = parse_conf(
            br#"{"cniVersion":"1.0.0","name":"pods","type":"weir-cni","mtu":1400,
                "ipam":{"ranges":[[{"subnet":"10.9.0.0/24"}],[{"subnet":"fd00:9::/120"}]],"dataDir":"/tmp/x"}}"#,
        )
        .unwrap();
        assert_eq!(conf.version, Version::V1_0_0);
        let Ipam::Builtin { ranges, data_dir, .. } = &conf.ipam else { panic!("builtin expected") };
        assert_eq!(ranges.len(), 2);
        assert_eq!(data_dir, &PathBuf::from("/tmp/x"));
        let code = |text: &str| parse_conf(text.as_bytes()).unwrap_err().code();
        assert_eq!(code("{broken"), 6);
        assert_eq!(code("[1,2]"), 6);
        assert_eq!(code(r#"{"cniVersion":"9.9.9","name":"n"}"#), 1);
        assert_eq!(code(r#"{"name":"n"}"#), 1);
        assert_eq!(code(r#"{"cniVersion":"1.0.0","name":""}"#), 7);
        assert_eq!(code(r#"{"cniVersion":"1.0.0","name":"n","mtu":"big"}"#), 7);
        assert_eq!(code(r#"{"cniVersion":"1.0.0","name":"n","mtu":10}"#), 7);
        assert_eq!(
            code(
                r#"{"cniVersion":"1.0.0","name":"n","ipam":{"ranges":[[{"subnet":"10.0.0.0/40"}]]}}"#
            ),
            7
        );
        assert_eq!(
            code(
                r#"{"cniVersion":"1.0.0","name":"n","ipam":{"ranges":[[{"subnet":"10.0.0.0/24"},{"subnet":"fd00::/64"}]]}}"#
            ),
            7
        );
        assert_eq!(
            code(
                r#"{"cniVersion":"1.0.0","name":"n","ipam":{"ranges":[[{"subnet":"10.0.0.0/24","rangeStart":"10.1.0.1"}]]}}"#
            ),
            7
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","runtimeConfig":{"ips":["10.0.0.5/24"]}}"#),
            2
        );
        assert_eq!(code(&" ".repeat(MAX_CONFIG_BYTES + 1)), 6);
        assert_eq!(code(r#"{"cniVersion":"1.0.0","name":"n","ipam":{"lockTimeoutSeconds":0}}"#), 7);
        let delegated =
            parse_conf(br#"{"cniVersion":"0.4.0","name":"n","ipam":{"type":"host-local"}}"#)
                .unwrap();
        assert_eq!(delegated.ipam, Ipam::Delegate { plugin: "host-local".into() });
        let from_node = parse_conf(br#"{"cniVersion":"0.3.1","name":"n"}"#).unwrap();
        assert!(matches!(from_node.ipam, Ipam::Builtin { ref ranges, .. } if ranges.is_empty()));
    }
}
