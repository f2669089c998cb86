//! Service address allocation: ClusterIPs from the service CIDR and NodePorts from
//! 30000-32767, with conflicts rejected. Pure: [`Allocations`] is what the stored Services
//! hold; the caller keeps it beside the store, serializes allocate → store → record under one
//! lock, and releases on delete.
use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use serde_json::{Value, json};

use crate::resources::validate::FieldError;

pub const NODE_PORT_RANGE: std::ops::RangeInclusive<i64> = 30000..=32767;

/// An IPv4 service CIDR.
#[derive(Clone, Copy, Debug)]
pub struct ServiceCidr {
    base: u32,
    prefix: u8,
}

impl ServiceCidr {
    pub fn parse(cidr: &str) -> Option<ServiceCidr> {
        let (addr, prefix) = cidr.split_once('/')?;
        let addr: Ipv4Addr = addr.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        if !(8..=30).contains(&prefix) {
            return None;
        }
        let mask = u32::MAX << (32 - prefix);
        Some(ServiceCidr { base: u32::from(addr) & mask, prefix })
    }

    fn size(&self) -> u32 {
        1 << (32 - self.prefix)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(ip) & (u32::MAX << (32 - self.prefix))) == self.base
    }

    /// The address of the `kubernetes` service: the first usable one.
    pub fn first(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }
}

/// The parts of a stored Service that allocation reads, taken from its bytes without building
/// the whole object.
#[derive(Default, serde::Deserialize)]
pub struct Held {
    #[serde(default)]
    spec: HeldSpec,
}

#[derive(Default, serde::Deserialize)]
struct HeldSpec {
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default)]
    ports: Vec<HeldPort>,
    #[serde(rename = "healthCheckNodePort")]
    health_check_node_port: Option<i64>,
}

#[derive(serde::Deserialize)]
struct HeldPort {
    #[serde(rename = "nodePort")]
    node_port: Option<i64>,
}

impl Held {
    fn ip(&self) -> Option<Ipv4Addr> {
        self.spec.cluster_ip.as_deref().and_then(|s| s.parse().ok())
    }

    fn node_ports(&self) -> impl Iterator<Item = i64> + '_ {
        self.spec.ports.iter().filter_map(|p| p.node_port).chain(self.spec.health_check_node_port)
    }
}

/// What one stored Service holds, and the store revision it was read or written at.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Holding {
    ip: Option<Ipv4Addr>,
    node_ports: Vec<i64>,
    revision: i64,
}

/// What a [`Allocations::repair`] pass changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Stored Services the allocations did not know (or knew at an older revision).
    pub recorded: usize,
    /// Services the allocations held that are no longer stored (a deletion was missed).
    pub released: usize,
    /// Stored Services that hold an address or port another stored Service holds too.
    pub conflicts: Vec<String>,
}

/// The ClusterIPs and NodePorts every stored Service holds, kept in memory beside the store,
/// as kube-apiserver's allocators: filled from the store at start, updated by the server's
/// own writes (`record` after a stored create or update, `release` after a delete), and
/// reconciled with the store by a periodic [`Allocations::repair`]. Allocation reads only
/// this, never the other stored Services. Keys are store keys.
///
/// Deletions are remembered with their revision until the next repair has read past them, so
/// a repair that read the store before a deletion does not bring the deleted Service back.
#[derive(Debug)]
pub struct Allocations {
    cidr: ServiceCidr,
    ips: HashMap<Ipv4Addr, String>,
    node_ports: HashMap<i64, String>,
    by_key: HashMap<String, Holding>,
    deleted: HashMap<String, i64>,
    /// Where the search for a free address / port starts (after the last one handed out), so
    /// a create costs the same however many are taken.
    next_ip: u32,
    next_port: i64,
}

impl Allocations {
    pub fn new(cidr: ServiceCidr) -> Allocations {
        Allocations {
            cidr,
            ips: HashMap::new(),
            node_ports: HashMap::new(),
            by_key: HashMap::new(),
            deleted: HashMap::new(),
            next_ip: 1,
            next_port: *NODE_PORT_RANGE.start(),
        }
    }

    pub fn cidr(&self) -> &ServiceCidr {
        &self.cidr
    }

    /// Number of Services known (each stored Service that is not ExternalName).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_key.len()
    }

    fn ip_taken(&self, ip: Ipv4Addr, key: &str) -> bool {
        self.ips.get(&ip).is_some_and(|holder| holder != key)
    }

    fn port_taken(&self, port: i64, key: &str) -> bool {
        self.node_ports.get(&port).is_some_and(|holder| holder != key)
    }

    /// The first free usable address from the cursor on (wrapping), network and broadcast
    /// excluded.
    fn free_ip(&self, key: &str) -> Option<Ipv4Addr> {
        let size = self.cidr.size();
        let start = self.next_ip.clamp(1, size - 2);
        (start..size - 1)
            .chain(1..start)
            .map(|offset| Ipv4Addr::from(self.cidr.base + offset))
            .find(|ip| !self.ip_taken(*ip, key))
    }

    fn free_port(&self, key: &str, also_taken: &HashSet<i64>) -> Option<i64> {
        let (first, last) = (*NODE_PORT_RANGE.start(), *NODE_PORT_RANGE.end());
        let start = self.next_port.clamp(first, last);
        (start..=last)
            .chain(first..start)
            .find(|p| !self.port_taken(*p, key) && !also_taken.contains(p))
    }

    /// Records what the Service stored at `key` holds now (after a create or update stored at
    /// `revision`), releasing what it held before. An older revision than the one known is
    /// ignored.
    pub fn record(&mut self, key: &str, held: &Held, revision: i64) -> Result<(), String> {
        if self.by_key.get(key).is_some_and(|h| h.revision > revision)
            || self.deleted.get(key).is_some_and(|deleted| *deleted > revision)
        {
            return Ok(());
        }
        self.forget(key);
        let holding = Holding {
            ip: held.ip().filter(|ip| self.cidr.contains(*ip)),
            node_ports: held.node_ports().collect(),
            revision,
        };
        let mut conflict = None;
        if let Some(ip) = holding.ip {
            match self.ips.get(&ip) {
                Some(other) => conflict = Some(format!("clusterIP {ip} is also held by {other}")),
                None => {
                    self.ips.insert(ip, key.to_string());
                    self.next_ip = u32::from(ip) - self.cidr.base + 1;
                }
            }
        }
        for &port in &holding.node_ports {
            match self.node_ports.get(&port) {
                Some(other) if other != key => {
                    conflict = Some(format!("nodePort {port} is also held by {other}"))
                }
                _ => {
                    self.node_ports.insert(port, key.to_string());
                    self.next_port = port + 1;
                }
            }
        }
        self.by_key.insert(key.to_string(), holding);
        match conflict {
            Some(why) => Err(format!("{key}: {why}")),
            None => Ok(()),
        }
    }

    fn forget(&mut self, key: &str) {
        if let Some(old) = self.by_key.remove(key) {
            if let Some(ip) = old.ip
                && self.ips.get(&ip).is_some_and(|holder| holder == key)
            {
                self.ips.remove(&ip);
            }
            for port in old.node_ports {
                if self.node_ports.get(&port).is_some_and(|holder| holder == key) {
                    self.node_ports.remove(&port);
                }
            }
        }
    }

    /// Releases what the Service at `key` held; it was deleted at `revision`.
    pub fn release(&mut self, key: &str, revision: i64) {
        if self.by_key.get(key).is_some_and(|h| h.revision > revision) {
            return;
        }
        self.forget(key);
        let last = self.deleted.entry(key.to_string()).or_insert(revision);
        *last = (*last).max(revision);
    }

    /// Reconciles with the Services stored at `read_revision` (key, what it holds, its
    /// mod_revision): records what is missing or newer, releases what is no longer stored
    /// unless it was written after the read.
    pub fn repair(
        &mut self,
        stored: impl IntoIterator<Item = (String, Held, i64)>,
        read_revision: i64,
    ) -> RepairReport {
        let mut report = RepairReport::default();
        let stored: Vec<(String, Held, i64)> = stored.into_iter().collect();
        let seen: HashSet<&str> = stored.iter().map(|(key, _, _)| key.as_str()).collect();
        // Missed deletions first, so what they held is free for the Services recorded next.
        let gone: Vec<String> = self
            .by_key
            .iter()
            .filter(|(key, h)| h.revision <= read_revision && !seen.contains(key.as_str()))
            .map(|(key, _)| key.clone())
            .collect();
        report.released = gone.len();
        for key in gone {
            self.forget(&key);
        }
        for (key, held, revision) in &stored {
            if self.by_key.get(key).is_some_and(|h| h.revision >= *revision)
                || self.deleted.get(key).is_some_and(|deleted| deleted > revision)
            {
                continue;
            }
            report.recorded += 1;
            if let Err(conflict) = self.record(key, held, *revision) {
                report.conflicts.push(conflict);
            }
        }
        self.deleted.retain(|_, revision| *revision > read_revision);
        report
    }
}

fn invalid(field: &str, value: Value, why: &str) -> FieldError {
    FieldError {
        reason: "FieldValueInvalid",
        field: field.into(),
        message: format!("Invalid value: {value}: {why}"),
    }
}

/// Fills in `spec.clusterIP(s)` and node ports of `svc`, to be stored at `key` (keeping what
/// `old` had), checking requested values against the CIDR, the range and what the other
/// Services hold. Nothing is taken until the caller [`Allocations::record`]s the stored
/// Service.
pub fn allocate(
    svc: &mut Value,
    old: Option<&Value>,
    allocations: &Allocations,
    key: &str,
) -> Result<(), Vec<FieldError>> {
    let cidr = allocations.cidr();
    let mut errs = Vec::new();
    let ty = svc.pointer("/spec/type").and_then(Value::as_str).unwrap_or("ClusterIP").to_string();
    let old_ip =
        old.and_then(|o| o.pointer("/spec/clusterIP")).and_then(Value::as_str).map(String::from);
    let requested = svc
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(String::from);
    let spec = svc.get_mut("spec").and_then(Value::as_object_mut);
    let Some(spec) = spec else { return Ok(()) };
    if ty == "ExternalName" {
        return Ok(());
    }
    let ip = match (requested, old_ip) {
        (Some(req), Some(old)) if req != old => {
            errs.push(invalid("spec.clusterIP", json!(req), "field is immutable"));
            old
        }
        (_, Some(old)) => old,
        (Some(req), None) if req == "None" => req,
        (Some(req), None) => {
            match req.parse::<Ipv4Addr>() {
                Ok(ip) if !cidr.contains(ip) => errs.push(invalid(
                    "spec.clusterIP",
                    json!(req),
                    "provided IP is not in the valid range",
                )),
                Ok(ip) if allocations.ip_taken(ip, key) => errs.push(invalid(
                    "spec.clusterIP",
                    json!(req),
                    "provided IP is already allocated",
                )),
                Ok(_) => {}
                Err(_) => {
                    errs.push(invalid("spec.clusterIP", json!(req), "must be a valid IPv4 address"))
                }
            }
            req
        }
        (None, None) => match allocations.free_ip(key) {
            Some(ip) => ip.to_string(),
            None => {
                errs.push(invalid("spec.clusterIP", json!(""), "the service CIDR is full"));
                String::new()
            }
        },
    };
    spec.insert("clusterIP".into(), json!(ip));
    spec.insert("clusterIPs".into(), json!([ip]));
    if ip != "None" {
        spec.entry("ipFamilies").or_insert(json!(["IPv4"]));
        spec.entry("ipFamilyPolicy").or_insert(json!("SingleStack"));
    }
    spec.entry("internalTrafficPolicy").or_insert(json!("Cluster"));
    let wants_node_ports = matches!(ty.as_str(), "NodePort" | "LoadBalancer");
    if wants_node_ports {
        spec.entry("externalTrafficPolicy").or_insert(json!("Cluster"));
    }
    let old_ports: Vec<Value> = old
        .and_then(|o| o.pointer("/spec/ports"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut taken: HashSet<i64> = HashSet::new();
    if let Some(Value::Array(ports)) = spec.get_mut("ports") {
        for (i, port) in ports.iter_mut().enumerate() {
            let Some(port) = port.as_object_mut() else { continue };
            if !wants_node_ports {
                port.remove("nodePort");
                continue;
            }
            let requested = port.get("nodePort").and_then(Value::as_i64);
            let kept = old_ports
                .iter()
                .find(|o| {
                    o.get("port") == port.get("port") && o.get("protocol") == port.get("protocol")
                })
                .and_then(|o| o.get("nodePort"))
                .and_then(Value::as_i64);
            let field = format!("spec.ports[{i}].nodePort");
            let chosen = choose_port(requested, kept, &taken, allocations, key, &field, &mut errs);
            taken.insert(chosen);
            port.insert("nodePort".into(), json!(chosen));
        }
    }
    // kube-apiserver's health-check node port: a LoadBalancer Service with
    // `externalTrafficPolicy: Local` gets one (kept across updates, or the one asked for);
    // any other Service has none (switching to Cluster releases it).
    let wants_health_check = ty == "LoadBalancer"
        && spec.get("externalTrafficPolicy").and_then(Value::as_str) == Some("Local");
    let requested = spec.get("healthCheckNodePort").and_then(Value::as_i64).filter(|p| *p != 0);
    let kept = old.and_then(|o| o.pointer("/spec/healthCheckNodePort")).and_then(Value::as_i64);
    let field = "spec.healthCheckNodePort";
    if wants_health_check {
        if requested.is_some_and(|p| !NODE_PORT_RANGE.contains(&p)) {
            errs.push(invalid(
                field,
                json!(requested),
                "provided port is not in the valid range. The range of valid ports is 30000-32767",
            ));
        } else {
            let chosen = choose_port(requested, kept, &taken, allocations, key, field, &mut errs);
            spec.insert("healthCheckNodePort".into(), json!(chosen));
        }
    } else if requested.is_some() && requested != kept {
        errs.push(invalid(
            field,
            json!(requested),
            "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'",
        ));
    } else {
        spec.remove("healthCheckNodePort");
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

/// The node port for `field`: the one requested (refused when another Service or another
/// field of this one holds it), else the one the stored Service had, else a free one.
fn choose_port(
    requested: Option<i64>,
    kept: Option<i64>,
    taken: &HashSet<i64>,
    allocations: &Allocations,
    key: &str,
    field: &str,
    errs: &mut Vec<FieldError>,
) -> i64 {
    match requested.or(kept) {
        Some(np)
            if requested.is_some()
                && Some(np) != kept
                && (taken.contains(&np) || allocations.port_taken(np, key)) =>
        {
            errs.push(invalid(field, json!(np), "provided port is already allocated"));
            np
        }
        Some(np) => np,
        None => match allocations.free_port(key, taken) {
            Some(np) => np,
            None => {
                errs.push(invalid(field, json!(0), "no free node port"));
                0
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr() -> ServiceCidr {
        ServiceCidr::parse("10.96.0.0/12").unwrap()
    }

    /// Allocates for `key` and records the result as stored at `revision`.
    fn create(a: &mut Allocations, key: &str, mut svc: Value, revision: i64) -> Value {
        allocate(&mut svc, None, a, key).unwrap();
        a.record(key, &held(&svc), revision).unwrap();
        svc
    }

    fn held(svc: &Value) -> Held {
        serde_json::from_slice(&serde_json::to_vec(svc).unwrap()).unwrap()
    }

    fn node_port() -> Value {
        json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}})
    }

    #[test]
    fn cluster_ips_are_allocated_and_conflicts_rejected() {
        let mut allocations = Allocations::new(cidr());
        let a = create(&mut allocations, "a", json!({"spec": {"ports": [{"port": 80}]}}), 1);
        assert_eq!(a.pointer("/spec/clusterIP"), Some(&json!("10.96.0.1")));
        let b = create(&mut allocations, "b", json!({"spec": {"ports": [{"port": 80}]}}), 2);
        assert_eq!(b.pointer("/spec/clusterIP"), Some(&json!("10.96.0.2")));
        let mut dup = json!({"spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}});
        assert_eq!(
            allocate(&mut dup, None, &allocations, "dup").unwrap_err()[0].field,
            "spec.clusterIP"
        );
        // A Service's own address is not a conflict for itself (an update).
        let mut again = a.clone();
        allocate(&mut again, Some(&a), &allocations, "a").unwrap();
        let mut outside = json!({"spec": {"clusterIP": "192.168.0.1", "ports": [{"port": 80}]}});
        assert!(allocate(&mut outside, None, &allocations, "o").is_err());
        let mut headless = json!({"spec": {"clusterIP": "None"}});
        allocate(&mut headless, None, &allocations, "h").unwrap();
        assert_eq!(headless.pointer("/spec/clusterIPs"), Some(&json!(["None"])));
    }

    #[test]
    fn node_ports_are_allocated_kept_and_conflicts_rejected() {
        let mut allocations = Allocations::new(cidr());
        let a = create(
            &mut allocations,
            "a",
            json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}, {"port": 443, "protocol": "TCP", "nodePort": 30001}]}}),
            1,
        );
        assert_eq!(a.pointer("/spec/ports/0/nodePort"), Some(&json!(30000)));
        assert_eq!(a.pointer("/spec/ports/1/nodePort"), Some(&json!(30001)));
        // An update without node ports keeps them.
        let mut updated = node_port();
        allocate(&mut updated, Some(&a), &allocations, "a").unwrap();
        assert_eq!(updated.pointer("/spec/ports/0/nodePort"), Some(&json!(30000)));
        assert_eq!(updated.pointer("/spec/clusterIP"), a.pointer("/spec/clusterIP"));
        let mut b = json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30001}]}});
        assert_eq!(
            allocate(&mut b, None, &allocations, "b").unwrap_err()[0].field,
            "spec.ports[0].nodePort"
        );
        let c = create(&mut allocations, "c", node_port(), 2);
        assert_eq!(c.pointer("/spec/ports/0/nodePort"), Some(&json!(30002)));
        // The update that dropped port 443 frees 30001 once stored.
        allocations.record("a", &held(&updated), 3).unwrap();
        let mut b = json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30001}]}});
        allocate(&mut b, None, &allocations, "b").unwrap();
    }

    #[test]
    fn a_local_load_balancer_gets_a_health_check_node_port_and_others_none() {
        let mut allocations = Allocations::new(cidr());
        let lb = |policy: &str| {
            json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": policy,
                            "ports": [{"port": 80, "protocol": "TCP"}]}})
        };
        let local = create(&mut allocations, "a", lb("Local"), 1);
        let node_port = local.pointer("/spec/ports/0/nodePort").unwrap().as_i64().unwrap();
        let health = local.pointer("/spec/healthCheckNodePort").unwrap().as_i64().unwrap();
        assert!(NODE_PORT_RANGE.contains(&health) && health != node_port, "{local}");
        // Held like a node port: nobody else gets it.
        let mut other = json!({"spec": {"type": "NodePort",
                                        "ports": [{"port": 80, "protocol": "TCP", "nodePort": health}]}});
        assert_eq!(
            allocate(&mut other, None, &allocations, "b").unwrap_err()[0].field,
            "spec.ports[0].nodePort"
        );
        // Kept across an update; dropped (and freed once stored) when the policy is Cluster.
        let mut updated = local.clone();
        allocate(&mut updated, Some(&local), &allocations, "a").unwrap();
        assert_eq!(updated.pointer("/spec/healthCheckNodePort"), Some(&json!(health)));
        let mut cluster = local.clone();
        cluster["spec"]["externalTrafficPolicy"] = json!("Cluster");
        allocate(&mut cluster, Some(&local), &allocations, "a").unwrap();
        assert_eq!(cluster.pointer("/spec/healthCheckNodePort"), None);
        allocations.record("a", &held(&cluster), 2).unwrap();
        allocate(&mut other, None, &allocations, "b").unwrap();
        // Asked for: given when free; refused on a Service that cannot have one, or out of range.
        let mut asked = lb("Local");
        asked["spec"]["healthCheckNodePort"] = json!(32100);
        let asked = create(&mut allocations, "c", asked, 3);
        assert_eq!(asked.pointer("/spec/healthCheckNodePort"), Some(&json!(32100)));
        let mut wrong = lb("Cluster");
        wrong["spec"]["healthCheckNodePort"] = json!(32101);
        assert_eq!(
            allocate(&mut wrong, None, &allocations, "d").unwrap_err()[0].field,
            "spec.healthCheckNodePort"
        );
        let mut outside = lb("Local");
        outside["spec"]["healthCheckNodePort"] = json!(80);
        assert!(allocate(&mut outside, None, &allocations, "e").is_err());
    }

    #[test]
    fn released_addresses_and_ports_can_be_taken_again() {
        let mut allocations = Allocations::new(cidr());
        let a = create(&mut allocations, "a", node_port(), 1);
        let _b = create(&mut allocations, "b", node_port(), 2);
        let mut same = a.clone();
        assert!(allocate(&mut same, None, &allocations, "a2").is_err());
        allocations.release("a", 3);
        let mut same = a.clone();
        allocate(&mut same, None, &allocations, "a2").unwrap();
        assert_eq!(same.pointer("/spec/clusterIP"), a.pointer("/spec/clusterIP"));
        // A failed create records nothing: what it picked stays free.
        let mut failed = node_port();
        allocate(&mut failed, None, &allocations, "f").unwrap();
        let mut next = node_port();
        allocate(&mut next, None, &allocations, "n").unwrap();
        assert_eq!(next.pointer("/spec/clusterIP"), failed.pointer("/spec/clusterIP"));
        assert_eq!(allocations.len(), 1);
    }

    #[test]
    fn the_search_wraps_around_to_free_addresses_before_the_cursor() {
        let small = ServiceCidr::parse("10.0.0.0/30").unwrap(); // two usable addresses
        let mut allocations = Allocations::new(small);
        create(&mut allocations, "a", json!({"spec": {}}), 1);
        create(&mut allocations, "b", json!({"spec": {}}), 2);
        let mut full = json!({"spec": {}});
        let errs = allocate(&mut full, None, &allocations, "c").unwrap_err();
        assert!(errs[0].message.contains("the service CIDR is full"), "{errs:?}");
        allocations.release("a", 3);
        let c = create(&mut allocations, "c", json!({"spec": {}}), 4);
        assert_eq!(c.pointer("/spec/clusterIP"), Some(&json!("10.0.0.1")));
    }

    /// Thousands of creates in a row: every address and node port distinct, and the stored
    /// shapes allocation meets (headless, ExternalName, no ports, metadata) read back.
    #[test]
    fn many_services_get_distinct_addresses_and_ports() {
        let mut allocations = Allocations::new(cidr());
        let mut ips = HashSet::new();
        let mut ports = HashSet::new();
        for i in 0..2_500 {
            let svc = create(&mut allocations, &format!("s{i}"), node_port(), i + 1);
            assert!(ips.insert(svc["spec"]["clusterIP"].clone()), "address of {i} reused");
            assert!(ports.insert(svc["spec"]["ports"][0]["nodePort"].clone()), "port {i} reused");
        }
        for (i, shape) in [
            json!({"spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
            json!({"spec": {"type": "ExternalName", "externalName": "example.com"}}),
            json!({"metadata": {}, "spec": {}}),
            json!({"metadata": {}}),
        ]
        .into_iter()
        .enumerate()
        {
            allocations.record(&format!("shape{i}"), &held(&shape), 10_000).unwrap();
        }
        assert_eq!(allocations.ips.len(), 2_500);
    }

    #[test]
    fn repair_records_missed_creates_and_releases_missed_deletes() {
        let mut allocations = Allocations::new(cidr());
        let a = create(&mut allocations, "a", node_port(), 1);
        let b = create(&mut allocations, "b", node_port(), 2);
        // The store (read at revision 10) no longer has "a" and has "c", written by someone
        // else with the address and port "a" had.
        let mut c = a.clone();
        c["spec"]["ports"][0]["nodePort"] = json!(31000);
        let report = allocations.repair([("b".into(), held(&b), 2), ("c".into(), held(&c), 9)], 10);
        assert_eq!(report, RepairReport { recorded: 1, released: 1, conflicts: vec![] });
        let mut taken = a.clone();
        assert!(allocate(&mut taken, None, &allocations, "x").is_err());
        let mut port = json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP", "nodePort": 31000}]}});
        assert!(allocate(&mut port, None, &allocations, "x").is_err());
        // Nothing changed: a second pass does nothing.
        let report = allocations.repair([("b".into(), held(&b), 2), ("c".into(), held(&c), 9)], 11);
        assert_eq!(report, RepairReport::default());
    }

    #[test]
    fn repair_keeps_writes_and_deletes_newer_than_its_read() {
        let mut allocations = Allocations::new(cidr());
        let a = create(&mut allocations, "a", node_port(), 1);
        // The repair read the store at 5; then "a" was deleted (6) and "d" created (7).
        allocations.release("a", 6);
        let d = create(&mut allocations, "d", node_port(), 7);
        let report = allocations.repair([("a".into(), held(&a), 1)], 5);
        assert_eq!(report, RepairReport::default());
        let mut again = a.clone();
        allocate(&mut again, None, &allocations, "e").unwrap();
        let mut dup = d.clone();
        assert!(allocate(&mut dup, None, &allocations, "e").is_err());
        // Stored Services that hold the same address are reported.
        let mut twin = d.clone();
        twin["spec"]["ports"][0]["nodePort"] = json!(31111);
        let report =
            allocations.repair([("d".into(), held(&d), 7), ("twin".into(), held(&twin), 8)], 9);
        assert_eq!(report.conflicts.len(), 1, "{report:?}");
        assert!(report.conflicts[0].contains("is also held by d"), "{report:?}");
    }
}
