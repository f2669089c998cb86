//! weir-cni's whole lifecycle for every supported spec version, exec'd as a runtime does:
//! (STATUS) -> ADD -> result valid for the version -> ping the gateway and a second pod ->
//! CHECK -> DEL -> no link, route or reservation left. Versions run in parallel, each on its own
//! node namespace.
use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use weir_tests::{
    cni::{Attachment, Node, ping, result_ip},
    names,
    netns::Netns,
    privileged::require_root,
};

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn at_least(version: &str, min: &str) -> bool {
    let parse = |v: &str| v.split('.').map(|p| p.parse::<u32>().unwrap()).collect::<Vec<_>>();
    parse(version) >= parse(min)
}

/// Checks an ADD result against the version's result format.
fn validate_result(result: &Value, version: &str, attachment: &Attachment, v6: bool) -> Result<()> {
    ensure!(result["cniVersion"] == version, "cniVersion of the result: {}", result["cniVersion"]);
    let interfaces = result["interfaces"].as_array().context("interfaces")?;
    ensure!(interfaces.len() == 2, "two interfaces expected: {result}");
    ensure!(interfaces[0]["name"].as_str().is_some_and(|n| n.starts_with("weir")));
    ensure!(interfaces[0].get("sandbox").is_none(), "host side has no sandbox");
    ensure!(interfaces[1]["name"] == attachment.ifname.as_str());
    ensure!(interfaces[1]["sandbox"] == attachment.netns.to_string_lossy().as_ref());
    ensure!(interfaces[1]["mac"].as_str().is_some_and(|m| m.len() == 17));
    let ips = result["ips"].as_array().context("ips")?;
    ensure!(ips.len() == if v6 { 2 } else { 1 }, "ips: {result}");
    for ip in ips {
        let address = ip["address"].as_str().context("address")?;
        let is_v6 = address.contains(':');
        ensure!(address.ends_with(if is_v6 { "/128" } else { "/32" }), "{address}");
        ensure!(ip["gateway"] == if is_v6 { "fe80::1" } else { "169.254.1.1" });
        ensure!(ip["interface"] == 1);
        if at_least(version, "1.0.0") {
            ensure!(ip.get("version").is_none(), "1.x results carry no ip version: {ip}");
        } else {
            ensure!(
                ip["version"] == if is_v6 { "6" } else { "4" },
                "0.x results need version: {ip}"
            );
        }
    }
    let routes = result["routes"].as_array().context("routes")?;
    ensure!(routes.iter().any(|r| r["dst"] == "0.0.0.0/0" && r["gw"] == "169.254.1.1"));
    ensure!(result["dns"].is_object());
    Ok(())
}

fn with_prev(config: &Value, prev: &Value) -> Value {
    let mut config = config.clone();
    config["prevResult"] = prev.clone();
    config
}

fn lifecycle(version: &str, subnets: &[&str]) -> Result<()> {
    let node = Node::new()?;
    let network = "lifecycle";
    let config = node.config(version, network, subnets);
    let v6 = subnets.len() == 2;
    let status = node.weir("STATUS", None, &config)?;
    if at_least(version, "1.1.0") {
        status.expect_ok()?;
    } else {
        ensure!(status.error_code()? == 1, "STATUS before 1.1.0 is refused with 1");
    }
    let (pod_a, pod_b) = (Netns::new("pod-a")?, Netns::new("pod-b")?);
    let a = Attachment::new(names::unique("ctr-a"), &pod_a);
    let b = Attachment::new(names::unique("ctr-b"), &pod_b);
    let result_a = node.weir("ADD", Some(&a), &config)?.result()?;
    validate_result(&result_a, version, &a, v6).with_context(|| format!("result {result_a}"))?;
    let result_b = node.weir("ADD", Some(&b), &config)?.result()?;
    validate_result(&result_b, version, &b, v6)?;

    ping(&pod_a, "169.254.1.1")?;
    ping(&pod_a, &result_ip(&result_b, false).context("pod b has an IPv4 address")?)?;
    ping(&pod_b, &result_ip(&result_a, false).context("pod a has an IPv4 address")?)?;
    if v6 {
        ping(&pod_a, "fe80::1%eth0")?;
        ping(&pod_a, &result_ip(&result_b, true).context("pod b has an IPv6 address")?)?;
    }

    let check = node.weir("CHECK", Some(&a), &with_prev(&config, &result_a))?;
    if at_least(version, "0.4.0") {
        check.expect_ok()?;
        // CHECK notices a broken attachment: remove the pod's default route.
        pod_b.ip(&["-4", "route", "del", "default"])?;
        let broken = node.weir("CHECK", Some(&b), &with_prev(&config, &result_b))?;
        ensure!(broken.error_code()? == 100, "CHECK of a broken attachment: {}", broken.stdout);
    } else {
        ensure!(check.error_code()? == 1, "CHECK before 0.4.0 is refused with 1");
    }

    node.weir("DEL", Some(&a), &with_prev(&config, &result_a))?.expect_ok()?;
    node.weir("DEL", Some(&b), &config)?.expect_ok()?;
    node.assert_clean(network)?;
    for pod in [&pod_a, &pod_b] {
        ensure!(pod.ip(&["link", "show", "eth0"]).is_err(), "eth0 left in {}", pod.name());
    }
    Ok(())
}

#[test]
fn cni_lifecycle_every_version() {
    require_root();
    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = VERSIONS
            .iter()
            .map(|v| (v, scope.spawn(move || lifecycle(v, &["10.123.0.0/24"]))))
            .collect();
        handles
            .into_iter()
            .filter_map(|(v, h)| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{v}: {e:#}")),
                Err(_) => Some(format!("{v}: panicked")),
            })
            .collect()
    });
    assert!(failures.is_empty(), "failed versions:\n{}", failures.join("\n"));
}

#[test]
fn cni_lifecycle_dual_stack() {
    require_root();
    lifecycle("1.1.0", &["10.124.0.0/24", "fd00:124::/120"]).unwrap();
    lifecycle("0.3.1", &["10.124.0.0/24", "fd00:124::/120"]).unwrap();
}

#[test]
fn cni_mtu_from_config_and_dns_passed_through() {
    require_root();
    let node = Node::new().unwrap();
    let pod = Netns::new("pod").unwrap();
    let mut config = node.config("1.0.0", "mtu", &["10.125.0.0/24"]);
    config["mtu"] = json!(1400);
    config["dns"] = json!({ "nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"] });
    let a = Attachment::new(names::unique("ctr"), &pod);
    let result = node.weir("ADD", Some(&a), &config).unwrap().result().unwrap();
    assert_eq!(result["interfaces"][1]["mtu"], 1400);
    assert_eq!(result["dns"]["nameservers"][0], "10.96.0.10");
    assert!(pod.ip(&["link", "show", "eth0"]).unwrap().contains("mtu 1400"));
    node.weir("DEL", Some(&a), &config).unwrap().expect_ok().unwrap();
    node.assert_clean("mtu").unwrap();
}

/// Without `ipam.ranges` the pod CIDRs come from the agent's node state file: missing file or
/// `ready: false` is 50 for STATUS and ADD; a written file makes both work.
#[test]
fn cni_node_state_file_drives_ranges_and_status() {
    require_root();
    let node = Node::new().unwrap();
    let state_file = node.data_dir.path().join("node-state.json");
    let config = json!({
        "cniVersion": "1.1.0",
        "name": "nodestate",
        "type": "weir-cni",
        "ipam": { "dataDir": node.data_dir.path(), "nodeStateFile": state_file },
    });
    let pod = Netns::new("pod").unwrap();
    let a = Attachment::new(names::unique("ctr"), &pod);
    assert_eq!(node.weir("STATUS", None, &config).unwrap().error_code().unwrap(), 50);
    assert_eq!(node.weir("ADD", Some(&a), &config).unwrap().error_code().unwrap(), 50);
    std::fs::write(&state_file, br#"{"version":1,"podCIDRs":["10.136.0.0/24"],"ready":false}"#)
        .unwrap();
    assert_eq!(node.weir("STATUS", None, &config).unwrap().error_code().unwrap(), 50);
    std::fs::write(&state_file, br#"{"version":1,"podCIDRs":["10.136.0.0/24"],"mtu":1450}"#)
        .unwrap();
    node.weir("STATUS", None, &config).unwrap().expect_ok().unwrap();
    let result = node.weir("ADD", Some(&a), &config).unwrap().result().unwrap();
    assert!(result_ip(&result, false).unwrap().starts_with("10.136.0."));
    assert_eq!(result["interfaces"][1]["mtu"], 1450, "the node state's MTU applies");
    // DEL works even when the node state has gone away meanwhile.
    std::fs::remove_file(&state_file).unwrap();
    node.weir("DEL", Some(&a), &config).unwrap().expect_ok().unwrap();
    node.assert_clean("nodestate").unwrap();
}
