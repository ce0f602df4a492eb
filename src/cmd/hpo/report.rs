//! `report.md` of a search and its charts under `report/`: the objective
//! per evaluation, the best so far, and (with a score) FS-LLM's rank-vs-rank
//! landscape (its Figure 5b).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fedtune_kernel::hpo::{ranks, spearman, Evaluation, Objective, SearchOutcome, Space};

use super::short;
use crate::chart::{chart, line_chart, Series, Style};

/// A chart's file name under `report/` and its SVG.
type Chart = (&'static str, String);

/// The most rounds any evaluation with an objective ran (the highest fidelity).
pub fn top_rounds(o: &SearchOutcome) -> Option<u64> {
    o.evaluations
        .iter()
        .filter(|e| e.objective.is_some())
        .map(|e| e.rounds)
        .max()
}

/// The first metric that is not a loss (a task's score).
pub fn first_score(o: &SearchOutcome) -> Option<String> {
    o.evaluations
        .iter()
        .flat_map(|e| e.metrics.keys())
        .find(|k| !k.ends_with("loss"))
        .cloned()
}

/// Writes `report.md` with charts under `report/`: objective per
/// evaluation, best so far, and (with a score) the rank-vs-rank landscape.
pub fn write_report(
    out: &Path,
    o: &SearchOutcome,
    (method, space): (&str, &Space),
    objective: &Objective,
    score: Option<&str>,
) -> Result<PathBuf> {
    let dir = out.join("report");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut md = header(o, (method, space), objective)?;
    let mut charts = objective_charts(o, objective);
    writeln!(
        md,
        "\n![objective](report/objective.svg)\n\n![best so far](report/best-so-far.svg)\n"
    )?;
    if let Some(score) = score.filter(|s| *s != objective.metric.as_str()) {
        let (text, svg) = rank_against(o, &objective.metric, score);
        md.push_str(&text);
        charts.push(("rank-vs-rank.svg", svg));
    }
    md.push_str(&evaluations_table(o, space)?);
    for (name, svg) in charts {
        let path = dir.join(name);
        std::fs::write(&path, svg).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let path = out.join("report.md");
    std::fs::write(&path, md).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The title, what was searched for, and the space.
fn header(
    o: &SearchOutcome,
    (method, space): (&str, &Space),
    objective: &Objective,
) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "# Hyperparameter search: `{method}`\n")?;
    writeln!(
        md,
        "{} evaluations of {} configurations; objective: {} ({} is better). Space ({}):\n",
        o.evaluations.len(),
        o.evaluations
            .iter()
            .map(|e| e.trial)
            .collect::<BTreeSet<_>>()
            .len(),
        objective.metric,
        if objective.maximize {
            "higher"
        } else {
            "lower"
        },
        space.origin
    )?;
    for p in &space.params {
        writeln!(md, "- `{}`: {}", p.key, p.domain)?;
    }
    Ok(md)
}

/// The objective per evaluation (one series per fidelity) and the best so far.
fn objective_charts(o: &SearchOutcome, objective: &Objective) -> Vec<Chart> {
    let metric = &objective.metric;
    let mut by_rounds: BTreeMap<u64, Vec<(f64, f64)>> = BTreeMap::new();
    for e in &o.evaluations {
        if let Some(v) = e.metrics.get(metric) {
            by_rounds
                .entry(e.rounds)
                .or_default()
                .push((e.eval as f64, *v));
        }
    }
    let series: Vec<Series> = by_rounds
        .into_iter()
        .map(|(r, pts)| (format!("{r} rounds"), pts))
        .collect();
    let mut best = f64::INFINITY;
    let curve: Vec<(f64, f64)> = o
        .evaluations
        .iter()
        .filter_map(|e| {
            let v = e.objective?;
            best = best.min(v);
            let shown = if objective.maximize { -best } else { best };
            Some((e.eval as f64, shown))
        })
        .collect();
    vec![
        (
            "objective.svg",
            chart(
                &format!("{metric} per evaluation"),
                "evaluation",
                metric,
                &series,
                Style::Points,
            ),
        ),
        (
            "best-so-far.svg",
            line_chart(
                &format!("best {metric} so far"),
                "evaluation",
                metric,
                &[("best".into(), curve)],
            ),
        ),
    ]
}

/// FS-LLM's Figure 5b: rank by the objective against rank by `score`, over
/// the configurations evaluated at the most rounds; the section's text and
/// its chart.
fn rank_against(o: &SearchOutcome, metric: &str, score: &str) -> (String, String) {
    let top = top_rounds(o);
    let both: Vec<&Evaluation> = o
        .evaluations
        .iter()
        .filter(|e| {
            Some(e.rounds) == top && e.metrics.contains_key(metric) && e.metrics.contains_key(score)
        })
        .collect();
    let obj: Vec<f64> = both.iter().filter_map(|e| e.objective).collect();
    let sc = Objective::parse(score);
    let scv: Vec<f64> = both.iter().filter_map(|e| sc.of(&e.metrics)).collect();
    let rho = spearman(&obj, &scv);
    let (ro, rs) = (ranks(&obj), ranks(&scv));
    let pts: Vec<(f64, f64)> = ro.into_iter().zip(rs).collect();
    let rho_text = rho.map_or(
        "undefined (fewer than 3 pairs, or a constant side)".to_string(),
        |r| format!("{r:.3}"),
    );
    let svg = chart(
        &format!("rank by {metric} vs rank by {score} (Spearman rho {rho_text})"),
        &format!("rank by {metric} (1 = best)"),
        &format!("rank by {score} (1 = best)"),
        &[("configuration".into(), pts)],
        Style::Points,
    );
    let text = format!(
        "## {metric} against {score}\n\nOver the {} configurations evaluated at {} rounds, Spearman's rho between their ranks by {metric} and by {score} (1 = best for both) is {rho_text}.\n\n![rank vs rank](report/rank-vs-rank.svg)\n\n",
        both.len(),
        top.unwrap_or(0)
    );
    (text, svg)
}

/// Every evaluation: its configuration, metrics, seconds and error.
fn evaluations_table(o: &SearchOutcome, space: &Space) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "## Evaluations\n")?;
    let keys: Vec<&String> = space.params.iter().map(|p| &p.key).collect();
    let mut extra: Vec<String> = o
        .evaluations
        .iter()
        .flat_map(|e| e.metrics.keys().cloned())
        .collect();
    extra.sort();
    extra.dedup();
    let head: Vec<String> = ["eval", "trial", "rounds"]
        .iter()
        .map(|s| s.to_string())
        .chain(keys.iter().map(|k| format!("`{k}`")))
        .chain(extra.iter().cloned())
        .chain(["s".to_string(), "error".to_string()])
        .collect();
    writeln!(md, "| {} |", head.join(" | "))?;
    writeln!(md, "|{}", "---|".repeat(head.len()))?;
    for e in &o.evaluations {
        let mut cells = vec![
            e.eval.to_string(),
            e.trial.to_string(),
            e.rounds.to_string(),
        ];
        cells.extend(
            keys.iter()
                .map(|k| e.config.get(*k).map_or("-".into(), short)),
        );
        cells.extend(
            extra
                .iter()
                .map(|m| e.metrics.get(m).map_or("-".into(), |v| format!("{v:.4}"))),
        );
        cells.push(format!("{:.1}", e.wall_s));
        cells.push(e.error.clone().unwrap_or_default().replace('|', "/"));
        writeln!(md, "| {} |", cells.join(" | "))?;
    }
    Ok(md)
}
