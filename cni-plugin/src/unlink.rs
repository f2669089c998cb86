//! Deleting a pod's veth pair without waiting for the kernel's device teardown.
//!
//! A veth deletion (`RTM_DELLINK`) returns to its caller only after the kernel has freed the
//! devices: once both ends are unlisted (names free, addresses, routes and neighbours gone,
//! `RTM_DELLINK` announced), `netdev_run_todo` still waits for an RCU barrier before it frees
//! them. Measured on the 2-core test VM, that barrier is about 18 of the 22 ms a deletion takes,
//! and it is most of a CNI DEL (docs/benchmarks.md, "CNI").
//!
//! [`delete_unlisted`] lets a short-lived child process make the request and wait out the
//! barrier, while the plugin returns as soon as the kernel announces the link gone: from then
//! on nothing of the pair is visible, and a new ADD may reuse its name and addresses. The child
//! inherits only what the plugin holds at that point (no IPAM lock: DEL takes it afterwards),
//! points its standard streams at /dev/null first (the runtime reads the plugin's stdout until
//! EOF, so the child must not hold it) and exits when the kernel answers, within tens of ms.
//! After the plugin exits, the child is reaped by init or by the runtime when it is a
//! subreaper (containerd and CRI-O reap adopted children).
//!
//! Anything unexpected (no fork, no pidfd, no announcement) falls back to the plain synchronous
//! deletion or to the child's own answer, so the result is never a guess.
use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use crate::netlink::{NLMSG_HDRLEN, RTM_DELLINK, Socket};

/// How long the plugin waits for the kernel to unlist the link before it reports an error.
const UNLIST_TIMEOUT: Duration = Duration::from_secs(10);
/// The child's exit status when it could not send the request at all.
const EXIT_SEND_FAILED: i32 = 255;

/// Deletes interface `name` of `node`'s namespace (a veth takes its peer with it) and returns
/// once the kernel has unlisted it; `Ok(false)` when there was no such interface.
pub fn delete_unlisted(node: &mut Socket, name: &str) -> io::Result<bool> {
    let Some(link) = node.link(name)? else { return Ok(false) };
    // Subscribed before the request, so the announcement cannot be missed.
    let events = Socket::subscribe_links()?;
    let request = node.delete_link_request(link.index);
    let devnull = File::options().read(true).write(true).open("/dev/null")?;
    let Some(child) = fork_request(node, &request, &devnull) else {
        return node.delete_link(name);
    };
    let pidfd = match pidfd_open(child) {
        Ok(fd) => fd,
        Err(_) => return exit_result(wait_child(child)),
    };
    let deadline = Instant::now() + UNLIST_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the kernel did not remove {name} within {}s", UNLIST_TIMEOUT.as_secs()),
            ));
        }
        let (announced, exited) = poll_two(&events, &pidfd, left)?;
        if exited {
            return exit_result(wait_child(child));
        }
        if announced {
            match events
                .drain_announcements(|kind, index| kind == RTM_DELLINK && index == link.index)
            {
                Ok(true) => {
                    reap_if_done(child);
                    return Ok(true);
                }
                Ok(false) => {}
                // The announcements overflowed the socket (a busy node): ask directly.
                Err(err) if err.raw_os_error() == Some(libc::ENOBUFS) => {
                    if node.link_by_index(link.index)?.is_none() {
                        reap_if_done(child);
                        return Ok(true);
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// Forks a child that sends `request` on `node`'s socket and exits with the kernel's errno
/// (0 on success). `None` when fork failed.
fn fork_request(node: &Socket, request: &[u8], devnull: &File) -> Option<libc::pid_t> {
    let mut answer = [0u8; 512];
    // SAFETY: fork(2). In the child only async-signal-safe system calls run (dup2, sendto, recv,
    // _exit) on memory prepared before the fork; nothing allocates, locks or unwinds.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return None;
    }
    if pid > 0 {
        return Some(pid);
    }
    // The child.
    // SAFETY: see above; every pointer and length refers to buffers owned by this frame.
    unsafe {
        for fd in 0..3 {
            libc::dup2(devnull.as_raw_fd(), fd);
        }
        let fd = node.raw_fd();
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        let sent = libc::sendto(
            fd,
            request.as_ptr().cast(),
            request.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        );
        if sent < 0 {
            libc::_exit(EXIT_SEND_FAILED);
        }
        let seq = u32::from_ne_bytes([request[8], request[9], request[10], request[11]]);
        // Bounded: the kernel answers every request once; other datagrams are not expected on
        // this socket, but a few are tolerated.
        for _ in 0..16 {
            let n = libc::recv(fd, answer.as_mut_ptr().cast(), answer.len(), 0);
            if n < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                libc::_exit(EXIT_SEND_FAILED);
            }
            let n = n as usize;
            if n < NLMSG_HDRLEN + 4 {
                continue;
            }
            let kind = u16::from_ne_bytes([answer[4], answer[5]]);
            let answer_seq = u32::from_ne_bytes([answer[8], answer[9], answer[10], answer[11]]);
            if kind == crate::netlink::NLMSG_ERROR && answer_seq == seq {
                let errno = i32::from_ne_bytes([answer[16], answer[17], answer[18], answer[19]]);
                libc::_exit((-errno).clamp(0, 254));
            }
        }
        libc::_exit(EXIT_SEND_FAILED)
    }
}

/// The deletion's result from the child's exit status.
fn exit_result(status: io::Result<i32>) -> io::Result<bool> {
    match status? {
        0 => Ok(true),
        libc::ENODEV => Ok(false),
        EXIT_SEND_FAILED => {
            Err(io::Error::other("the deleting process could not reach the kernel"))
        }
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Waits for the child and returns its exit code.
fn wait_child(pid: libc::pid_t) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid(2) on our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        Err(io::Error::other("the deleting process was killed"))
    }
}

/// Reaps the child when it has exited already; otherwise it is left to finish on its own.
fn reap_if_done(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: non-blocking waitpid(2) on our own child.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
}

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) with no flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Polls the announcement socket and the child's pidfd; returns (announcement readable, child
/// exited).
fn poll_two(events: &Socket, pidfd: &OwnedFd, timeout: Duration) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd { fd: events.raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    let millis = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: poll(2) on two valid pollfd entries.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, millis) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok((false, false))
        } else {
            Err(err)
        };
    }
    Ok((fds[0].revents != 0, fds[1].revents != 0))
}
