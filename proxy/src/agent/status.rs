//! The agent's health and metrics state, shared between the sync loop and the HTTP servers.
//!
//! Health follows kube-proxy: the agent is unhealthy before its first sync and whenever a
//! change it was told about has not been applied within the health timeout.
use std::{
    fmt::Write as _,
    sync::Mutex,
    time::{Duration, Instant},
};

use weir_common::metrics::Counter;

use super::config::{MAP_OCCUPANCY_PAUSE_FACTOR, MAP_OCCUPANCY_PERIOD};
use crate::maps::MapOccupancy;

/// Upper bounds (seconds) of the latency histograms.
const BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// A Prometheus histogram over [`BUCKETS`].
#[derive(Debug, Default)]
struct Histogram {
    /// Observations at or below each bound (cumulative, as exposed).
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, value: Duration) {
        let seconds = value.as_secs_f64();
        self.count += 1;
        self.sum += seconds;
        for (count, bound) in self.buckets.iter_mut().zip(BUCKETS) {
            if seconds <= bound {
                *count += 1;
            }
        }
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (count, bound) in self.buckets.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Debug)]
pub struct Status {
    started: Instant,
    timeout: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// When the oldest change not yet applied was seen.
    pending_since: Option<Instant>,
    last_applied: Option<Instant>,
    syncs: u64,
    sync_errors: u64,
    map_ops: u64,
    frontends: usize,
    backends: usize,
    skipped_frontends: usize,
    sync_seconds: Histogram,
    event_to_datapath: Histogram,
    policy: PolicyStatus,
    bpf_maps: BpfMaps,
}

/// How full the eBPF dataplane's sized maps are; empty with the nftables dataplane.
#[derive(Debug, Default)]
struct BpfMaps {
    /// The last count of each map that could be read.
    occupancy: Vec<MapOccupancy>,
    /// Per map, the syncs that failed because it had no room for an entry.
    full: Vec<(&'static str, u64)>,
}

impl BpfMaps {
    fn write(&self, out: &mut String) {
        if !self.occupancy.is_empty() {
            let entries_help = format!(
                "Entries in each eBPF map, counted by walking the map in the background every {} \
                 s, less often when a count takes over 1/{} of that (a scrape shows the last \
                 count).",
                MAP_OCCUPANCY_PERIOD.as_secs(),
                MAP_OCCUPANCY_PAUSE_FACTOR
            );
            let gauges = [
                (
                    "weir_bpf_map_capacity",
                    "Entries each eBPF map can hold (its max_entries as loaded; a map pinned by \
                     an earlier agent keeps its size).",
                    false,
                ),
                ("weir_bpf_map_entries", entries_help.as_str(), true),
            ];
            for (name, help, entries) in gauges {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
                for map in &self.occupancy {
                    let value = if entries { map.entries } else { map.capacity };
                    let _ = writeln!(out, "{name}{{map=\"{}\"}} {value}", map.map);
                }
            }
        }
        if !self.full.is_empty() {
            let name = "weir_bpf_map_full_total";
            let _ = writeln!(
                out,
                "# HELP {name} Syncs that failed because an eBPF map had no room for an entry \
                 (the --bpf-*-map-max flags size the maps).\n# TYPE {name} counter"
            );
            for (map, count) in &self.full {
                let _ = writeln!(out, "{name}{{map=\"{map}\"}} {count}");
            }
        }
    }
}

/// The NetworkPolicy loop's counters.
#[derive(Debug, Default)]
struct PolicyStatus {
    syncs: u64,
    errors: u64,
    ops: u64,
    last: Option<PolicySyncReport>,
}

/// The outcome of one policy sync.
#[derive(Debug, Clone, Copy, Default)]
pub struct PolicySyncReport {
    pub duration: Duration,
    pub ops: usize,
    /// This node's pods with a policy entry.
    pub endpoints: usize,
    pub identities: usize,
    /// Allow entries of this node's pods.
    pub rules: usize,
    /// NetworkPolicies in the cluster.
    pub policies: usize,
}

/// The outcome of one sync.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncReport {
    pub duration: Duration,
    /// From the oldest change this sync applied being seen (its watch event received) to the
    /// datapath written; `None` when the sync applied no change (a periodic resync).
    pub event_age: Option<Duration>,
    pub ops: usize,
    pub frontends: usize,
    pub backends: usize,
    pub skipped_frontends: usize,
}

impl Status {
    pub fn new(timeout: Duration) -> Self {
        Self { started: Instant::now(), timeout, inner: Mutex::default() }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave these counters inconsistent.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A change arrived from the API server.
    pub fn queued(&self) {
        self.inner().pending_since.get_or_insert_with(Instant::now);
    }

    /// A sync applied every change queued before `started`.
    pub fn applied(&self, started: Instant, report: SyncReport) {
        let mut inner = self.inner();
        if inner.pending_since.is_some_and(|since| since <= started) {
            inner.pending_since = None;
        }
        inner.last_applied = Some(Instant::now());
        inner.syncs += 1;
        inner.map_ops += report.ops as u64;
        inner.frontends = report.frontends;
        inner.backends = report.backends;
        inner.skipped_frontends = report.skipped_frontends;
        inner.sync_seconds.observe(report.duration);
        if let Some(age) = report.event_age {
            inner.event_to_datapath.observe(age);
        }
    }

    pub fn failed(&self) {
        self.inner().sync_errors += 1;
    }

    /// The eBPF maps this agent sizes: their full counters are exposed from 0.
    pub fn track_bpf_maps(&self, maps: impl IntoIterator<Item = &'static str>) {
        let mut inner = self.inner();
        let full = &mut inner.bpf_maps.full;
        for map in maps {
            if !full.iter().any(|(name, _)| *name == map) {
                full.push((map, 0));
            }
        }
    }

    /// A sync failed because `map` was full.
    pub fn map_full(&self, map: &'static str) {
        let mut inner = self.inner();
        let full = &mut inner.bpf_maps.full;
        match full.iter_mut().find(|(name, _)| *name == map) {
            Some((_, count)) => *count += 1,
            None => full.push((map, 1)),
        }
    }

    /// The latest count of the eBPF maps (those that could be read).
    pub fn maps_counted(&self, occupancy: Vec<MapOccupancy>) {
        self.inner().bpf_maps.occupancy = occupancy;
    }

    /// The policy loop applied a sync.
    pub fn policy_applied(&self, report: PolicySyncReport) {
        let mut inner = self.inner();
        inner.policy.syncs += 1;
        inner.policy.ops += report.ops as u64;
        inner.policy.last = Some(report);
    }

    pub fn policy_failed(&self) {
        self.inner().policy.errors += 1;
    }

    /// `Ok` with a message when healthy, `Err` with the reason otherwise.
    pub fn health(&self) -> Result<String, String> {
        let inner = self.inner();
        let Some(last_applied) = inner.last_applied else {
            return Err(format!(
                "no sync yet ({:.1} s since start): waiting for the API server's initial lists",
                self.started.elapsed().as_secs_f64()
            ));
        };
        if let Some(since) = inner.pending_since
            && since.elapsed() > self.timeout
        {
            return Err(format!(
                "a change has waited {:.1} s to be applied (timeout {:?})",
                since.elapsed().as_secs_f64(),
                self.timeout
            ));
        }
        Ok(format!("ok: last sync {:.3} s ago", last_applied.elapsed().as_secs_f64()))
    }

    /// Prometheus text exposition of the agent's metrics and the datapath's counters.
    pub fn metrics(&self, counters: &[(Counter, u64)]) -> String {
        let inner = self.inner();
        let mut out = String::new();
        inner.sync_seconds.write(
            &mut out,
            "weir_sync_duration_seconds",
            "Time to apply one change set to the dataplane.",
        );
        inner.event_to_datapath.write(
            &mut out,
            "weir_event_to_datapath_seconds",
            "From a Service or EndpointSlice watch event (the oldest a sync applied) to the \
             dataplane written.",
        );
        for (name, kind, help, value) in [
            ("weir_syncs_total", "counter", "Syncs applied.", inner.syncs as f64),
            (
                "weir_sync_errors_total",
                "counter",
                "Syncs that failed and were retried.",
                inner.sync_errors as f64,
            ),
            (
                "weir_map_operations_total",
                "counter",
                "Map writes and deletes applied.",
                inner.map_ops as f64,
            ),
            (
                "weir_service_frontends",
                "gauge",
                "Service frontends programmed.",
                inner.frontends as f64,
            ),
            (
                "weir_service_backends",
                "gauge",
                "Distinct backends programmed.",
                inner.backends as f64,
            ),
            (
                "weir_service_frontends_skipped",
                "gauge",
                "Frontends the eBPF datapath cannot serve yet (IPv6).",
                inner.skipped_frontends as f64,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        let policy = &inner.policy;
        let last = policy.last.unwrap_or_default();
        for (name, kind, help, value) in [
            (
                "weir_policy_syncs_total",
                "counter",
                "NetworkPolicy syncs applied.",
                policy.syncs as f64,
            ),
            (
                "weir_policy_sync_errors_total",
                "counter",
                "NetworkPolicy syncs that failed and were retried.",
                policy.errors as f64,
            ),
            (
                "weir_policy_operations_total",
                "counter",
                "NetworkPolicy datapath writes and deletes applied.",
                policy.ops as f64,
            ),
            (
                "weir_policy_last_sync_duration_seconds",
                "gauge",
                "Time the last NetworkPolicy sync took (compile and apply).",
                last.duration.as_secs_f64(),
            ),
            (
                "weir_policy_endpoints",
                "gauge",
                "Local pods with a policy entry.",
                last.endpoints as f64,
            ),
            (
                "weir_policy_identities",
                "gauge",
                "Policy identities in the cluster.",
                last.identities as f64,
            ),
            ("weir_policy_rules", "gauge", "Allow rules of local pods.", last.rules as f64),
            (
                "weir_policy_policies",
                "gauge",
                "NetworkPolicies in the cluster.",
                last.policies as f64,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        inner.bpf_maps.write(&mut out);
        let _ = writeln!(
            out,
            "# HELP weir_datapath_events_total Datapath events by reason (drops included)."
        );
        let _ = writeln!(out, "# TYPE weir_datapath_events_total counter");
        for (counter, value) in counters {
            let _ = writeln!(
                out,
                "weir_datapath_events_total{{reason=\"{}\"}} {value}",
                counter.name()
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> SyncReport {
        SyncReport {
            duration: Duration::from_millis(2),
            event_age: Some(Duration::from_millis(3)),
            ops: 4,
            frontends: 1,
            backends: 2,
            skipped_frontends: 0,
        }
    }

    #[test]
    fn unhealthy_before_the_first_sync_and_when_a_change_waits_too_long() {
        let status = Status::new(Duration::from_millis(20));
        assert!(status.health().is_err());
        let started = Instant::now();
        status.queued();
        status.applied(started, report());
        assert!(status.health().is_ok());
        status.queued();
        std::thread::sleep(Duration::from_millis(40));
        assert!(status.health().unwrap_err().contains("waited"));
        status.applied(Instant::now(), report());
        assert!(status.health().is_ok());
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let status = Status::new(Duration::from_secs(1));
        status.applied(Instant::now(), report());
        let text = status.metrics(&[(Counter::Translated, 7)]);
        assert!(text.contains("weir_sync_duration_seconds_bucket{le=\"0.0025\"} 1"));
        assert!(text.contains("weir_sync_duration_seconds_bucket{le=\"0.001\"} 0"));
        assert!(text.contains("weir_map_operations_total 4"));
        assert!(text.contains("weir_event_to_datapath_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("weir_event_to_datapath_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("weir_event_to_datapath_seconds_count 1"));
        assert!(text.contains("weir_datapath_events_total{reason=\"translated\"} 7"));
        assert!(text.contains("weir_policy_syncs_total 0"));
        status.policy_applied(PolicySyncReport {
            duration: Duration::from_millis(3),
            ops: 5,
            endpoints: 2,
            ..PolicySyncReport::default()
        });
        let text = status.metrics(&[]);
        assert!(text.contains("weir_policy_syncs_total 1"));
        assert!(text.contains("weir_policy_operations_total 5"));
        assert!(text.contains("weir_policy_last_sync_duration_seconds 0.003"));
        assert!(text.contains("weir_policy_endpoints 2"));
        assert!(!text.contains("weir_bpf_map"), "no eBPF maps tracked (nftables): {text}");
    }

    #[test]
    fn map_occupancy_and_full_counters_are_labelled_by_map() {
        let status = Status::new(Duration::from_secs(1));
        status.track_bpf_maps(["weir_svc_v1", "weir_ct4_v1"]);
        let text = status.metrics(&[]);
        assert!(text.contains("# TYPE weir_bpf_map_full_total counter\n"), "{text}");
        assert!(text.contains("weir_bpf_map_full_total{map=\"weir_svc_v1\"} 0\n"), "{text}");
        assert!(text.contains("weir_bpf_map_full_total{map=\"weir_ct4_v1\"} 0\n"), "{text}");
        assert!(!text.contains("weir_bpf_map_entries"), "nothing counted yet: {text}");

        status.map_full("weir_svc_v1");
        status.map_full("weir_svc_v1");
        status.maps_counted(vec![
            MapOccupancy { map: "weir_svc_v1", capacity: 1024, entries: 7 },
            MapOccupancy { map: "weir_ct4_v1", capacity: 2048, entries: 0 },
        ]);
        let text = status.metrics(&[]);
        for line in [
            "# TYPE weir_bpf_map_capacity gauge",
            "weir_bpf_map_capacity{map=\"weir_svc_v1\"} 1024",
            "weir_bpf_map_capacity{map=\"weir_ct4_v1\"} 2048",
            "# TYPE weir_bpf_map_entries gauge",
            "weir_bpf_map_entries{map=\"weir_svc_v1\"} 7",
            "weir_bpf_map_entries{map=\"weir_ct4_v1\"} 0",
            "weir_bpf_map_full_total{map=\"weir_svc_v1\"} 2",
            "weir_bpf_map_full_total{map=\"weir_ct4_v1\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in {text}");
        }
        let help = text.lines().find(|l| l.starts_with("# HELP weir_bpf_map_entries")).unwrap();
        let period = format!("every {} s", MAP_OCCUPANCY_PERIOD.as_secs());
        assert!(help.contains(&period), "{help}");
        // Each metric's HELP and TYPE appear once, before its samples.
        for name in ["weir_bpf_map_capacity", "weir_bpf_map_entries", "weir_bpf_map_full_total"] {
            assert_eq!(text.matches(&format!("# TYPE {name} ")).count(), 1, "{name}");
        }
    }
}
