//! The desired state kept per service, so that a change to one Service or its EndpointSlices
//! is applied by rebuilding that service alone ([`build_service`]) and telling the planners
//! which frontends it touched ([`ServiceIndex::set_service`] ->
//! [`crate::apply::plan::Planner::plan_changed`]), instead of rebuilding and diffing every
//! service.
//!
//! The combined state is exactly what [`super::build`] gives for all services together: when
//! two services claim the same frontend, the one whose `namespace/name` sorts first has it;
//! when two claim the same health-check node port, the last one has it.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{Frontend, FrontendState, HealthCheck, NodeContext, ServiceState, keyset::KeySet};

/// The desired state of one service (`namespace/name` as in [`super::FrontendState::service`])
/// with `slices` its EndpointSlices: what [`super::build`] would give for it alone.
pub fn build_service(
    service: &Service,
    slices: &[&EndpointSlice],
    node: &NodeContext,
) -> ServiceState {
    super::build(std::iter::once(service), slices.iter().copied(), node)
}

/// What one service renders to, sorted by key, in exactly the room it needs (a `BTreeMap`
/// per service allocated a node for eleven frontends: most of the index's memory at 10k
/// services of one frontend each).
#[derive(Debug, Default)]
struct Rendered {
    frontends: Box<[(Frontend, FrontendState)]>,
    health_check_node_ports: Box<[(u16, HealthCheck)]>,
}

impl Rendered {
    fn new(state: ServiceState) -> Self {
        Self {
            frontends: state.frontends.into_iter().collect(),
            health_check_node_ports: state.health_check_node_ports.into_iter().collect(),
        }
    }

    fn frontend(&self, frontend: &Frontend) -> Option<&FrontendState> {
        let at = self.frontends.binary_search_by(|(f, _)| f.cmp(frontend)).ok()?;
        Some(&self.frontends[at].1)
    }

    fn health_check(&self, port: u16) -> Option<&HealthCheck> {
        let at = self.health_check_node_ports.binary_search_by_key(&port, |(p, _)| *p).ok()?;
        Some(&self.health_check_node_ports[at].1)
    }

    fn frontend_keys(&self) -> impl Iterator<Item = &Frontend> {
        self.frontends.iter().map(|(f, _)| f)
    }

    fn ports(&self) -> impl Iterator<Item = u16> {
        self.health_check_node_ports.iter().map(|(p, _)| *p)
    }
}

/// The combined desired state and, per service, what it renders to.
#[derive(Debug, Default)]
pub struct ServiceIndex {
    state: ServiceState,
    by_service: HashMap<String, Rendered>,
    /// Frontend -> the services that render it.
    owners: HashMap<Frontend, KeySet>,
    health_owners: BTreeMap<u16, KeySet>,
    /// How many times `state.health_check_node_ports` changed, so that a consumer can tell
    /// without comparing the whole map.
    health_check_changes: u64,
}

impl ServiceIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// The desired state of all services.
    pub fn state(&self) -> &ServiceState {
        &self.state
    }

    /// A counter that grows whenever [`ServiceState::health_check_node_ports`] changes.
    pub fn health_check_changes(&self) -> u64 {
        self.health_check_changes
    }

    /// Number of services with a state.
    pub fn services(&self) -> usize {
        self.by_service.len()
    }

    /// Replaces the state of `service` (`namespace/name`) with `rendered` (from
    /// [`build_service`]; empty when the service is gone) and returns the frontends whose
    /// desired state changed, sorted. Cost: that of the service's own frontends.
    pub fn set_service(&mut self, service: &str, rendered: ServiceState) -> Vec<Frontend> {
        let rendered = Rendered::new(rendered);
        let old = self.by_service.remove(service).unwrap_or_default();
        let touched: BTreeSet<Frontend> =
            old.frontend_keys().chain(rendered.frontend_keys()).copied().collect();
        let ports: BTreeSet<u16> = old.ports().chain(rendered.ports()).collect();
        for frontend in old.frontend_keys() {
            if let Some(owners) = self.owners.get_mut(frontend) {
                owners.remove(service);
                if owners.is_empty() {
                    self.owners.remove(frontend);
                }
            }
        }
        for port in old.ports() {
            if let Some(owners) = self.health_owners.get_mut(&port) {
                owners.remove(service);
                if owners.is_empty() {
                    self.health_owners.remove(&port);
                }
            }
        }
        for frontend in rendered.frontend_keys() {
            self.owners.entry(*frontend).or_default().insert(service);
        }
        for port in rendered.ports() {
            self.health_owners.entry(port).or_default().insert(service);
        }
        if !rendered.frontends.is_empty() || !rendered.health_check_node_ports.is_empty() {
            self.by_service.insert(service.to_string(), rendered);
        }

        let mut changed = Vec::new();
        for frontend in touched {
            let winner = self
                .owners
                .get(&frontend)
                .and_then(KeySet::first)
                .and_then(|owner| self.by_service.get(owner)?.frontend(&frontend));
            let current = self.state.frontends.get(&frontend);
            if current == winner {
                continue;
            }
            match winner {
                Some(state) => self.state.frontends.insert(frontend, state.clone()),
                None => self.state.frontends.remove(&frontend),
            };
            changed.push(frontend);
        }
        for port in ports {
            let winner = self
                .health_owners
                .get(&port)
                .and_then(KeySet::last)
                .and_then(|owner| self.by_service.get(owner)?.health_check(port));
            if self.state.health_check_node_ports.get(&port) == winner {
                continue;
            }
            self.health_check_changes += 1;
            match winner {
                Some(check) => self.state.health_check_node_ports.insert(port, check.clone()),
                None => self.state.health_check_node_ports.remove(&port),
            };
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FrontendState, testing::frontend};

    fn rendered(service: &str, frontends: &[(&str, &[&str])]) -> ServiceState {
        let mut state = ServiceState::default();
        for (ip, backends) in frontends {
            let backends = backends.iter().map(|b| b.parse().unwrap()).collect();
            state.frontends.insert(frontend(ip, 80), FrontendState::cluster_ip(service, backends));
        }
        state
    }

    #[test]
    fn the_health_check_counter_grows_only_when_health_checks_change() {
        let mut index = ServiceIndex::new();
        let with_check = |local_endpoints| {
            let mut state = rendered("default/web", &[("10.96.0.1", &["10.0.0.1:80"])]);
            let check =
                crate::model::HealthCheck { service: "default/web".into(), local_endpoints };
            state.health_check_node_ports.insert(32000, check);
            state
        };
        index.set_service("default/web", with_check(1));
        let first = index.health_check_changes();
        assert_eq!(first, 1);
        index.set_service("default/web", with_check(1));
        index.set_service("default/other", rendered("default/other", &[("10.96.0.2", &[])]));
        assert_eq!(index.health_check_changes(), first, "nothing of the health checks changed");
        index.set_service("default/web", with_check(0));
        assert_eq!(index.health_check_changes(), first + 1);
        index.set_service("default/web", ServiceState::default());
        assert_eq!(index.health_check_changes(), first + 2);
        assert!(index.state().health_check_node_ports.is_empty());
    }

    #[test]
    fn a_changed_service_reports_only_its_own_changed_frontends() {
        let mut index = ServiceIndex::new();
        for i in 0..100 {
            let ip = format!("10.96.0.{i}");
            let name = format!("default/s{i}");
            let changed = index.set_service(&name, rendered(&name, &[(&ip, &["10.0.0.1:80"])]));
            assert_eq!(changed, [frontend(&ip, 80)]);
        }
        assert_eq!(index.state().frontends.len(), 100);
        // Same state again: nothing changed.
        let again = rendered("default/s7", &[("10.96.0.7", &["10.0.0.1:80"])]);
        assert!(index.set_service("default/s7", again).is_empty());
        // One endpoint more: that frontend only.
        let more = rendered("default/s7", &[("10.96.0.7", &["10.0.0.1:80", "10.0.0.2:80"])]);
        assert_eq!(index.set_service("default/s7", more), [frontend("10.96.0.7", 80)]);
        assert_eq!(index.state().frontends[&frontend("10.96.0.7", 80)].backends.len(), 2);
        // Deleted: its frontend goes.
        assert_eq!(
            index.set_service("default/s7", ServiceState::default()),
            [frontend("10.96.0.7", 80)]
        );
        assert_eq!(index.state().frontends.len(), 99);
        assert_eq!(index.services(), 99);
    }

    #[test]
    fn a_frontend_claimed_twice_goes_to_the_first_service_as_build_does() {
        let mut index = ServiceIndex::new();
        index.set_service("default/b", rendered("default/b", &[("10.96.0.1", &["10.0.0.2:80"])]));
        let changed = index
            .set_service("default/a", rendered("default/a", &[("10.96.0.1", &["10.0.0.1:80"])]));
        assert_eq!(changed, [frontend("10.96.0.1", 80)]);
        assert_eq!(index.state().frontends[&frontend("10.96.0.1", 80)].service, "default/a");
        // The first one goes: the other takes the frontend over.
        index.set_service("default/a", ServiceState::default());
        assert_eq!(index.state().frontends[&frontend("10.96.0.1", 80)].service, "default/b");
    }
}
