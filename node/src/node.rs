//! The Node object: created when missing (an existing one is kept, with its spec and labels),
//! and its status kept current: addresses, the Ready heartbeat, the kubelet endpoint port and
//! nodeInfo.
use std::time::Duration;

use k8s_openapi::{api::core::v1::Node, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use crate::Config;

/// How often Ready's heartbeat is renewed.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

fn status(config: &Config, port: u16, since: &str) -> Value {
    let now = Timestamp::now().to_string();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut addresses: Vec<Value> = config
        .node_ips
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
        .collect();
    addresses.push(json!({"type": "Hostname", "address": config.node_name}));
    json!({"status": {
        "addresses": addresses,
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "weir node runtime is posting ready status",
            "lastHeartbeatTime": now, "lastTransitionTime": since,
        }],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
        "nodeInfo": {
            "machineID": "", "systemUUID": "", "bootID": "",
            "kernelVersion": kernel.trim(), "osImage": "weir lab",
            "containerRuntimeVersion": format!("weir://{}", env!("CARGO_PKG_VERSION")),
            "kubeletVersion": "v1.33.0-weir", "kubeProxyVersion": "",
            "operatingSystem": "linux", "architecture": std::env::consts::ARCH,
        },
    }})
}

/// Creates the Node when missing and writes its status once.
pub async fn register(client: Client, config: &Config, port: u16) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(client);
    if api.get_opt(&config.node_name).await?.is_none() {
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": config.node_name, "labels": {
                "kubernetes.io/hostname": config.node_name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH}},
        }))?;
        match api.create(&PostParams::default(), &node).await {
            Ok(_) => log::info!("registered node {}", config.node_name),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(err) => return Err(err.into()),
        }
    }
    let since = Timestamp::now().to_string();
    api.patch_status(
        &config.node_name,
        &PatchParams::default(),
        &Patch::Merge(status(config, port, &since)),
    )
    .await?;
    Ok(())
}

/// Renews the status every [`HEARTBEAT`]; errors are logged and retried.
pub async fn heartbeat(client: Client, config: Config, port: u16) {
    let api: Api<Node> = Api::all(client);
    let since = Timestamp::now().to_string();
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        let patch = Patch::Merge(status(&config, port, &since));
        match api.patch_status(&config.node_name, &PatchParams::default(), &patch).await {
            Ok(_) => {}
            // Someone deleted the Node: register it again, as kubelet does.
            Err(kube::Error::Api(e)) if e.code == 404 => {
                if let Err(err) = register(api.clone().into_client(), &config, port).await {
                    log::warn!("node heartbeat: registering again: {err:#}");
                }
            }
            Err(err) => log::warn!("node heartbeat: {err}"),
        }
    }
}
