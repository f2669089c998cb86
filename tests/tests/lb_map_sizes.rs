//! Map capacities: `weir agent`'s `--bpf-*-map-max` flags are checked before anything starts;
//! a load creates the maps with the sizes asked for, a later load with other sizes reuses the
//! pinned maps as they are and the difference is reported (the agent logs it); a service map
//! too small for the services makes the write fail with an error that says the map is full.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use weir_proxy::{
    apply::{ebpf::MapWriter, plan::ServicePlanner},
    maps::ServiceMaps,
    model::{Frontend, FrontendState, Protocol, ServiceState},
    programs::{self, CapacityMismatch, LoadOptions, MapSizes, capacity_mismatches},
};
use weir_tests::{apiserver::weir_binary, bpffs::TestPinDir, privileged::require_root};

const SMALL: MapSizes = MapSizes {
    services: 2048,
    backends: 2048,
    rev_nat: 2048,
    conntrack: 4096,
    socket_rev_nat: 4096,
};

#[test]
fn lb_map_size_flags_out_of_range_are_refused_with_what_to_pass() {
    // (flags, exit code: 2 from the flag parser, 64 from the configuration check, message)
    let cases: [(&[&str], i32, &str); 4] = [
        (&["--bpf-lb-map-max", "10"], 64, "--bpf-lb-map-max 10 is out of range"),
        (&["--bpf-ct-map-max", "0"], 64, "give 1024 to 16777216 entries"),
        (&["--bpf-sock-rev-map-max", "99999999"], 64, "--bpf-sock-rev-map-max 99999999"),
        (&["--bpf-lb-map-max", "lots"], 2, "invalid digit"),
    ];
    for (args, want_code, want) in cases {
        let out = std::process::Command::new(weir_binary())
            .args(["agent", "--node-name", "node-a"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(want_code), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {want:?} in {err}");
    }
}

#[test]
fn lb_maps_get_the_sizes_asked_for_and_pinned_ones_are_kept_and_reported() {
    require_root();
    let pins = TestPinDir::new("mapsize").unwrap();
    let loaded =
        programs::load(&LoadOptions { sizes: SMALL, ..LoadOptions::new(pins.path()) }).unwrap();
    assert_eq!(capacity_mismatches(pins.path(), &SMALL), [], "created as asked");
    let against_default = capacity_mismatches(pins.path(), &MapSizes::default());
    let expected: Vec<CapacityMismatch> = (SMALL.per_map().into_iter())
        .zip(MapSizes::default().per_map())
        .map(|((map, pinned), (_, wanted))| CapacityMismatch { map, pinned, wanted })
        .collect();
    assert_eq!(against_default, expected, "every sized map differs from the defaults");
    drop(loaded);

    // A later load with the default sizes adopts the pinned maps as they are.
    let _again = programs::load(&LoadOptions::new(pins.path())).unwrap();
    assert_eq!(capacity_mismatches(pins.path(), &SMALL), [], "the pins kept their sizes");
}

#[test]
fn lb_a_service_map_too_small_fails_the_write_and_says_it_is_full() {
    require_root();
    let pins = TestPinDir::new("mapfull").unwrap();
    let sizes = MapSizes { services: 1024, ..SMALL };
    let mut loaded =
        programs::load(&LoadOptions { sizes, ..LoadOptions::new(pins.path()) }).unwrap();
    let mut writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf).unwrap());
    // 300 services of 4 endpoints take 1,500 service entries.
    let mut state = ServiceState::default();
    for i in 0..300u32 {
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i);
        let backends = (0..4u32)
            .map(|e| {
                let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + i * 4 + e);
                SocketAddr::new(IpAddr::V4(ip), 8080)
            })
            .collect();
        state.frontends.insert(
            Frontend { address: IpAddr::V4(vip), port: 80, protocol: Protocol::Tcp },
            FrontendState::cluster_ip(format!("default/s{i}"), backends),
        );
    }
    let err = writer.apply(&ServicePlanner::new().plan(&state)).unwrap_err();
    assert!(err.to_string().contains("full?"), "{err}");
}
