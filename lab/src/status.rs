//! `weir lab status`: the lab's daemons, agents' health, nodes, pods and services.
use std::fmt::Write as _;

use anyhow::{Result, bail};

use crate::{cluster, host, plan::LabPlan, state};

pub fn status(plan: &LabPlan) -> Result<String> {
    let Some(record) = state::load(&plan.state_dir)? else {
        bail!(
            "no lab {:?} here ({} has no state): start one with `weir lab up`",
            plan.spec.name,
            plan.state_dir.display()
        );
    };
    let mut out = String::new();
    let spec = &record.spec;
    writeln!(
        out,
        "lab {:?}: {} node(s), dataplane {}, overlay {}, {}",
        spec.name,
        spec.nodes,
        spec.dataplane,
        spec.overlay,
        if record.ready { "ready" } else { "not ready (up did not finish)" }
    )?;
    if let Some(url) = &record.apiserver {
        writeln!(out, "API server: {url}  (export KUBECONFIG={})", plan.kubeconfig().display())?;
    }
    writeln!(out, "\nDAEMON       NODE                 PID      STATE")?;
    for daemon in &record.daemons {
        let node = daemon.node.as_deref().unwrap_or("-");
        let mut state =
            if host::alive(daemon.pid) { "running".to_string() } else { "dead".to_string() };
        let lab_node = plan.nodes.iter().find(|n| Some(n.name.as_str()) == daemon.node.as_deref());
        if daemon.role == "agent"
            && host::alive(daemon.pid)
            && let Some(node) = lab_node
        {
            state = match host::http_get_in(&node.netns, node.agent_health(), "/healthz") {
                Ok((200, _)) => "running, healthy".into(),
                Ok((code, body)) => format!("running, unhealthy ({code}: {})", body.trim()),
                _ => "running, health endpoint unreachable".into(),
            };
        }
        writeln!(out, "{:<12} {node:<20} {:<8} {state}", daemon.role, daemon.pid)?;
    }
    if record.apiserver.is_none() {
        return Ok(out);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let listing = match runtime.block_on(async {
        let client = cluster::client(&plan.kubeconfig()).await?;
        cluster::listing(&client).await
    }) {
        Ok(listing) => listing,
        Err(err) => {
            writeln!(out, "\nthe API server does not answer: {err:#}")?;
            return Ok(out);
        }
    };
    writeln!(out, "\nNODE                 STATUS     POD CIDR")?;
    for node in &listing.nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        let ready = if cluster::node_ready(node) { "Ready" } else { "NotReady" };
        let cidr = node.spec.as_ref().and_then(|s| s.pod_cidr.clone()).unwrap_or_default();
        writeln!(out, "{name:<20} {ready:<10} {cidr}")?;
    }
    writeln!(out, "\nPOD                                      NODE                 IP")?;
    for pod in &listing.pods {
        let name = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or(""),
            pod.metadata.name.as_deref().unwrap_or("")
        );
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
        writeln!(out, "{:<40} {node:<20} {ip}   {}", name, cluster::describe_pod(pod))?;
    }
    writeln!(out, "\nSERVICE                                  TYPE         CLUSTER-IP")?;
    for service in &listing.services {
        let name = format!(
            "{}/{}",
            service.metadata.namespace.as_deref().unwrap_or(""),
            service.metadata.name.as_deref().unwrap_or("")
        );
        let spec = service.spec.clone().unwrap_or_default();
        let kind = spec.type_.unwrap_or_else(|| "ClusterIP".into());
        let ip = spec.cluster_ip.unwrap_or_default();
        writeln!(out, "{name:<40} {kind:<12} {ip}")?;
    }
    Ok(out)
}
