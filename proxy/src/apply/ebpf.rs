//! Executes planned [`MapOp`]s on the service maps of a loaded object.
use aya::maps::MapError;

use super::plan::{MapOp, Plan, Planner};
use crate::maps::{MapsError, ServiceMaps};

/// Writes plans into the maps.
pub struct MapWriter {
    maps: ServiceMaps,
}

impl MapWriter {
    pub fn new(maps: ServiceMaps) -> Self {
        Self { maps }
    }

    /// Executes `ops` in order. A delete of an entry that is already gone is not an error (the
    /// goal is reached); a failed write stops and returns the error (the caller resyncs).
    pub fn execute(&mut self, ops: &[MapOp]) -> Result<(), MapsError> {
        for op in ops {
            match *op {
                MapOp::PutBackend { id, backend } => self.maps.put_backend(id, backend)?,
                MapOp::PutSlot { key, backend_id } => self.maps.put_slot(key, backend_id)?,
                MapOp::PutRevNat { index, frontend } => self.maps.put_rev_nat(index, frontend)?,
                MapOp::PutMaster { key, count, rev_nat_index, flags, affinity_timeout } => {
                    self.maps.put_master(key, count, rev_nat_index, flags, affinity_timeout)?
                }
                MapOp::DeleteMaster { key } | MapOp::DeleteSlot { key } => {
                    ignore_missing(self.maps.delete_service_entry(key))?
                }
                MapOp::DeleteRevNat { index } => ignore_missing(self.maps.delete_rev_nat(index))?,
                MapOp::DeleteBackend { id } => ignore_missing(self.maps.delete_backend(id))?,
            }
        }
        Ok(())
    }

    /// Executes a whole plan: its ops, then the flush of conntrack entries of UDP flows whose
    /// backend went away. Returns the number of conntrack entries flushed.
    pub fn apply(&mut self, plan: &Plan) -> Result<usize, MapsError> {
        self.execute(&plan.ops)?;
        self.maps.flush_udp_flows(&plan.stale_udp_flows)
    }

    pub fn maps(&self) -> &ServiceMaps {
        &self.maps
    }

    /// A planner that adopts what the maps hold (pinned maps reused after a restart).
    pub fn adopting_planner(&self) -> Planner {
        Planner::adopt(
            &self.maps.service_entries(),
            &self.maps.backend_entries(),
            &self.maps.rev_nat_entries(),
        )
    }
}

fn ignore_missing(result: Result<(), MapsError>) -> Result<(), MapsError> {
    match result {
        Err(MapsError::Delete { source: MapError::KeyNotFound, .. }) => Ok(()),
        other => other,
    }
}
