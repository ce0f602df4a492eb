//! `fedtune bench matmul`: candle's CPU matmul throughput per dtype at the model's shapes.
//!
//! Decides whether a frozen base stored in bf16 or f16 could train faster
//! than f32 here: a LoRA step is matmul-bound, so the dtype with the faster
//! `x · Wᵀ` at SmolLM2's projection shapes is the better storage.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

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
    println!("x (tokens {tokens} x in) · Wᵀ (out x in), best of {reps}; GFLOP/s\n");
    println!("| in × out | f32 | bf16 | f16 |");
    println!("|---|---:|---:|---:|");
    for (din, dout) in shapes {
        let x = Tensor::rand(-1f32, 1f32, (tokens, din), &device)?;
        let w = Tensor::rand(-1f32, 1f32, (dout, din), &device)?;
        let mut row = format!("| {din} × {dout} |");
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (x, w) = (x.to_dtype(dtype)?, w.to_dtype(dtype)?);
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let t = Instant::now();
                let y = x.matmul(&w.t()?)?;
                drop(y);
                best = best.min(t.elapsed().as_secs_f64());
            }
            let gflop = 2.0 * (tokens * din * dout) as f64 / 1e9;
            row.push_str(&format!(" {:.0} |", gflop / best));
        }
        println!("{row}");
    }
    Ok(())
}
