//! SIGKILL of weir-cni at points inside ADD (the test-only hook WEIR_CNI_TEST_KILL_AT), then DEL
//! or GC: zero leaked addresses, links or routes. A GC keeps what is still valid.
use serde_json::json;
use weir_tests::{
    cni::{Attachment, Node, ping, weir_cni},
    names,
    netns::Netns,
    privileged::require_root,
};

const KILL_POINTS: [&str; 3] = ["after-reservation", "after-veth", "after-routes"];

fn crashed_add(node: &Node, attachment: &Attachment, config: &serde_json::Value, point: &str) {
    let run = node
        .exec(
            weir_cni(),
            "ADD",
            Some(attachment),
            config.to_string().as_bytes(),
            &[("WEIR_CNI_TEST_KILL_AT", point)],
        )
        .unwrap();
    assert_eq!(run.exit_code, None, "{point}: the plugin should have been killed: {}", run.stdout);
    assert_eq!(node.reservations(config["name"].as_str().unwrap()).unwrap().len(), 1, "{point}");
}

#[test]
fn cni_crash_inside_add_then_del_leaks_nothing() {
    require_root();
    let node = Node::new().unwrap();
    let config = node.config("1.0.0", "crash-del", &["10.131.0.0/24"]);
    for point in KILL_POINTS {
        let pod = Netns::new("pod").unwrap();
        let a = Attachment::new(names::unique("ctr"), &pod);
        crashed_add(&node, &a, &config, point);
        if point != "after-reservation" {
            assert_eq!(node.links().unwrap().len(), 1, "{point}: the veth exists before DEL");
        }
        node.weir("DEL", Some(&a), &config).unwrap().expect_ok().unwrap();
        node.assert_clean("crash-del").unwrap();
        // The runtime retries: the attachment can be made again.
        node.weir("ADD", Some(&a), &config).unwrap().result().unwrap();
        node.weir("DEL", Some(&a), &config).unwrap().expect_ok().unwrap();
        node.assert_clean("crash-del").unwrap();
    }
}

#[test]
fn cni_crash_inside_add_then_gc_leaks_nothing_and_keeps_valid_attachments() {
    require_root();
    let node = Node::new().unwrap();
    let mut config = node.config("1.1.0", "crash-gc", &["10.132.0.0/24"]);
    let keeper_pod = Netns::new("keeper").unwrap();
    let keeper = Attachment::new(names::unique("keeper"), &keeper_pod);
    node.weir("ADD", Some(&keeper), &config).unwrap().result().unwrap();
    let pods: Vec<Netns> = KILL_POINTS.iter().map(|_| Netns::new("pod").unwrap()).collect();
    for (point, pod) in KILL_POINTS.iter().zip(&pods) {
        let a = Attachment::new(names::unique("ctr"), pod);
        let run = node
            .exec(
                weir_cni(),
                "ADD",
                Some(&a),
                config.to_string().as_bytes(),
                &[("WEIR_CNI_TEST_KILL_AT", point)],
            )
            .unwrap();
        assert_eq!(run.exit_code, None, "{point}: not killed: {}", run.stdout);
    }
    assert_eq!(node.reservations("crash-gc").unwrap().len(), 4);
    // GC without the list of valid attachments is refused and releases nothing.
    assert_eq!(node.weir("GC", None, &config).unwrap().error_code().unwrap(), 7);
    assert_eq!(node.reservations("crash-gc").unwrap().len(), 4);
    config["cni.dev/valid-attachments"] =
        json!([{ "containerID": keeper.container_id, "ifname": keeper.ifname }]);
    node.weir("GC", None, &config).unwrap().expect_ok().unwrap();
    assert_eq!(node.reservations("crash-gc").unwrap().len(), 1, "only the keeper is left");
    assert_eq!(node.links().unwrap().len(), 1, "only the keeper's veth is left");
    ping(&keeper_pod, "169.254.1.1").unwrap();
    // GC before 1.1.0 is refused.
    let mut old = config.clone();
    old["cniVersion"] = json!("1.0.0");
    assert_eq!(node.weir("GC", None, &old).unwrap().error_code().unwrap(), 1);
    config["cni.dev/valid-attachments"] = json!([]);
    node.weir("GC", None, &config).unwrap().expect_ok().unwrap();
    node.assert_clean("crash-gc").unwrap();
}
