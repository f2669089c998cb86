//! The datapath outlives the agent: maps are pinned, socket-LB attachments are pinned bpf
//! links. While no agent runs, new and established connections through a service keep working;
//! a restarted agent adopts the pins (no second attachment, no rewrite of unchanged entries),
//! and its changes reach the programs that stayed attached.
use std::net::Ipv4Addr;

use weir_proxy::{
    apply::{ebpf::MapWriter, nft::NftDataplane, plan::ServicePlanner},
    maps::ServiceMaps,
    model::{Frontend, FrontendState, Protocol, ServiceState},
    programs::{self, Attached, LoadOptions},
};
use weir_tests::{
    bpffs::TestPinDir,
    cgroup::TestCgroup,
    dataplane::{TestDatapath, table_name},
    privileged::require_root,
    probe::{Session, spread},
    topology::ServiceNet,
};

const BACKEND_A: Ipv4Addr = Ipv4Addr::new(10, 204, 0, 2);
const BACKEND_B: Ipv4Addr = Ipv4Addr::new(10, 204, 0, 3);
const VIP: &str = "10.96.2.1:80";
const SESSIONS: usize = 5;

fn desired(backends: &[Ipv4Addr]) -> ServiceState {
    let mut state = ServiceState::default();
    state.frontends.insert(
        Frontend { address: "10.96.2.1".parse().unwrap(), port: 80, protocol: Protocol::Tcp },
        FrontendState::cluster_ip(
            "default/web",
            backends.iter().map(|ip| (*ip, 8080).into()).collect(),
        ),
    );
    state
}

#[test]
fn restart_connections_survive_and_the_new_agent_adopts_the_pins() {
    require_root();
    let net = ServiceNet::new("rst", 204, 2).unwrap();
    assert_eq!(net.backends, [BACKEND_A, BACKEND_B]);
    let client = &net.client;
    let cgroup = TestCgroup::new("restart").unwrap();
    let pins = TestPinDir::new("restart").unwrap();
    let links = pins.path().join("links");
    std::fs::create_dir(&links).unwrap();

    // First agent: loads, programs the service, attaches with pinned links, then exits.
    {
        let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
        let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
        writer.execute(&ServicePlanner::new().plan(&desired(&[BACKEND_A, BACKEND_B]))).unwrap();
        let attached = programs::attach_socket_lb(&mut loaded.ebpf, cgroup.dir(), Some(&links));
        assert_eq!(attached.unwrap(), Attached { attached: 8, adopted: 0 });
    }
    let mut sessions: Vec<Session> =
        (0..SESSIONS).map(|_| Session::open(client, Some(&cgroup), VIP)).collect();

    // No agent runs: established connections keep working, new ones still reach backends.
    for session in &mut sessions {
        assert_eq!(session.ping()["ok"], true);
    }
    let while_down = spread(client, Some(&cgroup), VIP, 50);
    assert_eq!(while_down["ok"], true, "{while_down}");

    // Second agent: adopts maps and links; the unchanged state costs no write.
    let mut loaded = programs::load(&LoadOptions::new(pins.path())).unwrap();
    let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
    let mut planner = writer.adopting_planner();
    assert!(planner.plan(&desired(&[BACKEND_A, BACKEND_B])).is_empty());
    let attached = programs::attach_socket_lb(&mut loaded.ebpf, cgroup.dir(), Some(&links));
    assert_eq!(attached.unwrap(), Attached { attached: 0, adopted: 8 });

    // Its change reaches the programs the first agent attached: only A is used now.
    writer.execute(&planner.plan(&desired(&[BACKEND_A]))).unwrap();
    let after = spread(client, Some(&cgroup), VIP, 50);
    assert_eq!(after["ok"], true, "{after}");
    assert_eq!(after["backends"].as_object().unwrap().len(), 1, "{after}");
    assert_eq!(after["backends"][format!("{BACKEND_A}:8080")], 50, "{after}");

    // And the connections opened before the restart were never interrupted.
    for session in &mut sessions {
        assert_eq!(session.ping()["ok"], true);
    }
}

/// The nftables dataplane outlives its agent the same way: the table stays in the namespace;
/// established connections (conntrack) and new ones keep working; the next agent adopts the
/// table without rewriting anything and its change takes effect.
#[test]
fn restart_nftables_table_survives_and_the_new_agent_adopts_it() {
    require_root();
    let net = ServiceNet::new("rstn", 212, 2).unwrap();
    let client = &net.client;
    let table = table_name("rstn");
    let (a, b) = (net.backends[0], net.backends[1]);

    // First agent: programs the service, then goes away leaving its table.
    client
        .run(|| NftDataplane::open(&table).and_then(|mut t| t.apply(&desired(&[a, b]))))
        .unwrap()
        .unwrap();
    let mut sessions: Vec<Session> =
        (0..SESSIONS).map(|_| Session::open(client, None, VIP)).collect();
    let while_down = spread(client, None, VIP, 50);
    assert_eq!(while_down["ok"], true, "{while_down}");
    assert_eq!(while_down["backends"].as_object().unwrap().len(), 2, "{while_down}");

    // Second agent: adopts the table; the unchanged state costs no write.
    let mut adopted = TestDatapath::nft_table(client, &table).unwrap();
    assert_eq!(adopted.apply(&desired(&[a, b])).unwrap(), 0, "a restart rewrites nothing");
    adopted.apply(&desired(&[a])).unwrap();
    let after = spread(client, None, VIP, 50);
    assert_eq!(after["backends"][format!("{a}:8080")], 50, "{after}");

    for session in &mut sessions {
        assert_eq!(session.ping()["ok"], true);
    }
}

/// Pins of maps an earlier version used (`RETIRED_MAPS`) are removed when the object is loaded
/// again; the current ones stay.
#[test]
fn restart_removes_the_pins_of_retired_maps() {
    use std::os::fd::AsFd;
    require_root();
    let pins = TestPinDir::new("retired").unwrap();
    drop(programs::load(&LoadOptions::new(pins.path())).unwrap());
    let current = pins.path().join(weir_common::policy::POLICY_GLOBAL_MAP);
    let map = weir_cni_plugin::bpf::obj_get(&current).unwrap();
    let retired = pins.path().join(weir_common::policy::RETIRED_MAPS[0]);
    weir_cni_plugin::bpf::obj_pin(map.as_fd(), &retired).unwrap();
    drop(programs::load(&LoadOptions::new(pins.path())).unwrap());
    assert!(!retired.exists(), "{} is still pinned", retired.display());
    assert!(current.exists(), "{} went too", current.display());
}
