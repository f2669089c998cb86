//! Opening the container's network namespace and running code inside it.
//!
//! Contract: [`open`] checks that `CNI_NETNS` really is a network namespace (missing path: code
//! 3; something else: code 4). [`run_in`] enters it only on a dedicated, short-lived
//! `std::thread` and restores the thread's namespace before the thread ends; the rest of the
//! process stays in the namespace it was started in (the node's).
use std::{fs::File, os::fd::AsRawFd, path::Path};

use crate::error::CniError;

/// `NS_GET_NSTYPE`: _IO(0xb7, 0x3).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

pub fn open(path: &Path) -> Result<File, CniError> {
    let file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            CniError::UnknownContainer {
                msg: format!(
                    "CNI_NETNS {} does not exist: the container is gone or not started",
                    path.display()
                ),
            }
        } else {
            CniError::io(format!("opening CNI_NETNS {}", path.display()), e)
        }
    })?;
    // SAFETY: an ioctl without argument on a descriptor we own.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(CniError::InvalidEnv {
            msg: format!(
                "CNI_NETNS {} is not a network namespace; pass /proc/<pid>/ns/net or a /run/netns/ entry",
                path.display()
            ),
        });
    }
    Ok(file)
}

fn setns(ns: &File) -> std::io::Result<()> {
    // SAFETY: `ns` is an open namespace file; setns changes only the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread inside the namespace `ns`.
pub fn run_in<R: Send>(
    ns: &File,
    f: impl FnOnce() -> Result<R, CniError> + Send,
) -> Result<R, CniError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let original = File::open("/proc/thread-self/ns/net")
                    .map_err(|e| CniError::io("opening this thread's network namespace", e))?;
                setns(ns)
                    .map_err(|e| CniError::io("entering the container's network namespace", e))?;
                let result = f();
                setns(&original)
                    .map_err(|e| CniError::io("leaving the container's network namespace", e))?;
                result
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
