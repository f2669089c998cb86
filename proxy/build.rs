//! Compiles `ebpf/` for bpfel-unknown-none and leaves the object at `$OUT_DIR/weir`, which
//! `src/programs.rs` embeds. The recipe is the one in docs/toolchain.md: Debian's rustc (linked
//! into rustup as `weir-debian` by `cargo xtask setup`), `-Z build-std=core` unlocked with
//! RUSTC_BOOTSTRAP, and bpf-linker built against the same LLVM.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build (for `cargo check`/docs on machines without the
//! toolchain); an empty object is written so the crate still compiles, and loading it at run
//! time fails with a message that says how it was built.
use std::{env, fs, path::PathBuf};

/// The rustup name under which `cargo xtask setup` links Debian's toolchain.
const EBPF_TOOLCHAIN: &str = "weir-debian";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../common");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
        fs::write(out.join("weir"), [])?;
    }
    // SAFETY: build scripts are single-threaded; aya-build reads this variable to pass
    // `-Z build-std=core` to Debian's stable rustc.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [aya_build::Package { name: "weir-ebpf", root_dir: "../ebpf", ..Default::default() }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
