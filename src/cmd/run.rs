//! `fedtune run`: a whole course — in this process on the in-process bus, or
//! with `[broker] transport = "nats"` as a server process and one process
//! per client over NATS.

use anyhow::{Context, Result};
use fedtune_adapters::course::numeric::run_least_squares;
use fedtune_adapters::course::summary::{PrivacySummary, Summary};
use fedtune_adapters::course::{run_llm, CourseFile, Task};
use fedtune_kernel::config::TransportKind;
use fedtune_kernel::course::CourseReport;
use fedtune_kernel::Event;

use super::course_args::{run_output, RunArgs};
use crate::display::Display;

/// `fedtune run`.
pub fn run(args: RunArgs) -> Result<()> {
    let course = CourseFile::load(&args.config, &args.overrides())?;
    if args.dry_run {
        print!("{}", course.resolved()?);
        return Ok(());
    }
    // A device that cannot be used stops the run before its directory exists.
    if let Ok(llm) = course.llm() {
        llm.model.device.open()?;
    }
    let out = run_output(
        &course,
        args.out.as_deref(),
        (args.resume, args.overwrite),
        args.data_root.as_deref(),
    )?;
    let _lock = out.prepare(&course)?;
    let _live = match &args.serve {
        Some(addr) => {
            let view = crate::live::LiveView::start(vec![out.dir.clone()], addr)?;
            eprintln!("live view: {}", view.url());
            Some(view)
        }
        None => None,
    };
    if course.broker.transport == TransportKind::Nats {
        return super::spawn::run_processes(&course, &args, &out.dir);
    }
    match &course.task {
        Task::Llm(_) => {
            let log = out.dir.join("run.log");
            crate::runlog::log_to_file(&log)
                .with_context(|| format!("cannot write {}", log.display()))?;
            tracing::info!(config = %course.doc.origin(), out = %out.dir.display(), "LoRA course starts");
            let display = Display::new(args.quiet || args.json).timed().shared();
            let summary = run_llm(&course, &out, display)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print_summary(&summary, &out.dir);
            }
        }
        Task::LeastSquares(ls) => {
            let (report, summary) = run_least_squares(&course, ls, &out)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
                return Ok(());
            }
            print_table(&report);
            let cfg = &course.cfg;
            println!(
                "\n{} rounds, {} clients ({} per round): {:.1} KB up, {:.1} KB down, {:.3} s wall",
                cfg.course.rounds,
                cfg.course.clients,
                cfg.clients_per_round(),
                summary.bytes_up as f64 / 1e3,
                summary.bytes_down as f64 / 1e3,
                report.wall_s
            );
            if let Some(c) = summary.centralized_train_loss {
                println!("centralized least-squares training loss (the optimum): {c:.6}");
            }
            print_privacy(summary.privacy.as_ref());
            println!("results in {}", out.dir.display());
        }
    }
    Ok(())
}

/// The numeric course's loss per split and traffic, one line per round.
fn print_table(report: &CourseReport) {
    let splits: std::collections::BTreeSet<&str> =
        report.evals.iter().map(|e| e.split.as_str()).collect();
    print!("{:>5}", "round");
    for s in &splits {
        print!("  {:>12}", format!("{s} loss"));
    }
    println!("  {:>10}  {:>10}", "KB up", "KB down");
    let mut rounds: Vec<u64> = report.evals.iter().map(|e| e.round).collect();
    rounds.dedup();
    for round in rounds {
        print!("{round:>5}");
        for s in &splits {
            match report
                .evals
                .iter()
                .find(|e| e.round == round && e.split == *s)
            {
                Some(e) => print!("  {:>12.6}", e.loss),
                None => print!("  {:>12}", "-"),
            }
        }
        let rec = report
            .records
            .iter()
            .find(|r| r.event == Event::Round && r.round == round);
        match rec {
            Some(r) => println!(
                "  {:>10.1}  {:>10.1}",
                r.bytes_up as f64 / 1e3,
                r.bytes_down as f64 / 1e3
            ),
            None => println!("  {:>10}  {:>10}", "-", "-"),
        }
    }
}

/// The LLM course's table: each client's test loss before and after.
fn print_summary(s: &Summary, dir: &std::path::Path) {
    let row = |id: &str, name: &str, train: String, test: String, before: String, after: String| {
        println!("{id:>4}  {name:<24} {train:>8} {test:>8}  {before:>12} {after:>12}");
    };
    println!();
    let text = |v: &str| v.to_string();
    row(
        "id",
        "client",
        text("train"),
        text("test"),
        text("loss before"),
        text("loss after"),
    );
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    for c in &s.per_client {
        row(
            &c.id.to_string(),
            &c.name,
            c.train_examples.to_string(),
            c.test_examples.to_string(),
            fmt(c.test_loss_before),
            fmt(c.test_loss_after),
        );
    }
    row(
        "",
        "all (weighted)",
        s.per_client
            .iter()
            .map(|c| c.train_examples)
            .sum::<usize>()
            .to_string(),
        s.per_client
            .iter()
            .map(|c| c.test_examples)
            .sum::<usize>()
            .to_string(),
        fmt(s.test_loss_before),
        fmt(s.test_loss_after),
    );
    row(
        "",
        "mean over clients",
        String::new(),
        String::new(),
        String::new(),
        fmt(s.mean_client_test_loss_after),
    );
    println!(
        "\nmode {:?}, {} rounds × {}: {:.1} KB up, {:.1} KB down, {:.2} TFLOP of training, {:.0} s wall, peak RSS {}",
        s.mode,
        s.rounds,
        match s.local_epochs {
            0 => format!("{} local steps", s.local_steps),
            e => format!("{e} local epochs"),
        },
        s.bytes_up as f64 / 1e3,
        s.bytes_down as f64 / 1e3,
        s.train_flops / 1e12,
        s.wall_s,
        s.peak_rss_mib.map_or("unknown".into(), |m| format!("{m:.0} MiB"))
    );
    print_privacy(s.privacy.as_ref());
    if let Some(b) = &s.best {
        let stop = b.stopped_early_after.map_or(String::new(), |r| {
            format!("; stopped early after round {r}")
        });
        println!(
            "best {} {:.4} after round {}: {}{stop}",
            b.key, b.loss, b.round, b.params
        );
    }
    println!(
        "adapter (PEFT format) in {}\nresults in {}",
        s.adapter,
        dir.display()
    );
}

/// The privacy a course spent, when it had DP or secure aggregation.
fn print_privacy(p: Option<&PrivacySummary>) {
    if let Some(sa) = p.and_then(|p| p.secure_aggregation.as_ref()) {
        println!(
            "secure aggregation: the server saw only sums ({:.1} KB of key exchange and shares, {:.2} s unmasking, {} client dropouts recovered)",
            sa.overhead_bytes as f64 / 1e3,
            sa.unmask_s,
            sa.left
        );
    }
    if let Some(p) = p.filter(|p| p.dp != "none") {
        println!(
            "differential privacy ({}): ε = {} at δ = {} (noise multiplier {}, clip norm {:.4})",
            p.dp,
            p.epsilon.map_or("unknown".into(), |e| format!("{e:.3}")),
            p.delta,
            p.noise_multiplier,
            p.clip_norm
        );
    }
}
