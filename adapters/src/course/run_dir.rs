//! The run directory: where a course writes, one run at a time.
//!
//! A run directory holds one course's record — `config.toml`,
//! `metrics.jsonl`, `checkpoints/`, `adapter/`, `summary.json` — and nothing
//! may mix two runs into it:
//!
//! - a lock file (`.lock`, holding the process id) refuses a second run in
//!   the same directory while the first is alive (a lock left by a dead
//!   process is taken over);
//! - a directory that already holds a run is refused unless the run is
//!   continued (`--resume`) or replaced (`--overwrite`, which deletes the
//!   earlier run's files and nothing else);
//! - a resumed run must have the same configuration (more rounds allowed,
//!   never fewer than the checkpoints hold), and every checkpoint carries the
//!   configuration's fingerprint, so checkpoints of another configuration
//!   are never resumed from.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::config::{same_config_but_rounds, CourseFile};
use super::{ensure, Context, CourseError, Result};
use crate::data;

/// The files and folders a run writes: what `--overwrite` deletes.
const RUN_FILES: [&str; 17] = [
    "config.toml",
    "metrics.jsonl",
    "summary.json",
    "run.log",
    "server.log",
    "server.out",
    "checkpoints",
    "adapter",
    "adapter-emulator",
    "adapter-emulator-best",
    "adapter-best",
    "final",
    "eval",
    "report",
    "report.md",
    "broker",
    "client-state",
];

/// The lock file's name.
const LOCK: &str = ".lock";

/// Where a run writes, and whether it continues or replaces an earlier one.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// The run directory.
    pub dir: PathBuf,
    /// Continue from the newest checkpoint in `dir`.
    pub resume: bool,
    /// Delete an earlier run's files in `dir` first.
    pub overwrite: bool,
    /// Where the data sets are (`None`: the default search).
    pub data_root: Option<PathBuf>,
    /// The directory was prepared (locked, checked) by the process that
    /// started this one — `fedtune run` over NATS starting its server.
    pub managed: bool,
}

/// Holds a run directory for one run; the lock goes when it drops.
#[derive(Debug)]
pub struct RunLock {
    path: Option<PathBuf>,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Output {
    /// Takes the run directory for `course`: creates it, locks it, checks
    /// that it holds no other run (or that a resumed one has the same
    /// configuration and no more rounds done than asked for), and writes
    /// the resolved configuration to `config.toml`.
    pub fn prepare(&self, course: &CourseFile) -> Result<RunLock> {
        let resolved = course.resolved()?;
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        if self.managed {
            return Ok(RunLock { path: None });
        }
        let lock = self.lock()?;
        if self.resume {
            same_config_but_rounds(&self.dir.join("config.toml"), &resolved)?;
            let done = fedtune_kernel::Checkpoints::newest_round(&self.dir.join("checkpoints"));
            let rounds = course.cfg.course.rounds;
            ensure!(
                done.is_none_or(|d| d <= rounds),
                "--resume: {} already holds round {} of its course; federate.rounds = {rounds} would end it before that",
                self.dir.display(),
                done.unwrap_or(0)
            );
            // The records of what the resumed course does again go: no
            // duplicates, no half-done round.
            let metrics = self.dir.join("metrics.jsonl");
            fedtune_kernel::MetricsLog::resume_at(&metrics, done.unwrap_or(0))
                .with_context(|| format!("cannot rewrite {}", metrics.display()))?;
            // A course that trains on ends with another adapter: the `[eval]`
            // results of the one before are not its (a course stopped
            // during its final evaluation keeps them, to resume it).
            let evals = self.dir.join("eval");
            if done.is_none_or(|d| d < rounds) && evals.is_dir() {
                std::fs::remove_dir_all(&evals)
                    .with_context(|| format!("cannot delete {}", evals.display()))?;
            }
        } else {
            self.clear_earlier_run()?;
        }
        let path = self.dir.join("config.toml");
        std::fs::write(&path, resolved)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(lock)
    }

    /// Where the data sets are.
    pub fn data_root(&self) -> PathBuf {
        data::data_root(self.data_root.as_deref())
    }

    /// Takes `dir/.lock`, or says which live process holds it.
    fn lock(&self) -> Result<RunLock> {
        let path = self.dir.join(LOCK);
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id())
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    return Ok(RunLock { path: Some(path) });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let pid: Option<u32> = holder.trim().parse().ok();
                    if pid.is_some_and(alive) {
                        return Err(CourseError::invalid(format!(
                            "{} is in use by another fedtune run (process {}); wait for it, or choose another --out",
                            self.dir.display(),
                            holder.trim()
                        )));
                    }
                    tracing::warn!(lock = %path.display(), holder = holder.trim(), "taking over the lock of a run that is no longer running");
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()))
                }
            }
        }
        Err(CourseError::invalid(format!(
            "cannot lock {}: another run keeps taking it",
            self.dir.display()
        )))
    }

    /// Refuses a directory holding an earlier run, or (with `overwrite`)
    /// deletes that run's files and nothing else.
    fn clear_earlier_run(&self) -> Result<()> {
        let earlier: Vec<&str> = RUN_FILES
            .iter()
            .copied()
            .filter(|f| self.dir.join(f).exists())
            .collect();
        let outs = client_outputs(&self.dir)?;
        if earlier.is_empty() && outs.is_empty() {
            return Ok(());
        }
        ensure!(
            self.overwrite,
            "{} already holds a run ({}); continue it with --resume, replace it with --overwrite, or choose another --out",
            self.dir.display(),
            earlier.join(", ")
        );
        for name in earlier {
            let path = self.dir.join(name);
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.with_context(|| format!("--overwrite: cannot delete {}", path.display()))?;
        }
        for path in outs {
            std::fs::remove_file(&path)
                .with_context(|| format!("--overwrite: cannot delete {}", path.display()))?;
        }
        Ok(())
    }
}

/// The client processes' output files of a run over NATS (`client-N.out`).
fn client_outputs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    Ok(entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| n.starts_with("client-") && n.ends_with(".out"))
        })
        .collect())
}

/// Whether process `pid` is running (on Linux, by its `/proc` entry;
/// elsewhere a lock is always taken to be live).
fn alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}
