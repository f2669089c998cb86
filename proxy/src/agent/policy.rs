//! The agent's NetworkPolicy loop.
//!
//! Its own watchers (Namespaces, Pods, NetworkPolicies, every Node), its own task and wake-up,
//! so a policy change never waits behind a service sync. Level-triggered: every change (and a
//! periodic resync) rebuilds the whole `Cluster` from the stores, compiles the policy of this
//! node's pods and hands it to the datapath, which writes only the difference. Nothing is
//! applied before every store has completed its initial list: a restarted agent never applies
//! an empty policy over the one its predecessor programmed.
//!
//! After each apply on the eBPF datapath, every local pod veth is checked for the policy
//! programs ([`PolicyPrograms::reconcile`]): pods made before the agent ran get them, and a
//! previous agent's programs are replaced.
use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client,
    runtime::{reflector::Store, watcher},
};
use tokio::{sync::Notify, task::JoinHandle};
use weir_cni_plugin::wiring::GATEWAY_V4;
use weir_policy::{Cidr, Cluster, Compiled, Compiler};

use super::{
    config::AgentConfig,
    node_context,
    status::{PolicySyncReport, Status},
    watch::watch,
};
use crate::policy::{PolicyDatapath, PolicyNode, PolicyPrograms};

/// Pause before retrying after a failed apply.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// A full recompile and reconcile at least this often, even without changes (repairs
/// attachments of veths whose pods the API has not reported yet).
const RESYNC: Duration = Duration::from_secs(30);

/// When packets of a local pod the policy does not know yet are dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DenyUnknown {
    /// While at least one NetworkPolicy exists (no policy: nothing to protect).
    #[default]
    Auto,
    Always,
    Never,
}

impl DenyUnknown {
    fn decide(self, policies: usize) -> bool {
        match self {
            DenyUnknown::Auto => policies > 0,
            DenyUnknown::Always => true,
            DenyUnknown::Never => false,
        }
    }
}

/// The policy part of the agent's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Enforce NetworkPolicy (`--network-policy`).
    pub enabled: bool,
    pub deny_unknown: DenyUnknown,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self { enabled: true, deny_unknown: DenyUnknown::Auto }
    }
}

/// Read handles on the objects the compiler needs.
#[derive(Clone)]
struct PolicyStores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    policies: Store<NetworkPolicy>,
    nodes: Store<Node>,
}

impl PolicyStores {
    async fn ready(&self) -> Result<(), kube::runtime::reflector::store::WriterDropped> {
        self.namespaces.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        self.policies.wait_until_ready().await?;
        self.nodes.wait_until_ready().await
    }
}

/// Starts the watchers and the loop; the returned tasks run until aborted.
pub fn start(
    client: &Client,
    config: &AgentConfig,
    datapath: Box<dyn PolicyDatapath>,
    programs: Option<PolicyPrograms>,
    status: Arc<Status>,
) -> Vec<JoinHandle<()>> {
    let changed = Arc::new(Notify::new());
    let all = watcher::Config::default;
    let (namespaces, t1) = watch(Api::<Namespace>::all(client.clone()), all(), changed.clone());
    let (pods, t2) = watch(Api::<Pod>::all(client.clone()), all(), changed.clone());
    let (policies, t3) = watch(Api::<NetworkPolicy>::all(client.clone()), all(), changed.clone());
    let (nodes, t4) = watch(Api::<Node>::all(client.clone()), all(), changed.clone());
    let stores = PolicyStores { namespaces, pods, policies, nodes };
    let sync = Sync { config: config.clone(), datapath, programs, status };
    let task = tokio::spawn(sync.run(stores, changed));
    vec![t1, t2, t3, t4, task]
}

struct Sync {
    config: AgentConfig,
    datapath: Box<dyn PolicyDatapath>,
    programs: Option<PolicyPrograms>,
    status: Arc<Status>,
}

fn objects<K>(store: &Store<K>) -> Vec<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store.state().iter().map(|object| K::clone(object)).collect()
}

impl Sync {
    async fn run(mut self, stores: PolicyStores, changed: Arc<Notify>) {
        log::info!(
            "policy: waiting for the initial lists of Namespaces, Pods, NetworkPolicies and Nodes"
        );
        if stores.ready().await.is_err() {
            log::error!("policy: the watchers stopped before their initial lists completed");
            return;
        }
        let mut compiler = Compiler::default();
        let mut reported = BTreeSet::new();
        let mut first = true;
        loop {
            let started = Instant::now();
            let policies = objects(&stores.policies);
            let cluster = Cluster::from_k8s(
                &objects(&stores.namespaces),
                &objects(&stores.pods),
                &policies,
                &objects(&stores.nodes),
            );
            let this_node =
                stores.nodes.get(&kube::runtime::reflector::ObjectRef::new(&self.config.node_name));
            let node = self.policy_node(this_node.as_deref(), policies.len());
            let compiled = compiler.compile(&cluster, Some(&self.config.node_name));
            report_problems(&compiled, &mut reported);
            match self.datapath.apply(&compiled, &node) {
                Ok(applied) => {
                    self.reconcile_attachments(&compiled);
                    let report = PolicySyncReport {
                        duration: started.elapsed(),
                        ops: applied.ops,
                        endpoints: compiled.endpoints.len(),
                        identities: compiled.identities.len(),
                        rules: rules(&compiled),
                        policies: policies.len(),
                    };
                    self.status.policy_applied(report);
                    let summary = format!(
                        "policy sync: {} endpoints, {} identities, {} rules of {} policies, {} \
                         datapath operations in {:?}{}",
                        report.endpoints,
                        report.identities,
                        report.rules,
                        report.policies,
                        report.ops,
                        report.duration,
                        if node.deny_unknown { "; unknown pods denied" } else { "" }
                    );
                    if report.ops > 0 || first {
                        log::info!("{summary}");
                    } else {
                        log::debug!("{summary}");
                    }
                    if first {
                        first = false;
                        // Tests and operators wait for this line: the node's pods have their
                        // policy.
                        println!(
                            "weir agent: first policy sync done ({} endpoints)",
                            report.endpoints
                        );
                    }
                }
                Err(err) => {
                    log::error!(
                        "policy sync failed: {}; retrying in {RETRY_AFTER:?}",
                        super::error_chain(err.as_ref())
                    );
                    self.status.policy_failed();
                    tokio::time::sleep(RETRY_AFTER).await;
                    continue;
                }
            }
            tokio::select! {
                _ = changed.notified() => {}
                _ = tokio::time::sleep(RESYNC) => {}
            }
        }
    }

    fn policy_node(&self, node: Option<&Node>, policies: usize) -> PolicyNode {
        let mut host_addresses = node_context(&self.config, node).addresses;
        // The node reaches its pods from the gateway address weir-cni puts on every host veth
        // (the host route to a pod has link scope, so the kernel picks that source): kubelet's
        // probes come from it.
        host_addresses.push(IpAddr::V4(GATEWAY_V4));
        let spec = node.and_then(|n| n.spec.as_ref());
        let pod_cidrs = spec
            .and_then(|s| s.pod_cidrs.clone())
            .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c.parse::<Cidr>().ok())
            .collect();
        PolicyNode {
            host_addresses,
            pod_cidrs,
            deny_unknown: self.config.policy.deny_unknown.decide(policies),
        }
    }

    fn reconcile_attachments(&self, compiled: &Compiled) {
        let Some(programs) = &self.programs else { return };
        let local_ips: Vec<_> =
            compiled.endpoints.keys().flat_map(|pod| compiled.pods[pod].ips.clone()).collect();
        match programs.reconcile(&local_ips) {
            Ok(done) if done.attached + done.detached + done.failed > 0 => log::info!(
                "policy programs on {} pod veths: {} attached, {} old copies detached, {} failed",
                done.veths,
                done.attached,
                done.detached,
                done.failed
            ),
            Ok(_) => {}
            Err(err) => log::warn!(
                "checking the policy programs on pod veths: {}",
                super::error_chain(&err)
            ),
        }
    }
}

/// Allow entries of all local endpoints (the rules the datapath enforces).
fn rules(compiled: &Compiled) -> usize {
    compiled.endpoints.values().map(|e| e.ingress.allow.len() + e.egress.allow.len()).sum()
}

/// Warns once about each part of a policy that was left out.
fn report_problems(compiled: &Compiled, reported: &mut BTreeSet<String>) {
    for problem in &compiled.problems {
        let text = problem.to_string();
        if reported.insert(text.clone()) {
            log::warn!("{text} (this part is left out: the policy allows less until it is fixed)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_unknown_follows_the_mode() {
        assert!(!DenyUnknown::Auto.decide(0));
        assert!(DenyUnknown::Auto.decide(1));
        assert!(DenyUnknown::Always.decide(0));
        assert!(!DenyUnknown::Never.decide(3));
    }
}
