//! Network namespaces and veth pairs for tests, removed on drop (also on panic).
//!
//! Namespaces are made with iproute2 (`ip netns add`), so they are visible under /run/netns
//! and to `ip netns list` while a test runs. Code runs inside one through [`Netns::run`], on a
//! dedicated thread: a namespace belongs to a thread, never to a shared worker.
use std::{
    fs::{self, File},
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    sync::Once,
};

use anyhow::{Context, Result, bail, ensure};

use crate::names;

const NETNS_DIR: &str = "/run/netns";

/// A network namespace owned by the test; deleted on drop with everything inside it.
pub struct Netns {
    name: String,
    /// Deleted on drop only when the test made it (not for [`Netns::borrow`]).
    owned: bool,
}

impl Netns {
    /// Creates a namespace named `weirt-<pid>-<seq>-<role>` with its loopback up.
    pub fn new(role: &str) -> Result<Self> {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_dead_owners);
        let name = names::unique(role);
        ip(&["netns", "add", &name])?;
        let ns = Self { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// An existing namespace someone else owns (e.g. a lab pod's), never deleted by this value.
    pub fn borrow(name: &str) -> Result<Self> {
        let ns = Self { name: name.to_string(), owned: false };
        ensure!(ns.path().exists(), "no network namespace {name}");
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// Runs `ip -n <ns> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// What `nft list ruleset` prints in this namespace (how operators read weir's tables);
    /// panics when nft fails, e.g. cannot parse what weir wrote.
    pub fn nft_ruleset(&self) -> String {
        let listed = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "list", "ruleset"])
            .output()
            .expect("running nft");
        assert!(listed.status.success(), "nft list: {}", String::from_utf8_lossy(&listed.stderr));
        String::from_utf8_lossy(&listed.stdout).into_owned()
    }

    /// Runs `f` on a new thread that has entered this namespace; returns its result and
    /// re-raises its panic. The thread ends afterwards, so no other code ever runs in it.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        run_in(&self.path(), f)
    }
}

/// [`Netns::run`] for a namespace known by its path (e.g. `/run/netns/<name>`).
pub fn run_in<F, R>(path: &std::path::Path, f: F) -> Result<R>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let target =
        File::open(path).with_context(|| format!("opening namespace {}", path.display()))?;
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || -> Result<R> {
            let original = File::open("/proc/thread-self/ns/net")
                .context("opening this thread's network namespace")?;
            setns(&target)?;
            let result = f();
            // Restore before the thread ends, as every user of a namespace-thread should.
            setns(&original)?;
            Ok(result)
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Err(err) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: could not delete test namespace {}: {err:#}", self.name);
        }
    }
}

fn setns(ns: &File) -> Result<()> {
    // SAFETY: `ns` is an open namespace file; setns only changes this thread's namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns failed: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A veth pair whose two ends are created directly inside two test namespaces (never in the
/// root namespace). It goes away with either namespace.
pub struct Veth {
    pub a: String,
    pub b: String,
}

impl Veth {
    /// Creates the pair, with end `a` in `ns_a` and end `b` in `ns_b`, both up.
    pub fn between(ns_a: &Netns, ns_b: &Netns) -> Result<Self> {
        let (a, b) = (names::interface('a'), names::interface('b'));
        ip(&[
            "link",
            "add",
            &a,
            "netns",
            ns_a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            ns_b.name(),
        ])?;
        ns_a.ip(&["link", "set", &a, "up"])?;
        ns_b.ip(&["link", "set", &b, "up"])?;
        Ok(Self { a, b })
    }
}

/// Runs `ip args...` and returns stdout, or an error carrying its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes test namespaces whose owning process is gone (a test run that was killed).
fn sweep_dead_owners() {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = names::owner_pid(&name) else { continue };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}
