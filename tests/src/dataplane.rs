//! Running the same service test against both datapaths.
//!
//! [`for_each_dataplane`] runs a test body once per backend. [`TestDatapath`] programs a
//! [`ServiceState`] the way the agent would, for clients in one namespace:
//! - eBPF: the object loaded with a test pin directory, the socket load balancer attached to a
//!   test cgroup; clients must run in that cgroup ([`TestDatapath::cgroup`]);
//! - nftables: a uniquely named table (`weirt-…`) in the client's namespace, so clients'
//!   packets really traverse the nat output and filter hooks; removed on drop (and with the
//!   namespace).
use std::fmt;

use anyhow::{Context, Result};
use weir_proxy::{
    apply::{ebpf::MapWriter, nft::NftDataplane, plan::ServicePlanner},
    maps::ServiceMaps,
    model::ServiceState,
    programs::{self, LoadOptions},
};

use crate::{bpffs::TestPinDir, cgroup::TestCgroup, names, netns::Netns};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataplane {
    Ebpf,
    Nftables,
}

impl Dataplane {
    /// The value of `weir agent --dataplane`.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Nftables => "nftables",
        }
    }
}

impl fmt::Display for Dataplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.flag())
    }
}

pub const ALL: [Dataplane; 2] = [Dataplane::Ebpf, Dataplane::Nftables];

/// Runs `body` once per dataplane, saying which one runs (a failure names its dataplane in
/// the output just above the panic).
pub fn for_each_dataplane(mut body: impl FnMut(Dataplane)) {
    for dataplane in ALL {
        eprintln!("=== dataplane {dataplane}");
        body(dataplane);
        eprintln!("=== dataplane {dataplane}: ok");
    }
}

/// A unique nftables table name for a test.
pub fn table_name(role: &str) -> String {
    names::unique(role)
}

struct EbpfInner {
    writer: MapWriter,
    planner: ServicePlanner,
    _loaded: programs::Loaded,
    _pins: TestPinDir,
}

enum Inner {
    Ebpf(Box<EbpfInner>),
    Nftables { table: Option<NftDataplane>, netns_path: std::path::PathBuf },
}

/// A service datapath for the clients of one namespace, programmed without an agent.
pub struct TestDatapath {
    pub dataplane: Dataplane,
    inner: Inner,
    // After `inner`: programs detach before the cgroup goes.
    cgroup: Option<TestCgroup>,
}

impl TestDatapath {
    pub fn new(dataplane: Dataplane, client: &Netns, role: &str) -> Result<Self> {
        match dataplane {
            Dataplane::Ebpf => {
                let cgroup = TestCgroup::new(role)?;
                let pins = TestPinDir::new(role)?;
                let mut loaded = programs::load(&LoadOptions::new(pins.path()))?;
                let writer = MapWriter::new(ServiceMaps::take(&mut loaded.ebpf)?);
                programs::attach_socket_lb(&mut loaded.ebpf, cgroup.dir(), None)?;
                Ok(Self {
                    dataplane,
                    inner: Inner::Ebpf(Box::new(EbpfInner {
                        writer,
                        planner: ServicePlanner::new(),
                        _loaded: loaded,
                        _pins: pins,
                    })),
                    cgroup: Some(cgroup),
                })
            }
            Dataplane::Nftables => Self::nft_table(client, &table_name(role)),
        }
    }

    /// The nftables table `name` in `client`'s namespace, adopted when it exists (what a
    /// restarted agent does); removed on drop.
    pub fn nft_table(client: &Netns, name: &str) -> Result<Self> {
        let table = client
            .run(|| NftDataplane::open(name))?
            .with_context(|| format!("opening nftables table {name}"))?;
        Ok(Self {
            dataplane: Dataplane::Nftables,
            inner: Inner::Nftables { table: Some(table), netns_path: client.path() },
            cgroup: None,
        })
    }

    /// The cgroup clients must run in (eBPF), or `None` (nftables: the namespace suffices).
    pub fn cgroup(&self) -> Option<&TestCgroup> {
        self.cgroup.as_ref()
    }

    /// Applies `state` incrementally; returns the number of datapath operations.
    pub fn apply(&mut self, state: &ServiceState) -> Result<usize> {
        match &mut self.inner {
            Inner::Ebpf(ebpf) => {
                let plan = ebpf.planner.plan(state);
                ebpf.writer.apply(&plan)?;
                Ok(plan.len())
            }
            Inner::Nftables { table, .. } => {
                Ok(table.as_mut().expect("open until drop").apply(state)?.ops)
            }
        }
    }

    /// Entries the datapath really holds for services, read back from the kernel (eBPF: map
    /// entries; nftables: frontends found in the table). 0 when everything was removed.
    pub fn live_entries(&mut self) -> Result<usize> {
        match &mut self.inner {
            Inner::Ebpf(ebpf) => Ok(ebpf.writer.maps().entry_count()),
            Inner::Nftables { table, .. } => {
                let table = table.as_mut().expect("open until drop");
                table.readopt()?;
                Ok(table.frontends())
            }
        }
    }
}

impl Drop for TestDatapath {
    fn drop(&mut self) {
        if let Inner::Nftables { table, netns_path } = &mut self.inner
            && let Some(table) = table.take()
            && netns_path.exists()
        {
            let name = table.table().to_string();
            if let Err(err) = table.remove_table() {
                eprintln!("warning: could not remove nftables table {name}: {err}");
            }
        }
    }
}
