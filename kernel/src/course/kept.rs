//! What a client process keeps between rounds, on disk.
//!
//! A client alone in its process (`fedtune client --state-dir DIR`) may hold
//! state that shapes its next fits and is not in the global parameters:
//! AdamW's moments, a personal adapter, hook script state
//! ([`LocalTrainer::save_client`]). After every successful fit it writes
//! that state as `after-round-NNNNNN.msgpack` (a new file, renamed into
//! place), keeping the newest [`KEEP`]; before every fit it makes sure the
//! trainer holds the state after the newest saved round *before* the one it
//! is asked for. So a client killed and restarted — even mid-round, or after
//! it trained a round whose update never reached the server — trains exactly
//! as an uninterrupted one would, as long as the server does not go back
//! further than [`KEEP`] fits.

use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::trainer::{LocalTrainer, TrainerError};

/// Saved fits kept per client.
pub const KEEP: usize = 4;

/// One client's saved states in a folder, and which of them its trainer holds.
#[derive(Debug)]
pub struct KeptState {
    dir: PathBuf,
    /// The round whose after-state the trainer holds (0: the state before
    /// any fit); `None` when unknown (a fresh start, or a failed fit).
    holds: Option<u64>,
}

impl KeptState {
    /// Keeps client `id`'s states in `dir/client-ID` (created).
    pub fn new(dir: &Path, id: u32) -> Result<Self, TrainerError> {
        let dir = dir.join(format!("client-{id}"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create the state folder {}: {e}", dir.display()))?;
        Ok(Self { dir, holds: None })
    }

    fn file(&self, round: u64) -> PathBuf {
        self.dir.join(format!("after-round-{round:06}.msgpack"))
    }

    /// The rounds saved, oldest first.
    fn saved(&self) -> Result<Vec<u64>, TrainerError> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| format!("cannot read the state folder {}: {e}", self.dir.display()))?;
        let mut rounds: Vec<u64> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix("after-round-")?
                    .strip_suffix(".msgpack")?
                    .parse()
                    .ok()
            })
            .collect();
        rounds.sort_unstable();
        Ok(rounds)
    }

    fn write(&mut self, round: u64, bytes: &[u8]) -> Result<(), TrainerError> {
        let path = self.file(round);
        let partial = path.with_extension("partial");
        std::fs::write(&partial, bytes)
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|e| format!("cannot save the client's state to {}: {e}", path.display()))?;
        self.holds = Some(round);
        let saved = self.saved()?;
        for old in &saved[..saved.len().saturating_sub(KEEP)] {
            let _ = std::fs::remove_file(self.file(*old));
        }
        Ok(())
    }

    /// Before client `id` trains round `round`: the trainer takes up the
    /// state after the newest saved round before `round`. The first fit in
    /// an empty folder saves the trainer's initial state as round 0.
    pub fn before(
        &mut self,
        t: &mut dyn LocalTrainer,
        id: u32,
        round: u64,
    ) -> Result<(), TrainerError> {
        let saved = self.saved()?;
        if saved.is_empty() {
            return match t.save_client(id)? {
                Some(bytes) => self.write(0, &bytes),
                None => Ok(()), // a trainer that keeps nothing
            };
        }
        let Some(&want) = saved.iter().rev().find(|&&q| q < round) else {
            if self.holds.is_none() {
                // A fresh process holds the state from before any fit (one
                // that was empty then saved no round 0).
                return Ok(());
            }
            warn!(
                client = id,
                round,
                "no saved state from before round {round} (the oldest is after round {}); training on with the state this process holds",
                saved[0]
            );
            return Ok(());
        };
        if self.holds == Some(want) {
            return Ok(());
        }
        let path = self.file(want);
        let bytes = std::fs::read(&path)
            .map_err(|e| format!("cannot read the client's state {}: {e}", path.display()))?;
        t.load_client(id, &bytes).map_err(|e| {
            format!(
                "cannot restore the client's state from {}: {e}",
                path.display()
            )
        })?;
        info!(client = id, round, from = %path.display(), "client state restored");
        self.holds = Some(want);
        Ok(())
    }

    /// After client `id` trained round `round` successfully.
    pub fn after(&mut self, t: &dyn LocalTrainer, id: u32, round: u64) -> Result<(), TrainerError> {
        match t.save_client(id)? {
            Some(bytes) => self.write(round, &bytes),
            None => Ok(()),
        }
    }

    /// A fit failed part-way: what the trainer holds is no longer known.
    pub fn lost(&mut self) {
        self.holds = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::course::trainer::{LocalUpdate, SplitEval, TrainContext};
    use crate::params::ParamSet;

    /// A trainer whose whole state is one number per process.
    struct Held(u8);

    impl LocalTrainer for Held {
        fn train(
            &mut self,
            _: u32,
            _: &ParamSet,
            _: &TrainContext,
        ) -> Result<LocalUpdate, TrainerError> {
            Err("not used".into())
        }
        fn evaluate(
            &mut self,
            _: u32,
            _: &ParamSet,
            _: &TrainContext,
        ) -> Result<Vec<SplitEval>, TrainerError> {
            Err("not used".into())
        }
        fn save_client(&self, _: u32) -> Result<Option<Vec<u8>>, TrainerError> {
            Ok(Some(vec![self.0]))
        }
        fn load_client(&mut self, _: u32, bytes: &[u8]) -> Result<(), TrainerError> {
            let &[b] = bytes else {
                return Err("not one byte".into());
            };
            self.0 = b;
            Ok(())
        }
    }

    #[test]
    fn a_fresh_process_takes_up_the_state_from_before_the_round_it_is_asked() {
        let dir = std::env::temp_dir().join(format!("fedtune-kept-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut kept = KeptState::new(&dir, 7).unwrap();
        let mut t = Held(100);
        kept.before(&mut t, 7, 1).unwrap(); // saves the initial state as round 0
        for round in 1..=6 {
            kept.before(&mut t, 7, round).unwrap();
            t.0 = round as u8; // "trains"
            kept.after(&t, 7, round).unwrap();
        }
        assert_eq!(
            kept.saved().unwrap(),
            vec![3, 4, 5, 6],
            "the newest {KEEP} only"
        );
        // A new process asked round 6 again (its update was lost): the state after 5.
        let mut again = KeptState::new(&dir, 7).unwrap();
        let mut fresh = Held(0);
        again.before(&mut fresh, 7, 6).unwrap();
        assert_eq!(fresh.0, 5);
        // Asked a round further back than kept (after it trained): it goes
        // on with what it holds.
        again.before(&mut fresh, 7, 2).unwrap();
        assert_eq!(fresh.0, 5);
        // A corrupt file is an error naming it, not a silent fresh start.
        std::fs::write(dir.join("client-7/after-round-000006.msgpack"), b"").unwrap();
        let err = KeptState::new(&dir, 7)
            .unwrap()
            .before(&mut Held(0), 7, 7)
            .unwrap_err()
            .to_string();
        assert!(err.contains("after-round-000006.msgpack"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
