//! `cargo xtask lab up`: builds what the lab needs and brings it up.
//!
//! The multi-node lab (`weir lab up`) is its own issue and is not built yet. Until it is, this
//! command builds everything and runs the datapath smoke demo instead, and says so: two
//! network namespaces, weir's tc load balancer attached, a real TCP connection to a service VIP.
use std::path::Path;

use anyhow::Result;

use crate::{cmd, setup};

pub fn up(root: &Path) -> Result<()> {
    setup::run()?;
    cmd::run(cmd::cargo(root).args(["build", "--release"]))?;
    println!(
        "lab: the multi-node lab is not built yet; running the datapath smoke demo instead \
         (see README.md)"
    );
    cmd::run(cmd::cargo(root).args([
        "run",
        "--release",
        "--quiet",
        "--package",
        "weir-tests",
        "--bin",
        "weir-smoke",
    ]))
}
