//! RMSNorm with a frozen weight: `x / sqrt(mean(x²) + eps) · w` over the
//! last dimension, and its input gradient.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType, D};

use super::rows::{by_dtype, data, fused, last_dim, map_rows, row, with_data};

/// RMSNorm with a frozen weight: `x / sqrt(mean(x²) + eps) · w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused(x) || x.dtype() != w.dtype() {
        return rms_norm_composite(x, w, eps);
    }
    x.contiguous()?.apply_op1(RmsNorm { w: w.clone(), eps })
}

/// RMSNorm written with differentiable tensor ops (the reference).
pub fn rms_norm_composite(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (mean_sq + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

struct RmsNorm {
    w: Tensor,
    eps: f64,
}

/// `1 / sqrt(mean(x²) + eps)` of one row, accumulated in f64.
fn inv_rms<T: WithDType>(row: &[T], eps: f64) -> f64 {
    let ss: f64 = row.iter().map(|&x| x.to_f64() * x.to_f64()).sum();
    1.0 / (ss / row.len() as f64 + eps).sqrt()
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s, "rms-norm", |T| {
            let x = data::<T>(s, l, "rms-norm")?;
            let n = last_dim(l);
            let out = with_data::<T, _>(&self.w, "rms-norm", |w| {
                map_rows(x.len(), n, |r, o| {
                    let xr = row(x, r, n);
                    let inv = T::from_f64(inv_rms(xr, self.eps));
                    for ((o, &x), &w) in o.iter_mut().zip(xr).zip(w) {
                        *o = x * inv * w;
                    }
                })
            })?;
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(
            &grad,
            &RmsNormGrad {
                w: self.w.clone(),
                eps: self.eps,
            },
        )?))
    }
}

/// `dx = r·(g⊙w) − x·r³·⟨g⊙w, x⟩ / n`, with `r = 1 / sqrt(mean(x²) + eps)`.
struct RmsNormGrad {
    w: Tensor,
    eps: f64,
}

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1, "rms-norm-grad", |T| {
            let x = data::<T>(s1, l1, "rms-norm-grad")?;
            let g = data::<T>(s2, l2, "rms-norm-grad")?;
            let n = last_dim(l1);
            let out = with_data::<T, _>(&self.w, "rms-norm-grad", |w| {
                map_rows(x.len(), n, |r, o| {
                    let (xr, gr) = (row(x, r, n), row(g, r, n));
                    let inv = inv_rms(xr, self.eps);
                    let dot: f64 = xr
                        .iter()
                        .zip(gr)
                        .zip(w)
                        .map(|((&x, &g), &w)| (g * w).to_f64() * x.to_f64())
                        .sum();
                    let c = T::from_f64(inv * inv * inv * dot / n as f64);
                    let inv = T::from_f64(inv);
                    for (((o, &x), &g), &w) in o.iter_mut().zip(xr).zip(gr).zip(w) {
                        *o = g * w * inv - x * c;
                    }
                })
            })?;
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }
}
