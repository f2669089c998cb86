//! Executes planned [`MapOp`]s on the service maps of a loaded object.
use aya::maps::MapError;

use super::plan::{Family, MapOp, Planner, ServicePlan, ServicePlanner};
use crate::maps::{FamilyMaps, MapsError, ServiceMaps};

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

    /// Executes a whole plan: its ops, then the flush of conntrack entries of UDP flows whose
    /// backend went away. Returns the number of conntrack entries flushed.
    pub fn apply(&mut self, plan: &ServicePlan) -> Result<usize, MapsError> {
        self.execute(plan)?;
        self.maps.flush_udp_flows(&plan.v4.stale_udp_flows, &plan.v6.stale_udp_flows)
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
