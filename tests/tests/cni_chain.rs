//! weir-cni in chains and with delegated IPAM, using Debian's containernetworking-plugins:
//! - weir-cni + portmap: a hostPort mapping on the node reaches the pod;
//! - `ipam.type: host-local`: ADD/CHECK/DEL go through the delegate and nothing is left.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use weir_tests::{
    cni::{Attachment, DEBIAN_PLUGINS, Node, ping, result_ip},
    names,
    netns::Netns,
    privileged::require_root,
};

const HOST_PORT: u16 = 18080;

fn portmap_config(prev: &Value) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "chain",
        "type": "portmap",
        "capabilities": { "portMappings": true },
        "runtimeConfig": { "portMappings": [
            { "hostPort": HOST_PORT, "containerPort": 80, "protocol": "tcp" }
        ] },
        "prevResult": prev,
    })
}

/// Accepts one connection (bounded wait) and echoes what it reads.
fn echo_once(listener: TcpListener) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match listener.accept() {
            Ok((mut conn, _)) => {
                conn.set_nonblocking(false)?;
                conn.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut buf = [0u8; 5];
                conn.read_exact(&mut buf)?;
                return conn.write_all(&buf);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

#[test]
fn cni_chain_with_portmap_maps_a_host_port_to_the_pod() {
    require_root();
    let portmap = Path::new(DEBIAN_PLUGINS).join("portmap");
    assert!(portmap.is_file(), "{} missing: run `cargo xtask setup`", portmap.display());
    let node = Node::new().unwrap();
    let config = node.config("1.0.0", "chain", &["10.133.0.0/24"]);
    let (server_pod, client_pod) = (Netns::new("server").unwrap(), Netns::new("client").unwrap());
    let server = Attachment::new(names::unique("server"), &server_pod);
    let client = Attachment::new(names::unique("client"), &client_pod);

    let result = node.weir("ADD", Some(&server), &config).unwrap().result().unwrap();
    let chained = node
        .exec(&portmap, "ADD", Some(&server), portmap_config(&result).to_string().as_bytes(), &[])
        .unwrap()
        .result()
        .unwrap();
    assert_eq!(chained["ips"], result["ips"], "portmap passes weir-cni's result on");
    node.weir("ADD", Some(&client), &config).unwrap().result().unwrap();

    let listener = server_pod.run(|| TcpListener::bind("0.0.0.0:80")).unwrap().unwrap();
    std::thread::scope(|scope| {
        let echo = scope.spawn(|| echo_once(listener));
        // The client pod reaches its node at the gateway address; the node DNATs the host port.
        let node_addr: SocketAddr = format!("169.254.1.1:{HOST_PORT}").parse().unwrap();
        let answer = client_pod
            .run(|| -> std::io::Result<Vec<u8>> {
                let mut conn = TcpStream::connect_timeout(&node_addr, Duration::from_secs(5))?;
                conn.set_read_timeout(Some(Duration::from_secs(5)))?;
                conn.write_all(b"hello")?;
                let mut buf = vec![0u8; 5];
                conn.read_exact(&mut buf)?;
                Ok(buf)
            })
            .unwrap()
            .expect("connecting to the host port");
        assert_eq!(answer, b"hello");
        echo.join().unwrap().expect("the pod's server got the mapped connection");
    });

    // The runtime deletes in reverse order.
    node.exec(&portmap, "DEL", Some(&server), portmap_config(&result).to_string().as_bytes(), &[])
        .unwrap()
        .expect_ok()
        .unwrap();
    node.weir("DEL", Some(&server), &config).unwrap().expect_ok().unwrap();
    node.weir("DEL", Some(&client), &config).unwrap().expect_ok().unwrap();
    node.assert_clean("chain").unwrap();
}

#[test]
fn cni_delegated_ipam_host_local_add_check_del() {
    require_root();
    let node = Node::new().unwrap();
    let host_local_dir = node.data_dir.path().join("host-local");
    let config = json!({
        "cniVersion": "1.0.0",
        "name": "delegated",
        "type": "weir-cni",
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": "10.134.0.0/24" }]],
            "dataDir": host_local_dir,
        },
    });
    let (pod_a, pod_b) = (Netns::new("pod-a").unwrap(), Netns::new("pod-b").unwrap());
    let a = Attachment::new(names::unique("ctr-a"), &pod_a);
    let b = Attachment::new(names::unique("ctr-b"), &pod_b);
    let result_a = node.weir("ADD", Some(&a), &config).unwrap().result().unwrap();
    let result_b = node.weir("ADD", Some(&b), &config).unwrap().result().unwrap();
    let ip_b = result_ip(&result_b, false).unwrap();
    assert!(ip_b.starts_with("10.134.0."), "host-local picked the address: {result_b}");
    assert!(result_b["ips"][0]["address"].as_str().unwrap().ends_with("/32"));
    ping(&pod_a, "169.254.1.1").unwrap();
    ping(&pod_a, &ip_b).unwrap();
    let mut check = config.clone();
    check["prevResult"] = result_a.clone();
    node.weir("CHECK", Some(&a), &check).unwrap().expect_ok().unwrap();
    // An unknown delegate is reported with the environment's code.
    let mut missing = config.clone();
    missing["ipam"]["type"] = json!("weirt-no-such-ipam");
    let c = Attachment::new(names::unique("ctr-c"), &pod_b);
    assert_eq!(node.weir("ADD", Some(&c), &missing).unwrap().error_code().unwrap(), 4);

    node.weir("DEL", Some(&a), &config).unwrap().expect_ok().unwrap();
    node.weir("DEL", Some(&b), &config).unwrap().expect_ok().unwrap();
    node.weir("DEL", Some(&b), &config).unwrap().expect_ok().unwrap();
    node.assert_clean("delegated").unwrap();
    let leftovers: Vec<String> = std::fs::read_dir(host_local_dir.join("delegated"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("10."))
        .collect();
    assert!(leftovers.is_empty(), "host-local still holds {leftovers:?}");
}

/// deploy/cni/10-weir.conflist works as written (only the IPAM store is moved to a temporary
/// directory): ADD through the chain as a runtime does it, ping, DEL in reverse order.
#[test]
fn cni_example_conflist_works_as_a_chain() {
    require_root();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cni/10-weir.conflist");
    let conflist: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let node = Node::new().unwrap();
    let pod = Netns::new("pod").unwrap();
    let a = Attachment::new(names::unique("ctr"), &pod);
    // The runtime builds each plugin's config: the plugin's own fields plus name, cniVersion,
    // runtimeConfig for declared capabilities and prevResult.
    let plugin_config = |plugin: &Value, prev: Option<&Value>| -> Value {
        let mut config = plugin.clone();
        config["name"] = conflist["name"].clone();
        config["cniVersion"] = conflist["cniVersion"].clone();
        if config["type"] == "weir-cni" {
            config["ipam"]["dataDir"] = json!(node.data_dir.path());
        }
        if config["capabilities"]["portMappings"] == true {
            config["runtimeConfig"] = json!({ "portMappings": [
                { "hostPort": HOST_PORT, "containerPort": 80, "protocol": "tcp" }
            ] });
        }
        if let Some(prev) = prev {
            config["prevResult"] = prev.clone();
        }
        config
    };
    let binary = |plugin: &Value| -> std::path::PathBuf {
        match plugin["type"].as_str().unwrap() {
            "weir-cni" => weir_tests::cni::weir_cni().to_path_buf(),
            other => Path::new(DEBIAN_PLUGINS).join(other),
        }
    };
    let plugins = conflist["plugins"].as_array().unwrap();
    let mut prev: Option<Value> = None;
    for plugin in plugins {
        let config = plugin_config(plugin, prev.as_ref());
        let run = node
            .exec(&binary(plugin), "ADD", Some(&a), config.to_string().as_bytes(), &[])
            .unwrap();
        prev = Some(run.result().unwrap());
    }
    let result = prev.unwrap();
    assert!(result_ip(&result, false).unwrap().starts_with("10.244.0."));
    ping(&pod, "169.254.1.1").unwrap();
    for plugin in plugins.iter().rev() {
        let config = plugin_config(plugin, Some(&result));
        node.exec(&binary(plugin), "DEL", Some(&a), config.to_string().as_bytes(), &[])
            .unwrap()
            .expect_ok()
            .unwrap();
    }
    node.assert_clean(conflist["name"].as_str().unwrap()).unwrap();
}

/// weir-cni in front of Debian's bandwidth plugin: the ingress limit lands on weir-cni's host
/// veth (found through the result), the pod still works, DEL in reverse order leaves nothing.
/// Ingress only: egress shaping would need the ifb kernel module loaded for the whole machine.
#[test]
fn cni_chain_with_bandwidth_shapes_the_host_veth() {
    require_root();
    let bandwidth = Path::new(DEBIAN_PLUGINS).join("bandwidth");
    let node = Node::new().unwrap();
    let config = node.config("1.0.0", "shaped", &["10.137.0.0/24"]);
    let pod = Netns::new("pod").unwrap();
    let a = Attachment::new(names::unique("ctr"), &pod);
    let result = node.weir("ADD", Some(&a), &config).unwrap().result().unwrap();
    let shaping = json!({
        "cniVersion": "1.0.0",
        "name": "shaped",
        "type": "bandwidth",
        "capabilities": { "bandwidth": true },
        "runtimeConfig": { "bandwidth": { "ingressRate": 1_000_000, "ingressBurst": 100_000 } },
        "prevResult": result,
    });
    node.exec(&bandwidth, "ADD", Some(&a), shaping.to_string().as_bytes(), &[])
        .unwrap()
        .result()
        .unwrap();
    let host = result["interfaces"][0]["name"].as_str().unwrap();
    let out = std::process::Command::new("tc")
        .args(["-n", node.ns.name(), "qdisc", "show", "dev", host])
        .output()
        .unwrap();
    let qdiscs = String::from_utf8_lossy(&out.stdout);
    assert!(qdiscs.contains("tbf"), "no tbf on {host}: {qdiscs}");
    ping(&pod, "169.254.1.1").unwrap();
    node.exec(&bandwidth, "DEL", Some(&a), shaping.to_string().as_bytes(), &[])
        .unwrap()
        .expect_ok()
        .unwrap();
    node.weir("DEL", Some(&a), &config).unwrap().expect_ok().unwrap();
    node.assert_clean("shaped").unwrap();
}

/// STATUS and GC go to the delegated IPAM plugin too, and its error codes pass through. Debian
/// 12's host-local predates STATUS/GC (spec 1.1.0), so a scripted IPAM plugin stands in.
#[test]
fn cni_delegated_ipam_gets_status_and_gc() {
    require_root();
    let node = Node::new().unwrap();
    let dir = weir_tests::cni::TempDir::new("fake-ipam").unwrap();
    let plugin = dir.path().join("weirt-fake-ipam");
    std::fs::write(
        &plugin,
        "#!/bin/sh\ncat > /dev/null\nd=$(dirname \"$0\")\necho \"$CNI_COMMAND\" >> \"$d/calls\"\n\
         if [ -f \"$d/fail\" ]; then\n  echo '{\"cniVersion\":\"1.1.0\",\"code\":50,\"msg\":\"fake ipam not ready\"}'\n  exit 1\nfi\n",
    )
    .unwrap();
    std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = json!({
        "cniVersion": "1.1.0",
        "name": "fake",
        "type": "weir-cni",
        "ipam": { "type": "weirt-fake-ipam" },
        "cni.dev/valid-attachments": [],
    });
    let cni_path = format!("{}:{DEBIAN_PLUGINS}", dir.path().display());
    let run = |command: &str| {
        node.exec(
            weir_tests::cni::weir_cni(),
            command,
            None,
            config.to_string().as_bytes(),
            &[("CNI_PATH", &cni_path)],
        )
        .unwrap()
    };
    run("STATUS").expect_ok().unwrap();
    run("GC").expect_ok().unwrap();
    std::fs::write(dir.path().join("fail"), b"").unwrap();
    let failed = run("STATUS");
    assert_eq!(failed.error_code().unwrap(), 50);
    assert!(failed.stdout.contains("fake ipam not ready"), "{}", failed.stdout);
    let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
    assert_eq!(calls.lines().collect::<Vec<_>>(), ["STATUS", "GC", "STATUS"]);
}
