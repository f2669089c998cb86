//! The benchmark binary `cargo xtask bench NAME` runs (release build, as root).
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use weir_tests::bench::{apiserver, cni, lb, lb_agent, overlay, policy, tc_rewrite};

const USAGE: &str = "usage: weir-bench NAME [--rounds N] [--out DIR] [--quick] [--sizes N,N..]   (NAME: tc-rewrite, cni, lb, overlay, apiserver, policy; --quick: few N and short runs, policy only; --sizes: the rule counts of policy, the service counts of lb, which then skips its agent phase)\n       weir-bench lb-programming [--sizes N,N,...]   (service programming times only, both dataplanes; default 1000,10000)\n       weir-bench lb-agent [--sizes N]   (the real agent with N services, default 10000: RSS and endpoint change -> datapath latency, both dataplanes)\n       weir-bench service-creates [--sizes N]   (N Service creates in a row through the API server, default 3000, timed per 500)";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().context(USAGE)?;
    let mut rounds = 7u32;
    let mut out = PathBuf::from("target/bench");
    let mut quick = false;
    let mut sizes: Option<Vec<u32>> = None;
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--rounds" => {
                rounds = args.next().context(USAGE)?.parse().context("--rounds takes a number")?
            }
            "--out" => out = PathBuf::from(args.next().context(USAGE)?),
            "--quick" => quick = true,
            "--sizes" => {
                let list = args.next().context(USAGE)?;
                let parsed: Result<Vec<u32>, _> =
                    list.split(',').map(|n| n.trim().parse::<u32>()).collect();
                sizes = Some(parsed.with_context(|| format!("--sizes {list:?}: {USAGE}"))?);
            }
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    if quick && name != "policy" {
        bail!("--quick is only for the policy benchmark; {USAGE}");
    }
    if sizes.is_some()
        && !["policy", "lb", "lb-programming", "lb-agent", "service-creates"]
            .contains(&name.as_str())
    {
        bail!(
            "--sizes is only for policy, lb, lb-programming, lb-agent and service-creates; {USAGE}"
        );
    }
    let reports = match name.as_str() {
        "tc-rewrite" => vec![tc_rewrite::run(rounds)?],
        "cni" => vec![cni::run(rounds)?],
        "lb" => {
            let reports = lb::run(sizes.as_deref().unwrap_or(&lb::SIZES), rounds)?;
            // The agent figures (RSS, event -> datapath at 10k services) belong to the
            // same benchmark; a run limited with --sizes is a quick one and skips them.
            if sizes.is_none() {
                lb_agent::run(10_000)?;
            }
            reports
        }
        "overlay" => overlay::run(rounds)?,
        "apiserver" => vec![apiserver::run(rounds)?],
        "policy" => {
            let mut options =
                if quick { policy::Options::quick() } else { policy::Options::full(rounds) };
            if let Some(sizes) = sizes {
                options.sizes = sizes;
            }
            let outcome = policy::run(&options)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let path = out.join("policy-programming.json");
            std::fs::write(&path, serde_json::to_string_pretty(&outcome.programming)? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
            outcome.reports
        }
        "lb-programming" => {
            return lb::programming_only(&sizes.unwrap_or_else(|| vec![1_000, 10_000]));
        }
        "lb-agent" => {
            let sizes = sizes.unwrap_or_else(|| vec![10_000]);
            let [services] = sizes[..] else { bail!("lb-agent takes one size; {USAGE}") };
            return lb_agent::run(services);
        }
        "service-creates" => {
            let sizes = sizes.unwrap_or_else(|| vec![3_000]);
            let [count] = sizes[..] else { bail!("service-creates takes one size; {USAGE}") };
            return apiserver::service_creates(count as usize);
        }
        other => bail!("unknown benchmark {other:?}; {USAGE}"),
    };
    for report in reports {
        report.print();
        let path = report.write_json(&out)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
