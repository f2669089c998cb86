//! CNI spec versions and the result format of each.
//!
//! Contract: the plugin speaks 0.3.0, 0.3.1, 0.4.0, 1.0.0 and 1.1.0. Results are built in one
//! internal shape ([`CniResult`], the 1.x one) and converted per version on output: before
//! 1.0.0 every IP carries `"version": "4"|"6"`; route fields added in 1.1.0 (`mtu`, `advmss`,
//! `priority`, `table`, `scope`) are dropped for older versions. Results of any supported
//! version (a `prevResult`, a delegated IPAM plugin's answer) parse into the same shape.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::CniError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

/// Every version this plugin accepts, oldest first.
pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const NEWEST: &str = "1.1.0";

impl Version {
    pub fn parse(text: &str) -> Result<Self, CniError> {
        Ok(match text {
            "0.3.0" => Self::V0_3_0,
            "0.3.1" => Self::V0_3_1,
            "0.4.0" => Self::V0_4_0,
            "1.0.0" => Self::V1_0_0,
            "1.1.0" => Self::V1_1_0,
            "" => {
                return Err(CniError::IncompatibleVersion {
                    msg: format!(
                        "the network config has no cniVersion; set one of {}",
                        SUPPORTED.join(", ")
                    ),
                });
            }
            other => {
                return Err(CniError::IncompatibleVersion {
                    msg: format!(
                        "cniVersion {other:?} is not supported; weir-cni supports {}",
                        SUPPORTED.join(", ")
                    ),
                });
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        SUPPORTED[self as usize]
    }

    /// CHECK exists since 0.4.0.
    pub fn has_check(self) -> bool {
        self >= Self::V0_4_0
    }

    /// STATUS and GC exist since 1.1.0.
    pub fn has_status_and_gc(self) -> bool {
        self >= Self::V1_1_0
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

/// An address in `ip/prefix` form with its gateway and the index of its interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

impl IpConfig {
    /// The address without its prefix length.
    pub fn ip(&self) -> Option<IpAddr> {
        self.address.split('/').next()?.parse().ok()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// 1.1.0 fields (mtu, advmss, priority, table, scope), kept as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The result of ADD in the 1.x shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CniResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub dns: Value,
}

impl CniResult {
    /// Parses a result of any supported version (`prevResult`, a delegate's answer).
    pub fn parse(value: &Value) -> Result<Self, CniError> {
        serde_json::from_value(value.clone())
            .map_err(|err| CniError::Decode { msg: format!("cannot decode the CNI result: {err}") })
    }

    /// The result as `version` defines it.
    pub fn to_json(&self, version: Version) -> Value {
        let mut value = serde_json::to_value(self).expect("a CniResult always serialises");
        value["cniVersion"] = version.as_str().into();
        if version < Version::V1_0_0 {
            for ip in value["ips"].as_array_mut().into_iter().flatten() {
                let v6 = ip["address"].as_str().unwrap_or_default().contains(':');
                ip["version"] = if v6 { "6" } else { "4" }.into();
            }
        }
        if version < Version::V1_1_0 {
            for route in value["routes"].as_array_mut().into_iter().flatten() {
                if let Some(route) = route.as_object_mut() {
                    route.retain(|k, _| k == "dst" || k == "gw");
                }
            }
        }
        if value["dns"].is_null() {
            value["dns"] = Value::Object(Map::new());
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn versions_parse_order_and_gate_commands() {
        for text in SUPPORTED {
            assert_eq!(Version::parse(text).unwrap().as_str(), text);
        }
        assert_eq!(Version::parse("0.2.0").unwrap_err().code(), 1);
        assert_eq!(Version::parse("").unwrap_err().code(), 1);
        assert_eq!(Version::parse("1.2.0").unwrap_err().code(), 1);
        assert!(!Version::V0_3_1.has_check());
        assert!(Version::V0_4_0.has_check());
        assert!(!Version::V1_0_0.has_status_and_gc());
        assert!(Version::V1_1_0.has_status_and_gc());
    }

    fn sample() -> CniResult {
        CniResult::parse(&json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "weirabc", "mac": "ee:ee:ee:ee:ee:ee"},
                           {"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/x"}],
            "ips": [{"address": "10.1.0.2/32", "gateway": "169.254.1.1", "interface": 1},
                    {"address": "fd00::2/128", "gateway": "fe80::1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1", "mtu": 1400}]
        }))
        .unwrap()
    }

    #[test]
    fn old_versions_get_ip_versions_and_lose_new_route_fields() {
        let out = sample().to_json(Version::V0_3_1);
        assert_eq!(out["cniVersion"], "0.3.1");
        assert_eq!(out["ips"][0]["version"], "4");
        assert_eq!(out["ips"][1]["version"], "6");
        assert!(out["routes"][0].get("mtu").is_none());
        assert_eq!(out["dns"], json!({}));
    }

    #[test]
    fn new_versions_have_no_ip_version_and_keep_route_fields() {
        let out = sample().to_json(Version::V1_1_0);
        assert!(out["ips"][0].get("version").is_none());
        assert_eq!(out["routes"][0]["mtu"], 1400);
        let out = sample().to_json(Version::V1_0_0);
        assert!(out["routes"][0].get("mtu").is_none());
    }

    #[test]
    fn old_results_parse_into_the_same_shape() {
        let old =
            json!({"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.0.0.5/24"}]});
        let parsed = CniResult::parse(&old).unwrap();
        assert_eq!(parsed.ips[0].ip(), Some("10.0.0.5".parse().unwrap()));
        assert!(CniResult::parse(&json!({"ips": 5})).is_err());
    }
}
