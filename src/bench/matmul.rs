//! `fedtune bench matmul`: candle's CPU matmul throughput per dtype at the
//! model's shapes, beside the frozen products the training step uses: f32
//! (on the SIMD path `FEDTUNE_SIMD` may narrow), a bf16 weight and an int8
//! weight (`[model] compute`), forward and input gradient.
//!
//! Decides whether a frozen base stored in bf16 or f16 could train faster
//! than f32 here: a LoRA step is matmul-bound, so the dtype with the faster
//! `x · Wᵀ` at SmolLM2's projection shapes is the better storage.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use fedtune_adapters::kernels::{frozen_linear, Frozen};
use fedtune_adapters::model::Compute;

pub fn matmul(tokens: usize, reps: usize) -> Result<()> {
    let device = Device::Cpu;
    // (in, out) of SmolLM2-135M's projections and its output head.
    let shapes = [
        (576, 576),
        (576, 192),
        (576, 1536),
        (1536, 576),
        (576, 49_152),
    ];
    println!(
        "x (tokens {tokens} x in) · Wᵀ (out x in), best of {reps}; GFLOP/s (paths: {}, {}, {})\n",
        Compute::F32.path(),
        Compute::Bf16.path(),
        Compute::Int8.path()
    );
    println!("| in × out | fused f32 | fused bf16 weight | bf16 input grad | fused int8 weight | int8 input grad | candle f32 | candle bf16 | candle f16 |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (din, dout) in shapes {
        let x = Tensor::rand(-1f32, 1f32, (tokens, din), &device)?;
        let w = Tensor::rand(-1f32, 1f32, (dout, din), &device)?;
        let gflop = 2.0 * (tokens * din * dout) as f64 / 1e9;
        let best_of = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let t = Instant::now();
                drop(f()?);
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok(best)
        };
        let fused = best_of(&|| Ok(frozen_linear(&x, &w)?))?;
        let mut row = format!("| {din} × {dout} | {:.0} |", gflop / fused);
        // The input gradient g · W of the same projection: the backward of
        // sum(y ⊙ g), timed alone (its elementwise part is m·n of m·n·k).
        let g = Tensor::rand(-1f32, 1f32, (tokens, dout), &device)?;
        let xv = candle_core::Var::from_tensor(&x)?;
        for stored in [
            Frozen::from(w.to_dtype(DType::BF16)?),
            Frozen::Dense(w.clone()).to_storage(DType::U8)?,
        ] {
            let forward = best_of(&|| Ok(frozen_linear(&x, &stored)?))?;
            let mut grad = f64::INFINITY;
            for _ in 0..reps {
                let y = frozen_linear(xv.as_tensor(), &stored)?;
                let loss = (y * &g)?.sum_all()?;
                let t = Instant::now();
                drop(loss.backward()?);
                grad = grad.min(t.elapsed().as_secs_f64());
            }
            row.push_str(&format!(" {:.0} | {:.0} |", gflop / forward, gflop / grad));
        }
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (x, w) = (x.to_dtype(dtype)?, w.to_dtype(dtype)?);
            let best = best_of(&|| Ok(x.matmul(&w.t()?)?))?;
            row.push_str(&format!(" {:.0} |", gflop / best));
        }
        println!("{row}");
    }
    Ok(())
}
