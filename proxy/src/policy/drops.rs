//! Per-policy drop counters: `weir_pol_drops_v2` (per-CPU hash, (policy id, direction) ->
//! packets) summed over CPUs and named, as Prometheus text for the agent's /metrics:
//! `weir_policy_drops_total{policy="x/deny-all",direction="ingress"} 3`.
use std::{collections::BTreeMap, fmt::Write, path::Path};

use aya::maps::{MapData, PerCpuHashMap};
use weir_common::policy::{DIR_EGRESS, POLICY_DROPS_MAP, PolicyDropKey};
use weir_policy::Direction;

use super::names::FlowNames;
use crate::maps::MapsError;

/// Reads the per-CPU counters pinned in `pin_dir`, summed per key.
pub fn read_drops_pinned(pin_dir: &Path) -> Result<Vec<(PolicyDropKey, u64)>, MapsError> {
    let path = pin_dir.join(POLICY_DROPS_MAP);
    let data = MapData::from_pin(&path).map_err(|source| MapsError::OpenPinned { path, source })?;
    let map: PerCpuHashMap<MapData, PolicyDropKey, u64> =
        PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data))
            .map_err(|source| MapsError::Layout { name: POLICY_DROPS_MAP, source })?;
    let mut out = Vec::new();
    for entry in map.iter() {
        // An entry deleted while iterating is skipped, not an error worth failing a scrape.
        let Ok((key, per_cpu)) = entry else { continue };
        out.push((key, per_cpu.iter().sum()));
    }
    Ok(out)
}

fn escape(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Prometheus text for the counters, policies named through `names` (`id:N` for an id the
/// names do not know, e.g. before the first policy sync of a restarted agent).
pub fn drops_metrics(drops: &[(PolicyDropKey, u64)], names: &dyn FlowNames) -> String {
    let named: Vec<(String, Direction, u64)> = drops
        .iter()
        .map(|(key, value)| {
            let policy =
                names.policy(key.policy).map_or(format!("id:{}", key.policy), |p| p.to_string());
            let direction =
                if key.direction == DIR_EGRESS { Direction::Egress } else { Direction::Ingress };
            (policy, direction, *value)
        })
        .collect();
    named_drops_metrics(&named)
}

/// Prometheus text for per-policy counts (`<ns>/<name>`, direction, packets), summed per
/// policy and direction: the eBPF counters once named, or the nftables table's counters.
pub fn named_drops_metrics(drops: &[(String, Direction, u64)]) -> String {
    let mut totals: BTreeMap<(&str, Direction), u64> = BTreeMap::new();
    for (policy, direction, value) in drops {
        *totals.entry((policy, *direction)).or_default() += value;
    }
    let mut out = String::from(
        "# HELP weir_policy_drops_total Packets dropped while a NetworkPolicy isolated the pod \
         (counted against the first isolating policy).\n# TYPE weir_policy_drops_total counter\n",
    );
    for ((policy, direction), value) in totals {
        let _ = writeln!(
            out,
            "weir_policy_drops_total{{policy=\"{}\",direction=\"{direction}\"}} {value}",
            escape(policy)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weir_common::policy::DIR_INGRESS;
    use weir_policy::ObjectRef;

    use super::*;
    use crate::policy::names::PolicyNames;

    #[test]
    fn drops_are_named_per_policy_and_direction() {
        let names = PolicyNames {
            policies_by_id: BTreeMap::from([(1, ObjectRef::new("x", "deny-all"))]),
            ..Default::default()
        };
        let key = |policy, direction| PolicyDropKey { policy, direction, _pad: [0; 3] };
        let text = drops_metrics(
            &[(key(1, DIR_INGRESS), 3), (key(1, DIR_EGRESS), 2), (key(9, DIR_INGRESS), 1)],
            &names,
        );
        assert!(text.contains("# TYPE weir_policy_drops_total counter\n"), "{text}");
        assert!(
            text.contains(
                "weir_policy_drops_total{policy=\"x/deny-all\",direction=\"ingress\"} 3\n"
            )
        );
        assert!(
            text.contains(
                "weir_policy_drops_total{policy=\"x/deny-all\",direction=\"egress\"} 2\n"
            )
        );
        assert!(
            text.contains("weir_policy_drops_total{policy=\"id:9\",direction=\"ingress\"} 1\n")
        );
        assert_eq!(escape("a\"b\\"), "a\\\"b\\\\");
    }
}
