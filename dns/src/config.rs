//! `weir dns` configuration, validated before any socket is bound.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use hickory_proto::rr::Name;
use thiserror::Error;

/// Where kube-dns listens in a cluster.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:53";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// Port of an upstream given without one.
const DNS_PORT: u16 = 53;

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// kubeconfig file; `None` infers the configuration ($KUBECONFIG, ~/.kube/config, or the
    /// in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    /// UDP and TCP address; port 0 picks one free port for both.
    pub listen: SocketAddr,
    /// The cluster domain, e.g. `cluster.local`.
    pub cluster_domain: String,
    /// Servers that names outside the cluster domain are forwarded to, in order; none means
    /// such names are REFUSED.
    pub upstreams: Vec<SocketAddr>,
}

#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    #[error(
        "--cluster-domain {domain:?} is not a domain name ({reason}); give dot-separated DNS \
         labels such as cluster.local"
    )]
    ClusterDomain { domain: String, reason: String },
    #[error("--upstream {value:?} is not an IP address or IP:PORT (for example 192.0.2.53:53)")]
    Upstream { value: String },
    #[error("--upstream {addr} is this server's own --listen address; forwarding would loop")]
    UpstreamIsSelf { addr: SocketAddr },
}

impl DnsConfig {
    /// Checks the configuration and returns the cluster domain as a DNS name (an FQDN).
    pub fn validate(&self) -> Result<Name, ConfigError> {
        if let Some(addr) = self.upstreams.iter().find(|u| **u == self.listen) {
            return Err(ConfigError::UpstreamIsSelf { addr: *addr });
        }
        cluster_domain(&self.cluster_domain)
    }
}

/// The cluster domain as an FQDN; rejects empty names, the root and non-label characters.
pub fn cluster_domain(domain: &str) -> Result<Name, ConfigError> {
    let bad = |reason: &str| ConfigError::ClusterDomain {
        domain: domain.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = domain.trim_end_matches('.');
    if trimmed.is_empty() {
        return Err(bad("it is empty"));
    }
    for label in trimmed.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad(&format!(
                "label {label:?} is not 1-63 letters, digits or inner dashes"
            )));
        }
    }
    let mut name = Name::from_ascii(trimmed).map_err(|e| bad(&e.to_string()))?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

/// An upstream server: `IP:PORT`, `[IPv6]:PORT`, or a bare IP (port 53).
pub fn parse_upstream(value: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    value
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, DNS_PORT))
        .map_err(|_| ConfigError::Upstream { value: value.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_domains_are_checked_and_made_fqdn() {
        assert_eq!(cluster_domain("Cluster.Local").unwrap().to_ascii(), "cluster.local.");
        assert_eq!(cluster_domain("cluster.local.").unwrap().to_ascii(), "cluster.local.");
        for bad in ["", ".", "a..b", "-a.local", "under_score.local", "sp ace"] {
            assert!(
                matches!(cluster_domain(bad), Err(ConfigError::ClusterDomain { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn upstreams_take_a_port_or_default_to_53() {
        assert_eq!(parse_upstream("192.0.2.1:5353").unwrap(), "192.0.2.1:5353".parse().unwrap());
        assert_eq!(parse_upstream("192.0.2.1").unwrap(), "192.0.2.1:53".parse().unwrap());
        assert_eq!(parse_upstream("[fd00::1]:54").unwrap(), "[fd00::1]:54".parse().unwrap());
        assert_eq!(parse_upstream("fd00::1").unwrap(), "[fd00::1]:53".parse().unwrap());
        let err = parse_upstream("dns.example.com").unwrap_err();
        assert!(err.to_string().contains("not an IP address"), "{err}");
    }

    #[test]
    fn forwarding_to_itself_is_refused() {
        let config = DnsConfig {
            kubeconfig: None,
            listen: "127.0.0.1:5353".parse().unwrap(),
            cluster_domain: "cluster.local".into(),
            upstreams: vec!["127.0.0.1:5353".parse().unwrap()],
        };
        assert!(matches!(config.validate(), Err(ConfigError::UpstreamIsSelf { .. })));
    }
}
