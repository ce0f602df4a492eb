//! TensorBoard event files: every record of a course as scalars, so that
//! `tensorboard --logdir runs/` shows a run's curves beside `metrics.jsonl`.
//!
//! An event file is a sequence of TFRecords — a little-endian `u64` length,
//! the masked CRC-32C of those 8 bytes, the data, the masked CRC-32C of the
//! data — each holding one `tensorflow.Event` protocol buffer: first one
//! with `file_version = "brain.Event:2"`, then one per scalar with
//! `wall_time`, `step` (the round) and a `Summary` of one `simple_value`.
//! The few protobuf fields needed are written by hand; no protobuf crate.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::metrics::{Event, Record};

/// The CRC-32C (Castagnoli) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    const POLY: u32 = 0x82F6_3B78; // reversed 0x1EDC6F41
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// TFRecord's masked CRC: rotated right by 15 bits plus a constant.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 2), out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), … }` with either
/// `file_version = 3` or `summary = 5`.
fn event(wall_time: f64, step: i64, body: (u32, &[u8])) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(1 << 3 | 1);
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(2 << 3);
    varint(step as u64, &mut out);
    bytes_field(body.0, body.1, &mut out);
    out
}

/// `Summary { value = 1: Value { tag = 1 (string), simple_value = 2 (float) } }`.
fn scalar_summary(tag: &str, value: f32) -> Vec<u8> {
    let mut v = Vec::new();
    bytes_field(1, tag.as_bytes(), &mut v);
    v.push(2 << 3 | 5);
    v.extend_from_slice(&value.to_le_bytes());
    let mut summary = Vec::new();
    bytes_field(1, &v, &mut summary);
    summary
}

/// Appends scalars to one event file.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// A new event file in `dir` (created), named as TensorBoard expects
    /// (`events.out.tfevents.<seconds>.<host>`; a resumed run adds a file).
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "fedtune".into());
        let stamp = now();
        let mut path = dir.join(format!("events.out.tfevents.{}.{host}", stamp as u64));
        // Two writers in one second (a quick resume) get two files.
        let mut n = 1;
        while path.exists() {
            path = dir.join(format!("events.out.tfevents.{}.{host}.{n}", stamp as u64));
            n += 1;
        }
        let mut w = Self {
            file: BufWriter::new(File::create(&path)?),
            path,
        };
        w.record(&event(stamp, 0, (3, b"brain.Event:2")))?;
        w.file.flush()?;
        Ok(w)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked_crc(&len).to_le_bytes())?;
        self.file.write_all(data)?;
        self.file.write_all(&masked_crc(data).to_le_bytes())
    }

    /// Writes `value` under `tag` at `step`.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> std::io::Result<()> {
        let summary = scalar_summary(tag, value as f32);
        self.record(&event(now(), step as i64, (5, &summary)))
    }

    /// Writes `record`'s scalars (see [`scalars`]) and flushes.
    pub fn write(&mut self, record: &Record) -> std::io::Result<()> {
        for (tag, value) in scalars(record) {
            self.scalar(&tag, record.round, value)?;
        }
        self.file.flush()
    }
}

/// The scalars of one record, by tag: `eval/<split>_loss` (the mean over
/// clients; `…/client_N` per client), `train/loss/client_N`, `round/…`
/// (bytes, wall time, clients) and each named figure under its event
/// (`round/flops`, `round/dp_epsilon`, `train/last_step_loss/client_N`, …).
/// Non-finite values are left out.
pub fn scalars(r: &Record) -> Vec<(String, f64)> {
    let who = r.client.map_or(String::new(), |c| format!("/client_{c}"));
    let mut out = Vec::new();
    match r.event {
        Event::Eval => {
            if let (Some(split), Some(loss)) = (&r.split, r.loss) {
                out.push((format!("eval/{split}_loss{who}"), loss));
            }
            for (k, v) in &r.extra {
                let split = r.split.as_deref().unwrap_or("eval");
                out.push((format!("eval/{split}_{k}{who}"), *v));
            }
        }
        Event::Train => {
            if let Some(loss) = r.loss {
                out.push((format!("train/loss{who}"), loss));
            }
            out.push((format!("train/compute_s{who}"), r.compute_s));
            for (k, v) in &r.extra {
                out.push((format!("train/{k}{who}"), *v));
            }
        }
        Event::Round => {
            out.push(("round/bytes_up".into(), r.bytes_up as f64));
            out.push(("round/bytes_down".into(), r.bytes_down as f64));
            out.push(("round/wall_s".into(), r.wall_s));
            if let Some(loss) = r.loss {
                out.push(("round/train_loss".into(), loss));
            }
            for (k, v) in &r.extra {
                out.push((format!("round/{k}"), *v));
            }
        }
    }
    out.retain(|(_, v)| v.is_finite());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC catalogue's check value of CRC-32C over "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varints_are_protobufs() {
        let enc = |v: u64| {
            let mut out = Vec::new();
            varint(v, &mut out);
            out
        };
        // The protobuf documentation's example: 150 → 96 01.
        assert_eq!(enc(150), [0x96, 0x01]);
        assert_eq!(enc(1), [1]);
        assert_eq!(enc(300), [0xAC, 0x02]);
    }

    #[test]
    fn records_become_tagged_scalars() {
        let mut r = Record::new(Event::Eval, 3, Some(2));
        r.split = Some("test".into());
        r.loss = Some(1.5);
        assert_eq!(scalars(&r), [("eval/test_loss/client_2".to_string(), 1.5)]);
        let mut round = Record::new(Event::Round, 3, None);
        round.extra.insert("flops".into(), 2e12);
        round.extra.insert("nan".into(), f64::NAN);
        let tags: Vec<String> = scalars(&round).into_iter().map(|(t, _)| t).collect();
        assert_eq!(
            tags,
            [
                "round/bytes_up",
                "round/bytes_down",
                "round/wall_s",
                "round/flops"
            ]
        );
    }
}
