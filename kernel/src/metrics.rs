//! Cost accounting: one JSON line per event of a course.
//!
//! FS-LLM reports what a federated fine-tuning costs — compute time, wall time,
//! bytes on the wire — next to how well it learns. The server writes a
//! [`Record`] for every client's training and evaluation and for every round as
//! it happens, so a run's `metrics.jsonl` is complete up to the last finished
//! event even if the process dies.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What a record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// One client's local training in one round.
    Train,
    /// One client's evaluation (or, with no client, the sample-weighted mean over clients).
    Eval,
    /// A whole round: aggregation done.
    Round,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// What happened.
    pub event: Event,
    /// The round (0 = before training).
    pub round: u64,
    /// The client, or `None` for the server / all clients.
    pub client: Option<u32>,
    /// The data split (`train`, `val`, `test`, …) where it applies.
    pub split: Option<String>,
    /// Mean loss over the samples.
    pub loss: Option<f64>,
    /// Number of samples behind the loss.
    pub samples: Option<u64>,
    /// Encoded bytes client → server.
    pub bytes_up: u64,
    /// Encoded bytes server → client.
    pub bytes_down: u64,
    /// Seconds the client spent computing.
    pub compute_s: f64,
    /// Seconds of wall time, as the server saw it.
    pub wall_s: f64,
    /// Further named metrics (accuracy, perplexity, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

impl Record {
    /// A record with zero costs and no optional fields set.
    pub fn new(event: Event, round: u64, client: Option<u32>) -> Self {
        Self {
            event,
            round,
            client,
            split: None,
            loss: None,
            samples: None,
            bytes_up: 0,
            bytes_down: 0,
            compute_s: 0.0,
            wall_s: 0.0,
            extra: BTreeMap::new(),
        }
    }
}

/// The records of a course, kept in memory and optionally appended to a JSON-lines file.
#[derive(Default)]
pub struct MetricsLog {
    records: Vec<Record>,
    file: Option<BufWriter<File>>,
    observer: Option<Observer>,
    tensorboard: Option<crate::tensorboard::EventWriter>,
}

/// Called with each record as it is logged (progress displays).
pub type Observer = Box<dyn FnMut(&Record) + Send>;

impl std::fmt::Debug for MetricsLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsLog")
            .field("records", &self.records.len())
            .field("file", &self.file.is_some())
            .field("observer", &self.observer.is_some())
            .field("tensorboard", &self.tensorboard.is_some())
            .finish()
    }
}

impl MetricsLog {
    /// A log kept in memory only.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// A log that also appends each record to `path` (created or extended).
    pub fn to_file(path: &Path) -> std::io::Result<Self> {
        let file = File::options().create(true).append(true).open(path)?;
        Ok(Self {
            records: Vec::new(),
            file: Some(BufWriter::new(file)),
            observer: None,
            tensorboard: None,
        })
    }

    /// Also writes every record's scalars to a TensorBoard event file in
    /// `dir` (see [`crate::tensorboard`]).
    pub fn with_tensorboard(mut self, dir: &Path) -> std::io::Result<Self> {
        self.tensorboard = Some(crate::tensorboard::EventWriter::create(dir)?);
        Ok(self)
    }

    /// Cuts the metrics file at `path` back to what a course resumed after
    /// round `round` keeps: every record of earlier rounds, and the training
    /// and round records of `round` itself — not its evaluation (the resumed
    /// server runs it again) nor anything of an interrupted later round. A
    /// line that does not parse (cut short by a kill) goes too.
    pub fn resume_at(path: &Path, round: u64) -> std::io::Result<()> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| {
                serde_json::from_str::<Record>(line)
                    .is_ok_and(|r| r.round < round || (r.round == round && r.event != Event::Eval))
            })
            .collect();
        let mut out = kept.join("\n");
        if !out.is_empty() {
            out.push('\n');
        }
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, out)?;
        std::fs::rename(&tmp, path)
    }

    /// Also hands every record to `observer` as it is logged.
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Adds a record, writing and flushing it to the file if there is one.
    pub fn push(&mut self, record: Record) -> std::io::Result<()> {
        if let Some(file) = &mut self.file {
            serde_json::to_writer(&mut *file, &record)?;
            file.write_all(b"\n")?;
            file.flush()?;
        }
        if let Some(tb) = &mut self.tensorboard {
            tb.write(&record)?;
        }
        if let Some(observe) = &mut self.observer {
            observe(&record);
        }
        self.records.push(record);
        Ok(())
    }

    /// All records so far.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Gives up the records.
    pub fn into_records(self) -> Vec<Record> {
        self.records
    }
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`; `None` elsewhere).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_written_as_json_lines() {
        let dir = std::env::temp_dir().join(format!("fedtune-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let _ = std::fs::remove_file(&path);
        let mut log = MetricsLog::to_file(&path).unwrap();
        let mut r = Record::new(Event::Train, 1, Some(2));
        r.loss = Some(0.5);
        r.bytes_up = 10;
        log.push(r.clone()).unwrap();
        log.push(Record::new(Event::Round, 1, None)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Record> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, log.records());
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["event"], "train");
        assert_eq!(first["client"], 2);
        assert_eq!(first["split"], serde_json::Value::Null);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
