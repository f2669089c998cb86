//! Numeric identities: one per distinct (namespace, namespace labels, pod labels, named
//! container ports) set, so that every pod with an identity is selected by exactly the same
//! policy peers and resolves named ports to the same numbers. Reserved identities name what is
//! not a pod.
use std::collections::{BTreeMap, BTreeSet};

use crate::{input::NamedPort, selector::Labels};

/// Not known yet (the CNI plugin's placeholder in `weir_endpoints_v1`).
pub const IDENTITY_UNKNOWN: u32 = 0;
/// The node itself (its addresses): always allowed into its own pods.
pub const IDENTITY_HOST: u32 = 1;
/// Any address that is neither a pod nor a node.
pub const IDENTITY_WORLD: u32 = 2;
/// The first identity given to pods.
pub const FIRST_POD_IDENTITY: u32 = 256;

/// What pods of one identity share.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityKey {
    pub namespace: String,
    pub namespace_labels: Labels,
    pub pod_labels: Labels,
    pub named_ports: Vec<NamedPort>,
}

/// Hands out small numbers to keys and keeps them stable across calls while the key exists,
/// so successive compilations differ only where the cluster changed.
#[derive(Clone, Debug)]
pub struct IdAllocator<K: Ord + Clone> {
    ids: BTreeMap<K, u32>,
    free: BTreeSet<u32>,
    next: u32,
}

impl<K: Ord + Clone> IdAllocator<K> {
    pub fn new(first: u32) -> Self {
        Self { ids: BTreeMap::new(), free: BTreeSet::new(), next: first }
    }

    /// Numbers for exactly `keys`: known keys keep theirs, new keys take the lowest free one,
    /// and keys not listed give theirs back.
    pub fn assign(&mut self, keys: impl IntoIterator<Item = K>) -> BTreeMap<K, u32> {
        let wanted: BTreeSet<K> = keys.into_iter().collect();
        let gone: Vec<K> = self.ids.keys().filter(|k| !wanted.contains(*k)).cloned().collect();
        let new: Vec<K> = wanted.into_iter().filter(|k| !self.ids.contains_key(k)).collect();
        self.change(gone, new);
        self.ids.clone()
    }

    /// The incremental form of [`IdAllocator::assign`]: `gone` give their numbers back, then
    /// `new` (taken in key order) get the lowest free ones. After it the numbers are exactly
    /// those `assign` would give for the resulting set of keys.
    pub fn change(&mut self, gone: impl IntoIterator<Item = K>, new: impl IntoIterator<Item = K>) {
        for key in gone {
            if let Some(id) = self.ids.remove(&key) {
                self.free.insert(id);
            }
        }
        let new: BTreeSet<K> = new.into_iter().collect();
        for key in new {
            if !self.ids.contains_key(&key) {
                let id = match self.free.pop_first() {
                    Some(id) => id,
                    None => {
                        self.next += 1;
                        self.next - 1
                    }
                };
                self.ids.insert(key, id);
            }
        }
    }

    /// The number of `key`, if it has one.
    pub fn get(&self, key: &K) -> Option<u32> {
        self.ids.get(key).copied()
    }

    /// Every key and its number.
    pub fn ids(&self) -> &BTreeMap<K, u32> {
        &self.ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_reused() {
        let mut ids = IdAllocator::new(10);
        let first = ids.assign(["a", "b", "c"]);
        assert_eq!(first, BTreeMap::from([("a", 10), ("b", 11), ("c", 12)]));
        let second = ids.assign(["a", "c", "d"]);
        assert_eq!(second, BTreeMap::from([("a", 10), ("c", 12), ("d", 11)]));
        let third = ids.assign(["a", "c", "d", "e"]);
        assert_eq!(third["e"], 13);
        let mut step = ids.clone();
        step.change(["c", "d"], ["g", "f"]);
        assert_eq!(step.ids(), &ids.assign(["a", "e", "f", "g"]));
    }
}
