//! End-to-end scenarios shared by the tests (which assert on them) and the smoke demo (which
//! prints them).
use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::programs::TcAttachType;
use weir_common::{lb::Backend, metrics::Counter, proto};
use weir_proxy::{
    maps::{ServiceEntry, ServiceMaps, read_counters},
    programs::{self, LoadOptions, TC_LB4_FORWARD, TC_LB4_REVERSE},
};

use crate::{
    bpffs::TestPinDir,
    echo::{EchoServer, parse_reply},
    netns::{Netns, Veth},
    privileged::require_root,
};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const VIP_PORT: u16 = 80;
pub const BACKEND_PORT: u16 = 8080;
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// What the VIP round trip observed.
#[derive(Debug)]
pub struct VipRoundTrip {
    /// What the client read back from the connection (`pong from <backend> to <client>`).
    pub reply: String,
    /// The peer the client's socket reports: the VIP when reverse NAT works.
    pub client_saw_peer: SocketAddr,
    /// The peer the backend's socket reports: the client's own address (no SNAT).
    pub server_saw_peer: SocketAddr,
    /// The local address the backend accepted on: the backend address and port.
    pub server_local: SocketAddr,
    /// Datapath counters after the round trip.
    pub counters: Vec<(Counter, u64)>,
}

/// Two namespaces joined by a veth; in the client's, weir's tc load balancer on the veth
/// (forward translation on egress, reverse on ingress) and a route to the VIP via the server.
/// The client opens a real TCP connection to VIP:80; the backend listens on SERVER:8080.
pub fn tc_vip_roundtrip() -> Result<VipRoundTrip> {
    require_root();
    let client = Netns::new("client")?;
    let server = Netns::new("server")?;
    let veth = Veth::between(&client, &server)?;
    client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", &veth.a])?;
    server.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", &veth.b])?;
    client.ip(&["route", "add", &format!("{VIP}/32"), "via", &SERVER.to_string()])?;

    // Declared after the namespaces so that it is dropped (programs detached) before them.
    let pins = TestPinDir::new("vip")?;
    let mut loaded = programs::load(&LoadOptions::new(pins.path()))?;
    let mut maps = ServiceMaps::take(&mut loaded.ebpf)?;
    maps.upsert(&ServiceEntry {
        address: VIP,
        port: VIP_PORT,
        proto: proto::TCP,
        rev_nat_index: 1,
        backends: vec![(1, Backend::new(SERVER.octets(), BACKEND_PORT, proto::TCP))],
    })?;
    for (name, direction) in
        [(TC_LB4_FORWARD, TcAttachType::Egress), (TC_LB4_REVERSE, TcAttachType::Ingress)]
    {
        let program = programs::classifier(&mut loaded.ebpf, name)?;
        let interface = veth.a.as_str();
        client
            .run(move || program.attach(interface, direction))?
            .with_context(|| format!("attaching {name} to {interface} ({direction:?})"))?;
    }

    let _backend = EchoServer::tcp(&server, (SERVER, BACKEND_PORT).into())?;
    let (reply, client_saw_peer) = client.run(|| -> Result<(String, SocketAddr)> {
        let mut stream = TcpStream::connect_timeout(&SocketAddr::from((VIP, VIP_PORT)), IO_TIMEOUT)
            .context("connecting to the VIP")?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.write_all(b"ping\n")?;
        let mut reply = String::new();
        BufReader::new(&stream).read_line(&mut reply)?;
        Ok((reply, stream.peer_addr()?))
    })??;
    let (server_local, server_saw_peer) =
        parse_reply(&reply).with_context(|| format!("unexpected reply {reply:?}"))?;
    let counters = read_counters(&loaded.ebpf)?;
    Ok(VipRoundTrip { reply, client_saw_peer, server_saw_peer, server_local, counters })
}
