//! The lab's contact with the machine: network namespaces and links (through iproute2), cgroups,
//! daemons, and HTTP probes from inside a namespace. Nothing here touches the root namespace's
//! links, routes, addresses or firewall.
use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::{fd::AsRawFd, unix::fs::MetadataExt, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub const NETNS_DIR: &str = "/run/netns";

/// Runs `ip args...`; the error carries ip's own message.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2); `cargo xtask setup` installs it")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs a batch of ip commands (one per line, `ip -batch` syntax) inside namespace `netns`,
/// in one process.
pub fn ip_batch(netns: &str, lines: &[String]) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip -batch (iproute2)")?;
    child.stdin.take().expect("piped").write_all(lines.join("\n").as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("ip -n {netns} -batch: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Names of the network namespaces under /run/netns starting with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Creates namespace `name` with its loopback up.
pub fn create_netns(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

pub fn delete_netns(name: &str) -> Result<()> {
    ip(&["netns", "del", name])
}

/// Runs `f` on a short-lived thread inside namespace `netns`.
pub fn in_netns<R: Send>(netns: &str, f: impl FnOnce() -> R + Send) -> Result<R> {
    let target =
        File::open(netns_path(netns)).with_context(|| format!("opening namespace {netns}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<R> {
                // SAFETY: setns on a descriptor we own; the thread ends right after `f`, so no
                // other code runs in the namespace.
                if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error()).context("entering the namespace");
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Writes a sysctl of namespace `netns` (e.g. `net/ipv4/ip_forward`).
pub fn sysctl_in(netns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    in_netns(netns, || fs::write(&path, value))?
        .with_context(|| format!("setting {key} in {netns}"))
}

/// A plain HTTP/1.1 GET from inside `netns`; returns status and body.
pub fn http_get_in(netns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    in_netns(netns, || http_get(addr, path))?
}

fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP response from {addr}"))?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// The cgroup2 mount point (unified or hybrid layouts).
pub fn cgroup_root() -> Result<PathBuf> {
    weir_proxy::system::cgroup2_mount()
        .context("reading /proc/self/mountinfo")?
        .context("no cgroup2 hierarchy is mounted; the lab needs cgroup v2")
}

/// A process the lab runs in the background.
pub struct Daemon<'a> {
    pub program: &'a Path,
    pub args: Vec<String>,
    /// Network namespace to run in (none: the root namespace).
    pub netns: Option<&'a str>,
    /// Absolute cgroup directory to run in.
    pub cgroup: &'a Path,
    /// stdout and stderr go here (appended).
    pub log: &'a Path,
}

/// Starts `daemon` in its own session (it outlives `weir lab up`); returns its pid.
pub fn spawn(daemon: &Daemon<'_>) -> Result<u32> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(daemon.log)
        .with_context(|| format!("opening {}", daemon.log.display()))?;
    let procs = OpenOptions::new()
        .write(true)
        .open(daemon.cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", daemon.cgroup.display()))?;
    let netns = match daemon.netns {
        Some(name) => {
            Some(File::open(netns_path(name)).with_context(|| format!("opening {name}"))?)
        }
        None => None,
    };
    let mut cmd = Command::new(daemon.program);
    cmd.args(&daemon.args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: between fork and exec the hook only makes system calls on descriptors opened
    // above (no allocation): a new session, the namespace, the cgroup.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if let Some(ns) = &netns
                && libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("starting {}", daemon.program.display()))?;
    Ok(child.id())
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        }
        Err(_) => false,
    }
}

/// Kills every process in cgroup `dir` and below (cgroup.kill) and waits (bounded) until the
/// cgroup is empty.
pub fn kill_cgroup(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    fs::write(dir.join("cgroup.kill"), "1")
        .with_context(|| format!("writing {}/cgroup.kill", dir.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while populated(dir) {
        if Instant::now() > deadline {
            bail!("processes in {} did not exit within 10 s of SIGKILL", dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .map(|events| events.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// Removes cgroup `dir` and its children. A cgroup whose last processes were just killed can
/// refuse `rmdir` (EBUSY) for a moment while the kernel finishes their exit, so each removal is
/// retried (processes that appeared meanwhile are killed again) for up to 10 s; a directory
/// that is already gone counts as removed.
pub fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    remove_cgroup_tree_by(dir, deadline)
}

fn remove_cgroup_tree_by(dir: &Path, deadline: Instant) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("reading cgroup {}", dir.display())),
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree_by(&entry.path(), deadline)?;
        }
    }
    loop {
        let err = match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => err,
        };
        if Instant::now() > deadline {
            return Err(err).with_context(|| {
                format!("removing cgroup {} (still busy after 10 s)", dir.display())
            });
        }
        if populated(dir) {
            let _ = fs::write(dir.join("cgroup.kill"), "1");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids of processes whose network namespace is one of `netns` (by inode).
pub fn processes_in(netns: &[String]) -> Vec<u32> {
    let inodes: Vec<(u64, u64)> = netns
        .iter()
        .filter_map(|n| fs::metadata(netns_path(n)).ok().map(|m| (m.dev(), m.ino())))
        .collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| inodes.contains(&(m.dev(), m.ino())))
        })
        .collect()
}

pub fn kill(pid: u32) {
    // SAFETY: kill(2) on a pid we found; a vanished process makes it fail harmlessly.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

/// Polls `check` every 50 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
