//! A LoRA projection as one op: `x Wᵀ + scale · (x ⊙ mask) Aᵀ Bᵀ`, with
//! gradients for `x`, `A` and `B` and none for the frozen `W`.

use std::borrow::Cow;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

use super::frozen::Frozen;
use super::gemm::{gemm, matmul_t, Mat, MatMut};
use super::linear::{frozen_linear, Linear};
use super::rows::{block_rows, by_dtype, data, fused, par_blocks, with_data, Real};

/// A low-rank term `scale · (x ⊙ mask) Aᵀ Bᵀ` added to a frozen projection.
#[derive(Debug, Clone)]
pub struct LowRank {
    /// `(r, in)`
    pub a: Tensor,
    /// `(out, r)`
    pub b: Tensor,
    /// `alpha / r` for LoRA.
    pub scale: f64,
    /// Dropout on the input of `A`: zeros and `1 / (1 − p)`, shaped like `x`.
    pub mask: Option<Tensor>,
}

impl LowRank {
    /// The term alone, `scale · (x ⊙ mask) Aᵀ Bᵀ`, in candle's ops.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let xd = match &self.mask {
            Some(m) => (x * m.to_dtype(x.dtype())?)?,
            None => x.clone(),
        };
        let low = xd
            .broadcast_matmul(&self.a.t()?)?
            .broadcast_matmul(&self.b.t()?)?;
        low * self.scale
    }
}

/// `x Wᵀ + scale · (x ⊙ mask) Aᵀ Bᵀ` as one op, with gradients for `x`, `A`
/// and `B` (none for the frozen `W`).
pub fn lora_linear(x: &Tensor, w: impl Into<Frozen>, term: &LowRank) -> Result<Tensor> {
    let w = w.into();
    let LowRank { a, b, scale, mask } = term;
    let simple = fused(x)
        && w.fits(x)
        && [a, b]
            .iter()
            .all(|t| t.dtype() == x.dtype() && t.rank() == 2)
        && mask.as_ref().is_none_or(|m| m.dims() == x.dims());
    if !simple {
        return frozen_linear(x, w)? + term.apply(x)?;
    }
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraLinear {
            w,
            scale: *scale,
            mask: mask.as_ref().map(|m| m.contiguous()).transpose()?,
        },
    )
}

struct LoraLinear {
    w: Frozen,
    scale: f64,
    mask: Option<Tensor>,
}

/// `x ⊙ mask`, or `x` itself.
fn masked<'a, T: WithDType>(x: &'a [T], mask: Option<&[T]>) -> Cow<'a, [T]> {
    match mask {
        None => Cow::Borrowed(x),
        Some(m) => Cow::Owned(x.iter().zip(m).map(|(&x, &m)| x * m).collect()),
    }
}

/// `v · scale`, element by element.
fn scaled<T: WithDType>(v: Vec<T>, scale: T) -> Vec<T> {
    v.into_iter().map(|x| x * scale).collect()
}

impl LoraLinear {
    fn mask<T: WithDType, R>(&self, f: impl FnOnce(Option<&[T]>) -> R) -> Result<R> {
        match &self.mask {
            None => Ok(f(None)),
            Some(m) => with_data::<T, _>(m, "lora-linear", |m| f(Some(m))),
        }
    }

    fn forward<T: Real>(&self, x: &[T], xl: &Layout, a: &[T], b: &[T]) -> Result<(Vec<T>, Shape)> {
        let n = self.w.dims()?.0;
        let (r, k) = (b.len() / n, *xl.dims().last().unwrap_or(&1));
        let m = x.len() / k.max(1);
        let (mut y, shape) = Linear::forward(&self.w).run::<T>(x, xl.dims())?;
        let scale = T::from_f64(self.scale);
        // h = scale · (x ⊙ mask) Aᵀ (m × r)
        let h =
            self.mask::<T, _>(|mask| scaled(matmul_t(&masked(x, mask), a, (m, k, r)), scale))?;
        // y += h Bᵀ, row blocks on the pool.
        let bt = Mat::new(b, n, r).t();
        par_blocks(&mut y, n, block_rows(m), |row, dst| {
            let rows = dst.len() / n.max(1);
            let hb = Mat::new(&h, m, r).rows(row..row + rows);
            gemm(&mut MatMut::new(dst, rows, n), hb, bt, true);
        });
        Ok((y, shape))
    }

    /// `(dx, dA, dB)` for output gradient `dy`; `dx` is left empty unless
    /// `want_dx` (the first layer's input needs none).
    fn backward<T: Real>(
        &self,
        x: &[T],
        dims: &[usize],
        (a, b): (&[T], &[T]),
        dy: &[T],
        want_dx: bool,
    ) -> Result<[Vec<T>; 3]> {
        let n = self.w.dims()?.0;
        let (r, k) = (b.len() / n, *dims.last().unwrap_or(&1));
        let m = x.len() / k.max(1);
        let scale = T::from_f64(self.scale);
        let back = Linear::backward(&self.w);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank ≥ 1") = n;
        let mut dx = if want_dx {
            back.run::<T>(dy, &out_dims)?.0
        } else {
            Vec::new()
        };
        let zero = T::from_f64(0.0);
        self.mask::<T, _>(|mask| {
            let xd = masked(x, mask);
            let dyv = Mat::new(dy, m, n);
            // h = scale · xd Aᵀ (m × r); dh = scale · dy B (m × r).
            let h = scaled(matmul_t(&xd, a, (m, k, r)), scale);
            let mut dh = vec![zero; m * r];
            gemm(
                &mut MatMut::new(&mut dh, m, r),
                dyv,
                Mat::new(b, n, r),
                false,
            );
            dh.iter_mut().for_each(|v| *v *= scale);
            // dB = dyᵀ h (n × r); dA = dhᵀ xd (r × k).
            let mut db = vec![zero; n * r];
            let mut da = vec![zero; r * k];
            gemm(
                &mut MatMut::new(&mut db, n, r),
                dyv.t(),
                Mat::new(&h, m, r),
                false,
            );
            gemm(
                &mut MatMut::new(&mut da, r, k),
                Mat::new(&dh, m, r).t(),
                Mat::new(&xd, m, k),
                false,
            );
            if !want_dx {
                return [dx, da, db];
            }
            // dx += (dh A) ⊙ mask, row blocks on the pool.
            par_blocks(&mut dx, k, block_rows(m), |row, dst| {
                let rows = dst.len() / k.max(1);
                let mut low = vec![zero; rows * k];
                gemm(
                    &mut MatMut::new(&mut low, rows, k),
                    Mat::new(&dh, m, r).rows(row..row + rows),
                    Mat::new(a, r, k),
                    false,
                );
                match mask {
                    Some(mk) => {
                        let mk = &mk[row * k..][..rows * k];
                        for ((d, &l), &mv) in dst.iter_mut().zip(&low).zip(mk) {
                            *d += l * mv;
                        }
                    }
                    None => dst.iter_mut().zip(&low).for_each(|(d, &l)| *d += l),
                }
            });
            [dx, da, db]
        })
    }

    /// The backward pass for tensors of element type `T`.
    fn grads<T: Real>(
        &self,
        (x, a, b): (&Tensor, &Tensor, &Tensor),
        grad: &Tensor,
        want_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let op = "lora-linear";
        let [dx, da, db] = with_data::<T, _>(x, op, |xd| {
            with_data::<T, _>(a, op, |ad| {
                with_data::<T, _>(b, op, |bd| {
                    with_data::<T, _>(grad, op, |g| {
                        self.backward(xd, x.dims(), (ad, bd), g, want_dx)
                    })
                })
            })
        })?????;
        let dev = x.device();
        Ok((
            want_dx
                .then(|| Tensor::from_vec(dx, x.shape(), dev))
                .transpose()?,
            Tensor::from_vec(da, a.shape(), dev)?,
            Tensor::from_vec(db, b.shape(), dev)?,
        ))
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
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
        by_dtype!(s1, "lora-linear", |T| {
            let (y, shape) = self.forward::<T>(
                data(s1, l1, "lora-linear")?,
                l1,
                data(s2, l2, "lora-linear")?,
                data(s3, l3, "lora-linear")?,
            )?;
            Ok((T::to_cpu_storage_owned(y), shape))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let want_dx = x.track_op();
        let (dx, da, db) = match x.dtype() {
            DType::F32 => self.grads::<f32>((x, a, b), &grad, want_dx)?,
            DType::F64 => self.grads::<f64>((x, a, b), &grad, want_dx)?,
            other => candle_core::bail!("lora-linear: unsupported dtype {other:?}"),
        };
        Ok((dx, Some(da), Some(db)))
    }
}
