//! `fedtune report RUN_DIR`: charts of a run's metrics and a Markdown report.
//!
//! The charts are plain SVG (`crate::chart`), so they need no font files or
//! image libraries and open in any browser or Markdown viewer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use fedtune_kernel::{Event, Record};

use crate::chart::{line_chart, Series};

pub fn report(dir: &Path) -> Result<()> {
    let metrics = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).with_context(|| {
        format!(
            "cannot read {} (is {} a run directory?)",
            metrics.display(),
            dir.display()
        )
    })?;
    let records: Vec<Record> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a metrics record", metrics.display(), i + 1))
        })
        .collect::<Result<_>>()?;
    if records.is_empty() {
        bail!("{} has no records yet", metrics.display());
    }
    let summary: Option<serde_json::Value> = std::fs::read_to_string(dir.join("summary.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());

    let charts = dir.join("report");
    std::fs::create_dir_all(&charts)
        .with_context(|| format!("cannot create {}", charts.display()))?;
    let eval = eval_series(&records);
    let train = per_client(&records, Event::Train, |_| true);
    let bytes = bytes_series(&records);
    let mut md = String::new();
    let name = summary
        .as_ref()
        .and_then(|s| s["course"].as_str())
        .unwrap_or("course");
    writeln!(md, "# Run report: {name}\n")?;
    if let Some(s) = &summary {
        summary_table(&mut md, s)?;
    }
    for (file, title, ylabel, series) in [
        ("eval_loss.svg", "Held-out loss per round", "loss", &eval),
        (
            "train_loss.svg",
            "Mean local training loss per round",
            "loss",
            &train,
        ),
        ("bytes.svg", "Bytes on the wire per round", "KB", &bytes),
    ] {
        if series.iter().all(|(_, pts)| pts.is_empty()) {
            continue;
        }
        std::fs::write(
            charts.join(file),
            line_chart(title, "round", ylabel, series),
        )?;
        writeln!(md, "## {title}\n\n![{title}](report/{file})\n")?;
    }
    std::fs::write(dir.join("report.md"), md)?;
    println!("{}", dir.join("report.md").display());
    Ok(())
}

/// Evaluation loss per client (and the weighted mean), per split.
fn eval_series(records: &[Record]) -> Vec<Series> {
    let mut out: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.event == Event::Eval) {
        let (Some(loss), Some(split)) = (r.loss, r.split.as_deref()) else {
            continue;
        };
        let who = match r.client {
            Some(c) => format!("client {c}"),
            None => "mean".to_string(),
        };
        out.entry(format!("{who} {split}"))
            .or_default()
            .push((r.round as f64, loss));
    }
    out.into_iter().collect()
}

fn per_client(records: &[Record], event: Event, keep: impl Fn(&Record) -> bool) -> Vec<Series> {
    let mut out: BTreeMap<u32, Vec<(f64, f64)>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.event == event && keep(r)) {
        if let (Some(c), Some(loss)) = (r.client, r.loss) {
            out.entry(c).or_default().push((r.round as f64, loss));
        }
    }
    out.into_iter()
        .map(|(c, pts)| (format!("client {c}"), pts))
        .collect()
}

fn bytes_series(records: &[Record]) -> Vec<Series> {
    let rounds: Vec<&Record> = records.iter().filter(|r| r.event == Event::Round).collect();
    vec![
        (
            "up (clients → server)".into(),
            rounds
                .iter()
                .map(|r| (r.round as f64, r.bytes_up as f64 / 1e3))
                .collect(),
        ),
        (
            "down (server → clients)".into(),
            rounds
                .iter()
                .map(|r| (r.round as f64, r.bytes_down as f64 / 1e3))
                .collect(),
        ),
    ]
}

fn summary_table(md: &mut String, s: &serde_json::Value) -> std::fmt::Result {
    let num = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.4}"));
    if let Some(clients) = s["per_client"].as_array() {
        writeln!(md, "| client | name | test loss before | test loss after |")?;
        writeln!(md, "|---|---|---:|---:|")?;
        for c in clients {
            writeln!(
                md,
                "| {} | {} | {} | {} |",
                c["id"],
                c["name"].as_str().unwrap_or(""),
                num(&c["test_loss_before"]),
                num(&c["test_loss_after"])
            )?;
        }
        writeln!(
            md,
            "| all | (weighted) | {} | {} |\n",
            num(&s["test_loss_before"]),
            num(&s["test_loss_after"])
        )?;
    }
    writeln!(
        md,
        "Bytes up {}, down {}; wall {} s; peak RSS {} MiB.\n",
        s["bytes_up"],
        s["bytes_down"],
        num(&s["wall_s"]),
        num(&s["peak_rss_mib"])
    )
}
