//! Discovery and server information: /version, /api, /api/v1, /apis, /apis/GROUP/VERSION, and
//! the OpenAPI v3 index and per-group documents kubectl reads to decide that the server
//! validates fields itself (so `kubectl apply` works without `--validate=false`).
//!
//! `/api` and `/apis` are served in the aggregated form (`apidiscovery.k8s.io/v2`, one
//! document with every resource) to clients that ask for it in their Accept header, as
//! kubectl and client-go do, and in the legacy form otherwise.
use serde_json::{Value, json};

use crate::resources::{RESOURCES, Resource, groups};

/// The Kubernetes version the API follows.
pub const KUBERNETES_MINOR: &str = "36";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": KUBERNETES_MINOR,
        "gitVersion": format!("v1.{KUBERNETES_MINOR}.0+weir-{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "none (weir is written in Rust)",
        "compiler": "rustc",
        "platform": "linux/amd64",
    })
}

pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

pub fn api_group_list() -> Value {
    let groups: Vec<Value> = groups()
        .into_iter()
        .map(|(group, version)| {
            let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
            json!({"name": group, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(group: &str) -> Option<Value> {
    let (_, version) = groups().into_iter().find(|(g, _)| *g == group)?;
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    Some(
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": [gv.clone()], "preferredVersion": gv}),
    )
}

const VERBS: &[&str] = &["create", "delete", "get", "list", "patch", "update", "watch"];

/// A subresource of a kind: (name, response group, version and kind, verbs).
struct Subresource {
    name: &'static str,
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    verbs: &'static [&'static str],
}

fn subresources(r: &Resource) -> Vec<Subresource> {
    let mut out = Vec::new();
    if r.has_status {
        let verbs = &["get", "patch", "update"];
        out.push(Subresource {
            name: "status",
            group: r.group,
            version: r.version,
            kind: r.kind,
            verbs,
        });
    }
    if r.kind == "Pod" {
        let create = &["create"];
        out.push(Subresource {
            name: "binding",
            group: "",
            version: "v1",
            kind: "Binding",
            verbs: create,
        });
        let get_create = &["create", "get"];
        for (name, kind) in [
            ("exec", "PodExecOptions"),
            ("attach", "PodAttachOptions"),
            ("portforward", "PodPortForwardOptions"),
        ] {
            out.push(Subresource { name, group: "", version: "v1", kind, verbs: get_create });
        }
        out.push(Subresource {
            name: "log",
            group: "",
            version: "v1",
            kind: "Pod",
            verbs: &["get"],
        });
    }
    if matches!(r.kind, "Deployment" | "ReplicaSet") {
        let verbs = &["get", "patch", "update"];
        out.push(Subresource {
            name: "scale",
            group: "autoscaling",
            version: "v1",
            kind: "Scale",
            verbs,
        });
    }
    out
}

fn resource_entries(r: &Resource) -> Vec<Value> {
    let mut main = json!({
        "name": r.plural,
        "singularName": r.singular,
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": VERBS,
    });
    if !r.short_names.is_empty() {
        main["shortNames"] = json!(r.short_names);
    }
    if !r.categories.is_empty() {
        main["categories"] = json!(r.categories);
    }
    let mut out = vec![main];
    for sub in subresources(r) {
        let mut entry = json!({
            "name": format!("{}/{}", r.plural, sub.name),
            "singularName": "",
            "namespaced": r.namespaced,
            "kind": sub.kind,
            "verbs": sub.verbs,
        });
        if sub.group != r.group || sub.version != r.version {
            entry["group"] = json!(sub.group);
            entry["version"] = json!(sub.version);
        }
        out.push(entry);
    }
    out
}

/// The media type of aggregated discovery (`apidiscovery.k8s.io`), when the Accept header asks
/// for it (kubectl and client-go do, listing v2 before v2beta1 and plain JSON): the value for
/// the response's Content-Type.
pub fn aggregated_media_type(accept: Option<&str>) -> Option<String> {
    for entry in accept?.split(',') {
        let mut params = entry.split(';').map(str::trim);
        if params.next() != Some("application/json") {
            continue;
        }
        let (mut group, mut version, mut kind) = (None, None, None);
        for param in params {
            match param.split_once('=') {
                Some(("g", v)) => group = Some(v),
                Some(("v", v)) => version = Some(v),
                Some(("as", v)) => kind = Some(v),
                _ => {}
            }
        }
        if group == Some("apidiscovery.k8s.io")
            && kind == Some("APIGroupDiscoveryList")
            && let Some(version @ ("v2" | "v2beta1")) = version
        {
            return Some(format!(
                "application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList"
            ));
        }
    }
    None
}

fn resource_discovery(r: &Resource) -> Value {
    let kind = |group: &str, version: &str, kind: &str| json!({"group": group, "version": version, "kind": kind});
    let mut entry = json!({
        "resource": r.plural,
        "responseKind": kind(r.group, r.version, r.kind),
        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": r.singular,
        "verbs": VERBS,
    });
    if !r.short_names.is_empty() {
        entry["shortNames"] = json!(r.short_names);
    }
    if !r.categories.is_empty() {
        entry["categories"] = json!(r.categories);
    }
    let subs: Vec<Value> = subresources(r)
        .into_iter()
        .map(|sub| {
            json!({
                "subresource": sub.name,
                "responseKind": kind(sub.group, sub.version, sub.kind),
                "verbs": sub.verbs,
            })
        })
        .collect();
    if !subs.is_empty() {
        entry["subresources"] = json!(subs);
    }
    entry
}

/// Aggregated discovery: every resource of the core group (`/api`, `core` true) or of every
/// named group (`/apis`) in one document, so a client needs one request instead of one per
/// group version.
pub fn aggregated_discovery(core: bool, api_version: &str) -> Value {
    let gvs: Vec<(&str, &str)> = if core { vec![("", "v1")] } else { groups() };
    let items: Vec<Value> = gvs
        .into_iter()
        .map(|(group, version)| {
            let resources: Vec<Value> = RESOURCES
                .iter()
                .filter(|r| r.group == group && r.version == version)
                .map(resource_discovery)
                .collect();
            json!({
                "metadata": {"name": group},
                "versions": [{"version": version, "resources": resources, "freshness": "Current"}],
            })
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{api_version}"),
        "metadata": {},
        "items": items,
    })
}

/// The APIResourceList of a group version, if served.
pub fn api_resource_list(group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .flat_map(resource_entries)
        .collect();
    if resources.is_empty() {
        return None;
    }
    let group_version =
        if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
    )
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() { format!("api/{version}") } else { format!("apis/{group}/{version}") }
}

/// The OpenAPI v3 index: one document per group version.
pub fn openapi_v3_index() -> Value {
    let mut paths = serde_json::Map::new();
    let mut gvs: Vec<(&str, &str)> = vec![("", "v1")];
    gvs.extend(groups());
    for (group, version) in gvs {
        let path = gv_path(group, version);
        paths.insert(path.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash=weir{}", env!("CARGO_PKG_VERSION"))}));
    }
    json!({"paths": paths})
}

/// A minimal OpenAPI v3 document for a group version: one PATCH operation per kind, tagged with
/// its group-version-kind and declaring the `fieldValidation` parameter, which is what kubectl
/// looks for before it leaves validation to the server. Schemas are open (any object).
pub fn openapi_v3_document(path: &str) -> Option<Value> {
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    for r in RESOURCES.iter().filter(|r| gv_path(r.group, r.version) == path) {
        let item = if r.namespaced {
            format!("/{path}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("/{path}/{}/{{name}}", r.plural)
        };
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let schema_name = format!(
            "io.weir.{}.{}.{}",
            if r.group.is_empty() { "core" } else { r.group },
            r.version,
            r.kind
        );
        paths.insert(
            item,
            json!({
                "patch": {
                    "operationId": format!("patch{}", r.kind),
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": gvk,
                    "parameters": [
                        {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
                        {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
                        {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                        {"name": "force", "in": "query", "schema": {"type": "boolean"}}
                    ],
                    "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema_name}")}}}}}
                }
            }),
        );
        schemas.insert(
            schema_name,
            json!({"type": "object", "x-kubernetes-group-version-kind": [gvk], "x-kubernetes-preserve-unknown-fields": true}),
        );
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (weir)", "version": format!("v1.{KUBERNETES_MINOR}.0")},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}
