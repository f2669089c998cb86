//! `trace`: would this source reach this destination on this port, and which rule decides.
//! Computed from the compiled entries (the same ones the datapath is programmed with), for the
//! egress side of the source and the ingress side of the destination.
use std::{fmt, net::IpAddr};

use thiserror::Error;

use crate::{
    compile::{Compiled, DirectionPolicy, Origin},
    identity::{IDENTITY_HOST, IDENTITY_WORLD},
    input::{PodRef, PolicyRef, Protocol},
};

/// A traffic partner: a pod by name, or an address (which may be a pod's or a node's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Pod(PodRef),
    Ip(IpAddr),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Pod(pod) => write!(f, "pod {pod}"),
            Endpoint::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// The decision of one side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Side {
    /// This side is not a pod whose policy is compiled here (an address outside the cluster,
    /// a host-network pod, a pod of another node): nothing is enforced.
    NotEnforced,
    /// No policy isolates this direction of the pod.
    NotIsolated,
    /// The pod's own node connects to it.
    OwnNode,
    Allowed(Origin),
    /// Isolated and no rule allows it.
    Denied {
        isolated_by: Vec<PolicyRef>,
    },
}

impl Side {
    pub fn allows(&self) -> bool {
        !matches!(self, Side::Denied { .. })
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Side::NotEnforced => f.write_str("not enforced here (not a pod with compiled policy)"),
            Side::NotIsolated => f.write_str("allowed: no NetworkPolicy isolates it"),
            Side::OwnNode => f.write_str("allowed: the pod's own node may always connect"),
            Side::Allowed(origin) => write!(f, "allowed by {origin}"),
            Side::Denied { isolated_by } => {
                let names: Vec<String> = isolated_by.iter().map(ToString::to_string).collect();
                write!(f, "denied: no rule allows it (isolated by {})", names.join(", "))
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub egress: Side,
    pub ingress: Side,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "verdict: {}", if self.allowed { "ALLOWED" } else { "DENIED" })?;
        writeln!(f, "  egress of the source: {}", self.egress)?;
        write!(f, "  ingress of the destination: {}", self.ingress)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TraceError {
    #[error("pod {pod} is not known (check the namespace and name: NAMESPACE/POD)")]
    NoSuchPod { pod: PodRef },
    #[error("pod {pod} has no IP address yet (is it running?)")]
    NoAddress { pod: PodRef },
    #[error("pod {pod} has no address of the other side's IP family")]
    NoAddressOfFamily { pod: PodRef },
}

/// A resolved partner.
struct Resolved {
    pod: Option<PodRef>,
    ip: IpAddr,
    identity: u32,
    node: Option<String>,
}

fn resolve(
    compiled: &Compiled,
    endpoint: &Endpoint,
    family: Option<bool>,
) -> Result<Resolved, TraceError> {
    match endpoint {
        Endpoint::Pod(pod) => {
            let entry =
                compiled.pods.get(pod).ok_or_else(|| TraceError::NoSuchPod { pod: pod.clone() })?;
            if entry.ips.is_empty() {
                return Err(TraceError::NoAddress { pod: pod.clone() });
            }
            let ip = match family {
                None => entry.ips.iter().find(|ip| ip.is_ipv4()).unwrap_or(&entry.ips[0]),
                Some(v4) => entry
                    .ips
                    .iter()
                    .find(|ip| ip.is_ipv4() == v4)
                    .ok_or_else(|| TraceError::NoAddressOfFamily { pod: pod.clone() })?,
            };
            Ok(Resolved {
                pod: Some(pod.clone()),
                ip: *ip,
                identity: entry.identity.unwrap_or(IDENTITY_HOST),
                node: entry.node.clone(),
            })
        }
        Endpoint::Ip(ip) => {
            if let Some(pod) = compiled.pod_ips.get(ip) {
                let entry = &compiled.pods[pod];
                return Ok(Resolved {
                    pod: Some(pod.clone()),
                    ip: *ip,
                    identity: entry.identity.unwrap_or(IDENTITY_HOST),
                    node: entry.node.clone(),
                });
            }
            let node = compiled.nodes.iter().find(|(_, ips)| ips.contains(ip)).map(|(n, _)| n);
            Ok(Resolved {
                pod: None,
                ip: *ip,
                identity: if node.is_some() { IDENTITY_HOST } else { IDENTITY_WORLD },
                node: node.cloned(),
            })
        }
    }
}

fn decide(policy: &DirectionPolicy, peer: &Resolved, protocol: Protocol, port: u16) -> Side {
    if !policy.is_isolated() {
        return Side::NotIsolated;
    }
    match policy.allow.iter().find(|a| a.matches(peer.identity, peer.ip, protocol, port)) {
        Some(allow) => Side::Allowed(allow.origin.clone()),
        None => Side::Denied { isolated_by: policy.isolated_by.clone() },
    }
}

/// The verdict for a new connection from `from` to `to` on `protocol`/`port`.
pub fn trace(
    compiled: &Compiled,
    from: &Endpoint,
    to: &Endpoint,
    protocol: Protocol,
    port: u16,
) -> Result<Verdict, TraceError> {
    let family = |e: &Endpoint| match e {
        Endpoint::Ip(ip) => Some(ip.is_ipv4()),
        Endpoint::Pod(_) => None,
    };
    let src = resolve(compiled, from, family(to))?;
    let dst = resolve(compiled, to, Some(family(to).unwrap_or(src.ip.is_ipv4())))?;
    let policy_of = |r: &Resolved| r.pod.as_ref().and_then(|p| compiled.endpoints.get(p));
    let egress = match policy_of(&src) {
        Some(policy) if src.identity != IDENTITY_HOST => {
            decide(&policy.egress, &dst, protocol, port)
        }
        _ => Side::NotEnforced,
    };
    let ingress = match policy_of(&dst) {
        Some(_) if src.identity == IDENTITY_HOST && src.node.is_some() && src.node == dst.node => {
            Side::OwnNode
        }
        Some(policy) if dst.identity != IDENTITY_HOST => {
            decide(&policy.ingress, &src, protocol, port)
        }
        _ => Side::NotEnforced,
    };
    Ok(Verdict { allowed: egress.allows() && ingress.allows(), egress, ingress })
}
