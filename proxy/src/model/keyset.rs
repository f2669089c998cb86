//! [`KeySet`]: a small sorted set of `namespace/name` keys.
//!
//! The model keeps one such set per frontend (the services that render it) and per service
//! (its EndpointSlices). Nearly all of them hold one key, and a `BTreeSet` allocates a node
//! with room for eleven: at 10k services that was megabytes of empty slots. A sorted `Vec`
//! holds exactly what is in it; sets this small are searched as fast.

/// Keys, sorted and without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySet(Vec<String>);

impl KeySet {
    /// Adds `key`; false if it was there already.
    pub fn insert(&mut self, key: &str) -> bool {
        match self.0.binary_search_by(|k| k.as_str().cmp(key)) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, key.to_string());
                true
            }
        }
    }

    /// Removes `key`; false if it was not there.
    pub fn remove(&mut self, key: &str) -> bool {
        match self.0.binary_search_by(|k| k.as_str().cmp(key)) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    /// The smallest key.
    pub fn first(&self) -> Option<&str> {
        self.0.first().map(String::as_str)
    }

    /// The largest key.
    pub fn last(&self) -> Option<&str> {
        self.0.last().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_keys_sorted_and_unique() {
        let mut set = KeySet::default();
        for key in ["b/x", "a/y", "c/z", "a/y"] {
            set.insert(key);
        }
        assert_eq!(set.iter().collect::<Vec<_>>(), ["a/y", "b/x", "c/z"]);
        assert_eq!((set.first(), set.last()), (Some("a/y"), Some("c/z")));
        assert!(!set.insert("b/x"));
        assert!(set.remove("b/x") && !set.remove("b/x"));
        assert!(set.remove("a/y") && set.remove("c/z"));
        assert!(set.is_empty() && set.first().is_none());
    }
}
