//! End-to-end: a real TCP connection to a service VIP through weir's tc load balancer, between
//! two network namespaces joined by a veth (tests/src/scenarios.rs).
use weir_common::metrics::Counter;
use weir_tests::scenarios::{self, BACKEND_PORT, CLIENT, SERVER, VIP, VIP_PORT};

#[test]
fn lb_tc_tcp_connection_to_the_vip_reaches_the_backend() {
    let trip = scenarios::tc_vip_roundtrip().expect("round trip through the VIP");
    assert!(trip.reply.starts_with("pong from "), "{:?}", trip.reply);
    assert_eq!(trip.client_saw_peer, (VIP, VIP_PORT).into(), "replies come from the VIP");
    assert_eq!(trip.server_local, (SERVER, BACKEND_PORT).into(), "the backend accepted it");
    assert_eq!(trip.server_saw_peer.ip(), CLIENT, "the client address is preserved");
    let count = |which| trip.counters.iter().find(|(c, _)| *c == which).map(|(_, v)| *v);
    assert!(count(Counter::Translated) >= Some(3), "SYN, ACK, data at least: {:?}", trip.counters);
    assert!(count(Counter::ReverseTranslated) >= Some(2), "{:?}", trip.counters);
    assert_eq!(count(Counter::DropNoBackend), Some(0));
}
