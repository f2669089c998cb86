//! Service address allocation: ClusterIPs from the service CIDR and NodePorts from
//! 30000-32767, with conflicts rejected. Pure: the caller passes what is in use (it holds the
//! allocation lock while it lists the services and stores the result).
use std::{collections::HashSet, net::Ipv4Addr};

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

    /// The first free usable address (network and broadcast excluded).
    pub fn allocate(&self, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        (1..self.size() - 1)
            .map(|offset| Ipv4Addr::from(self.base + offset))
            .find(|ip| !used.contains(ip))
    }
}

/// What the other services hold (sets: thousands of services are checked per allocation).
#[derive(Default, Debug)]
pub struct InUse {
    pub ips: HashSet<Ipv4Addr>,
    pub node_ports: HashSet<i64>,
}

/// The parts of a stored Service that allocation reads, taken from its bytes without building
/// the whole object (every stored Service is read on each create).
#[derive(serde::Deserialize)]
pub struct Held {
    #[serde(default)]
    metadata: HeldMeta,
    #[serde(default)]
    spec: HeldSpec,
}

#[derive(Default, serde::Deserialize)]
struct HeldMeta {
    uid: Option<String>,
}

#[derive(Default, serde::Deserialize)]
struct HeldSpec {
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default)]
    ports: Vec<HeldPort>,
}

#[derive(serde::Deserialize)]
struct HeldPort {
    #[serde(rename = "nodePort")]
    node_port: Option<i64>,
}

impl Held {
    pub fn uid(&self) -> Option<&str> {
        self.metadata.uid.as_deref()
    }
}

impl InUse {
    /// Adds what a stored Service holds (its clusterIP and node ports).
    pub fn add_held(&mut self, held: &Held) {
        if let Some(ip) = held.spec.cluster_ip.as_deref().and_then(|s| s.parse().ok()) {
            self.ips.insert(ip);
        }
        self.node_ports.extend(held.spec.ports.iter().filter_map(|p| p.node_port));
    }
}

fn invalid(field: &str, value: Value, why: &str) -> FieldError {
    FieldError {
        reason: "FieldValueInvalid",
        field: field.into(),
        message: format!("Invalid value: {value}: {why}"),
    }
}

/// Fills in `spec.clusterIP(s)` and node ports of `svc` (keeping what `old` had), checking
/// requested values against the CIDR, the range and what others use.
pub fn allocate(
    svc: &mut Value,
    old: Option<&Value>,
    cidr: &ServiceCidr,
    in_use: &InUse,
) -> Result<(), Vec<FieldError>> {
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
                Ok(ip) if in_use.ips.contains(&ip) => errs.push(invalid(
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
        (None, None) => match cidr.allocate(&in_use.ips) {
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
    let mut taken: HashSet<i64> = in_use.node_ports.clone();
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
            let chosen = match requested.or(kept) {
                Some(np) if requested.is_some() && Some(np) != kept && taken.contains(&np) => {
                    errs.push(invalid(
                        &format!("spec.ports[{i}].nodePort"),
                        json!(np),
                        "provided port is already allocated",
                    ));
                    np
                }
                Some(np) => np,
                None => match NODE_PORT_RANGE.clone().find(|p| !taken.contains(p)) {
                    Some(np) => np,
                    None => {
                        errs.push(invalid(
                            &format!("spec.ports[{i}].nodePort"),
                            json!(0),
                            "no free node port",
                        ));
                        0
                    }
                },
            };
            taken.insert(chosen);
            port.insert("nodePort".into(), json!(chosen));
        }
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr() -> ServiceCidr {
        ServiceCidr::parse("10.96.0.0/12").unwrap()
    }

    #[test]
    fn cluster_ips_are_allocated_and_conflicts_rejected() {
        let mut in_use = InUse::default();
        let mut a = json!({"spec": {"ports": [{"port": 80, "protocol": "TCP"}]}});
        allocate(&mut a, None, &cidr(), &in_use).unwrap();
        assert_eq!(a.pointer("/spec/clusterIP"), Some(&json!("10.96.0.1")));
        in_use.add_held(&serde_json::from_value(a.clone()).unwrap());
        let mut b = json!({"spec": {"ports": [{"port": 80}]}});
        allocate(&mut b, None, &cidr(), &in_use).unwrap();
        assert_eq!(b.pointer("/spec/clusterIP"), Some(&json!("10.96.0.2")));
        let mut dup = json!({"spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}});
        assert_eq!(
            allocate(&mut dup, None, &cidr(), &in_use).unwrap_err()[0].field,
            "spec.clusterIP"
        );
        let mut outside = json!({"spec": {"clusterIP": "192.168.0.1", "ports": [{"port": 80}]}});
        assert!(allocate(&mut outside, None, &cidr(), &in_use).is_err());
        let mut headless = json!({"spec": {"clusterIP": "None"}});
        allocate(&mut headless, None, &cidr(), &in_use).unwrap();
        assert_eq!(headless.pointer("/spec/clusterIPs"), Some(&json!(["None"])));
    }

    #[test]
    fn node_ports_are_allocated_kept_and_conflicts_rejected() {
        let mut in_use = InUse::default();
        let mut a = json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}, {"port": 443, "protocol": "TCP", "nodePort": 30001}]}});
        allocate(&mut a, None, &cidr(), &in_use).unwrap();
        assert_eq!(a.pointer("/spec/ports/0/nodePort"), Some(&json!(30000)));
        assert_eq!(a.pointer("/spec/ports/1/nodePort"), Some(&json!(30001)));
        // An update without node ports keeps them.
        let mut updated =
            json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}});
        allocate(&mut updated, Some(&a), &cidr(), &in_use).unwrap();
        assert_eq!(updated.pointer("/spec/ports/0/nodePort"), Some(&json!(30000)));
        assert_eq!(updated.pointer("/spec/clusterIP"), a.pointer("/spec/clusterIP"));
        in_use.add_held(&serde_json::from_value(a.clone()).unwrap());
        let mut b = json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30001}]}});
        assert_eq!(
            allocate(&mut b, None, &cidr(), &in_use).unwrap_err()[0].field,
            "spec.ports[0].nodePort"
        );
        let mut c =
            json!({"spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}});
        allocate(&mut c, None, &cidr(), &in_use).unwrap();
        assert_eq!(c.pointer("/spec/ports/0/nodePort"), Some(&json!(30002)));
    }

    /// Thousands of creates in a row: every address and node port distinct, and the stored
    /// shapes allocation meets (headless, ExternalName, no ports, metadata) read back.
    #[test]
    fn many_services_get_distinct_addresses_and_ports() {
        let mut in_use = InUse::default();
        for i in 0..2_500 {
            let mut svc = json!({"metadata": {"uid": format!("u{i}"), "labels": {"a": "b"}},
                "spec": {"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}});
            allocate(&mut svc, None, &cidr(), &in_use).unwrap();
            let held: Held = serde_json::from_slice(&serde_json::to_vec(&svc).unwrap()).unwrap();
            assert_eq!(held.uid(), Some(format!("u{i}").as_str()));
            in_use.add_held(&held);
            assert_eq!(in_use.ips.len(), i + 1, "address of service {i} reused");
            assert_eq!(in_use.node_ports.len(), i + 1, "node port of service {i} reused");
        }
        for shape in [
            json!({"spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
            json!({"spec": {"type": "ExternalName", "externalName": "example.com"}}),
            json!({"metadata": {}, "spec": {}}),
        ] {
            let held: Held = serde_json::from_value(shape).unwrap();
            in_use.add_held(&held);
        }
        assert_eq!(in_use.ips.len(), 2_500);
    }
}
