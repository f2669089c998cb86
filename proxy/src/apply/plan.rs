//! The pure diff from desired service state to map operations, per address family
//! ([`Planner<F>`]) and for both ([`ServicePlanner`]).
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
};

use weir_common::lb::{ServiceValue, service_flags};

pub use crate::family::{Family, V4, V6};
use crate::model::{Frontend, FrontendState, Protocol, ServiceState, WhenEmpty};

/// One write or delete on one family's service maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp<F: Family = V4> {
    PutBackend {
        id: u32,
        backend: F::Backend,
    },
    PutSlot {
        key: F::Key,
        backend_id: u32,
    },
    PutRevNat {
        index: u32,
        frontend: F::RevNat,
    },
    /// `affinity_timeout` (seconds) is stored in the master's `backend_id` with flag AFFINITY.
    PutMaster {
        key: F::Key,
        count: u16,
        rev_nat_index: u32,
        flags: u8,
        affinity_timeout: u32,
    },
    DeleteMaster {
        key: F::Key,
    },
    DeleteSlot {
        key: F::Key,
    },
    DeleteRevNat {
        index: u32,
    },
    DeleteBackend {
        id: u32,
    },
}

/// The operations for one step on one family's maps, and what the step left out.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan<F: Family = V4> {
    pub ops: Vec<MapOp<F>>,
    /// Frontends with more backends than a service can hold; only the first 65,535 are used.
    pub truncated: usize,
    /// UDP frontends' backends that went away: their flows' conntrack entries and the
    /// connected sockets balanced to them must go after the ops ([`super::ebpf::MapWriter::apply`]).
    pub stale_udp_flows: Vec<StaleUdpBackend>,
}

/// A backend a UDP frontend no longer has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaleUdpBackend {
    pub rev_nat_index: u32,
    pub backend_id: u32,
    pub frontend: SocketAddr,
    pub backend: SocketAddr,
}

impl StaleUdpBackend {
    fn new<F: Family>(
        rev_nat_index: u32,
        backend_id: u32,
        frontend: &Frontend,
        backend: &BackendKey<F>,
    ) -> Self {
        let ((address, port), _) = *backend;
        Self {
            rev_nat_index,
            backend_id,
            frontend: SocketAddr::new(frontend.address, frontend.port),
            backend: SocketAddr::new(address.into(), port),
        }
    }
}

impl<F: Family> Default for Plan<F> {
    fn default() -> Self {
        Self { ops: Vec::new(), truncated: 0, stale_udp_flows: Vec::new() }
    }
}

/// What was applied for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Applied<F: Family> {
    rev_nat_index: u32,
    backends: Vec<BackendKey<F>>,
    flags: u8,
    affinity_timeout: u32,
    /// Adopted from maps whose entries for this frontend were incomplete: rewrite it.
    dirty: bool,
}

/// A backend: (address, port) and protocol.
type BackendKey<F> = ((<F as Family>::Addr, u16), Protocol);

/// Remembers what has been applied to one family's maps and plans the next step. Frontends of
/// the other family are not its business: it ignores them.
#[derive(Debug)]
pub struct Planner<F: Family = V4> {
    applied: BTreeMap<Frontend, Applied<F>>,
    backend_ids: HashMap<BackendKey<F>, (u32, usize)>,
    free_backend_ids: Vec<u32>,
    next_backend_id: u32,
    free_rev_nat: Vec<u32>,
    next_rev_nat: u32,
    /// Deletes of orphaned entries found at adoption, emitted by the next plan.
    cleanup: Vec<MapOp<F>>,
}

impl<F: Family> Default for Planner<F> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F: Family> Planner<F> {
    pub fn new() -> Self {
        Self {
            applied: BTreeMap::new(),
            backend_ids: HashMap::new(),
            free_backend_ids: Vec::new(),
            next_backend_id: 1,
            free_rev_nat: Vec::new(),
            next_rev_nat: 1,
            cleanup: Vec::new(),
        }
    }

    /// A planner for maps that already hold entries (a restarted agent adopting pinned maps):
    /// what they describe becomes what was applied, so the next plan touches only what differs
    /// from the desired state. Entries a crash mid-plan can leave behind (slots beyond their
    /// master's count, slots without a master, backends and reverse-NAT entries nothing refers
    /// to) are deleted by the next plan; a frontend whose slots are incomplete is rewritten.
    pub fn adopt(
        services: &[(F::Key, ServiceValue)],
        backends: &[(u32, F::Backend)],
        rev_nat: &[(u32, F::RevNat)],
    ) -> Self {
        let mut planner = Self::new();
        let backend_by_id: HashMap<u32, F::Backend> = backends.iter().copied().collect();
        let masters: HashMap<F::Key, ServiceValue> =
            services.iter().filter(|(k, _)| F::key_parts(k).3 == 0).copied().collect();
        let slots: HashMap<F::Key, u32> = services
            .iter()
            .filter(|(k, _)| F::key_parts(k).3 != 0)
            .map(|(k, v)| (*k, v.backend_id))
            .collect();
        let mut used_rev_nat = HashSet::new();
        for (key, master) in &masters {
            let Some(frontend) = frontend_of::<F>(key) else {
                planner.cleanup.push(MapOp::DeleteMaster { key: *key });
                continue;
            };
            let mut applied = Applied {
                rev_nat_index: master.rev_nat_index,
                backends: Vec::new(),
                flags: master.flags,
                affinity_timeout: if master.flags & service_flags::AFFINITY != 0 {
                    master.backend_id
                } else {
                    0
                },
                dirty: false,
            };
            for slot in 1..=master.count {
                let backend = slots.get(&F::with_slot(*key, slot)).and_then(|id| {
                    let backend = backend_by_id.get(id)?;
                    Some((*id, (F::backend_parts(backend), frontend.protocol)))
                });
                match backend {
                    Some((id, backend_key)) => {
                        planner.backend_ids.entry(backend_key).or_insert((id, 0)).1 += 1;
                        applied.backends.push(backend_key);
                    }
                    None => applied.dirty = true,
                }
            }
            used_rev_nat.insert(master.rev_nat_index);
            planner.next_rev_nat = planner.next_rev_nat.max(master.rev_nat_index + 1);
            planner.applied.insert(frontend, applied);
        }
        for key in slots.keys() {
            let live =
                masters.get(&F::with_slot(*key, 0)).is_some_and(|m| F::key_parts(key).3 <= m.count);
            if !live {
                planner.cleanup.push(MapOp::DeleteSlot { key: *key });
            }
        }
        let used_backends: HashSet<u32> = planner.backend_ids.values().map(|(id, _)| *id).collect();
        for (id, _) in backends {
            planner.next_backend_id = planner.next_backend_id.max(id + 1);
            if !used_backends.contains(id) {
                planner.cleanup.push(MapOp::DeleteBackend { id: *id });
            }
        }
        for (index, _) in rev_nat {
            planner.next_rev_nat = planner.next_rev_nat.max(index + 1);
            if !used_rev_nat.contains(index) {
                planner.cleanup.push(MapOp::DeleteRevNat { index: *index });
            }
        }
        planner
    }

    /// Number of frontends currently applied.
    pub fn frontends(&self) -> usize {
        self.applied.len()
    }

    /// Number of distinct backends currently applied.
    pub fn backends(&self) -> usize {
        self.backend_ids.len()
    }

    /// Diffs `desired` against what was applied and returns the operations. The planner
    /// assumes they are all executed; after a failed execution, start over with a new planner
    /// on emptied maps (the agent's full resync). Cost: every frontend of `desired` is
    /// compared; [`Planner::plan_changed`] compares only the ones a change touched.
    pub fn plan(&mut self, desired: &ServiceState) -> Plan<F> {
        let frontends: Vec<Frontend> = desired.frontends_and_removed(self.applied.keys()).collect();
        self.plan_frontends(desired, frontends)
    }

    /// Like [`Planner::plan`], but looks only at `changed` (e.g. the frontends of the services
    /// whose Service or EndpointSlices changed, [`crate::model::ServiceIndex`]): each is
    /// written as `desired` has it, or removed when `desired` lacks it. Every other frontend is
    /// assumed unchanged, so the cost is that of the change, not of the whole state.
    pub fn plan_changed<'a>(
        &mut self,
        desired: &ServiceState,
        changed: impl IntoIterator<Item = &'a Frontend>,
    ) -> Plan<F> {
        self.plan_frontends(desired, changed.into_iter().copied())
    }

    fn plan_frontends(
        &mut self,
        desired: &ServiceState,
        frontends: impl IntoIterator<Item = Frontend>,
    ) -> Plan<F> {
        let mut plan = Plan { ops: std::mem::take(&mut self.cleanup), ..Plan::default() };
        let mut wanted: BTreeMap<Frontend, (Vec<BackendKey<F>>, u8, u32)> = BTreeMap::new();
        let mut removed = Vec::new();
        for frontend in frontends {
            let Some(state) = desired.frontends.get(&frontend) else {
                if self.applied.contains_key(&frontend) {
                    removed.push(frontend);
                }
                continue;
            };
            if let Some((backends, truncated)) = family_backends::<F>(&frontend, state) {
                plan.truncated += usize::from(truncated);
                wanted.insert(
                    frontend,
                    (backends, flags(state), state.affinity_timeout.unwrap_or(0)),
                );
            }
        }
        removed.sort();
        removed.dedup();

        // IDs freed by this plan become reusable only after it: a backend ID reused within the
        // plan would be deleted by its own late DeleteBackend, and a reverse-NAT index reused
        // at once would let the removed service's conntrack entries answer with the new VIP.
        let mut late_deletes = Vec::new();
        let mut freed_rev_nat = Vec::new();
        // Removed frontends: master first, so programs stop finding the service at once.
        for frontend in removed {
            let applied = self.applied.remove(&frontend).expect("listed above");
            let key = service_key::<F>(&frontend);
            plan.ops.push(MapOp::DeleteMaster { key });
            for slot in 1..=applied.backends.len() as u16 {
                plan.ops.push(MapOp::DeleteSlot { key: F::with_slot(key, slot) });
            }
            plan.ops.push(MapOp::DeleteRevNat { index: applied.rev_nat_index });
            freed_rev_nat.push(applied.rev_nat_index);
            if frontend.protocol == Protocol::Udp {
                for backend in &applied.backends {
                    if let Some((id, _)) = self.backend_ids.get(backend) {
                        plan.stale_udp_flows.push(StaleUdpBackend::new::<F>(
                            applied.rev_nat_index,
                            *id,
                            &frontend,
                            backend,
                        ));
                    }
                }
            }
            for backend in &applied.backends {
                self.release_backend(backend, &mut late_deletes);
            }
        }

        for (frontend, (backends, flags, affinity_timeout)) in wanted {
            let previous = self.applied.get(&frontend);
            if let Some(previous) = previous
                && !previous.dirty
                && previous.backends == backends
                && previous.flags == flags
                && previous.affinity_timeout == affinity_timeout
            {
                continue;
            }
            let key = service_key::<F>(&frontend);
            let (rev_nat_index, old_backends) = match previous {
                Some(previous) => (previous.rev_nat_index, previous.backends.clone()),
                None => {
                    let index = self.allocate_rev_nat();
                    let (address, port, _, _) = F::key_parts(&key);
                    plan.ops.push(MapOp::PutRevNat { index, frontend: F::rev_nat(address, port) });
                    (index, Vec::new())
                }
            };
            let mut ids = Vec::with_capacity(backends.len());
            for backend in &backends {
                let (id, created) = self.acquire_backend(backend);
                if created {
                    let ((address, port), protocol) = *backend;
                    plan.ops.push(MapOp::PutBackend {
                        id,
                        backend: F::backend(address, port, protocol.number()),
                    });
                }
                ids.push(id);
            }
            for (slot, id) in (1u16..).zip(&ids) {
                plan.ops.push(MapOp::PutSlot { key: F::with_slot(key, slot), backend_id: *id });
            }
            plan.ops.push(MapOp::PutMaster {
                key,
                count: ids.len() as u16,
                rev_nat_index,
                flags,
                affinity_timeout,
            });
            for slot in (ids.len() + 1)..=old_backends.len() {
                plan.ops.push(MapOp::DeleteSlot { key: F::with_slot(key, slot as u16) });
            }
            if frontend.protocol == Protocol::Udp {
                for gone in old_backends.iter().filter(|b| !backends.contains(b)) {
                    if let Some((id, _)) = self.backend_ids.get(gone) {
                        plan.stale_udp_flows.push(StaleUdpBackend::new::<F>(
                            rev_nat_index,
                            *id,
                            &frontend,
                            gone,
                        ));
                    }
                }
            }
            for backend in &old_backends {
                self.release_backend(backend, &mut late_deletes);
            }
            self.applied.insert(
                frontend,
                Applied { rev_nat_index, backends, flags, affinity_timeout, dirty: false },
            );
        }
        // Backends go last: no slot points at them any more.
        plan.ops.extend(late_deletes.iter().map(|&id| MapOp::DeleteBackend { id }));
        self.free_backend_ids.extend(late_deletes);
        self.free_rev_nat.extend(freed_rev_nat);
        plan
    }

    fn acquire_backend(&mut self, backend: &BackendKey<F>) -> (u32, bool) {
        if let Some((id, refs)) = self.backend_ids.get_mut(backend) {
            *refs += 1;
            return (*id, false);
        }
        let id = self.free_backend_ids.pop().unwrap_or_else(|| {
            let id = self.next_backend_id;
            self.next_backend_id += 1;
            id
        });
        self.backend_ids.insert(*backend, (id, 1));
        (id, true)
    }

    fn release_backend(&mut self, backend: &BackendKey<F>, deletes: &mut Vec<u32>) {
        if let Some((id, refs)) = self.backend_ids.get_mut(backend) {
            *refs -= 1;
            if *refs == 0 {
                deletes.push(*id);
                self.backend_ids.remove(backend);
            }
        }
    }

    fn allocate_rev_nat(&mut self) -> u32 {
        self.free_rev_nat.pop().unwrap_or_else(|| {
            let index = self.next_rev_nat;
            self.next_rev_nat += 1;
            index
        })
    }
}

/// The backends of `frontend`'s family (capped at the slot limit, and whether the cap cut
/// some), or `None` when the frontend is of the other family.
fn family_backends<F: Family>(
    frontend: &Frontend,
    state: &FrontendState,
) -> Option<(Vec<BackendKey<F>>, bool)> {
    F::addr(frontend.address)?;
    let mut backends: Vec<BackendKey<F>> = state
        .backends
        .iter()
        .filter_map(|backend| Some((F::socket(backend)?, frontend.protocol)))
        .collect();
    let truncated = backends.len() > usize::from(u16::MAX);
    backends.truncate(usize::from(u16::MAX));
    Some((backends, truncated))
}

fn flags(state: &FrontendState) -> u8 {
    let mut flags = service_flags::NONE;
    if state.backends.is_empty() && state.when_empty == WhenEmpty::Drop {
        flags |= service_flags::EMPTY_BY_POLICY;
    }
    if state.affinity_timeout.is_some() {
        flags |= service_flags::AFFINITY;
    }
    flags
}

/// The frontend a service key names, if its protocol is one the model knows.
fn frontend_of<F: Family>(key: &F::Key) -> Option<Frontend> {
    let (address, port, proto, _) = F::key_parts(key);
    let protocol = match proto {
        weir_common::proto::TCP => Protocol::Tcp,
        weir_common::proto::UDP => Protocol::Udp,
        weir_common::proto::SCTP => Protocol::Sctp,
        _ => return None,
    };
    Some(Frontend { address: address.into(), port, protocol })
}

/// The master key of a frontend of family `F` (the planner only keys its own family's).
fn service_key<F: Family>(frontend: &Frontend) -> F::Key {
    let address = F::addr(frontend.address).expect("a frontend of the planner's family");
    F::key(address, frontend.port, frontend.protocol.number(), 0)
}

/// Both families' planners: what the agent and tests drive. Each family's frontends go to its
/// own maps; a frontend's backends of the other family are left out (a Service's EndpointSlices
/// are per family, so a dual-stack Service's frontends each balance over their own family).
#[derive(Debug, Default)]
pub struct ServicePlanner {
    pub v4: Planner<V4>,
    pub v6: Planner<V6>,
}

/// One step on both families' maps.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ServicePlan {
    pub v4: Plan<V4>,
    pub v6: Plan<V6>,
}

impl ServicePlan {
    /// Number of map operations.
    pub fn len(&self) -> usize {
        self.v4.ops.len() + self.v6.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Frontends whose backends were cut at the slot limit.
    pub fn truncated(&self) -> usize {
        self.v4.truncated + self.v6.truncated
    }
}

impl ServicePlanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// [`Planner::plan`] for both families.
    pub fn plan(&mut self, desired: &ServiceState) -> ServicePlan {
        ServicePlan { v4: self.v4.plan(desired), v6: self.v6.plan(desired) }
    }

    /// [`Planner::plan_changed`] for both families.
    pub fn plan_changed<'a>(
        &mut self,
        desired: &ServiceState,
        changed: impl IntoIterator<Item = &'a Frontend> + Clone,
    ) -> ServicePlan {
        ServicePlan {
            v4: self.v4.plan_changed(desired, changed.clone()),
            v6: self.v6.plan_changed(desired, changed),
        }
    }

    /// Number of frontends currently applied.
    pub fn frontends(&self) -> usize {
        self.v4.frontends() + self.v6.frontends()
    }

    /// Number of distinct backends currently applied.
    pub fn backends(&self) -> usize {
        self.v4.backends() + self.v6.backends()
    }
}

#[cfg(test)]
mod tests {
    use weir_common::lb::{Backend, Backend6, RevNat, ServiceKey};

    use super::*;
    use crate::model::testing::state;

    fn count(plan: &Plan, pred: impl Fn(&MapOp) -> bool) -> usize {
        plan.ops.iter().filter(|op| pred(op)).count()
    }

    #[test]
    fn a_new_frontend_writes_backends_slots_rev_nat_then_master() {
        let mut planner = Planner::<V4>::new();
        let plan = planner.plan(&state(&[("10.96.0.1", 80, &["10.0.0.1:8080", "10.0.0.2:8080"])]));
        let kinds: Vec<&str> = plan
            .ops
            .iter()
            .map(|op| match op {
                MapOp::PutRevNat { .. } => "revnat",
                MapOp::PutBackend { .. } => "backend",
                MapOp::PutSlot { .. } => "slot",
                MapOp::PutMaster { .. } => "master",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["revnat", "backend", "backend", "slot", "slot", "master"]);
        assert!(matches!(plan.ops[5], MapOp::PutMaster { count: 2, rev_nat_index: 1, .. }));
    }

    #[test]
    fn an_unchanged_state_plans_nothing() {
        let mut planner = Planner::<V4>::new();
        let desired = state(&[("10.96.0.1", 80, &["10.0.0.1:8080"])]);
        planner.plan(&desired);
        assert_eq!(planner.plan(&desired), Plan::default());
    }

    #[test]
    fn one_changed_service_among_many_touches_only_that_service() {
        let mut planner = Planner::<V4>::new();
        let ips: Vec<String> =
            (0..1000).map(|i| format!("10.96.{}.{}", i / 250, i % 250 + 1)).collect();
        let entries: Vec<(&str, u16, &[&str])> =
            ips.iter().map(|ip| (ip.as_str(), 80, &["10.0.0.1:8080"][..])).collect();
        planner.plan(&state(&entries));
        let mut changed = entries.clone();
        changed[500].2 = &["10.0.0.1:8080", "10.0.0.2:8080"];
        let plan = planner.plan(&state(&changed));
        // One new backend, two slots, one master: nothing for the 999 others.
        assert_eq!(plan.ops.len(), 4, "{:?}", plan.ops);
    }

    #[test]
    fn shrinking_rewrites_the_master_before_deleting_slots_and_unused_backends() {
        let mut planner = Planner::<V4>::new();
        planner.plan(&state(&[("10.96.0.1", 80, &["10.0.0.1:8080", "10.0.0.2:8080"])]));
        let plan = planner.plan(&state(&[("10.96.0.1", 80, &["10.0.0.1:8080"])]));
        let master = plan.ops.iter().position(|op| matches!(op, MapOp::PutMaster { count: 1, .. }));
        let slot = plan.ops.iter().position(|op| matches!(op, MapOp::DeleteSlot { .. }));
        let backend = plan.ops.iter().position(|op| matches!(op, MapOp::DeleteBackend { id: 2 }));
        assert!(master < slot && slot < backend, "{:?}", plan.ops);
    }

    #[test]
    fn removing_everything_deletes_every_entry_it_wrote() {
        let mut planner = Planner::<V4>::new();
        let first = planner.plan(&state(&[
            ("10.96.0.1", 80, &["10.0.0.1:8080", "10.0.0.2:8080"]),
            ("10.96.0.2", 80, &["10.0.0.2:8080"]),
        ]));
        let puts = count(&first, |op| {
            matches!(
                op,
                MapOp::PutBackend { .. }
                    | MapOp::PutSlot { .. }
                    | MapOp::PutRevNat { .. }
                    | MapOp::PutMaster { .. }
            )
        });
        let plan = planner.plan(&ServiceState::default());
        assert_eq!(plan.ops.len(), puts, "one delete per entry written: {:?}", plan.ops);
        assert_eq!(count(&plan, |op| matches!(op, MapOp::DeleteBackend { .. })), 2);
        assert_eq!((planner.frontends(), planner.backends()), (0, 0));
    }

    #[test]
    fn a_backend_shared_by_two_services_lives_until_both_let_go() {
        let mut planner = Planner::<V4>::new();
        planner.plan(&state(&[
            ("10.96.0.1", 80, &["10.0.0.1:8080"]),
            ("10.96.0.2", 80, &["10.0.0.1:8080"]),
        ]));
        assert_eq!(planner.backends(), 1);
        let plan = planner.plan(&state(&[("10.96.0.2", 80, &["10.0.0.1:8080"])]));
        assert_eq!(count(&plan, |op| matches!(op, MapOp::DeleteBackend { .. })), 0);
        let plan = planner.plan(&ServiceState::default());
        assert_eq!(count(&plan, |op| matches!(op, MapOp::DeleteBackend { .. })), 1);
    }

    #[test]
    fn ids_freed_by_a_plan_are_not_reused_within_it() {
        let mut planner = Planner::<V4>::new();
        planner.plan(&state(&[("10.96.0.1", 80, &["10.0.0.1:8080"])]));
        let plan = planner.plan(&state(&[("10.96.0.2", 80, &["10.0.0.9:8080"])]));
        assert!(plan.ops.contains(&MapOp::DeleteBackend { id: 1 }));
        assert!(plan.ops.iter().any(|op| matches!(op, MapOp::PutBackend { id: 2, .. })));
        assert!(plan.ops.contains(&MapOp::DeleteRevNat { index: 1 }));
        assert!(plan.ops.iter().any(|op| matches!(op, MapOp::PutRevNat { index: 2, .. })));
        // The next plan may reuse them.
        let plan = planner.plan(&state(&[
            ("10.96.0.2", 80, &["10.0.0.9:8080"]),
            ("10.96.0.3", 80, &["10.0.0.3:8080"]),
        ]));
        assert!(plan.ops.iter().any(|op| matches!(op, MapOp::PutBackend { id: 1, .. })));
    }

    /// Executes ops on an in-memory copy of the three maps.
    #[derive(Default)]
    struct FakeMaps {
        services: BTreeMap<(u32, u16, u8, u16), (ServiceKey, ServiceValue)>,
        backends: BTreeMap<u32, Backend>,
        rev_nat: BTreeMap<u32, RevNat>,
    }

    impl FakeMaps {
        fn id(k: &ServiceKey) -> (u32, u16, u8, u16) {
            (k.address, k.port, k.proto, k.backend_slot)
        }

        fn execute(&mut self, ops: &[MapOp]) {
            for op in ops {
                match *op {
                    MapOp::PutBackend { id, backend } => {
                        self.backends.insert(id, backend);
                    }
                    MapOp::PutSlot { key, backend_id } => {
                        self.services.insert(Self::id(&key), (key, ServiceValue::slot(backend_id)));
                    }
                    MapOp::PutRevNat { index, frontend } => {
                        self.rev_nat.insert(index, frontend);
                    }
                    MapOp::PutMaster { key, count, rev_nat_index, flags, affinity_timeout } => {
                        self.services.insert(
                            Self::id(&key),
                            (
                                key,
                                ServiceValue {
                                    backend_id: affinity_timeout,
                                    ..ServiceValue::master(count, rev_nat_index, flags)
                                },
                            ),
                        );
                    }
                    MapOp::DeleteMaster { key } | MapOp::DeleteSlot { key } => {
                        self.services.remove(&Self::id(&key));
                    }
                    MapOp::DeleteRevNat { index } => {
                        self.rev_nat.remove(&index);
                    }
                    MapOp::DeleteBackend { id } => {
                        self.backends.remove(&id);
                    }
                }
            }
        }

        fn adopt(&self) -> Planner {
            let services: Vec<_> = self.services.values().copied().collect();
            let backends: Vec<_> = self.backends.iter().map(|(k, v)| (*k, *v)).collect();
            let rev_nat: Vec<_> = self.rev_nat.iter().map(|(k, v)| (*k, *v)).collect();
            Planner::adopt(&services, &backends, &rev_nat)
        }
    }

    #[test]
    fn an_adopting_planner_leaves_unchanged_entries_alone() {
        let desired = state(&[
            ("10.96.0.1", 80, &["10.0.0.1:8080", "10.0.0.2:8080"]),
            ("10.96.0.2", 53, &["10.0.0.2:8080"]),
        ]);
        let mut maps = FakeMaps::default();
        maps.execute(&Planner::<V4>::new().plan(&desired).ops);

        let mut restarted = maps.adopt();
        assert_eq!((restarted.frontends(), restarted.backends()), (2, 2));
        assert_eq!(restarted.plan(&desired), Plan::default(), "a restart writes nothing");

        // Changes after adoption reuse the adopted IDs and allocate past them.
        let plan =
            restarted.plan(&state(&[("10.96.0.1", 80, &["10.0.0.1:8080", "10.0.0.3:8080"])]));
        maps.execute(&plan.ops);
        assert!(
            plan.ops.iter().any(|op| matches!(op, MapOp::PutBackend { id: 3, .. })),
            "{:?}",
            plan.ops
        );
        assert_eq!(maps.backends.len(), 2);
        assert_eq!(maps.rev_nat.len(), 1);
    }

    #[test]
    fn adoption_cleans_up_what_a_crash_mid_plan_left() {
        let desired = state(&[("10.96.0.1", 80, &["10.0.0.1:8080", "10.0.0.2:8080"])]);
        let mut maps = FakeMaps::default();
        maps.execute(&Planner::<V4>::new().plan(&desired).ops);
        // A crashed agent left: a slot beyond the count, a backend and a rev-NAT entry that
        // nothing refers to, and a slot of a service whose master it had already deleted.
        let key = ServiceKey::new([10, 96, 0, 1], 80, 6, 0);
        maps.execute(&[
            MapOp::PutSlot { key: key.with_slot(3), backend_id: 9 },
            MapOp::PutBackend { id: 9, backend: Backend::new([10, 0, 0, 9], 80, 6) },
            MapOp::PutRevNat { index: 9, frontend: RevNat::new([10, 96, 0, 9], 80) },
            MapOp::PutSlot { key: ServiceKey::new([10, 96, 0, 7], 80, 6, 1), backend_id: 1 },
        ]);
        let mut restarted = maps.adopt();
        maps.execute(&restarted.plan(&desired).ops);
        assert_eq!(maps.services.len(), 3, "master and two slots: {:?}", maps.services.keys());
        assert_eq!(maps.backends.keys().copied().collect::<Vec<_>>(), [1, 2]);
        assert_eq!(maps.rev_nat.keys().copied().collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn an_adopted_frontend_with_a_missing_slot_is_rewritten() {
        let desired = state(&[("10.96.0.1", 80, &["10.0.0.1:8080", "10.0.0.2:8080"])]);
        let mut maps = FakeMaps::default();
        maps.execute(&Planner::<V4>::new().plan(&desired).ops);
        maps.execute(&[MapOp::DeleteSlot { key: ServiceKey::new([10, 96, 0, 1], 80, 6, 2) }]);
        let mut restarted = maps.adopt();
        let plan = restarted.plan(&desired);
        assert!(
            plan.ops
                .iter()
                .any(|op| matches!(op, MapOp::PutSlot { key, .. } if key.backend_slot == 2))
        );
        maps.execute(&plan.ops);
        assert_eq!(maps.services.len(), 3);
    }

    #[test]
    fn session_affinity_is_written_adopted_and_changed() {
        let mut desired = state(&[("10.96.0.1", 80, &["10.0.0.1:8080"])]);
        desired.frontends.values_mut().next().unwrap().affinity_timeout = Some(60);
        let mut maps = FakeMaps::default();
        let plan = Planner::<V4>::new().plan(&desired);
        assert!(plan.ops.iter().any(|op| matches!(
            op,
            MapOp::PutMaster { flags: service_flags::AFFINITY, affinity_timeout: 60, .. }
        )));
        maps.execute(&plan.ops);
        let mut restarted = maps.adopt();
        assert!(restarted.plan(&desired).ops.is_empty(), "the timeout is adopted");
        desired.frontends.values_mut().next().unwrap().affinity_timeout = Some(30);
        let plan = restarted.plan(&desired);
        assert_eq!(plan.ops.len(), 2, "slot and master rewritten: {:?}", plan.ops);
    }

    #[test]
    fn removed_udp_backends_are_listed_for_a_conntrack_flush() {
        let udp = |backends: &[&str]| {
            let mut s = state(&[("10.96.0.53", 53, backends)]);
            let (frontend, value) = s.frontends.pop_first().unwrap();
            s.frontends.insert(Frontend { protocol: Protocol::Udp, ..frontend }, value);
            s
        };
        let mut planner = Planner::<V4>::new();
        planner.plan(&udp(&["10.0.0.1:53", "10.0.0.2:53"]));
        let plan = planner.plan(&udp(&["10.0.0.2:53"]));
        let pairs = |plan: &Plan<V4>| -> Vec<(u32, u32, String, String)> {
            let text = |a: SocketAddr| a.to_string();
            plan.stale_udp_flows
                .iter()
                .map(|s| (s.rev_nat_index, s.backend_id, text(s.frontend), text(s.backend)))
                .collect()
        };
        let stale = |rev: u32, id: u32, backend: &str| {
            vec![(rev, id, "10.96.0.53:53".to_string(), backend.to_string())]
        };
        assert_eq!(pairs(&plan), stale(1, 1, "10.0.0.1:53"), "backend 1 of service 1");
        let plan = planner.plan(&ServiceState::default());
        assert_eq!(pairs(&plan), stale(1, 2, "10.0.0.2:53"), "a removed service's flows go too");
        // TCP flows are not flushed (kube-proxy clears UDP only).
        let mut tcp = Planner::<V4>::new();
        tcp.plan(&state(&[("10.96.0.1", 80, &["10.0.0.1:80"])]));
        assert!(tcp.plan(&ServiceState::default()).stale_udp_flows.is_empty());
    }

    #[test]
    fn each_family_goes_to_its_own_maps_with_its_own_backends() {
        let desired = state(&[
            ("10.96.0.1", 80, &["10.0.0.1:8080", "[fd00::2]:8080"]),
            ("fd00:96::1", 80, &["[fd00::2]:8080", "10.0.0.1:8080", "[fd00::3]:8080"]),
        ]);
        let mut planner = ServicePlanner::new();
        let plan = planner.plan(&desired);
        assert!(plan.v4.ops.contains(&MapOp::PutMaster {
            key: ServiceKey::new([10, 96, 0, 1], 80, 6, 0),
            count: 1,
            rev_nat_index: 1,
            flags: 0,
            affinity_timeout: 0,
        }));
        let v6_backends: Vec<Backend6> = plan
            .v6
            .ops
            .iter()
            .filter_map(|op| match op {
                MapOp::PutBackend { backend, .. } => Some(*backend),
                _ => None,
            })
            .collect();
        let fd00 = |last: u8| {
            let mut octets = [0; 16];
            octets[..2].copy_from_slice(&[0xfd, 0]);
            octets[15] = last;
            octets
        };
        assert_eq!(v6_backends, [Backend6::new(fd00(2), 8080, 6), Backend6::new(fd00(3), 8080, 6)]);
        assert!(
            plan.v6
                .ops
                .iter()
                .any(|op| matches!(op, MapOp::PutMaster { count: 2, rev_nat_index: 1, .. }))
        );
        assert_eq!((planner.v4.frontends(), planner.v6.frontends()), (1, 1));
        assert!(planner.plan(&desired).is_empty());
        let gone = planner.plan(&ServiceState::default());
        assert_eq!(gone.v6.ops.len(), 1 + 2 + 1 + 2, "master, slots, rev-NAT, backends");
        assert_eq!((planner.frontends(), planner.backends()), (0, 0));
    }

    #[test]
    fn empty_by_policy_is_flagged() {
        let mut desired = state(&[("10.96.0.1", 80, &[])]);
        desired.frontends.values_mut().next().unwrap().when_empty = WhenEmpty::Drop;
        let plan = Planner::<V4>::new().plan(&desired);
        assert!(plan.ops.iter().any(|op| matches!(
            op,
            MapOp::PutMaster { count: 0, flags: service_flags::EMPTY_BY_POLICY, .. }
        )));
    }

    /// The key of every map entry an op writes or deletes (masters and slots by frontend).
    fn touched_frontends(plan: &Plan) -> std::collections::BTreeSet<(u32, u16)> {
        plan.ops
            .iter()
            .filter_map(|op| match op {
                MapOp::PutSlot { key, .. }
                | MapOp::PutMaster { key, .. }
                | MapOp::DeleteMaster { key }
                | MapOp::DeleteSlot { key } => Some((key.address, key.port)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_one_service_change_plans_only_that_services_entries() {
        use crate::model::{ServiceIndex, testing::frontend};
        let mut index = ServiceIndex::new();
        let service_state = |name: &str, ip: &str, backends: &[&str]| {
            let mut one = state(&[(ip, 80, backends)]);
            for f in one.frontends.values_mut() {
                f.service = name.to_string();
            }
            one
        };
        for i in 0..1000u32 {
            let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
            index.set_service(&format!("default/s{i}"), service_state("", &ip, &["10.0.0.1:80"]));
        }
        let mut planner = Planner::<V4>::new();
        let mut full = Planner::<V4>::new();
        planner.plan(index.state());
        full.plan(index.state());

        // Service s500 gets a second endpoint.
        let changed = index.set_service(
            "default/s500",
            service_state("", "10.96.2.1", &["10.0.0.1:80", "10.0.0.2:80"]),
        );
        assert_eq!(changed, [frontend("10.96.2.1", 80)]);
        let plan = planner.plan_changed(index.state(), &changed);
        let key = service_key::<V4>(&frontend("10.96.2.1", 80));
        assert_eq!(touched_frontends(&plan), [(key.address, key.port)].into());
        // Exactly what a full diff of the whole state gives.
        assert_eq!(plan, full.plan(index.state()));

        // The service is deleted: only its entries go.
        let changed = index.set_service("default/s500", ServiceState::default());
        let plan = planner.plan_changed(index.state(), &changed);
        assert_eq!(touched_frontends(&plan), [(key.address, key.port)].into());
        assert!(plan.ops.contains(&MapOp::DeleteMaster { key }));
        assert_eq!(plan, full.plan(index.state()));
        assert_eq!(planner.frontends(), 999);
    }

    #[test]
    fn random_incremental_changes_end_in_the_state_a_full_plan_gives() {
        for seed in 1..=25u64 {
            let (mut planner, mut maps) = (Planner::<V4>::new(), FakeMaps::default());
            for (step, (desired, changed)) in
                crate::model::random::sequence(seed, 120).iter().enumerate()
            {
                maps.execute(&planner.plan_changed(desired, changed).ops);
                // Now and then: the planner and the maps both hold exactly the desired state.
                if step % 20 == 19 {
                    assert_eq!(planner.plan(desired).ops, [], "seed {seed} step {step}");
                    assert_eq!(maps.adopt().plan(desired).ops, [], "seed {seed} step {step}");
                }
            }
        }
    }
}
