//! `cargo xtask lab ARGS...`: installs and builds what the lab needs (release `weir` and
//! `weir-cni`, side by side in target/release), then runs `weir lab ARGS...`. The lab itself
//! lives in the weir-lab crate; this only builds and hands over.
use std::path::Path;

use anyhow::Result;

use crate::{cmd, setup};

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    setup::run()?;
    cmd::run(cmd::cargo(root).args([
        "build",
        "--release",
        "--package",
        "weir-cli",
        "--package",
        "weir-cni-plugin",
    ]))?;
    let weir = root.join("target/release/weir");
    cmd::run(std::process::Command::new(weir).arg("lab").args(args))
}
