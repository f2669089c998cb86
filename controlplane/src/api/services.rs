//! Service address allocation: ClusterIPs from the service CIDRs (one family, or IPv4 and
//! IPv6 for dual-stack) and NodePorts from 30000-32767, with conflicts rejected, and
//! kube-apiserver's defaulting and validation of `ipFamilyPolicy`, `ipFamilies` and
//! `clusterIPs`. Pure: [`Allocations`] is what the stored Services hold; the caller keeps it
//! beside the store, serializes allocate → store → record under one lock, and releases on
//! delete.
use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde_json::{Map, Value, json};

use crate::resources::validate::{self, FieldError};

pub const NODE_PORT_RANGE: std::ops::RangeInclusive<i64> = 30000..=32767;

/// Prefix lengths a service CIDR may have. IPv4 as before; IPv6 from /64 (the allocator keeps
/// only the addresses handed out and finds a free one within (held + 1) probes from its
/// cursor, so the size of the range costs nothing) to /126 (three usable addresses).
const IPV4_PREFIXES: std::ops::RangeInclusive<u8> = 8..=30;
const IPV6_PREFIXES: std::ops::RangeInclusive<u8> = 64..=126;

/// What `--service-cidr` looks like, for error messages.
const SERVICE_CIDR_FORM: &str = "pass one CIDR (IPv4 /8-/30 or IPv6 /64-/126) or an IPv4,IPv6 pair such as \
     10.96.0.0/12,fd00:10:96::/108 (the primary family first)";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> IpFamily {
        if ip.is_ipv4() { IpFamily::V4 } else { IpFamily::V6 }
    }

    /// The name the API uses (`spec.ipFamilies`, EndpointSlice `addressType`).
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    fn parse(name: &str) -> Option<IpFamily> {
        match name {
            "IPv4" => Some(IpFamily::V4),
            "IPv6" => Some(IpFamily::V6),
            _ => None,
        }
    }

    fn other(self) -> IpFamily {
        match self {
            IpFamily::V4 => IpFamily::V6,
            IpFamily::V6 => IpFamily::V4,
        }
    }

    fn bits(self) -> u8 {
        match self {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        }
    }
}

/// One service CIDR. Addresses are handled as offsets from its base.
#[derive(Clone, Copy, Debug)]
pub struct ServiceCidr {
    family: IpFamily,
    base: u128,
    prefix: u8,
}

impl ServiceCidr {
    fn parse(cidr: &str) -> Result<ServiceCidr, String> {
        let not_a_cidr = || format!("{cidr:?} is not a CIDR (ADDRESS/PREFIX)");
        let (addr, prefix) = cidr.split_once('/').ok_or_else(not_a_cidr)?;
        let addr: IpAddr = addr.parse().map_err(|_| not_a_cidr())?;
        let prefix: u8 = prefix.parse().map_err(|_| not_a_cidr())?;
        let family = IpFamily::of(addr);
        let allowed = match family {
            IpFamily::V4 => IPV4_PREFIXES,
            IpFamily::V6 => IPV6_PREFIXES,
        };
        if !allowed.contains(&prefix) {
            return Err(format!(
                "{cidr}: an {} service CIDR needs a prefix between /{} and /{}",
                family.as_str(),
                allowed.start(),
                allowed.end()
            ));
        }
        let host_bits = family.bits() - prefix;
        let base = (to_u128(addr) >> host_bits) << host_bits;
        Ok(ServiceCidr { family, base, prefix })
    }

    pub fn family(&self) -> IpFamily {
        self.family
    }

    fn size(&self) -> u128 {
        1 << (self.family.bits() - self.prefix)
    }

    /// The offsets that may be handed out: not the network address, and for IPv4 not the
    /// broadcast address (kube-apiserver's rule).
    fn usable(&self) -> (u128, u128) {
        match self.family {
            IpFamily::V4 => (1, self.size() - 2),
            IpFamily::V6 => (1, self.size() - 1),
        }
    }

    fn at(&self, offset: u128) -> IpAddr {
        let value = self.base + offset;
        match self.family {
            IpFamily::V4 => IpAddr::V4(Ipv4Addr::from(value as u32)),
            IpFamily::V6 => IpAddr::V6(Ipv6Addr::from(value)),
        }
    }

    /// The offset of `ip` when it is a usable address of this CIDR.
    fn offset(&self, ip: IpAddr) -> Option<u128> {
        if IpFamily::of(ip) != self.family {
            return None;
        }
        let offset = to_u128(ip).checked_sub(self.base)?;
        let (first, last) = self.usable();
        (first..=last).contains(&offset).then_some(offset)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.offset(ip).is_some()
    }

    /// The address of the `kubernetes` service: the first usable one.
    pub fn first(&self) -> IpAddr {
        self.at(self.usable().0)
    }
}

impl fmt::Display for ServiceCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.at(0), self.prefix)
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4).into(),
        IpAddr::V6(v6) => v6.into(),
    }
}

/// The service CIDRs of the cluster: one, or one per family with the primary family (the one
/// single-stack Services get) first, as kube-apiserver's `--service-cluster-ip-range`.
#[derive(Clone, Debug)]
pub struct ServiceCidrs(Vec<ServiceCidr>);

impl ServiceCidrs {
    /// Parses `--service-cidr`; the error says what is wrong and what to pass.
    pub fn parse(value: &str) -> Result<ServiceCidrs, String> {
        let parts: Vec<&str> = value.split(',').map(str::trim).collect();
        if parts.len() > 2 {
            return Err(format!("{value:?} has {} CIDRs; {SERVICE_CIDR_FORM}", parts.len()));
        }
        let cidrs = parts
            .iter()
            .map(|part| ServiceCidr::parse(part))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|why| format!("{why}; {SERVICE_CIDR_FORM}"))?;
        if let [a, b] = cidrs.as_slice()
            && a.family == b.family
        {
            return Err(format!(
                "{value:?} has two {} CIDRs; a dual-stack cluster needs one IPv4 and one IPv6 CIDR",
                a.family.as_str()
            ));
        }
        Ok(ServiceCidrs(cidrs))
    }

    pub fn primary(&self) -> &ServiceCidr {
        &self.0[0]
    }

    pub fn get(&self, family: IpFamily) -> Option<&ServiceCidr> {
        self.0.iter().find(|c| c.family == family)
    }

    pub fn dual_stack(&self) -> bool {
        self.0.len() == 2
    }
}

impl fmt::Display for ServiceCidrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&all.join(","))
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
    #[serde(rename = "clusterIPs")]
    cluster_ips: Option<Vec<String>>,
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
    /// `clusterIPs`, or `clusterIP` for a Service stored before the list existed.
    fn ips(&self) -> Vec<IpAddr> {
        let spec = &self.spec;
        match spec.cluster_ips.as_deref() {
            Some(ips) if !ips.is_empty() => ips.iter().filter_map(|s| s.parse().ok()).collect(),
            _ => spec.cluster_ip.iter().filter_map(|s| s.parse().ok()).collect(),
        }
    }

    fn node_ports(&self) -> impl Iterator<Item = i64> + '_ {
        self.spec.ports.iter().filter_map(|p| p.node_port).chain(self.spec.health_check_node_port)
    }
}

/// What one stored Service holds, and the store revision it was read or written at.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Holding {
    ips: Vec<IpAddr>,
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

/// The addresses of one service CIDR that stored Services hold (by store key): memory grows
/// with the Services, not with the size of the range.
#[derive(Debug)]
struct Pool {
    cidr: ServiceCidr,
    held: HashMap<IpAddr, String>,
    /// Where the search for a free address starts (after the last one handed out), so a
    /// create costs the same however many are taken.
    next: u128,
}

impl Pool {
    /// The first free usable address from the cursor on (wrapping). Only `held.len()`
    /// addresses are taken, so at most that many probes fail before a free one.
    fn free(&self) -> Option<IpAddr> {
        let (first, last) = self.cidr.usable();
        let taken = self.held.len() as u128;
        if taken > last - first {
            return None;
        }
        let start = self.next.clamp(first, last);
        (start..=last)
            .chain(first..start)
            .take(self.held.len() + 1)
            .map(|offset| self.cidr.at(offset))
            .find(|ip| !self.held.contains_key(ip))
    }
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
    cidrs: ServiceCidrs,
    /// One per service CIDR, in the same order.
    pools: Vec<Pool>,
    node_ports: HashMap<i64, String>,
    by_key: HashMap<String, Holding>,
    deleted: HashMap<String, i64>,
    next_port: i64,
}

impl Allocations {
    pub fn new(cidrs: ServiceCidrs) -> Allocations {
        let pools = cidrs.0.iter().map(|&cidr| Pool { cidr, held: HashMap::new(), next: 1 });
        Allocations {
            pools: pools.collect(),
            cidrs,
            node_ports: HashMap::new(),
            by_key: HashMap::new(),
            deleted: HashMap::new(),
            next_port: *NODE_PORT_RANGE.start(),
        }
    }

    pub fn cidrs(&self) -> &ServiceCidrs {
        &self.cidrs
    }

    /// Number of Services known (each stored Service that is not ExternalName).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_key.len()
    }

    fn pool_of(&self, ip: IpAddr) -> Option<usize> {
        self.pools.iter().position(|p| p.cidr.contains(ip))
    }

    fn ip_taken(&self, ip: IpAddr, key: &str) -> bool {
        self.pools.iter().any(|p| p.held.get(&ip).is_some_and(|holder| holder != key))
    }

    fn free_ip(&self, family: IpFamily) -> Option<IpAddr> {
        self.pools.iter().find(|p| p.cidr.family == family)?.free()
    }

    fn port_taken(&self, port: i64, key: &str) -> bool {
        self.node_ports.get(&port).is_some_and(|holder| holder != key)
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
            ips: held.ips().into_iter().filter(|ip| self.pool_of(*ip).is_some()).collect(),
            node_ports: held.node_ports().collect(),
            revision,
        };
        let mut conflict = None;
        for &ip in &holding.ips {
            let Some(pool) = self.pool_of(ip).map(|i| &mut self.pools[i]) else { continue };
            match pool.held.get(&ip) {
                Some(other) if other != key => {
                    conflict = Some(format!("clusterIP {ip} is also held by {other}"))
                }
                _ => {
                    pool.held.insert(ip, key.to_string());
                    pool.next = pool.cidr.offset(ip).unwrap_or(0) + 1;
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
            for ip in old.ips {
                for pool in &mut self.pools {
                    if pool.held.get(&ip).is_some_and(|holder| holder == key) {
                        pool.held.remove(&ip);
                    }
                }
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

const SINGLE_STACK: &str = "SingleStack";
const PREFER_DUAL_STACK: &str = "PreferDualStack";
const REQUIRE_DUAL_STACK: &str = "RequireDualStack";

/// The address fields of a Service spec as sent: "", empty or None where absent.
#[derive(Clone, Debug, Default)]
struct IpFields {
    cluster_ip: String,
    cluster_ips: Vec<String>,
    families: Vec<String>,
    policy: Option<String>,
}

impl IpFields {
    fn read(spec: &Map<String, Value>) -> IpFields {
        // Values of the wrong JSON type are kept as their JSON text, which validation refuses.
        let text = |v: &Value| v.as_str().map(String::from).unwrap_or_else(|| v.to_string());
        let list = |name: &str| -> Vec<String> {
            let items = spec.get(name).and_then(Value::as_array);
            items.map(|a| a.iter().map(text).collect()).unwrap_or_default()
        };
        IpFields {
            cluster_ip: spec.get("clusterIP").map(text).unwrap_or_default(),
            cluster_ips: list("clusterIPs"),
            families: list("ipFamilies"),
            policy: spec.get("ipFamilyPolicy").filter(|v| !v.is_null()).map(text),
        }
    }

    fn write(&self, spec: &mut Map<String, Value>) {
        let mut put = |name: &str, value: Option<Value>| match value {
            Some(v) => spec.insert(name.into(), v),
            None => spec.remove(name),
        };
        put("clusterIP", (!self.cluster_ip.is_empty()).then(|| json!(self.cluster_ip)));
        put("clusterIPs", (!self.cluster_ips.is_empty()).then(|| json!(self.cluster_ips)));
        put("ipFamilies", (!self.families.is_empty()).then(|| json!(self.families)));
        put("ipFamilyPolicy", self.policy.as_ref().map(|p| json!(p)));
    }

    fn headless(&self) -> bool {
        self.cluster_ip == "None" || self.cluster_ips.first().is_some_and(|ip| ip == "None")
    }

    fn policy(&self) -> &str {
        self.policy.as_deref().unwrap_or("")
    }
}

/// kube-apiserver's strategy before validation: an update that leaves the addresses out keeps
/// them (patchAllocatedValues), `clusterIPs` follows `clusterIP` for clients that only know
/// the singular field (normalizeClusterIPs), and turning into ExternalName drops the address
/// fields left unchanged (dropTypeDependentFields).
fn prepare(new: &mut IpFields, old: Option<&IpFields>, external_name: bool) {
    let Some(old) = old else {
        if !new.cluster_ip.is_empty() && new.cluster_ips.is_empty() {
            new.cluster_ips = vec![new.cluster_ip.clone()];
        }
        return;
    };
    if !external_name {
        if new.cluster_ip.is_empty() {
            new.cluster_ip = old.cluster_ip.clone();
        }
        if new.cluster_ips.is_empty() {
            new.cluster_ips = old.cluster_ips.clone();
        }
    }
    if !old.cluster_ips.is_empty() && new.cluster_ips.is_empty() && old.cluster_ip == new.cluster_ip
    {
        new.cluster_ips = old.cluster_ips.clone();
    }
    if old.cluster_ip != new.cluster_ip && old.cluster_ips == new.cluster_ips {
        new.cluster_ips =
            if new.cluster_ip.is_empty() { Vec::new() } else { vec![new.cluster_ip.clone()] };
    }
    if external_name {
        if new.cluster_ip == old.cluster_ip {
            new.cluster_ip.clear();
        }
        if new.cluster_ips == old.cluster_ips {
            new.cluster_ips.clear();
        }
        if new.families == old.families {
            new.families.clear();
        }
        if new.policy == old.policy {
            new.policy = None;
        }
    }
}

/// kube-apiserver's ValidateServiceClusterIPsRelatedFields: the fields on their own.
fn check_fields(new: &IpFields, errs: &mut Vec<FieldError>) {
    let list = json!(new.cluster_ips);
    if !new.cluster_ip.is_empty() {
        match new.cluster_ips.first() {
            None => errs.push(validate::required("spec.clusterIPs")),
            Some(first) if *first != new.cluster_ip => errs.push(validate::invalid(
                "spec.clusterIPs",
                &list,
                "first value must match `clusterIP`",
            )),
            Some(_) => {}
        }
    } else if !new.cluster_ips.is_empty() {
        errs.push(validate::invalid(
            "spec.clusterIPs",
            &list,
            "must be empty when `clusterIP` is not specified",
        ));
    }
    let mut seen = Vec::new();
    for (i, family) in new.families.iter().enumerate() {
        let field = format!("spec.ipFamilies[{i}]");
        if IpFamily::parse(family).is_none() {
            errs.push(validate::unsupported(field, &json!(family), &["IPv4", "IPv6"]));
        } else if seen.contains(family) {
            errs.push(validate::duplicate(field, family));
        }
        seen.push(family.clone());
    }
    if let Some(policy) = &new.policy
        && ![SINGLE_STACK, PREFER_DUAL_STACK, REQUIRE_DUAL_STACK].contains(&policy.as_str())
    {
        errs.push(validate::unsupported(
            "spec.ipFamilyPolicy",
            &json!(policy),
            &[PREFER_DUAL_STACK, REQUIRE_DUAL_STACK, SINGLE_STACK],
        ));
    }
    let mut ips = Vec::new();
    for (i, ip) in new.cluster_ips.iter().enumerate() {
        if i == 0 && ip == "None" {
            if new.cluster_ips.len() > 1 {
                errs.push(validate::invalid(
                    "spec.clusterIPs",
                    &list,
                    "'None' must be the first and only value",
                ));
            }
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => errs.push(validate::invalid(
                format!("spec.clusterIPs[{i}]"),
                &json!(ip),
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            )),
        }
    }
    if new.cluster_ips.len() > 2 {
        errs.push(validate::invalid("spec.clusterIPs", &list, "may only hold up to 2 values"));
    }
    if ips.len() < new.cluster_ips.len() {
        return;
    }
    if let [a, b] = ips.as_slice()
        && IpFamily::of(*a) == IpFamily::of(*b)
    {
        errs.push(validate::invalid(
            "spec.clusterIPs",
            &list,
            "may specify no more than one IP for each IP family",
        ));
    }
    for (i, (ip, family)) in ips.iter().zip(&new.families).enumerate() {
        if let Some(family) = IpFamily::parse(family)
            && IpFamily::of(*ip) != family
        {
            errs.push(validate::invalid(
                format!("spec.clusterIPs[{i}]"),
                &json!(ip),
                format!("expected an {} value as indicated by `ipFamilies[{i}]`", family.as_str()),
            ));
        }
    }
}

/// kube-apiserver's update rules: the primary clusterIP and family never change; a secondary
/// one may be added, and removed only with `ipFamilyPolicy: SingleStack`.
fn check_update(new: &IpFields, old: &IpFields, errs: &mut Vec<FieldError>) {
    let single = new.policy() == SINGLE_STACK;
    if !(new.headless() && old.headless()) {
        if new.cluster_ips.is_empty() && !old.cluster_ips.is_empty() {
            errs.push(validate::invalid(
                "spec.clusterIPs[0]",
                &json!(new.cluster_ips),
                "primary clusterIP can not be unset",
            ));
        }
        check_kept(
            &new.cluster_ips,
            &old.cluster_ips,
            "spec.clusterIPs",
            "clusterIP",
            single,
            errs,
        );
    }
    // Headless Services may change families (they hold no addresses).
    if !new.headless() && !old.headless() && !new.families.is_empty() {
        check_kept(&new.families, &old.families, "spec.ipFamilies", "ipFamily", single, errs);
    }
}

fn check_kept(
    new: &[String],
    old: &[String],
    field: &str,
    what: &str,
    single: bool,
    errs: &mut Vec<FieldError>,
) {
    let list = json!(new);
    for (i, (new, old)) in new.iter().zip(old).enumerate() {
        if new != old {
            errs.push(validate::invalid(format!("{field}[{i}]"), &list, "may not change once set"));
        }
    }
    if new.len() == 1 && old.len() == 2 && !single {
        errs.push(validate::invalid(
            format!("{field}[0]"),
            &list,
            format!(
                "`ipFamilyPolicy` must be set to 'SingleStack' when releasing the secondary {what}"
            ),
        ));
    }
}

/// kube-apiserver's initIPFamilyFields: defaults `ipFamilyPolicy` and `ipFamilies` for the
/// cluster's CIDRs, checks them against it, and on updates applies a SingleStack downgrade.
/// `old` is the stored Service's fields unless it was ExternalName.
fn init_families(
    new: &mut IpFields,
    old: Option<&IpFields>,
    selectorless: bool,
    cidrs: &ServiceCidrs,
    errs: &mut Vec<FieldError>,
) {
    let primary = cidrs.primary().family();
    if let Some(old) = old
        && new.policy() == SINGLE_STACK
    {
        // Setting SingleStack with the lists as they were is asking for the downgrade.
        if new.cluster_ips == old.cluster_ips && new.cluster_ips.len() > 1 {
            new.cluster_ips.truncate(1);
        }
        if new.families == old.families && new.families.len() > 1 {
            new.families.truncate(1);
        }
    }
    if new.policy() == SINGLE_STACK {
        for (list, what) in [(&new.cluster_ips, "cluster IPs"), (&new.families, "IP families")] {
            if list.len() == 2 {
                errs.push(validate::invalid(
                    "spec.ipFamilyPolicy",
                    &json!(new.policy),
                    format!("must be 'RequireDualStack' or 'PreferDualStack' when multiple {what} are specified"),
                ));
            }
        }
    }
    for (i, ip) in new.cluster_ips.iter().enumerate().skip(new.families.len()) {
        let Ok(ip) = ip.parse::<IpAddr>() else { break };
        let family = IpFamily::of(ip);
        if cidrs.get(family).is_some() {
            new.families.push(family.as_str().into());
        } else {
            errs.push(validate::invalid(
                format!("spec.clusterIPs[{i}]"),
                &json!(new.cluster_ips),
                format!("{} is not configured on this cluster", family.as_str()),
            ));
        }
    }
    if !errs.is_empty() {
        return;
    }
    let add_other = |families: &mut Vec<String>| {
        if let Some(first) = families.first().and_then(|f| IpFamily::parse(f)) {
            families.push(first.other().as_str().into());
        }
    };
    // Headless without a selector: anything goes, also dual-stack on a single-stack cluster
    // (there is nothing to allocate).
    if new.headless() && selectorless {
        if new.families.is_empty() {
            new.families.push(primary.as_str().into());
        }
        if new.families.len() < 2 && new.policy() != SINGLE_STACK {
            add_other(&mut new.families);
        }
        return;
    }
    if new.policy() == REQUIRE_DUAL_STACK && !cidrs.dual_stack() {
        errs.push(validate::invalid(
            "spec.ipFamilyPolicy",
            &json!(new.policy),
            format!(
                "this cluster is not configured for dual-stack services (its service CIDR is \
                 {cidrs}); use SingleStack or PreferDualStack"
            ),
        ));
    }
    for (i, family) in new.families.iter().enumerate() {
        if IpFamily::parse(family).is_some_and(|f| cidrs.get(f).is_none()) {
            errs.push(validate::invalid(
                format!("spec.ipFamilies[{i}]"),
                &json!(family),
                format!("not configured on this cluster (its service CIDR is {cidrs})"),
            ));
        }
    }
    if !errs.is_empty() {
        return;
    }
    if new.families.is_empty() {
        new.families.push(primary.as_str().into());
    }
    if new.policy() != SINGLE_STACK && new.families.len() == 1 && cidrs.dual_stack() {
        add_other(&mut new.families);
    }
}

/// An update of a PreferDualStack Service that leaves its addresses as they are: not
/// upgraded or downgraded after the cluster changed to or from dual-stack.
fn unchanged_prefer_dual_stack(new: &IpFields, old: &IpFields) -> bool {
    new.policy() == PREFER_DUAL_STACK
        && old.policy.as_deref().is_none_or(|p| p == PREFER_DUAL_STACK)
        && new.cluster_ips == old.cluster_ips
        && new.families == old.families
}

/// Defaults, checks and allocates `clusterIP`, `clusterIPs`, `ipFamilies` and
/// `ipFamilyPolicy` of `spec` (`old_spec`: the stored one on updates), as kube-apiserver.
/// Requested addresses must be usable addresses of their family's CIDR and free; missing ones
/// are picked; a stored one is kept.
fn cluster_ips(
    spec: &mut Map<String, Value>,
    old_spec: Option<&Value>,
    allocations: &Allocations,
    key: &str,
) -> Result<(), Vec<FieldError>> {
    let cidrs = allocations.cidrs();
    let type_of = |spec: &Map<String, Value>| {
        spec.get("type").and_then(Value::as_str).unwrap_or("ClusterIP").to_string()
    };
    let ty = type_of(spec);
    let external_name = ty == "ExternalName";
    let old_type = old_spec.and_then(Value::as_object).map(type_of);
    // The stored fields, unless it was ExternalName (then this is as a create).
    let old = old_spec
        .filter(|_| old_type.as_deref() != Some("ExternalName"))
        .and_then(Value::as_object)
        .map(IpFields::read);
    let mut new = IpFields::read(spec);
    prepare(&mut new, old.as_ref(), external_name);
    let mut errs = Vec::new();
    if external_name {
        let why = "may not be set for ExternalName services";
        if !new.cluster_ips.is_empty() {
            errs.push(validate::forbidden("spec.clusterIPs", why));
        } else if !new.cluster_ip.is_empty() {
            errs.push(validate::forbidden("spec.clusterIP", why));
        }
        if !new.families.is_empty() {
            errs.push(validate::forbidden("spec.ipFamilies", why));
        }
        if new.policy.is_some() {
            errs.push(validate::forbidden("spec.ipFamilyPolicy", why));
        }
        new.write(spec);
        return if errs.is_empty() { Ok(()) } else { Err(errs) };
    }
    let selectorless = spec.get("selector").and_then(Value::as_object).is_none_or(|m| m.is_empty());
    if new.policy.is_none() {
        new.policy = Some(match old.as_ref().and_then(|o| o.policy.clone()) {
            Some(policy) => policy,
            None if new.headless() && selectorless => REQUIRE_DUAL_STACK.into(),
            None => SINGLE_STACK.into(),
        });
    }
    check_fields(&new, &mut errs);
    if let Some(old) = &old {
        check_update(&new, old, &mut errs);
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    if old.as_ref().is_some_and(|old| {
        old_type.as_deref() == Some(ty.as_str()) && unchanged_prefer_dual_stack(&new, old)
    }) {
        new.write(spec);
        return Ok(());
    }
    init_families(&mut new, old.as_ref(), selectorless, cidrs, &mut errs);
    if !errs.is_empty() {
        return Err(errs);
    }
    if new.headless() {
        new.cluster_ip = "None".into();
        new.cluster_ips = vec!["None".into()];
        new.write(spec);
        return Ok(());
    }
    let stored: &[String] = old.as_ref().map(|o| o.cluster_ips.as_slice()).unwrap_or_default();
    for (i, family) in new.families.iter().enumerate() {
        // Both known: the families were checked above.
        let Some(family) = IpFamily::parse(family) else { continue };
        let Some(cidr) = cidrs.get(family) else { continue };
        let field = format!("spec.clusterIPs[{i}]");
        match new.cluster_ips.get(i).map(|ip| (ip, ip.parse::<IpAddr>())) {
            Some((requested, _)) if stored.contains(requested) => {}
            Some((requested, Ok(ip))) => {
                let why = if !cidr.contains(ip) {
                    format!(
                        "the provided IP is not in the valid range. The range of valid IPs is {cidr}"
                    )
                } else if allocations.ip_taken(ip, key) {
                    "provided IP is already allocated".to_string()
                } else {
                    continue;
                };
                errs.push(validate::invalid(
                    field,
                    &json!(requested),
                    format!("failed to allocate IP {requested}: {why}"),
                ));
            }
            Some((_, Err(_))) => {}
            None => match allocations.free_ip(family) {
                Some(ip) => new.cluster_ips.push(ip.to_string()),
                None => errs.push(validate::invalid(
                    field,
                    &json!(""),
                    format!("the {} service CIDR {cidr} is full", family.as_str()),
                )),
            },
        }
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    new.cluster_ip = new.cluster_ips.first().cloned().unwrap_or_default();
    new.write(spec);
    Ok(())
}

/// Fills in `spec.clusterIP(s)`, `ipFamilies`, `ipFamilyPolicy` and node ports of `svc`, to
/// be stored at `key` (keeping what `old` had), checking requested values against the CIDRs,
/// the range and what the other Services hold. Nothing is taken until the caller
/// [`Allocations::record`]s the stored Service.
pub fn allocate(
    svc: &mut Value,
    old: Option<&Value>,
    allocations: &Allocations,
    key: &str,
) -> Result<(), Vec<FieldError>> {
    let ty = svc.pointer("/spec/type").and_then(Value::as_str).unwrap_or("ClusterIP").to_string();
    let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) else { return Ok(()) };
    cluster_ips(spec, old.and_then(|o| o.get("spec")), allocations, key)?;
    if ty == "ExternalName" {
        return Ok(());
    }
    let mut errs = Vec::new();
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
            errs.push(validate::invalid(
                field,
                &json!(requested),
                "provided port is not in the valid range. The range of valid ports is 30000-32767",
            ));
        } else {
            let chosen = choose_port(requested, kept, &taken, allocations, key, field, &mut errs);
            spec.insert("healthCheckNodePort".into(), json!(chosen));
        }
    } else if requested.is_some() && requested != kept {
        errs.push(validate::invalid(
            field,
            &json!(requested),
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
            errs.push(validate::invalid(field, &json!(np), "provided port is already allocated"));
            np
        }
        Some(np) => np,
        None => match allocations.free_port(key, taken) {
            Some(np) => np,
            None => {
                errs.push(validate::invalid(field, &json!(0), "no free node port"));
                0
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr() -> ServiceCidrs {
        ServiceCidrs::parse("10.96.0.0/12").unwrap()
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
            "spec.clusterIPs[0]"
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
        let small = ServiceCidrs::parse("10.0.0.0/30").unwrap(); // two usable addresses
        let mut allocations = Allocations::new(small);
        create(&mut allocations, "a", json!({"spec": {}}), 1);
        create(&mut allocations, "b", json!({"spec": {}}), 2);
        let mut full = json!({"spec": {}});
        let errs = allocate(&mut full, None, &allocations, "c").unwrap_err();
        assert!(errs[0].message.contains("the IPv4 service CIDR 10.0.0.0/30 is full"), "{errs:?}");
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
        assert_eq!(allocations.pools[0].held.len(), 2_500);
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

    fn dual() -> ServiceCidrs {
        ServiceCidrs::parse("10.96.0.0/12,fd00:96::/112").unwrap()
    }

    fn web(spec: Value) -> Value {
        let mut svc = json!({"spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}});
        for (k, v) in spec.as_object().unwrap() {
            svc["spec"][k] = v.clone();
        }
        svc
    }

    /// The errors of an allocation that must fail, checked to hold one for `field` whose
    /// message contains `text`.
    fn refused(a: &Allocations, mut svc: Value, old: Option<&Value>, field: &str, text: &str) {
        let errs = allocate(&mut svc, old, a, "refused").unwrap_err();
        assert!(
            errs.iter().any(|e| e.field == field && e.message.contains(text)),
            "wanted {field}: ...{text}... in {errs:?}"
        );
    }

    fn spec_of(svc: &Value, field: &str) -> Value {
        svc["spec"][field].clone()
    }

    #[test]
    fn service_cidrs_are_one_cidr_or_one_of_each_family() {
        let one = ServiceCidrs::parse("10.96.0.1/12").unwrap();
        assert_eq!((one.to_string(), one.dual_stack()), ("10.96.0.0/12".into(), false));
        let v6 = ServiceCidrs::parse("fd00:10:96::/108").unwrap();
        assert_eq!(v6.primary().family(), IpFamily::V6);
        assert_eq!(v6.primary().first(), "fd00:10:96::1".parse::<IpAddr>().unwrap());
        let pair = ServiceCidrs::parse("fd00:96::/64, 10.96.0.0/16").unwrap();
        assert!(pair.dual_stack());
        assert_eq!(pair.primary().family(), IpFamily::V6);
        assert_eq!(pair.to_string(), "fd00:96::/64,10.96.0.0/16");
        for (bad, why) in [
            ("10.96.0.0/31", "an IPv4 service CIDR needs a prefix between /8 and /30"),
            ("fd00::/48", "an IPv6 service CIDR needs a prefix between /64 and /126"),
            ("fd00::/127", "between /64 and /126"),
            ("10.0.0.0/16,10.1.0.0/16", "two IPv4 CIDRs; a dual-stack cluster needs one IPv4"),
            ("10.0.0.0/16,fd00::/112,fd01::/112", "has 3 CIDRs"),
            ("10.96.0.0", "\"10.96.0.0\" is not a CIDR"),
            ("", "is not a CIDR"),
        ] {
            let err = ServiceCidrs::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        // What to pass is part of every message but the pair of one family's.
        assert!(ServiceCidrs::parse("x").unwrap_err().contains("10.96.0.0/12,fd00:10:96::/108"));
    }

    #[test]
    fn policies_get_their_families_and_an_address_of_each() {
        let mut a = Allocations::new(dual());
        let single = create(&mut a, "single", web(json!({})), 1);
        assert_eq!(spec_of(&single, "ipFamilyPolicy"), json!("SingleStack"));
        assert_eq!(spec_of(&single, "ipFamilies"), json!(["IPv4"]));
        assert_eq!(spec_of(&single, "clusterIPs"), json!(["10.96.0.1"]));
        let prefer = create(&mut a, "prefer", web(json!({"ipFamilyPolicy": "PreferDualStack"})), 2);
        assert_eq!(spec_of(&prefer, "ipFamilies"), json!(["IPv4", "IPv6"]));
        assert_eq!(spec_of(&prefer, "clusterIPs"), json!(["10.96.0.2", "fd00:96::1"]));
        assert_eq!(spec_of(&prefer, "clusterIP"), json!("10.96.0.2"));
        let v6_first = create(
            &mut a,
            "v6-first",
            web(json!({"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv6"]})),
            3,
        );
        assert_eq!(spec_of(&v6_first, "ipFamilies"), json!(["IPv6", "IPv4"]));
        assert_eq!(spec_of(&v6_first, "clusterIPs"), json!(["fd00:96::2", "10.96.0.3"]));
        assert_eq!(spec_of(&v6_first, "clusterIP"), json!("fd00:96::2"));
        let asked = create(
            &mut a,
            "asked",
            web(json!({"ipFamilyPolicy": "PreferDualStack", "clusterIP": "10.96.1.1",
                       "clusterIPs": ["10.96.1.1", "fd00:96::100"]})),
            4,
        );
        assert_eq!(spec_of(&asked, "ipFamilies"), json!(["IPv4", "IPv6"]));
        assert_eq!(spec_of(&asked, "clusterIPs"), json!(["10.96.1.1", "fd00:96::100"]));
        let only_v6 = create(&mut a, "only-v6", web(json!({"ipFamilies": ["IPv6"]})), 5);
        assert_eq!(spec_of(&only_v6, "clusterIPs"), json!(["fd00:96::101"]));
        // Headless: families by policy, no addresses; selectorless defaults to dual-stack.
        let headless = create(
            &mut a,
            "headless",
            web(json!({"clusterIP": "None", "ipFamilyPolicy": "PreferDualStack"})),
            6,
        );
        assert_eq!(spec_of(&headless, "clusterIPs"), json!(["None"]));
        assert_eq!(spec_of(&headless, "ipFamilies"), json!(["IPv4", "IPv6"]));
        let selectorless = create(&mut a, "bare", json!({"spec": {"clusterIP": "None"}}), 7);
        assert_eq!(spec_of(&selectorless, "ipFamilyPolicy"), json!("RequireDualStack"));
        assert_eq!(spec_of(&selectorless, "ipFamilies"), json!(["IPv4", "IPv6"]));
        // ExternalName: no address fields at all.
        let external = json!({"spec": {"type": "ExternalName", "externalName": "example.com"}});
        let external = create(&mut a, "external", external, 8);
        assert_eq!(external["spec"].get("ipFamilies"), None);
        let mut with_policy = external.clone();
        with_policy["spec"]["ipFamilyPolicy"] = json!("SingleStack");
        refused(&a, with_policy, None, "spec.ipFamilyPolicy", "may not be set for ExternalName");
        assert_eq!(a.pools[1].held.len(), 4);
    }

    #[test]
    fn a_single_stack_cluster_refuses_require_dual_stack_and_gives_one_family_to_prefer() {
        let mut a = Allocations::new(cidr());
        refused(
            &a,
            web(json!({"ipFamilyPolicy": "RequireDualStack"})),
            None,
            "spec.ipFamilyPolicy",
            "this cluster is not configured for dual-stack services (its service CIDR is 10.96.0.0/12)",
        );
        let prefer = create(&mut a, "p", web(json!({"ipFamilyPolicy": "PreferDualStack"})), 1);
        assert_eq!(spec_of(&prefer, "ipFamilies"), json!(["IPv4"]));
        assert_eq!(spec_of(&prefer, "clusterIPs"), json!(["10.96.0.1"]));
        refused(
            &a,
            web(json!({"ipFamilies": ["IPv6"]})),
            None,
            "spec.ipFamilies[0]",
            "not configured",
        );
        refused(
            &a,
            web(json!({"ipFamilyPolicy": "PreferDualStack", "clusterIP": "10.96.0.9",
                       "clusterIPs": ["10.96.0.9", "fd00::9"]})),
            None,
            "spec.clusterIPs[1]",
            "IPv6 is not configured on this cluster",
        );
        // kube's one exception: headless without a selector may be dual-stack anyway.
        let bare = create(&mut a, "bare", json!({"spec": {"clusterIP": "None"}}), 2);
        assert_eq!(spec_of(&bare, "ipFamilies"), json!(["IPv4", "IPv6"]));
        // An IPv6 single-stack cluster.
        let mut v6 = Allocations::new(ServiceCidrs::parse("fd00:96::/108").unwrap());
        let svc = create(&mut v6, "v6", web(json!({})), 1);
        assert_eq!(spec_of(&svc, "ipFamilies"), json!(["IPv6"]));
        assert_eq!(spec_of(&svc, "clusterIP"), json!("fd00:96::1"));
    }

    #[test]
    fn bad_address_fields_are_refused_naming_the_field() {
        let mut a = Allocations::new(dual());
        let taken = create(&mut a, "taken", web(json!({"ipFamilyPolicy": "RequireDualStack"})), 1);
        let prefer = |ips: Value| {
            let first = ips[0].clone();
            web(json!({"ipFamilyPolicy": "PreferDualStack", "clusterIP": first, "clusterIPs": ips}))
        };
        for (svc, field, text) in [
            (
                web(json!({"clusterIP": "10.96.0.7", "clusterIPs": ["10.96.0.8"]})),
                "spec.clusterIPs",
                "first value must match `clusterIP`",
            ),
            (
                web(json!({"clusterIPs": ["10.96.0.8"]})),
                "spec.clusterIPs",
                "must be empty when `clusterIP` is not specified",
            ),
            (
                prefer(json!(["10.96.0.7", "fd00:96::7", "10.96.0.8"])),
                "spec.clusterIPs",
                "may only hold up to 2 values",
            ),
            (
                prefer(json!(["10.96.0.7", "10.96.0.8"])),
                "spec.clusterIPs",
                "no more than one IP for each IP family",
            ),
            (
                prefer(json!(["10.96.0.7", "nonsense"])),
                "spec.clusterIPs[1]",
                "must be a valid IP address",
            ),
            (
                prefer(json!(["None", "fd00:96::7"])),
                "spec.clusterIPs",
                "'None' must be the first and only value",
            ),
            (
                web(json!({"ipFamilies": ["IPv4"], "clusterIP": "fd00:96::7"})),
                "spec.clusterIPs[0]",
                "expected an IPv4 value as indicated by `ipFamilies[0]`",
            ),
            (
                web(json!({"ipFamilies": ["IPv5"]})),
                "spec.ipFamilies[0]",
                "Unsupported value: \"IPv5\"",
            ),
            (
                web(json!({"ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv4", "IPv4"]})),
                "spec.ipFamilies[1]",
                "Duplicate value",
            ),
            (
                web(json!({"ipFamilyPolicy": "DualStack"})),
                "spec.ipFamilyPolicy",
                "supported values: PreferDualStack, RequireDualStack, SingleStack",
            ),
            (
                web(json!({"ipFamilies": ["IPv4", "IPv6"]})),
                "spec.ipFamilyPolicy",
                "must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families",
            ),
            (
                prefer(json!(["10.96.0.7", "fd00:97::7"])),
                "spec.clusterIPs[1]",
                "failed to allocate IP fd00:97::7: the provided IP is not in the valid range. The range of valid IPs is fd00:96::/112",
            ),
            (
                prefer(json!(["10.96.0.7", "fd00:96::"])),
                "spec.clusterIPs[1]",
                "not in the valid range",
            ),
            (
                prefer(json!(["10.111.255.255", "fd00:96::7"])),
                "spec.clusterIPs[0]",
                "not in the valid range",
            ),
            (
                prefer(taken["spec"]["clusterIPs"].clone()),
                "spec.clusterIPs[0]",
                "provided IP is already allocated",
            ),
            (
                prefer(json!(["10.96.0.7", taken["spec"]["clusterIPs"][1].clone()])),
                "spec.clusterIPs[1]",
                "provided IP is already allocated",
            ),
        ] {
            refused(&a, svc, None, field, text);
        }
    }

    #[test]
    fn updates_add_and_remove_the_secondary_family_and_keep_the_primary() {
        let mut a = Allocations::new(dual());
        let svc = create(&mut a, "s", web(json!({})), 1);
        // Upgrade: a policy that wants two families gets the secondary address.
        let mut up = svc.clone();
        up["spec"]["ipFamilyPolicy"] = json!("PreferDualStack");
        allocate(&mut up, Some(&svc), &a, "s").unwrap();
        assert_eq!(spec_of(&up, "clusterIPs"), json!(["10.96.0.1", "fd00:96::1"]));
        assert_eq!(spec_of(&up, "ipFamilies"), json!(["IPv4", "IPv6"]));
        a.record("s", &held(&up), 2).unwrap();
        let v6 = up["spec"]["clusterIPs"][1].as_str().unwrap().to_string();
        let other = |ip: &str| web(json!({"ipFamilies": ["IPv6"], "clusterIP": ip}));
        refused(&a, other(&v6), None, "spec.clusterIPs[0]", "already allocated");
        // A replace without the address fields keeps them.
        let mut replaced = web(json!({"ipFamilyPolicy": "PreferDualStack"}));
        allocate(&mut replaced, Some(&up), &a, "s").unwrap();
        assert_eq!(spec_of(&replaced, "clusterIPs"), spec_of(&up, "clusterIPs"));
        // Dropping the secondary needs SingleStack; the primary never changes.
        let mut dropped = up.clone();
        dropped["spec"]["clusterIPs"] = json!(["10.96.0.1"]);
        dropped["spec"]["ipFamilies"] = json!(["IPv4"]);
        refused(
            &a,
            dropped,
            Some(&up),
            "spec.clusterIPs[0]",
            "`ipFamilyPolicy` must be set to 'SingleStack' when releasing the secondary clusterIP",
        );
        let mut moved = up.clone();
        moved["spec"]["clusterIP"] = json!("10.96.0.50");
        refused(&a, moved, Some(&up), "spec.clusterIPs[0]", "may not change once set");
        let mut swapped = up.clone();
        swapped["spec"]["ipFamilies"] = json!(["IPv6", "IPv4"]);
        refused(&a, swapped, Some(&up), "spec.ipFamilies[0]", "may not change once set");
        let mut headless = up.clone();
        headless["spec"]["clusterIP"] = json!("None");
        headless["spec"]["clusterIPs"] = json!(["None"]);
        refused(&a, headless, Some(&up), "spec.clusterIPs[0]", "may not change once set");
        // Downgrade: SingleStack with the lists as they were drops the secondary; once stored
        // its address is free.
        let mut down = up.clone();
        down["spec"]["ipFamilyPolicy"] = json!("SingleStack");
        allocate(&mut down, Some(&up), &a, "s").unwrap();
        assert_eq!(spec_of(&down, "clusterIPs"), json!(["10.96.0.1"]));
        assert_eq!(spec_of(&down, "ipFamilies"), json!(["IPv4"]));
        a.record("s", &held(&down), 3).unwrap();
        create(&mut a, "t", other(&v6), 4);
        // An unchanged PreferDualStack Service is neither upgraded nor downgraded when the
        // cluster's families changed since it was stored.
        let single_stack = Allocations::new(cidr());
        let mut again = up.clone();
        allocate(&mut again, Some(&up), &single_stack, "s").unwrap();
        assert_eq!(spec_of(&again, "clusterIPs"), spec_of(&up, "clusterIPs"));
        // Type changes: to ExternalName drops the address fields (and frees them once
        // stored), back gets new ones.
        let mut external = up.clone();
        external["spec"]["type"] = json!("ExternalName");
        external["spec"]["externalName"] = json!("example.com");
        allocate(&mut external, Some(&up), &a, "s").unwrap();
        assert_eq!(external["spec"].get("clusterIPs"), None, "{external}");
        assert_eq!(external["spec"].get("ipFamilyPolicy"), None, "{external}");
        let mut back = web(json!({"ipFamilyPolicy": "RequireDualStack"}));
        allocate(&mut back, Some(&external), &a, "s").unwrap();
        assert_eq!(back["spec"]["clusterIPs"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn many_dual_stack_services_get_distinct_addresses_in_both_families() {
        let cidrs = ServiceCidrs::parse("10.96.0.0/16,fd00:96::/64").unwrap();
        let mut a = Allocations::new(cidrs);
        let mut seen = HashSet::new();
        for i in 0..2_000 {
            let svc = web(json!({"ipFamilyPolicy": "RequireDualStack"}));
            let svc = create(&mut a, &format!("s{i}"), svc, i + 1);
            for ip in svc["spec"]["clusterIPs"].as_array().unwrap() {
                assert!(seen.insert(ip.clone()), "{ip} handed out twice");
            }
        }
        assert_eq!((a.pools[0].held.len(), a.pools[1].held.len()), (2_000, 2_000));
        // A small IPv6 range fills up (three usable addresses) and wraps after a release.
        let mut small = Allocations::new(ServiceCidrs::parse("fd00::/126").unwrap());
        for i in 0..3 {
            create(&mut small, &format!("s{i}"), web(json!({})), i + 1);
        }
        refused(
            &small,
            web(json!({})),
            None,
            "spec.clusterIPs[0]",
            "the IPv6 service CIDR fd00::/126 is full",
        );
        small.release("s0", 4);
        let again = create(&mut small, "s3", web(json!({})), 5);
        assert_eq!(spec_of(&again, "clusterIP"), json!("fd00::1"));
    }

    #[test]
    fn repair_and_restart_know_both_families() {
        let mut a = Allocations::new(dual());
        let dual_stack = || web(json!({"ipFamilyPolicy": "RequireDualStack"}));
        let s1 = create(&mut a, "a", dual_stack(), 1);
        let s2 = create(&mut a, "b", dual_stack(), 2);
        // "a" was deleted and "c" written with its addresses by someone else.
        let report = a.repair([("b".into(), held(&s2), 2), ("c".into(), held(&s1), 9)], 10);
        assert_eq!(report, RepairReport { recorded: 1, released: 1, conflicts: vec![] });
        let v6 = s1["spec"]["clusterIPs"][1].as_str().unwrap();
        let asks_v6 = web(json!({"ipFamilies": ["IPv6"], "clusterIP": v6}));
        refused(&a, asks_v6.clone(), None, "spec.clusterIPs[0]", "already allocated");
        // A restart: new allocations filled by a repair hold both families too, and hand out
        // addresses after them.
        let mut restarted = Allocations::new(dual());
        restarted.repair([("b".into(), held(&s2), 2), ("c".into(), held(&s1), 9)], 10);
        refused(&restarted, asks_v6, None, "spec.clusterIPs[0]", "already allocated");
        let fresh = create(&mut restarted, "d", dual_stack(), 11);
        assert_eq!(spec_of(&fresh, "clusterIPs"), json!(["10.96.0.3", "fd00:96::3"]));
    }
}
