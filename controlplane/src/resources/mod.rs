//! The resource types the API server serves and the pure rules about them: the registry of
//! kinds (group, version, plural, scope, subresources), object metadata helpers, names,
//! selectors, patches, unknown and duplicate fields, and per-kind validation and defaulting.
//! Nothing here does I/O.
pub mod fields;
pub mod managed;
pub mod meta;
pub mod patch;
pub mod protobuf;
mod protobuf_schema;
pub mod selector;
pub mod validate;

/// One served resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resource {
    /// "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub has_status: bool,
    pub categories: &'static [&'static str],
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// The group and resource as Kubernetes names them in errors: "pods", "deployments.apps".
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The store key prefix of all objects of this resource (ends with '/').
    pub fn prefix(&self) -> String {
        format!(
            "/registry/{}/{}/",
            if self.group.is_empty() { "core" } else { self.group },
            self.plural
        )
    }

    /// The store key prefix of this resource's objects in one namespace, or all of them.
    pub fn scope_prefix(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("{}{ns}/", self.prefix()),
            _ => self.prefix(),
        }
    }

    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.scope_prefix(namespace))
    }
}

const fn core(
    kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    has_status: bool,
) -> Resource {
    Resource {
        group: "",
        version: "v1",
        kind,
        plural,
        singular,
        namespaced,
        short_names,
        has_status,
        categories: &[],
    }
}

/// Every resource served, in discovery order.
pub static RESOURCES: &[Resource] = &[
    core("Namespace", "namespaces", "namespace", false, &["ns"], true),
    core("Node", "nodes", "node", false, &["no"], true),
    Resource { categories: &["all"], ..core("Pod", "pods", "pod", true, &["po"], true) },
    Resource {
        categories: &["all"],
        ..core("Service", "services", "service", true, &["svc"], true)
    },
    core("Endpoints", "endpoints", "endpoints", true, &["ep"], false),
    core("ConfigMap", "configmaps", "configmap", true, &["cm"], false),
    core("Event", "events", "event", true, &["ev"], false),
    core("ServiceAccount", "serviceaccounts", "serviceaccount", true, &["sa"], false),
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        singular: "endpointslice",
        namespaced: true,
        short_names: &[],
        has_status: false,
        categories: &[],
    },
    Resource {
        group: "networking.k8s.io",
        version: "v1",
        kind: "NetworkPolicy",
        plural: "networkpolicies",
        singular: "networkpolicy",
        namespaced: true,
        short_names: &["netpol"],
        has_status: false,
        categories: &[],
    },
    Resource {
        group: "apps",
        version: "v1",
        kind: "Deployment",
        plural: "deployments",
        singular: "deployment",
        namespaced: true,
        short_names: &["deploy"],
        has_status: true,
        categories: &["all"],
    },
    Resource {
        group: "apps",
        version: "v1",
        kind: "ReplicaSet",
        plural: "replicasets",
        singular: "replicaset",
        namespaced: true,
        short_names: &["rs"],
        has_status: true,
        categories: &["all"],
    },
];

/// The resource served at `group`/`version` under `plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The groups other than core, with their (single) version, in discovery order.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if !out.iter().any(|(g, _)| *g == r.group) {
            out.push((r.group, r.version));
        }
    }
    out
}

/// Whether objects of this kind carry metadata.generation (bumped on spec changes).
pub fn has_generation(kind: &str) -> bool {
    matches!(kind, "Pod" | "Deployment" | "ReplicaSet" | "NetworkPolicy" | "Service")
}

/// Namespaces that exist from the start and cannot be deleted.
pub const SYSTEM_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_namespace_do_not_match_a_longer_namespace_name() {
        let pods = find("", "v1", "pods").unwrap();
        assert!(!pods.key(Some("ab"), "x").starts_with(&pods.scope_prefix(Some("a"))));
        assert!(pods.key(Some("a"), "x").starts_with(&pods.scope_prefix(None)));
        let ns = find("", "v1", "namespaces").unwrap();
        assert_eq!(ns.key(Some("ignored"), "default"), "/registry/core/namespaces/default");
        assert_eq!(find("apps", "v1", "deployments").unwrap().qualified(), "deployments.apps");
        assert_eq!(groups()[0], ("discovery.k8s.io", "v1"));
    }
}
