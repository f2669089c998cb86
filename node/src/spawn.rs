//! Starting processes inside a pod: containers get the pod's network namespace plus a new
//! mount namespace (private /etc/resolv.conf, /etc/hostname, /etc/hosts bind mounts) and a new
//! UTS namespace (hostname = pod name); exec'd processes join a running container's
//! namespaces. Both land in the pod's cgroup and start a new session (so signals reach the
//! whole process group).
//!
//! Everything the child needs is opened and converted before fork: the `pre_exec` hooks only
//! make system calls on prepared descriptors and C strings (no allocation after fork in a
//! multi-threaded process).
use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use anyhow::{Context, Result, bail};

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).context("path with a NUL byte")
}

/// What a container process is started in.
pub struct ContainerNamespaces {
    netns: File,
    procs: File,
    binds: Vec<(CString, CString)>,
    hostname: CString,
    /// Make stdin (a pty slave) the controlling terminal of the new session.
    controlling_tty: bool,
}

impl ContainerNamespaces {
    /// `files` are (source under the state dir, target in /etc) bind mounts.
    pub fn prepare(
        netns: &Path,
        cgroup: &Path,
        files: &[(&Path, &str)],
        hostname: &str,
    ) -> Result<Self> {
        let netns =
            File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
        let procs = OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"))
            .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
        let mut binds = Vec::new();
        for (source, target) in files {
            if !Path::new(target).exists() {
                bail!("{target} does not exist on the node: it is needed as a bind mount target");
            }
            binds.push((cstring(source)?, CString::new(*target)?));
        }
        Ok(Self { netns, procs, binds, hostname: CString::new(hostname)?, controlling_tty: false })
    }

    /// The process's stdin is a pty slave that becomes its controlling terminal.
    pub fn with_controlling_tty(mut self) -> Self {
        self.controlling_tty = true;
        self
    }

    /// Installs the hook that enters the namespaces in the child.
    pub fn apply(self, cmd: &mut tokio::process::Command) {
        // SAFETY: the hook runs between fork and exec and only makes system calls on the
        // descriptors and C strings moved into it (no allocation).
        unsafe {
            cmd.pre_exec(move || {
                join_cgroup(&self.procs)?;
                check(libc::setns(self.netns.as_raw_fd(), libc::CLONE_NEWNET))?;
                check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS))?;
                check(libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                for (source, target) in &self.binds {
                    check(libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ))?;
                }
                let name = self.hostname.as_bytes();
                check(libc::sethostname(name.as_ptr().cast(), name.len()))?;
                check(libc::setsid())?;
                if self.controlling_tty {
                    check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
                }
                Ok(())
            });
        }
    }
}

/// The namespaces of a running container, for exec and probes.
pub struct JoinNamespaces {
    net: File,
    uts: File,
    mnt: File,
    procs: File,
    workdir: CString,
    tty: bool,
}

impl JoinNamespaces {
    pub fn prepare(pid: u32, cgroup: &Path, workdir: &str, tty: bool) -> Result<Self> {
        let open = |ns: &str| {
            File::open(format!("/proc/{pid}/ns/{ns}"))
                .with_context(|| format!("the container (pid {pid}) is gone"))
        };
        Ok(Self {
            net: open("net")?,
            uts: open("uts")?,
            mnt: open("mnt")?,
            procs: OpenOptions::new()
                .write(true)
                .open(cgroup.join("cgroup.procs"))
                .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?,
            workdir: CString::new(workdir)?,
            tty,
        })
    }

    pub fn apply(self, cmd: &mut tokio::process::Command) {
        // SAFETY: as in ContainerNamespaces::apply: system calls on prepared values only.
        unsafe {
            cmd.pre_exec(move || {
                join_cgroup(&self.procs)?;
                check(libc::setns(self.net.as_raw_fd(), libc::CLONE_NEWNET))?;
                check(libc::setns(self.uts.as_raw_fd(), libc::CLONE_NEWUTS))?;
                check(libc::setns(self.mnt.as_raw_fd(), libc::CLONE_NEWNS))?;
                // Entering a mount namespace moves the cwd to its root.
                let _ = libc::chdir(self.workdir.as_ptr());
                check(libc::setsid())?;
                if self.tty {
                    check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
                }
                Ok(())
            });
        }
    }
}

fn join_cgroup(procs: &File) -> std::io::Result<()> {
    // SAFETY: write(2) of a static buffer to an open descriptor.
    if unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// A pseudo terminal: the master side for the runtime, the slave for the process.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

impl Pty {
    pub fn open() -> Result<Self> {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes two descriptors into the given integers; null name/termios/
        // winsize are allowed.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!("openpty: {}", std::io::Error::last_os_error());
        }
        // SAFETY: openpty succeeded, so both are fresh descriptors that we now own.
        Ok(unsafe {
            Self { master: OwnedFd::from_raw_fd(master), slave: OwnedFd::from_raw_fd(slave) }
        })
    }
}

/// Sets a terminal's window size.
pub fn resize(master: &impl AsRawFd, width: u16, height: u16) {
    let size = libc::winsize { ws_row: height, ws_col: width, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, valid for the call.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
}

/// Sends `signal` to the process group led by `pid` (every container is a session leader).
pub fn signal_group(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe { libc::kill(-(pid as libc::pid_t), signal) };
}

/// A process's exit code as Kubernetes reports it: the code, or 128 + the signal.
pub fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
        Err(_) => 128,
    }
}
