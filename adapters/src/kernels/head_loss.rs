//! The output head and the cross-entropy as one op, a block of rows at a
//! time, so the logits of every position never exist at once.
//!
//! Taking the output head (`x · Wᵀ`, `W` frozen) and the loss apart, a
//! training step holds the logits of every counted position through the
//! backward pass and then their gradient as well: at 512 positions over a
//! 49,152-word vocabulary that is 2 × 100 MB of f32, the largest buffers of
//! the step. Here each block of rows gets its logits, its per-row
//! negative log-likelihood and — when a gradient will be asked for — the
//! gradient of that NLL for its hidden rows, `(softmax − onehot) · W`,
//! before the next block reuses the buffer. Backward scales those rows by
//! the incoming per-row gradient. The products are the same two the
//! separate ops compute, in blocks; the price is packing `W` once per block.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};

use super::frozen::Frozen;
use super::linear::Linear;
use super::rows::{by_dtype, data, fused, Real};
use crate::loss::{check_targets, RowLoss};

/// The logits of one block of rows at most this large (bytes).
const BLOCK_BYTES: usize = 32 << 20;

/// Per-row cross-entropy `(k)` of the logits `x · Wᵀ` (`x` `(k, in)`, `W`
/// `(vocab, in)` frozen) against one target per row; `None` when the fused
/// path does not take these tensors (the caller composes the two ops).
pub fn head_nll_rows(x: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Option<Tensor>> {
    head_nll_rows_in(x, w, targets, BLOCK_BYTES)
}

pub(crate) fn head_nll_rows_in(
    x: &Tensor,
    w: &Tensor,
    targets: &[u32],
    block_bytes: usize,
) -> Result<Option<Tensor>> {
    let w = Frozen::from(w);
    if !fused(x) || !w.fits(x) || x.rank() != 2 {
        return Ok(None);
    }
    check_targets(targets, x.dim(0)?, w.dims()?.0)?;
    let op = HeadLoss {
        w,
        targets: targets.to_vec(),
        // Evaluation tracks no graph: no gradient to prepare.
        with_grad: x.track_op(),
        block_bytes,
        unit_grad: Mutex::new(None),
    };
    x.contiguous()?.apply_op1(op).map(Some)
}

struct HeadLoss {
    w: Frozen,
    targets: Vec<u32>,
    with_grad: bool,
    block_bytes: usize,
    /// `(softmax − onehot) · W` per row, `(k, in)`: the gradient of each
    /// row's NLL for its hidden row, kept by the forward pass for backward.
    unit_grad: Mutex<Option<Tensor>>,
}

impl HeadLoss {
    fn run<T: Real + RowLoss>(&self, x: &[T], (k, h): (usize, usize)) -> Result<(Vec<T>, Vec<T>)> {
        let v = self.w.dims()?.0;
        let row_bytes = v * std::mem::size_of::<T>();
        let blocks = (k * row_bytes)
            .div_ceil(self.block_bytes.max(1))
            .clamp(1, k.max(1));
        let per = k.div_ceil(blocks).max(1);
        let (forward, backward) = (Linear::forward(&self.w), Linear::backward(&self.w));
        let mut nll = Vec::with_capacity(k);
        let mut grad = Vec::with_capacity(if self.with_grad { k * h } else { 0 });
        for r0 in (0..k).step_by(per) {
            let rows = per.min(k - r0);
            let targets = &self.targets[r0..r0 + rows];
            let (logits, _) = forward.run(&x[r0 * h..(r0 + rows) * h], &[rows, h])?;
            nll.extend(T::nll_rows(&logits, v, targets));
            if self.with_grad {
                let ones = vec![T::from_f64(1.0); rows];
                let dlogits = T::grad_rows(&logits, v, targets, &ones);
                drop(logits);
                grad.extend(backward.run(&dlogits, &[rows, v])?.0);
            }
        }
        Ok((nll, grad))
    }
}

impl CustomOp1 for HeadLoss {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (k, h) = l.shape().dims2()?;
        by_dtype!(s, "head-cross-entropy", |T| {
            let x = data::<T>(s, l, "head-cross-entropy")?;
            let (nll, grad) = self.run::<T>(x, (k, h))?;
            if self.with_grad {
                let g = Tensor::from_vec(grad, (k, h), &candle_core::Device::Cpu)?;
                *self.unit_grad.lock().unwrap_or_else(|e| e.into_inner()) = Some(g);
            }
            Ok((T::to_cpu_storage_owned(nll), Shape::from(k)))
        })
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let saved = self
            .unit_grad
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(unit) = saved else {
            candle_core::bail!(
                "head-cross-entropy: backward through a pass that tracked no gradient"
            )
        };
        let per_row = grad.to_dtype(unit.dtype())?.unsqueeze(1)?;
        Ok(Some(unit.broadcast_mul(&per_row)?))
    }
}
