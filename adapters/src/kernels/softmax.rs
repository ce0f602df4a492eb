//! Softmax over the last dimension, and its input gradient.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType, D};

use super::rows::{by_dtype, data, fused, last_dim, map_rows, row, Real};

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s, "softmax", |T| {
            let x = data::<T>(s, l, "softmax")?;
            let n = last_dim(l);
            let out = map_rows(x.len(), n, |r, o| {
                let xr = row(x, r, n);
                let sum = T::exp_store(xr, T::max_of(xr), o);
                let inv = T::from_f64(1.0) / sum;
                o.iter_mut().for_each(|v| *v *= inv);
            });
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    }

    fn bwd(&self, _arg: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            probs.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?,
        ))
    }
}

/// `dx = p ⊙ (g − ⟨g, p⟩)`.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1, "softmax-grad", |T| {
            let p = data::<T>(s1, l1, "softmax-grad")?;
            let g = data::<T>(s2, l2, "softmax-grad")?;
            let n = last_dim(l1);
            let out = map_rows(p.len(), n, |r, o| {
                let (pr, gr) = (row(p, r, n), row(g, r, n));
                let mut dot = T::from_f64(0.0);
                for (&p, &g) in pr.iter().zip(gr) {
                    dot += p * g;
                }
                for ((o, &p), &g) in o.iter_mut().zip(pr).zip(gr) {
                    *o = p * (g - dot);
                }
            });
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }
}
