//! Node-to-node pod networking: each node's pod CIDR routed to it (VXLAN or native routes),
//! masquerade for pod traffic leaving the cluster network, and the pod MTU that goes with it.
//!
//! Split by I/O: [`model`] is the pure Nodes -> routes/neighbours/FDB computation; [`kernel`]
//! (rtnetlink) and [`nat`] (nf_tables) are thin adapters; [`reconcile`] diffs the kernel's
//! state, limited to what weir owns, against the model's; [`run`] is the agent's loop.
//!
//! Level-triggered: every change of a Node and a periodic resync rebuild the desired state from
//! the full Node list and reconcile, so a lost Delete event or a route removed by hand is
//! repaired. On shutdown everything stays in place (pods keep working while the agent
//! restarts); the next agent adopts it without changes.
pub mod host;
pub mod kernel;
pub mod model;
pub mod nat;
pub mod reconcile;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::reflector::Store,
};
use tokio::sync::Notify;
use weir_cni_plugin::netlink::Socket;

use self::{
    model::{Desired, IpCidr, Overlay, VTEP_IP_ANNOTATION, VTEP_MAC_ANNOTATION, format_mac},
    reconcile::Outcome,
};

/// Default name of the masquerade tables (`table ip weir_nat`, and `table ip6 weir_nat` with
/// an IPv6 cluster CIDR).
pub const DEFAULT_NAT_TABLE: &str = "weir_nat";
/// Default period of the repairing resync.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(10);

/// The routing part of the agent's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingConfig {
    pub overlay: Overlay,
    /// The pod network (all nodes' pod CIDRs), at most one per family; needed for masquerade.
    pub cluster_cidrs: Vec<IpCidr>,
    pub masquerade: bool,
    /// Name of the nftables tables (family ip, and ip6) holding the masquerade rules.
    pub nat_table: String,
    /// The interface node-to-node traffic uses; default: the one holding the node's address.
    pub uplink: Option<String>,
    /// Where to write the node state file weir-cni reads (pod CIDRs, MTU); none by default.
    pub node_state_file: Option<PathBuf>,
    pub resync: Duration,
    /// eBPF host routing (eBPF dataplane only): pod-to-pod traffic between nodes forwarded by
    /// weir's programs past the node's IP stack ([`host`]).
    pub ebpf_host_routing: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            overlay: Overlay::None,
            cluster_cidrs: Vec::new(),
            masquerade: false,
            nat_table: DEFAULT_NAT_TABLE.into(),
            uplink: None,
            node_state_file: None,
            resync: DEFAULT_RESYNC,
            ebpf_host_routing: false,
        }
    }
}

impl RoutingConfig {
    /// Whether the agent has routing work to do at all.
    pub fn enabled(&self) -> bool {
        self.overlay != Overlay::None || self.masquerade || self.node_state_file.is_some()
    }
}

/// The masquerade tables written: cluster CIDR -> the local pod CIDR its table was written for.
type NatWritten = BTreeMap<IpCidr, Option<IpCidr>>;

/// One pass: the desired state and the kernel reconciled to it (on a blocking thread).
struct Pass {
    desired: Desired,
    outcome: Result<Outcome, String>,
}

/// Runs until the task is dropped: reconciles on every Node change and every `resync`.
pub async fn run(
    config: RoutingConfig,
    client: Client,
    nodes: Store<Node>,
    changed: Arc<Notify>,
    node_name: String,
    node_addresses: Vec<IpAddr>,
    mut host_routing: Option<host::HostRouting>,
) {
    if nodes.wait_until_ready().await.is_err() {
        log::error!("routing: the Node watcher stopped before its first list");
        return;
    }
    // What was last logged: a state is logged when it changes, not on every resync.
    let mut last_logged = String::new();
    let mut nat_written = NatWritten::new();
    let mut state_written: Option<String> = None;
    let mut first = true;
    loop {
        let snapshot = nodes.state();
        let desired = model::desired(
            snapshot.iter().map(AsRef::as_ref),
            &node_name,
            config.overlay,
            &node_addresses,
        );
        let pass = {
            let (config, written) = (config.clone(), nat_written.clone());
            tokio::task::spawn_blocking(move || reconcile_pass(&config, desired, written)).await
        };
        match pass {
            Ok((pass, written)) => {
                nat_written = written;
                let key = match &pass.outcome {
                    Ok(o) => format!(
                        "{} {} {:?} {:?}",
                        o.uplink, o.pod_mtu, pass.desired.skipped, o.failed
                    ),
                    Err(err) => err.clone(),
                };
                let changed_state = key != last_logged;
                last_logged = key;
                if let Err(err) = &pass.outcome
                    && changed_state
                {
                    log::error!("routing: {err} (retrying every {:?})", config.resync);
                }
                if let Ok(outcome) = &pass.outcome {
                    if changed_state || outcome.changes > 0 {
                        log_outcome(&config, &pass.desired, outcome);
                    }
                    if first {
                        first = false;
                        // Tests and operators read this line: the node's pod MTU and overlay.
                        println!(
                            "weir agent: routing {} on {} ready: pod MTU {}, {} remote pod CIDRs",
                            config.overlay,
                            outcome.uplink,
                            outcome.pod_mtu,
                            pass.desired.routes.len()
                        );
                    }
                    if let Some(host) = host_routing.as_mut() {
                        // Where other nodes' pod traffic arrives.
                        let arrival = match config.overlay {
                            Overlay::Vxlan => reconcile::VXLAN_DEVICE,
                            _ => outcome.uplink.as_str(),
                        };
                        match host.sync(&pass.desired, arrival, config.ebpf_host_routing) {
                            Ok(synced) if synced != host::Synced::default() => log::info!(
                                "routing: eBPF host routing map: {} written, {} removed{}",
                                synced.written,
                                synced.removed,
                                if synced.attached {
                                    format!("; tc_host_in attached to {arrival}")
                                } else {
                                    String::new()
                                }
                            ),
                            Ok(_) => {}
                            Err(err) => log::error!("routing: eBPF host routing: {err}"),
                        }
                    }
                    if let Some(mac) = outcome.vtep_mac {
                        publish_vtep(&client, &node_name, &snapshot, mac, &pass.desired).await;
                    }
                    if let Some(path) = &config.node_state_file {
                        let text = node_state(&pass.desired, outcome.pod_mtu);
                        if state_written.as_deref() != Some(text.as_str()) {
                            match write_atomically(path, &text) {
                                Ok(()) => state_written = Some(text),
                                Err(err) => log::error!(
                                    "routing: writing the node state file {}: {err}",
                                    path.display()
                                ),
                            }
                        }
                    }
                }
            }
            Err(err) => log::error!("routing: reconcile task failed: {err}"),
        }
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(config.resync) => {}
        }
    }
}

fn reconcile_pass(
    config: &RoutingConfig,
    desired: Desired,
    mut nat_written: NatWritten,
) -> (Pass, NatWritten) {
    for v6 in [false, true] {
        let family = if v6 { "ip6" } else { "ip" };
        let table = &config.nat_table;
        let cluster = config.cluster_cidrs.iter().find(|c| c.is_ipv6() == v6);
        let Some(cidr) = cluster.filter(|_| config.masquerade) else {
            // Masquerade (of this family) switched off since a previous run: its table goes.
            match nat::delete_table(table, v6) {
                Ok(true) => log::info!("routing: deleted table {family} {table} (masquerade off)"),
                Ok(false) => {}
                Err(err) => log::error!("routing: deleting table {family} {table}: {err}"),
            }
            continue;
        };
        // Written once per agent start and local pod CIDR (neither changes while it runs), and
        // again when someone deleted the table.
        let local = desired.local_pod_cidr(v6);
        let present =
            nat_written.get(cidr) == Some(&local) && nat::table_exists(table, v6).unwrap_or(false);
        if present {
            continue;
        }
        match nat::write_masquerade(table, cidr, local.as_ref()) {
            Ok(()) => {
                log::info!(
                    "routing: masquerading {cidr} -> outside (and outside -> pods of other nodes) in table {family} {table}"
                );
                nat_written.insert(*cidr, local);
            }
            Err(err) => {
                log::error!("routing: writing table {family} {table}: {err}");
                nat_written.remove(cidr);
            }
        }
    }
    let outcome = match Socket::open() {
        Ok(mut sock) => {
            reconcile::reconcile(&mut sock, config.overlay, &desired, config.uplink.as_deref())
                .map_err(|err| error_chain(&err))
        }
        Err(err) => Err(format!("opening a netlink socket: {err}")),
    };
    if config.overlay == Overlay::Vxlan || config.overlay == Overlay::Native {
        enable_forwarding(desired.routes.iter().any(|r| r.dst.is_ipv6()));
    }
    (Pass { desired, outcome }, nat_written)
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Pods on other nodes are reached through this node: IPv4 forwarding must be on, and IPv6
/// forwarding when IPv6 pod CIDRs are routed (in this network namespace only).
fn enable_forwarding(v6: bool) {
    let mut knobs = vec![("IPv4", "/proc/sys/net/ipv4/ip_forward")];
    if v6 {
        knobs.push(("IPv6", "/proc/sys/net/ipv6/conf/all/forwarding"));
    }
    for (family, path) in knobs {
        if std::fs::read_to_string(path).is_ok_and(|v| v.trim() != "1")
            && let Err(err) = std::fs::write(path, "1")
        {
            log::error!("routing: enabling {family} forwarding: {err}");
        }
    }
}

fn log_outcome(config: &RoutingConfig, desired: &Desired, outcome: &Outcome) {
    log::info!(
        "routing: overlay {} on {} (pod MTU {}): {} remote pod CIDRs, {} kernel changes",
        config.overlay,
        outcome.uplink,
        outcome.pod_mtu,
        desired.routes.len(),
        outcome.changes
    );
    for (node, why) in &desired.skipped {
        log::warn!("routing: node {node}: {why}");
    }
    for failure in &outcome.failed {
        log::error!("routing: {failure}");
    }
}

/// Writes this node's VTEP MAC and address as annotations (JSON merge patch) when they differ.
async fn publish_vtep(
    client: &Client,
    node_name: &str,
    nodes: &[Arc<Node>],
    mac: [u8; 6],
    desired: &Desired,
) {
    let Some(address) = desired.local_address else { return };
    let (mac, address) = (format_mac(mac), address.to_string());
    let annotations = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name))
        .and_then(|n| n.metadata.annotations.clone())
        .unwrap_or_default();
    if annotations.get(VTEP_MAC_ANNOTATION) == Some(&mac)
        && annotations.get(VTEP_IP_ANNOTATION) == Some(&address)
    {
        return;
    }
    let patch = serde_json::json!({"metadata": {"annotations": {
        VTEP_MAC_ANNOTATION: mac, VTEP_IP_ANNOTATION: address}}});
    let api: Api<Node> = Api::all(client.clone());
    match api.patch(node_name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => log::info!("routing: published VTEP {mac} at {address} on Node {node_name}"),
        Err(err) => log::error!("routing: annotating Node {node_name} with its VTEP: {err}"),
    }
}

/// The node state file weir-cni reads (docs/cni.md): this node's pod CIDRs (one range set per
/// family for its IPAM) and pod MTU.
fn node_state(desired: &Desired, mtu: u32) -> String {
    let cidrs: Vec<String> = desired.local_pod_cidrs.iter().map(ToString::to_string).collect();
    serde_json::json!({
        "version": 1,
        "podCIDRs": cidrs,
        "ready": !cidrs.is_empty(),
        "mtu": mtu,
    })
    .to_string()
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Removes the routing state weir made in this namespace (the `--cleanup` path): the VXLAN
/// device, weir's routes and the masquerade tables. Returns what was removed, for the log.
pub fn cleanup(nat_table: &str) -> Result<String, String> {
    let mut sock = Socket::open().map_err(|e| format!("opening a netlink socket: {e}"))?;
    let removed = reconcile::remove_all(&mut sock).map_err(|e| e.to_string())?;
    let detached = host::detach_all(&mut sock)
        .map_err(|e| format!("detaching the host routing program: {e}"))?;
    let mut text = format!("removed {removed} routes/devices, {detached} host routing programs");
    for (v6, family) in [(false, "ip"), (true, "ip6")] {
        if nat::delete_table(nat_table, v6)
            .map_err(|e| format!("deleting nftables table {family} {nat_table}: {e}"))?
        {
            text.push_str(&format!(" and table {family} {nat_table}"));
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_state_is_what_weir_cni_reads() {
        let desired = Desired {
            local_pod_cidrs: vec!["10.244.3.0/24".parse().unwrap()],
            ..Desired::default()
        };
        let v: serde_json::Value = serde_json::from_str(&node_state(&desired, 1450)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"version": 1, "podCIDRs": ["10.244.3.0/24"], "ready": true, "mtu": 1450})
        );
        let dual = Desired {
            local_pod_cidrs: vec![
                "10.244.3.0/24".parse().unwrap(),
                "fd00:10:244:3::/64".parse().unwrap(),
            ],
            ..Desired::default()
        };
        let v: serde_json::Value = serde_json::from_str(&node_state(&dual, 1450)).unwrap();
        assert_eq!(v["podCIDRs"], serde_json::json!(["10.244.3.0/24", "fd00:10:244:3::/64"]));
        let v: serde_json::Value =
            serde_json::from_str(&node_state(&Desired::default(), 1500)).unwrap();
        assert_eq!(v["ready"], false);
    }
}
