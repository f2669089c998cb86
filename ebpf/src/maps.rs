//! Map declarations. Layouts, names and default sizes come from `weir-common`. Every map is
//! pinned by name in the loader's pin directory, so a restarted agent (and the programs still
//! attached through pinned links) keep using the same maps.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use weir_common::{
    conntrack::{CtKey4, CtKey6, CtValue4, DEFAULT_CT4_ENTRIES},
    host_route::HOST_ROUTES_MAX,
    lb::{
        AffinityKey4, AffinityValue4, Backend, Backend6, DEFAULT_AFFINITY4_ENTRIES,
        DEFAULT_BACKEND_ENTRIES, DEFAULT_REV_NAT_ENTRIES, DEFAULT_SERVICE_ENTRIES, RevNat, RevNat6,
        ServiceKey, ServiceKey6, ServiceValue,
    },
    metrics::COUNTER_COUNT,
    policy::{
        Addr, DEFAULT_IPCACHE_ENTRIES, DEFAULT_POLICY_CT_ENTRIES, DEFAULT_POLICY_DROPS_ENTRIES,
        DEFAULT_POLICY_ENDPOINTS, DEFAULT_POLICY_ENTRIES, EndpointPolicy, FLOWS_BYTES,
        IpcacheValue, PolicyCtKey, PolicyDropKey, PolicyGlobal, PolicyKey, PolicyValue,
    },
    sock::{DEFAULT_SOCK_REV4_ENTRIES, SockRevKey4, SockRevKey6},
};

#[map(name = "weir_svc_v1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(DEFAULT_SERVICE_ENTRIES, 0);

#[map(name = "weir_backend_v1")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(DEFAULT_BACKEND_ENTRIES, 0);

#[map(name = "weir_rev_nat_v1")]
pub static REV_NAT: HashMap<u32, RevNat> = HashMap::pinned(DEFAULT_REV_NAT_ENTRIES, 0);

#[map(name = "weir_svc6_v1")]
pub static SERVICES6: HashMap<ServiceKey6, ServiceValue> =
    HashMap::pinned(DEFAULT_SERVICE_ENTRIES, 0);

#[map(name = "weir_backend6_v1")]
pub static BACKENDS6: HashMap<u32, Backend6> = HashMap::pinned(DEFAULT_BACKEND_ENTRIES, 0);

#[map(name = "weir_rev_nat6_v1")]
pub static REV_NAT6: HashMap<u32, RevNat6> = HashMap::pinned(DEFAULT_REV_NAT_ENTRIES, 0);

#[map(name = "weir_ct4_v1")]
pub static CT4: LruHashMap<CtKey4, CtValue4> = LruHashMap::pinned(DEFAULT_CT4_ENTRIES, 0);

#[map(name = "weir_ct6_v1")]
pub static CT6: LruHashMap<CtKey6, CtValue4> = LruHashMap::pinned(DEFAULT_CT4_ENTRIES, 0);

#[map(name = "weir_metrics_v1")]
pub static METRICS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_COUNT, 0);

#[map(name = "weir_sock_rev4_v1")]
pub static SOCK_REV4: LruHashMap<SockRevKey4, RevNat> =
    LruHashMap::pinned(DEFAULT_SOCK_REV4_ENTRIES, 0);

#[map(name = "weir_sock_rev6_v1")]
pub static SOCK_REV6: LruHashMap<SockRevKey6, RevNat6> =
    LruHashMap::pinned(DEFAULT_SOCK_REV4_ENTRIES, 0);

#[map(name = "weir_affinity4_v1")]
pub static AFFINITY4: LruHashMap<AffinityKey4, AffinityValue4> =
    LruHashMap::pinned(DEFAULT_AFFINITY4_ENTRIES, 0);

#[map(name = "weir_pol_ep_v2")]
pub static POLICY_ENDPOINTS: HashMap<Addr, EndpointPolicy> =
    HashMap::pinned(DEFAULT_POLICY_ENDPOINTS, 0);

#[map(name = "weir_ipcache_v2")]
pub static IPCACHE: LpmTrie<Addr, IpcacheValue> = LpmTrie::pinned(DEFAULT_IPCACHE_ENTRIES, 0);

#[map(name = "weir_policy_v2")]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(DEFAULT_POLICY_ENTRIES, 0);

#[map(name = "weir_pol_ct_v2")]
pub static POLICY_CT: LruHashMap<PolicyCtKey, PolicyValue> =
    LruHashMap::pinned(DEFAULT_POLICY_CT_ENTRIES, 0);

#[map(name = "weir_pol_global_v1")]
pub static POLICY_GLOBAL: Array<PolicyGlobal> = Array::pinned(1, 0);

#[map(name = "weir_pol_drops_v2")]
pub static POLICY_DROPS: PerCpuHashMap<PolicyDropKey, u64> =
    PerCpuHashMap::pinned(DEFAULT_POLICY_DROPS_ENTRIES, 0);

#[map(name = "weir_flows_v2")]
pub static FLOWS: RingBuf = RingBuf::pinned(FLOWS_BYTES, 0);

#[map(name = "weir_host_route_v1")]
pub static HOST_ROUTES: LpmTrie<Addr, u32> = LpmTrie::pinned(HOST_ROUTES_MAX, 0);
