//! Running a program (kubectl) on a pseudo terminal the test owns, as a user at a terminal
//! would: the program's stdin, stdout and stderr are the pty slave, which is its controlling
//! terminal (so `-t` works and raw mode is possible); the test types into the master and
//! reads what the program prints. The child is killed on drop.
use std::{
    fs::File,
    io::{Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::wait::eventually;

/// A program running on a test-owned terminal.
pub struct PtyProgram {
    child: Child,
    master: File,
    output: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
}

impl PtyProgram {
    /// Starts `cmd` on a new terminal of `rows` x `cols`.
    pub fn spawn(mut cmd: Command, rows: u16, cols: u16) -> PtyProgram {
        let (mut master, mut slave) = (-1, -1);
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: openpty writes two descriptors into the integers; the winsize is read only.
        let rc = unsafe {
            libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size)
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty succeeded: both are fresh descriptors owned from here on.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        cmd.stdin(Stdio::from(slave.try_clone().expect("dup")))
            .stdout(Stdio::from(slave.try_clone().expect("dup")))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl are async-signal-safe system calls on the child's own fds.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("starting the program on a terminal");
        // The parent's copies of the slave are gone with `cmd`.
        drop(cmd);
        let master = File::from(master);
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut read_side = master.try_clone().expect("dup master");
        let sink = output.clone();
        // Reads until the program's side of the terminal is closed (EIO).
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = read_side.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        PtyProgram { child, master, output, reader: Some(reader) }
    }

    /// Types `text` (use "\r" for Enter, as a terminal sends it).
    pub fn type_text(&mut self, text: &str) {
        self.master.write_all(text.as_bytes()).expect("writing to the terminal");
    }

    /// Everything the program printed so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Waits until the output contains `needle`; panics with the output after `timeout`.
    pub fn expect(&self, needle: &str, timeout: Duration) {
        eventually(&format!("{needle:?} on the terminal"), timeout, || {
            let out = self.output();
            (!out.contains(needle)).then_some(out)
        });
    }

    /// Waits for the program to exit (killing it after `timeout`) and returns its status.
    pub fn wait(mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the program") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "the program did not exit within {timeout:?}; it printed: {}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The master's descriptor (for resizing the terminal with TIOCSWINSZ).
    pub fn resize(&self, rows: u16, cols: u16) {
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads a winsize from the pointer, valid for the call.
        unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    }
}

impl Drop for PtyProgram {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The reader ends when the last slave holder (the program and its children) is gone;
        // do not block on a grandchild that keeps it open.
        if let Some(reader) = self.reader.take()
            && reader.is_finished()
        {
            let _ = reader.join();
        }
    }
}
