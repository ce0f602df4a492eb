//! `fedtune bench generate`: generation throughput on the default model with
//! GSM8K's 8-shot prefix, by batch size, and what reusing the prefix's KV
//! cache saves over encoding the whole prompt per item.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use fedtune_adapters::eval::batch::{generate_aligned, SharedPrefix};
use fedtune_adapters::eval::tasks::{self, Items, Task};
use fedtune_adapters::generate::GenerationConfig;

use fedtune_adapters::course::Loaded;

pub fn generate(batches: &[usize], tokens: usize, data_root: &Path) -> Result<()> {
    let loaded = Loaded::load(None, None, &|m| eprintln!("{m}"))?;
    let m = loaded.view();
    let items = tasks::load(&Task::Gsm8k, data_root, Some(1))?;
    let Items::Gen {
        prefixes, items, ..
    } = items
    else {
        anyhow::bail!("gsm8k is a generation task")
    };
    let item = &items[0];

    let t = Instant::now();
    let prefix = SharedPrefix::new(m.model, m.tok, &prefixes[0], m.adapter)?;
    let prefill_prefix = t.elapsed().as_secs_f64();
    let own = prefix
        .continuation(m.tok, &item.text)?
        .context("the first GSM8K question does not tokenize apart from the prefix")?;
    let empty = SharedPrefix::new(m.model, m.tok, "", m.adapter)?;
    let whole = m
        .tok
        .encode(&format!("{}{}", prefixes[0], item.text))
        .map_err(anyhow::Error::msg)?;

    // Greedy, no stop sequences: every sequence runs `tokens` steps.
    let cfg = GenerationConfig {
        max_new_tokens: tokens,
        ..GenerationConfig::default()
    };
    let one_token = GenerationConfig {
        max_new_tokens: 1,
        ..cfg.clone()
    };
    // Seconds and tokens produced (a sequence may end early at its eos token).
    let time = |p: &SharedPrefix, ids: &[u32], b: usize, c: &GenerationConfig| {
        let rows: Vec<&[u32]> = vec![ids; b];
        let seeds: Vec<u64> = (0..b as u64).collect();
        let t = Instant::now();
        let out = generate_aligned(m.model, m.tok, p, &rows, &seeds, c, m.adapter)?;
        let produced: usize = out.iter().map(|g| g.ids.len()).sum();
        anyhow::Ok((t.elapsed().as_secs_f64(), produced))
    };
    let (whole_prompt, _) = time(&empty, &whole, 1, &one_token)?;
    let (reused, _) = time(&prefix, &own, 1, &one_token)?;
    println!(
        "GSM8K 8-shot prefix: {} tokens, encoded once in {:.2} s; the first question adds {} tokens\n",
        prefix.len(),
        prefill_prefix,
        own.len()
    );
    println!(
        "first token of one item: whole prompt {:.3} s, prefix cache reused {:.3} s ({:.1}x)\n",
        whole_prompt,
        reused,
        whole_prompt / reused
    );
    println!("greedy decoding of {tokens} tokens per sequence after the prefix and question\n");
    println!("| batch | seconds | tokens/s | per step (ms) |");
    println!("|---:|---:|---:|---:|");
    for &b in batches {
        let (prompt, _) = time(&prefix, &own, b, &one_token)?;
        let (secs, produced) = time(&prefix, &own, b, &cfg)?;
        let steps = (produced / b).saturating_sub(1).max(1);
        println!(
            "| {b} | {secs:.2} | {:.1} | {:.1} |",
            produced as f64 / secs,
            (secs - prompt).max(0.0) / steps as f64 * 1e3
        );
    }
    Ok(())
}
