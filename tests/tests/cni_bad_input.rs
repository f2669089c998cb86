//! Bad input gets the documented error code (docs/cni.md), an error object on stdout, a
//! non-zero exit, no panic, and leaves nothing behind.
use weir_tests::{
    cni::{Attachment, Node, TempDir, weir_cni},
    names,
    netns::Netns,
    privileged::require_root,
};

/// (what, stdin, environment, expected code)
type Case = (&'static str, String, Vec<(&'static str, String)>, u64);

#[test]
fn cni_bad_input_gets_its_error_code_and_leaves_nothing() {
    require_root();
    let node = Node::new().unwrap();
    let pod = Netns::new("pod").unwrap();
    let network = "bad";
    let config = node.config("1.0.0", network, &["10.129.0.0/24"]).to_string();
    let good = Attachment::new(names::unique("ctr"), &pod);
    let not_a_netns = TempDir::new("not-netns").unwrap();
    let regular_file = not_a_netns.path().join("file");
    std::fs::write(&regular_file, b"x").unwrap();

    let bin = weir_cni();
    let id = good.container_id.as_str();
    let netns = good.netns.to_str().unwrap();
    let file = regular_file.to_str().unwrap();
    let huge = format!("{{\"cniVersion\":\"1.0.0\",\"name\":\"{}\"}}", "x".repeat(10 << 20));
    let unknown_version = config.replace("\"1.0.0\"", "\"0.9.9\"");
    // (case, stdin, env, expected code)
    let full = |ifname: &str, ns: &str| -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", "ADD".to_string()),
            ("CNI_CONTAINERID", id.to_string()),
            ("CNI_NETNS", if ns.is_empty() { netns.to_string() } else { ns.to_string() }),
            ("CNI_IFNAME", ifname.to_string()),
        ]
    };
    let cases: Vec<Case> = vec![
        ("broken JSON", "{\"cniVersion\": \"1.0.0\", ".into(), full("eth0", ""), 6),
        ("not an object", "[1, 2]".into(), full("eth0", ""), 6),
        ("10 MB of stdin", huge, full("eth0", ""), 6),
        ("unknown cniVersion", unknown_version, full("eth0", ""), 1),
        ("ifname of 16 bytes", config.clone(), full("abcdefghijklmnop", ""), 4),
        ("ifname with a slash", config.clone(), full("eth/0", ""), 4),
        ("CNI_NETNS a regular file", config.clone(), full("eth0", file), 4),
        (
            "CNI_NETNS missing path",
            config.clone(),
            full("eth0", "/run/netns/weirt-does-not-exist"),
            3,
        ),
        ("no CNI_COMMAND", config.clone(), full("eth0", "")[1..].to_vec(), 4),
        (
            "unknown CNI_COMMAND",
            config.clone(),
            {
                let mut e = full("eth0", "");
                e[0].1 = "ATTACH".into();
                e
            },
            4,
        ),
        (
            "no CNI_CONTAINERID",
            config.clone(),
            {
                let mut e = full("eth0", "");
                e.remove(1);
                e
            },
            4,
        ),
        (
            "invalid CNI_CONTAINERID",
            config.clone(),
            {
                let mut e = full("eth0", "");
                e[1].1 = "../etc".into();
                e
            },
            4,
        ),
        (
            "no CNI_NETNS on ADD",
            config.clone(),
            {
                let mut e = full("eth0", "");
                e.remove(2);
                e
            },
            4,
        ),
        ("no CNI_IFNAME", config.clone(), full("eth0", "")[..3].to_vec(), 4),
        (
            "static IPs requested",
            config.replace("\"type\"", "\"runtimeConfig\":{\"ips\":[\"10.129.0.9/24\"]},\"type\""),
            full("eth0", ""),
            2,
        ),
        ("invalid subnet", config.replace("10.129.0.0/24", "10.129.0.0/99"), full("eth0", ""), 7),
        ("bad network name", config.replace("\"bad\"", "\"-bad\""), full("eth0", ""), 7),
    ];
    let mut failures = Vec::new();
    for (case, stdin, env, want) in &cases {
        // Bad env cases clear CNI_COMMAND etc. through `exec`'s cleared environment: pass
        // exactly the variables of the case.
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let has_command = env.iter().any(|(k, _)| *k == "CNI_COMMAND");
        let mut env_all = env.clone();
        if !has_command {
            env_all.push(("CNI_COMMAND", ""));
        }
        let run = node.exec(bin, "ADD", None, stdin.as_bytes(), &env_all).unwrap();
        match run.error_code() {
            Ok(code) if code == *want => {}
            Ok(code) => failures.push(format!("{case}: code {code}, want {want}: {}", run.stdout)),
            Err(err) => failures.push(format!("{case}: {err:#}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    node.assert_clean(network).unwrap();

    // A corrupt IPAM store is an I/O error (5), reported instead of being reset.
    let store = node.data_dir.path().join(network);
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(store.join("state.json"), b"{\"version\":1,\"alloc").unwrap();
    let run = node.exec(bin, "ADD", Some(&good), config.as_bytes(), &[]).unwrap();
    assert_eq!(run.error_code().unwrap(), 5, "{}", run.stdout);
    assert!(run.stdout.contains("corrupt"), "{}", run.stdout);
    std::fs::remove_file(store.join("state.json")).unwrap();
    assert!(pod.ip(&["link", "show", "eth0"]).is_err(), "nothing was wired in the pod");
}

/// An ADD that fails half-way (the pod already has the interface name, or already has a default
/// route) rolls back what it made: no link, route or reservation is left, and the pod's own
/// configuration is untouched.
#[test]
fn cni_failed_add_rolls_back_everything() {
    require_root();
    let node = Node::new().unwrap();
    let config = node.config("1.0.0", "rollback", &["10.138.0.0/24"]);

    let taken = Netns::new("taken").unwrap();
    // (No dummy driver on every kernel: a veth pair inside the pod stands in.)
    taken.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]).unwrap();
    let a = Attachment::new(names::unique("ctr"), &taken);
    let run = node.weir("ADD", Some(&a), &config).unwrap();
    assert_eq!(run.error_code().unwrap(), 101, "{}", run.stdout);
    node.assert_clean("rollback").unwrap();
    assert!(
        taken.ip(&["-o", "link", "show", "eth0"]).unwrap().contains("eth0p"),
        "pod's eth0 kept"
    );

    let routed = Netns::new("routed").unwrap();
    routed.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up0p"]).unwrap();
    routed.ip(&["link", "set", "up0", "up"]).unwrap();
    routed.ip(&["route", "add", "default", "dev", "up0"]).unwrap();
    let b = Attachment::new(names::unique("ctr"), &routed);
    let run = node.weir("ADD", Some(&b), &config).unwrap();
    assert_eq!(run.error_code().unwrap(), 5, "{}", run.stdout);
    assert!(run.stdout.contains("default route"), "{}", run.stdout);
    node.assert_clean("rollback").unwrap();
    assert!(routed.ip(&["link", "show", "eth0"]).is_err(), "eth0 removed again");
    assert!(routed.ip(&["route", "show", "default"]).unwrap().contains("up0"));
}

/// While another process holds the IPAM store's lock past `ipam.lockTimeoutSeconds`, ADD
/// answers 11 (try again later) and leaves nothing; once it is free, ADD works.
#[test]
fn cni_locked_store_answers_try_again_later() {
    require_root();
    let node = Node::new().unwrap();
    let mut config = node.config("1.0.0", "locked", &["10.139.0.0/24"]);
    config["ipam"]["lockTimeoutSeconds"] = serde_json::json!(0.3);
    let store = node.data_dir.path().join("locked");
    std::fs::create_dir_all(&store).unwrap();
    let lock = std::fs::File::create(store.join("lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) }, 0);
    let pod = Netns::new("pod").unwrap();
    let a = Attachment::new(names::unique("ctr"), &pod);
    let run = node.weir("ADD", Some(&a), &config).unwrap();
    assert_eq!(run.error_code().unwrap(), 11, "{}", run.stdout);
    node.assert_clean("locked").unwrap();
    drop(lock);
    node.weir("ADD", Some(&a), &config).unwrap().result().unwrap();
    node.weir("DEL", Some(&a), &config).unwrap().expect_ok().unwrap();
    node.assert_clean("locked").unwrap();
}
