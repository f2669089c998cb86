//! Masquerade for pod traffic leaving the cluster network: an nftables table owned by the agent,
//! written with nf_tables netlink messages (no `nft` binary).
//!
//! The table (family `ip`, name from `--nft-table-nat`) holds one base chain and two rules:
//!
//! ```text
//! table ip <name> {
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ip saddr <cluster-cidr> ip daddr != <cluster-cidr> masquerade fully-random
//!         ip saddr != <cluster-cidr> ip daddr <cluster-cidr> ip daddr != <local pod cidr> masquerade fully-random
//!     }
//! }
//! ```
//!
//! An IPv6 cluster CIDR gets the same table and rules in family `ip6` (`ip6 saddr ...`), with
//! the same name: each family's table is written, checked and deleted on its own.
//!
//! It is written as one atomic batch (create, delete, create: whatever was there is replaced),
//! so a half-written table is never visible. Conntrack keeps existing NAT bindings, so
//! rewriting the table does not disturb established connections.
use std::io;

use weir_cni_plugin::netlink::{Msg, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, Socket, octets};

use super::model::IpCidr;
// The nf_tables protocol numbers, shared with the nftables dataplane.
use crate::apply::nft::netlink::{
    NETLINK_NETFILTER, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES,
    NFPROTO_IPV4, NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE, NFT_MSG_NEWTABLE,
    NFTA_CHAIN_HOOK, NFTA_CHAIN_NAME, NFTA_CHAIN_POLICY, NFTA_CHAIN_TABLE, NFTA_CHAIN_TYPE,
    NFTA_DATA_VALUE, NFTA_EXPR_DATA, NFTA_EXPR_NAME, NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY,
    NFTA_LIST_ELEM, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_TABLE, NFTA_TABLE_NAME,
    NLM_F_APPEND,
};

const NFT_MSG_GETTABLE: u16 = 1;

const NF_INET_POST_ROUTING: u32 = 4;
/// `srcnat`.
const NF_IP_PRI_NAT_SRC: i32 = 100;
const NF_ACCEPT: u32 = 1;

const NFT_REG_1: u32 = 1;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFTA_MASQ_FLAGS: u16 = 1;
const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 0x10;

/// nf_tables' family number for `ip6` tables (the `ip` one is shared with the dataplane).
const NFPROTO_IPV6: u8 = libc::NFPROTO_IPV6 as u8;

/// Which address of the network header a rule matches.
#[derive(Clone, Copy)]
enum Field {
    Saddr,
    Daddr,
}

/// (offset, length) of `field` in the IPv4 or IPv6 header.
fn header_field(v6: bool, field: Field) -> (u32, u32) {
    match (v6, field) {
        (false, Field::Saddr) => (12, 4),
        (false, Field::Daddr) => (16, 4),
        (true, Field::Saddr) => (8, 16),
        (true, Field::Daddr) => (24, 16),
    }
}

fn nfproto(v6: bool) -> u8 {
    if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }
}

const CHAIN: &str = "postrouting";

fn nft_msg(kind: u16, flags: u16, family: u8) -> Msg {
    let mut msg = Msg::new((NFNL_SUBSYS_NFTABLES << 8) | kind, flags);
    // struct nfgenmsg: family, version (NFNETLINK_V0), res_id (big endian).
    msg.raw(&[family, 0, 0, 0]);
    msg
}

fn batch_marker(kind: u16) -> Msg {
    let mut msg = Msg::new(kind, NLM_F_REQUEST);
    let res_id = NFNL_SUBSYS_NFTABLES.to_be_bytes();
    msg.raw(&[libc::AF_UNSPEC as u8, 0, res_id[0], res_id[1]]);
    msg
}

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

fn table_msg(kind: u16, flags: u16, v6: bool, table: &str) -> Msg {
    let mut msg = nft_msg(kind, flags, nfproto(v6));
    msg.attr_str(NFTA_TABLE_NAME, table);
    msg
}

fn expr(msg: &mut Msg, name: &str, data: impl FnOnce(&mut Msg)) {
    let elem = msg.begin_nested(NFTA_LIST_ELEM);
    msg.attr_str(NFTA_EXPR_NAME, name);
    let at = msg.begin_nested(NFTA_EXPR_DATA);
    data(msg);
    msg.end_nested(at);
    msg.end_nested(elem);
}

fn data_value(msg: &mut Msg, kind: u16, value: &[u8]) {
    let at = msg.begin_nested(kind);
    msg.attr(NFTA_DATA_VALUE, value);
    msg.end_nested(at);
}

/// `ip[6] <saddr|daddr> <op> <cidr>`: load the address, mask it, compare with the network.
fn match_address(msg: &mut Msg, field: Field, op: u32, cidr: &IpCidr) {
    let (offset, len) = header_field(cidr.is_ipv6(), field);
    expr(msg, "payload", |m| {
        m.attr(NFTA_PAYLOAD_DREG, &be32(NFT_REG_1))
            .attr(NFTA_PAYLOAD_BASE, &be32(NFT_PAYLOAD_NETWORK_HEADER))
            .attr(NFTA_PAYLOAD_OFFSET, &be32(offset))
            .attr(NFTA_PAYLOAD_LEN, &be32(len));
    });
    expr(msg, "bitwise", |m| {
        m.attr(NFTA_BITWISE_SREG, &be32(NFT_REG_1))
            .attr(NFTA_BITWISE_DREG, &be32(NFT_REG_1))
            .attr(NFTA_BITWISE_LEN, &be32(len));
        data_value(m, NFTA_BITWISE_MASK, &octets(&cidr.mask()));
        data_value(m, NFTA_BITWISE_XOR, &vec![0; len as usize]);
    });
    expr(msg, "cmp", |m| {
        m.attr(NFTA_CMP_SREG, &be32(NFT_REG_1)).attr(NFTA_CMP_OP, &be32(op));
        data_value(m, NFTA_CMP_DATA, &octets(&cidr.network));
    });
}

/// A masquerade rule matching `(field, op, cidr)` on every one of `matches`.
fn masquerade_rule(table: &str, v6: bool, matches: &[(Field, u32, &IpCidr)]) -> Msg {
    let mut rule = nft_msg(
        NFT_MSG_NEWRULE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND,
        nfproto(v6),
    );
    rule.attr_str(NFTA_RULE_TABLE, table).attr_str(NFTA_RULE_CHAIN, CHAIN);
    let exprs = rule.begin_nested(NFTA_RULE_EXPRESSIONS);
    for &(field, op, cidr) in matches {
        match_address(&mut rule, field, op, cidr);
    }
    expr(&mut rule, "masq", |m| {
        m.attr(NFTA_MASQ_FLAGS, &be32(NF_NAT_RANGE_PROTO_RANDOM_FULLY));
    });
    rule.end_nested(exprs);
    rule
}

fn open() -> io::Result<Socket> {
    Socket::open_protocol(NETLINK_NETFILTER)
}

/// Writes the masquerade table for `cluster_cidr` (in family `ip` or `ip6`, after the CIDR),
/// replacing whatever table of that name and family was there, in one atomic batch. With this node's `local_pod_cidr`, a second rule masquerades
/// traffic from outside the cluster network that the node forwards to pods of other nodes
/// (node ports and external IPs translated by the eBPF load balancer to a remote backend):
/// the backend's reply then comes back through this node, which translates it back
/// (kube-proxy's masquerade for `externalTrafficPolicy: Cluster`). Local pods keep seeing the
/// client's address.
pub fn write_masquerade(
    table: &str,
    cluster_cidr: &IpCidr,
    local_pod_cidr: Option<&IpCidr>,
) -> io::Result<()> {
    let v6 = cluster_cidr.is_ipv6();
    let mut sock = open()?;
    let create = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE;
    let mut chain = nft_msg(NFT_MSG_NEWCHAIN, create, nfproto(v6));
    chain.attr_str(NFTA_CHAIN_TABLE, table).attr_str(NFTA_CHAIN_NAME, CHAIN);
    let hook = chain.begin_nested(NFTA_CHAIN_HOOK);
    chain
        .attr(NFTA_HOOK_HOOKNUM, &be32(NF_INET_POST_ROUTING))
        .attr(NFTA_HOOK_PRIORITY, &NF_IP_PRI_NAT_SRC.to_be_bytes());
    chain.end_nested(hook);
    chain.attr(NFTA_CHAIN_POLICY, &be32(NF_ACCEPT)).attr_str(NFTA_CHAIN_TYPE, "nat");

    let outbound =
        [(Field::Saddr, NFT_CMP_EQ, cluster_cidr), (Field::Daddr, NFT_CMP_NEQ, cluster_cidr)];
    let mut messages = vec![
        (batch_marker(NFNL_MSG_BATCH_BEGIN), false),
        // Create (a no-op when it exists), delete, create: replaces any previous content.
        (table_msg(NFT_MSG_NEWTABLE, create, v6, table), true),
        (table_msg(NFT_MSG_DELTABLE, NLM_F_REQUEST | NLM_F_ACK, v6, table), true),
        (table_msg(NFT_MSG_NEWTABLE, create, v6, table), true),
        (chain, true),
        (masquerade_rule(table, v6, &outbound), true),
    ];
    if let Some(local) = local_pod_cidr {
        let forwarded = [
            (Field::Saddr, NFT_CMP_NEQ, cluster_cidr),
            (Field::Daddr, NFT_CMP_EQ, cluster_cidr),
            (Field::Daddr, NFT_CMP_NEQ, local),
        ];
        messages.push((masquerade_rule(table, v6, &forwarded), true));
    }
    messages.push((batch_marker(NFNL_MSG_BATCH_END), false));
    sock.request_batch(messages)
}

/// Whether the table exists (family `ip6` with `v6`, else `ip`).
pub fn table_exists(table: &str, v6: bool) -> io::Result<bool> {
    let mut sock = open()?;
    match sock.request(table_msg(NFT_MSG_GETTABLE, NLM_F_REQUEST | NLM_F_ACK, v6, table)) {
        Ok(()) => Ok(true),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(err) => Err(err),
    }
}

/// Deletes the table (family `ip6` with `v6`, else `ip`); `Ok(false)` when there was none.
pub fn delete_table(table: &str, v6: bool) -> io::Result<bool> {
    if !table_exists(table, v6)? {
        return Ok(false);
    }
    let mut sock = open()?;
    sock.request_batch(vec![
        (batch_marker(NFNL_MSG_BATCH_BEGIN), false),
        (table_msg(NFT_MSG_DELTABLE, NLM_F_REQUEST | NLM_F_ACK, v6, table), true),
        (batch_marker(NFNL_MSG_BATCH_END), false),
    ])?;
    Ok(true)
}
