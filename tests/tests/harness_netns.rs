//! The harness's own guarantees: namespaces and veths are real, code runs inside them, and they
//! are removed on drop, also when the test panics.
use std::path::Path;

use weir_tests::{
    netns::{Netns, Veth},
    privileged::require_root,
};

#[test]
fn harness_namespace_is_removed_on_drop_and_on_panic() {
    require_root();
    let ns = Netns::new("drop").unwrap();
    let path = ns.path();
    assert!(path.exists());
    drop(ns);
    assert!(!path.exists(), "{} left behind", path.display());

    let path = std::panic::catch_unwind(|| {
        let ns = Netns::new("panic").unwrap();
        std::fs::write("/tmp/weirt-harness-panic-path", ns.path().to_string_lossy().as_bytes())
            .unwrap();
        panic!("simulated test failure");
    });
    assert!(path.is_err());
    let left = std::fs::read_to_string("/tmp/weirt-harness-panic-path").unwrap();
    std::fs::remove_file("/tmp/weirt-harness-panic-path").unwrap();
    assert!(!Path::new(&left).exists(), "{left} left behind after a panic");
}

#[test]
fn harness_runs_code_inside_the_namespace_with_a_veth_to_its_peer() {
    require_root();
    let a = Netns::new("a").unwrap();
    let b = Netns::new("b").unwrap();
    let veth = Veth::between(&a, &b).unwrap();
    a.ip(&["addr", "add", "10.201.0.1/30", "dev", &veth.a]).unwrap();
    b.ip(&["addr", "add", "10.201.0.2/30", "dev", &veth.b]).unwrap();
    // The interface exists in `a`, and only there: not in the root namespace.
    // /proc/thread-self/net follows the thread's network namespace (/sys/class/net would not).
    let inside = a.run(|| std::fs::read_to_string("/proc/thread-self/net/dev").unwrap()).unwrap();
    let links: Vec<&str> =
        inside.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
    assert_eq!(links.len(), 2, "lo and the veth end: {links:?}");
    assert!(links.contains(&veth.a.as_str()));
    assert!(!Path::new(&format!("/sys/class/net/{}", veth.a)).exists());
    // A real UDP datagram crosses the veth.
    let receiver = b.run(|| std::net::UdpSocket::bind("10.201.0.2:9999").unwrap()).unwrap();
    a.run(|| {
        let sender = std::net::UdpSocket::bind("10.201.0.1:0").unwrap();
        sender.send_to(b"x", "10.201.0.2:9999").unwrap();
    })
    .unwrap();
    receiver.set_read_timeout(Some(std::time::Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 4];
    let (n, from) = receiver.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from.ip().to_string().as_str()), (&b"x"[..], "10.201.0.1"));
}
