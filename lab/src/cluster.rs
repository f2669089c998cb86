//! The lab's conversation with its API server (kube-rs, admin kubeconfig): registering nodes,
//! installing cluster DNS, waiting for readiness, and the listings of `weir lab status`.
use std::{path::Path, time::Duration};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Namespace, Node, Pod, Service},
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};

use crate::{
    host,
    plan::{self, LabPlan},
    state::LabState,
};

pub async fn client(kubeconfig: &Path) -> Result<Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .context("loading the lab's kubeconfig")?;
    Client::try_from(config).context("building the API client")
}

async fn poll<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates the Node objects (the node runtimes keep their status) and returns each node's pod
/// CIDRs (one per family of the lab) once the API server's node IPAM controller assigned them.
pub async fn register_nodes(
    client: &Client,
    plan: &LabPlan,
    timeout: Duration,
) -> Result<Vec<Vec<String>>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let families = if plan.spec.ip_family == plan::IpFamily::Dual { 2 } else { 1 };
    for node in &plan.nodes {
        let object: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node.name,
                "labels": {
                    "kubernetes.io/hostname": node.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
                    "weir.dev/lab": plan.spec.name,
                }
            },
            "status": {
                "addresses": node_addresses(node),
            }
        }))?;
        match nodes.create(&PostParams::default(), &object).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(err) => return Err(err).with_context(|| format!("creating Node {}", node.name)),
        }
    }
    let mut cidrs = Vec::new();
    for node in &plan.nodes {
        let cidr = poll(timeout, || async {
            let spec = nodes.get(&node.name).await.ok()?.spec?;
            let all = spec.pod_cidrs.or(spec.pod_cidr.map(|c| vec![c]))?;
            (all.len() >= families).then_some(all)
        })
        .await
        .with_context(|| {
            format!("Node {} got no pod CIDR of each family within {timeout:?}", node.name)
        })?;
        cidrs.push(cidr);
    }
    Ok(cidrs)
}

/// A node's status.addresses: its InternalIPs (IPv4 first) and its name.
fn node_addresses(node: &plan::NodePlan) -> serde_json::Value {
    let mut addresses = vec![serde_json::json!({"type": "InternalIP", "address": node.address})];
    addresses
        .extend(node.address6.map(|a| serde_json::json!({"type": "InternalIP", "address": a})));
    addresses.push(serde_json::json!({"type": "Hostname", "address": node.name}));
    addresses.into()
}

pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until every node runtime reported its Node Ready.
pub async fn wait_nodes_ready(
    client: &Client,
    plan: &LabPlan,
    record: &LabState,
    timeout: Duration,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    for node in &plan.nodes {
        let runtime = record
            .daemons
            .iter()
            .find(|d| d.role == "node" && d.node.as_deref() == Some(&node.name))
            .context("node runtime not recorded")?;
        let ready = poll(timeout, || async {
            if !host::alive(runtime.pid) {
                return Some(false);
            }
            let object = nodes.get(&node.name).await.ok()?;
            node_ready(&object).then_some(true)
        })
        .await;
        let why = match ready {
            Some(true) => continue,
            Some(false) => "exited",
            None => "did not report the Node Ready",
        };
        bail!(
            "the node runtime of {} {why}; its log ({}):\n{}",
            node.name,
            runtime.log.display(),
            host::log_tail(&runtime.log, 20)
        );
    }
    Ok(())
}

/// Installs kube-dns (Service at the usual .10, a `coredns` Deployment that the node runtimes
/// run as `weir dns`) and waits until its pod is Ready.
pub async fn install_dns(client: &Client, timeout: Duration) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "kube-system"}}))?;
    ignore_exists(namespaces.create(&PostParams::default(), &namespace).await)?;
    let services: Api<Service> = Api::namespaced(client.clone(), "kube-system");
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "kube-dns", "labels": {"k8s-app": "kube-dns"}},
        "spec": {
            "clusterIP": plan::CLUSTER_DNS.to_string(),
            "selector": {"k8s-app": "kube-dns"},
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}
            ]
        }
    }))?;
    ignore_exists(services.create(&PostParams::default(), &service).await)?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "kube-system");
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "coredns", "labels": {"k8s-app": "kube-dns"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"k8s-app": "kube-dns"}},
            "template": {
                "metadata": {"labels": {"k8s-app": "kube-dns"}},
                "spec": {
                    "dnsPolicy": "Default",
                    "containers": [{
                        "name": "coredns",
                        "image": "registry.k8s.io/coredns/coredns:v1.12.0",
                        "ports": [
                            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                            {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}
                        ],
                        "readinessProbe": {"tcpSocket": {"port": 53}, "periodSeconds": 1}
                    }]
                }
            }
        }
    }))?;
    ignore_exists(deployments.create(&PostParams::default(), &deployment).await)?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let params = ListParams::default().labels("k8s-app=kube-dns");
    let ready = poll(timeout, || async {
        let list = pods.list(&params).await.ok()?;
        list.items.iter().any(pod_ready).then_some(())
    })
    .await;
    if ready.is_none() {
        let list = pods.list(&params).await.map(|l| l.items).unwrap_or_default();
        let states: Vec<String> = list.iter().map(describe_pod).collect();
        bail!("the coredns pod is not Ready after {timeout:?}: {}", states.join("; "));
    }
    Ok(())
}

fn ignore_exists<T>(result: Result<T, kube::Error>) -> Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(err) => Err(err.into()),
    }
}

pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `name: phase (waiting reason: message)` for error messages.
pub fn describe_pod(pod: &Pod) -> String {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or_else(|| "Pending".into());
    let waiting: Vec<String> = status
        .container_statuses
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| c.state?.waiting)
        .map(|w| format!("{}: {}", w.reason.unwrap_or_default(), w.message.unwrap_or_default()))
        .collect();
    if waiting.is_empty() {
        format!("{name}: {phase}")
    } else {
        format!("{name}: {phase} ({})", waiting.join(", "))
    }
}

/// What `weir lab status` lists.
pub struct Listing {
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
}

pub async fn listing(client: &Client) -> Result<Listing> {
    let params = ListParams::default();
    Ok(Listing {
        nodes: Api::<Node>::all(client.clone()).list(&params).await?.items,
        pods: Api::<Pod>::all(client.clone()).list(&params).await?.items,
        services: Api::<Service>::all(client.clone()).list(&params).await?.items,
    })
}
