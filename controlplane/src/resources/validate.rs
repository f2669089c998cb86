//! Per-kind defaulting and validation, run on every create and update before anything is
//! stored. Validation collects every problem as a [`FieldError`] (the API answers 422 Invalid
//! with them as causes), as Kubernetes does.
use std::net::IpAddr;

use serde_json::{Value, json};

use super::selector::LabelSelector;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// "FieldValueRequired", "FieldValueInvalid", "FieldValueNotSupported", "FieldValueDuplicate".
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

pub(crate) fn required(field: impl Into<String>) -> FieldError {
    FieldError {
        reason: "FieldValueRequired",
        field: field.into(),
        message: "Required value".into(),
    }
}

pub(crate) fn invalid(
    field: impl Into<String>,
    value: &Value,
    why: impl std::fmt::Display,
) -> FieldError {
    FieldError {
        reason: "FieldValueInvalid",
        field: field.into(),
        message: format!("Invalid value: {value}: {why}"),
    }
}

pub(crate) fn duplicate(field: impl Into<String>, value: &str) -> FieldError {
    FieldError {
        reason: "FieldValueDuplicate",
        field: field.into(),
        message: format!("Duplicate value: {value:?}"),
    }
}

pub(crate) fn forbidden(field: impl Into<String>, why: &str) -> FieldError {
    FieldError {
        reason: "FieldValueForbidden",
        field: field.into(),
        message: format!("Forbidden: {why}"),
    }
}

pub(crate) fn unsupported(field: impl Into<String>, value: &Value, allowed: &[&str]) -> FieldError {
    FieldError {
        reason: "FieldValueNotSupported",
        field: field.into(),
        message: format!("Unsupported value: {value}: supported values: {}", allowed.join(", ")),
    }
}

/// RFC 1123 label: lowercase alphanumerics and '-', alphanumeric at both ends, at most 63.
pub fn dns1123_label(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', \
             and must start and end with an alphanumeric character (at most 63 characters)"
            .into())
    }
}

/// RFC 1123 subdomain: dot-separated labels, at most 253.
pub fn dns1123_subdomain(name: &str) -> Result<(), String> {
    if !name.is_empty() && name.len() <= 253 && name.split('.').all(|l| dns1123_label(l).is_ok()) {
        Ok(())
    } else {
        Err("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
             '-' or '.', and must start and end with an alphanumeric character (at most 253 \
             characters)"
            .into())
    }
}

/// RFC 1035 label (Service names): an RFC 1123 label that starts with a letter.
pub fn dns1035_label(name: &str) -> Result<(), String> {
    dns1123_label(name)?;
    if name.starts_with(|c: char| c.is_ascii_lowercase()) {
        Ok(())
    } else {
        Err("a DNS-1035 label must start with an alphabetic character".into())
    }
}

/// Checks a name for a kind (the rule Kubernetes applies to that kind).
pub fn name(kind: &str, name: &str) -> Result<(), String> {
    match kind {
        "Namespace" => dns1123_label(name),
        "Service" => dns1035_label(name),
        // Events are named "<object>.<hex>" and ConfigMaps allow dots too.
        _ => dns1123_subdomain(name),
    }
}

fn port_number(errs: &mut Vec<FieldError>, field: String, value: Option<&Value>, required_: bool) {
    match value {
        None if required_ => errs.push(required(field)),
        None => {}
        Some(v) if !v.as_i64().is_some_and(|p| (1..=65535).contains(&p)) => {
            errs.push(invalid(field, v, "must be between 1 and 65535, inclusive"));
        }
        Some(_) => {}
    }
}

fn protocol(errs: &mut Vec<FieldError>, field: String, value: Option<&Value>) {
    if let Some(v) = value
        && !matches!(v.as_str(), Some("TCP" | "UDP" | "SCTP"))
    {
        errs.push(unsupported(field, v, &["TCP", "UDP", "SCTP"]));
    }
}

fn port_name_or_number(errs: &mut Vec<FieldError>, field: String, value: Option<&Value>) {
    match value {
        Some(Value::String(s)) if dns1123_label(s).is_ok() && s.len() <= 15 => {}
        Some(v @ Value::Number(_)) => port_number(errs, field, Some(v), true),
        Some(v) => errs.push(invalid(field, v, "must be a port number or an IANA_SVC_NAME")),
        None => {}
    }
}

/// Parses "a.b.c.d/n" or an IPv6 CIDR.
pub fn parse_cidr(cidr: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = cidr.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

/// Whether `inner` lies inside `outer` and is smaller (same family), as kube-apiserver
/// requires of an `ipBlock.except` entry.
pub fn strict_subset(inner: (IpAddr, u8), outer: (IpAddr, u8)) -> bool {
    let masked = |addr: IpAddr, len: u8| -> u128 {
        let (bits, width) = match addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        };
        let host_bits = u32::from(width - len);
        if host_bits >= 128 { 0 } else { bits >> host_bits << host_bits }
    };
    inner.0.is_ipv4() == outer.0.is_ipv4()
        && inner.1 > outer.1
        && masked(inner.0, outer.1) == masked(outer.0, outer.1)
}

fn labels_map(errs: &mut Vec<FieldError>, field: &str, value: Option<&Value>) {
    let Some(v) = value else { return };
    let Some(map) = v.as_object() else {
        errs.push(invalid(field, v, "must be a map of string keys to string values"));
        return;
    };
    for (k, val) in map {
        if !val.is_string() {
            errs.push(invalid(format!("{field}.{k}"), val, "must be a string"));
        }
    }
}

fn array<'a>(errs: &mut Vec<FieldError>, field: &str, value: Option<&'a Value>) -> &'a [Value] {
    match value {
        Some(Value::Array(items)) => items,
        Some(v) => {
            errs.push(invalid(field, v, "must be a list"));
            &[]
        }
        None => &[],
    }
}

/// Fills in the defaults Kubernetes applies to a kind (on create and update).
pub fn default(kind: &str, obj: &mut Value) {
    let set = |obj: &mut Value, path: &[&str], value: Value| {
        let mut cur = obj;
        for part in &path[..path.len() - 1] {
            let Some(map) = cur.as_object_mut() else { return };
            cur = map.entry(part.to_string()).or_insert_with(|| json!({}));
        }
        if let Some(map) = cur.as_object_mut() {
            map.entry(path[path.len() - 1].to_string()).or_insert(value);
        }
    };
    match kind {
        "Pod" => {
            set(obj, &["spec", "restartPolicy"], json!("Always"));
            set(obj, &["spec", "dnsPolicy"], json!("ClusterFirst"));
            set(obj, &["spec", "schedulerName"], json!("default-scheduler"));
            set(obj, &["spec", "terminationGracePeriodSeconds"], json!(30));
            set(obj, &["spec", "serviceAccountName"], json!("default"));
            default_containers(obj.pointer_mut("/spec/containers"));
        }
        "Service" => {
            set(obj, &["spec", "type"], json!("ClusterIP"));
            set(obj, &["spec", "sessionAffinity"], json!("None"));
            if let Some(Value::Array(ports)) = obj.pointer_mut("/spec/ports") {
                for port in ports.iter_mut().filter(|p| p.is_object()) {
                    set(port, &["protocol"], json!("TCP"));
                    if let Some(p) = port.get("port").cloned() {
                        set(port, &["targetPort"], p);
                    }
                }
            }
        }
        "Deployment" | "ReplicaSet" => {
            set(obj, &["spec", "replicas"], json!(1));
            set(obj, &["spec", "revisionHistoryLimit"], json!(10));
            if kind == "Deployment" {
                set(obj, &["spec", "progressDeadlineSeconds"], json!(600));
                // As Kubernetes: an empty `strategy: {}` (what `kubectl create deployment`
                // sends) is RollingUpdate, and RollingUpdate gets 25%/25%.
                set(obj, &["spec", "strategy", "type"], json!("RollingUpdate"));
                if obj.pointer("/spec/strategy/type") == Some(&json!("RollingUpdate")) {
                    set(obj, &["spec", "strategy", "rollingUpdate", "maxSurge"], json!("25%"));
                    set(
                        obj,
                        &["spec", "strategy", "rollingUpdate", "maxUnavailable"],
                        json!("25%"),
                    );
                }
            }
            default_containers(obj.pointer_mut("/spec/template/spec/containers"));
        }
        "NetworkPolicy" => {
            // As kube-apiserver: unset or empty policyTypes means Ingress, plus Egress when
            // `egress` has at least one rule (`egress: []` does not isolate egress).
            let non_empty =
                |v: Option<&Value>| v.and_then(Value::as_array).is_some_and(|a| !a.is_empty());
            let has_egress = non_empty(obj.pointer("/spec/egress"));
            if !non_empty(obj.pointer("/spec/policyTypes"))
                && obj.get("spec").is_some_and(Value::is_object)
            {
                let types =
                    if has_egress { json!(["Ingress", "Egress"]) } else { json!(["Ingress"]) };
                obj["spec"]["policyTypes"] = types;
            }
        }
        _ => {}
    }
}

fn default_containers(containers: Option<&mut Value>) {
    let Some(Value::Array(containers)) = containers else { return };
    for container in containers.iter_mut().filter_map(Value::as_object_mut) {
        if let Some(Value::Array(ports)) = container.get_mut("ports") {
            for port in ports.iter_mut().filter_map(Value::as_object_mut) {
                port.entry("protocol").or_insert(json!("TCP"));
            }
        }
        container.entry("terminationMessagePath").or_insert(json!("/dev/termination-log"));
        container.entry("terminationMessagePolicy").or_insert(json!("File"));
        let latest = container.get("image").and_then(Value::as_str).is_some_and(|i| {
            !i.rsplit('/').next().unwrap_or(i).contains(':') || i.ends_with(":latest")
        });
        container.entry("imagePullPolicy").or_insert(json!(if latest {
            "Always"
        } else {
            "IfNotPresent"
        }));
    }
}

fn containers(errs: &mut Vec<FieldError>, field: &str, value: Option<&Value>) {
    let items = array(errs, field, value);
    if value.is_none() || items.is_empty() {
        errs.push(required(field));
    }
    let mut names = Vec::new();
    for (i, c) in items.iter().enumerate() {
        let f = format!("{field}[{i}]");
        match c.get("name").and_then(Value::as_str) {
            None => errs.push(required(format!("{f}.name"))),
            Some(n) => {
                if let Err(why) = dns1123_label(n) {
                    errs.push(invalid(format!("{f}.name"), &json!(n), why));
                }
                if names.contains(&n) {
                    errs.push(duplicate(format!("{f}.name"), n));
                }
                names.push(n);
            }
        }
        if c.get("image").and_then(Value::as_str).is_none_or(str::is_empty) {
            errs.push(required(format!("{f}.image")));
        }
        for (j, p) in array(errs, &format!("{f}.ports"), c.get("ports")).iter().enumerate() {
            port_number(
                errs,
                format!("{f}.ports[{j}].containerPort"),
                p.get("containerPort"),
                true,
            );
            protocol(errs, format!("{f}.ports[{j}].protocol"), p.get("protocol"));
        }
    }
}

fn selector_and_template(errs: &mut Vec<FieldError>, obj: &Value) {
    let selector = obj.pointer("/spec/selector");
    let Some(selector) = selector else {
        errs.push(required("spec.selector"));
        return;
    };
    let parsed = match LabelSelector::from_object(selector) {
        Ok(s) => s,
        Err(err) => {
            errs.push(invalid("spec.selector", selector, err));
            return;
        }
    };
    if parsed.is_empty() {
        errs.push(invalid("spec.selector", selector, "empty selector is invalid for deployment"));
    }
    let template = obj.pointer("/spec/template").cloned().unwrap_or(Value::Null);
    if !parsed.matches(&template) {
        errs.push(invalid(
            "spec.template.metadata.labels",
            template.pointer("/metadata/labels").unwrap_or(&Value::Null),
            "`selector` does not match template `labels`",
        ));
    }
    containers(
        errs,
        "spec.template.spec.containers",
        obj.pointer("/spec/template/spec/containers"),
    );
    if let Some(r) = obj.pointer("/spec/replicas")
        && r.as_i64().is_none_or(|r| r < 0)
    {
        errs.push(invalid("spec.replicas", r, "must be greater than or equal to 0"));
    }
}

fn ip(errs: &mut Vec<FieldError>, field: String, value: Option<&Value>) {
    if let Some(v) = value
        && v.as_str().and_then(|s| s.parse::<IpAddr>().ok()).is_none()
    {
        errs.push(invalid(field, v, "must be a valid IP address"));
    }
}

/// Validates the kind-specific parts of an object (metadata is checked by the caller).
pub fn validate(kind: &str, obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    labels_map(&mut errs, "metadata.labels", obj.pointer("/metadata/labels"));
    labels_map(&mut errs, "metadata.annotations", obj.pointer("/metadata/annotations"));
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            let sel = format!("{k}={}", v.as_str().unwrap_or(""));
            if LabelSelector::parse(&sel).is_err() {
                errs.push(invalid(
                    format!("metadata.labels.{k}"),
                    v,
                    "not a valid label key or value",
                ));
            }
        }
    }
    match kind {
        "Pod" => containers(&mut errs, "spec.containers", obj.pointer("/spec/containers")),
        "Service" => {
            let ty = obj.pointer("/spec/type").and_then(Value::as_str).unwrap_or("ClusterIP");
            if !matches!(ty, "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName") {
                errs.push(unsupported(
                    "spec.type",
                    &json!(ty),
                    &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"],
                ));
            }
            let ports = array(&mut errs, "spec.ports", obj.pointer("/spec/ports"));
            if ports.is_empty()
                && ty != "ExternalName"
                && obj.pointer("/spec/clusterIP").and_then(Value::as_str) != Some("None")
            {
                errs.push(required("spec.ports"));
            }
            let mut names = Vec::new();
            for (i, p) in ports.iter().enumerate() {
                let f = format!("spec.ports[{i}]");
                port_number(&mut errs, format!("{f}.port"), p.get("port"), true);
                protocol(&mut errs, format!("{f}.protocol"), p.get("protocol"));
                port_name_or_number(&mut errs, format!("{f}.targetPort"), p.get("targetPort"));
                if let Some(np) = p.get("nodePort")
                    && !np.as_i64().is_some_and(|n| (30000..=32767).contains(&n))
                {
                    errs.push(invalid(format!("{f}.nodePort"), np, "provided port is not in the valid range. The range of valid ports is 30000-32767"));
                }
                let name = p.get("name").and_then(Value::as_str);
                if ports.len() > 1 && name.is_none_or(str::is_empty) {
                    errs.push(required(format!("{f}.name")));
                }
                if let Some(n) = name.filter(|n| !n.is_empty()) {
                    if names.contains(&n) {
                        errs.push(duplicate(format!("{f}.name"), n));
                    }
                    names.push(n);
                }
            }
            if let Some(sel) = obj.pointer("/spec/selector") {
                labels_map(&mut errs, "spec.selector", Some(sel));
            }
            if let Some(v) = obj.pointer("/spec/clusterIP")
                && v.as_str() != Some("None")
                && v.as_str() != Some("")
            {
                ip(&mut errs, "spec.clusterIP".into(), Some(v));
            }
            if let Some(v) = obj.pointer("/spec/sessionAffinity")
                && !matches!(v.as_str(), Some("None" | "ClientIP"))
            {
                errs.push(unsupported("spec.sessionAffinity", v, &["None", "ClientIP"]));
            }
        }
        "Endpoints" => {
            for (i, subset) in array(&mut errs, "subsets", obj.get("subsets")).iter().enumerate() {
                for key in ["addresses", "notReadyAddresses"] {
                    for (j, a) in array(&mut errs, &format!("subsets[{i}].{key}"), subset.get(key))
                        .iter()
                        .enumerate()
                    {
                        let f = format!("subsets[{i}].{key}[{j}].ip");
                        match a.get("ip") {
                            None => errs.push(required(f)),
                            v => ip(&mut errs, f, v),
                        }
                    }
                }
                for (j, p) in array(&mut errs, &format!("subsets[{i}].ports"), subset.get("ports"))
                    .iter()
                    .enumerate()
                {
                    port_number(
                        &mut errs,
                        format!("subsets[{i}].ports[{j}].port"),
                        p.get("port"),
                        true,
                    );
                    protocol(
                        &mut errs,
                        format!("subsets[{i}].ports[{j}].protocol"),
                        p.get("protocol"),
                    );
                }
            }
        }
        "EndpointSlice" => {
            let family = obj.get("addressType");
            if !matches!(family.and_then(Value::as_str), Some("IPv4" | "IPv6" | "FQDN")) {
                match family {
                    None => errs.push(required("addressType")),
                    Some(v) => errs.push(unsupported("addressType", v, &["IPv4", "IPv6", "FQDN"])),
                }
            }
            for (i, e) in array(&mut errs, "endpoints", obj.get("endpoints")).iter().enumerate() {
                let addrs =
                    array(&mut errs, &format!("endpoints[{i}].addresses"), e.get("addresses"));
                if addrs.is_empty() {
                    errs.push(required(format!("endpoints[{i}].addresses")));
                }
                if matches!(family.and_then(Value::as_str), Some("IPv4" | "IPv6")) {
                    for (j, a) in addrs.iter().enumerate() {
                        ip(&mut errs, format!("endpoints[{i}].addresses[{j}]"), Some(a));
                    }
                }
            }
            for (j, p) in array(&mut errs, "ports", obj.get("ports")).iter().enumerate() {
                port_number(&mut errs, format!("ports[{j}].port"), p.get("port"), false);
                protocol(&mut errs, format!("ports[{j}].protocol"), p.get("protocol"));
            }
        }
        "NetworkPolicy" => {
            match obj.pointer("/spec/podSelector") {
                None => errs.push(required("spec.podSelector")),
                Some(sel) => {
                    if let Err(err) = LabelSelector::from_object(sel) {
                        errs.push(invalid("spec.podSelector", sel, err));
                    }
                }
            }
            for (i, t) in array(&mut errs, "spec.policyTypes", obj.pointer("/spec/policyTypes"))
                .iter()
                .enumerate()
            {
                if !matches!(t.as_str(), Some("Ingress" | "Egress")) {
                    errs.push(unsupported(
                        format!("spec.policyTypes[{i}]"),
                        t,
                        &["Ingress", "Egress"],
                    ));
                }
            }
            for (dir, peers) in [("ingress", "from"), ("egress", "to")] {
                for (i, rule) in
                    array(&mut errs, &format!("spec.{dir}"), obj.pointer(&format!("/spec/{dir}")))
                        .iter()
                        .enumerate()
                {
                    let f = format!("spec.{dir}[{i}]");
                    for (j, p) in array(&mut errs, &format!("{f}.ports"), rule.get("ports"))
                        .iter()
                        .enumerate()
                    {
                        protocol(&mut errs, format!("{f}.ports[{j}].protocol"), p.get("protocol"));
                        port_name_or_number(
                            &mut errs,
                            format!("{f}.ports[{j}].port"),
                            p.get("port"),
                        );
                        port_number(
                            &mut errs,
                            format!("{f}.ports[{j}].endPort"),
                            p.get("endPort"),
                            false,
                        );
                    }
                    for (j, peer) in array(&mut errs, &format!("{f}.{peers}"), rule.get(peers))
                        .iter()
                        .enumerate()
                    {
                        let pf = format!("{f}.{peers}[{j}]");
                        for sel in ["podSelector", "namespaceSelector"] {
                            if let Some(s) = peer.get(sel)
                                && let Err(err) = LabelSelector::from_object(s)
                            {
                                errs.push(invalid(format!("{pf}.{sel}"), s, err));
                            }
                        }
                        if let Some(block) = peer.get("ipBlock") {
                            let cidr = block.get("cidr");
                            let block_cidr = cidr.and_then(Value::as_str).and_then(parse_cidr);
                            if block_cidr.is_none() {
                                match cidr {
                                    None => errs.push(required(format!("{pf}.ipBlock.cidr"))),
                                    Some(c) => errs.push(invalid(
                                        format!("{pf}.ipBlock.cidr"),
                                        c,
                                        "must be a valid CIDR",
                                    )),
                                }
                            }
                            for (k, e) in array(
                                &mut errs,
                                &format!("{pf}.ipBlock.except"),
                                block.get("except"),
                            )
                            .iter()
                            .enumerate()
                            {
                                match e.as_str().and_then(parse_cidr) {
                                    None => errs.push(invalid(
                                        format!("{pf}.ipBlock.except[{k}]"),
                                        e,
                                        "must be a valid CIDR",
                                    )),
                                    Some(except)
                                        if block_cidr
                                            .is_some_and(|outer| !strict_subset(except, outer)) =>
                                    {
                                        errs.push(invalid(
                                            format!("{pf}.ipBlock.except[{k}]"),
                                            e,
                                            "must be a strict subset of `cidr`",
                                        ))
                                    }
                                    Some(_) => {}
                                }
                            }
                        }
                    }
                }
            }
        }
        "ConfigMap" => {
            for field in ["data", "binaryData"] {
                if let Some(data) = obj.get(field) {
                    match data.as_object() {
                        None => errs.push(invalid(field, data, "must be a map")),
                        Some(map) => {
                            for (k, v) in map {
                                let key_ok = !k.is_empty()
                                    && k.len() <= 253
                                    && k.chars()
                                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                                if !key_ok {
                                    errs.push(invalid(format!("{field}[{k}]"), &json!(k), "a valid config key must consist of alphanumeric characters, '-', '_' or '.'"));
                                }
                                if !v.is_string() {
                                    errs.push(invalid(
                                        format!("{field}[{k}]"),
                                        v,
                                        "must be a string",
                                    ));
                                }
                            }
                        }
                    }
                }
            }
        }
        "Deployment" | "ReplicaSet" => selector_and_template(&mut errs, obj),
        "Node" => {
            for field in ["/spec/podCIDR"] {
                if let Some(v) = obj.pointer(field)
                    && v.as_str().and_then(parse_cidr).is_none()
                {
                    errs.push(invalid("spec.podCIDR", v, "must be a valid CIDR"));
                }
            }
            for (i, v) in
                array(&mut errs, "spec.podCIDRs", obj.pointer("/spec/podCIDRs")).iter().enumerate()
            {
                if v.as_str().and_then(parse_cidr).is_none() {
                    errs.push(invalid(format!("spec.podCIDRs[{i}]"), v, "must be a valid CIDR"));
                }
            }
        }
        _ => {}
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules_per_kind() {
        assert!(name("Namespace", "kube-system").is_ok());
        assert!(name("Namespace", "a.b").is_err());
        assert!(name("Pod", "a.b-c").is_ok());
        assert!(name("Pod", "Upper").is_err());
        assert!(name("Pod", "-x").is_err());
        assert!(name("Pod", &"a".repeat(254)).is_err());
        assert!(name("Service", "1abc").is_err());
        assert!(name("Service", "abc1").is_ok());
    }

    #[test]
    fn pods_need_named_containers_with_images() {
        assert!(
            validate("Pod", &json!({"spec": {"containers": [{"name": "c", "image": "nginx"}]}}))
                .is_empty()
        );
        let errs = validate(
            "Pod",
            &json!({"spec": {"containers": [{"name": "C"}, {"name": "C", "image": "x", "ports": [{"containerPort": 70000}]}]}}),
        );
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"spec.containers[0].name"), "{fields:?}");
        assert!(fields.contains(&"spec.containers[0].image"), "{fields:?}");
        assert!(fields.contains(&"spec.containers[1].ports[0].containerPort"), "{fields:?}");
        assert_eq!(validate("Pod", &json!({"spec": {}}))[0].field, "spec.containers");
    }

    #[test]
    fn services_are_defaulted_and_checked() {
        let mut svc = json!({"spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}});
        default("Service", &mut svc);
        assert_eq!(svc.pointer("/spec/ports/0/protocol"), Some(&json!("TCP")));
        assert_eq!(svc.pointer("/spec/ports/0/targetPort"), Some(&json!(80)));
        assert_eq!(svc.pointer("/spec/type"), Some(&json!("ClusterIP")));
        assert!(validate("Service", &svc).is_empty());
        let bad = json!({"spec": {"ports": [{"port": 0}, {"port": 80, "protocol": "ICMP", "nodePort": 80}]}});
        assert_eq!(validate("Service", &bad).len(), 5);
        assert!(validate("Service", &json!({"spec": {"clusterIP": "None"}})).is_empty());
    }

    #[test]
    fn network_policies_check_selectors_and_cidrs() {
        let mut ok = json!({"spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}], "ports": [{"port": 80, "protocol": "TCP"}]}]}});
        default("NetworkPolicy", &mut ok);
        assert_eq!(ok.pointer("/spec/policyTypes"), Some(&json!(["Ingress"])));
        assert!(validate("NetworkPolicy", &ok).is_empty());
        let mut empty_egress = json!({"spec": {"podSelector": {}, "egress": []}});
        default("NetworkPolicy", &mut empty_egress);
        assert_eq!(empty_egress.pointer("/spec/policyTypes"), Some(&json!(["Ingress"])));
        let mut egress = json!({"spec": {"podSelector": {}, "egress": [{}], "policyTypes": []}});
        default("NetworkPolicy", &mut egress);
        assert_eq!(egress.pointer("/spec/policyTypes"), Some(&json!(["Ingress", "Egress"])));
        let bad = json!({"spec": {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}], "policyTypes": ["Sideways"]}});
        assert_eq!(validate("NetworkPolicy", &bad).len(), 2);
        assert_eq!(validate("NetworkPolicy", &json!({"spec": {}}))[0].field, "spec.podSelector");
        // except entries must be strictly inside cidr, in its family.
        for (except, ok) in [
            ("10.1.0.0/16", true),
            ("10.0.0.0/8", false),
            ("11.0.0.0/16", false),
            ("fd00::/64", false),
            ("10.255.255.255/32", true),
        ] {
            let policy = json!({"spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [
                {"ipBlock": {"cidr": "10.0.0.0/8"}},
                {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.2.0.0/16", except]}}]}]}});
            let errs = validate("NetworkPolicy", &policy);
            if ok {
                assert!(errs.is_empty(), "{except}: {errs:?}");
            } else {
                assert_eq!(errs.len(), 1, "{except}: {errs:?}");
                assert_eq!(errs[0].field, "spec.egress[0].to[1].ipBlock.except[1]");
                assert!(errs[0].message.contains("strict subset of `cidr`"), "{}", errs[0].message);
            }
        }
        let v6 = json!({"spec": {"podSelector": {}, "ingress": [{"from": [
            {"ipBlock": {"cidr": "fd00::/48", "except": ["fd00:0:0:1::/64", "fd01::/64"]}}]}]}});
        let errs = validate("NetworkPolicy", &v6);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "spec.ingress[0].from[0].ipBlock.except[1]");
    }

    #[test]
    fn deployments_need_a_matching_selector() {
        let mut d = json!({"spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "nginx:1.25"}]}}}});
        default("Deployment", &mut d);
        assert_eq!(d.pointer("/spec/replicas"), Some(&json!(1)));
        assert_eq!(
            d.pointer("/spec/template/spec/containers/0/imagePullPolicy"),
            Some(&json!("IfNotPresent"))
        );
        assert!(validate("Deployment", &d).is_empty());
        d["spec"]["template"]["metadata"]["labels"]["app"] = json!("db");
        assert_eq!(validate("Deployment", &d)[0].field, "spec.template.metadata.labels");
    }

    #[test]
    fn cidrs_parse() {
        assert!(parse_cidr("10.0.0.0/8").is_some());
        assert!(parse_cidr("fd00::/64").is_some());
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("10.0.0.0").is_none());
    }
}
