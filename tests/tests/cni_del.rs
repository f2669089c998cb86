//! DEL is idempotent and best-effort; ADD refuses an attachment that already exists.
use weir_tests::{
    cni::{Attachment, Node, ping, result_ip},
    names,
    netns::Netns,
    privileged::require_root,
};

#[test]
fn cni_del_three_times_after_netns_gone_and_of_unknown_container_succeeds() {
    require_root();
    let node = Node::new().unwrap();
    let config = node.config("1.1.0", "del", &["10.126.0.0/24"]);

    let pod = Netns::new("pod").unwrap();
    let a = Attachment::new(names::unique("ctr"), &pod);
    node.weir("ADD", Some(&a), &config).unwrap().result().unwrap();
    for round in 1..=3 {
        let del = node.weir("DEL", Some(&a), &config).unwrap();
        assert!(del.ok(), "DEL #{round}: {}", del.stdout);
        assert!(del.stdout.is_empty(), "DEL prints nothing: {}", del.stdout);
    }
    node.assert_clean("del").unwrap();

    // The pod's namespace is deleted before DEL (the veth pair went with it).
    let gone = Netns::new("gone").unwrap();
    let b = Attachment::new(names::unique("ctr"), &gone);
    node.weir("ADD", Some(&b), &config).unwrap().result().unwrap();
    drop(gone);
    node.weir("DEL", Some(&b), &config).unwrap().expect_ok().unwrap();
    // Also without CNI_NETNS, as runtimes do when the namespace is gone.
    let no_netns = Attachment { netns: "".into(), ..b.clone() };
    node.weir("DEL", Some(&no_netns), &config).unwrap().expect_ok().unwrap();
    node.assert_clean("del").unwrap();

    let unknown = Attachment::new(names::unique("never-added"), &pod);
    node.weir("DEL", Some(&unknown), &config).unwrap().expect_ok().unwrap();
    // DEL on a network whose store was never created.
    let other = node.config("1.1.0", "never-used", &["10.127.0.0/24"]);
    node.weir("DEL", Some(&unknown), &other).unwrap().expect_ok().unwrap();
    node.assert_clean("del").unwrap();
}

#[test]
fn cni_add_twice_is_refused_and_the_first_attachment_stays_intact() {
    require_root();
    let node = Node::new().unwrap();
    let (pod, peer) = (Netns::new("pod").unwrap(), Netns::new("peer").unwrap());
    for version in ["0.3.1", "1.1.0"] {
        let config = node.config(version, "twice", &["10.128.0.0/24"]);
        let a = Attachment::new(names::unique("ctr"), &pod);
        let p = Attachment::new(names::unique("peer"), &peer);
        let first = node.weir("ADD", Some(&a), &config).unwrap().result().unwrap();
        let peer_result = node.weir("ADD", Some(&p), &config).unwrap().result().unwrap();
        let second = node.weir("ADD", Some(&a), &config).unwrap();
        assert_eq!(second.error_code().unwrap(), 101, "{}", second.stdout);
        // The first attachment still works and still holds its address.
        ping(&pod, "169.254.1.1").unwrap();
        ping(&peer, &result_ip(&first, false).unwrap()).unwrap();
        assert_eq!(node.reservations("twice").unwrap().len(), 2);
        node.weir("DEL", Some(&a), &config).unwrap().expect_ok().unwrap();
        node.weir("DEL", Some(&p), &config).unwrap().expect_ok().unwrap();
        drop(peer_result);
        node.assert_clean("twice").unwrap();
    }
}

/// Processes whose environment names this container (the plugin and the child DEL leaves to
/// finish the kernel's teardown).
fn processes_of(container_id: &str) -> Vec<u32> {
    let needle = format!("CNI_CONTAINERID={container_id}\0");
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .collect()
}

#[test]
fn cni_del_returns_with_the_pair_gone_and_its_teardown_process_ends() {
    require_root();
    let node = Node::new().unwrap();
    let config = node.config("1.1.0", "unlisted", &["10.129.0.0/24"]);
    let pod = Netns::new("pod").unwrap();
    let a = Attachment::new(names::unique("ctr"), &pod);
    for round in 1..=3 {
        node.weir("ADD", Some(&a), &config).unwrap().result().unwrap();
        ping(&pod, "169.254.1.1").unwrap();
        let del = node.weir("DEL", Some(&a), &config).unwrap();
        assert!(del.ok(), "DEL #{round}: {} {}", del.stdout, del.stderr);
        // Nothing of the pair is left when DEL returns: not the host end, its route or the
        // address, and not the pod's end either. The next round's ADD reuses the names at once.
        node.assert_clean("unlisted").unwrap();
        assert!(
            pod.ip(&["link", "show", "eth0"]).is_err(),
            "round {round}: eth0 is left in the pod"
        );
    }
    // The child that waits out the kernel's teardown ends on its own, soon (bounded wait).
    let mut left = processes_of(&a.container_id);
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        left = processes_of(&a.container_id);
    }
    assert!(
        left.is_empty(),
        "processes of {} still running 5 s after DEL: {left:?}",
        a.container_id
    );
}
