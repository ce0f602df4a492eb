//! `fedtune bench sandbox`: what the strict sandbox costs per HumanEval
//! sample against the basic one, on the canonical solutions (every one
//! must pass in both), the two modes alternating pass by pass so that the
//! machine's drift hits both alike.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use fedtune_adapters::eval::sandbox::{check, run_python, Limits, Mode};
use fedtune_adapters::eval::tasks::{humaneval_program, load, Items, Task};

pub fn sandbox(data_root: &Path, limit: Option<usize>, passes: usize) -> Result<()> {
    let Items::Gen { items, .. } = load(&Task::HumanEval, data_root, limit)? else {
        bail!("humaneval is a generation task");
    };
    for mode in [Mode::Strict, Mode::Basic] {
        println!("{}", check(mode)?);
    }
    let modes = [Mode::Basic, Mode::Strict];
    let mut per_sample: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for pass in 0..passes.max(1) {
        for (m, mode) in modes.iter().enumerate() {
            let limits = Limits {
                timeout: Duration::from_secs(10),
                mode: *mode,
                ..Limits::default()
            };
            let started = Instant::now();
            for item in &items {
                let program = humaneval_program(item, &item.extra["canonical_solution"]);
                let outcome = run_python(&program, &limits)?;
                if !outcome.passed() {
                    bail!("{} failed in {} mode: {outcome:?}", item.id, mode.name());
                }
            }
            let ms = started.elapsed().as_secs_f64() * 1e3 / items.len() as f64;
            eprintln!("pass {pass}: {} {ms:.1} ms/sample", mode.name());
            per_sample[m].push(ms);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let basic = median(&mut per_sample[0]);
    let strict = median(&mut per_sample[1]);
    println!(
        "\n{} HumanEval canonical solutions, median of {} alternating passes, one at a time\n",
        items.len(),
        passes.max(1)
    );
    println!("| sandbox | ms per sample |\n|---|---:|");
    println!("| basic (rlimits only) | {basic:.1} |");
    println!("| strict (namespaces, minimal root, Landlock, seccomp) | {strict:.1} |");
    println!("| strict − basic | {:+.1} |", strict - basic);
    Ok(())
}
