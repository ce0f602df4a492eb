//! The causal language-modelling loss.
//!
//! Two forms: [`causal_lm_loss`] takes full logits and is written with
//! composite candle ops (the reference); [`cross_entropy_rows`] is the fused
//! form the training step uses through `Llama::causal_lm_loss`, which selects
//! the positions whose labels count before the output head. Over a 49,152-word
//! vocabulary the composite log-softmax makes about a dozen passes over the
//! logits forward and backward; the fused op makes two.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};

use crate::kernels::par_blocks;
use crate::simd;

/// Label value of positions that do not count (prompt, padding), as in PyTorch and Hugging Face.
pub const IGNORE_INDEX: i64 = -100;

/// Mean next-token cross-entropy of `logits` `(b, t, vocab)` against `labels`
/// `(b, t)` (i64). Label `i` is the token at position `i`; the loss shifts, so
/// position `i`'s logits predict label `i + 1` (Hugging Face's convention).
/// Positions labelled [`IGNORE_INDEX`] are left out. Written with composite
/// ops (log-softmax, gather) whose backward reaches the logits.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if labels.dims() != [b, t] {
        candle_core::bail!(
            "labels have shape {:?}, logits {:?}",
            labels.dims(),
            logits.dims()
        )
    }
    let (rows, picks) = counted_positions(labels, v)?;
    // Rows index the flat (b·t) positions; row r predicts the label at r + 1.
    let flat = logits.reshape((b * t, v))?;
    let kept = flat.index_select(&Tensor::from_vec(rows, picks.len(), logits.device())?, 0)?;
    composite_cross_entropy(&kept, &picks)
}

/// Mean cross-entropy of `(k, vocab)` logits against one target per row,
/// written with composite ops (log-softmax, gather).
fn composite_cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let idx = Tensor::from_slice(targets, (targets.len(), 1), logits.device())?;
    logp.gather(&idx, 1)?.mean_all()?.neg()
}

/// The positions whose next-token label counts, as flat `(b·t)` row indices,
/// and the target id each predicts.
pub fn counted_positions(labels: &Tensor, vocab: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let (b, t) = labels.dims2()?;
    if t < 2 {
        candle_core::bail!("a sequence needs at least 2 tokens to predict one")
    }
    let all: Vec<i64> = labels.flatten_all()?.to_vec1()?;
    let mut rows = Vec::new();
    let mut picks = Vec::new();
    for seq in 0..b {
        for pos in 0..t - 1 {
            let label = all[seq * t + pos + 1];
            if label == IGNORE_INDEX {
                continue;
            }
            if label < 0 || label as usize >= vocab {
                candle_core::bail!("label {label} is outside the vocabulary of {vocab}")
            }
            rows.push((seq * t + pos) as u32);
            picks.push(label as u32);
        }
    }
    if rows.is_empty() {
        candle_core::bail!("every label is {IGNORE_INDEX}: nothing to learn from this batch")
    }
    Ok((rows, picks))
}

/// Mean cross-entropy of `logits` `(k, vocab)` against one target per row.
/// Fused on the CPU (log-sum-exp forward, `softmax − onehot` backward);
/// composite ops elsewhere.
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (k, v) = logits.dims2()?;
    check_targets(targets, k, v)?;
    if !logits.device().is_cpu() || crate::kernels::composite_forced() {
        return composite_cross_entropy(logits, targets);
    }
    let logits = logits.contiguous()?;
    logits
        .apply_op1(RowCrossEntropy {
            targets: targets.to_vec(),
        })?
        .mean_all()
}

/// One target per row of `k`, each inside the vocabulary of `v`.
pub(crate) fn check_targets(targets: &[u32], k: usize, v: usize) -> Result<()> {
    if targets.len() != k || targets.iter().any(|&t| t as usize >= v) {
        candle_core::bail!(
            "{} targets for {k} rows, or a target outside the vocabulary of {v}",
            targets.len()
        )
    }
    Ok(())
}

/// Mean cross-entropy of the logits `hidden · Wᵀ` (`hidden` `(k, in)`, `W`
/// `(vocab, in)` frozen) against one target per row. On the CPU the output
/// head and the loss are one op over blocks of rows
/// ([`crate::kernels::head_loss`]), so the logits of every row never exist
/// at once; elsewhere [`crate::kernels::frozen_linear`] then
/// [`cross_entropy_rows`].
pub fn head_cross_entropy(hidden: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
    match crate::kernels::head_loss::head_nll_rows(hidden, w, targets)? {
        Some(nll) => nll.mean_all(),
        None => cross_entropy_rows(&crate::kernels::frozen_linear(hidden, w)?, targets),
    }
}

/// The row-wise negative log-likelihood and its gradient, by element type.
pub(crate) trait RowLoss: Sized {
    /// Each row's `logsumexp − row[target]`.
    fn nll_rows(data: &[Self], v: usize, targets: &[u32]) -> Vec<Self>;
    /// Each row's `grad · (softmax − onehot(target))`.
    fn grad_rows(data: &[Self], v: usize, targets: &[u32], grad: &[Self]) -> Vec<Self>;
}

impl RowLoss for f32 {
    fn nll_rows(data: &[f32], v: usize, targets: &[u32]) -> Vec<f32> {
        nll_rows_f32(data, v, targets)
    }
    fn grad_rows(data: &[f32], v: usize, targets: &[u32], grad: &[f32]) -> Vec<f32> {
        grad_rows_f32(data, v, targets, grad)
    }
}

impl RowLoss for f64 {
    fn nll_rows(data: &[f64], v: usize, targets: &[u32]) -> Vec<f64> {
        nll_rows_f64(data, v, targets)
    }
    fn grad_rows(data: &[f64], v: usize, targets: &[u32], grad: &[f64]) -> Vec<f64> {
        grad_rows_f64(data, v, targets, grad)
    }
}

/// Per-row negative log-likelihood; see [`cross_entropy_rows`].
struct RowCrossEntropy {
    targets: Vec<u32>,
}

fn nll_rows_f32(data: &[f32], v: usize, targets: &[u32]) -> Vec<f32> {
    let mut out = vec![0f32; targets.len()];
    par_blocks(&mut out, 1, 1, |r, o| {
        let row = &data[r * v..(r + 1) * v];
        let max = simd::max(row);
        o[0] = max + simd::exp_sum(row, max).ln() - row[targets[r] as usize];
    });
    out
}

fn grad_rows_f32(data: &[f32], v: usize, targets: &[u32], grad: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    par_blocks(&mut out, v, 1, |r, o| {
        let row = &data[r * v..(r + 1) * v];
        let max = simd::max(row);
        let sum = simd::exp_store(row, max, o);
        simd::scale(o, grad[r] / sum);
        o[targets[r] as usize] -= grad[r];
    });
    out
}

fn nll_rows_f64(data: &[f64], v: usize, targets: &[u32]) -> Vec<f64> {
    let mut out = vec![0f64; targets.len()];
    par_blocks(&mut out, 1, 1, |r, o| {
        let row = &data[r * v..(r + 1) * v];
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|&x| (x - max).exp()).sum();
        o[0] = max + sum.ln() - row[targets[r] as usize];
    });
    out
}

fn grad_rows_f64(data: &[f64], v: usize, targets: &[u32], grad: &[f64]) -> Vec<f64> {
    let mut out = vec![0f64; data.len()];
    par_blocks(&mut out, v, 1, |r, o| {
        let row = &data[r * v..(r + 1) * v];
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0f64;
        for (o, &x) in o.iter_mut().zip(row) {
            *o = (x - max).exp();
            sum += *o;
        }
        let scale = grad[r] / sum;
        o.iter_mut().for_each(|x| *x *= scale);
        o[targets[r] as usize] -= grad[r];
    });
    out
}

/// A contiguous CPU tensor's data.
fn cpu_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<(&'a CpuStorage, usize)> {
    if !layout.is_contiguous() {
        candle_core::bail!("row-cross-entropy needs contiguous logits")
    }
    Ok((storage, layout.start_offset()))
}

impl CustomOp1 for RowCrossEntropy {
    fn name(&self) -> &'static str {
        "row-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (k, v) = layout.shape().dims2()?;
        let (storage, off) = cpu_slice(storage, layout)?;
        let out = match storage {
            CpuStorage::F32(d) => {
                CpuStorage::F32(nll_rows_f32(&d[off..off + k * v], v, &self.targets))
            }
            CpuStorage::F64(d) => {
                CpuStorage::F64(nll_rows_f64(&d[off..off + k * v], v, &self.targets))
            }
            _ => candle_core::bail!("row-cross-entropy supports f32 and f64 logits"),
        };
        Ok((out, Shape::from(k)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (k, v) = arg.dims2()?;
        let grad = grad_res.contiguous()?;
        let (storage, layout) = arg.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("row-cross-entropy: logits left the CPU")
        };
        let (cpu, off) = cpu_slice(cpu, layout)?;
        let out = match cpu {
            CpuStorage::F32(d) => {
                let g: Vec<f32> = grad.to_dtype(DType::F32)?.to_vec1()?;
                Tensor::from_vec(
                    grad_rows_f32(&d[off..off + k * v], v, &self.targets, &g),
                    (k, v),
                    arg.device(),
                )?
            }
            CpuStorage::F64(d) => {
                let g: Vec<f64> = grad.to_dtype(DType::F64)?.to_vec1()?;
                Tensor::from_vec(
                    grad_rows_f64(&d[off..off + k * v], v, &self.targets, &g),
                    (k, v),
                    arg.device(),
                )?
            }
            _ => candle_core::bail!("row-cross-entropy supports f32 and f64 logits"),
        };
        Ok(Some(out))
    }
}
