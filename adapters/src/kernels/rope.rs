//! Rotary position embeddings, rotating the two halves of each head
//! (Hugging Face's layout); the backward is the opposite rotation.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};

use super::rows::{by_dtype, data, fused, map_rows, row, with_data};

/// Rotary embedding of `x` `(b, heads, t, head_dim)` with `cos`/`sin`
/// `(t, head_dim / 2)`, rotating the two halves of each head (Hugging Face's
/// layout).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    if !fused(x) || cos.dtype() != x.dtype() || cos.dims() != [t, d / 2] || d % 2 != 0 {
        return candle_nn::rotary_emb::rope_slow(x, cos, sin);
    }
    x.contiguous()?.apply_op1(Rope {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        inverse: false,
    })
}

/// Rotation by the tables' angles, or by their negatives (`inverse`, the
/// backward: a rotation's gradient is the opposite rotation).
struct Rope {
    cos: Tensor,
    sin: Tensor,
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s, "rope", |T| {
            let x = data::<T>(s, l, "rope")?;
            let (_, _, t, d) = l.shape().dims4()?;
            let half = d / 2;
            let out = with_data::<T, _>(&self.cos, "rope", |cos| {
                with_data::<T, _>(&self.sin, "rope", |sin| {
                    map_rows(x.len(), d, |r, o| {
                        let pos = (r % t) * half;
                        rotate(
                            row(x, r, d),
                            o,
                            &cos[pos..pos + half],
                            &sin[pos..pos + half],
                            self.inverse,
                        );
                    })
                })
            })??;
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// Rotates one head's `x` (two halves) by the angles whose cosines and sines
/// are `cos` and `sin` (by their negatives when `inverse`) into `out`.
#[inline]
pub(super) fn rotate<T: WithDType>(x: &[T], out: &mut [T], cos: &[T], sin: &[T], inverse: bool) {
    let half = cos.len();
    let (lo, hi) = out.split_at_mut(half);
    let (xl, xh) = x.split_at(half);
    for j in 0..half {
        let s = if inverse {
            T::from_f64(0.0) - sin[j]
        } else {
            sin[j]
        };
        lo[j] = xl[j] * cos[j] - xh[j] * s;
        hi[j] = xh[j] * cos[j] + xl[j] * s;
    }
}
