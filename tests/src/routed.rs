//! A node namespace with pod namespaces behind it on routed veths, wired the way weir-cni
//! wires pods: the pod has a /32 and a default route via a link-local gateway; the node has a
//! host route to the pod's /32 on its end of the veth. The node's own address sits on its
//! loopback, and the node forwards between its pods. Everything lives in test namespaces and
//! goes away with them.
use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use crate::netns::{Netns, Veth};

/// The pods' gateway, on the node side of every pod veth.
pub const GATEWAY: &str = "169.254.1.1";

/// A node namespace (`role`) that forwards, with `node_ip`/32 on its loopback.
pub fn node(role: &str, node_ip: Ipv4Addr) -> Result<Netns> {
    let node = Netns::new(role)?;
    node.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))??;
    node.ip(&["addr", "add", &format!("{node_ip}/32"), "dev", "lo"])?;
    Ok(node)
}

/// A pod namespace (`role`) with address `ip` behind `node`; returns it and the veth (`a` in
/// the pod, `b` on the node: where the policy programs attach). The node's connections to the
/// pod leave with `node_ip` as source, as they do on a real node.
pub fn pod(node: &Netns, node_ip: Ipv4Addr, role: &str, ip: Ipv4Addr) -> Result<(Netns, Veth)> {
    let pod = Netns::new(role)?;
    let veth = Veth::between(&pod, node)?;
    pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", &veth.a])?;
    pod.ip(&["route", "add", GATEWAY, "dev", &veth.a, "scope", "link"])?;
    pod.ip(&["route", "add", "default", "via", GATEWAY, "dev", &veth.a])?;
    // The node-side veth carries the gateway address here (weir-cni's has none).
    node.ip(&["addr", "add", &format!("{GATEWAY}/32"), "dev", &veth.b])?;
    let src = node_ip.to_string();
    node.ip(&["route", "add", &format!("{ip}/32"), "dev", &veth.b, "src", &src])?;
    Ok((pod, veth))
}

/// Attaches `tc_pol_egress` (tc ingress: the pod's egress) and `tc_pol_ingress` (tc egress:
/// the pod's ingress) of `ebpf` to `interface` in `node`, as the agent does on a pod's
/// host-side veth. The attachments go away with the device.
pub fn attach_policy(ebpf: &mut aya::Ebpf, node: &Netns, interface: &str) -> Result<()> {
    use aya::programs::TcAttachType;
    use weir_proxy::programs::{self, TC_POLICY_EGRESS, TC_POLICY_INGRESS};
    for (name, direction) in
        [(TC_POLICY_EGRESS, TcAttachType::Ingress), (TC_POLICY_INGRESS, TcAttachType::Egress)]
    {
        let program = programs::classifier(ebpf, name)?;
        let owned = interface.to_string();
        node.run(move || program.attach(&owned, direction))?
            .with_context(|| format!("attaching {name} to {interface}"))?;
    }
    Ok(())
}
