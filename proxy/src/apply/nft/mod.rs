//! The nftables backend (`weir agent --dataplane nftables`): the desired service state as one
//! `inet` table shaped like kube-proxy's nftables mode (see [`plan`] for the ruleset), written
//! through nf_tables netlink batches ([`netlink`], no libnftnl, no `nft` binary).
//!
//! Contract:
//! - the table lives in the network namespace of the thread that opened the
//!   [`NftDataplane`]; the agent opens it in its own namespace;
//! - [`NftDataplane::open`] creates the table's skeleton if missing, repairs its fixed chains,
//!   and adopts the per-service objects it finds: rules survive an agent restart and a
//!   restarted agent rewrites only services that differ;
//! - [`NftDataplane::apply`] writes only the difference, one atomic batch per step (split at
//!   service boundaries only when a step is larger than one netlink message may be);
//! - the table is removed only by [`NftDataplane::remove_table`].
pub(crate) mod netlink;
pub mod ops;
pub mod plan;

use thiserror::Error;

use self::{
    netlink::{DumpKind, Encoder, Socket},
    ops::{ElementKey, Op},
    plan::{Planner, TableContents},
};
use crate::model::ServiceState;

/// Bytes of one batch before it is split at a service boundary.
const MAX_BATCH: usize = 16 << 20;

#[derive(Debug, Error)]
pub enum NftError {
    #[error("cannot open a netfilter netlink socket (is nf_tables available? are we root?)")]
    Socket(#[source] std::io::Error),
    #[error("nftables netlink I/O on table {table}")]
    Io {
        table: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the kernel refused a change to nftables table {table}: {op} ({source}); nothing of \
         that batch was applied"
    )]
    Refused {
        table: String,
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nftables table name {0:?} is invalid: use 1 to 64 letters, digits, '-' or '_'")]
    BadTableName(String),
}

/// What one [`NftDataplane::apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub ops: usize,
    pub skipped: usize,
}

/// The service table of this network namespace.
pub struct NftDataplane {
    table: String,
    socket: Socket,
    planner: Box<Planner>,
}

/// Checks a table name before anything is sent.
pub fn validate_table_name(name: &str) -> Result<(), NftError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err(NftError::BadTableName(name.to_string())) }
}

impl NftDataplane {
    /// Opens (creating or repairing) table `inet <table>` and adopts what it holds.
    pub fn open(table: &str) -> Result<Self, NftError> {
        validate_table_name(table)?;
        let socket = Socket::open().map_err(NftError::Socket)?;
        let mut dataplane =
            Self { table: table.to_string(), socket, planner: Box::new(Planner::new()) };
        dataplane.send(&plan::skeleton(), &[])?;
        dataplane.readopt()?;
        Ok(dataplane)
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    pub fn frontends(&self) -> usize {
        self.planner.frontends()
    }

    pub fn backends(&self) -> usize {
        self.planner.backends()
    }

    /// Rebuilds the planner from what the table really holds (after a failed batch, or at
    /// start).
    pub fn readopt(&mut self) -> Result<(), NftError> {
        let contents = self.read_table()?;
        *self.planner = Planner::adopt(&contents);
        Ok(())
    }

    /// Applies the difference between the table and `desired`.
    pub fn apply(&mut self, desired: &ServiceState) -> Result<Applied, NftError> {
        let plan = self.planner.plan(desired);
        self.send(&plan.ops, &plan.groups)?;
        Ok(Applied { ops: plan.ops.len(), skipped: plan.skipped })
    }

    /// Applies the frontends of `desired` listed in `changed` (and removes those listed but
    /// absent), assuming every other one is as last applied: see
    /// [`Planner::plan_changed`](plan::Planner::plan_changed).
    pub fn apply_changed<'a>(
        &mut self,
        desired: &ServiceState,
        changed: impl IntoIterator<Item = &'a crate::model::Frontend>,
    ) -> Result<Applied, NftError> {
        let plan = self.planner.plan_changed(desired, changed);
        self.send(&plan.ops, &plan.groups)?;
        Ok(Applied { ops: plan.ops.len(), skipped: plan.skipped })
    }

    /// Deletes the whole table (an agent asked to clean up on exit).
    pub fn remove_table(mut self) -> Result<(), NftError> {
        self.send(&[Op::DeleteTable], &[])
    }

    fn read_table(&mut self) -> Result<TableContents, NftError> {
        let table = self.table.clone();
        let io = |source| NftError::Io { table: table.clone(), source };
        let chains = self.socket.dump(DumpKind::Chains, &table, None).map_err(io)?;
        let rules = self.socket.dump(DumpKind::Rules, &table, None).map_err(io)?;
        let sets = self.socket.dump(DumpKind::Sets, &table, None).map_err(io)?;
        let mut frontends = Vec::new();
        let mut entries = Vec::new();
        let set_names: Vec<String> = sets.iter().map(|s| s.name.clone()).collect();
        for set in &set_names {
            let frontend_set = plan::is_frontend_set(set);
            if !frontend_set && !plan::is_entry_set(set) {
                continue;
            }
            for dumped in self.socket.dump(DumpKind::Elements, &table, Some(set)).map_err(io)? {
                let values: std::collections::HashMap<&[u8], &[u8]> =
                    dumped.values.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
                for (key, _) in &dumped.elements {
                    if frontend_set {
                        if let Some(key @ ElementKey::Service { .. }) =
                            netlink::parse_service_key(key)
                        {
                            frontends.push((set.clone(), key));
                        }
                    } else if let Some(parsed) = netlink::parse_endpoint_key(key) {
                        let value = values.get(key.as_slice()).copied();
                        entries.push((parsed, value.and_then(netlink::parse_endpoint)));
                    }
                }
            }
        }
        Ok(TableContents {
            chains: chains.into_iter().map(|c| c.name).collect(),
            services_rules: rules.iter().filter(|r| r.name == plan::SERVICES).count(),
            rule_comments: rules.into_iter().filter_map(|r| Some((r.name, r.comment?))).collect(),
            sets: set_names.into_iter().filter(|n| !n.starts_with("__")).collect(),
            frontends,
            entries,
        })
    }

    /// Sends `ops` as one batch, or as several split at `groups` when too large.
    fn send(&mut self, ops: &[Op], groups: &[usize]) -> Result<(), NftError> {
        let mut encoder = Encoder::new(&self.table);
        let mut batch_ops: Vec<&Op> = Vec::new();
        let mut group = groups.iter().peekable();
        for (index, op) in ops.iter().enumerate() {
            encoder.op(op);
            batch_ops.push(op);
            while group.peek().is_some_and(|g| **g <= index + 1) {
                group.next();
                if encoder.len() >= MAX_BATCH {
                    self.commit(&mut encoder, &mut batch_ops)?;
                }
            }
        }
        if !encoder.is_empty() {
            self.commit(&mut encoder, &mut batch_ops)?;
        }
        Ok(())
    }

    fn commit(&mut self, encoder: &mut Encoder, ops: &mut Vec<&Op>) -> Result<(), NftError> {
        let result = commit_batch(&mut self.socket, &self.table, encoder, ops);
        ops.clear();
        result
    }
}

/// Sends what `encoder` holds as one atomic batch; on refusal the error names the first op
/// (of `ops`, the ops encoded since the last batch) the kernel refused.
pub(crate) fn commit_batch(
    socket: &mut Socket,
    table: &str,
    encoder: &mut Encoder,
    ops: &[&Op],
) -> Result<(), NftError> {
    let (batch, first_seqs) = encoder.finish();
    let errors = socket
        .send_batch(&batch)
        .map_err(|source| NftError::Io { table: table.to_string(), source })?;
    match errors.first() {
        None => Ok(()),
        Some(error) => {
            let op = Encoder::op_of_seq(&first_seqs, error.seq)
                .and_then(|i| ops.get(i))
                .map(|op| format!("{op:?}"))
                .unwrap_or_else(|| format!("message {}", error.seq));
            Err(NftError::Refused {
                table: table.to_string(),
                op,
                source: std::io::Error::from_raw_os_error(error.errno),
            })
        }
    }
}
