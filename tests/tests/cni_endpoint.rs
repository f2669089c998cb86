//! When the agent's pinned endpoint map exists, ADD registers pod IP -> host ifindex in it and
//! DEL removes the entry (weir_common::endpoint). The map is made with bpftool in a unique bpffs
//! directory, removed on drop.
use std::{path::PathBuf, process::Command};

use serde_json::{Value, json};
use weir_common::endpoint::{ENDPOINTS_MAP, EndpointInfo, EndpointKey};
use weir_tests::{
    cni::{Attachment, Node, result_ip},
    names,
    netns::Netns,
    privileged::require_root,
};

struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bpftool(args: &[&str]) -> String {
    let out = Command::new("bpftool").args(args).output().expect("running bpftool");
    assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn entries(map: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let dump: Value =
        serde_json::from_str(&bpftool(&["-j", "map", "dump", "pinned", map])).unwrap();
    let bytes = |v: &Value| -> Vec<u8> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
            .collect()
    };
    dump.as_array().unwrap().iter().map(|e| (bytes(&e["key"]), bytes(&e["value"]))).collect()
}

#[test]
fn cni_add_registers_the_endpoint_when_the_agents_map_is_pinned() {
    require_root();
    let dir = PinDir(PathBuf::from("/sys/fs/bpf").join(names::unique("endpoints")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let map = dir.0.join(ENDPOINTS_MAP);
    let map = map.to_str().unwrap();
    let key_size = size_of::<EndpointKey>().to_string();
    let value_size = size_of::<EndpointInfo>().to_string();
    bpftool(&[
        "map",
        "create",
        map,
        "type",
        "hash",
        "key",
        &key_size,
        "value",
        &value_size,
        "entries",
        "64",
        "name",
        ENDPOINTS_MAP,
    ]);

    let node = Node::new().unwrap();
    let pod = Netns::new("pod").unwrap();
    let mut config = node.config("1.1.0", "endpoints", &["10.135.0.0/24"]);
    config["bpffsDir"] = json!(dir.0);
    let a = Attachment::new(names::unique("ctr"), &pod);
    let result = node.weir("ADD", Some(&a), &config).unwrap().result().unwrap();
    let ip: std::net::Ipv4Addr = result_ip(&result, false).unwrap().parse().unwrap();
    let host = result["interfaces"][0]["name"].as_str().unwrap();
    let ifindex: u32 = node
        .ns
        .ip(&["-o", "link", "show", host])
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let found = entries(map);
    assert_eq!(found.len(), 1, "{found:?}");
    let (key, value) = &found[0];
    assert_eq!(&key[..4], &ip.octets());
    assert_eq!(key[16], 4, "family");
    assert_eq!(u32::from_ne_bytes(value[..4].try_into().unwrap()), ifindex);

    node.weir("DEL", Some(&a), &config).unwrap().expect_ok().unwrap();
    assert!(entries(map).is_empty(), "DEL removes the entry");
    node.assert_clean("endpoints").unwrap();
}
