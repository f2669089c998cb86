//! Unique names for what tests create. Every name starts with [`PREFIX`] and carries the test
//! process's PID, so leftovers of a dead process can be recognised and swept, and `cargo xtask
//! test` can check that nothing is left.
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every namespace, pin and nft table the tests create (xtask/src/test.rs checks it).
pub const PREFIX: &str = "weirt";

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// `weirt-<pid>-<seq>-<what>`: unique on this machine while the process lives.
pub fn unique(what: &str) -> String {
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}-{}-{seq}-{what}", std::process::id())
}

/// A unique interface name of at most 15 bytes (IFNAMSIZ - 1).
pub fn interface(side: char) -> String {
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let name = format!("wt{}{seq}{side}", std::process::id() % 100_000);
    debug_assert!(name.len() <= 15, "interface name {name} too long");
    name
}

/// The PID a name made by [`unique`] carries.
pub fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.strip_prefix('-')?.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_carry_the_pid_and_differ() {
        let a = unique("x");
        let b = unique("x");
        assert_ne!(a, b);
        assert_eq!(owner_pid(&a), Some(std::process::id()));
        assert_eq!(owner_pid("other-1-2"), None);
    }

    #[test]
    fn interface_names_fit_ifnamsiz() {
        for _ in 0..1000 {
            assert!(interface('a').len() <= 15);
        }
    }
}
