//! Read-only questions to this network namespace's policy table, for a node runtime and for
//! tests (they never change the table, unlike [`super::NftPolicy::open`]).
use std::{collections::BTreeMap, io, net::IpAddr};

use super::plan::{INGRESS_ENDPOINTS, UNKNOWN_PODS};
use crate::apply::nft::netlink::{DumpKind, Socket};

/// Whether the table already holds a new pod's entries: what a node runtime waits for before
/// it starts the pod's containers (the nftables side of
/// `weir_cni_plugin::policy::policy_written`).
/// True when table `inet <table>` does not drop unknown pods (no table, or no policy exists so
/// `unknown-pods` is empty), or when every IPv4 address in `ips` has its endpoint element.
/// Runs in the calling thread's network namespace.
pub fn endpoints_written(table: &str, ips: &[IpAddr]) -> io::Result<bool> {
    let mut socket = Socket::open()?;
    // A missing table or set dumps as empty.
    if socket
        .dump(DumpKind::Elements, table, Some(UNKNOWN_PODS))?
        .iter()
        .all(|set| set.elements.is_empty())
    {
        return Ok(true);
    }
    let known: Vec<Vec<u8>> = socket
        .dump(DumpKind::Elements, table, Some(INGRESS_ENDPOINTS))?
        .into_iter()
        .flat_map(|set| set.elements.into_iter().map(|(key, _)| key))
        .collect();
    Ok(ips.iter().all(|ip| match ip {
        IpAddr::V4(v4) => known.iter().any(|key| key.as_slice() == v4.octets()),
        // The table filters IPv4 only.
        IpAddr::V6(_) => true,
    }))
}

/// Packets dropped per counter of table `inet <table>`: `drop-<namespace>/<policy>` and
/// `drop-unknown` (empty when there is no table).
pub fn drop_counters(table: &str) -> io::Result<BTreeMap<String, u64>> {
    counters(&mut Socket::open()?, table)
}

pub(super) fn counters(socket: &mut Socket, table: &str) -> io::Result<BTreeMap<String, u64>> {
    let counters = socket.dump(DumpKind::Counters, table, None)?;
    Ok(counters.into_iter().map(|c| (c.name, c.packets.unwrap_or(0))).collect())
}
