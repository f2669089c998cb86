//! NetworkPolicy in nftables (`weir agent --dataplane nftables`): the compiled policy of this
//! node's pods as the sets of one `inet` table (default `weir_policy`, separate from the
//! service table), see [`plan`] for the ruleset and the per-packet lookups.
//!
//! Contract:
//! - the table lives in the network namespace of the thread that opened the [`NftPolicy`];
//! - [`NftPolicy::open`] creates the table if missing and rewrites its fixed chains, keeping
//!   the set elements it holds: an agent restart enforces the previous policy until the first
//!   [`PolicyDatapath::apply`], which rewrites every set in one atomic batch;
//! - later applies write only the difference (set elements; a drop chain and counter per
//!   policy that isolates a local pod first), one atomic batch each; after a refused batch the
//!   next apply rewrites everything again;
//! - [`PolicyDatapath::apply_delta`] computes that difference from what the delta touches
//!   ([`incremental::IncrementalDesired`]), [`PolicyDatapath::apply`] from the whole state;
//! - the table is removed only by [`NftPolicy::remove`];
//! - with [`NftPolicy::with_names`], the flow reader asks the applied state which rule admitted
//!   a logged packet ([`IncrementalDesired::admitted`]).
pub mod incremental;
pub mod inspect;
pub mod live;
pub mod nflog;
pub mod plan;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use self::{incremental::IncrementalDesired, plan::Desired};
use crate::{
    apply::nft::{
        NftError, commit_batch,
        netlink::{DumpKind, Encoder, Socket, parse_policy_tuple},
        ops::{Op, PolicyTuple},
        validate_table_name,
    },
    policy::{PolicyApplied, PolicyDatapath, PolicyDatapathError, PolicyNode, SharedPolicyNames},
};
use weir_policy::{Compiled, Delta};

/// The default table name.
pub const DEFAULT_TABLE: &str = "weir_policy";

/// The policy table of this network namespace.
pub struct NftPolicy {
    table: String,
    socket: Socket,
    /// What the sets should hold (shared with the flow reader, see [`Self::with_names`]).
    state: Arc<RwLock<IncrementalDesired>>,
    /// The sets hold `state` (false when just opened, or after a refused batch).
    in_sync: bool,
    /// Where the pods of each applied state are published (flow records name them).
    names: Option<SharedPolicyNames>,
}

impl NftPolicy {
    /// Opens (creating or repairing) table `inet <table>`.
    pub fn open(table: &str) -> Result<Self, NftError> {
        validate_table_name(table)?;
        let socket = Socket::open().map_err(NftError::Socket)?;
        let mut policy = Self {
            table: table.to_string(),
            socket,
            state: Arc::default(),
            in_sync: false,
            names: None,
        };
        policy.send(&plan::skeleton())?;
        Ok(policy)
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Publishes the pods of every applied state to `names` (the agent's flow viewer), and
    /// lets it ask the state which rule admitted a logged packet.
    pub fn with_names(mut self, names: SharedPolicyNames) -> Self {
        names.set_admissions(self.state.clone());
        self.names = Some(names);
        self
    }

    fn state(&self) -> RwLockReadGuard<'_, IncrementalDesired> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn state_mut(&self) -> RwLockWriteGuard<'_, IncrementalDesired> {
        self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Deletes the whole table (an agent asked to clean up on exit).
    pub fn remove(mut self) -> Result<(), NftError> {
        self.send(&[Op::DeleteTable])
    }

    /// Packets dropped per counter: `drop-<direction>-<namespace>/<policy>` (drops attributed
    /// to the first policy isolating the pod's direction) and `drop-unknown` (pods the policy
    /// does not know yet).
    pub fn drop_counters(&mut self) -> Result<BTreeMap<String, u64>, NftError> {
        inspect::counters(&mut self.socket, &self.table)
            .map_err(|source| NftError::Io { table: self.table.clone(), source })
    }

    /// The allow tuples the kernel holds, per set ([`plan::INGRESS_ALLOW`],
    /// [`plan::EGRESS_ALLOW`] and their IPv6 sets), read back from the table (for tests).
    pub fn allow_tuples(&mut self) -> Result<BTreeMap<String, Vec<PolicyTuple>>, NftError> {
        let table = self.table.clone();
        let mut out = BTreeMap::new();
        for set in
            [plan::INGRESS_ALLOW, plan::EGRESS_ALLOW, plan::INGRESS_ALLOW6, plan::EGRESS_ALLOW6]
        {
            let dumped = self
                .socket
                .dump(DumpKind::Elements, &table, Some(set))
                .map_err(|source| NftError::Io { table: table.clone(), source })?;
            let tuples = dumped
                .iter()
                .flat_map(|d| d.elements.iter().zip(&d.element_ends))
                .filter_map(|((start, _), (end, _))| parse_policy_tuple(start, end.as_ref()?))
                .collect();
            out.insert(set.to_string(), tuples);
        }
        Ok(out)
    }

    /// Set elements written by the last successful apply.
    pub fn elements(&self) -> usize {
        if self.in_sync { self.state().desired().elements() } else { 0 }
    }

    /// Applies `compiled`; see [`PolicyDatapath::apply`].
    pub fn apply_policy(
        &mut self,
        compiled: &Compiled,
        node: &PolicyNode,
    ) -> Result<PolicyApplied, NftError> {
        let change = self.state_mut().rebuild(compiled, node);
        let ops = if self.in_sync {
            change.ops()
        } else {
            let (chains, counters) = self.drop_objects()?;
            plan::rewrite(self.state().desired(), &chains, &counters)
        };
        self.commit(&ops)
    }

    /// Applies `compiled`, changed by `delta`; see [`PolicyDatapath::apply_delta`].
    pub fn apply_policy_delta(
        &mut self,
        compiled: &Compiled,
        delta: &Delta,
        node: &PolicyNode,
    ) -> Result<PolicyApplied, NftError> {
        if !self.in_sync {
            return self.apply_policy(compiled, node);
        }
        let ops = self.state_mut().update(compiled, delta, node).ops();
        self.commit(&ops)
    }

    fn commit(&mut self, ops: &[Op]) -> Result<PolicyApplied, NftError> {
        self.in_sync = false;
        self.send(ops)?;
        self.in_sync = true;
        Ok(PolicyApplied { ops: ops.len() })
    }

    /// What the sets hold after the last successful apply.
    pub fn desired(&self) -> Option<Desired> {
        self.in_sync.then(|| self.state().desired().clone())
    }

    /// The chains and counters of the table.
    fn drop_objects(&mut self) -> Result<(BTreeSet<String>, BTreeSet<String>), NftError> {
        let table = self.table.clone();
        let io = |source| NftError::Io { table: table.clone(), source };
        let chains = self.socket.dump(DumpKind::Chains, &table, None).map_err(io)?;
        let counters = self.socket.dump(DumpKind::Counters, &table, None).map_err(io)?;
        Ok((
            chains.into_iter().map(|c| c.name).collect(),
            counters.into_iter().map(|c| c.name).collect(),
        ))
    }

    /// Sends `ops` as one atomic batch (never split: a rewrite flushes and refills sets).
    fn send(&mut self, ops: &[Op]) -> Result<(), NftError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut encoder = Encoder::new(&self.table);
        for op in ops {
            encoder.op(op);
        }
        let described: Vec<&Op> = ops.iter().collect();
        commit_batch(&mut self.socket, &self.table, &mut encoder, &described)
    }
}

impl PolicyDatapath for NftPolicy {
    fn apply(
        &mut self,
        compiled: &Compiled,
        node: &PolicyNode,
    ) -> Result<PolicyApplied, PolicyDatapathError> {
        let applied = self.apply_policy(compiled, node)?;
        if let Some(names) = &self.names {
            names.publish(compiled, None);
        }
        Ok(applied)
    }

    fn apply_delta(
        &mut self,
        compiled: &Compiled,
        delta: &Delta,
        node: &PolicyNode,
    ) -> Result<PolicyApplied, PolicyDatapathError> {
        let applied = self.apply_policy_delta(compiled, delta, node)?;
        if let Some(names) = &self.names {
            names.publish_pods(compiled, delta);
        }
        Ok(applied)
    }
}
