//! `weir policy trace --live` on the nftables dataplane: the decision a node's policy table
//! gives for a new connection, computed in userspace with the lookups of the table's chains
//! (allow tuple, endpoint verdict map, unknown pods), and compared with the model's decision
//! ([`weir_policy::Side`]) for the same side, as [`crate::policy::live`] does for the eBPF
//! maps. ICMPv6 link control and conntrack are not consulted (a new TCP, UDP or SCTP
//! connection is traced).
use std::{collections::BTreeMap, fmt, io, net::IpAddr};

use weir_policy::{Direction, Side};

use super::plan::{DIRECTIONS, Desired, drop_chain, sets, unknown_set};
use crate::apply::nft::{
    netlink::{DumpKind, Socket, parse_policy_tuple},
    ops::{Family, PolicyTuple, Verdict},
};

/// What one policy table holds, as far as the per-packet lookups read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableView {
    /// Per direction (ingress, egress): the allow tuples of both families.
    allow: [Vec<PolicyTuple>; 2],
    /// Per direction: endpoint address -> verdict.
    endpoints: [BTreeMap<IpAddr, Verdict>; 2],
    /// Whether an unknown-pods set holds anything (pods without an entry are dropped).
    deny_unknown: bool,
}

fn index(direction: Direction) -> usize {
    match direction {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

impl TableView {
    /// Reads table `inet <table>` of the calling thread's network namespace (a missing table
    /// reads as empty).
    pub fn read(table: &str) -> io::Result<Self> {
        let mut socket = Socket::open()?;
        let mut view = Self::default();
        for direction in DIRECTIONS {
            for family in [Family::V4, Family::V6] {
                let (allow, endpoints, _) = sets(direction, family);
                for set in socket.dump(DumpKind::Elements, table, Some(allow))? {
                    let tuples = set.elements.iter().zip(&set.element_ends).filter_map(
                        |((start, _), (end, _))| parse_policy_tuple(start, end.as_ref()?),
                    );
                    view.allow[index(direction)].extend(tuples);
                }
                for set in socket.dump(DumpKind::Elements, table, Some(endpoints))? {
                    for (key, verdict) in set.elements {
                        let Some(address) = address(&key) else { continue };
                        let Some(verdict) = verdict.and_then(|v| v.to_verdict()) else { continue };
                        view.endpoints[index(direction)].insert(address, verdict);
                    }
                }
            }
        }
        for family in [Family::V4, Family::V6] {
            let sets = socket.dump(DumpKind::Elements, table, Some(unknown_set(family)))?;
            view.deny_unknown |= sets.iter().any(|s| !s.elements.is_empty());
        }
        Ok(view)
    }

    /// What a table holding `desired` holds (for tests).
    pub fn of(desired: &Desired) -> Self {
        let side = |d| desired.side(d);
        Self {
            allow: DIRECTIONS.map(|d| side(d).allow.iter().copied().collect()),
            endpoints: DIRECTIONS.map(|d| side(d).endpoints.clone()),
            deny_unknown: !desired.unknown_pods.is_empty(),
        }
    }
}

fn address(key: &[u8]) -> Option<IpAddr> {
    match key.len() {
        4 => <[u8; 4]>::try_from(key).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(key).ok().map(IpAddr::from),
        _ => None,
    }
}

/// What the table decides for one side of a new connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NftSide {
    /// No allow tuple matched and the endpoint has no element: it passes, or is dropped as
    /// not ready while unknown pods are denied.
    NoEndpoint {
        dropped: bool,
    },
    NotIsolated,
    /// An allow tuple matched (a rule's peer, or the pod's own node).
    Allowed(PolicyTuple),
    /// Isolated: dropped in this chain (and counted on its counter).
    Dropped {
        chain: String,
    },
}

impl fmt::Display for NftSide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NftSide::NoEndpoint { dropped: false } => f.write_str("no endpoint element: passes"),
            NftSide::NoEndpoint { dropped: true } => {
                f.write_str("no endpoint element while unknown pods are denied: dropped")
            }
            NftSide::NotIsolated => f.write_str("not isolated: passes"),
            NftSide::Allowed(t) => write!(
                f,
                "allowed by tuple {} . {}-{} . {}-{} . {}-{}",
                t.endpoint,
                t.protocols.0,
                t.protocols.1,
                t.ports.0,
                t.ports.1,
                t.peers.0,
                t.peers.1
            ),
            NftSide::Dropped { chain } => write!(f, "dropped in chain {chain}"),
        }
    }
}

/// The table's decision for `direction` of `endpoint` (the pod whose side it is) talking to
/// `peer`, as the chain `ingress` or `egress` computes it.
pub fn evaluate(
    view: &TableView,
    direction: Direction,
    endpoint: IpAddr,
    peer: IpAddr,
    protocol: u8,
    port: u16,
) -> NftSide {
    let i = index(direction);
    let hit = view.allow[i].iter().find(|t| {
        t.endpoint == endpoint
            && (t.protocols.0..=t.protocols.1).contains(&protocol)
            && (t.ports.0..=t.ports.1).contains(&port)
            && (t.peers.0..=t.peers.1).contains(&peer)
    });
    if let Some(tuple) = hit {
        return NftSide::Allowed(*tuple);
    }
    match view.endpoints[i].get(&endpoint) {
        Some(Verdict::Goto(chain)) => NftSide::Dropped { chain: chain.clone() },
        Some(_) => NftSide::NotIsolated,
        None => NftSide::NoEndpoint { dropped: view.deny_unknown },
    }
}

/// Why the table's decision disagrees with the model's, or `None` when they agree: the same
/// outcome, and a drop in the chain of the first policy isolating the side.
pub fn disagreement(model: &Side, live: &NftSide, direction: Direction) -> Option<String> {
    let agrees = match (model, live) {
        (Side::NotIsolated, NftSide::NotIsolated)
        | (Side::Allowed(_) | Side::OwnNode, NftSide::Allowed(_))
        | (Side::NotEnforced, NftSide::NoEndpoint { dropped: false }) => true,
        (Side::Denied { isolated_by }, NftSide::Dropped { chain }) => {
            isolated_by.first().is_some_and(|first| drop_chain(first, direction) == *chain)
        }
        _ => false,
    };
    (!agrees).then(|| format!("the model says: {model}; the table: {live}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_decides_as_the_chains_do() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let (a, b, c) = (ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3"));
        let mut desired = Desired::default();
        desired.ingress.allow.insert(PolicyTuple {
            endpoint: a,
            protocols: (6, 6),
            ports: (80, 80),
            peers: (b, b),
        });
        let chain = drop_chain(&weir_policy::PolicyRef::new("x", "p"), Direction::Ingress);
        desired.ingress.endpoints.insert(a, Verdict::Goto(chain.clone()));
        desired.ingress.endpoints.insert(b, Verdict::Return);
        let view = TableView::of(&desired);
        assert!(matches!(evaluate(&view, Direction::Ingress, a, b, 6, 80), NftSide::Allowed(_)));
        let dropped = evaluate(&view, Direction::Ingress, a, c, 6, 80);
        assert_eq!(dropped, NftSide::Dropped { chain });
        let denied = Side::Denied { isolated_by: vec![weir_policy::PolicyRef::new("x", "p")] };
        assert_eq!(disagreement(&denied, &dropped, Direction::Ingress), None);
        let other = Side::Denied { isolated_by: vec![weir_policy::PolicyRef::new("x", "q")] };
        assert!(disagreement(&other, &dropped, Direction::Ingress).is_some(), "another chain");
        assert_eq!(evaluate(&view, Direction::Ingress, b, c, 6, 80), NftSide::NotIsolated);
        let unknown = evaluate(&view, Direction::Ingress, c, a, 6, 80);
        assert_eq!(unknown, NftSide::NoEndpoint { dropped: false });
        assert_eq!(disagreement(&Side::NotEnforced, &unknown, Direction::Ingress), None);
        assert!(disagreement(&Side::NotIsolated, &dropped, Direction::Ingress).is_some());
    }
}
