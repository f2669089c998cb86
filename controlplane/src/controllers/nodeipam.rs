//! Node pod-CIDR allocation (pure): each Node without `spec.podCIDR` gets the first free
//! subnet of the cluster CIDR (IPv4, /24 per node by default), and `spec.podCIDRs` with it.
use std::net::Ipv4Addr;

/// The IPv4 cluster CIDR split into per-node subnets.
#[derive(Clone, Copy, Debug)]
pub struct ClusterCidr {
    base: u32,
    prefix: u8,
    node_prefix: u8,
}

impl ClusterCidr {
    pub fn parse(cidr: &str, node_prefix: u8) -> Option<ClusterCidr> {
        let (addr, prefix) = cidr.split_once('/')?;
        let addr: Ipv4Addr = addr.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        if prefix > node_prefix || node_prefix > 30 {
            return None;
        }
        Some(ClusterCidr {
            base: u32::from(addr) & (u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)),
            prefix,
            node_prefix,
        })
    }

    /// The first subnet not in `used` (strings as in spec.podCIDR).
    pub fn allocate(&self, used: &[String]) -> Option<String> {
        let count = 1u32 << (self.node_prefix - self.prefix);
        let step = 1u32 << (32 - self.node_prefix);
        (0..count)
            .map(|i| format!("{}/{}", Ipv4Addr::from(self.base + i * step), self.node_prefix))
            .find(|cidr| !used.contains(cidr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_handed_out_in_order_skipping_used_ones() {
        let cidr = ClusterCidr::parse("10.244.0.0/16", 24).unwrap();
        assert_eq!(cidr.allocate(&[]).as_deref(), Some("10.244.0.0/24"));
        let used = vec!["10.244.0.0/24".to_string(), "10.244.2.0/24".to_string()];
        assert_eq!(cidr.allocate(&used).as_deref(), Some("10.244.1.0/24"));
        let tiny = ClusterCidr::parse("10.0.0.0/23", 24).unwrap();
        assert_eq!(tiny.allocate(&["10.0.0.0/24".into(), "10.0.1.0/24".into()]), None);
        assert!(ClusterCidr::parse("10.0.0.0/25", 24).is_none());
    }
}
