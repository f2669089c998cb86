//! Read-only questions to this network namespace's policy table, for a node runtime and for
//! tests (they never change the table, unlike [`super::NftPolicy::open`]).
use std::{collections::BTreeMap, io, net::IpAddr};

use weir_common::metrics::Counter;
use weir_policy::Direction;

use super::plan::{
    DROP_UNKNOWN, INGRESS_ENDPOINTS, INGRESS_ENDPOINTS6, UNKNOWN_PODS, UNKNOWN_PODS6,
    parse_drop_chain,
};
use crate::apply::nft::netlink::{DumpKind, Socket};

/// Whether the table already holds a new pod's entries: what a node runtime waits for before
/// it starts the pod's containers (the nftables side of
/// `weir_cni_plugin::policy::policy_written`).
/// True when table `inet <table>` does not drop unknown pods (no table, or no policy exists so
/// `unknown-pods` and `unknown-pods6` are empty), or when every address in `ips` has its
/// endpoint element. Runs in the calling thread's network namespace.
pub fn endpoints_written(table: &str, ips: &[IpAddr]) -> io::Result<bool> {
    let mut socket = Socket::open()?;
    let mut elements = |set: &str| -> io::Result<Vec<Vec<u8>>> {
        // A missing table or set dumps as empty.
        Ok(socket
            .dump(DumpKind::Elements, table, Some(set))?
            .into_iter()
            .flat_map(|set| set.elements.into_iter().map(|(key, _)| key))
            .collect())
    };
    if elements(UNKNOWN_PODS)?.is_empty() && elements(UNKNOWN_PODS6)?.is_empty() {
        return Ok(true);
    }
    let known = [elements(INGRESS_ENDPOINTS)?, elements(INGRESS_ENDPOINTS6)?].concat();
    Ok(ips.iter().all(|ip| {
        let octets = match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        known.contains(&octets)
    }))
}

/// Packets dropped per counter of table `inet <table>`: `drop-<direction>-<namespace>/<policy>`
/// and `drop-unknown` (empty when there is no table).
pub fn drop_counters(table: &str) -> io::Result<BTreeMap<String, u64>> {
    counters(&mut Socket::open()?, table)
}

pub(super) fn counters(socket: &mut Socket, table: &str) -> io::Result<BTreeMap<String, u64>> {
    let counters = socket.dump(DumpKind::Counters, table, None)?;
    Ok(counters.into_iter().map(|c| (c.name, c.packets.unwrap_or(0))).collect())
}

/// The table's drop counters as the agent's metrics see them: per-reason totals (the eBPF
/// datapath's `drop_policy_ingress`, `drop_policy_egress`, `drop_policy_not_ready`) and the
/// per-policy counts (`<ns>/<name>`, direction, packets).
pub fn drop_metrics(counters: &BTreeMap<String, u64>) -> DropMetrics {
    let mut metrics = DropMetrics::default();
    for (name, packets) in counters {
        if name == DROP_UNKNOWN {
            metrics.reasons.push((Counter::DropPolicyNotReady, *packets));
        } else if let Some((direction, policy)) = parse_drop_chain(name) {
            metrics.policies.push((policy.to_string(), direction, *packets));
        }
    }
    for (reason, direction) in [
        (Counter::DropPolicyIngress, Direction::Ingress),
        (Counter::DropPolicyEgress, Direction::Egress),
    ] {
        let total = metrics.policies.iter().filter(|p| p.1 == direction).map(|p| p.2).sum();
        metrics.reasons.push((reason, total));
    }
    metrics
}

/// See [`drop_metrics`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DropMetrics {
    pub reasons: Vec<(Counter, u64)>,
    pub policies: Vec<(String, Direction, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_counters_become_reasons_and_per_policy_counts() {
        let counters: BTreeMap<String, u64> = [
            (DROP_UNKNOWN.to_string(), 2),
            ("drop-ingress-x/deny".to_string(), 5),
            ("drop-ingress-y/deny".to_string(), 1),
            ("drop-egress-x/deny".to_string(), 3),
        ]
        .into();
        let metrics = drop_metrics(&counters);
        assert!(metrics.reasons.contains(&(Counter::DropPolicyNotReady, 2)));
        assert!(metrics.reasons.contains(&(Counter::DropPolicyIngress, 6)));
        assert!(metrics.reasons.contains(&(Counter::DropPolicyEgress, 3)));
        assert!(metrics.policies.contains(&("x/deny".to_string(), Direction::Egress, 3)));
        assert_eq!(metrics.policies.len(), 3);
    }
}
