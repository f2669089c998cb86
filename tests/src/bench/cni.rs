//! `cargo xtask bench cni`: ADD+DEL latency of weir-cni against Debian's bridge + host-local
//! (the reference plugins), exec'd exactly as a runtime does, each in its own node namespace.
//!
//! Per round and side:
//! - `seq_p50_ms`, `seq_p99_ms`: 200 pods one after the other; per pod the wall time of ADD plus
//!   the wall time of DEL, in milliseconds; nearest-rank percentiles.
//! - `seq_add_p50_ms`, `seq_del_p50_ms`: the same pods, ADD and DEL on their own.
//! - `burst_p50_ms`, `burst_p99_ms`: 30 pods whose ADD+DEL run at the same time.
//! - `burst_p99_per_seq_p50`: the side's burst p99 divided by its own sequential p50 (the issue's
//!   goal for weir-cni: at most 2).
//!
//! Pod namespaces are made once and reused (an attachment is fully removed by DEL); making them
//! is not measured. Each side gets one warm-up ADD+DEL (the bridge plugin creates its bridge on
//! the first ADD).
use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use super::{Figures, Report, Sides, interleave};
use crate::{
    cni::{Attachment, DEBIAN_PLUGINS, Node, weir_cni},
    names,
    netns::Netns,
    privileged::require_root,
};

const SEQUENTIAL_PODS: usize = 200;
const BURST_PODS: usize = 30;

/// One plugin setup: the binary, its config, and the node it runs on.
struct Side {
    node: Node,
    plugin: PathBuf,
    config: Value,
}

impl Side {
    /// ADD then DEL of one attachment; returns the wall time of each.
    fn add_del(&self, attachment: &Attachment) -> Result<(Duration, Duration)> {
        let config = self.config.to_string();
        let add = self.node.exec(&self.plugin, "ADD", Some(attachment), config.as_bytes(), &[])?;
        add.expect_ok().context("ADD")?;
        let del = self.node.exec(&self.plugin, "DEL", Some(attachment), config.as_bytes(), &[])?;
        del.expect_ok().context("DEL")?;
        Ok((add.elapsed, del.elapsed))
    }

    fn measure(&self, pods: &[Attachment]) -> Result<Figures> {
        let (sequential, burst) = pods.split_at(SEQUENTIAL_PODS);
        let seq = sequential.iter().map(|a| self.add_del(a)).collect::<Result<Vec<_>>>()?;
        let par = std::thread::scope(|scope| {
            let handles: Vec<_> = burst.iter().map(|a| scope.spawn(|| self.add_del(a))).collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("burst worker panicked"))
                .collect::<Result<Vec<_>>>()
        })?;
        let mut seq_add: Vec<Duration> = seq.iter().map(|(add, _)| *add).collect();
        let mut seq_del: Vec<Duration> = seq.iter().map(|(_, del)| *del).collect();
        let mut seq_both: Vec<Duration> = seq.iter().map(|(add, del)| *add + *del).collect();
        let mut par_both: Vec<Duration> = par.iter().map(|(add, del)| *add + *del).collect();
        let seq_p50 = percentile(&mut seq_both, 50);
        let burst_p99 = percentile(&mut par_both, 99);
        Ok(Figures::from([
            ("seq_p50_ms", seq_p50),
            ("seq_p99_ms", percentile(&mut seq_both, 99)),
            ("seq_add_p50_ms", percentile(&mut seq_add, 50)),
            ("seq_del_p50_ms", percentile(&mut seq_del, 50)),
            ("burst_p50_ms", percentile(&mut par_both, 50)),
            ("burst_p99_ms", burst_p99),
            ("burst_p99_per_seq_p50", burst_p99 / seq_p50),
        ]))
    }
}

/// Nearest-rank percentile in milliseconds.
fn percentile(samples: &mut [Duration], p: usize) -> f64 {
    samples.sort();
    let rank = (p * samples.len()).div_ceil(100).clamp(1, samples.len());
    samples[rank - 1].as_secs_f64() * 1000.0
}

pub fn run(rounds: u32) -> Result<Report> {
    require_root();
    let bridge = PathBuf::from(DEBIAN_PLUGINS).join("bridge");
    ensure!(bridge.is_file(), "{} is missing: run `cargo xtask setup`", bridge.display());
    let weir = {
        let node = Node::new()?;
        let config = node.config("1.0.0", "bench-weir", &["10.140.0.0/16"]);
        Side { node, plugin: weir_cni().to_path_buf(), config }
    };
    let reference = {
        let node = Node::new()?;
        let config = json!({
            "cniVersion": "1.0.0",
            "name": "bench-bridge",
            "type": "bridge",
            "bridge": "weirtbr0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": "10.141.0.0/16" }]],
                "dataDir": node.data_dir.path(),
            },
        });
        Side { node, plugin: bridge, config }
    };
    let pods: Vec<Netns> = (0..SEQUENTIAL_PODS + BURST_PODS)
        .map(|_| Netns::new("bench-pod"))
        .collect::<Result<_>>()?;
    let attachments: Vec<Attachment> =
        pods.iter().map(|pod| Attachment::new(names::unique("bench"), pod)).collect();
    for side in [&weir, &reference] {
        side.add_del(&attachments[0]).context("warm-up")?;
    }
    interleave(
        "cni",
        Sides {
            candidate_label: "weir-cni",
            baseline_label: "bridge+host-local",
            unit: "ms per ADD+DEL",
        },
        rounds,
        || weir.measure(&attachments),
        || reference.measure(&attachments),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<Duration> = (1..=200).map(Duration::from_millis).collect();
        assert_eq!(percentile(&mut samples, 50), 100.0);
        assert_eq!(percentile(&mut samples, 99), 198.0);
        let mut one = vec![Duration::from_millis(7)];
        assert_eq!(percentile(&mut one, 99), 7.0);
    }
}
