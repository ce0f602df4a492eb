//! `fedtune bench codec`: what each wire encoding costs in bytes and time.
//!
//! The benchmark ParamSet is shaped like a LoRA adapter (rank-8 A and B
//! matrices of a 576-wide model, as SmolLM2-135M's q/v projections) filled with
//! seeded uniform noise of LoRA-like magnitude, so the sizes are what a real
//! update costs — random mantissas leave DEFLATE little to find.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use fedtune_kernel::{
    decode, encode, Compression, DecodeLimits, EncodeOptions, Envelope, MsgKind, ParamSet, Party,
    Quantization,
};
use serde::Serialize;

#[derive(Debug, Serialize)]
struct CodecRow {
    quantization: Quantization,
    compression: Compression,
    bytes: usize,
    ratio_to_f32: f64,
    encode_mb_s: f64,
    decode_mb_s: f64,
    roundtrip_mb_s: f64,
    max_abs_error: f32,
}

/// A LoRA-shaped set of about `n` parameters with seeded values.
pub(crate) fn lora_like(n: usize) -> Result<ParamSet> {
    const HIDDEN: usize = 576;
    const RANK: usize = 8;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        // xorshift64*: reproducible, dependency-free noise.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        ((state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut params = ParamSet::new();
    let mut left = n;
    let mut layer = 0;
    while left > 0 {
        for (part, shape) in [("lora_A", [RANK, HIDDEN]), ("lora_B", [HIDDEN, RANK])] {
            let len = (shape[0] * shape[1]).min(left);
            if len == 0 {
                break;
            }
            let shape = if len == shape[0] * shape[1] {
                shape.to_vec()
            } else {
                vec![len]
            };
            let scale = if part == "lora_A" { 0.04 } else { 0.005 };
            let data = (0..len).map(|_| scale * next()).collect();
            let name =
                format!("base_model.model.model.layers.{layer}.self_attn.q_proj.{part}.weight");
            params.insert(name, shape, data)?;
            left -= len;
        }
        layer += 1;
    }
    Ok(params)
}

pub fn codec(n: usize, reps: usize, json: bool, out: Option<&Path>) -> Result<()> {
    ensure!(n > 0 && reps > 0, "--params and --reps must be positive");
    let params = lora_like(n)?;
    let raw_mb = (params.num_elements() * 4) as f64 / 1e6;
    let env = Envelope::new(
        "bench",
        1,
        Party::Client(1),
        vec![Party::Server],
        MsgKind::Update,
    )
    .with_meta("n_samples", 1000u64)
    .with_payload(params.clone());
    let limits = DecodeLimits::default();
    let mut rows = Vec::new();
    for quantization in [
        Quantization::None,
        Quantization::F16,
        Quantization::Bf16,
        Quantization::Int8,
    ] {
        for compression in [Compression::None, Compression::Deflate, Compression::Gzip] {
            let opts = EncodeOptions::new(quantization, compression);
            let (mut best_enc, mut best_dec) = (f64::INFINITY, f64::INFINITY);
            let mut frame = bytes::Bytes::new();
            let mut decoded = None;
            for _ in 0..reps {
                let t = Instant::now();
                frame = encode(&env, opts)?;
                best_enc = best_enc.min(t.elapsed().as_secs_f64());
                let t = Instant::now();
                decoded = Some(decode(&frame, &limits)?);
                best_dec = best_dec.min(t.elapsed().as_secs_f64());
            }
            let back = decoded.and_then(|e| e.payload).context("payload lost")?;
            let max_abs_error = params
                .iter()
                .flat_map(|(name, t)| {
                    let other = back.get(name).map(|o| o.data()).unwrap_or_default();
                    t.data()
                        .iter()
                        .zip(other)
                        .map(|(a, b)| (a - b).abs())
                        .collect::<Vec<_>>()
                })
                .fold(0f32, f32::max);
            rows.push(CodecRow {
                quantization,
                compression,
                bytes: frame.len(),
                ratio_to_f32: 0.0,
                encode_mb_s: raw_mb / best_enc,
                decode_mb_s: raw_mb / best_dec,
                roundtrip_mb_s: raw_mb / (best_enc + best_dec),
                max_abs_error,
            });
        }
    }
    let f32_bytes = rows[0].bytes as f64;
    for row in &mut rows {
        row.ratio_to_f32 = row.bytes as f64 / f32_bytes;
    }
    let text = if json {
        serde_json::to_string_pretty(&rows)?
    } else {
        let mut t = format!(
            "ParamSet: {} parameters in {} tensors ({:.2} MB as f32); best of {reps}; MB/s of f32 payload\n\n",
            params.num_elements(),
            params.len(),
            raw_mb
        );
        t.push_str("| quantization | compression | bytes | vs f32 | encode MB/s | decode MB/s | encode+decode MB/s | max abs error |\n");
        t.push_str("|---|---|---:|---:|---:|---:|---:|---:|\n");
        for r in &rows {
            t.push_str(&format!(
                "| {:?} | {:?} | {} | {:.3} | {:.0} | {:.0} | {:.0} | {:.2e} |\n",
                r.quantization,
                r.compression,
                r.bytes,
                r.ratio_to_f32,
                r.encode_mb_s,
                r.decode_mb_s,
                r.roundtrip_mb_s,
                r.max_abs_error
            ));
        }
        t
    };
    println!("{text}");
    if let Some(path) = out {
        std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
