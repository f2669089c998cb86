//! The service model kept up to date object by object, for the agent's incremental sync.
//!
//! [`ServiceTracker`] holds the Services and EndpointSlices it was given, the slices grouped
//! by the service they belong to (label `kubernetes.io/service-name`, same namespace), and the
//! [`ServiceIndex`] of what each service renders to. [`ServiceTracker::apply`] takes the
//! objects that changed (their current version, or `None` when deleted), re-renders only the
//! services they belong to and returns the frontends whose desired state changed: what
//! [`crate::apply::plan::Planner::plan_changed`] and the nftables planner's `plan_changed`
//! need. The cost is that of the changed services, not of the whole state.
//!
//! Invariant (unit-tested with random change sequences): after any sequence of
//! [`ServiceTracker::apply`], [`ServiceTracker::state`] is exactly [`super::build`] of the
//! current objects. A full re-list (or a Node change, which moves every node port) is
//! [`ServiceTracker::rebuild`]: a new tracker from all objects.
use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::api::ObjectMeta;

use super::{
    Frontend, NodeContext, ServiceIndex, ServiceState, build_service,
    endpoints::SERVICE_NAME_LABEL, keyset::KeySet,
};

/// One object that changed: its `namespace/name` and its current version (`None`: deleted).
#[derive(Clone, Debug)]
pub enum Change {
    Service { key: String, object: Option<Arc<Service>> },
    Slice { key: String, object: Option<Arc<EndpointSlice>> },
}

/// `namespace/name` of an object (namespace `default` when unset, as [`super::build`] does).
pub fn object_key(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    )
}

/// `namespace/name` of the service an EndpointSlice belongs to, if it is labelled with one.
fn slice_owner(slice: &EndpointSlice) -> Option<String> {
    let owner = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(format!("{}/{owner}", slice.metadata.namespace.as_deref().unwrap_or("default")))
}

/// The objects, grouped per service, and the desired state they render to.
#[derive(Debug, Default)]
pub struct ServiceTracker {
    node: NodeContext,
    services: HashMap<String, Arc<Service>>,
    /// Slice key -> (owning service key, slice). Slices without an owner are not kept.
    slices: HashMap<String, (String, Arc<EndpointSlice>)>,
    /// Service key -> its slices' keys (the service itself may not exist).
    slices_by_service: HashMap<String, KeySet>,
    index: ServiceIndex,
}

impl ServiceTracker {
    /// An empty tracker for `node`.
    pub fn new(node: NodeContext) -> Self {
        Self { node, ..Self::default() }
    }

    /// A tracker holding exactly `services` and `slices` (a full re-list).
    pub fn rebuild(
        node: NodeContext,
        services: impl IntoIterator<Item = Arc<Service>>,
        slices: impl IntoIterator<Item = Arc<EndpointSlice>>,
    ) -> Self {
        let mut tracker = Self::new(node);
        let changes = slices
            .into_iter()
            .map(|s| Change::Slice { key: object_key(&s.metadata), object: Some(s) })
            .chain(
                services
                    .into_iter()
                    .map(|s| Change::Service { key: object_key(&s.metadata), object: Some(s) }),
            );
        tracker.apply(changes);
        tracker
    }

    /// The node the state was rendered for.
    pub fn node(&self) -> &NodeContext {
        &self.node
    }

    /// The desired state of all services.
    pub fn state(&self) -> &ServiceState {
        self.index.state()
    }

    /// A counter that grows whenever the desired health-check node ports change.
    pub fn health_check_changes(&self) -> u64 {
        self.index.health_check_changes()
    }

    /// Number of Services held.
    pub fn services(&self) -> usize {
        self.services.len()
    }

    /// Number of EndpointSlices held (those that name a service).
    pub fn slices(&self) -> usize {
        self.slices.len()
    }

    /// Takes `changes` in and returns the frontends whose desired state changed (sorted,
    /// without duplicates). A change that leaves an object as it was returns nothing.
    pub fn apply(&mut self, changes: impl IntoIterator<Item = Change>) -> Vec<Frontend> {
        let mut dirty = BTreeSet::new();
        for change in changes {
            match change {
                Change::Service { key, object } => {
                    match object {
                        Some(service) => self.services.insert(key.clone(), service),
                        None => self.services.remove(&key),
                    };
                    dirty.insert(key);
                }
                Change::Slice { key, object } => {
                    if let Some((owner, _)) = self.slices.remove(&key) {
                        if let Some(keys) = self.slices_by_service.get_mut(&owner) {
                            keys.remove(&key);
                            if keys.is_empty() {
                                self.slices_by_service.remove(&owner);
                            }
                        }
                        dirty.insert(owner);
                    }
                    if let Some(slice) = object
                        && let Some(owner) = slice_owner(&slice)
                    {
                        self.slices_by_service.entry(owner.clone()).or_default().insert(&key);
                        self.slices.insert(key, (owner.clone(), slice));
                        dirty.insert(owner);
                    }
                }
            }
        }
        let mut changed = BTreeSet::new();
        for service in dirty {
            let rendered = self.render(&service);
            changed.extend(self.index.set_service(&service, rendered));
        }
        changed.into_iter().collect()
    }

    /// What `service` renders to alone (empty when it does not exist).
    fn render(&self, service: &str) -> ServiceState {
        let Some(object) = self.services.get(service) else { return ServiceState::default() };
        let slices: Vec<&EndpointSlice> = self
            .slices_by_service
            .get(service)
            .into_iter()
            .flat_map(KeySet::iter)
            .filter_map(|key| self.slices.get(key).map(|(_, slice)| slice.as_ref()))
            .collect();
        build_service(object, &slices, &self.node)
    }
}

/// Random Services and EndpointSlices for the incremental-vs-full tests of the model and
/// both planners.
#[cfg(test)]
pub(crate) mod testing {
    use serde_json::json;

    use super::*;

    /// A small deterministic generator (xorshift64*), so that failures replay by seed.
    pub(crate) struct Rng(pub u64);

    impl Rng {
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    pub(crate) fn node() -> NodeContext {
        NodeContext { name: "node-a".into(), addresses: vec!["192.168.0.10".parse().unwrap()] }
    }

    /// Service `ns/name` (a ClusterIP, sometimes also a NodePort, or a VIP another service
    /// may share, so that claims on the same frontend are exercised).
    pub(crate) fn service(rng: &mut Rng, ns: &str, name: &str) -> Service {
        let vip = format!("10.96.{}.{}", rng.below(2), rng.below(6));
        let node_port = rng.below(3) == 0;
        let mut spec = json!({
            "type": if node_port { "NodePort" } else { "ClusterIP" },
            "clusterIP": vip, "clusterIPs": [vip],
            "ports": [{"name": "http", "port": 80 + rng.below(2), "protocol": "TCP",
                       "nodePort": 30000 + rng.below(3)}],
        });
        if rng.below(4) == 0 {
            spec["sessionAffinity"] = json!("ClientIP");
        }
        if rng.below(4) == 0 {
            spec["externalTrafficPolicy"] = json!("Local");
        }
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}))
            .unwrap()
    }

    /// Slice `ns/name` of service `owner` with a few random endpoints.
    pub(crate) fn slice(rng: &mut Rng, ns: &str, name: &str, owner: &str) -> EndpointSlice {
        let endpoints: Vec<_> = (0..rng.below(4))
            .map(|_| {
                json!({
                    "addresses": [format!("10.0.0.{}", rng.below(8))],
                    "nodeName": if rng.below(2) == 0 { "node-a" } else { "node-b" },
                    "conditions": {"ready": rng.below(3) != 0, "serving": true,
                                   "terminating": false},
                })
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": owner}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    /// A random change among a few namespaces, services and slices (slices may move to
    /// another service or name one that does not exist).
    pub(crate) fn random_change(rng: &mut Rng) -> Change {
        let ns = ["default", "prod"][rng.below(2) as usize];
        let name = format!("s{}", rng.below(6));
        let key = format!("{ns}/{name}");
        let delete = rng.below(5) == 0;
        if rng.below(2) == 0 {
            let object = (!delete).then(|| Arc::new(service(rng, ns, &name)));
            Change::Service { key, object }
        } else {
            let slice_name = format!("{name}-{}", rng.below(2));
            let owner = format!("s{}", rng.below(7));
            let object = (!delete).then(|| Arc::new(slice(rng, ns, &slice_name, &owner)));
            Change::Slice { key: format!("{ns}/{slice_name}"), object }
        }
    }

    /// The desired state after each of `steps` random changes from seed `seed`, with the
    /// frontends each change touched (what the agent hands to `plan_changed`).
    pub(crate) fn sequence(seed: u64, steps: usize) -> Vec<(ServiceState, Vec<Frontend>)> {
        let mut rng = seeded(seed);
        let mut tracker = ServiceTracker::new(node());
        (0..steps)
            .map(|_| {
                let changed = tracker.apply([random_change(&mut rng)]);
                (tracker.state().clone(), changed)
            })
            .collect()
    }

    /// The generator for test case `seed` (never the all-zero state xorshift cannot leave).
    pub(crate) fn seeded(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{testing::*, *};
    use crate::model::build;

    /// [`build`] of what `tracker` holds, from scratch.
    fn full_build(tracker: &ServiceTracker) -> ServiceState {
        build(
            tracker.services.values().map(AsRef::as_ref),
            tracker.slices.values().map(|(_, s)| s.as_ref()),
            &tracker.node,
        )
    }

    #[test]
    fn random_change_sequences_end_in_the_state_a_full_build_gives() {
        for seed in 1..=40u64 {
            let mut rng = seeded(seed);
            let mut tracker = ServiceTracker::new(node());
            for step in 0..150 {
                let before = tracker.state().clone();
                let changed = tracker.apply([random_change(&mut rng)]);
                let after = full_build(&tracker);
                assert_eq!(tracker.state(), &after, "seed {seed}, step {step}");
                // The reported frontends are exactly those whose state differs.
                let differ: Vec<Frontend> = before
                    .frontends
                    .keys()
                    .chain(after.frontends.keys())
                    .filter(|f| before.frontends.get(f) != after.frontends.get(f))
                    .copied()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                assert_eq!(changed, differ, "seed {seed}, step {step}");
            }
            let rebuilt = ServiceTracker::rebuild(
                node(),
                tracker.services.values().cloned(),
                tracker.slices.values().map(|(_, s)| s.clone()),
            );
            assert_eq!(rebuilt.state(), tracker.state(), "seed {seed}: rebuild");
        }
    }

    #[test]
    fn a_slice_change_re_renders_only_its_service() {
        let mut tracker = ServiceTracker::new(node());
        let services: Vec<Change> = (0..50)
            .map(|i| {
                let spec = json!({"clusterIP": format!("10.96.1.{i}"),
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]});
                let object: Service = serde_json::from_value(json!({
                    "metadata": {"name": format!("s{i}"), "namespace": "default"}, "spec": spec,
                }))
                .unwrap();
                Change::Service { key: format!("default/s{i}"), object: Some(Arc::new(object)) }
            })
            .collect();
        assert_eq!(tracker.apply(services).len(), 50);
        let with_endpoints: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "s7-a", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "s7"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}],
        }))
        .unwrap();
        let change =
            Change::Slice { key: "default/s7-a".into(), object: Some(Arc::new(with_endpoints)) };
        let changed = tracker.apply([change.clone()]);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].address.to_string(), "10.96.1.7");
        // The same slice again changes nothing; its deletion changes that frontend back.
        assert!(tracker.apply([change]).is_empty());
        let gone = tracker.apply([Change::Slice { key: "default/s7-a".into(), object: None }]);
        assert_eq!(gone, changed);
        assert_eq!(tracker.state(), &full_build(&tracker));
    }
}
