//! Flow events of the nftables policy table (`weir flows` on `--dataplane nftables`): the
//! table logs its decisions to the nfnetlink_log group [`plan::FLOW_LOG_GROUP`] (the packets
//! its drop chains drop, the packets dropped as not ready, the first packet of each flow an
//! allow tuple admits), each with a prefix that says which ([`plan::drop_log_prefix`],
//! [`plan::LOG_ALLOW_PREFIX`], [`plan::LOG_NOT_READY_PREFIX`]). The agent binds the group in
//! its network namespace and turns each logged packet into a [`FlowRecord`].
//!
//! The kernel queues logged packets for the socket; when the reader falls behind the queue
//! overflows and packets are lost to the log (counted, never to the traffic). A drop names the
//! policy of its drop chain. nftables keeps no rule ids in its sets, so an allowed flow's rule
//! is found afterwards in the state the agent applied ([`FlowNames::admitted`], answered by
//! the table's [`super::incremental::IncrementalDesired::admitted`]): the rule whose box
//! holds the packet, or the pod's own node; a packet the state no longer admits (it changed
//! since) names no rule.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use weir_policy::Direction;

use super::plan::{self, LOG_ALLOW_PREFIX, LOG_NOT_READY_PREFIX};
use crate::apply::nft::netlink::{Buf, Socket, attrs, messages};
use crate::policy::{
    flows::{
        FlowDirection, FlowHub, FlowPeer, FlowReason, FlowRecord, FlowVerdict, protocol_name,
        rfc3339_millis,
    },
    names::{Admitted, AdmittedPacket, FlowNames},
};

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 2;
const NFGENMSG_LEN: usize = 4;
/// Bytes of each logged packet copied to the socket (the rule's snap length is the same).
const COPY_RANGE: u32 = 128;
/// Datagrams read while waiting for a config acknowledgement: logged packets may come first
/// (traffic is logged from the bind on).
const ACK_WAIT_DATAGRAMS: usize = 1024;

/// A netfilter netlink socket ([`Socket`], the one the nftables code uses) bound to an
/// nfnetlink_log group of this network namespace. Closing it unbinds.
pub struct NflogSocket {
    socket: Socket,
    group: u16,
}

impl AsRawFd for NflogSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl NflogSocket {
    /// Binds `group` in the calling thread's network namespace, asking for the packets'
    /// headers. Fails with `EBUSY` when another socket has the group (another agent).
    pub fn bind(group: u16) -> io::Result<Self> {
        let mut socket = Self { socket: Socket::open()?, group };
        socket.configure(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])?;
        let mut mode = COPY_RANGE.to_be_bytes().to_vec();
        mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
        socket.configure(NFULA_CFG_MODE, &mode)?;
        Ok(socket)
    }

    /// Sends one config message with one attribute and waits for its acknowledgement.
    fn configure(&mut self, kind: u16, value: &[u8]) -> io::Result<()> {
        self.socket.send(&config_message(self.group, kind, value))?;
        for _ in 0..ACK_WAIT_DATAGRAMS {
            let Some(len) = self.socket.recv(false)? else { continue };
            if let Some(status) = ack_status(self.socket.received(len), CONFIG_SEQ) {
                return if status == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-status))
                };
            }
        }
        Err(io::Error::other("no acknowledgement from nfnetlink_log"))
    }

    /// Reads the queued datagrams without waiting and hands each to `each`; `ENOBUFS` after
    /// the kernel dropped messages for want of room.
    fn drain(&mut self, mut each: impl FnMut(&[u8])) -> io::Result<()> {
        while let Some(len) = self.socket.recv(true)? {
            each(self.socket.received(len));
        }
        Ok(())
    }
}

/// The sequence number of a config message (each is sent alone and acknowledged first).
const CONFIG_SEQ: u32 = 1;

fn config_message(group: u16, kind: u16, value: &[u8]) -> Vec<u8> {
    let mut buf = Buf::default();
    let start = buf.begin_msg(
        (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
        NLM_F_REQUEST | NLM_F_ACK,
        libc::AF_UNSPEC as u8,
        group,
    );
    buf.attr(kind, value);
    buf.end_msg(start);
    buf.bytes
}

/// The error code of the acknowledgement of `seq` in `buf` (0: success), if there is one.
fn ack_status(buf: &[u8], seq: u32) -> Option<i32> {
    messages(buf).into_iter().find_map(|(header, payload)| {
        (header.kind == NLMSG_ERROR && header.seq == seq && payload.len() >= 4)
            .then(|| i32::from_ne_bytes(payload[..4].try_into().unwrap_or_default()))
    })
}

/// One logged packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedPacket {
    /// The rule's log prefix.
    pub prefix: String,
    /// The packet from its network header, at most [`COPY_RANGE`] bytes.
    pub payload: Vec<u8>,
}

/// The logged packets of one datagram; other messages are skipped.
pub fn parse_datagram(buf: &[u8]) -> Vec<LoggedPacket> {
    messages(buf)
        .into_iter()
        .filter(|(header, _)| header.kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET)
        .filter_map(|(_, payload)| {
            let mut packet = LoggedPacket { prefix: String::new(), payload: Vec::new() };
            for (kind, value) in attrs(payload.get(NFGENMSG_LEN..)?) {
                match kind {
                    NFULA_PREFIX => {
                        let text = value.split(|b| *b == 0).next().unwrap_or_default();
                        packet.prefix = String::from_utf8_lossy(text).into_owned();
                    }
                    NFULA_PAYLOAD => packet.payload = value.to_vec(),
                    _ => {}
                }
            }
            Some(packet)
        })
        .collect()
}

/// The addresses, protocol and ports of a packet from its network header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headers {
    pub source: IpAddr,
    pub destination: IpAddr,
    pub protocol: u8,
    /// `None` for protocols without ports and for non-first fragments.
    pub ports: Option<(u16, u16)>,
}

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;

/// Parses an IPv4 or IPv6 header (IPv6: up to 4 extension headers, as the eBPF datapath).
pub fn parse_headers(packet: &[u8]) -> Option<Headers> {
    let ports = |protocol: u8, transport: &[u8]| {
        matches!(protocol, TCP | UDP | SCTP)
            .then(|| {
                let sport = u16::from_be_bytes(transport.get(0..2)?.try_into().ok()?);
                let dport = u16::from_be_bytes(transport.get(2..4)?.try_into().ok()?);
                Some((sport, dport))
            })
            .flatten()
    };
    match packet.first()? >> 4 {
        4 => {
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            if header_len < 20 {
                return None;
            }
            let fragment_offset = u16::from_be_bytes(packet.get(6..8)?.try_into().ok()?) & 0x1fff;
            let protocol = *packet.get(9)?;
            let source: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            let destination: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            let transport = packet.get(header_len..).unwrap_or_default();
            Some(Headers {
                source: IpAddr::V4(Ipv4Addr::from(source)),
                destination: IpAddr::V4(Ipv4Addr::from(destination)),
                protocol,
                ports: if fragment_offset == 0 { ports(protocol, transport) } else { None },
            })
        }
        6 => {
            let source: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            let destination: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            let mut next = *packet.get(6)?;
            let mut at = 40;
            let mut first_fragment = true;
            for _ in 0..4 {
                if !matches!(next, 0 | 43 | 44 | 51 | 60) {
                    break;
                }
                let header = packet.get(at..at + 8)?;
                let len = match next {
                    0 | 43 | 60 => (usize::from(header[1]) + 1) * 8,
                    44 => {
                        first_fragment = u16::from_be_bytes([header[2], header[3]]) >> 3 == 0;
                        8
                    }
                    51 => (usize::from(header[1]) + 2) * 4,
                    _ => break,
                };
                next = header[0];
                at += len;
                if !first_fragment {
                    break;
                }
            }
            let transport = packet.get(at..).unwrap_or_default();
            Some(Headers {
                source: IpAddr::V6(Ipv6Addr::from(source)),
                destination: IpAddr::V6(Ipv6Addr::from(destination)),
                protocol: next,
                ports: if first_fragment { ports(next, transport) } else { None },
            })
        }
        _ => None,
    }
}

/// What a log prefix says: the verdict, the reason, the direction and the policy of a drop.
pub fn parse_prefix(prefix: &str) -> Option<(FlowVerdict, FlowReason, Direction, Option<String>)> {
    let direction = |text: &str| match text {
        "ingress" => Some(Direction::Ingress),
        "egress" => Some(Direction::Egress),
        _ => None,
    };
    if let Some(rest) = prefix.strip_prefix(LOG_ALLOW_PREFIX) {
        return Some((FlowVerdict::Allowed, FlowReason::Rule, direction(rest)?, None));
    }
    if let Some(rest) = prefix.strip_prefix(LOG_NOT_READY_PREFIX) {
        return Some((FlowVerdict::Dropped, FlowReason::NotReady, direction(rest)?, None));
    }
    let (direction, policy) = plan::parse_drop_chain(prefix)?;
    Some((FlowVerdict::Dropped, FlowReason::DefaultDeny, direction, Some(policy.to_string())))
}

/// The record of a logged packet read at `unix_ns` (the kernel's packet timestamps are not
/// always wall-clock time), `None` when its prefix or headers are not understood.
pub fn record(
    packet: &LoggedPacket,
    names: &dyn FlowNames,
    node: Option<&str>,
    unix_ns: u64,
) -> Option<FlowRecord> {
    let (verdict, mut reason, direction, policy) = parse_prefix(&packet.prefix)?;
    let headers = parse_headers(&packet.payload)?;
    let mut rule = None;
    if verdict == FlowVerdict::Allowed {
        let (endpoint, peer) = match direction {
            Direction::Ingress => (headers.destination, headers.source),
            Direction::Egress => (headers.source, headers.destination),
        };
        let admitted = names.admitted(&AdmittedPacket {
            direction,
            endpoint,
            peer,
            protocol: headers.protocol,
            port: headers.ports.map(|p| p.1),
        });
        match admitted {
            Some(Admitted::Rule(origin)) => rule = Some(origin.to_string()),
            Some(Admitted::OwnNode) => reason = FlowReason::OwnNode,
            None => {}
        }
    }
    let peer = |ip: IpAddr, port: Option<u16>| FlowPeer {
        ip,
        port,
        pod: names.pod(ip).map(|p| p.to_string()),
    };
    Some(FlowRecord {
        time: rfc3339_millis(unix_ns),
        node: node.map(str::to_string),
        source: peer(headers.source, headers.ports.map(|p| p.0)),
        destination: peer(headers.destination, headers.ports.map(|p| p.1)),
        protocol: protocol_name(headers.protocol),
        direction: match direction {
            Direction::Ingress => FlowDirection::Ingress,
            Direction::Egress => FlowDirection::Egress,
        },
        verdict,
        reason,
        rule,
        policy,
        id: 0,
    })
}

/// Reads the socket until the task is aborted, publishing named records to `hub`.
pub async fn read(socket: NflogSocket, names: Arc<dyn FlowNames + Send + Sync>, hub: FlowHub) {
    // SAFETY: the socket owns its descriptor and keeps it open for as long as the AsyncFd
    // (which owns the socket) lives.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(err) => {
            log::error!(
                "flows: cannot poll the nfnetlink_log socket: {err}; `weir flows` gets nothing"
            );
            return;
        }
    };
    let mut lost_bursts = 0u64;
    loop {
        let Ok(mut guard) = fd.readable_mut().await else { return };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_nanos()
            as u64;
        let drained = guard.get_inner_mut().drain(|datagram| {
            for packet in parse_datagram(datagram) {
                if let Some(record) = record(&packet, names.as_ref(), hub.node(), now) {
                    hub.publish(record);
                }
            }
        });
        match drained {
            Ok(()) => guard.clear_ready(),
            Err(err) if err.raw_os_error() == Some(libc::ENOBUFS) => {
                lost_bursts += 1;
                if lost_bursts.is_power_of_two() {
                    log::warn!(
                        "flows: the kernel dropped logged packets for want of room \
                         ({lost_bursts} times so far): some flows are missing from `weir flows`"
                    );
                }
            }
            Err(err) => {
                log::error!("flows: reading the nfnetlink_log socket: {err}; `weir flows` stops");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
