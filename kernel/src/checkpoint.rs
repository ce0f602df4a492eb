//! Checkpoints: what the server writes when a round ends, and what a resumed
//! course reads back.
//!
//! A course's checkpoints live in one folder, one subfolder per saved round:
//!
//! ```text
//! checkpoints/
//!   round-0003/
//!     <the global parameters, in the store's format>
//!     state.json                  {"round": 3, "clients": 2}
//!     aggregator_state.msgpack    a stateful aggregator's state (a script's `this`), if any
//!     clients/client-N.msgpack    in one process, each client's own state (kept
//!                                 optimizer moments, personal adapter, script state)
//! ```
//!
//! The layout is spelled here and nowhere else. How the parameters are held
//! is the [`ParamStore`]'s business: the kernel ships [`MsgpackStore`] (any
//! [`ParamSet`]); the adapters store an LLM adapter in PEFT's layout, so a
//! checkpoint is also a loadable adapter. The server writes a checkpoint
//! after aggregating a round ([`Checkpoints::write`], called by the server
//! worker), and `--resume` finds the newest ([`Checkpoints::latest`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::aggregate::Aggregator;
use crate::params::ParamSet;

/// A checkpoint that cannot be written or read.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// A file or folder cannot be written or read.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A file is there but does not hold what it should.
    #[error("checkpoint {path}: {message}")]
    Format {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

impl CheckpointError {
    /// A [`CheckpointError::Format`] about `path`.
    pub fn format(path: &Path, message: impl std::fmt::Display) -> Self {
        Self::Format {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }

    /// A [`CheckpointError::Io`] about `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How a checkpoint holds the global parameters.
pub trait ParamStore: Send + Sync {
    /// Writes `params` into the folder `dir` (which exists).
    fn save(&self, dir: &Path, params: &ParamSet) -> Result<(), CheckpointError>;
    /// Reads back what [`Self::save`] wrote into `dir`.
    fn load(&self, dir: &Path) -> Result<ParamSet, CheckpointError>;
    /// Whether `dir` holds parameters in this format.
    fn holds(&self, dir: &Path) -> bool;
}

/// Any [`ParamSet`] as MessagePack, in `params.msgpack`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MsgpackStore;

impl MsgpackStore {
    /// The file the parameters are kept in.
    pub const FILE: &'static str = "params.msgpack";
}

impl ParamStore for MsgpackStore {
    fn save(&self, dir: &Path, params: &ParamSet) -> Result<(), CheckpointError> {
        let path = dir.join(Self::FILE);
        let bytes =
            rmp_serde::to_vec_named(params).map_err(|e| CheckpointError::format(&path, e))?;
        std::fs::write(&path, bytes).map_err(|e| CheckpointError::io(&path, e))
    }

    fn load(&self, dir: &Path) -> Result<ParamSet, CheckpointError> {
        let path = dir.join(Self::FILE);
        let bytes = std::fs::read(&path).map_err(|e| CheckpointError::io(&path, e))?;
        let params: ParamSet = rmp_serde::from_slice(&bytes).map_err(|e| {
            CheckpointError::format(&path, format!("not a parameter checkpoint ({e})"))
        })?;
        params
            .check_finite()
            .map_err(|e| CheckpointError::format(&path, e))?;
        Ok(params)
    }

    fn holds(&self, dir: &Path) -> bool {
        dir.join(Self::FILE).is_file()
    }
}

/// The newest checkpoint of a course, as a resumed course starts from it.
#[derive(Debug)]
pub struct Restored {
    /// The round it was written after.
    pub round: u64,
    /// The global parameters after that round.
    pub params: ParamSet,
    /// Its folder (an aggregator's state comes back from there).
    pub dir: PathBuf,
}

/// Where and how often a course checkpoints, and in what format.
#[derive(Clone)]
pub struct Checkpoints {
    dir: PathBuf,
    every: u64,
    store: Arc<dyn ParamStore>,
    /// The fingerprint of the configuration that writes (and may resume) them.
    tag: Option<String>,
}

impl std::fmt::Debug for Checkpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoints")
            .field("dir", &self.dir)
            .field("every", &self.every)
            .finish_non_exhaustive()
    }
}

/// The file of a checkpoint's round and client count.
const STATE_FILE: &str = "state.json";
/// The file of a stateful aggregator's state.
const AGGREGATOR_STATE: &str = "aggregator_state.msgpack";
/// The folder of the clients' own states (an in-process course's).
const CLIENTS: &str = "clients";
/// The server's own state beside the strategy's (`federate.keep_best`'s tracker).
const SERVER_STATE: &str = "server_state.msgpack";

impl Checkpoints {
    /// Checkpoints in `dir` every `every` rounds (0: never), parameters held by `store`.
    pub fn new(dir: impl Into<PathBuf>, every: u64, store: Arc<dyn ParamStore>) -> Self {
        Self {
            dir: dir.into(),
            every,
            store,
            tag: None,
        }
    }

    /// Marks every checkpoint with `tag` (a fingerprint of the course's
    /// configuration); [`Self::latest`] then refuses checkpoints marked otherwise.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// The round of the newest checkpoint folder in `dir` that holds a
    /// `state.json`, without reading any parameters.
    pub fn newest_round(dir: &Path) -> Option<u64> {
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(STATE_FILE).is_file())
            .filter_map(|e| {
                e.file_name()
                    .to_string_lossy()
                    .strip_prefix("round-")?
                    .parse::<u64>()
                    .ok()
            })
            .max()
    }

    /// The folder every checkpoint of the course is in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The folder of the checkpoint written after `round`.
    pub fn round_dir(&self, round: u64) -> PathBuf {
        self.dir.join(format!("round-{round:04}"))
    }

    /// Whether a checkpoint is due after `round`.
    pub fn due(&self, round: u64) -> bool {
        self.every > 0 && round.is_multiple_of(self.every)
    }

    /// Writes the checkpoint of `round`: the global `params`, the round and
    /// the number of `clients` aggregated, `aggregator`'s state if it keeps
    /// one, the clients' own states and the server's (`keep_best`'s
    /// tracker). Returns the checkpoint's folder.
    pub fn write(
        &self,
        round: u64,
        params: &ParamSet,
        clients: usize,
        aggregator: &dyn Aggregator,
        client_states: &[(u32, Vec<u8>)],
        server_state: Option<&[u8]>,
    ) -> Result<PathBuf, CheckpointError> {
        // Everything goes into a hidden folder first, renamed into place at
        // the end: a process killed mid-write leaves no half checkpoint
        // that `latest` would take for a whole one.
        let dir = self.round_dir(round);
        let partial = self.dir.join(format!(".round-{round:04}.partial"));
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(|e| CheckpointError::io(&partial, e))?;
        }
        std::fs::create_dir_all(&partial).map_err(|e| CheckpointError::io(&partial, e))?;
        self.store.save(&partial, params)?;
        let mut state = serde_json::json!({ "round": round, "clients": clients });
        if let Some(tag) = &self.tag {
            state["config"] = serde_json::Value::from(tag.as_str());
        }
        let path = partial.join(STATE_FILE);
        std::fs::write(&path, state.to_string()).map_err(|e| CheckpointError::io(&path, e))?;
        match aggregator.save_state() {
            Ok(Some(bytes)) => {
                let path = partial.join(AGGREGATOR_STATE);
                std::fs::write(&path, bytes).map_err(|e| CheckpointError::io(&path, e))?;
            }
            Ok(None) => {}
            // The parameters are saved; only the aggregator's extra state is not.
            Err(e) => tracing::warn!(
                "{e}; this checkpoint holds no aggregator state, so a course resumed from it starts the aggregator fresh"
            ),
        }
        if let Some(bytes) = server_state {
            let path = partial.join(SERVER_STATE);
            std::fs::write(&path, bytes).map_err(|e| CheckpointError::io(&path, e))?;
        }
        if !client_states.is_empty() {
            let folder = partial.join(CLIENTS);
            std::fs::create_dir_all(&folder).map_err(|e| CheckpointError::io(&folder, e))?;
            for (client, bytes) in client_states {
                let path = folder.join(format!("client-{client}.msgpack"));
                std::fs::write(&path, bytes).map_err(|e| CheckpointError::io(&path, e))?;
            }
        }
        // A round done again (after a resume) replaces its old checkpoint.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| CheckpointError::io(&dir, e))?;
        }
        std::fs::rename(&partial, &dir).map_err(|e| CheckpointError::io(&dir, e))?;
        tracing::info!(round, dir = %dir.display(), "checkpoint written");
        Ok(dir)
    }

    /// Hands the server state saved in the checkpoint folder `dir` to
    /// `restore`, if that checkpoint saved one.
    pub fn restore_server_state<E: std::fmt::Display>(
        dir: &Path,
        restore: impl FnOnce(&[u8]) -> Result<(), E>,
    ) -> Result<(), CheckpointError> {
        let path = dir.join(SERVER_STATE);
        if !path.is_file() {
            return Ok(());
        }
        let bytes = std::fs::read(&path).map_err(|e| CheckpointError::io(&path, e))?;
        restore(&bytes).map_err(|e| {
            CheckpointError::format(
                &path,
                format!("{e} (delete the file to resume without the best round so far)"),
            )
        })
    }

    /// The newest checkpoint that holds parameters in this store's format, if any.
    pub fn latest(&self) -> Result<Option<Restored>, CheckpointError> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(None);
        };
        let newest = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let round = name.strip_prefix("round-")?.parse::<u64>().ok()?;
                let dir = e.path();
                self.store.holds(&dir).then_some((round, dir))
            })
            .max_by_key(|(round, _)| *round);
        let Some((round, dir)) = newest else {
            return Ok(None);
        };
        let path = dir.join(STATE_FILE);
        let state: serde_json::Value = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        if let Some(tag) = &self.tag {
            if let Some(theirs) = state.get("config").and_then(|v| v.as_str()) {
                if theirs != tag {
                    return Err(CheckpointError::format(
                        &path,
                        "was written by a course of another configuration; it cannot be resumed by this one",
                    ));
                }
            }
        }
        let params = self.store.load(&dir)?;
        Ok(Some(Restored { round, params, dir }))
    }

    /// The client states saved in the checkpoint folder `dir`, by client.
    pub fn client_states(dir: &Path) -> Result<Vec<(u32, Vec<u8>)>, CheckpointError> {
        let folder = dir.join(CLIENTS);
        let Ok(entries) = std::fs::read_dir(&folder) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_prefix("client-")
                .and_then(|n| n.strip_suffix(".msgpack"))
                .and_then(|n| n.parse().ok())
            else {
                continue;
            };
            let bytes =
                std::fs::read(e.path()).map_err(|err| CheckpointError::io(&e.path(), err))?;
            out.push((id, bytes));
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// Gives `aggregator` back the state saved in the checkpoint folder
    /// `dir`, if that checkpoint saved one. Returns whether it did.
    pub fn restore_aggregator(
        dir: &Path,
        aggregator: &mut dyn Aggregator,
    ) -> Result<bool, CheckpointError> {
        let path = dir.join(AGGREGATOR_STATE);
        if !path.is_file() {
            return Ok(false);
        }
        let bytes = std::fs::read(&path).map_err(|e| CheckpointError::io(&path, e))?;
        aggregator.load_state(&bytes).map_err(|e| {
            CheckpointError::format(
                &path,
                format!("{e} (delete the file to resume with a fresh aggregator state)"),
            )
        })?;
        tracing::info!(path = %path.display(), "aggregator state restored");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::FedAvg;

    fn params(v: f32) -> ParamSet {
        let mut p = ParamSet::new();
        p.insert("w", vec![2], vec![v, -v]).unwrap();
        p
    }

    #[test]
    fn the_newest_round_comes_back() {
        let tmp = std::env::temp_dir().join(format!("fedtune-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let cp = Checkpoints::new(&tmp, 2, Arc::new(MsgpackStore));
        assert!(cp.latest().unwrap().is_none(), "nothing yet");
        assert!(!cp.due(1) && cp.due(2) && cp.due(4));
        for round in [2, 10, 4] {
            cp.write(round, &params(round as f32), 3, &FedAvg, &[], None)
                .unwrap();
        }
        // A folder without parameters (a write cut short) is not a checkpoint.
        std::fs::create_dir_all(cp.round_dir(12)).unwrap();
        let found = cp.latest().unwrap().unwrap();
        assert_eq!(found.round, 10);
        assert_eq!(found.params, params(10.0));
        assert_eq!(found.dir, tmp.join("round-0010"));
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(found.dir.join(STATE_FILE)).unwrap())
                .unwrap();
        assert_eq!(state, serde_json::json!({"round": 10, "clients": 3}));
        // FedAvg keeps no state: nothing to restore.
        assert!(!Checkpoints::restore_aggregator(&found.dir, &mut FedAvg).unwrap());
        assert_eq!(Checkpoints::newest_round(&tmp), Some(10));
        // Another configuration's checkpoints are refused; its own are taken.
        let tagged = Checkpoints::new(&tmp, 1, Arc::new(MsgpackStore)).with_tag("abc");
        tagged
            .write(11, &params(11.0), 3, &FedAvg, &[], None)
            .unwrap();
        assert_eq!(tagged.latest().unwrap().unwrap().round, 11);
        let other = Checkpoints::new(&tmp, 1, Arc::new(MsgpackStore)).with_tag("xyz");
        let err = other.latest().unwrap_err().to_string();
        assert!(err.contains("another configuration"), "{err}");
        std::fs::remove_dir_all(tmp.join("round-0011")).unwrap();
        std::fs::write(found.dir.join(MsgpackStore::FILE), b"junk").unwrap();
        let err = cp.latest().unwrap_err().to_string();
        assert!(err.contains("not a parameter checkpoint"), "{err}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn a_write_cut_short_is_no_checkpoint_and_a_redone_round_replaces_its_own() {
        let tmp = std::env::temp_dir().join(format!("fedtune-ckpt-cut-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let cp = Checkpoints::new(&tmp, 1, Arc::new(MsgpackStore));
        let clients = [(2, b"two".to_vec()), (1, b"one".to_vec())];
        cp.write(1, &params(1.0), 2, &FedAvg, &clients, None)
            .unwrap();
        // A process killed while writing round 2 left its parameters only.
        let cut = tmp.join(".round-0002.partial");
        std::fs::create_dir_all(&cut).unwrap();
        MsgpackStore.save(&cut, &params(2.0)).unwrap();
        let found = cp.latest().unwrap().unwrap();
        assert_eq!(found.round, 1);
        assert_eq!(
            Checkpoints::client_states(&found.dir).unwrap(),
            vec![(1, b"one".to_vec()), (2, b"two".to_vec())]
        );
        // Round 2 done again: the leftover is cleared, and a round written
        // twice holds the second write only (no stale client file).
        cp.write(2, &params(2.5), 2, &FedAvg, &clients, None)
            .unwrap();
        cp.write(2, &params(3.0), 2, &FedAvg, &clients[..1], None)
            .unwrap();
        let found = cp.latest().unwrap().unwrap();
        assert_eq!((found.round, found.params), (2, params(3.0)));
        assert_eq!(
            Checkpoints::client_states(&found.dir).unwrap(),
            vec![(2, b"two".to_vec())]
        );
        assert!(!cut.exists());
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
