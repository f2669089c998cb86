//! Building and checking Ethernet + IPv4 + TCP/UDP/SCTP packets for BPF_PROG_TEST_RUN tests
//! (and IPv6 packets for the policy programs), and SCTP segments for raw sockets.
//!
//! The builder writes correct IPv4 and L4 checksums; the checkers recompute them from scratch,
//! so a test can prove that a program's incremental checksum updates are right.
use std::net::Ipv4Addr;

use weir_common::proto;

pub const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;

/// One IPv4 TCP or UDP packet, in host terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    /// [`proto::TCP`], [`proto::UDP`] or [`proto::SCTP`] (the payload is then the chunks).
    pub proto: u8,
    pub payload: Vec<u8>,
}

impl Ipv4Packet {
    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self { src, dst, sport, dport, proto: proto::TCP, payload: b"hello".to_vec() }
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self { src, dst, sport, dport, proto: proto::UDP, payload: b"hello".to_vec() }
    }

    /// An SCTP packet carrying an INIT chunk.
    pub fn sctp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self { src, dst, sport, dport, proto: proto::SCTP, payload: sctp_init_chunk(0x0102_0304) }
    }

    fn l4_header_len(&self) -> usize {
        l4_header_len(self.proto)
    }

    /// The packet on the wire, with valid checksums.
    pub fn build(&self) -> Vec<u8> {
        let l4_len = self.l4_header_len() + self.payload.len();
        let total = IPV4_HLEN + l4_len;
        let mut p = Vec::with_capacity(ETH_HLEN + total);
        p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // destination MAC
        p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // source MAC
        p.extend_from_slice(&0x0800u16.to_be_bytes());
        p.push(0x45);
        p.push(0);
        p.extend_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&[0x12, 0x34, 0x40, 0x00]); // id, DF
        p.push(64);
        p.push(self.proto);
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.extend_from_slice(&self.sport.to_be_bytes());
        p.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == proto::TCP {
            p.extend_from_slice(&1u32.to_be_bytes()); // seq
            p.extend_from_slice(&0u32.to_be_bytes()); // ack
            p.extend_from_slice(&[0x50, 0x02]); // data offset 5, SYN
            p.extend_from_slice(&64240u16.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        } else if self.proto == proto::SCTP {
            p.extend_from_slice(&[0; 8]); // verification tag (0 for an INIT), checksum
        } else {
            p.extend_from_slice(&(l4_len as u16).to_be_bytes());
            p.extend_from_slice(&[0, 0]);
        }
        p.extend_from_slice(&self.payload);
        let ip_csum = checksum(&p[ETH_HLEN..ETH_HLEN + IPV4_HLEN], 0);
        p[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&ip_csum.to_be_bytes());
        if self.proto == proto::SCTP {
            fill_sctp_checksum(&mut p[ETH_HLEN + IPV4_HLEN..]);
        } else {
            let off = l4_csum_offset(self.proto);
            let l4_csum = l4_checksum(&p);
            p[off..off + 2].copy_from_slice(&l4_csum.to_be_bytes());
        }
        p
    }

    /// Parses a packet made by [`Self::build`] (or rewritten from one).
    pub fn parse(p: &[u8]) -> Option<Self> {
        let ip = p.get(ETH_HLEN..ETH_HLEN + IPV4_HLEN)?;
        let proto = ip[9];
        let l4 = p.get(ETH_HLEN + IPV4_HLEN..)?;
        let header = l4_header_len(proto);
        Some(Self {
            src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            sport: u16::from_be_bytes([*l4.first()?, *l4.get(1)?]),
            dport: u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]),
            proto,
            payload: l4.get(header..)?.to_vec(),
        })
    }
}

fn l4_header_len(proto: u8) -> usize {
    match proto {
        proto::TCP => 20,
        proto::SCTP => 12,
        _ => 8,
    }
}

fn l4_csum_offset(proto: u8) -> usize {
    ETH_HLEN + IPV4_HLEN + if proto == proto::TCP { 16 } else { 6 }
}

/// SCTP's CRC32c of `segment` (common header and chunks) with its checksum field taken as
/// zero, bit by bit from the definition (RFC 9260, appendix A), independent of the datapath's
/// incremental update.
pub fn sctp_checksum(segment: &[u8]) -> u32 {
    let mut crc = !0u32;
    for (i, &byte) in segment.iter().enumerate() {
        crc ^= u32::from(if (8..12).contains(&i) { 0 } else { byte });
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

/// Writes a correct checksum into an SCTP segment (stored little-endian, as the kernel does).
pub fn fill_sctp_checksum(segment: &mut [u8]) {
    let crc = sctp_checksum(segment);
    segment[8..12].copy_from_slice(&crc.to_le_bytes());
}

/// True when an SCTP segment's checksum is valid.
pub fn sctp_checksum_ok(segment: &[u8]) -> bool {
    segment.len() >= 12 && segment[8..12] == sctp_checksum(segment).to_le_bytes()
}

/// An SCTP INIT chunk (RFC 9260, 3.3.2) with initiate tag `tag` and no parameters.
pub fn sctp_init_chunk(tag: u32) -> Vec<u8> {
    let mut chunk = vec![1, 0];
    chunk.extend_from_slice(&20u16.to_be_bytes());
    chunk.extend_from_slice(&tag.to_be_bytes());
    chunk.extend_from_slice(&65_535u32.to_be_bytes()); // advertised receiver window
    chunk.extend_from_slice(&[0, 10, 0, 10]); // outbound and inbound streams
    chunk.extend_from_slice(&tag.wrapping_add(1).to_be_bytes()); // initial TSN
    chunk
}

/// An SCTP segment: common header with a valid checksum, then `chunks`.
pub fn sctp_segment(sport: u16, dport: u16, verification_tag: u32, chunks: &[u8]) -> Vec<u8> {
    let mut segment = Vec::with_capacity(12 + chunks.len());
    segment.extend_from_slice(&sport.to_be_bytes());
    segment.extend_from_slice(&dport.to_be_bytes());
    segment.extend_from_slice(&verification_tag.to_be_bytes());
    segment.extend_from_slice(&[0; 4]);
    segment.extend_from_slice(chunks);
    fill_sctp_checksum(&mut segment);
    segment
}

/// The Internet checksum (RFC 1071) of `data`, starting from the partial sum `initial`.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The L4 checksum of the packet computed over pseudo-header and segment with the checksum
/// field zeroed (what a correct sender writes).
fn l4_checksum(p: &[u8]) -> u16 {
    let ip = &p[ETH_HLEN..ETH_HLEN + IPV4_HLEN];
    let (proto, segment) = (ip[9], &p[ETH_HLEN + IPV4_HLEN..]);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    segment_checksum(&pseudo, segment, proto)
}

/// The TCP/UDP checksum of `segment` (its checksum field taken as zero) after `pseudo`.
fn segment_checksum(pseudo: &[u8], segment: &[u8], proto: u8) -> u16 {
    let mut segment = segment.to_vec();
    let off = if proto == proto::TCP { 16 } else { 6 };
    segment[off] = 0;
    segment[off + 1] = 0;
    let partial = u32::from(!checksum(pseudo, 0));
    let csum = checksum(&segment, partial);
    if proto == proto::UDP && csum == 0 { 0xffff } else { csum }
}

/// True when the IPv4 header checksum is valid.
pub fn ipv4_checksum_ok(p: &[u8]) -> bool {
    checksum(&p[ETH_HLEN..ETH_HLEN + IPV4_HLEN], 0) == 0
}

/// True when the TCP/UDP/SCTP checksum is valid (a UDP checksum of 0 means "none" and is
/// valid).
pub fn l4_checksum_ok(p: &[u8]) -> bool {
    let proto = p[ETH_HLEN + 9];
    if proto == proto::SCTP {
        return sctp_checksum_ok(&p[ETH_HLEN + IPV4_HLEN..]);
    }
    let off = l4_csum_offset(proto);
    let stored = u16::from_be_bytes([p[off], p[off + 1]]);
    if proto == proto::UDP && stored == 0 {
        return true;
    }
    stored == l4_checksum(p)
}

/// The TCP/UDP checksum of an IPv6 packet without extension headers (the checksum field
/// zeroed), over the IPv6 pseudo-header and the segment.
fn l4_checksum6(p: &[u8]) -> u16 {
    let ip = &p[ETH_HLEN..ETH_HLEN + 40];
    let (proto, segment) = (ip[6], &p[ETH_HLEN + 40..]);
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&ip[8..40]);
    pseudo.extend_from_slice(&(segment.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    segment_checksum(&pseudo, segment, proto)
}

/// Offset of the TCP/UDP checksum of an IPv6 packet without extension headers.
fn l4_csum_offset6(p: &[u8]) -> usize {
    ETH_HLEN + 40 + if p[ETH_HLEN + 6] == proto::TCP { 16 } else { 6 }
}

/// Writes a correct TCP/UDP/SCTP checksum into an IPv6 packet without extension headers.
pub fn fill_l4_checksum6(p: &mut [u8]) {
    if p[ETH_HLEN + 6] == proto::SCTP {
        return fill_sctp_checksum(&mut p[ETH_HLEN + 40..]);
    }
    let off = l4_csum_offset6(p);
    let csum = l4_checksum6(p);
    p[off..off + 2].copy_from_slice(&csum.to_be_bytes());
}

/// True when the TCP/UDP/SCTP checksum of an IPv6 packet without extension headers is valid.
pub fn l4_checksum6_ok(p: &[u8]) -> bool {
    if p[ETH_HLEN + 6] == proto::SCTP {
        return sctp_checksum_ok(&p[ETH_HLEN + 40..]);
    }
    let off = l4_csum_offset6(p);
    u16::from_be_bytes([p[off], p[off + 1]]) == l4_checksum6(p)
}

/// Sets the UDP checksum to 0 ("no checksum").
pub fn clear_udp_checksum(p: &mut [u8]) {
    let off = l4_csum_offset(proto::UDP);
    p[off] = 0;
    p[off + 1] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_packets_have_valid_checksums_and_round_trip() {
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let b = Ipv4Addr::new(10, 96, 0, 10);
        let packets = [
            Ipv4Packet::tcp(a, 40000, b, 80),
            Ipv4Packet::udp(a, 40000, b, 53),
            Ipv4Packet::sctp(a, 40000, b, 38412),
        ];
        for pkt in packets {
            let wire = pkt.build();
            assert!(ipv4_checksum_ok(&wire));
            assert!(l4_checksum_ok(&wire));
            assert_eq!(Ipv4Packet::parse(&wire), Some(pkt));
        }
    }

    #[test]
    fn a_flipped_bit_breaks_the_checksums() {
        let pkt = Ipv4Packet::tcp(Ipv4Addr::new(10, 0, 0, 1), 1, Ipv4Addr::new(10, 0, 0, 2), 2);
        let mut wire = pkt.build();
        wire[ETH_HLEN + 19] ^= 1; // last octet of the destination address
        assert!(!ipv4_checksum_ok(&wire));
        assert!(!l4_checksum_ok(&wire));

        // SCTP's checksum covers no address, but every byte of the segment.
        let mut wire =
            Ipv4Packet::sctp(Ipv4Addr::new(10, 0, 0, 1), 1, Ipv4Addr::new(10, 0, 0, 2), 2).build();
        assert!(l4_checksum_ok(&wire));
        wire[ETH_HLEN + 19] ^= 1;
        assert!(l4_checksum_ok(&wire));
        *wire.last_mut().unwrap() ^= 1;
        assert!(!l4_checksum_ok(&wire));
    }
}

/// An IPv6 extension header placed before the upper-layer header of an [`Ipv6Packet`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6Ext {
    /// Hop-by-hop options (8 bytes of padding options).
    HopByHop,
    /// Destination options (8 bytes of padding options).
    DestOptions,
    /// A fragment header with this fragment offset (in 8-byte units; 0: the first fragment).
    Fragment { offset: u16 },
}

/// One IPv6 packet for the policy programs (checksums are not filled in: the policy check
/// does not read them): TCP, UDP or SCTP with ports, or ICMPv6 of a type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv6Packet {
    pub src: std::net::Ipv6Addr,
    pub dst: std::net::Ipv6Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// For [`proto::ICMPV6`]: the ICMPv6 type.
    pub icmp_type: u8,
    pub ext: Vec<Ipv6Ext>,
}

impl Ipv6Packet {
    pub fn new(
        src: std::net::Ipv6Addr,
        sport: u16,
        dst: std::net::Ipv6Addr,
        dport: u16,
        proto: u8,
    ) -> Self {
        Self { src, dst, sport, dport, proto, icmp_type: 0, ext: Vec::new() }
    }

    pub fn icmp(src: std::net::Ipv6Addr, dst: std::net::Ipv6Addr, icmp_type: u8) -> Self {
        Self { icmp_type, ..Self::new(src, 0, dst, 0, proto::ICMPV6) }
    }

    pub fn build(&self) -> Vec<u8> {
        const NEXTHDR: [u8; 3] = [0, 60, 44];
        let code = |e: &Ipv6Ext| match e {
            Ipv6Ext::HopByHop => NEXTHDR[0],
            Ipv6Ext::DestOptions => NEXTHDR[1],
            Ipv6Ext::Fragment { .. } => NEXTHDR[2],
        };
        let mut body = Vec::new();
        for (i, ext) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or(self.proto, code);
            match ext {
                Ipv6Ext::HopByHop | Ipv6Ext::DestOptions => {
                    body.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
                }
                Ipv6Ext::Fragment { offset } => {
                    body.extend_from_slice(&[next, 0]);
                    body.extend_from_slice(&((offset << 3) | 1).to_be_bytes());
                    body.extend_from_slice(&0x1234_5678u32.to_be_bytes());
                }
            }
        }
        if self.proto == proto::ICMPV6 {
            body.extend_from_slice(&[self.icmp_type, 0, 0, 0, 0, 0, 0, 0]);
        } else {
            body.extend_from_slice(&self.sport.to_be_bytes());
            body.extend_from_slice(&self.dport.to_be_bytes());
            body.extend_from_slice(&[0; 16]); // the rest of a TCP header (or UDP + payload)
        }
        let mut p = Vec::with_capacity(ETH_HLEN + 40 + body.len());
        p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        p.extend_from_slice(&0x86ddu16.to_be_bytes());
        p.extend_from_slice(&[0x60, 0, 0, 0]);
        p.extend_from_slice(&(body.len() as u16).to_be_bytes());
        p.push(self.ext.first().map_or(self.proto, code));
        p.push(64);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.extend_from_slice(&body);
        p
    }
}
