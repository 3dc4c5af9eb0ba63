//! `claw-control-plane check`: an offline integrity check of a data
//! directory: every record decodes, every sealed key opens with the given
//! master key, every index agrees with the records it indexes.
//!
//! The store is opened like the server opens it, so a directory a running
//! control plane holds is refused (sled's lock). Nothing is written. Each
//! problem is one line naming the tree, the key and what is wrong; the trees
//! whose records are private to their module (cooldowns, usage buckets,
//! report idempotency, the webhook outbox) are checked as well-formed
//! protobuf and counted.
//!
//! The server runs the same check ([`check_store`]) on its store before it
//! listens (bounded by `--startup-check-timeout`, skipped with
//! `--skip-startup-check`); opening the store also enforces its high-water
//! mark ([`crate::store::watermark`]), here and there. Cost: linear in the
//! records, every one held in memory while it runs (about 5 s for 100,000
//! client keys — 300,000 entries — in a debug build).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use anyhow::Context as _;
use claw_proto::v1;
use prost::Message;

use crate::access::tokens::AdminTokenRecord;
use crate::catalog::records::{
    AgentRecord, BackendRecord, ClientKeyRecord, PoolRecord, SealedRecord,
};
use crate::crypto::MasterKey;
use crate::heartbeat::runs::{Cursor, RunRecord};
use crate::store::sled::SledStore;
use crate::store::{Entry, Store, Tree};

/// What the check found.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Records read, per tree name.
    pub records: Vec<(&'static str, u64)>,
    /// Problems, one line each (empty: the directory is sound).
    pub problems: Vec<String>,
}

/// Checks the data directory `data_dir` against `key`.
pub fn run(data_dir: &Path, key: &MasterKey) -> anyhow::Result<CheckReport> {
    if !data_dir.is_dir() {
        anyhow::bail!("{} is not a directory", data_dir.display());
    }
    let store = SledStore::open(data_dir).map_err(|e| {
        let hint = if e.to_string().contains("lock") {
            " (is a control plane running on it? stop it first)"
        } else {
            ""
        };
        anyhow::anyhow!(
            "cannot open data directory {}: {e}{hint}",
            data_dir.display()
        )
    })?;
    check_store(&store, key)
}

/// Checks an open store against `key` (the server runs it before it
/// listens). Fails when a tree cannot be read, naming it; otherwise lists
/// the problems found. Time and memory grow linearly with the records.
pub fn check_store(store: &dyn Store, key: &MasterKey) -> anyhow::Result<CheckReport> {
    let mut trees = BTreeMap::new();
    for tree in Tree::ALL {
        let entries = store
            .scan(tree)
            .with_context(|| format!("reading tree {}", tree.name()))?;
        trees.insert(tree.name(), entries);
    }
    let mut c = Checker {
        trees,
        key,
        report: CheckReport::default(),
    };
    c.meta();
    c.backends();
    c.client_keys();
    c.agents();
    c.pools();
    c.heartbeats();
    c.admin_tokens();
    c.audit();
    c.well_formed();
    c.report.records = Tree::ALL
        .iter()
        .map(|t| (t.name(), c.entries(*t).len() as u64))
        .collect();
    Ok(c.report)
}

/// A key as it reads in a problem line: text when printable, else hex.
fn show(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) if !s.is_empty() && s.chars().all(|c| !c.is_control()) => format!("{s:?}"),
        _ => format!("0x{}", hex::encode(key)),
    }
}

struct Checker<'a> {
    trees: BTreeMap<&'static str, Vec<Entry>>,
    key: &'a MasterKey,
    report: CheckReport,
}

impl Checker<'_> {
    fn entries(&self, tree: Tree) -> &[Entry] {
        self.trees.get(tree.name()).map_or(&[], Vec::as_slice)
    }

    fn get(&self, tree: Tree, key: &[u8]) -> Option<&[u8]> {
        let entries = self.entries(tree);
        entries
            .binary_search_by(|(k, _)| k.as_slice().cmp(key))
            .ok()
            .map(|i| entries[i].1.as_slice())
    }

    fn problem(&mut self, tree: Tree, key: &[u8], what: impl std::fmt::Display) {
        self.report
            .problems
            .push(format!("{}: key {}: {what}", tree.name(), show(key)));
    }

    /// Decodes every record of `tree` as `M`, reporting those that fail.
    fn decode_all<M: Message + Default>(&mut self, tree: Tree) -> Vec<(Vec<u8>, M)> {
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for (k, v) in self.entries(tree) {
            match M::decode(v.as_slice()) {
                Ok(m) => out.push((k.clone(), m)),
                Err(e) => bad.push((k.clone(), e)),
            }
        }
        for (k, e) in bad {
            self.problem(tree, &k, format_args!("record does not decode: {e}"));
        }
        out
    }

    /// Opens a sealed secret with the given master key and `aad`.
    fn open(&mut self, tree: Tree, key: &[u8], what: &str, sealed: &SealedRecord, aad: &[u8]) {
        let result = sealed.to_sealed().map_err(|e| e.to_string()).and_then(|s| {
            if &s.key_id != self.key.id() {
                return Err(format!(
                    "sealed under master key {:?}, not the given key {:?}",
                    s.key_id.as_str(),
                    self.key.id().as_str()
                ));
            }
            self.key.open(&s, aad).map(|_| ()).map_err(|e| {
                format!(
                    "does not open with the given master key {:?}: {e}",
                    self.key.id().as_str()
                )
            })
        });
        if let Err(e) = result {
            self.problem(tree, key, format_args!("{what} {e}"));
        }
    }

    /// `names` (name → id) and the records (id → record named `name`)
    /// agree both ways; `named` lists (id, name) of every decoded record.
    fn index(&mut self, records: Tree, index: Tree, named: &[(Vec<u8>, Vec<u8>)]) {
        for (id, name) in named {
            match self.get(index, name) {
                None => self.problem(
                    records,
                    id,
                    format_args!("not in index {} (entry {})", index.name(), show(name)),
                ),
                Some(v) if v != id.as_slice() => self.problem(
                    index,
                    name,
                    format_args!("points at {} but the record is {}", show(v), show(id)),
                ),
                Some(_) => {}
            }
        }
        let pairs: HashSet<(&[u8], &[u8])> = named
            .iter()
            .map(|(id, n)| (n.as_slice(), id.as_slice()))
            .collect();
        let names: HashSet<&[u8]> = named.iter().map(|(_, n)| n.as_slice()).collect();
        let mut dangling = Vec::new();
        for (k, v) in self.entries(index) {
            if pairs.contains(&(k.as_slice(), v.as_slice())) {
                continue;
            }
            if self.get(records, v).is_none() {
                dangling.push((
                    k.clone(),
                    format!("points at {} which is not in {}", show(v), records.name()),
                ));
            } else if !names.contains(k.as_slice()) {
                dangling.push((
                    k.clone(),
                    format!("no record in {} has this value", records.name()),
                ));
            }
        }
        for (k, what) in dangling {
            self.problem(index, &k, what);
        }
    }

    /// The record's stored id equals its key.
    fn id_matches(&mut self, tree: Tree, key: &[u8], id: &str) {
        if key != id.as_bytes() {
            self.problem(tree, key, format_args!("record has id {id:?}"));
        }
    }

    fn meta(&mut self) {
        match self.get(Tree::Meta, b"schema_version") {
            None => self.problem(
                Tree::Meta,
                b"schema_version",
                "missing: not a control plane data directory",
            ),
            Some(v) if v.len() != 4 => {
                self.problem(Tree::Meta, b"schema_version", "is not 4 bytes")
            }
            Some(v) => {
                let found = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
                if found > crate::catalog::SCHEMA_VERSION {
                    self.problem(
                        Tree::Meta,
                        b"schema_version",
                        format_args!(
                            "{found} is newer than this binary supports ({})",
                            crate::catalog::SCHEMA_VERSION
                        ),
                    );
                }
            }
        }
        match self.get(Tree::Meta, b"master_key_id").map(<[u8]>::to_vec) {
            Some(id) if id != self.key.id().as_str().as_bytes() => self.problem(
                Tree::Meta,
                b"master_key_id",
                format_args!(
                    "the data directory is sealed under master key {}, not the given key {:?}",
                    show(&id),
                    self.key.id().as_str()
                ),
            ),
            Some(_) => {}
            None => self.problem(Tree::Meta, b"master_key_id", "missing"),
        }
        for key in [
            b"config_version".as_slice(),
            crate::store::watermark::META_HWM,
        ] {
            if self.get(Tree::Meta, key).is_some_and(|v| v.len() != 8) {
                self.problem(Tree::Meta, key, "is not 8 bytes");
            }
        }
    }

    fn backends(&mut self) {
        let mut named = Vec::new();
        for (k, rec) in self.decode_all::<BackendRecord>(Tree::Backends) {
            let Some(spec) = rec.spec else {
                self.problem(Tree::Backends, &k, "record has no spec");
                continue;
            };
            self.id_matches(Tree::Backends, &k, &spec.id);
            match &rec.api_key {
                Some(sealed) => {
                    self.open(Tree::Backends, &k, "api key", sealed, spec.id.as_bytes())
                }
                None => self.problem(Tree::Backends, &k, "has no sealed api key"),
            }
            named.push((k, spec.name.into_bytes()));
        }
        self.index(Tree::Backends, Tree::BackendNames, &named);
    }

    fn client_keys(&mut self) {
        let mut named = Vec::new();
        let mut hashed = Vec::new();
        for (k, rec) in self.decode_all::<ClientKeyRecord>(Tree::ClientKeys) {
            let Some(spec) = rec.spec else {
                self.problem(Tree::ClientKeys, &k, "record has no spec");
                continue;
            };
            self.id_matches(Tree::ClientKeys, &k, &spec.id);
            if let Some(sealed) = &rec.sealed_secret {
                self.open(
                    Tree::ClientKeys,
                    &k,
                    "internal secret",
                    sealed,
                    spec.id.as_bytes(),
                );
            }
            named.push((k.clone(), spec.name.into_bytes()));
            hashed.push((k, rec.secret_sha256.into_bytes()));
        }
        self.index(Tree::ClientKeys, Tree::ClientKeyNames, &named);
        self.index(Tree::ClientKeys, Tree::ClientKeyHashes, &hashed);
    }

    fn agents(&mut self) {
        for (k, rec) in self.decode_all::<AgentRecord>(Tree::Agents) {
            let Some(spec) = rec.spec else {
                self.problem(Tree::Agents, &k, "record has no spec");
                continue;
            };
            self.id_matches(Tree::Agents, &k, &spec.id);
            if let Some(sealed) = &rec.webhook_secret {
                let aad = format!("agent:{}", spec.id).into_bytes();
                self.open(Tree::Agents, &k, "webhook secret", sealed, &aad);
            }
        }
    }

    fn pools(&mut self) {
        self.decode_all::<PoolRecord>(Tree::Pools);
    }

    fn heartbeats(&mut self) {
        self.decode_all::<Cursor>(Tree::HeartbeatCursors);
        let runs = self.decode_all::<RunRecord>(Tree::HeartbeatRuns);
        for (k, _) in &runs {
            match by_time(k) {
                Some(t) if self.get(Tree::HeartbeatRunsByTime, &t).is_some() => {}
                Some(t) => self.problem(
                    Tree::HeartbeatRuns,
                    k,
                    format_args!(
                        "not in index {} (entry {})",
                        Tree::HeartbeatRunsByTime.name(),
                        show(&t)
                    ),
                ),
                None => self.problem(Tree::HeartbeatRuns, k, "key is not `agent \\0 be u64 ms`"),
            }
        }
        let mut dangling = Vec::new();
        for (t, _) in self.entries(Tree::HeartbeatRunsByTime) {
            match run_key(t) {
                Some(k) if self.get(Tree::HeartbeatRuns, &k).is_some() => {}
                _ => dangling.push(t.clone()),
            }
        }
        for t in dangling {
            self.problem(
                Tree::HeartbeatRunsByTime,
                &t,
                format_args!("points at no run in {}", Tree::HeartbeatRuns.name()),
            );
        }
        let open: Vec<Vec<u8>> = self
            .entries(Tree::HeartbeatOpen)
            .iter()
            .map(|(k, _)| k.clone())
            .filter(|k| self.get(Tree::HeartbeatRuns, k).is_none())
            .collect();
        for k in open {
            self.problem(
                Tree::HeartbeatOpen,
                &k,
                format_args!("points at no run in {}", Tree::HeartbeatRuns.name()),
            );
        }
    }

    fn admin_tokens(&mut self) {
        let mut named = Vec::new();
        let mut hashed = Vec::new();
        for (k, rec) in self.decode_all::<AdminTokenRecord>(Tree::AdminTokens) {
            if rec.role().is_none() {
                self.problem(Tree::AdminTokens, &k, "has no known role");
            }
            let Some(spec) = rec.spec else {
                self.problem(Tree::AdminTokens, &k, "record has no spec");
                continue;
            };
            self.id_matches(Tree::AdminTokens, &k, &spec.id);
            named.push((k.clone(), spec.name.into_bytes()));
            hashed.push((k, rec.secret_sha256.into_bytes()));
        }
        self.index(Tree::AdminTokens, Tree::AdminTokenNames, &named);
        self.index(Tree::AdminTokens, Tree::AdminTokenHashes, &hashed);
    }

    fn audit(&mut self) {
        self.decode_all::<v1::AuditRecord>(Tree::Audit);
    }

    /// Trees whose record types are private to their modules: well-formed
    /// protobuf (an empty message decodes any valid encoding, skipping its
    /// fields).
    fn well_formed(&mut self) {
        for tree in [
            Tree::HeartbeatOutbox,
            Tree::ReportBatches,
            Tree::UsageHourly,
            Tree::UsageDaily,
            Tree::CooldownState,
            Tree::CooldownEvents,
        ] {
            self.decode_all::<()>(tree);
        }
    }
}

/// `agent \0 be u64 ms` (a run key) → `be u64 ms \0 agent` (its by-time key).
fn by_time(run: &[u8]) -> Option<Vec<u8>> {
    if run.len() < 9 || run[run.len() - 9] != 0 {
        return None;
    }
    let (agent, rest) = run.split_at(run.len() - 9);
    let mut k = rest[1..].to_vec();
    k.push(0);
    k.extend_from_slice(agent);
    Some(k)
}

/// The inverse of [`by_time`].
fn run_key(by_time: &[u8]) -> Option<Vec<u8>> {
    if by_time.len() < 9 || by_time[8] != 0 {
        return None;
    }
    let mut k = by_time[9..].to_vec();
    k.push(0);
    k.extend_from_slice(&by_time[..8]);
    Some(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_keys_and_by_time_keys_invert() {
        let run = b"a1\0\0\0\0\0\0\0\0\x07".to_vec();
        let t = by_time(&run).expect("a run key");
        assert_eq!(t, b"\0\0\0\0\0\0\0\x07\0a1".to_vec());
        assert_eq!(run_key(&t), Some(run));
        assert_eq!(by_time(b"short"), None);
    }

    #[tokio::test]
    async fn a_fresh_directory_passes_and_damage_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = crate::catalog::testing::key(crate::catalog::testing::KEY1);
        {
            let store = std::sync::Arc::new(SledStore::open(dir.path()).expect("opens"));
            let catalog = crate::catalog::Catalog::open(store.clone(), key.clone())
                .await
                .expect("catalog");
            drop(catalog);
            let tokens = crate::access::tokens::Tokens::new(store.as_ref());
            tokens
                .create(
                    "ops",
                    v1::Role::Viewer as i32,
                    &crate::audit::Actor::system(),
                )
                .await
                .expect("token");
            store.flush().await.expect("flush");
        }
        let report = run(dir.path(), &key).expect("runs");
        assert!(report.problems.is_empty(), "{:?}", report.problems);

        let other = crate::catalog::testing::key(crate::catalog::testing::KEY2);
        let report = run(dir.path(), &other).expect("runs");
        assert!(
            report.problems.iter().any(|p| p.contains("master_key_id")),
            "{:?}",
            report.problems
        );

        {
            let store = SledStore::open(dir.path()).expect("opens");
            store
                .transaction(&[Tree::AdminTokenNames], &|txn| {
                    txn.remove(Tree::AdminTokenNames, b"ops")
                        .map_err(|_| crate::store::Rollback)?;
                    txn.insert(Tree::AdminTokenNames, b"ghost", b"tk_0")
                        .map_err(|_| crate::store::Rollback)?;
                    Ok(())
                })
                .expect("commits");
        }
        let report = run(dir.path(), &key).expect("runs");
        let text = report.problems.join("\n");
        assert!(text.contains("admin_tokens: key \"tk_"), "{text}");
        assert!(text.contains("not in index admin_token_names"), "{text}");
        assert!(text.contains("admin_token_names: key \"ghost\""), "{text}");
    }
}
