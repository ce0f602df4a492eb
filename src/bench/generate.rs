//! `fedtune bench generate`: generation throughput on the default model with
//! GSM8K's 8-shot prefix, by batch size, and what reusing the prefix's KV
//! cache saves over encoding the whole prompt per item; with `--prompt-len N
//! --no-prefix`, prefill plus decoding of random prompts, timed as
//! `../shared/tools/torch_baseline.py generate` times Hugging Face's
//! `generate`.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use fedtune_adapters::eval::batch::{generate_aligned, SharedPrefix};
use fedtune_adapters::eval::tasks::{self, Items, Task};
use fedtune_adapters::generate::GenerationConfig;

use fedtune_adapters::course::Loaded;
use fedtune_adapters::model::Placement;

pub fn generate(batches: &[usize], tokens: usize, data_root: &Path) -> Result<()> {
    let loaded = Loaded::load(None, None, Placement::default(), &|m| eprintln!("{m}"))?;
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
    println!(
        "greedy decoding of {tokens} tokens per sequence after the prefix and question (f32, {} path)\n",
        fedtune_adapters::simd::simd_path().name()
    );
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

/// Prefill of `prompt_len` random tokens plus greedy decoding of `tokens`
/// more (the end-of-sequence token never picked), per batch size: the work
/// `torch_baseline.py generate --prompt-len N --new T` times, after the
/// same short warm-up.
pub fn random_prompts(
    batches: &[usize],
    (prompt_len, tokens): (usize, usize),
    placement: Placement,
    json: bool,
) -> Result<()> {
    use rand::{Rng, SeedableRng};
    anyhow::ensure!(
        prompt_len > 0 && tokens > 0,
        "--prompt-len and --tokens must be positive"
    );
    let loaded = Loaded::load(None, None, placement, &|m| eprintln!("{m}"))?;
    let m = loaded.view();
    let vocab = m.model.config().vocab_size as u32;
    let empty = SharedPrefix::new(m.model, m.tok, "", m.adapter)?;
    let cfg = GenerationConfig {
        max_new_tokens: tokens,
        ignore_eos: true,
        ..GenerationConfig::default()
    };
    let path = placement.path();
    if !json {
        println!(
            "prefill of {prompt_len} random tokens + greedy decoding of {tokens} ({path} path)\n"
        );
        println!("| batch | seconds | new tokens/s |");
        println!("|---:|---:|---:|");
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for &b in batches {
        let rows: Vec<Vec<u32>> = (0..b)
            .map(|_| {
                (0..prompt_len)
                    .map(|_| rng.random_range(0..vocab))
                    .collect()
            })
            .collect();
        let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let seeds: Vec<u64> = (0..b as u64).collect();
        // Warm-up as the baseline does: 8 prompt tokens, 4 new.
        let short: Vec<&[u32]> = rows.iter().map(|r| &r[..r.len().min(8)]).collect();
        let warm = GenerationConfig {
            max_new_tokens: 4,
            ..cfg.clone()
        };
        generate_aligned(m.model, m.tok, &empty, &short, &seeds, &warm, m.adapter)?;
        let t = Instant::now();
        let out = generate_aligned(m.model, m.tok, &empty, &refs, &seeds, &cfg, m.adapter)?;
        let secs = t.elapsed().as_secs_f64();
        let new: usize = out.iter().map(|g| g.ids.len()).sum();
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "stack": "fedtune", "mode": "generate", "simd": path, "batch": b,
                    "prompt_len": prompt_len, "new_tokens": new,
                    "seconds": (secs * 1000.0).round() / 1000.0,
                    "tokens_per_s": (new as f64 / secs * 10.0).round() / 10.0,
                })
            );
        } else {
            println!("| {b} | {secs:.2} | {:.1} |", new as f64 / secs);
        }
    }
    Ok(())
}
