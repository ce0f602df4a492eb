//! `x · Wᵀ` for a frozen weight `W`.
//!
//! candle's matmul backward computes both operands' gradients, so a plain
//! matmul spends a weight-sized product and buffer per projection per step on
//! a gradient nobody uses. This op's backward is `grad · W` alone.
//!
//! A frozen `W` may be stored in bf16 while `x` is f32 (`[model] compute =
//! "bf16"`): both products then run in [`super::bf16`], and the output and
//! gradients stay f32.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};

use super::bf16::Bf16Rows;
use super::frozen::Frozen;
use super::gemm::{gemm, Mat, Shared};
use super::int8::Int8Rows;
use super::rows::{by_dtype, data, fused, on_pool, pool_threads, with_data, Real};

/// `x · Wᵀ` for a frozen weight `W` `(out, in)` (a tensor, or int8
/// blocks); `x` is `(…, in)`.
pub fn frozen_linear(x: &Tensor, w: impl Into<Frozen>) -> Result<Tensor> {
    let w = w.into();
    if !fused(x) || !w.fits(x) {
        return composite_frozen(x, &w);
    }
    x.contiguous()?.apply_op1(Linear::forward(&w))
}

/// `x · Wᵀ` in candle's ops, int8 blocks dequantized first: to `x`'s dtype
/// on the CPU, to bf16 on a GPU (its tensor cores).
fn composite_frozen(x: &Tensor, w: &Frozen) -> Result<Tensor> {
    match w {
        Frozen::Dense(w) => composite_linear(x, w),
        Frozen::Int8(q) if x.device().is_cpu() => composite_linear(x, &q.dequantize(x.dtype())?),
        Frozen::Int8(q) => composite_linear(x, &q.dequantize(DType::BF16)?),
    }
}

/// `x · Wᵀ` in candle's ops. A weight in another dtype than `x` is widened
/// on the CPU (the reference for the fused products); on a GPU `x` goes to
/// the weight's dtype instead, so a bf16 base multiplies on the tensor
/// cores, and the product comes back in `x`'s dtype.
fn composite_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.dtype() == x.dtype() {
        x.broadcast_matmul(&w.t()?)
    } else if x.device().is_cpu() {
        x.broadcast_matmul(&w.to_dtype(x.dtype())?.t()?)
    } else {
        x.to_dtype(w.dtype())?
            .broadcast_matmul(&w.t()?)?
            .to_dtype(x.dtype())
    }
}

/// `r + x · Wᵀ` for a frozen `W`: a residual connection and the projection
/// into it as one op, so the projection's output is not a tensor of its own
/// that the graph holds through backward. Backward: `g · W` for `x`, `g`
/// for `r`.
pub fn frozen_linear_add(x: &Tensor, w: impl Into<Frozen>, r: &Tensor) -> Result<Tensor> {
    let w = w.into();
    if !fused(x) || !w.fits(x) || r.dtype() != x.dtype() {
        return r + frozen_linear(x, w)?;
    }
    x.contiguous()?.apply_op2(&r.contiguous()?, LinearAdd { w })
}

struct LinearAdd {
    w: Frozen,
}

impl CustomOp2 for LinearAdd {
    fn name(&self) -> &'static str {
        "frozen-linear-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s1, "frozen-linear-add", |T| {
            let x = data(s1, l1, "frozen-linear-add")?;
            let r = data(s2, l2, "frozen-linear-add")?;
            let (out, shape) =
                Linear::forward(&self.w).run_add::<T>(x, l1.dims(), r, l2.shape())?;
            Ok((T::to_cpu_storage_owned(out), shape))
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _r: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let back = grad.apply_op1_no_bwd(&Linear::backward(&self.w))?;
        Ok((Some(back), Some(grad)))
    }
}

/// Whether the fused products take a weight of `w`'s dtype beside `x`'s:
/// the same dtype, or a bf16 weight with f32 activations.
pub(super) fn weight_fits(x: &Tensor, w: &Tensor) -> bool {
    w.dtype() == x.dtype() || (w.dtype() == DType::BF16 && x.dtype() == DType::F32)
}

/// `x · Wᵀ` (`transposed`, the forward) or `g · W` (the backward), blocks
/// of the output on the worker pool, each through `gemm` on one thread.
pub(super) struct Linear {
    /// The weight, or an int8 weight's bytes when `scales` is set.
    pub(super) w: Tensor,
    /// An int8 weight's block scales ([`super::int8`]).
    pub(super) scales: Option<Tensor>,
    pub(super) transposed: bool,
}

impl Linear {
    /// `x · Wᵀ` for the frozen `w`.
    pub(super) fn forward(w: &Frozen) -> Self {
        let (w, scales) = match w {
            Frozen::Dense(w) => (w.clone(), None),
            Frozen::Int8(q) => {
                let (q, scales) = q.parts();
                (q.clone(), Some(scales.clone()))
            }
        };
        Self {
            w,
            scales,
            transposed: true,
        }
    }

    /// `g · W`: the input gradient of [`Linear::forward`].
    pub(super) fn backward(w: &Frozen) -> Self {
        Self {
            transposed: false,
            ..Self::forward(w)
        }
    }

    /// `r + ` the product, with `r` of the output's shape `r_shape`.
    pub(super) fn run_add<T: Real>(
        &self,
        x: &[T],
        dims: &[usize],
        r: &[T],
        r_shape: &Shape,
    ) -> Result<(Vec<T>, Shape)> {
        let (mut out, shape) = self.run(x, dims)?;
        if &shape != r_shape {
            candle_core::bail!("a residual of shape {r_shape:?} added to an output of {shape:?}")
        }
        out.iter_mut().zip(r).for_each(|(o, &r)| *o += r);
        Ok((out, shape))
    }

    /// The product for `x` of shape `dims`, and the output's shape.
    pub(super) fn run<T: Real>(&self, x: &[T], dims: &[usize]) -> Result<(Vec<T>, Shape)> {
        let (wr, wc) = self.w.dims2()?;
        let (k, n) = if self.transposed { (wc, wr) } else { (wr, wc) };
        let last = *dims.last().unwrap_or(&0);
        if last != k {
            candle_core::bail!(
                "linear: input has {last} features, weight {:?}",
                self.w.dims()
            )
        }
        let m = x.len() / k.max(1);
        let narrow = |what: &str, product: Option<Vec<T>>| {
            product.ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "linear: a {what} weight multiplies f32 inputs, not {:?}",
                    T::DTYPE
                ))
            })
        };
        let mkn = (m, k, n);
        let out = if let Some(scales) = &self.scales {
            let product = with_data::<u8, _>(&self.w, "linear", |q| {
                with_data::<f32, _>(scales, "linear", |scales| {
                    let width = wc;
                    let rows = Int8Rows { q, scales, width };
                    T::bf16_product(x, &rows, self.transposed, mkn)
                })
            })??;
            narrow("int8", product)?
        } else if self.w.dtype() == DType::BF16 && T::DTYPE != DType::BF16 {
            let product = with_data::<half::bf16, _>(&self.w, "linear", |values| {
                let rows = Bf16Rows { values, width: wc };
                T::bf16_product(x, &rows, self.transposed, mkn)
            })?;
            narrow("bf16", product)?
        } else if self.transposed && m <= STREAM_ROWS && k > 0 {
            self.streamed(x, (m, k, n))?
        } else {
            self.packed(x, (m, k, n))?
        };
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank ≥ 1") = n;
        Ok((out, Shape::from(shape)))
    }

    /// The product through gemm, blocks of the output on the worker pool.
    fn packed<T: Real>(&self, x: &[T], (m, k, n): (usize, usize, usize)) -> Result<Vec<T>> {
        let threads = pool_threads();
        // Wide outputs (the vocabulary head, the MLP's up projections) split by
        // column blocks, so each thread packs only its share of W; tall ones by rows.
        let by_cols = n >= m;
        let per = if by_cols {
            n.div_ceil(threads).next_multiple_of(16)
        } else {
            m.div_ceil(threads)
        }
        .max(1);
        let blocks = if by_cols { n } else { m }.div_ceil(per);
        let out = if k == 0 {
            Shared::zeroed(m, n)
        } else {
            Shared::uninit(m, n)
        };
        with_data::<T, _>(&self.w, "linear", |w| {
            if k == 0 {
                return;
            }
            // rhs (k × n): Wᵀ when transposed (W is n × k), else W (k × n).
            let rhs = if self.transposed {
                Mat::new(w, n, k).t()
            } else {
                Mat::new(w, k, n)
            };
            let lhs = Mat::new(x, m, k);
            on_pool(blocks, |b| {
                let (rows, cols) = if by_cols {
                    (0..m, b * per..((b + 1) * per).min(n))
                } else {
                    (b * per..((b + 1) * per).min(m), 0..n)
                };
                let (a, bm) = (lhs.rows(rows.clone()), rhs.t().rows(cols.clone()).t());
                gemm(&mut out.block(rows, cols), a, bm, false);
            });
        })?;
        Ok(out.into_vec())
    }

    /// `x · Wᵀ` for a few rows of `x` (decoding): W's rows are streamed once,
    /// unpacked, each dotted with every row of `x` — gemm would pack each
    /// block of W first, and for so few rows packing costs more than the
    /// product.
    fn streamed<T: Real>(&self, x: &[T], (m, k, n): (usize, usize, usize)) -> Result<Vec<T>> {
        with_data::<T, _>(&self.w, "linear", |w| {
            by_column_blocks(m, n, |cols, local| {
                T::dots(x, &w[cols.start * k..cols.end * k], k, local)
            })
        })
    }
}

/// Rows of `x` at most for which W is streamed instead of packed (here and
/// in [`super::bf16`]).
pub(super) const STREAM_ROWS: usize = 16;

/// An `m × n` output whose column blocks `fill(cols, block)` computes on the
/// worker pool, each into a zeroed row-major `m × cols.len()` buffer: the
/// streamed products' split, blocks small enough to balance the pool and
/// large enough to amortize it.
pub(super) fn by_column_blocks<T: WithDType>(
    m: usize,
    n: usize,
    fill: impl Fn(std::ops::Range<usize>, &mut [T]) + Sync,
) -> Vec<T> {
    let per = n.div_ceil(pool_threads() * 4).next_multiple_of(16).max(16);
    let out = Shared::zeroed(m, n);
    on_pool(n.div_ceil(per), |b| {
        let cols = b * per..((b + 1) * per).min(n);
        let mut local = vec![T::from_f64(0.0); m * cols.len()];
        fill(cols.clone(), &mut local);
        let mut dst = out.block(0..m, cols.clone());
        for (i, row) in local.chunks_exact(cols.len()).enumerate() {
            dst.row(i).copy_from_slice(row);
        }
    });
    out.into_vec()
}

impl CustomOp1 for Linear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(s, "frozen-linear", |T| {
            let (out, shape) = self.run::<T>(data(s, l, "frozen-linear")?, l.dims())?;
            Ok((T::to_cpu_storage_owned(out), shape))
        })
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = Linear {
            w: self.w.clone(),
            scales: self.scales.clone(),
            transposed: !self.transposed,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}
