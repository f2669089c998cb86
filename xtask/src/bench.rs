//! `cargo xtask bench NAME`: builds the benchmark binary in release mode and runs it. The
//! measuring code and the runner (interleaved rounds, medians, ratios, JSON) live in
//! `tests/src/bench/`; results go to `target/bench/NAME.json`.
use std::path::Path;

use anyhow::{Result, bail};

use crate::{cmd, setup};

pub fn run(root: &Path, name: &str, rounds: u32) -> Result<()> {
    if rounds < 5 {
        bail!("--rounds must be at least 5 (got {rounds}): medians of fewer rounds are noise");
    }
    setup::run()?;
    let out = root.join("target").join("bench");
    // All binaries of the test crate: the benchmarks run weir-probe as their client.
    cmd::run(cmd::cargo(root).args(["build", "--release", "--package", "weir-tests", "--bins"]))?;
    cmd::run(
        std::process::Command::new(root.join("target/release/weir-bench"))
            .current_dir(root)
            .arg(name)
            .arg("--rounds")
            .arg(rounds.to_string())
            .arg("--out")
            .arg(&out),
    )
}
