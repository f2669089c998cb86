//! `cargo xtask`: weir's task runner. It installs what the project needs (`setup`), runs the
//! whole test pipeline (`test`), runs benchmarks (`bench NAME`) and brings up the lab
//! (`lab up`). It builds and orchestrates; product logic lives in the other crates.
mod bench;
mod cmd;
mod lab;
mod setup;
mod test;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything weir needs on a bare Debian machine (idempotent).
    Setup,
    /// setup, fmt check, clippy -D warnings, unit tests and privileged tests.
    Test {
        /// Extra arguments passed to `cargo test` after `--` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        filter: Vec<String>,
    },
    /// Run a benchmark: candidate against its baseline, interleaved, in one run.
    Bench {
        /// Benchmark name: tc-rewrite, cni, lb, overlay, apiserver, policy.
        name: String,
        /// Rounds (each round measures candidate then baseline); at least 5.
        #[arg(long, default_value_t = 7)]
        rounds: u32,
    },
    /// The lab: builds weir and weir-cni (release), then runs `weir lab ARGS...`
    /// (`up [--nodes N] [--dataplane ebpf|nftables] [--overlay vxlan|native]`, `status`, `down`).
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = workspace_root();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Test { filter } => test::run(&root, &filter),
        Task::Bench { name, rounds } => bench::run(&root, &name, rounds),
        Task::Lab { args } => lab::run(&root, &args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
