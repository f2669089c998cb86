//! The benchmark binary `cargo xtask bench NAME` runs (release build, as root).
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use weir_tests::bench::{apiserver, cni, lb, overlay, tc_rewrite};

const USAGE: &str = "usage: weir-bench NAME [--rounds N] [--out DIR]   (NAME: tc-rewrite, cni, lb, overlay, apiserver)\n       weir-bench lb-programming [--sizes N,N,...]   (service programming times only, both dataplanes)";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().context(USAGE)?;
    let mut rounds = 7u32;
    let mut out = PathBuf::from("target/bench");
    let mut sizes = vec![1_000, 10_000];
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--rounds" => {
                rounds = args.next().context(USAGE)?.parse().context("--rounds takes a number")?
            }
            "--out" => out = PathBuf::from(args.next().context(USAGE)?),
            "--sizes" => {
                sizes = args
                    .next()
                    .context(USAGE)?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--sizes takes numbers separated by commas, e.g. 1000,10000")?
            }
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    let reports = match name.as_str() {
        "tc-rewrite" => vec![tc_rewrite::run(rounds)?],
        "cni" => vec![cni::run(rounds)?],
        "lb" => vec![lb::run(rounds)?],
        "overlay" => overlay::run(rounds)?,
        "apiserver" => vec![apiserver::run(rounds)?],
        "lb-programming" => return lb::programming_only(&sizes),
        other => bail!("unknown benchmark {other:?}; {USAGE}"),
    };
    for report in reports {
        report.print();
        let path = report.write_json(&out)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
