//! The built-in allocator: pure, no I/O. Given the configured range sets, the current
//! reservations and the last address handed out per range set, it picks the next free address
//! of each set.
//!
//! Contract:
//! - One address per range set (one set per address family: dual stack is two sets).
//! - Within a set, ranges are tried in order; within a range, the search starts after the last
//!   address handed out (round robin), so a just-released address is not reused at once.
//! - The network address, the IPv4 broadcast address and a configured gateway are never handed
//!   out.
//! - No free address in some set is [`Exhausted`], and nothing is reserved for any set.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::net::{IpNet, from_int, to_int};

/// One range: a subnet, optionally narrowed to `[start, end]`, and a gateway to skip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNet,
    pub start: Option<IpAddr>,
    pub end: Option<IpAddr>,
    pub gateway: Option<IpAddr>,
}

impl Range {
    pub fn new(subnet: IpNet) -> Self {
        Self { subnet, start: None, end: None, gateway: None }
    }

    /// The addresses that may be handed out, as an inclusive integer interval.
    fn usable(&self) -> Option<(u128, u128)> {
        let (mut first, mut last) = (self.subnet.first(), self.subnet.last());
        let host_bits = self.subnet.bits() - self.subnet.prefix;
        if host_bits >= 2 {
            first += 1; // the network address (IPv6: the subnet-router anycast address)
            if self.subnet.is_v4() {
                last -= 1; // broadcast
            }
        }
        if let Some(start) = self.start {
            first = first.max(to_int(start));
        }
        if let Some(end) = self.end {
            last = last.min(to_int(end));
        }
        (first <= last).then_some((first, last))
    }

    /// How many addresses this range can hand out.
    pub fn capacity(&self) -> u128 {
        match self.usable() {
            None => 0,
            Some((first, last)) => {
                let gw = self.gateway.map(to_int).filter(|g| (first..=last).contains(g));
                (last - first).saturating_add(1) - u128::from(gw.is_some())
            }
        }
    }
}

/// The ranges of one address family.
pub type RangeSet = Vec<Range>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no free address left in {range}")]
pub struct Exhausted {
    pub range: String,
}

/// Picks one free address per set. `taken` holds every reserved address; `last` the last
/// address handed out per set index.
pub fn allocate(
    sets: &[RangeSet],
    taken: &BTreeSet<IpAddr>,
    last: &BTreeMap<usize, IpAddr>,
) -> Result<Vec<(IpAddr, IpNet)>, Exhausted> {
    let mut picked = Vec::with_capacity(sets.len());
    for (index, set) in sets.iter().enumerate() {
        let found = pick(set, taken, last.get(&index).copied()).ok_or_else(|| Exhausted {
            range: set.iter().map(|r| r.subnet.to_string()).collect::<Vec<_>>().join(", "),
        })?;
        picked.push(found);
    }
    Ok(picked)
}

fn pick(set: &[Range], taken: &BTreeSet<IpAddr>, last: Option<IpAddr>) -> Option<(IpAddr, IpNet)> {
    if set.is_empty() {
        return None;
    }
    // Visit order: the range holding `last` from just after it, the other ranges, then the
    // beginning of that first range up to `last` (the wrap-around).
    let start = last.and_then(|l| set.iter().position(|r| r.subnet.contains(l)));
    let after = start.and(last).map(to_int);
    let first_index = start.unwrap_or(0);
    let mut segments = Vec::with_capacity(set.len() + 1);
    for step in 0..set.len() {
        let index = (first_index + step) % set.len();
        let Some((lo, hi)) = set[index].usable() else { continue };
        match (step, after) {
            (0, Some(a)) => segments.push((index, lo.max(a.saturating_add(1)), hi)),
            _ => segments.push((index, lo, hi)),
        }
    }
    if let (Some(a), Some((lo, hi))) = (after, set[first_index].usable()) {
        segments.push((first_index, lo, hi.min(a)));
    }
    segments.into_iter().filter(|(_, lo, hi)| lo <= hi).find_map(|(index, lo, hi)| {
        let range = &set[index];
        first_free(lo, hi, range.subnet.is_v4(), range.gateway, taken).map(|ip| (ip, range.subnet))
    })
}

/// The first address in `[lo, hi]` that is neither taken nor the gateway. Skips runs of taken
/// addresses through the ordered set instead of probing one by one.
fn first_free(
    lo: u128,
    hi: u128,
    v4: bool,
    gateway: Option<IpAddr>,
    taken: &BTreeSet<IpAddr>,
) -> Option<IpAddr> {
    let mut candidate = lo;
    let from = from_int(lo, v4);
    let to = from_int(hi, v4);
    let mut blocked = taken.range(from..=to).map(|ip| to_int(*ip)).peekable();
    let gw = gateway.map(to_int);
    while candidate <= hi {
        while blocked.peek().is_some_and(|b| *b < candidate) {
            blocked.next();
        }
        if blocked.peek() == Some(&candidate) || gw == Some(candidate) {
            if candidate == hi {
                return None;
            }
            candidate += 1;
            continue;
        }
        return Some(from_int(candidate, v4));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(subnet: &str) -> RangeSet {
        vec![Range::new(subnet.parse().unwrap())]
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn skips_network_broadcast_and_gateway() {
        let mut r = Range::new("10.0.0.0/30".parse().unwrap());
        assert_eq!(r.capacity(), 2);
        r.gateway = Some(ip("10.0.0.1"));
        assert_eq!(r.capacity(), 1);
        let got = allocate(&[vec![r.clone()]], &BTreeSet::new(), &BTreeMap::new()).unwrap();
        assert_eq!(got[0].0, ip("10.0.0.2"));
        let taken = BTreeSet::from([ip("10.0.0.2")]);
        assert!(allocate(&[vec![r]], &taken, &BTreeMap::new()).is_err());
    }

    #[test]
    fn a_slash_24_hands_out_254_distinct_addresses_then_is_exhausted() {
        let sets = [set("10.9.0.0/24")];
        let mut taken = BTreeSet::new();
        let mut last = BTreeMap::new();
        for _ in 0..254 {
            let got = allocate(&sets, &taken, &last).unwrap();
            assert!(taken.insert(got[0].0), "duplicate {}", got[0].0);
            last.insert(0, got[0].0);
        }
        assert!(!taken.contains(&ip("10.9.0.0")) && !taken.contains(&ip("10.9.0.255")));
        let err = allocate(&sets, &taken, &last).unwrap_err();
        assert_eq!(err.range, "10.9.0.0/24");
    }

    #[test]
    fn round_robin_continues_after_the_last_and_wraps() {
        let sets = [set("10.9.0.0/29")]; // usable .1 - .6
        let taken = BTreeSet::from([ip("10.9.0.1")]);
        let last = BTreeMap::from([(0, ip("10.9.0.3"))]);
        assert_eq!(allocate(&sets, &taken, &last).unwrap()[0].0, ip("10.9.0.4"));
        let last = BTreeMap::from([(0, ip("10.9.0.6"))]);
        assert_eq!(allocate(&sets, &taken, &last).unwrap()[0].0, ip("10.9.0.2"));
        // Released right after being handed out: not reused while others are free.
        let taken = BTreeSet::new();
        let last = BTreeMap::from([(0, ip("10.9.0.2"))]);
        assert_eq!(allocate(&sets, &taken, &last).unwrap()[0].0, ip("10.9.0.3"));
    }

    #[test]
    fn start_end_narrow_a_range_and_several_ranges_are_tried_in_order() {
        let mut a = Range::new("10.1.0.0/24".parse().unwrap());
        a.start = Some(ip("10.1.0.10"));
        a.end = Some(ip("10.1.0.11"));
        let b = Range::new("10.2.0.0/30".parse().unwrap());
        let sets = [vec![a, b]];
        let mut taken = BTreeSet::new();
        let mut last = BTreeMap::new();
        let mut order = Vec::new();
        for _ in 0..4 {
            let (got, _) = allocate(&sets, &taken, &last).unwrap()[0];
            taken.insert(got);
            last.insert(0, got);
            order.push(got.to_string());
        }
        assert_eq!(order, ["10.1.0.10", "10.1.0.11", "10.2.0.1", "10.2.0.2"]);
        assert!(allocate(&sets, &taken, &last).is_err());
    }

    #[test]
    fn dual_stack_picks_one_per_family_or_nothing() {
        let sets = [set("10.3.0.0/30"), set("fd00::/126")];
        let got = allocate(&sets, &BTreeSet::new(), &BTreeMap::new()).unwrap();
        assert_eq!(got[0].0, ip("10.3.0.1"));
        assert_eq!(got[1].0, ip("fd00::1"));
        let taken = BTreeSet::from([ip("fd00::1"), ip("fd00::2"), ip("fd00::3")]);
        assert!(allocate(&sets, &taken, &BTreeMap::new()).is_err());
        let big = [set("fd00::/64")];
        assert_eq!(allocate(&big, &BTreeSet::new(), &BTreeMap::new()).unwrap()[0].0, ip("fd00::1"));
    }
}
