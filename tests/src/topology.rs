//! Network topologies shared by end-to-end tests.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};

use crate::{
    echo::EchoServer,
    netns::{Netns, Veth},
};

/// Port every backend's TCP echo server listens on.
pub const BACKEND_PORT: u16 = 8080;

/// A client namespace and a server namespace on one veth, dual-stack: the client is
/// `10.<net>.0.1/24` and `fd00:<net>::1/64`, the backends `10.<net>.0.2`, `.3`, ... and
/// `fd00:<net>::2`, `::3`, ... on the server side, each address with a TCP echo server on
/// [`BACKEND_PORT`]. The client's default routes (both families) are the veth, as a node's
/// uplink: service addresses must be routable for netfilter (nftables dataplane) to see the
/// packets; the socket load balancer translates before routing and does not need them. The
/// IPv6 addresses skip duplicate address detection, so they are usable at once. Everything is
/// removed on drop.
pub struct ServiceNet {
    pub client_ip: Ipv4Addr,
    pub backends: Vec<Ipv4Addr>,
    pub client_ip6: Ipv6Addr,
    /// The IPv6 address of each backend of [`ServiceNet::backends`], in the same order.
    pub backends6: Vec<Ipv6Addr>,
    // Field order is drop order: servers stop before their namespaces go.
    _servers: Vec<EchoServer>,
    pub client: Netns,
    pub server: Netns,
}

/// `fd00:<net>::<host>`: the digits of `net` as the second group, so that `10.203.0.2` and
/// `fd00:203::2` read alike.
fn ipv6(net: u8, host: u8) -> Ipv6Addr {
    format!("fd00:{net}::{host:x}").parse().expect("an IPv6 address")
}

impl ServiceNet {
    /// `net` picks the /24 (10.<net>.0.0) and the /64 (fd00:<net>::); `backends` is how many
    /// backends to start.
    pub fn new(role: &str, net: u8, backends: u8) -> Result<Self> {
        Self::with_servers(role, net, backends, EchoServer::tcp)
    }

    /// As [`ServiceNet::new`], with servers that answer one connection at a time in their own
    /// thread ([`EchoServer::tcp_serial`]): for benchmarks of sequential connections, which
    /// should measure the network path, not a thread started per connection.
    pub fn serial(role: &str, net: u8, backends: u8) -> Result<Self> {
        Self::with_servers(role, net, backends, EchoServer::tcp_serial)
    }

    fn with_servers(
        role: &str,
        net: u8,
        backends: u8,
        server_on: fn(&Netns, std::net::SocketAddr) -> Result<EchoServer>,
    ) -> Result<Self> {
        let client = Netns::new(&format!("{role}c"))?;
        let server = Netns::new(&format!("{role}s"))?;
        let veth = Veth::between(&client, &server)?;
        let client_ip = Ipv4Addr::new(10, net, 0, 1);
        let client_ip6 = ipv6(net, 1);
        client.ip(&["addr", "add", &format!("{client_ip}/24"), "dev", &veth.a])?;
        client.ip(&["addr", "add", &format!("{client_ip6}/64"), "dev", &veth.a, "nodad"])?;
        client.ip(&["route", "add", "default", "dev", &veth.a])?;
        client.ip(&["-6", "route", "add", "default", "dev", &veth.a])?;
        let mut servers = Vec::new();
        let (mut addresses, mut addresses6) = (Vec::new(), Vec::new());
        for host in 2..2 + backends {
            let ip = Ipv4Addr::new(10, net, 0, host);
            let ip6 = ipv6(net, host);
            server.ip(&["addr", "add", &format!("{ip}/24"), "dev", &veth.b])?;
            server.ip(&["addr", "add", &format!("{ip6}/64"), "dev", &veth.b, "nodad"])?;
            servers.push(server_on(&server, (ip, BACKEND_PORT).into())?);
            servers.push(
                server_on(&server, (ip6, BACKEND_PORT).into())
                    .with_context(|| format!("echo server on [{ip6}]:{BACKEND_PORT}"))?,
            );
            addresses.push(ip);
            addresses6.push(ip6);
        }
        Ok(Self {
            client_ip,
            backends: addresses,
            client_ip6,
            backends6: addresses6,
            _servers: servers,
            client,
            server,
        })
    }
}
