//! `fedtune bench train-step`: one LoRA training step on the default model, timed.
//!
//! Settings follow the reference measurement in DESIGN.md: SmolLM2-135M in
//! f32, LoRA r 8 / alpha 16 on q_proj and v_proj, AdamW, batch 4 × 128 tokens.
//! FLOPs are counted as 4 × parameters × tokens (a forward pass, plus the
//! backward pass to the inputs; frozen weights need no weight gradients):
//! the matmul term of [`fedtune_adapters::flops`], attention left out.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use fedtune_adapters::adapter::Adapter;
use fedtune_adapters::fetch::ensure_default_model;
use fedtune_adapters::lora::{Lora, LoraConfig};
use fedtune_adapters::model::{load_gguf, Placement};
use fedtune_adapters::train::{Batch, NoHooks, Stepper, TrainConfig};
use fedtune_kernel::metrics::peak_rss_mib;
use serde::Serialize;

#[derive(Debug, Serialize)]
struct TrainStepReport {
    batch: usize,
    seq_len: usize,
    steps: usize,
    model_parameters: usize,
    lora_parameters: usize,
    seconds_per_step: f64,
    median_s: f64,
    min_s: f64,
    gflop_per_step: f64,
    gflop_per_s: f64,
    forward_s: f64,
    backward_s: f64,
    optimizer_s: f64,
    peak_rss_mib: Option<f64>,
    /// Heap bytes the program held before the first step (model, adapter,
    /// batch), in MiB (host memory only).
    held_before_steps_mib: f64,
    /// The most heap bytes it held at once during the steps; the rest of
    /// the peak RSS is memory freed but kept by the allocators for reuse.
    peak_held_mib: f64,
    threads: usize,
    /// The SIMD path the matrix products ran on (`avx512`, `avx2`, `scalar`).
    simd: &'static str,
    /// The frozen base's product path (`f32-avx512`, `bf16-avx512`, …).
    compute: String,
}

pub fn train_step(
    (batch, seq_len, steps): (usize, usize, usize),
    placement: Placement,
    json: bool,
) -> Result<()> {
    ensure!(
        batch > 0 && seq_len > 1 && steps > 0,
        "--batch, --seq-len (> 1) and --steps must be positive"
    );
    let device = placement.device.open()?;
    let model = &default_model_f32()?
        .model
        .into_compute(placement.dtype())?
        .to_device(&device)?;
    let cfg = model.config();
    ensure!(
        seq_len <= cfg.max_position_embeddings,
        "--seq-len exceeds the model's context"
    );
    let lora = Lora::new(
        cfg,
        LoraConfig {
            lora_dropout: 0.0,
            ..LoraConfig::default()
        },
        1,
        DType::F32,
        &device,
    )?;
    let b = seeded_batch(cfg.vocab_size, batch, seq_len, &device)?;
    let mut stepper = Stepper::new(&lora, TrainConfig::default())?;
    // What the steps add to the model: the heap's peak from here on.
    let held_before = crate::GLOBAL.live_bytes();
    crate::GLOBAL.reset_peak();
    // One untimed step warms allocators and caches.
    stepper.step(
        model,
        &lora,
        std::slice::from_ref(&b),
        (0, steps + 1),
        &mut NoHooks,
    )?;
    let mut times = Vec::with_capacity(steps);
    for s in 0..steps {
        let started = Instant::now();
        stepper.step(
            model,
            &lora,
            std::slice::from_ref(&b),
            (s + 1, steps + 1),
            &mut NoHooks,
        )?;
        // A GPU queues work: the step is done when the device says so.
        device.synchronize()?;
        times.push(started.elapsed().as_secs_f64());
    }
    let per_step = times.iter().sum::<f64>() / steps as f64;
    times.sort_by(f64::total_cmp);
    let median_s = times[steps / 2];
    let min_s = times[0];

    // Where the time goes: the same work split into forward and backward,
    // best of two (the optimizer and clipping are the rest of the median step).
    let (mut forward_s, mut backward_s) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..2 {
        let t = Instant::now();
        let loss =
            model.causal_lm_loss(&b.tokens, Some(&b.attention_mask), &b.labels, Some(&lora))?;
        let _ = loss.to_scalar::<f32>()?;
        forward_s = forward_s.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let grads = loss.backward()?;
        device.synchronize()?;
        backward_s = backward_s.min(t.elapsed().as_secs_f64());
        drop(grads);
    }
    let optimizer_s = (min_s - forward_s - backward_s).max(0.0);

    let params = fedtune_adapters::flops::matmul_params(model.config()) as usize;
    let gflop =
        fedtune_adapters::flops::training_step(model.config(), 0, batch, seq_len).matmul / 1e9;
    let report = TrainStepReport {
        batch,
        seq_len,
        steps,
        model_parameters: params,
        lora_parameters: lora.num_parameters(),
        seconds_per_step: per_step,
        median_s,
        min_s,
        gflop_per_step: gflop,
        gflop_per_s: gflop / median_s,
        forward_s,
        backward_s,
        optimizer_s,
        peak_rss_mib: peak_rss_mib(),
        held_before_steps_mib: mib(held_before),
        peak_held_mib: mib(crate::GLOBAL.peak_bytes()),
        threads: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        simd: fedtune_adapters::simd::simd_path().name(),
        compute: placement.path(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print();
    }
    Ok(())
}

impl TrainStepReport {
    fn print(&self) {
        let r = self;
        println!(
            "LoRA step (r 8, q/v, AdamW, {}), batch {} x {}, {} threads, {} steps:\n\
             {:.3} s/step mean (median {:.3}, best {:.3}), {:.1} GFLOP/step, {:.1} GFLOP/s at the median\n\
             forward + loss {:.3} s, backward {:.3} s, rest of the best step (optimizer, clipping) ~{:.3} s\n\
             model {} parameters, LoRA {} parameters, peak RSS {} (heap held: {:.0} MiB before the steps, {:.0} MiB at most)",
            r.compute,
            r.batch,
            r.seq_len,
            r.threads,
            r.steps,
            r.seconds_per_step,
            r.median_s,
            r.min_s,
            r.gflop_per_step,
            r.gflop_per_s,
            r.forward_s,
            r.backward_s,
            r.optimizer_s,
            r.model_parameters,
            r.lora_parameters,
            r.peak_rss_mib.map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "unknown".into()),
            r.held_before_steps_mib,
            r.peak_held_mib,
        );
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// A `batch × seq_len` batch of seeded token ids spread over the vocabulary;
/// every position counts in the loss.
pub(crate) fn seeded_batch(
    vocab_size: usize,
    batch: usize,
    seq_len: usize,
    device: &Device,
) -> Result<Batch> {
    let ids: Vec<u32> = (0..(batch * seq_len) as u64)
        .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % vocab_size as u64) as u32)
        .collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    Ok(Batch {
        tokens: Tensor::from_vec(ids, (batch, seq_len), device)?,
        attention_mask: Tensor::ones((batch, seq_len), DType::U32, device)?,
        labels: Tensor::from_vec(labels, (batch, seq_len), device)?,
    })
}

/// The default model (fetched on first use), loaded in f32 on the CPU.
pub(crate) fn default_model_f32() -> Result<fedtune_adapters::model::GgufModel> {
    let path = ensure_default_model(|line| eprintln!("{line}"))?;
    load_gguf(&path, DType::F32, &Device::Cpu).context("loading the default model")
}
