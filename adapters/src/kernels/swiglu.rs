//! `silu(gate) ⊙ up`, the Llama MLP's gating, and its gradients.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

use super::frozen::Frozen;
use super::linear::{frozen_linear, Linear};
use super::rows::{block_rows, by_dtype, data, fused, last_dim, map_rows, par_blocks, row, Real};

/// `silu(gate) ⊙ up`, the Llama MLP's gating.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !fused(gate) || gate.dtype() != up.dtype() || gate.dims() != up.dims() {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// `r + swiglu(gate, up) · Wᵀ` for a frozen `W` (the MLP's down
/// projection when no adapter touches it, and the residual connection it
/// feeds) as one op, keeping neither `swiglu(gate, up)` nor the projection's
/// output: the graph of the ops apart holds that `(tokens, intermediate)`
/// product through backward although the frozen product's backward never
/// reads it (94 MB over the default model's 30 layers at 512 tokens), and
/// the `(tokens, hidden)` projection besides. Backward is `g · W`, then the
/// gating's own backward from `gate` and `up`; `g` for `r`.
pub fn swiglu_linear_add(
    gate: &Tensor,
    up: &Tensor,
    w: impl Into<Frozen>,
    r: &Tensor,
) -> Result<Tensor> {
    let w = w.into();
    if !fused(gate)
        || gate.dtype() != up.dtype()
        || gate.dims() != up.dims()
        || !w.fits(gate)
        || r.dtype() != gate.dtype()
    {
        return r + frozen_linear(&swiglu(gate, up)?, w)?;
    }
    gate.contiguous()?
        .apply_op3(&up.contiguous()?, &r.contiguous()?, SwiGluLinearAdd { w })
}

struct SwiGlu;

/// `silu(g) ⊙ u` of contiguous rows `n` wide.
fn gated<T: Real>(g: &[T], u: &[T], n: usize) -> Vec<T> {
    map_rows(g.len(), n, |r, o| {
        for ((o, &g), &u) in o.iter_mut().zip(row(g, r, n)).zip(row(u, r, n)) {
            *o = g * sigmoid(g) * u;
        }
    })
}

#[inline(always)]
fn sigmoid<T: Real>(x: T) -> T {
    T::from_f64(1.0) / (T::from_f64(1.0) + (T::from_f64(0.0) - x).exp_())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1, "swiglu", |T| {
            let g = data::<T>(s1, l1, "swiglu")?;
            let u = data::<T>(s2, l2, "swiglu")?;
            let out = gated(g, u, last_dim(l1));
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dgate, dup) = gating_grads(gate, up, &grad.contiguous()?)?;
        Ok((Some(dgate), Some(dup)))
    }
}

struct SwiGluLinearAdd {
    w: Frozen,
}

impl CustomOp3 for SwiGluLinearAdd {
    fn name(&self) -> &'static str {
        "swiglu-linear-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1, "swiglu-linear-add", |T| {
            let g = data::<T>(s1, l1, "swiglu-linear-add")?;
            let u = data::<T>(s2, l2, "swiglu-linear-add")?;
            let act = gated(g, u, last_dim(l1));
            let r = data(s3, l3, "swiglu-linear-add")?;
            let (out, shape) =
                Linear::forward(&self.w).run_add::<T>(&act, l1.dims(), r, l3.shape())?;
            Ok((T::to_cpu_storage_owned(out), shape))
        })
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _r: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let grad_act = grad.apply_op1_no_bwd(&Linear::backward(&self.w))?;
        let (dgate, dup) = gating_grads(gate, up, &grad_act)?;
        Ok((Some(dgate), Some(dup), Some(grad)))
    }
}

/// The gating's input gradients `(dgate, dup)` for the output gradient `grad`.
fn gating_grads(gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    let both = gate.apply_op3_no_bwd(up, grad, &SwiGluGrad)?;
    Ok((both.get(0)?, both.get(1)?))
}

/// `(dgate, dup)` stacked as `(2, …)`: `dgate = g_y·u·σ(g)·(1 + g·(1 − σ(g)))`, `dup = g_y·silu(g)`.
struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1, "swiglu-grad", |T| {
            let g = data::<T>(s1, l1, "swiglu-grad")?;
            let u = data::<T>(s2, l2, "swiglu-grad")?;
            let dy = data::<T>(s3, l3, "swiglu-grad")?;
            let len = g.len();
            let n = last_dim(l1);
            let mut out = vec![T::from_f64(0.0); 2 * len];
            let (dg, du) = out.split_at_mut(len);
            let rows = block_rows(len / n);
            // One pass computes both halves; blocks of `dg` carry their offset into `du`.
            let du = Mutex::new(du);
            par_blocks(dg, n, rows, |r0, dst| {
                let span = r0 * n..r0 * n + dst.len();
                let mut du_part = vec![T::from_f64(0.0); dst.len()];
                for (((o, d), (&g, &u)), &dy) in dst
                    .iter_mut()
                    .zip(du_part.iter_mut())
                    .zip(g[span.clone()].iter().zip(&u[span.clone()]))
                    .zip(&dy[span.clone()])
                {
                    let s = sigmoid(g);
                    *o = dy * u * s * (T::from_f64(1.0) + g * (T::from_f64(1.0) - s));
                    *d = dy * g * s;
                }
                du.lock().unwrap_or_else(|e| e.into_inner())[span].copy_from_slice(&du_part);
            });
            let mut dims = vec![2];
            dims.extend_from_slice(l1.dims());
            Ok((T::to_cpu_storage_owned(out), Shape::from(dims)))
        })
    }
}
