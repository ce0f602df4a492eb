//! `fedtune bench peft`: what each PEFT method costs on the default model,
//! as FS-LLM's Table 4 lists it — trainable parameters, bytes one client
//! sends per round (f32, and int8 + DEFLATE), seconds per training step
//! (batch × sequence length tokens, AdamW) and peak memory.
//!
//! Each method is measured in a child process of its own, so that its peak
//! resident memory is its own.

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Device;
use fedtune_adapters::adapter::AdapterSpec;
use fedtune_adapters::lora::LoraConfig;
use fedtune_adapters::offsite::{build_emulator, OffsiteConfig, Tune};
use fedtune_adapters::prompt::{PromptConfig, PromptMethod};
use fedtune_adapters::train::{NoHooks, Stepper, TrainConfig};
use fedtune_kernel::{encode, Compression, EncodeOptions, Envelope, MsgKind, Party, Quantization};
use serde::{Deserialize, Serialize};

use super::train::{default_model_f32, seeded_batch};
use fedtune_kernel::metrics::peak_rss_mib;

/// One method's row.
#[derive(Debug, Serialize, Deserialize)]
struct Row {
    method: String,
    trainable_params: usize,
    bytes_f32: usize,
    bytes_int8_deflate: usize,
    median_step_s: f64,
    peak_rss_mib: Option<f64>,
    /// Resident memory after the steps (for FedOT: with the full model's
    /// dropped layers freed, what a client holds).
    rss_after_mib: Option<f64>,
}

/// The adapter a method name stands for, with FS-LLM-like settings.
fn spec(method: &str) -> Result<AdapterSpec> {
    let prompt = |method| AdapterSpec::Prompt {
        method,
        config: PromptConfig::default(),
        init_ids: None,
    };
    Ok(match method {
        "lora" => AdapterSpec::Lora(LoraConfig {
            lora_dropout: 0.0,
            ..LoraConfig::default()
        }),
        "prompt" => prompt(PromptMethod::Prompt),
        "p-tuning" => prompt(PromptMethod::PTuning),
        "prefix" => prompt(PromptMethod::Prefix),
        m if m.starts_with("fedot-") => AdapterSpec::Lora(LoraConfig {
            lora_dropout: 0.0,
            ..LoraConfig::default()
        }),
        other => bail!(
            "unknown method `{other}` (lora, prompt, p-tuning, prefix, fedot-RATIO such as \
             fedot-0.5, fedot-full-RATIO for the adapter layers trained in full)"
        ),
    })
}

/// Measures `method` in this process.
fn measure(method: &str, steps: usize, batch: usize, seq_len: usize) -> Result<Row> {
    let loaded = default_model_f32()?;
    // FedOT: LoRA in the emulator's 2 + 2 adapter layers (or those layers
    // trained in full), the middle dropped uniformly.
    let (model, spec) = match method.strip_prefix("fedot-") {
        Some(rest) => {
            let (tune, ratio) = match rest.strip_prefix("full-") {
                Some(ratio) => (Tune::Full, ratio),
                None => (Tune::Lora, rest),
            };
            let cfg = OffsiteConfig {
                enabled: true,
                drop_ratio: ratio
                    .parse()
                    .with_context(|| format!("`{method}`: the drop ratio is not a number"))?,
                tune,
                ..OffsiteConfig::default()
            };
            let emu = build_emulator(&loaded.model, &cfg)?;
            let AdapterSpec::Lora(lora) = spec(method)? else {
                unreachable!("FedOT's LoRA settings")
            };
            let spec = cfg.emulator_spec(&lora, emu.kept.len());
            (emu.model, spec)
        }
        None => (loaded.model, spec(method)?),
    };
    let model = &model;
    let adapter = spec.build(model, 1)?;
    let b = seeded_batch(model.config().vocab_size, batch, seq_len, &Device::Cpu)?;
    let mut stepper = Stepper::new(adapter.as_ref(), TrainConfig::default())?;
    let mut times = Vec::new();
    for s in 0..=steps {
        let started = Instant::now();
        stepper.step(
            model,
            adapter.as_ref(),
            std::slice::from_ref(&b),
            (s, steps + 1),
            &mut NoHooks,
        )?;
        // The first step warms allocators and caches.
        if s > 0 {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    // Sizes after training: a fresh LoRA's B factors are all zero and would
    // compress unrealistically well.
    let params = adapter.to_param_set()?;
    let bytes = |quantization, compression| -> Result<usize> {
        let env = Envelope::new(
            "bench",
            1,
            Party::Client(1),
            vec![Party::Server],
            MsgKind::Update,
        )
        .with_payload(params.clone());
        let opts = EncodeOptions {
            quantization,
            compression,
            level: 1,
        };
        Ok(encode(&env, opts)?.len())
    };
    Ok(Row {
        method: method.to_string(),
        trainable_params: adapter.num_parameters(),
        bytes_f32: bytes(Quantization::None, Compression::None)?,
        bytes_int8_deflate: bytes(Quantization::Int8, Compression::Deflate)?,
        median_step_s: times[times.len() / 2],
        peak_rss_mib: peak_rss_mib(),
        rss_after_mib: rss_mib(),
    })
}

/// Resident memory of this process now (Linux `VmRSS`).
fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `fedtune bench peft`.
pub fn peft(
    methods: &[String],
    (steps, batch, seq_len): (usize, usize, usize),
    one: Option<&str>,
    json: bool,
) -> Result<()> {
    ensure!(
        steps > 0 && batch > 0 && seq_len > 1,
        "--steps, --batch and --seq-len must be positive"
    );
    if let Some(method) = one {
        println!(
            "{}",
            serde_json::to_string(&measure(method, steps, batch, seq_len)?)?
        );
        return Ok(());
    }
    let exe = std::env::current_exe().context("cannot find this program")?;
    let mut rows = Vec::new();
    for method in methods {
        spec(method)?;
        eprintln!("measuring {method} ({steps} steps of {batch} x {seq_len} tokens)");
        let out = std::process::Command::new(&exe)
            .args(["bench", "peft", "--one", method])
            .args(["--steps", &steps.to_string(), "--batch", &batch.to_string()])
            .args(["--seq-len", &seq_len.to_string()])
            .output()?;
        ensure!(
            out.status.success(),
            "measuring {method} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let row: Row = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("the {method} measurement printed no row"))?;
        rows.push(row);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "| method | trainable parameters | bytes per client per round, f32 | int8 + DEFLATE | s per step (median, batch {batch} x {seq_len}) | peak RSS MiB | RSS after MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.3} | {} | {} |",
            r.method,
            r.trainable_params,
            r.bytes_f32,
            r.bytes_int8_deflate,
            r.median_step_s,
            r.peak_rss_mib.map_or("-".into(), |m| format!("{m:.0}")),
            r.rss_after_mib.map_or("-".into(), |m| format!("{m:.0}"))
        );
    }
    Ok(())
}
