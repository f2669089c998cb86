//! The cluster's DNS records, built from Services, EndpointSlices and Pods, and lookups in them.
//! Pure: no I/O, so every rule is unit-tested below.
//!
//! Records follow the Kubernetes DNS-Based Service Discovery specification (schema 1.1.0),
//! with `<zone>` the cluster domain:
//! - `<svc>.<ns>.svc.<zone>`: A/AAAA with the ClusterIPs; for a headless Service (clusterIP
//!   `None`) the addresses of its ready endpoints (all endpoints with
//!   `publishNotReadyAddresses`); for an ExternalName Service a CNAME to `externalName`.
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>`: SRV for each named port, priority 0 and weight
//!   100 on every target. The target is the Service name, or for a headless Service one target
//!   per endpoint, `<host>.<svc>.<ns>.svc.<zone>`, with the endpoint's port.
//! - `<host>.<svc>.<ns>.svc.<zone>`: A/AAAA of a headless Service's endpoint, where `<host>` is
//!   the endpoint's `hostname`, or else its address with dashes (`10-0-0-1`, `fd00--1`).
//!   A Pod with `hostname` and `subdomain` naming a headless Service of its namespace gets
//!   `<hostname>.<subdomain>.<ns>.svc.<zone>` even when its EndpointSlice carries no hostname.
//! - `<a-b-c-d>.<ns>.pod.<zone>`: A/AAAA of each Pod IP (Pods that are not Succeeded or
//!   Failed; only IPs some Pod has, like CoreDNS's `pods verified`).
//! - PTR (`in-addr.arpa`, `ip6.arpa`) for ClusterIPs, headless endpoint addresses and Pod IPs
//!   (a Pod's name only where no Service claims the address; none for hostNetwork Pods, whose
//!   address is the node's).
//! - `dns-version.<zone>`: TXT with the schema version; `<zone>`: its SOA.
//!
//! Every record has a TTL of [`TTL`] seconds: Services and endpoints change often and clients
//! should notice within seconds. Names compare case-insensitively ([`LowerName`]).
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use hickory_proto::rr::{
    LowerName, Name, RData, Record, RecordType,
    rdata::{A, AAAA, CNAME, PTR, SOA, SRV, TXT},
};
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};

/// Time to live of every record and of negative answers (the SOA minimum), in seconds.
pub const TTL: u32 = 5;
/// The version of the Kubernetes DNS schema served at `dns-version.<zone>`.
pub const SCHEMA_VERSION: &str = "1.1.0";
/// Label linking an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// CNAMEs followed inside the zone before giving up (a loop of ExternalName Services).
const MAX_CNAME_CHAIN: usize = 8;
const SRV_PRIORITY: u16 = 0;
const SRV_WEIGHT: u16 = 100;

/// Every record of the cluster, indexed by owner name.
#[derive(Debug, Clone)]
pub struct RecordSet {
    zone: LowerName,
    soa: Record,
    records: HashMap<LowerName, Vec<Record>>,
    /// Owner names inside the zone and all their ancestors up to the zone: names that exist.
    nodes: HashSet<LowerName>,
}

/// The outcome of looking a name up.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// Records for the question; a CNAME chain comes first, followed inside the zone.
    /// `outside_target` is the last CNAME's target when it leaves the zone (for the caller to
    /// resolve upstream).
    Answer { records: Vec<Record>, outside_target: Option<Name> },
    /// The name exists (perhaps only as a parent of other names) but has no record of the type.
    NoData,
    /// The name is in the cluster domain and does not exist.
    NxDomain,
    /// Not in the cluster domain and not a reverse name this set holds.
    Outside,
}

impl RecordSet {
    /// The cluster domain (an FQDN).
    pub fn zone(&self) -> &LowerName {
        &self.zone
    }

    /// The zone's SOA record, sent with negative answers.
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// How many owner names have records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Looks `name` up for records of `qtype` (`ANY` gives every record of the name).
    pub fn lookup(&self, name: &LowerName, qtype: RecordType) -> Lookup {
        if !self.zone.zone_of(name) && !self.records.contains_key(name) {
            return Lookup::Outside;
        }
        let mut answers: Vec<Record> = Vec::new();
        let mut current = name.clone();
        for _ in 0..MAX_CNAME_CHAIN {
            let Some(records) = self.records.get(&current) else {
                // A name of a CNAME chain that does not exist still answers with the chain.
                return match (answers.is_empty(), self.nodes.contains(&current)) {
                    (false, _) => Lookup::Answer { records: answers, outside_target: None },
                    (true, true) => Lookup::NoData,
                    (true, false) => Lookup::NxDomain,
                };
            };
            let matching: Vec<&Record> = records
                .iter()
                .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                .collect();
            if !matching.is_empty() {
                answers.extend(matching.into_iter().cloned());
                return Lookup::Answer { records: answers, outside_target: None };
            }
            let cname = records.iter().find_map(|r| match &r.data {
                RData::CNAME(CNAME(target)) => Some((r, target)),
                _ => None,
            });
            let Some((cname, target)) = cname else {
                return if answers.is_empty() {
                    Lookup::NoData
                } else {
                    Lookup::Answer { records: answers, outside_target: None }
                };
            };
            answers.push(cname.clone());
            let target_lower = LowerName::new(target);
            if !self.zone.zone_of(&target_lower) {
                let outside_target = Some(target.clone());
                return Lookup::Answer { records: answers, outside_target };
            }
            current = target_lower;
        }
        Lookup::Answer { records: answers, outside_target: None }
    }
}

/// Collects records, without duplicates.
struct Builder {
    zone: Name,
    records: HashMap<LowerName, Vec<Record>>,
}

impl Builder {
    fn add(&mut self, name: Name, data: RData) {
        let record = Record::from_rdata(name.clone(), TTL, data);
        let entry = self.records.entry(LowerName::new(&name)).or_default();
        if !entry.iter().any(|r| r.data == record.data) {
            entry.push(record);
        }
    }

    fn add_address(&mut self, name: &Name, ip: IpAddr) {
        let data = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        self.add(name.clone(), data);
    }

    fn has_ptr(&self, ip: IpAddr) -> bool {
        self.records.contains_key(&LowerName::new(&Name::from(ip)))
    }

    /// `labels` (each checked to be one DNS label) in front of the zone.
    fn name(&self, labels: &[&str]) -> Option<Name> {
        if !labels.iter().all(|l| is_label(l.trim_start_matches('_'))) {
            return None;
        }
        Name::from_ascii(labels.join(".")).ok()?.append_domain(&self.zone).ok()
    }
}

/// One DNS label as Kubernetes names use them: 1-63 letters, digits and inner dashes.
fn is_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// An address as one label: dots or colons replaced by dashes (`10-0-0-1`, `fd00--1`).
fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

fn protocol_label(protocol: Option<&String>) -> String {
    format!("_{}", protocol.map_or("tcp", |p| p.as_str()).to_ascii_lowercase())
}

fn parse_ips<'a>(ips: impl IntoIterator<Item = &'a String>) -> Vec<IpAddr> {
    ips.into_iter().filter_map(|ip| ip.parse().ok()).collect()
}

/// The zone's SOA, shaped like CoreDNS's (serial = generation of the record set).
fn soa(zone: &Name, serial: u32) -> Record {
    let child = |label: &str| Name::from_ascii(label).and_then(|n| n.append_domain(zone));
    let mname = child("ns.dns").unwrap_or_else(|_| zone.clone());
    let rname = child("hostmaster").unwrap_or_else(|_| zone.clone());
    let data = SOA::new(mname, rname, serial, 7200, 1800, 86400, TTL);
    Record::from_rdata(zone.clone(), TTL, RData::SOA(data))
}

struct ServiceView<'a> {
    namespace: &'a str,
    name: &'a str,
    service: &'a Service,
}

impl ServiceView<'_> {
    fn headless(&self) -> bool {
        self.service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
    }

    fn publish_not_ready(&self) -> bool {
        self.service.spec.as_ref().and_then(|s| s.publish_not_ready_addresses) == Some(true)
    }
}

fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else { return Vec::new() };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Vec::new();
    }
    let mut ips = parse_ips(status.pod_ips.iter().flatten().map(|p| &p.ip));
    if let Some(ip) = status.pod_ip.as_ref().and_then(|ip| ip.parse().ok())
        && !ips.contains(&ip)
    {
        ips.insert(0, ip);
    }
    ips
}

/// Builds the record set of `zone` (the cluster domain) from the cluster's objects. Objects
/// with names that are not DNS labels, and addresses that do not parse, give no records.
pub fn build<'a>(
    zone: &Name,
    serial: u32,
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    pods: impl IntoIterator<Item = &'a Pod>,
) -> RecordSet {
    let mut zone = zone.to_lowercase();
    zone.set_fqdn(true);
    let mut b = Builder { zone: zone.clone(), records: HashMap::new() };

    if let Some(version) = b.name(&["dns-version"]) {
        b.add(version, RData::TXT(TXT::new(vec![SCHEMA_VERSION.to_string()])));
    }

    let mut by_key: HashMap<(&str, &str), ServiceView> = HashMap::new();
    for service in services {
        let (Some(namespace), Some(name)) =
            (service.metadata.namespace.as_deref(), service.metadata.name.as_deref())
        else {
            continue;
        };
        by_key.insert((namespace, name), ServiceView { namespace, name, service });
    }
    let mut slices_by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let namespace = slice.metadata.namespace.as_deref();
        let service = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL));
        if let (Some(namespace), Some(service)) = (namespace, service) {
            slices_by_service.entry((namespace, service.as_str())).or_default().push(slice);
        }
    }

    // Sorted so that PTR records and their order do not depend on hash order.
    let mut keys: Vec<(&str, &str)> = by_key.keys().copied().collect();
    keys.sort_unstable();
    for key in &keys {
        let view = &by_key[key];
        let slices = slices_by_service.get(key).map(Vec::as_slice).unwrap_or_default();
        add_service(&mut b, view, slices);
    }

    let mut pods: Vec<&Pod> = pods.into_iter().collect();
    pods.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    for pod in pods {
        add_pod(&mut b, pod, &by_key);
    }

    let soa = soa(&zone, serial);
    b.records.insert(LowerName::new(&zone), vec![soa.clone()]);
    let zone = LowerName::new(&zone);
    let mut nodes = HashSet::new();
    nodes.insert(zone.clone());
    for name in b.records.keys() {
        let mut name = name.clone();
        while zone.zone_of(&name) && nodes.insert(name.clone()) {
            name = name.base_name();
        }
    }
    RecordSet { zone, soa, records: b.records, nodes }
}

fn add_service(b: &mut Builder, view: &ServiceView, slices: &[&EndpointSlice]) {
    let Some(base) = b.name(&[view.name, view.namespace, "svc"]) else { return };
    let Some(spec) = &view.service.spec else { return };

    if spec.type_.as_deref() == Some("ExternalName") {
        let Some(target) = spec.external_name.as_deref() else { return };
        if let Ok(mut target) = Name::from_ascii(target.trim_end_matches('.')) {
            target.set_fqdn(true);
            b.add(base, RData::CNAME(CNAME(target)));
        }
        return;
    }

    if view.headless() {
        for slice in slices {
            add_headless_slice(b, view, &base, slice);
        }
        return;
    }

    let mut cluster_ips = parse_ips(spec.cluster_ips.iter().flatten());
    if let Some(ip) = spec.cluster_ip.as_ref().and_then(|ip| ip.parse().ok())
        && !cluster_ips.contains(&ip)
    {
        cluster_ips.insert(0, ip);
    }
    if cluster_ips.is_empty() {
        return;
    }
    for &ip in &cluster_ips {
        b.add_address(&base, ip);
        b.add(Name::from(ip), RData::PTR(PTR(base.clone())));
    }
    for port in spec.ports.iter().flatten() {
        let (Some(port_name), Ok(number)) = (&port.name, u16::try_from(port.port)) else {
            continue;
        };
        let proto = protocol_label(port.protocol.as_ref());
        let port_label = format!("_{port_name}");
        let Some(srv_name) = b.name(&[&port_label, &proto, view.name, view.namespace, "svc"])
        else {
            continue;
        };
        b.add(srv_name, RData::SRV(SRV::new(SRV_PRIORITY, SRV_WEIGHT, number, base.clone())));
    }
}

fn add_headless_slice(b: &mut Builder, view: &ServiceView, base: &Name, slice: &EndpointSlice) {
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return;
    }
    let include_not_ready = view.publish_not_ready();
    for endpoint in &slice.endpoints {
        let ready = endpoint.conditions.as_ref().and_then(|c| c.ready) != Some(false);
        if !ready && !include_not_ready {
            continue;
        }
        for ip in parse_ips(&endpoint.addresses) {
            b.add_address(base, ip);
            let host = endpoint.hostname.clone().unwrap_or_else(|| dashed(ip));
            let Some(host_name) = b.name(&[&host, view.name, view.namespace, "svc"]) else {
                continue;
            };
            b.add_address(&host_name, ip);
            b.add(Name::from(ip), RData::PTR(PTR(host_name.clone())));
            for port in slice.ports.iter().flatten() {
                let (Some(port_name), Some(number)) =
                    (&port.name, port.port.and_then(|p| u16::try_from(p).ok()))
                else {
                    continue;
                };
                let proto = protocol_label(port.protocol.as_ref());
                let port_label = format!("_{port_name}");
                let labels = [port_label.as_str(), &proto, view.name, view.namespace, "svc"];
                let Some(srv_name) = b.name(&labels) else { continue };
                let srv = SRV::new(SRV_PRIORITY, SRV_WEIGHT, number, host_name.clone());
                b.add(srv_name, RData::SRV(srv));
            }
        }
    }
}

fn add_pod(b: &mut Builder, pod: &Pod, services: &HashMap<(&str, &str), ServiceView>) {
    let Some(namespace) = pod.metadata.namespace.as_deref() else { return };
    let ips = pod_ips(pod);
    if ips.is_empty() {
        return;
    }
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network) == Some(true);
    for &ip in &ips {
        let Some(name) = b.name(&[&dashed(ip), namespace, "pod"]) else { continue };
        b.add_address(&name, ip);
        if !host_network && !b.has_ptr(ip) {
            b.add(Name::from(ip), RData::PTR(PTR(name)));
        }
    }
    // hostname + subdomain naming a headless Service: <hostname>.<subdomain>.<ns>.svc.<zone>.
    let (Some(hostname), Some(subdomain)) =
        (spec.and_then(|s| s.hostname.as_deref()), spec.and_then(|s| s.subdomain.as_deref()))
    else {
        return;
    };
    let Some(service) = services.get(&(namespace, subdomain)) else { return };
    if !service.headless() || !(pod_is_ready(pod) || service.publish_not_ready()) {
        return;
    }
    if let Some(name) = b.name(&[hostname, subdomain, namespace, "svc"]) {
        for &ip in &ips {
            b.add_address(&name, ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use serde_json::{Value, json};

    use super::*;

    fn zone() -> Name {
        Name::from_ascii("cluster.local.").unwrap()
    }

    fn service(value: Value) -> Service {
        serde_json::from_value(value).unwrap()
    }

    fn slice(value: Value) -> EndpointSlice {
        serde_json::from_value(value).unwrap()
    }

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn lower(name: &str) -> LowerName {
        LowerName::new(&Name::from_ascii(name).unwrap())
    }

    fn records(set: &RecordSet, name: &str, qtype: RecordType) -> Vec<RData> {
        match set.lookup(&lower(name), qtype) {
            Lookup::Answer { records, .. } => records.into_iter().map(|r| r.data).collect(),
            other => panic!("{name} {qtype}: expected an answer, got {other:?}"),
        }
    }

    fn a(ip: [u8; 4]) -> RData {
        RData::A(A(Ipv4Addr::from(ip)))
    }

    fn srv(port: u16, target: &str) -> RData {
        RData::SRV(SRV::new(0, 100, port, Name::from_ascii(target).unwrap()))
    }

    fn web() -> Service {
        service(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"], "ports": [
                {"name": "http", "port": 80, "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"port": 9000}
            ]}
        }))
    }

    fn headless() -> Service {
        service(json!({
            "metadata": {"name": "db", "namespace": "prod"},
            "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}
        }))
    }

    fn db_slice() -> EndpointSlice {
        slice(json!({
            "metadata": {"name": "db-abc", "namespace": "prod",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "pg", "port": 15432, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.1.5"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.244.2.6"], "conditions": {}},
                {"addresses": ["10.244.3.7"], "conditions": {"ready": false}}
            ]
        }))
    }

    #[test]
    fn cluster_ip_services_get_a_records_srv_for_named_ports_and_ptr() {
        let set = build(&zone(), 1, [&web()], [], []);
        assert_eq!(
            records(&set, "web.default.svc.cluster.local.", RecordType::A),
            vec![a([10, 96, 0, 20])]
        );
        assert_eq!(
            records(&set, "_http._tcp.web.default.svc.cluster.local.", RecordType::SRV),
            vec![srv(80, "web.default.svc.cluster.local.")]
        );
        assert_eq!(
            records(&set, "_dns._udp.web.default.svc.cluster.local.", RecordType::SRV),
            vec![srv(53, "web.default.svc.cluster.local.")]
        );
        assert_eq!(
            records(&set, "20.0.96.10.in-addr.arpa.", RecordType::PTR),
            vec![RData::PTR(PTR(Name::from_ascii("web.default.svc.cluster.local.").unwrap()))]
        );
        // Unnamed ports have no SRV record; a known name without the type is NODATA.
        assert_eq!(
            set.lookup(&lower("_http._udp.web.default.svc.cluster.local."), RecordType::SRV),
            Lookup::NxDomain
        );
        assert_eq!(
            set.lookup(&lower("web.default.svc.cluster.local."), RecordType::AAAA),
            Lookup::NoData
        );
    }

    #[test]
    fn names_are_case_insensitive_and_parents_exist() {
        let set = build(&zone(), 1, [&web()], [], []);
        assert_eq!(
            records(&set, "WEB.Default.SVC.cluster.LOCAL.", RecordType::A),
            vec![a([10, 96, 0, 20])]
        );
        assert_eq!(set.lookup(&lower("default.svc.cluster.local."), RecordType::A), Lookup::NoData);
        assert_eq!(set.lookup(&lower("svc.cluster.local."), RecordType::A), Lookup::NoData);
        assert_eq!(set.lookup(&lower("cluster.local."), RecordType::A), Lookup::NoData);
        assert_eq!(
            set.lookup(&lower("nope.default.svc.cluster.local."), RecordType::A),
            Lookup::NxDomain
        );
        assert_eq!(set.lookup(&lower("other.svc.cluster.local."), RecordType::A), Lookup::NxDomain);
    }

    #[test]
    fn names_outside_the_zone_and_unknown_reverse_names_are_not_ours() {
        let set = build(&zone(), 1, [&web()], [], []);
        assert_eq!(set.lookup(&lower("example.com."), RecordType::A), Lookup::Outside);
        assert_eq!(set.lookup(&lower("local."), RecordType::A), Lookup::Outside);
        assert_eq!(set.lookup(&lower("1.1.1.1.in-addr.arpa."), RecordType::PTR), Lookup::Outside);
    }

    #[test]
    fn headless_services_answer_with_ready_endpoints_and_per_endpoint_names() {
        let set = build(&zone(), 1, [&headless()], [&db_slice()], []);
        let mut all = records(&set, "db.prod.svc.cluster.local.", RecordType::A);
        all.sort_by_key(|r| r.to_string());
        assert_eq!(
            all,
            vec![a([10, 244, 1, 5]), a([10, 244, 2, 6])],
            "not-ready 10.244.3.7 left out"
        );
        assert_eq!(
            records(&set, "db-0.db.prod.svc.cluster.local.", RecordType::A),
            vec![a([10, 244, 1, 5])]
        );
        assert_eq!(
            records(&set, "10-244-2-6.db.prod.svc.cluster.local.", RecordType::A),
            vec![a([10, 244, 2, 6])]
        );
        let mut srvs = records(&set, "_pg._tcp.db.prod.svc.cluster.local.", RecordType::SRV);
        srvs.sort_by_key(|r| r.to_string());
        assert_eq!(
            srvs,
            vec![
                srv(15432, "10-244-2-6.db.prod.svc.cluster.local."),
                srv(15432, "db-0.db.prod.svc.cluster.local."),
            ]
        );
        assert_eq!(
            records(&set, "5.1.244.10.in-addr.arpa.", RecordType::PTR),
            vec![RData::PTR(PTR(Name::from_ascii("db-0.db.prod.svc.cluster.local.").unwrap()))]
        );
        assert_eq!(
            set.lookup(&lower("10-244-3-7.db.prod.svc.cluster.local."), RecordType::A),
            Lookup::NxDomain
        );
    }

    #[test]
    fn publish_not_ready_addresses_includes_every_endpoint() {
        let mut svc = headless();
        svc.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true);
        let set = build(&zone(), 1, [&svc], [&db_slice()], []);
        assert_eq!(records(&set, "db.prod.svc.cluster.local.", RecordType::A).len(), 3);
    }

    #[test]
    fn headless_service_without_endpoints_does_not_exist() {
        let set = build(&zone(), 1, [&headless()], [], []);
        assert_eq!(
            set.lookup(&lower("db.prod.svc.cluster.local."), RecordType::A),
            Lookup::NxDomain
        );
    }

    #[test]
    fn slices_of_other_services_or_namespaces_are_not_mixed_in() {
        let mut other = db_slice();
        other.metadata.namespace = Some("dev".into());
        let set = build(&zone(), 1, [&headless()], [&other], []);
        assert_eq!(
            set.lookup(&lower("db.prod.svc.cluster.local."), RecordType::A),
            Lookup::NxDomain
        );
    }

    #[test]
    fn external_name_services_are_cnames_followed_inside_the_zone() {
        let external = service(json!({
            "metadata": {"name": "ext", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}
        }));
        let alias = service(json!({
            "metadata": {"name": "alias", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "web.default.svc.cluster.local"}
        }));
        let set = build(&zone(), 1, [&external, &alias, &web()], [], []);
        let example = Name::from_ascii("example.com.").unwrap();
        match set.lookup(&lower("ext.default.svc.cluster.local."), RecordType::A) {
            Lookup::Answer { records, outside_target } => {
                assert_eq!(records.len(), 1);
                assert_eq!(records[0].data, RData::CNAME(CNAME(example.clone())));
                assert_eq!(outside_target, Some(example));
            }
            other => panic!("{other:?}"),
        }
        let chain = records(&set, "alias.default.svc.cluster.local.", RecordType::A);
        assert_eq!(
            chain,
            vec![
                RData::CNAME(CNAME(Name::from_ascii("web.default.svc.cluster.local.").unwrap())),
                a([10, 96, 0, 20]),
            ]
        );
        // Asking for the CNAME itself gives just the CNAME.
        assert_eq!(records(&set, "alias.default.svc.cluster.local.", RecordType::CNAME).len(), 1);
    }

    #[test]
    fn cname_loops_stop() {
        let one = service(json!({
            "metadata": {"name": "one", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "two.default.svc.cluster.local"}
        }));
        let two = service(json!({
            "metadata": {"name": "two", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "one.default.svc.cluster.local"}
        }));
        let set = build(&zone(), 1, [&one, &two], [], []);
        let chain = records(&set, "one.default.svc.cluster.local.", RecordType::A);
        assert_eq!(chain.len(), MAX_CNAME_CHAIN);
    }

    #[test]
    fn pods_get_dashed_address_records_and_ptr_unless_a_service_claims_the_ip() {
        let running = pod(json!({
            "metadata": {"name": "client", "namespace": "default"},
            "spec": {"containers": []},
            "status": {"phase": "Running", "podIP": "10.244.1.9",
                       "podIPs": [{"ip": "10.244.1.9"}, {"ip": "fd00::9"}]}
        }));
        let done = pod(json!({
            "metadata": {"name": "job", "namespace": "default"},
            "spec": {"containers": []},
            "status": {"phase": "Succeeded", "podIP": "10.244.1.10"}
        }));
        let db_0 = pod(json!({
            "metadata": {"name": "db-0", "namespace": "prod"},
            "spec": {"containers": []},
            "status": {"phase": "Running", "podIP": "10.244.1.5"}
        }));
        let set = build(&zone(), 1, [&headless()], [&db_slice()], [&running, &done, &db_0]);
        assert_eq!(
            records(&set, "10-244-1-9.default.pod.cluster.local.", RecordType::A),
            vec![a([10, 244, 1, 9])]
        );
        assert_eq!(
            records(&set, "fd00--9.default.pod.cluster.local.", RecordType::AAAA),
            vec![RData::AAAA(AAAA("fd00::9".parse::<Ipv6Addr>().unwrap()))]
        );
        assert_eq!(
            records(&set, "9.1.244.10.in-addr.arpa.", RecordType::PTR),
            vec![RData::PTR(PTR(
                Name::from_ascii("10-244-1-9.default.pod.cluster.local.").unwrap()
            ))]
        );
        assert_eq!(
            set.lookup(&lower("10-244-1-10.default.pod.cluster.local."), RecordType::A),
            Lookup::NxDomain,
            "a finished Pod has given its IP back"
        );
        // The endpoint's name wins the PTR of an address both a Pod and a Service have.
        assert_eq!(
            records(&set, "5.1.244.10.in-addr.arpa.", RecordType::PTR),
            vec![RData::PTR(PTR(Name::from_ascii("db-0.db.prod.svc.cluster.local.").unwrap()))]
        );
    }

    #[test]
    fn pod_hostname_and_subdomain_name_a_ready_pod_under_its_headless_service() {
        let member = |ready: &str| {
            pod(json!({
                "metadata": {"name": "db-1-xyz", "namespace": "prod"},
                "spec": {"containers": [], "hostname": "db-1", "subdomain": "db"},
                "status": {"phase": "Running", "podIP": "10.244.2.8",
                           "conditions": [{"type": "Ready", "status": ready}]}
            }))
        };
        let set = build(&zone(), 1, [&headless()], [], [&member("True")]);
        assert_eq!(
            records(&set, "db-1.db.prod.svc.cluster.local.", RecordType::A),
            vec![a([10, 244, 2, 8])]
        );
        let set = build(&zone(), 1, [&headless()], [], [&member("False")]);
        assert_eq!(
            set.lookup(&lower("db-1.db.prod.svc.cluster.local."), RecordType::A),
            Lookup::NxDomain
        );
        // Not for a ClusterIP Service of that name.
        let mut not_headless = headless();
        not_headless.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.30".into());
        let set = build(&zone(), 1, [&not_headless], [], [&member("True")]);
        assert_eq!(
            set.lookup(&lower("db-1.db.prod.svc.cluster.local."), RecordType::A),
            Lookup::NxDomain
        );
    }

    #[test]
    fn dual_stack_services_answer_both_families() {
        let svc = service(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00:96::20"]}
        }));
        let set = build(&zone(), 1, [&svc], [], []);
        assert_eq!(
            records(&set, "web.default.svc.cluster.local.", RecordType::AAAA),
            vec![RData::AAAA(AAAA("fd00:96::20".parse::<Ipv6Addr>().unwrap()))]
        );
        assert_eq!(records(&set, "web.default.svc.cluster.local.", RecordType::ANY).len(), 2);
    }

    #[test]
    fn schema_version_soa_and_ttl() {
        let set = build(&Name::from_ascii("Example.Test").unwrap(), 42, [&web()], [], []);
        assert_eq!(
            records(&set, "dns-version.example.test.", RecordType::TXT),
            vec![RData::TXT(TXT::new(vec!["1.1.0".into()]))]
        );
        assert_eq!(records(&set, "EXAMPLE.test.", RecordType::SOA), vec![set.soa().data.clone()]);
        let RData::SOA(soa) = &set.soa().data else { panic!("SOA") };
        assert_eq!(soa.serial, 42);
        assert_eq!(soa.minimum, TTL);
        assert_eq!(set.soa().name.to_ascii(), "example.test.");
        match set.lookup(&lower("web.default.svc.example.test."), RecordType::A) {
            Lookup::Answer { records, .. } => assert!(records.iter().all(|r| r.ttl == TTL)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn objects_with_bad_names_or_addresses_give_no_records_and_no_panic() {
        let bad = service(json!({
            "metadata": {"name": "bad.name", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.21"}
        }));
        let garbage_ip = service(json!({
            "metadata": {"name": "garbage", "namespace": "default"},
            "spec": {"clusterIP": "not-an-ip", "ports": [{"name": "http", "port": 80}]}
        }));
        let odd_slice = slice(json!({
            "metadata": {"name": "db-x", "namespace": "prod",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "FQDN",
            "endpoints": [{"addresses": ["db.example.com"]}]
        }));
        let bad_host = slice(json!({
            "metadata": {"name": "db-y", "namespace": "prod",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "bad port!", "port": 1}],
            "endpoints": [{"addresses": ["10.244.9.9", "nonsense"], "hostname": "a.b"}]
        }));
        let set = build(&zone(), 1, [&bad, &garbage_ip, &headless()], [&odd_slice, &bad_host], []);
        assert_eq!(
            set.lookup(&lower("bad.name.default.svc.cluster.local."), RecordType::A),
            Lookup::NxDomain
        );
        assert_eq!(
            set.lookup(&lower("garbage.default.svc.cluster.local."), RecordType::A),
            Lookup::NxDomain
        );
        // The endpoint's address still counts for the Service; its bad hostname names nothing.
        assert_eq!(
            records(&set, "db.prod.svc.cluster.local.", RecordType::A),
            vec![a([10, 244, 9, 9])]
        );
        assert_eq!(
            set.lookup(&lower("a.b.db.prod.svc.cluster.local."), RecordType::A),
            Lookup::NxDomain
        );
    }
}
