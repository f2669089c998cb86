//! `weir inspect`: what the live datapath holds, read from the pinned maps (no agent needed).
use std::collections::HashMap;

use serde::Serialize;
use weir_common::{
    lb::{ServiceValue, service_flags},
    proto,
};

use crate::{
    family::{Family, V4, V6},
    maps::ServiceMaps,
};

/// One service frontend as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceRow {
    pub frontend: String,
    pub protocol: String,
    /// `ip:port` per slot, in slot order; `<missing id>` where a slot names no backend.
    pub backends: Vec<String>,
    /// `reject` (no endpoints), `drop` (no endpoint allowed here by a Local traffic policy)
    /// or `balance`.
    pub when_empty: String,
    pub rev_nat_index: u32,
    pub reverse_nat: Option<String>,
    /// ClientIP session affinity timeout in seconds, when the service has affinity.
    pub affinity_timeout: Option<u32>,
}

/// Rows, sorted by frontend, from one family's three service maps' entries.
pub fn service_rows<F: Family>(
    services: &[(F::Key, ServiceValue)],
    backends: &[(u32, F::Backend)],
    rev_nat: &[(u32, F::RevNat)],
) -> Vec<ServiceRow> {
    let backends: HashMap<u32, F::Backend> = backends.iter().copied().collect();
    let rev_nat: HashMap<u32, F::RevNat> = rev_nat.iter().copied().collect();
    let slots: HashMap<F::Key, u32> = services
        .iter()
        .filter(|(k, _)| F::key_parts(k).3 != 0)
        .map(|(k, v)| (*k, v.backend_id))
        .collect();
    // Sorted by (address, port, protocol).
    let mut rows: Vec<(_, ServiceRow)> = services
        .iter()
        .filter(|(key, _)| F::key_parts(key).3 == 0)
        .map(|(key, master)| {
            let (address, port, proto, _) = F::key_parts(key);
            let backends = (1..=master.count)
                .map(|slot| {
                    match slots.get(&F::with_slot(*key, slot)).and_then(|id| backends.get(id)) {
                        Some(b) => socket::<F>(F::backend_parts(b)),
                        None => format!("<missing slot {slot}>"),
                    }
                })
                .collect::<Vec<_>>();
            let when_empty = if master.count > 0 {
                "balance"
            } else if master.flags & service_flags::EMPTY_BY_POLICY != 0 {
                "drop"
            } else {
                "reject"
            };
            let row = ServiceRow {
                frontend: socket::<F>((address, port)),
                protocol: protocol_name(proto).to_string(),
                backends,
                when_empty: when_empty.to_string(),
                rev_nat_index: master.rev_nat_index,
                affinity_timeout: (master.flags & service_flags::AFFINITY != 0)
                    .then_some(master.backend_id),
                reverse_nat: rev_nat
                    .get(&master.rev_nat_index)
                    .map(|r| socket::<F>(F::rev_nat_parts(r))),
            };
            ((address, port, proto), row)
        })
        .collect();
    rows.sort_by_key(|(key, _)| *key);
    rows.into_iter().map(|(_, row)| row).collect()
}

/// Rows of both families' maps: IPv4 first, then IPv6.
pub fn all_service_rows(maps: &ServiceMaps) -> Vec<ServiceRow> {
    let mut rows = service_rows::<V4>(
        &maps.v4.service_entries(),
        &maps.v4.backend_entries(),
        &maps.v4.rev_nat_entries(),
    );
    rows.extend(service_rows::<V6>(
        &maps.v6.service_entries(),
        &maps.v6.backend_entries(),
        &maps.v6.rev_nat_entries(),
    ));
    rows
}

/// `ip:port`, or `[ip]:port` for IPv6.
fn socket<F: Family>((address, port): (F::Addr, u16)) -> String {
    std::net::SocketAddr::new(address.into(), port).to_string()
}

/// The rows as an aligned text table.
pub fn service_table(rows: &[ServiceRow]) -> String {
    let mut lines = vec![["FRONTEND".into(), "PROTO".into(), "BACKENDS".into(), "EMPTY".into()]];
    for row in rows {
        let backends = if row.backends.is_empty() { "-".into() } else { row.backends.join(",") };
        lines.push([row.frontend.clone(), row.protocol.clone(), backends, row.when_empty.clone()]);
    }
    let widths: Vec<usize> =
        (0..4).map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0)).collect();
    lines
        .iter()
        .map(|l| {
            format!(
                "{:<w0$}  {:<w1$}  {:<w2$}  {}",
                l[0],
                l[1],
                l[2],
                l[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2]
            )
            .trim_end()
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn protocol_name(number: u8) -> &'static str {
    match number {
        proto::TCP => "TCP",
        proto::UDP => "UDP",
        proto::SCTP => "SCTP",
        _ => "?",
    }
}

#[cfg(test)]
mod tests {
    use weir_common::lb::{Backend, Backend6, RevNat, ServiceKey, ServiceKey6};

    use super::*;

    #[test]
    fn rows_follow_slots_and_name_empty_behaviour() {
        let web = ServiceKey::new([10, 96, 0, 10], 80, proto::TCP, 0);
        let dns = ServiceKey::new([10, 96, 0, 2], 53, proto::UDP, 0);
        let services = [
            (web, ServiceValue::master(2, 1, 0)),
            (web.with_slot(1), ServiceValue::slot(7)),
            (web.with_slot(2), ServiceValue::slot(8)),
            (dns, ServiceValue::master(0, 2, service_flags::EMPTY_BY_POLICY)),
        ];
        let backends = [
            (7, Backend::new([10, 0, 0, 1], 8080, proto::TCP)),
            (8, Backend::new([10, 0, 0, 2], 8080, proto::TCP)),
        ];
        let rev_nat = [(1, RevNat::new([10, 96, 0, 10], 80))];
        let rows = service_rows::<V4>(&services, &backends, &rev_nat);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].frontend, "10.96.0.2:53", "sorted by address");
        assert_eq!(rows[0].when_empty, "drop");
        assert_eq!(rows[1].backends, ["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(rows[1].reverse_nat.as_deref(), Some("10.96.0.10:80"));
        let table = service_table(&rows);
        assert!(table.starts_with("FRONTEND"), "{table}");
        assert!(
            table.contains("10.96.0.10:80  TCP    10.0.0.1:8080,10.0.0.2:8080  balance"),
            "{table}"
        );
    }

    #[test]
    fn ipv6_rows_bracket_their_addresses() {
        let vip: std::net::Ipv6Addr = "fd00:96::a".parse().unwrap();
        let backend: std::net::Ipv6Addr = "fd00:10::2".parse().unwrap();
        let key = ServiceKey6::new(vip.octets(), 80, proto::TCP, 0);
        let services =
            [(key, ServiceValue::master(1, 1, 0)), (key.with_slot(1), ServiceValue::slot(1))];
        let backends = [(1, Backend6::new(backend.octets(), 8080, proto::TCP))];
        let rows = service_rows::<V6>(&services, &backends, &[]);
        assert_eq!(rows[0].frontend, "[fd00:96::a]:80");
        assert_eq!(rows[0].backends, ["[fd00:10::2]:8080"]);
        assert_eq!(rows[0].reverse_nat, None);
    }
}
