//! Writes [`DatapathPolicy`] differences to the policy maps, in an order that never opens a
//! hole: on the way in, ipcache and rules before the endpoint entries that make a pod isolated;
//! on the way out, endpoint entries first.
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key},
};
use weir_common::policy::{
    Addr, EndpointPolicy, GLOBAL_DENY_UNKNOWN, IPCACHE_MAP, IpcacheValue, POLICY_ENDPOINTS_MAP,
    POLICY_GLOBAL_MAP, POLICY_MAP, PolicyGlobal, PolicyKey, PolicyValue,
};

use super::{
    incremental::DatapathDelta,
    lower::{DatapathPolicy, MapDiff, diff},
};
use crate::maps::MapsError;

pub struct PolicyMaps {
    endpoints: HashMap<MapData, Addr, EndpointPolicy>,
    ipcache: LpmTrie<MapData, Addr, IpcacheValue>,
    rules: LpmTrie<MapData, PolicyKey, PolicyValue>,
    global: Array<MapData, PolicyGlobal>,
}

fn write_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> MapsError {
    move |source| MapsError::Layout { name, source }
}

impl PolicyMaps {
    /// Takes the policy maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(MapsError::Missing { name });
        let endpoints = take(POLICY_ENDPOINTS_MAP)?;
        let ipcache = take(IPCACHE_MAP)?;
        let rules = take(POLICY_MAP)?;
        let global = take(POLICY_GLOBAL_MAP)?;
        Ok(Self {
            endpoints: HashMap::try_from(endpoints).map_err(write_error(POLICY_ENDPOINTS_MAP))?,
            ipcache: LpmTrie::try_from(ipcache).map_err(write_error(IPCACHE_MAP))?,
            rules: LpmTrie::try_from(rules).map_err(write_error(POLICY_MAP))?,
            global: Array::try_from(global).map_err(write_error(POLICY_GLOBAL_MAP))?,
        })
    }

    /// What the maps hold now, as a [`DatapathPolicy`]: a restarted agent diffs against it
    /// instead of rewriting everything.
    pub fn read(&self) -> Result<DatapathPolicy, MapsError> {
        let mut out = DatapathPolicy::default();
        for entry in self.endpoints.iter() {
            let (key, value) = entry.map_err(write_error(POLICY_ENDPOINTS_MAP))?;
            out.endpoints.insert(key, value);
        }
        for entry in self.ipcache.iter() {
            let (key, value) = entry.map_err(write_error(IPCACHE_MAP))?;
            out.ipcache.insert((key.prefix_len(), key.data()), value);
        }
        for entry in self.rules.iter() {
            let (key, value) = entry.map_err(write_error(POLICY_MAP))?;
            out.rules.insert((key.prefix_len(), key.data()), value);
        }
        Ok(out)
    }

    /// Whether packets of addresses without an endpoint entry are dropped now.
    pub fn deny_unknown(&self) -> Result<bool, MapsError> {
        let global = self.global.get(&0, 0).map_err(write_error(POLICY_GLOBAL_MAP))?;
        Ok(global.flags & GLOBAL_DENY_UNKNOWN != 0)
    }

    /// Drop packets of addresses without an endpoint entry (set while policies exist).
    pub fn set_deny_unknown(&mut self, deny: bool) -> Result<(), MapsError> {
        let flags = if deny { GLOBAL_DENY_UNKNOWN } else { 0 };
        self.global
            .set(0, PolicyGlobal { flags, _pad: 0 }, 0)
            .map_err(write_error(POLICY_GLOBAL_MAP))
    }

    /// Writes what changed from `old` to `new`; returns the number of map operations.
    pub fn apply(
        &mut self,
        old: &DatapathPolicy,
        new: &DatapathPolicy,
    ) -> Result<usize, MapsError> {
        let endpoints = diff(&old.endpoints, &new.endpoints);
        let ipcache = diff(&old.ipcache, &new.ipcache);
        let rules = diff(&old.rules, &new.rules);
        self.write(&endpoints, &ipcache, &rules)
    }

    /// Writes the changes of one incremental update; returns the number of map operations.
    pub fn apply_delta(&mut self, delta: &DatapathDelta) -> Result<usize, MapsError> {
        self.write(&delta.endpoints, &delta.ipcache, &delta.rules)
    }

    fn write(
        &mut self,
        endpoints: &MapDiff<Addr, EndpointPolicy>,
        ipcache: &MapDiff<(u32, Addr), IpcacheValue>,
        rules: &MapDiff<(u32, PolicyKey), PolicyValue>,
    ) -> Result<usize, MapsError> {
        for key in &endpoints.deletes {
            self.endpoints.remove(key).map_err(write_error(POLICY_ENDPOINTS_MAP))?;
        }
        for ((bits, data), value) in &ipcache.upserts {
            self.ipcache
                .insert(&Key::new(*bits, *data), *value, 0)
                .map_err(write_error(IPCACHE_MAP))?;
        }
        for ((bits, data), value) in &rules.upserts {
            self.rules
                .insert(&Key::new(*bits, *data), *value, 0)
                .map_err(write_error(POLICY_MAP))?;
        }
        for (key, value) in &endpoints.upserts {
            self.endpoints.insert(key, value, 0).map_err(write_error(POLICY_ENDPOINTS_MAP))?;
        }
        for (bits, data) in &rules.deletes {
            self.rules.remove(&Key::new(*bits, *data)).map_err(write_error(POLICY_MAP))?;
        }
        for (bits, data) in &ipcache.deletes {
            self.ipcache.remove(&Key::new(*bits, *data)).map_err(write_error(IPCACHE_MAP))?;
        }
        Ok(endpoints.len() + ipcache.len() + rules.len())
    }
}
