//! `cargo xtask bench tc-rewrite`: nanoseconds per packet of the tc load balancer
//! (`tc_lb4_fwd`) against a tc program that does nothing (`tc_noop`), both run by the kernel
//! with BPF_PROG_TEST_RUN and `repeat`, which reports the mean time per run.
//!
//! Figures:
//! - `hit_ns_per_packet`: a packet to a service frontend of a tracked flow: parse, service
//!   lookup, conntrack lookup, backend lookup, address and port rewrite with both checksums.
//!   BPF_PROG_TEST_RUN repeats on the same (rewritten) packet, so the benchmark sets up two
//!   services that point at each other (VIP1:80 -> VIP2:80 -> VIP1:80): every repetition is a
//!   real translation.
//! - `miss_ns_per_packet`: a packet to an address that is no service (the common case on a
//!   node): parse and one lookup.
use std::net::Ipv4Addr;

use anyhow::{Result, ensure};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use weir_common::{lb::Backend, proto};
use weir_proxy::{
    maps::{ServiceEntry, ServiceMaps},
    programs::{self, LoadOptions, TC_LB4_FORWARD, TC_NOOP},
};

use super::{Figures, Report, Sides, interleave};
use crate::{bpffs::TestPinDir, packet::Ipv4Packet, privileged::require_root};

const REPEAT: u32 = 1_000_000;
const VIP1: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const NOT_A_SERVICE: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 1);

pub fn run(rounds: u32) -> Result<Report> {
    require_root();
    let pins = TestPinDir::new("bench")?;
    let mut loaded = programs::load(&LoadOptions::new(pins.path()))?;
    let mut maps = ServiceMaps::take(&mut loaded.ebpf)?;
    for (rev_nat_index, (vip, target)) in [(1, (VIP1, VIP2)), (2, (VIP2, VIP1))] {
        maps.upsert(&ServiceEntry {
            address: vip,
            port: 80,
            proto: proto::TCP,
            rev_nat_index,
            backends: vec![(rev_nat_index, Backend::new(target.octets(), 80, proto::TCP))],
        })?;
    }
    let lb = programs::classifier_ref(&loaded.ebpf, TC_LB4_FORWARD)?;
    let noop = programs::classifier_ref(&loaded.ebpf, TC_NOOP)?;

    let hit = Ipv4Packet::tcp(CLIENT, 40_000, VIP1, 80).build();
    let miss = Ipv4Packet::tcp(CLIENT, 40_000, NOT_A_SERVICE, 80).build();
    let measure = |program: &SchedClassifier| -> Result<Figures> {
        Ok(Figures::from([
            ("hit_ns_per_packet", ns_per_run(program, &hit)?),
            ("miss_ns_per_packet", ns_per_run(program, &miss)?),
        ]))
    };
    interleave(
        "tc-rewrite",
        Sides { candidate_label: "tc_lb4_fwd", baseline_label: "tc_noop", unit: "ns per packet" },
        rounds,
        || measure(lb),
        || measure(noop),
    )
}

fn ns_per_run(program: &SchedClassifier, packet: &[u8]) -> Result<f64> {
    let mut out = vec![0u8; packet.len()];
    let result = program.test_run(TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        repeat: REPEAT,
        ..TestRunOptions::new()
    })?;
    ensure!(
        result.return_value == 0,
        "program returned {} instead of TC_ACT_OK",
        result.return_value
    );
    Ok(result.duration.as_nanos() as f64)
}
