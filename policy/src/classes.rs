//! CIDR classes: how a datapath with one longest-prefix-match lookup per packet decides ipBlock
//! membership for any number of overlapping blocks with excepts.
//!
//! Take every prefix that appears as an ipBlock cidr or except. An address belongs to the
//! class of the longest of those prefixes that contains it (class 0 when none does). Because
//! prefixes are either nested or disjoint, an address of class P is inside a block (cidr C,
//! excepts E) exactly when C contains P and no except contains P: membership is a function
//! of the class, so "block allows address" becomes "block allows class", a fixed set of class
//! ids computed here, and the datapath needs one LPM lookup for the address plus one exact
//! lookup per (class, rule) key.
use std::{collections::BTreeMap, net::IpAddr};

use crate::{cidr::Cidr, identity::IdAllocator, input::IpBlock};

/// Class of an address inside no listed prefix.
pub const NO_CLASS: u32 = 0;

#[derive(Clone, Debug)]
pub struct CidrClasses {
    ids: IdAllocator<Cidr>,
    classes: BTreeMap<Cidr, u32>,
}

impl Default for CidrClasses {
    fn default() -> Self {
        Self { ids: IdAllocator::new(NO_CLASS + 1), classes: BTreeMap::new() }
    }
}

impl CidrClasses {
    /// Sets the prefixes to those of `blocks`; prefixes already known keep their class id.
    pub fn update<'a>(&mut self, blocks: impl IntoIterator<Item = &'a IpBlock>) {
        let prefixes = blocks
            .into_iter()
            .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()));
        self.classes = self.ids.assign(prefixes);
    }

    /// The incremental form of [`CidrClasses::update`]: `gone` prefixes give their class ids
    /// back, `new` ones get ids as `update` would give them.
    pub fn change(
        &mut self,
        gone: impl IntoIterator<Item = Cidr>,
        new: impl IntoIterator<Item = Cidr>,
    ) {
        let gone: Vec<Cidr> = gone.into_iter().collect();
        let new: Vec<Cidr> = new.into_iter().collect();
        self.ids.change(gone.iter().copied(), new.iter().copied());
        for prefix in gone {
            self.classes.remove(&prefix);
        }
        for prefix in new {
            if let Some(class) = self.ids.get(&prefix) {
                self.classes.insert(prefix, class);
            }
        }
    }

    /// Every prefix and its class: the LPM entries.
    pub fn prefixes(&self) -> &BTreeMap<Cidr, u32> {
        &self.classes
    }

    /// The class of an address: that of the longest listed prefix containing it (one map
    /// lookup per prefix length, whatever the number of prefixes).
    pub fn class_of(&self, ip: IpAddr) -> u32 {
        let host = Cidr::host(ip).prefix_len();
        (0..=host)
            .rev()
            .filter_map(|len| Cidr::new(ip, len))
            .find_map(|prefix| self.classes.get(&prefix).copied())
            .unwrap_or(NO_CLASS)
    }

    /// The classes whose addresses are all in `block` (and together are all of it). Prefixes
    /// order by address, so those inside the block are one range of the map.
    pub fn classes_in(&self, block: &IpBlock) -> Vec<u32> {
        let first = block.cidr;
        let last = Cidr::host(block.cidr.last());
        self.classes
            .range(first..=last)
            .filter(|(prefix, _)| {
                block.cidr.contains(prefix) && !block.except.iter().any(|e| e.contains(prefix))
            })
            .map(|(_, class)| *class)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(cidr: &str, except: &[&str]) -> IpBlock {
        IpBlock {
            cidr: cidr.parse().unwrap(),
            except: except.iter().map(|e| e.parse().unwrap()).collect(),
        }
    }

    /// Class membership equals direct membership for overlapping blocks with excepts.
    #[test]
    fn class_membership_equals_block_membership() {
        let blocks = [
            block("10.0.0.0/8", &["10.1.0.0/16", "10.2.3.0/24"]),
            block("10.1.0.0/16", &["10.1.1.0/24"]),
            block("10.1.1.128/25", &[]),
            block("0.0.0.0/0", &["10.0.0.0/8"]),
            block("192.168.1.7/32", &[]),
            block("fd00::/8", &["fd00:1::/32"]),
        ];
        let mut classes = CidrClasses::default();
        classes.update(&blocks);
        let allowed: Vec<Vec<u32>> = blocks.iter().map(|b| classes.classes_in(b)).collect();
        let mut seed = 0x1234_5678u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let samples: Vec<IpAddr> = (0..20_000)
            .map(|_| {
                let r = next();
                match r % 4 {
                    0 => {
                        IpAddr::from([10, (r >> 8) as u8 % 4, (r >> 16) as u8 % 4, (r >> 24) as u8])
                    }
                    1 => IpAddr::from([192, 168, 1, (r >> 8) as u8 % 10]),
                    2 => IpAddr::V4(std::net::Ipv4Addr::from((r >> 8) as u32)),
                    _ => IpAddr::V6(std::net::Ipv6Addr::from(
                        ((0xfd00u128 << 112) | u128::from(r >> 8)) ^ (u128::from(r % 3) << 96),
                    )),
                }
            })
            .collect();
        for ip in samples {
            let class = classes.class_of(ip);
            for (block, allowed) in blocks.iter().zip(&allowed) {
                assert_eq!(block.contains(ip), allowed.contains(&class), "{ip} in {block}");
            }
        }
    }
}
