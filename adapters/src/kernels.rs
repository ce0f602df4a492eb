//! Fused CPU kernels for the training step, each with its backward pass.
//!
//! candle builds RMSNorm, softmax, rotary embeddings and SwiGLU out of many
//! elementwise ops (a dozen passes and buffers per call once backward is
//! counted), gives none of its fused forms a backward pass, and computes a
//! weight gradient for every matmul. On 2 cores that overhead was about as
//! large as the matrix products themselves. Here each of those is one op
//! with an analytic backward, working row by row on candle's CPU worker pool
//! (the same threads its elementwise ops use, so the two never compete for
//! cores).
//!
//! Every function takes the fused path for contiguous f32/f64 CPU tensors and
//! falls back to the composite candle ops otherwise (other devices, f16/bf16),
//! which are also the references the tests compare against, value and
//! gradient.

use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
    WithDType, D,
};

use crate::simd;

/// Element types the fused kernels support.
pub trait Real: WithDType {
    /// `e^x`.
    fn exp_(self) -> Self;
    /// Writes `e^(x − shift)` of each `x` in `row` to `out`; returns the sum.
    fn exp_store(row: &[Self], shift: Self, out: &mut [Self]) -> Self;
    /// Largest value of `row`.
    fn max_of(row: &[Self]) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn exp_(self) -> Self {
        simd::exp(self)
    }
    fn exp_store(row: &[Self], shift: Self, out: &mut [Self]) -> Self {
        simd::exp_store(row, shift, out)
    }
    fn max_of(row: &[Self]) -> Self {
        simd::max(row)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn exp_(self) -> Self {
        self.exp()
    }
    fn exp_store(row: &[Self], shift: Self, out: &mut [Self]) -> Self {
        let mut sum = 0.0;
        for (o, &x) in out.iter_mut().zip(row) {
            *o = (x - shift).exp();
            sum += *o;
        }
        sum
    }
    fn max_of(row: &[Self]) -> Self {
        row.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

/// True when the fused kernels can take `t`.
fn fused(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Runs `f(first_row, rows)` over blocks of `rows_per_block` rows of `out`
/// (`width` values per row) on candle's CPU worker pool.
pub(crate) fn par_blocks<T: Send>(
    out: &mut [T],
    width: usize,
    rows_per_block: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let per = rows_per_block.max(1);
    let blocks: Vec<Mutex<&mut [T]>> = out.chunks_mut(per * width.max(1)).map(Mutex::new).collect();
    let lock = |b: usize| -> MutexGuard<'_, &mut [T]> {
        blocks[b].lock().unwrap_or_else(|e| e.into_inner())
    };
    let run = |range: Range<usize>| {
        for b in range {
            f(b * per, &mut lock(b));
        }
    };
    if blocks.len() <= 1 {
        run(0..blocks.len());
    } else {
        candle_core::utils::barrier_pool().execute_chunked(blocks.len(), run);
    }
}

/// Rows per block so that the pool's threads each get a few blocks.
fn block_rows(rows: usize) -> usize {
    let threads = candle_core::utils::barrier_pool().n_workers() + 1;
    rows.div_ceil(threads * 4).max(1)
}

/// The contiguous data of a CPU storage.
fn data<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous input"),
    }
}

/// Calls `f` with a captured tensor's contiguous CPU data.
fn with_data<T: WithDType, R>(t: &Tensor, op: &str, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{op}: a captured tensor left the CPU")
    };
    Ok(f(data::<T>(cpu, layout, op)?))
}

macro_rules! by_dtype {
    ($s:expr, $op:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => candle_core::bail!("{}: supports f32 and f64 only", $op),
        }
    };
}

// ---------------------------------------------------------------- linear

/// `x · Wᵀ` for a frozen weight `W` `(out, in)`; `x` is `(…, in)`.
///
/// candle's matmul backward computes both operands' gradients, so a plain
/// matmul spends a weight-sized product and buffer per projection per step on
/// a gradient nobody uses. This op's backward is `grad · W` alone.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !fused(x) || x.dtype() != w.dtype() || !w.is_contiguous() {
        return x.broadcast_matmul(&w.t()?);
    }
    x.contiguous()?.apply_op1(Linear {
        w: w.clone(),
        transposed: true,
    })
}

/// `x · Wᵀ` (`transposed`, the forward) or `g · W` (the backward), row blocks
/// of `x` on the worker pool, each through `gemm` on one thread.
struct Linear {
    w: Tensor,
    transposed: bool,
}

impl Linear {
    fn run<T: WithDType>(&self, x: &[T], dims: &[usize]) -> Result<(Vec<T>, Shape)> {
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
        let mut out = vec![T::from_f64(0.0); m * n];
        // rhs (k × n): Wᵀ when transposed (W is n × k), else W (k × n).
        let (rhs_cs, rhs_rs) = if self.transposed { (k, 1) } else { (1, n) };
        let threads = candle_core::utils::barrier_pool().n_workers() + 1;
        with_data::<T, _>(&self.w, "linear", |w| {
            if n >= m && threads > 1 {
                // Wide outputs (the vocabulary head, the MLP's up projections):
                // one column block per thread, so each packs only its share of W.
                let per = n.div_ceil(threads).next_multiple_of(16);
                let dst = SharedMut(out.as_mut_ptr());
                candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(per), |blocks| {
                    for b in blocks {
                        let (c0, cols) = (b * per, per.min(n - b * per));
                        // SAFETY: x is m × k; columns c0..c0+cols of rhs lie inside w by
                        // the strides above; each block writes only its own columns of
                        // the m × n output, which outlives the pool call.
                        unsafe {
                            gemm_rows(
                                (m, cols, k),
                                dst.at(c0),
                                n,
                                x.as_ptr(),
                                w.as_ptr().add(c0 * rhs_cs),
                                (rhs_cs, rhs_rs),
                            )
                        }
                    }
                });
            } else {
                // Tall outputs: one row block per thread.
                par_blocks(&mut out, n, m.div_ceil(threads), |row, dst| {
                    let rows = dst.len() / n.max(1);
                    let lhs = &x[row * k..(row + rows) * k];
                    // SAFETY: lhs is rows × k, w holds k · n values laid out by the
                    // strides above, dst is rows × n.
                    unsafe {
                        gemm_rows(
                            (rows, n, k),
                            dst.as_mut_ptr(),
                            n,
                            lhs.as_ptr(),
                            w.as_ptr(),
                            (rhs_cs, rhs_rs),
                        )
                    }
                });
            }
        })?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank ≥ 1") = n;
        Ok((out, Shape::from(shape)))
    }
}

/// A raw output pointer shared by pool threads that write disjoint parts.
struct SharedMut<T>(*mut T);
// SAFETY: only used for disjoint writes from the pool threads of one call.
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer `offset` elements in.
    ///
    /// # Safety
    /// `offset` must lie inside the allocation.
    unsafe fn at(&self, offset: usize) -> *mut T {
        self.0.add(offset)
    }
}

/// `dst (rows × cols, row stride dst_rs) = lhs (rows × k, row-major) · rhs (k × cols)`
/// with `rhs` at the given (column, row) strides, on the calling thread.
///
/// # Safety
/// Every pointer must be valid for the extents its shape and strides imply.
unsafe fn gemm_rows<T: 'static + WithDType>(
    (rows, cols, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    lhs: *const T,
    rhs: *const T,
    (rhs_cs, rhs_rs): (usize, usize),
) {
    gemm::gemm(
        rows,
        cols,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs,
        1,
        k as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::from_f64(0.0),
        T::from_f64(1.0),
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
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
            transposed: !self.transposed,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

// ---------------------------------------------------------------- RMSNorm

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
            let n = *l.dims().last().unwrap_or(&1);
            let mut out = vec![T::from_f64(0.0); x.len()];
            with_data::<T, _>(&self.w, "rms-norm", |w| {
                par_blocks(&mut out, n, block_rows(x.len() / n), |r0, dst| {
                    for (i, o) in dst.chunks_mut(n).enumerate() {
                        let row = &x[(r0 + i) * n..(r0 + i + 1) * n];
                        let inv = T::from_f64(inv_rms(row, self.eps));
                        for ((o, &x), &w) in o.iter_mut().zip(row).zip(w) {
                            *o = x * inv * w;
                        }
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
            let n = *l1.dims().last().unwrap_or(&1);
            let mut out = vec![T::from_f64(0.0); x.len()];
            with_data::<T, _>(&self.w, "rms-norm-grad", |w| {
                par_blocks(&mut out, n, block_rows(x.len() / n), |r0, dst| {
                    for (i, o) in dst.chunks_mut(n).enumerate() {
                        let span = (r0 + i) * n..(r0 + i + 1) * n;
                        let (xr, gr) = (&x[span.clone()], &g[span]);
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
                    }
                })
            })?;
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }
}

// ---------------------------------------------------------------- softmax

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
            let n = *l.dims().last().unwrap_or(&1);
            let mut out = vec![T::from_f64(0.0); x.len()];
            par_blocks(&mut out, n, block_rows(x.len() / n), |r0, dst| {
                for (i, o) in dst.chunks_mut(n).enumerate() {
                    let row = &x[(r0 + i) * n..(r0 + i + 1) * n];
                    let sum = T::exp_store(row, T::max_of(row), o);
                    let inv = T::from_f64(1.0) / sum;
                    o.iter_mut().for_each(|v| *v *= inv);
                }
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
            let n = *l1.dims().last().unwrap_or(&1);
            let mut out = vec![T::from_f64(0.0); p.len()];
            par_blocks(&mut out, n, block_rows(p.len() / n), |r0, dst| {
                for (i, o) in dst.chunks_mut(n).enumerate() {
                    let span = (r0 + i) * n..(r0 + i + 1) * n;
                    let (pr, gr) = (&p[span.clone()], &g[span]);
                    let mut dot = T::from_f64(0.0);
                    for (&p, &g) in pr.iter().zip(gr) {
                        dot += p * g;
                    }
                    for ((o, &p), &g) in o.iter_mut().zip(pr).zip(gr) {
                        *o = p * (g - dot);
                    }
                }
            });
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }
}

// ---------------------------------------------------------------- SwiGLU

/// `silu(gate) ⊙ up`, the Llama MLP's gating.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !fused(gate) || gate.dtype() != up.dtype() || gate.dims() != up.dims() {
        return gate.silu()? * up;
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

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
            let n = *l1.dims().last().unwrap_or(&1);
            let mut out = vec![T::from_f64(0.0); g.len()];
            par_blocks(&mut out, n, block_rows(g.len() / n), |r0, dst| {
                let span = r0 * n..r0 * n + dst.len();
                for ((o, &g), &u) in dst.iter_mut().zip(&g[span.clone()]).zip(&u[span]) {
                    *o = g * sigmoid(g) * u;
                }
            });
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
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwiGluGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
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
            let n = *l1.dims().last().unwrap_or(&1);
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

// ---------------------------------------------------------------- RoPE

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
            let mut out = vec![T::from_f64(0.0); x.len()];
            with_data::<T, _>(&self.cos, "rope", |cos| {
                with_data::<T, _>(&self.sin, "rope", |sin| {
                    par_blocks(&mut out, d, block_rows(x.len() / d), |r0, dst| {
                        for (i, o) in dst.chunks_mut(d).enumerate() {
                            let row = r0 + i;
                            let xr = &x[row * d..(row + 1) * d];
                            let pos = (row % t) * half;
                            let (c, s) = (&cos[pos..pos + half], &sin[pos..pos + half]);
                            let (lo, hi) = o.split_at_mut(half);
                            for j in 0..half {
                                let s = if self.inverse {
                                    T::from_f64(0.0) - s[j]
                                } else {
                                    s[j]
                                };
                                lo[j] = xr[j] * c[j] - xr[j + half] * s;
                                hi[j] = xr[j + half] * c[j] + xr[j] * s;
                            }
                        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn seeded(dims: &[usize], seed: u64) -> Tensor {
        let n: usize = dims.iter().product();
        let data: Vec<f64> = (0..n as u64)
            .map(|i| {
                let h = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xD1B5);
                ((h >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Values and input gradients (under a fixed random projection of the
    /// output) of `fused` and `reference` agree, in f64 and in f32.
    fn agree(
        inputs: &[&[usize]],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            let vars: Vec<Var> = inputs
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    Var::from_tensor(&seeded(d, i as u64).to_dtype(dtype).unwrap()).unwrap()
                })
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let (a, b) = (fused(&ts).unwrap(), reference(&ts).unwrap());
            assert_eq!(a.dims(), b.dims());
            assert!(
                max_diff(&a, &b) < tol,
                "{dtype:?} values differ by {}",
                max_diff(&a, &b)
            );
            let proj = seeded(a.dims(), 99).to_dtype(dtype).unwrap();
            let ga = (a * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (b * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            for t in &ts {
                let (x, y) = (ga.get(t).unwrap(), gb.get(t).unwrap());
                assert!(
                    max_diff(x, y) < tol * 10.0,
                    "{dtype:?} gradients differ by {}",
                    max_diff(x, y)
                );
            }
        }
    }

    #[test]
    fn linear_matches_matmul_and_gives_the_weight_no_gradient() {
        let w = seeded(&[7, 5], 3);
        agree(
            &[&[2, 9, 5]],
            |t| frozen_linear(&t[0], &w.to_dtype(t[0].dtype())?),
            |t| t[0].broadcast_matmul(&w.to_dtype(t[0].dtype())?.t()?),
        );
        let wv = Var::from_tensor(&w).unwrap();
        let x = seeded(&[4, 5], 1);
        let y = frozen_linear(&x, wv.as_tensor()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(wv.as_tensor()).is_none(),
            "the frozen weight gets no gradient"
        );
    }

    #[test]
    fn rms_norm_matches_the_composite_form() {
        let w = seeded(&[33], 5);
        agree(
            &[&[37, 33]],
            |t| rms_norm(&t[0], &w.to_dtype(t[0].dtype())?, 1e-5),
            |t| rms_norm_composite(&t[0], &w.to_dtype(t[0].dtype())?, 1e-5),
        );
    }

    #[test]
    fn softmax_matches_candle() {
        agree(
            &[&[3, 5, 41]],
            |t| softmax_last_dim(&t[0]),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1),
        );
    }

    #[test]
    fn swiglu_matches_silu_times_up() {
        agree(
            &[&[19, 23], &[19, 23]],
            |t| swiglu(&t[0], &t[1]),
            |t| t[0].silu()? * &t[1],
        );
    }

    #[test]
    fn rope_matches_candle_and_its_gradient_is_the_inverse_rotation() {
        let (t, d) = (6, 8);
        let cos = seeded(&[t, d / 2], 7).cos().unwrap();
        let sin = seeded(&[t, d / 2], 7).sin().unwrap();
        agree(
            &[&[2, 3, t, d]],
            |x| {
                rope(
                    &x[0],
                    &cos.to_dtype(x[0].dtype())?,
                    &sin.to_dtype(x[0].dtype())?,
                )
            },
            |x| {
                candle_nn::rotary_emb::rope_slow(
                    &x[0],
                    &cos.to_dtype(x[0].dtype())?,
                    &sin.to_dtype(x[0].dtype())?,
                )
            },
        );
    }
}
