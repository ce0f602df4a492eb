//! The causal language-modelling loss.

use candle_core::{Result, Tensor, D};

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
    if t < 2 {
        candle_core::bail!("a sequence needs at least 2 tokens to predict one")
    }
    let targets: Vec<i64> = labels.narrow(1, 1, t - 1)?.flatten_all()?.to_vec1()?;
    let mut rows = Vec::new();
    let mut picks = Vec::new();
    for (i, &label) in targets.iter().enumerate() {
        if label == IGNORE_INDEX {
            continue;
        }
        if label < 0 || label as usize >= v {
            candle_core::bail!("label {label} is outside the vocabulary of {v}")
        }
        rows.push(i as u32);
        picks.push(label as u32);
    }
    if rows.is_empty() {
        candle_core::bail!("every label is {IGNORE_INDEX}: nothing to learn from this batch")
    }
    let device = logits.device();
    let n = rows.len();
    let flat = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let kept = flat.index_select(&Tensor::from_vec(rows, n, device)?, 0)?;
    let logp = candle_nn::ops::log_softmax(&kept, D::Minus1)?;
    let picked = logp.gather(&Tensor::from_vec(picks, (n, 1), device)?, 1)?;
    picked.mean_all()?.neg()
}
