//! Node pod-CIDR allocation (pure), as kube-controller-manager's nodeipam with
//! `--cluster-cidr` and `--node-cidr-mask-size-ipv4/-ipv6`: the cluster CIDR is one CIDR or a
//! dual-stack pair (one IPv4, one IPv6, in either order); each Node without `spec.podCIDR` gets
//! the first free subnet of each (IPv4 /24 and IPv6 /64 by default), `spec.podCIDRs` lists
//! them in the order of the flag and `spec.podCIDR` is the first.
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde_json::Value;

/// Default per-node mask sizes (kube-controller-manager's).
pub const DEFAULT_NODE_MASK_IPV4: u8 = 24;
pub const DEFAULT_NODE_MASK_IPV6: u8 = 64;
/// At most 2^16 node subnets per cluster CIDR (kube's limit on the mask difference).
const MAX_MASK_DIFFERENCE: u8 = 16;

/// One cluster CIDR split into per-node subnets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterCidr {
    v6: bool,
    base: u128,
    prefix: u8,
    node_prefix: u8,
}

impl ClusterCidr {
    fn width(&self) -> u8 {
        if self.v6 { 128 } else { 32 }
    }

    fn subnet(&self, index: u128) -> String {
        let address = self.base + (index << (self.width() - self.node_prefix));
        let ip = if self.v6 {
            IpAddr::V6(Ipv6Addr::from(address))
        } else {
            IpAddr::V4(Ipv4Addr::from(address as u32))
        };
        format!("{ip}/{}", self.node_prefix)
    }

    fn count(&self) -> u128 {
        1u128 << (self.node_prefix - self.prefix)
    }

    /// The first subnet not in `used`.
    fn allocate(&self, used: &HashSet<&str>) -> Option<String> {
        (0..self.count()).map(|i| self.subnet(i)).find(|s| !used.contains(s.as_str()))
    }
}

/// The cluster CIDR(s): one family, or one of each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterCidrs(Vec<ClusterCidr>);

impl ClusterCidrs {
    /// Parses `--cluster-cidr` ("CIDR" or "CIDR,CIDR") with the per-node mask sizes; the error
    /// says what is wrong.
    pub fn parse(flag: &str, mask_v4: u8, mask_v6: u8) -> Result<ClusterCidrs, String> {
        let parts: Vec<&str> = flag.split(',').map(str::trim).collect();
        if parts.len() > 2 {
            return Err(format!(
                "{flag:?} has {} CIDRs; give one, or an IPv4,IPv6 pair for dual-stack",
                parts.len()
            ));
        }
        let mut cidrs = Vec::new();
        for part in &parts {
            let (addr, prefix) = part
                .split_once('/')
                .ok_or_else(|| format!("{part:?} is not a CIDR (ADDRESS/PREFIX)"))?;
            let addr: IpAddr =
                addr.parse().map_err(|_| format!("{part:?}: {addr:?} is not an IP address"))?;
            let width: u8 = if addr.is_ipv6() { 128 } else { 32 };
            let prefix: u8 = prefix
                .parse()
                .ok()
                .filter(|p| *p <= width)
                .ok_or_else(|| format!("{part:?}: the prefix must be 0 to {width}"))?;
            let (node_prefix, flag_name, max_node) = if addr.is_ipv6() {
                (mask_v6, "--node-cidr-mask-size-ipv6", 126)
            } else {
                (mask_v4, "--node-cidr-mask-size-ipv4", 30)
            };
            if node_prefix < prefix || node_prefix > max_node {
                return Err(format!(
                    "{flag_name} {node_prefix} does not fit {part:?}: it must be between /{prefix} \
                     and /{max_node}"
                ));
            }
            if node_prefix - prefix > MAX_MASK_DIFFERENCE {
                return Err(format!(
                    "{part:?} split into /{node_prefix} per node makes more than 2^{MAX_MASK_DIFFERENCE} \
                     node subnets; use a longer cluster prefix or a shorter {flag_name}"
                ));
            }
            let bits = match addr {
                IpAddr::V4(a) => u128::from(u32::from(a)),
                IpAddr::V6(a) => u128::from(a),
            };
            let host_bits = u32::from(width - prefix);
            let base = if host_bits >= 128 { 0 } else { bits >> host_bits << host_bits };
            cidrs.push(ClusterCidr { v6: addr.is_ipv6(), base, prefix, node_prefix });
        }
        if let [a, b] = cidrs.as_slice()
            && a.v6 == b.v6
        {
            return Err(format!(
                "{flag:?} names two {} CIDRs; a dual-stack pair is one IPv4 and one IPv6 CIDR",
                if a.v6 { "IPv6" } else { "IPv4" }
            ));
        }
        Ok(ClusterCidrs(cidrs))
    }

    /// One subnet per cluster CIDR (in the flag's order) not in `used` (strings as in
    /// spec.podCIDRs); None when one of them is full.
    pub fn allocate(&self, used: &[String]) -> Option<Vec<String>> {
        let used: HashSet<&str> = used.iter().map(String::as_str).collect();
        self.0.iter().map(|cidr| cidr.allocate(&used)).collect()
    }
}

/// The pod CIDRs a Node holds (`spec.podCIDRs`, and `spec.podCIDR`).
pub fn pod_cidrs_of(node: &Value) -> Vec<String> {
    let mut cidrs: Vec<String> = node
        .pointer("/spec/podCIDRs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str().map(String::from))
        .collect();
    if let Some(first) = node.pointer("/spec/podCIDR").and_then(Value::as_str)
        && !cidrs.iter().any(|c| c == first)
    {
        cidrs.push(first.to_string());
    }
    cidrs
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(flag: &str) -> Result<ClusterCidrs, String> {
        ClusterCidrs::parse(flag, DEFAULT_NODE_MASK_IPV4, DEFAULT_NODE_MASK_IPV6)
    }

    #[test]
    fn subnets_are_handed_out_in_order_skipping_used_ones() {
        let cidr = parse("10.244.0.0/16").unwrap();
        assert_eq!(cidr.allocate(&[]), Some(vec!["10.244.0.0/24".to_string()]));
        let used = vec!["10.244.0.0/24".to_string(), "10.244.2.0/24".to_string()];
        assert_eq!(cidr.allocate(&used), Some(vec!["10.244.1.0/24".to_string()]));
        let tiny = parse("10.0.0.0/23").unwrap();
        assert_eq!(tiny.allocate(&["10.0.0.0/24".into(), "10.0.1.0/24".into()]), None);
        assert!(parse("10.0.0.0/25").is_err());
        // Host bits are masked, as net.ParseCIDR does.
        assert_eq!(parse("10.244.1.1/16").unwrap(), cidr);
    }

    #[test]
    fn dual_stack_nodes_get_one_subnet_per_family_in_the_flags_order() {
        let cidrs = parse("10.244.0.0/16,fd00:10:244::/56").unwrap();
        let first = cidrs.allocate(&[]).unwrap();
        assert_eq!(first, ["10.244.0.0/24", "fd00:10:244::/64"]);
        let node = json!({"spec": {"podCIDR": first[0], "podCIDRs": first}});
        let second = cidrs.allocate(&pod_cidrs_of(&node)).unwrap();
        assert_eq!(second, ["10.244.1.0/24", "fd00:10:244:1::/64"]);
        let v6_first = parse("fd00:10:244::/56,10.244.0.0/16").unwrap();
        assert_eq!(v6_first.allocate(&[]).unwrap(), ["fd00:10:244::/64", "10.244.0.0/24"]);
        let masks = ClusterCidrs::parse("10.0.0.0/8,fd00::/48", 16, 56).unwrap();
        assert_eq!(masks.allocate(&[]).unwrap(), ["10.0.0.0/16", "fd00::/56"]);
        let v6_only = parse("fd00::/112").unwrap_err();
        assert!(v6_only.contains("--node-cidr-mask-size-ipv6 64"), "{v6_only}");
        assert_eq!(
            ClusterCidrs::parse("fd00::/120", 24, 124).unwrap().allocate(&[]).unwrap(),
            ["fd00::/124"]
        );
    }

    #[test]
    fn bad_flags_say_what_is_wrong() {
        for (flag, says) in [
            ("10.0.0.0/16,10.1.0.0/16", "two IPv4 CIDRs"),
            ("fd00::/56,fd01::/56", "two IPv6 CIDRs"),
            ("10.0.0.0/16,fd00::/56,10.1.0.0/16", "3 CIDRs"),
            ("10.0.0.0", "not a CIDR"),
            ("10.0.0.300/16", "not an IP address"),
            ("10.0.0.0/40", "prefix must be 0 to 32"),
            ("fd00::/32", "more than 2^16"),
            ("", "not a CIDR"),
        ] {
            let err = parse(flag).unwrap_err();
            assert!(err.contains(says), "{flag:?}: {err}");
        }
    }
}
