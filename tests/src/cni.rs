//! Running CNI plugins exactly as a container runtime does, inside test namespaces.
//!
//! A [`Node`] is a network namespace that plays the node: every plugin process is started inside
//! it (its own namespace is set with setns(2) between fork and exec), so the "host" side of pod
//! wiring never touches the root namespace. Pods are further namespaces ([`Netns`]). The plugin
//! gets the `CNI_*` variables in a cleared environment and the config on stdin; its exit status
//! and stdout are returned as an [`Invocation`].
//!
//! Finding `weir-cni`: `CARGO_BIN_EXE_*` exists only for a package's own binaries, so
//! [`weir_cni`] builds the plugin once per test process with the cargo that built the tests,
//! into the same target directory and profile as the running test executable
//! (`<target>/<profile>/weir-cni`), which is a no-op when it is up to date. `WEIR_CNI_BIN`
//! overrides that with a given binary.
use std::{
    fs::File,
    io::Write,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::{names, netns::Netns};

/// Where Debian's containernetworking-plugins live (the reference plugins, portmap).
pub const DEBIAN_PLUGINS: &str = "/usr/lib/cni";

/// The `weir-cni` binary, built on first use (see the module docs).
pub fn weir_cni() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_weir_cni().expect("building weir-cni for the tests"))
}

fn build_weir_cni() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("WEIR_CNI_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe()?;
    let mut profile_dir = exe.parent().context("test executable has no directory")?;
    if profile_dir.ends_with("deps") {
        profile_dir = profile_dir.parent().context("no profile directory")?;
    }
    let target_dir = profile_dir.parent().context("no target directory")?;
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
    let profile = if profile == "debug" { "dev" } else { profile };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    let out = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--package",
            "weir-cni-plugin",
            "--bin",
            "weir-cni",
            "--profile",
        ])
        .arg(profile)
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .context("running cargo build for weir-cni")?;
    ensure!(
        out.status.success(),
        "cargo build of weir-cni failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = profile_dir.join("weir-cni");
    ensure!(bin.is_file(), "{} missing after the build", bin.display());
    Ok(bin)
}

/// A directory under /tmp with a unique `weirt-` name, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(what: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(names::unique(what));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// One container attachment as the runtime names it.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
}

impl Attachment {
    pub fn new(container_id: impl Into<String>, pod: &Netns) -> Self {
        Self { container_id: container_id.into(), netns: pod.path(), ifname: "eth0".into() }
    }
}

/// What one plugin run returned.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Invocation {
    pub fn ok(&self) -> bool {
        self.exit_code == Some(0)
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("plugin stdout is not JSON: {:?}", self.stdout))
    }

    /// The result JSON of a successful ADD, or an error naming the plugin's answer.
    pub fn result(&self) -> Result<Value> {
        ensure!(self.ok(), "plugin failed ({:?}): {} {}", self.exit_code, self.stdout, self.stderr);
        self.json()
    }

    /// Succeeds, or fails with the plugin's output.
    pub fn expect_ok(&self) -> Result<()> {
        ensure!(self.ok(), "plugin failed ({:?}): {} {}", self.exit_code, self.stdout, self.stderr);
        Ok(())
    }

    /// The `code` of the error object a failed run printed.
    pub fn error_code(&self) -> Result<u64> {
        ensure!(!self.ok(), "plugin succeeded where it should have failed: {}", self.stdout);
        let value = self.json()?;
        ensure!(value["msg"].as_str().is_some_and(|m| !m.is_empty()), "error without msg: {value}");
        ensure!(!self.stderr.contains("panicked"), "the plugin panicked: {}", self.stderr);
        value["code"].as_u64().with_context(|| format!("error object without code: {value}"))
    }
}

/// The test namespace that plays the node, with an IPAM data directory of its own.
pub struct Node {
    pub ns: Netns,
    ns_file: File,
    pub data_dir: TempDir,
}

impl Node {
    pub fn new() -> Result<Self> {
        let ns = Netns::new("node")?;
        let ns_file = File::open(ns.path())?;
        let data_dir = TempDir::new("cni-data")?;
        Ok(Self { ns, ns_file, data_dir })
    }

    /// A network config for weir-cni with built-in IPAM over `subnets` (one range set each).
    pub fn config(&self, version: &str, name: &str, subnets: &[&str]) -> Value {
        let ranges: Vec<Value> = subnets.iter().map(|s| json!([{ "subnet": s }])).collect();
        json!({
            "cniVersion": version,
            "name": name,
            "type": "weir-cni",
            "ipam": { "ranges": ranges, "dataDir": self.data_dir.path() },
        })
    }

    /// Runs `plugin` inside the node namespace with `command`, the attachment's variables and
    /// `stdin`; `extra_env` adds or overrides variables (e.g. the test-only kill hook).
    pub fn exec(
        &self,
        plugin: &Path,
        command: &str,
        attachment: Option<&Attachment>,
        stdin: &[u8],
        extra_env: &[(&str, &str)],
    ) -> Result<Invocation> {
        let mut cmd = Command::new(plugin);
        let cni_path =
            format!("{}:{DEBIAN_PLUGINS}", weir_cni().parent().unwrap_or(Path::new("/")).display());
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(a) = attachment {
            cmd.env("CNI_CONTAINERID", &a.container_id)
                .env("CNI_NETNS", &a.netns)
                .env("CNI_IFNAME", &a.ifname);
        }
        for (key, value) in extra_env {
            cmd.env(key, value);
        }
        let ns_fd = self.ns_file.as_raw_fd();
        // SAFETY: between fork and exec the child only calls setns(2), which is
        // async-signal-safe, on a descriptor the parent keeps open.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        // A script a test has just written can be briefly "busy" (ETXTBSY) while another thread
        // forks with the write descriptor still open; retry that, bounded.
        let mut attempts = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 50 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => break other.with_context(|| format!("starting {}", plugin.display()))?,
            }
        };
        let mut input = child.stdin.take().context("child stdin")?;
        let stdin = stdin.to_vec();
        // A plugin may stop reading early (oversized input); a writer thread avoids a deadlock.
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&stdin);
        });
        let out = child.wait_with_output()?;
        let elapsed = started.elapsed();
        let _ = writer.join();
        Ok(Invocation {
            exit_code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed,
        })
    }

    /// Runs weir-cni with a JSON config.
    pub fn weir(
        &self,
        command: &str,
        attachment: Option<&Attachment>,
        config: &Value,
    ) -> Result<Invocation> {
        self.exec(weir_cni(), command, attachment, config.to_string().as_bytes(), &[])
    }

    /// Interfaces of the node namespace other than `lo`.
    pub fn links(&self) -> Result<Vec<String>> {
        let out = self.ns.ip(&["-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or_default().to_string())
            .filter(|n| n != "lo")
            .collect())
    }

    /// IPv4 and IPv6 routes of the node's main table, minus the kernel's own IPv6 ones.
    pub fn routes(&self) -> Result<Vec<String>> {
        let mut routes: Vec<String> =
            self.ns.ip(&["-4", "route", "show"])?.lines().map(str::to_string).collect();
        routes.extend(
            self.ns
                .ip(&["-6", "route", "show"])?
                .lines()
                .filter(|l| !l.starts_with("fe80::/64") && !l.starts_with("multicast"))
                .map(str::to_string),
        );
        Ok(routes)
    }

    /// The reservations in the IPAM store of `network` (empty when there is no store).
    pub fn reservations(&self, network: &str) -> Result<Vec<String>> {
        let path = self.data_dir.path().join(network).join("state.json");
        let Ok(bytes) = std::fs::read(&path) else { return Ok(Vec::new()) };
        let state: Value = serde_json::from_slice(&bytes)?;
        Ok(state["allocations"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default())
    }

    /// Fails unless no link, route or reservation of `network` is left on the node.
    pub fn assert_clean(&self, network: &str) -> Result<()> {
        let (links, routes, reservations) =
            (self.links()?, self.routes()?, self.reservations(network)?);
        if !links.is_empty() || !routes.is_empty() || !reservations.is_empty() {
            bail!("left behind: links {links:?}, routes {routes:?}, reservations {reservations:?}");
        }
        Ok(())
    }
}

/// Pings `address` once from inside `ns` (2 s timeout).
pub fn ping(ns: &Netns, address: &str) -> Result<()> {
    let flag = if address.contains(':') { "-6" } else { "-4" };
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "ping", flag, "-c", "1", "-W", "2", address])
        .output()
        .context("running ping")?;
    ensure!(
        out.status.success(),
        "ping {address} from {} failed: {}{}",
        ns.name(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The pod address (without prefix) of the first IP of the given family in an ADD result.
pub fn result_ip(result: &Value, v6: bool) -> Option<String> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let address = ip["address"].as_str()?;
        (address.contains(':') == v6)
            .then(|| address.split('/').next().unwrap_or_default().to_string())
    })
}
