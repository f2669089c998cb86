//! Per-CPU event counters (`weir_metrics_v1`).
use weir_common::metrics::Counter;

use crate::maps::METRICS;

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = METRICS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a per-CPU array lookup, so it is valid for this CPU and
        // no other program instance writes it concurrently (preemption is off in tc programs).
        unsafe { *slot += 1 };
    }
}
