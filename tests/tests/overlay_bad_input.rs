//! `weir agent`'s routing flags: bad values are refused before anything starts, with a message
//! that says what to pass; `--cleanup` removes everything routing made in a namespace, IPv4 and
//! IPv6 (and only that).
use weir_tests::{
    apiserver::weir_binary, names, netns::Netns, privileged::require_root, process::command_in,
};

fn agent(args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(weir_binary())
        .args(["agent", "--node-name", "node-a"])
        .args(args)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn overlay_bad_flags_say_what_to_pass() {
    // (flags, exit code: 2 from the flag parser, 64 from the configuration check, message)
    let cases: [(&[&str], i32, &str); 7] = [
        (&["--overlay", "geneve"], 2, "use vxlan, native or none"),
        (&["--cluster-cidr", "10.244.1.1/16"], 2, "did you mean 10.244.0.0/16"),
        (
            &["--cluster-cidr", "10.244.0.0/16,fd00:10:244::1/56"],
            2,
            "did you mean fd00:10:244::/56",
        ),
        (&["--cluster-cidr", "10.244.0.0/16,10.245.0.0/16"], 64, "one IPv4 and one IPv6"),
        (&["--masquerade", "true"], 64, "needs --cluster-cidr"),
        (
            &["--nft-table-nat", "a table", "--cluster-cidr", "10.244.0.0/16"],
            64,
            "not a valid table name",
        ),
        (&["--overlay-uplink", "eth0/x"], 64, "--overlay-uplink"),
    ];
    for (args, want_code, want) in cases {
        let (code, err) = agent(args);
        assert_eq!(code, Some(want_code), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {want:?} in {err}");
    }
}

#[test]
fn overlay_cleanup_removes_only_what_routing_made() {
    require_root();
    let node = Netns::new("cleanup").unwrap();
    let peer = Netns::new("cleanup-peer").unwrap();
    let veth = weir_tests::netns::Veth::between(&node, &peer).unwrap();
    node.ip(&["addr", "add", "10.63.0.11/24", "dev", &veth.a]).unwrap();
    node.ip(&[
        "link",
        "add",
        "weir.vxlan",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "8472",
        "dev",
        &veth.a,
    ])
    .unwrap();
    node.ip(&["route", "add", "10.244.7.0/24", "via", "10.63.0.12", "proto", "87"]).unwrap();
    node.ip(&["route", "add", "10.244.8.0/24", "via", "10.63.0.12"]).unwrap();
    node.ip(&["addr", "add", "fd00:63::11/64", "dev", &veth.a, "nodad"]).unwrap();
    node.ip(&["route", "add", "fd00:10:244:7::/64", "via", "fd00:63::12", "proto", "87"]).unwrap();
    node.ip(&["route", "add", "fd00:10:244:8::/64", "via", "fd00:63::12"]).unwrap();
    let table = names::unique("nat");
    let nft = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(["netns", "exec", node.name(), "nft"])
            .args(args)
            .output()
            .unwrap()
    };
    assert!(nft(&["add", "table", "ip", &table]).status.success());
    assert!(nft(&["add", "table", "ip6", &table]).status.success());

    let out = command_in(&node, None, &weir_binary().to_string_lossy())
        .unwrap()
        .args(["agent", "--cleanup", "--nft-table-nat", &table])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(node.ip(&["link", "show", "weir.vxlan"]).is_err(), "the device is gone");
    let routes = node.ip(&["-4", "route", "show"]).unwrap();
    assert!(!routes.contains("10.244.7.0/24"), "weir's route is gone: {routes}");
    assert!(routes.contains("10.244.8.0/24"), "another owner's route stays: {routes}");
    let routes = node.ip(&["-6", "route", "show"]).unwrap();
    assert!(!routes.contains("fd00:10:244:7::/64"), "weir's IPv6 route is gone: {routes}");
    assert!(routes.contains("fd00:10:244:8::/64"), "another owner's route stays: {routes}");
    assert!(!nft(&["list", "table", "ip", &table]).status.success(), "the table is gone");
    assert!(!nft(&["list", "table", "ip6", &table]).status.success(), "the ip6 table is gone");
    // Again: nothing left to remove is fine.
    let again = command_in(&node, None, &weir_binary().to_string_lossy())
        .unwrap()
        .args(["agent", "--cleanup", "--nft-table-nat", &table])
        .output()
        .unwrap();
    assert!(again.status.success(), "{again:?}");
}
