//! Network topologies shared by end-to-end tests.
use std::net::Ipv4Addr;

use anyhow::Result;

use crate::{
    echo::EchoServer,
    netns::{Netns, Veth},
};

/// Port every backend's TCP echo server listens on.
pub const BACKEND_PORT: u16 = 8080;

/// A client namespace and a server namespace on one veth: the client is `10.<net>.0.1/24`, the
/// backends `10.<net>.0.2`, `.3`, ... on the server side, each with a TCP echo server on
/// [`BACKEND_PORT`]. The client's default route is the veth, as a node's uplink: service
/// addresses must be routable for netfilter (nftables dataplane) to see the packets; the
/// socket load balancer translates before routing and does not need it. Everything is removed
/// on drop.
pub struct ServiceNet {
    pub client_ip: Ipv4Addr,
    pub backends: Vec<Ipv4Addr>,
    // Field order is drop order: servers stop before their namespaces go.
    _servers: Vec<EchoServer>,
    pub client: Netns,
    pub server: Netns,
}

impl ServiceNet {
    /// `net` picks the /24 (10.<net>.0.0); `backends` is how many backends to start.
    pub fn new(role: &str, net: u8, backends: u8) -> Result<Self> {
        let client = Netns::new(&format!("{role}c"))?;
        let server = Netns::new(&format!("{role}s"))?;
        let veth = Veth::between(&client, &server)?;
        let client_ip = Ipv4Addr::new(10, net, 0, 1);
        client.ip(&["addr", "add", &format!("{client_ip}/24"), "dev", &veth.a])?;
        client.ip(&["route", "add", "default", "dev", &veth.a])?;
        let mut servers = Vec::new();
        let mut addresses = Vec::new();
        for host in 2..2 + backends {
            let ip = Ipv4Addr::new(10, net, 0, host);
            server.ip(&["addr", "add", &format!("{ip}/24"), "dev", &veth.b])?;
            servers.push(EchoServer::tcp(&server, (ip, BACKEND_PORT).into())?);
            addresses.push(ip);
        }
        Ok(Self { client_ip, backends: addresses, _servers: servers, client, server })
    }
}
