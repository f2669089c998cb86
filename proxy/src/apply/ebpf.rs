//! Executes planned [`MapOp`]s on the service maps of a loaded object.
use std::{collections::HashSet, net::SocketAddr};

use aya::maps::MapError;

use super::plan::{Family, MapOp, Planner, ServicePlan, ServicePlanner};
use crate::{
    maps::{FamilyMaps, MapsError, ServiceMaps},
    sockdiag,
};

/// What [`MapWriter::apply`] did for UDP flows whose backend left their service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpCleanup {
    /// Conntrack entries of the per-packet path's flows, deleted.
    pub flushed: usize,
    /// Connected sockets the socket load balancer had given such a backend, terminated.
    pub sockets: usize,
}

/// Writes plans into the maps.
pub struct MapWriter {
    maps: ServiceMaps,
}

impl MapWriter {
    pub fn new(maps: ServiceMaps) -> Self {
        Self { maps }
    }

    /// Executes a plan's ops in order, IPv4 then IPv6. A delete of an entry that is already
    /// gone is not an error (the goal is reached); a failed write stops and returns the error
    /// (the caller resyncs).
    pub fn execute(&mut self, plan: &ServicePlan) -> Result<(), MapsError> {
        execute(&mut self.maps.v4, &plan.v4.ops)?;
        execute(&mut self.maps.v6, &plan.v6.ops)
    }

    /// Executes a whole plan: its ops, then, for UDP flows whose backend went away, the flush
    /// of their conntrack entries and the termination of the connected sockets the socket
    /// load balancer gave that backend (so that they reconnect and are balanced again). A
    /// socket that cannot be terminated is logged, not an error: the maps are right.
    pub fn apply(&mut self, plan: &ServicePlan) -> Result<UdpCleanup, MapsError> {
        self.execute(plan)?;
        let flushed =
            self.maps.flush_udp_flows(&plan.v4.stale_udp_flows, &plan.v6.stale_udp_flows)?;
        Ok(UdpCleanup { flushed, sockets: self.terminate_stale_udp_sockets(plan) })
    }

    /// Terminates, in every namespace of the node, connected UDP sockets whose backend (their
    /// peer) left the frontend the socket load balancer translated them from.
    fn terminate_stale_udp_sockets(&self, plan: &ServicePlan) -> usize {
        let stale: HashSet<(SocketAddr, SocketAddr)> = (plan.v4.stale_udp_flows.iter())
            .chain(&plan.v6.stale_udp_flows)
            .map(|flow| (flow.backend, flow.frontend))
            .collect();
        if stale.is_empty() {
            return 0;
        }
        let backends: HashSet<SocketAddr> = stale.iter().map(|(backend, _)| *backend).collect();
        let maps = &self.maps;
        let (terminated, error) = sockdiag::terminate_udp_sockets(|socket| {
            backends.contains(&socket.remote)
                && maps
                    .balanced_from(socket.cookie, socket.remote)
                    .is_some_and(|frontend| stale.contains(&(socket.remote, frontend)))
        });
        if let Some(error) = error {
            log::warn!(
                "terminating connected UDP sockets of removed backends: {} of {} network \
                 namespaces failed, the first: {error}",
                terminated.failed_namespaces,
                terminated.namespaces
            );
        }
        terminated.sockets
    }

    pub fn maps(&self) -> &ServiceMaps {
        &self.maps
    }

    /// A planner that adopts what the maps hold (pinned maps reused after a restart).
    pub fn adopting_planner(&self) -> ServicePlanner {
        ServicePlanner { v4: adopt(&self.maps.v4), v6: adopt(&self.maps.v6) }
    }
}

/// Executes one family's ops on its maps.
pub fn execute<F: Family>(maps: &mut FamilyMaps<F>, ops: &[MapOp<F>]) -> Result<(), MapsError> {
    for op in ops {
        match *op {
            MapOp::PutBackend { id, backend } => maps.put_backend(id, backend)?,
            MapOp::PutSlot { key, backend_id } => maps.put_slot(key, backend_id)?,
            MapOp::PutRevNat { index, frontend } => maps.put_rev_nat(index, frontend)?,
            MapOp::PutMaster { key, count, rev_nat_index, flags, affinity_timeout } => {
                maps.put_master(key, count, rev_nat_index, flags, affinity_timeout)?
            }
            MapOp::DeleteMaster { key } | MapOp::DeleteSlot { key } => {
                ignore_missing(maps.delete_service_entry(key))?
            }
            MapOp::DeleteRevNat { index } => ignore_missing(maps.delete_rev_nat(index))?,
            MapOp::DeleteBackend { id } => ignore_missing(maps.delete_backend(id))?,
        }
    }
    Ok(())
}

fn adopt<F: Family>(maps: &FamilyMaps<F>) -> Planner<F> {
    Planner::adopt(&maps.service_entries(), &maps.backend_entries(), &maps.rev_nat_entries())
}

fn ignore_missing(result: Result<(), MapsError>) -> Result<(), MapsError> {
    match result {
        Err(MapsError::Delete { source: MapError::KeyNotFound, .. }) => Ok(()),
        other => other,
    }
}
