//! Preconditions of privileged tests. They fail loudly: a privileged test that silently skips
//! would make CI green without testing anything.

/// Panics unless the process runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, eBPF); run it through `cargo xtask test` as root"
    );
}
