//! The agent's configuration, validated before anything is bound or loaded.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use thiserror::Error;

use crate::{programs::MapSizes, routing::RoutingConfig};

/// kube-proxy's default healthz port.
pub const DEFAULT_HEALTH_LISTEN: &str = "0.0.0.0:10256";
/// kube-proxy's default metrics port.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:10249";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/weir";
/// Default nftables table name (`inet weir`).
pub const DEFAULT_NFT_TABLE: &str = "weir";

/// Which datapath the agent programs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dataplane {
    /// eBPF: socket-level and per-packet load balancing, maps pinned in bpffs.
    #[default]
    Ebpf,
    /// nftables: kube-proxy's nftables-mode ruleset in one table of the agent's network
    /// namespace (the fallback for kernels without the eBPF features).
    Nftables,
}

/// A change still unapplied after this long makes /healthz answer 503 (kube-proxy uses twice
/// its sync period).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the agent rebuilds its model from the watch stores and writes by a full diff,
/// between the per-object syncs (kube-proxy's `--sync-period` plays the same role; a full diff
/// of 100k services costs tens of milliseconds).
pub const FULL_RESYNC_PERIOD: Duration = Duration::from_secs(300);

/// How often the agent counts the entries of its eBPF maps for /metrics
/// (`weir_bpf_map_entries`). Counting walks every key (one system call each), so it runs in
/// the background and a scrape shows the last count.
pub const MAP_OCCUPANCY_PERIOD: Duration = Duration::from_secs(5);

/// After a count, the agent waits at least this many times as long as the count took (maps
/// so full that walking them takes more than a fraction of the period are counted less often,
/// so that counting never uses more than 1/20 of a CPU).
pub const MAP_OCCUPANCY_PAUSE_FACTOR: u32 = 20;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// kubeconfig file; `None` means in-cluster configuration (service account).
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (the Node object; endpoints with this nodeName are local).
    pub node_name: String,
    /// Addresses node ports are served on, in addition to the Node object's addresses.
    pub node_addresses: Vec<IpAddr>,
    /// bpffs directory for the pinned maps; links are pinned in `<pin_dir>/links`.
    pub pin_dir: PathBuf,
    /// cgroup v2 directory the socket-level load balancer is attached to; `None` means the
    /// root of the cgroup2 mount (every process of the node).
    pub cgroup: Option<PathBuf>,
    /// Interfaces traffic from outside the node arrives on (node ports, load-balancer IPs,
    /// external IPs); the per-packet load balancer is attached to each.
    pub uplinks: Vec<String>,
    pub health_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub health_timeout: Duration,
    /// Forward eBPF debug logs to the agent's log (costs cycles per packet).
    pub forward_ebpf_logs: bool,
    /// Node-to-node pod routing, masquerade and the node state file.
    pub routing: RoutingConfig,
    pub dataplane: Dataplane,
    /// nftables table (family inet) of the nftables dataplane.
    pub nft_table: String,
    /// nftables table (family inet) of NetworkPolicy with the nftables dataplane.
    pub nft_policy_table: String,
    /// Delete the nftables tables on a clean shutdown (by default it stays, like kube-proxy's,
    /// so traffic keeps flowing until the next agent adopts it).
    pub nft_remove_on_exit: bool,
    /// NetworkPolicy enforcement.
    pub policy: super::policy::PolicyConfig,
    /// Unix socket `weir flows` subscribes on (eBPF dataplane).
    pub flows_socket: PathBuf,
    /// Capacities of the eBPF service, conntrack and socket maps when the agent creates them
    /// (maps already pinned keep theirs; the agent warns when they differ).
    pub map_sizes: MapSizes,
}

/// The largest map capacity a flag accepts (16M entries; a service map of that size holds
/// about 3M services of 4 endpoints).
pub const MAX_MAP_ENTRIES: u32 = 1 << 24;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--node-name is empty; pass the name of this node's Node object (e.g. $(hostname))")]
    NoNodeName,
    #[error(
        "--node-name {0:?} is not a valid Kubernetes object name (lowercase RFC 1123 subdomain)"
    )]
    BadNodeName(String),
    #[error("--pin-dir {0} must be below /sys/fs/bpf (bpffs)")]
    PinDirNotOnBpffs(PathBuf),
    #[error("--uplink {0:?} is not a valid interface name (1 to 15 bytes, no '/', no spaces)")]
    BadUplink(String),
    #[error("--health-listen and --metrics-listen are both {0}; give them different ports")]
    SameListenAddress(SocketAddr),
    #[error("--masquerade true needs --cluster-cidr (the pod network, e.g. 10.244.0.0/16)")]
    MasqueradeWithoutClusterCidr,
    #[error(
        "--cluster-cidr {0} has two CIDRs of one family; give one, or one IPv4 and one IPv6 \
         (e.g. 10.244.0.0/16,fd00:10:244::/56)"
    )]
    ClusterCidrFamilies(String),
    #[error("--nft-table-nat {0:?} is not a valid table name (1 to 255 bytes of [A-Za-z0-9_-])")]
    BadNatTable(String),
    #[error(
        "--overlay-uplink {0:?} is not a valid interface name (1 to 15 bytes, no '/', no spaces)"
    )]
    BadOverlayUplink(String),
    #[error("--nft-table {0:?} is invalid: use 1 to 64 letters, digits, '-' or '_'")]
    BadNftTable(String),
    #[error("--{flag} {value} is out of range: give 1024 to {MAX_MAP_ENTRIES} entries")]
    BadMapSize { flag: &'static str, value: u32 },
}

impl AgentConfig {
    /// Checks what can be checked without touching the system.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_name.is_empty() {
            return Err(ConfigError::NoNodeName);
        }
        if !is_dns_subdomain(&self.node_name) {
            return Err(ConfigError::BadNodeName(self.node_name.clone()));
        }
        if !self.pin_dir.starts_with("/sys/fs/bpf") {
            return Err(ConfigError::PinDirNotOnBpffs(self.pin_dir.clone()));
        }
        if let Some(bad) = self.uplinks.iter().find(|name| !is_interface_name(name)) {
            return Err(ConfigError::BadUplink(bad.clone()));
        }
        let routing = &self.routing;
        if routing.masquerade && routing.cluster_cidrs.is_empty() {
            return Err(ConfigError::MasqueradeWithoutClusterCidr);
        }
        let cidrs = &routing.cluster_cidrs;
        if cidrs.len() > 2 || (cidrs.len() == 2 && cidrs[0].is_ipv6() == cidrs[1].is_ipv6()) {
            let text: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
            return Err(ConfigError::ClusterCidrFamilies(text.join(",")));
        }
        let table = &routing.nat_table;
        if table.is_empty()
            || table.len() > 255
            || !table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ConfigError::BadNatTable(table.clone()));
        }
        if let Some(uplink) = routing.uplink.as_ref().filter(|name| !is_interface_name(name)) {
            return Err(ConfigError::BadOverlayUplink(uplink.clone()));
        }
        if crate::apply::nft::validate_table_name(&self.nft_table).is_err() {
            return Err(ConfigError::BadNftTable(self.nft_table.clone()));
        }
        if crate::apply::nft::validate_table_name(&self.nft_policy_table).is_err() {
            return Err(ConfigError::BadNftTable(self.nft_policy_table.clone()));
        }
        if self.health_listen == self.metrics_listen && self.health_listen.port() != 0 {
            return Err(ConfigError::SameListenAddress(self.health_listen));
        }
        let sizes = &self.map_sizes;
        for (flag, value) in [
            ("bpf-lb-map-max", sizes.services),
            ("bpf-ct-map-max", sizes.conntrack),
            ("bpf-sock-rev-map-max", sizes.socket_rev_nat),
        ] {
            if !(1024..=MAX_MAP_ENTRIES).contains(&value) {
                return Err(ConfigError::BadMapSize { flag, value });
            }
        }
        Ok(())
    }

    pub fn links_dir(&self) -> PathBuf {
        self.pin_dir.join("links")
    }
}

/// The flag that sizes `map` (a pinned name of [`MapSizes::per_map`]), with its dashes.
pub fn map_size_flag(map: &str) -> Option<&'static str> {
    use weir_common::{conntrack, lb, sock};
    match map {
        lb::SERVICE_MAP
        | lb::SERVICE6_MAP
        | lb::BACKEND_MAP
        | lb::BACKEND6_MAP
        | lb::REV_NAT_MAP
        | lb::REV_NAT6_MAP => Some("--bpf-lb-map-max"),
        conntrack::CT4_MAP | conntrack::CT6_MAP => Some("--bpf-ct-map-max"),
        sock::SOCK_REV4_MAP | sock::SOCK_REV6_MAP => Some("--bpf-sock-rev-map-max"),
        _ => None,
    }
}

fn is_interface_name(name: &str) -> bool {
    !(name.is_empty()
        || name.len() > 15
        || name.contains(['/', ' ', '@'])
        || name == "."
        || name == "..")
}

/// RFC 1123 subdomain, as Kubernetes requires for Node names.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AgentConfig {
        AgentConfig {
            kubeconfig: None,
            node_name: "node-a".into(),
            node_addresses: vec![],
            pin_dir: DEFAULT_PIN_DIR.into(),
            cgroup: None,
            uplinks: vec!["eth0".into()],
            health_listen: DEFAULT_HEALTH_LISTEN.parse().unwrap(),
            metrics_listen: DEFAULT_METRICS_LISTEN.parse().unwrap(),
            health_timeout: DEFAULT_HEALTH_TIMEOUT,
            forward_ebpf_logs: false,
            routing: RoutingConfig::default(),
            dataplane: Dataplane::Ebpf,
            nft_table: DEFAULT_NFT_TABLE.into(),
            nft_policy_table: crate::policy::nft::DEFAULT_TABLE.into(),
            nft_remove_on_exit: false,
            policy: Default::default(),
            flows_socket: crate::policy::flows::DEFAULT_FLOWS_SOCKET.into(),
            map_sizes: MapSizes::default(),
        }
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(config().validate(), Ok(()));
    }

    #[test]
    fn every_sized_map_has_the_flag_that_sizes_it() {
        let sizes =
            MapSizes { services: 1, backends: 1, rev_nat: 1, conntrack: 2, socket_rev_nat: 3 };
        for (map, size) in sizes.per_map() {
            let flag = ["--bpf-lb-map-max", "--bpf-ct-map-max", "--bpf-sock-rev-map-max"]
                [size as usize - 1];
            assert_eq!(map_size_flag(map), Some(flag), "{map}");
        }
        assert_eq!(map_size_flag("weir_pol_ep_v2"), None);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let mut c = config();
        c.node_name = String::new();
        assert_eq!(c.validate(), Err(ConfigError::NoNodeName));
        c.node_name = "Node_A".into();
        assert_eq!(c.validate(), Err(ConfigError::BadNodeName("Node_A".into())));
        let mut c = config();
        c.pin_dir = "/tmp/weir".into();
        assert!(matches!(c.validate(), Err(ConfigError::PinDirNotOnBpffs(_))));
        let mut c = config();
        c.uplinks = vec!["a-name-longer-than-15".into()];
        assert!(matches!(c.validate(), Err(ConfigError::BadUplink(_))));
        let mut c = config();
        c.metrics_listen = c.health_listen;
        assert!(matches!(c.validate(), Err(ConfigError::SameListenAddress(_))));
        let mut c = config();
        c.routing.masquerade = true;
        assert_eq!(c.validate(), Err(ConfigError::MasqueradeWithoutClusterCidr));
        c.routing.cluster_cidrs = vec!["10.244.0.0/16".parse().unwrap()];
        assert_eq!(c.validate(), Ok(()));
        c.routing.cluster_cidrs.push("fd00:10:244::/56".parse().unwrap());
        assert_eq!(c.validate(), Ok(()));
        c.routing.cluster_cidrs[0] = "fd00:10:245::/56".parse().unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::ClusterCidrFamilies(_))));
        c.routing.cluster_cidrs.remove(0);
        c.routing.nat_table = "weir nat".into();
        assert!(matches!(c.validate(), Err(ConfigError::BadNatTable(_))));
        let mut c = config();
        c.routing.uplink = Some("eth0/1".into());
        assert!(matches!(c.validate(), Err(ConfigError::BadOverlayUplink(_))));
        let mut c = config();
        c.nft_table = "no spaces".into();
        assert!(matches!(c.validate(), Err(ConfigError::BadNftTable(_))));
    }
}
