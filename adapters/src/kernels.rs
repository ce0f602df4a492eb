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
        // rhs (k × n): Wᵀ when transposed (W is n × k), else W (k × n).
        let (rhs_cs, rhs_rs) = if self.transposed { (k, 1) } else { (1, n) };
        let threads = candle_core::utils::barrier_pool().n_workers() + 1;
        // Wide outputs (the vocabulary head, the MLP's up projections) split by
        // column blocks, so each thread packs only its share of W; tall ones by rows.
        let by_cols = n >= m;
        let per = if by_cols {
            n.div_ceil(threads).next_multiple_of(16)
        } else {
            m.div_ceil(threads)
        };
        let blocks = if by_cols { n } else { m }.div_ceil(per.max(1));
        let mut out: Vec<T> = Vec::with_capacity(m * n);
        with_data::<T, _>(&self.w, "linear", |w| {
            if k == 0 {
                out.resize(m * n, T::from_f64(0.0));
                return;
            }
            let dst = SharedMut(out.as_mut_ptr());
            let block = |b: usize| {
                let (r0, rows, c0, cols) = if by_cols {
                    (0, m, b * per, per.min(n - b * per))
                } else {
                    (b * per, per.min(m - b * per), 0, n)
                };
                // SAFETY: x is m × k, w holds k · n values laid out by the strides
                // above; block b writes rows r0.. and columns c0.. of the m × n
                // output, disjoint from every other block, inside its capacity.
                unsafe {
                    gemm_into(
                        (rows, cols, k),
                        dst.at(r0 * n + c0),
                        n,
                        false,
                        View::new(x.as_ptr().add(r0 * k), k, 1),
                        View::new(w.as_ptr().add(c0 * rhs_cs), rhs_rs, rhs_cs),
                    )
                }
            };
            if blocks > 1 {
                candle_core::utils::barrier_pool()
                    .execute_chunked(blocks, |range| range.for_each(block));
            } else {
                (0..blocks).for_each(block);
            }
            // SAFETY: the blocks cover every row and column, and gemm without
            // read_dst writes each output element.
            unsafe { out.set_len(m * n) };
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

/// A strided matrix operand: element `(r, c)` is at `ptr + r·rs + c·cs`.
#[derive(Clone, Copy)]
struct View<T> {
    ptr: *const T,
    rs: usize,
    cs: usize,
}

impl<T> View<T> {
    /// The view starting `rows` rows further down.
    fn offset_rows(self, rows: usize) -> Self {
        Self {
            // Only ever moved inside the matrix the view describes.
            ptr: self.ptr.wrapping_add(rows * self.rs),
            ..self
        }
    }

    fn new(ptr: *const T, rs: usize, cs: usize) -> Self {
        Self { ptr, rs, cs }
    }

    /// The transposed view of the same data.
    fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst (m × n, row stride dst_rs) (+)= a (m × k) · b (k × n)` on the calling
/// thread; `accumulate` adds to what `dst` holds.
///
/// # Safety
/// Every pointer must be valid for the extents its shape and strides imply.
unsafe fn gemm_into<T: 'static + WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    a: View<T>,
    b: View<T>,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.ptr,
        a.cs as isize,
        a.rs as isize,
        b.ptr,
        b.cs as isize,
        b.rs as isize,
        T::from_f64(if accumulate { 1.0 } else { 0.0 }),
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

// ---------------------------------------------------------------- LoRA linear

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

/// `x Wᵀ + scale · (x ⊙ mask) Aᵀ Bᵀ` as one op, with gradients for `x`, `A`
/// and `B` (none for the frozen `W`).
pub fn lora_linear(x: &Tensor, w: &Tensor, term: &LowRank) -> Result<Tensor> {
    let LowRank { a, b, scale, mask } = term;
    let simple = fused(x)
        && [w, a, b]
            .iter()
            .all(|t| t.dtype() == x.dtype() && t.rank() == 2)
        && mask.as_ref().is_none_or(|m| m.dims() == x.dims());
    if !simple {
        let xd = match mask {
            Some(m) => (x * m.to_dtype(x.dtype())?)?,
            None => x.clone(),
        };
        let low = xd.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
        return frozen_linear(x, w)? + (low * *scale)?;
    }
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraLinear {
            w: w.contiguous()?,
            scale: *scale,
            mask: mask.as_ref().map(|m| m.contiguous()).transpose()?,
        },
    )
}

struct LoraLinear {
    w: Tensor,
    scale: f64,
    mask: Option<Tensor>,
}

/// `x ⊙ mask`, or `x` itself.
fn masked<'a, T: WithDType>(x: &'a [T], mask: Option<&[T]>) -> std::borrow::Cow<'a, [T]> {
    match mask {
        None => std::borrow::Cow::Borrowed(x),
        Some(m) => std::borrow::Cow::Owned(x.iter().zip(m).map(|(&x, &m)| x * m).collect()),
    }
}

/// `a (m × k) · bᵀ` for `b` `(n × k)`, row-major, on the calling thread.
fn matmul_t<T: WithDType>(a: &[T], b: &[T], (m, k, n): (usize, usize, usize)) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); m * n];
    // SAFETY: a is m × k, b is n × k, out is m × n, all row-major.
    unsafe {
        gemm_into(
            (m, n, k),
            out.as_mut_ptr(),
            n,
            false,
            View::new(a.as_ptr(), k, 1),
            View::new(b.as_ptr(), k, 1).t(),
        )
    }
    out
}

impl LoraLinear {
    fn mask<T: WithDType, R>(&self, f: impl FnOnce(Option<&[T]>) -> R) -> Result<R> {
        match &self.mask {
            None => Ok(f(None)),
            Some(m) => with_data::<T, _>(m, "lora-linear", |m| f(Some(m))),
        }
    }

    fn forward<T: WithDType>(
        &self,
        x: &[T],
        xl: &Layout,
        a: &[T],
        b: &[T],
    ) -> Result<(Vec<T>, Shape)> {
        let (r, k) = (b.len() / self.w.dim(0)?, *xl.dims().last().unwrap_or(&1));
        let m = x.len() / k.max(1);
        let n = self.w.dim(0)?;
        let base = Linear {
            w: self.w.clone(),
            transposed: true,
        };
        let (mut y, shape) = base.run::<T>(x, xl.dims())?;
        let scale = T::from_f64(self.scale);
        let h: Vec<T> = self.mask::<T, _>(|mask| {
            let xd = masked(x, mask);
            matmul_t(&xd, a, (m, k, r))
                .into_iter()
                .map(|v| v * scale)
                .collect()
        })?;
        // y += (scale · h) Bᵀ, row blocks on the pool.
        par_blocks(&mut y, n, block_rows(m), |row, dst| {
            let rows = dst.len() / n.max(1);
            // SAFETY: h rows row.. are rows × r; b is n × r; dst is rows × n.
            unsafe {
                gemm_into(
                    (rows, n, r),
                    dst.as_mut_ptr(),
                    n,
                    true,
                    View::new(h[row * r..].as_ptr(), r, 1),
                    View::new(b.as_ptr(), r, 1).t(),
                )
            }
        });
        Ok((y, shape))
    }

    /// `(dx, dA, dB)` for output gradient `dy`; `dx` is left empty unless
    /// `want_dx` (the first layer's input needs none).
    fn backward<T: WithDType>(
        &self,
        x: &[T],
        dims: &[usize],
        (a, b): (&[T], &[T]),
        dy: &[T],
        want_dx: bool,
    ) -> Result<[Vec<T>; 3]> {
        let n = self.w.dim(0)?;
        let (r, k) = (b.len() / n, *dims.last().unwrap_or(&1));
        let m = x.len() / k.max(1);
        let scale = T::from_f64(self.scale);
        let back = Linear {
            w: self.w.clone(),
            transposed: false,
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank ≥ 1") = n;
        let mut dx = if want_dx {
            back.run::<T>(dy, &out_dims)?.0
        } else {
            Vec::new()
        };
        self.mask::<T, _>(|mask| {
            let xd = masked(x, mask);
            // h = scale · xd Aᵀ (m × r); dh = scale · dy B (m × r).
            let h: Vec<T> = matmul_t(&xd, a, (m, k, r))
                .into_iter()
                .map(|v| v * scale)
                .collect();
            let mut dh = vec![T::from_f64(0.0); m * r];
            // SAFETY (the gemms below): shapes and row-major layouts as named.
            unsafe {
                gemm_into(
                    (m, r, n),
                    dh.as_mut_ptr(),
                    r,
                    false,
                    View::new(dy.as_ptr(), n, 1),
                    View::new(b.as_ptr(), r, 1),
                )
            }
            dh.iter_mut().for_each(|v| *v *= scale);
            // dB = dyᵀ h (n × r); dA = dhᵀ xd (r × k).
            let mut db = vec![T::from_f64(0.0); n * r];
            let mut da = vec![T::from_f64(0.0); r * k];
            unsafe {
                gemm_into(
                    (n, r, m),
                    db.as_mut_ptr(),
                    r,
                    false,
                    View::new(dy.as_ptr(), n, 1).t(),
                    View::new(h.as_ptr(), r, 1),
                );
                gemm_into(
                    (r, k, m),
                    da.as_mut_ptr(),
                    k,
                    false,
                    View::new(dh.as_ptr(), r, 1).t(),
                    View::new(xd.as_ptr(), k, 1),
                );
            }
            if !want_dx {
                return [dx, da, db];
            }
            // dx += (dh A) ⊙ mask, row blocks on the pool.
            par_blocks(&mut dx, k, block_rows(m), |row, dst| {
                let rows = dst.len() / k.max(1);
                let low = {
                    let mut low = vec![T::from_f64(0.0); rows * k];
                    unsafe {
                        gemm_into(
                            (rows, k, r),
                            low.as_mut_ptr(),
                            k,
                            false,
                            View::new(dh[row * r..].as_ptr(), r, 1),
                            View::new(a.as_ptr(), k, 1),
                        )
                    }
                    low
                };
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
        macro_rules! go {
            ($t:ty) => {{
                let [dx, da, db] = with_data::<$t, _>(x, "lora-linear", |xd| {
                    with_data::<$t, _>(a, "lora-linear", |ad| {
                        with_data::<$t, _>(b, "lora-linear", |bd| {
                            with_data::<$t, _>(&grad, "lora-linear", |g| {
                                self.backward(xd, x.dims(), (ad, bd), g, want_dx)
                            })
                        })
                    })
                })?????;
                let dev = x.device();
                (
                    want_dx
                        .then(|| Tensor::from_vec(dx, x.shape(), dev))
                        .transpose()?,
                    Tensor::from_vec(da, a.shape(), dev)?,
                    Tensor::from_vec(db, b.shape(), dev)?,
                )
            }};
        }
        let (dx, da, db) = match x.dtype() {
            DType::F32 => go!(f32),
            DType::F64 => go!(f64),
            other => candle_core::bail!("lora-linear: unsupported dtype {other:?}"),
        };
        Ok((dx, Some(da), Some(db)))
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
                            rotate(
                                xr,
                                o,
                                &cos[pos..pos + half],
                                &sin[pos..pos + half],
                                self.inverse,
                            );
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

/// Rotates one head's `x` (two halves) by the angles whose cosines and sines
/// are `cos` and `sin` (by their negatives when `inverse`) into `out`.
#[inline]
fn rotate<T: WithDType>(x: &[T], out: &mut [T], cos: &[T], sin: &[T], inverse: bool) {
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

// ---------------------------------------------------------------- attention

/// Query rows per causal block: rows `i0..i1` need keys `0..i1` only.
const CAUSAL_BLOCK: usize = 32;

/// The `(i0, i1)` row blocks of a causal `t × t` attention.
fn causal_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(CAUSAL_BLOCK)
        .map(move |i0| (i0, (i0 + CAUSAL_BLOCK).min(t)))
}

/// The shape of a grouped-query attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (dividing `heads`).
    pub kv_heads: usize,
    /// Features per head (even).
    pub head_dim: usize,
}

/// True when [`attention`] takes these tensors (else use composite ops).
pub fn attention_fuses(q: &Tensor) -> bool {
    fused(q)
}

/// Causal grouped-query self-attention with rotary embeddings, as one op.
///
/// `q` `(batch·seq, heads·head_dim)` and `k`, `v` `(batch·seq,
/// kv_heads·head_dim)` are laid out as the projections produce them;
/// `cos`/`sin` are `(seq, head_dim / 2)`; `bias` `(1 or batch, 1,
/// groups·seq, seq)` is the additive causal/padding bias, its rows the query
/// positions of each head in a group in turn. Returns `(batch·seq,
/// heads·head_dim)`, ready for the output projection. Scores, probabilities
/// and the head reshuffles stay inside the op; the probabilities are kept for
/// the backward pass.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    bias: &Tensor,
    dims: AttentionDims,
) -> Result<Tensor> {
    let AttentionDims {
        batch: b,
        seq: t,
        heads: nh,
        kv_heads: nkv,
        head_dim: hd,
    } = dims;
    if !fused(q) || nkv == 0 || nh % nkv != 0 || hd % 2 != 0 {
        candle_core::bail!("attention: unsupported tensors or shape {dims:?}")
    }
    let g = nh / nkv;
    let want = |x: &Tensor, d: &[usize], name: &str| -> Result<()> {
        if x.dims() != d || x.dtype() != q.dtype() {
            candle_core::bail!(
                "attention: {name} is {:?} {:?}, expected {d:?} {:?}",
                x.dims(),
                x.dtype(),
                q.dtype()
            )
        }
        Ok(())
    };
    want(q, &[b * t, nh * hd], "q")?;
    want(k, &[b * t, nkv * hd], "k")?;
    want(v, &[b * t, nkv * hd], "v")?;
    want(cos, &[t, hd / 2], "cos")?;
    want(sin, &[t, hd / 2], "sin")?;
    let mb = bias.dim(0)?;
    if !(mb == 1 || mb == b) {
        candle_core::bail!("attention: bias batch {mb} is neither 1 nor {b}")
    }
    want(bias, &[mb, 1, g * t, t], "bias")?;
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention {
            dims,
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            bias: bias.contiguous()?,
            saved: Mutex::new(None),
        },
    )
}

struct Attention {
    dims: AttentionDims,
    cos: Tensor,
    sin: Tensor,
    bias: Tensor,
    /// Rotated queries `(b, heads, t, hd)`, rotated keys `(b, kv_heads, t, hd)`
    /// and probabilities `(b, kv_heads, groups·t, t)` from the forward pass.
    saved: Mutex<Option<[CpuStorage; 3]>>,
}

impl Attention {
    fn forward<T: Real>(&self, q: &[T], k: &[T], v: &[T]) -> Result<(Vec<T>, [CpuStorage; 3])> {
        let AttentionDims {
            batch: b,
            seq: t,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        } = self.dims;
        let (g, half, qw, kw) = (nh / nkv, hd / 2, nh * hd, nkv * hd);
        let scale = T::from_f64(1.0 / (hd as f64).sqrt());
        let zero = T::from_f64(0.0);
        let mut qr = vec![zero; b * nh * t * hd];
        let mut kr = vec![zero; b * nkv * t * hd];
        let mut p = vec![zero; b * nkv * g * t * t];
        let mut y = vec![zero; b * t * qw];
        with_data::<T, _>(&self.cos, "attention", |cos| {
            with_data::<T, _>(&self.sin, "attention", |sin| {
                // Rotate into head-major buffers: row (batch, head, position).
                for (src, dst, heads, width) in [(q, &mut qr, nh, qw), (k, &mut kr, nkv, kw)] {
                    par_blocks(dst, hd, block_rows(b * heads * t), |r0, out| {
                        for (i, o) in out.chunks_mut(hd).enumerate() {
                            let r = r0 + i;
                            let (bi, h, pos) = (r / (heads * t), (r / t) % heads, r % t);
                            let x = &src[(bi * t + pos) * width + h * hd..][..hd];
                            let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                            rotate(x, o, c, s, false);
                        }
                    });
                }
            })
        })??;
        let yp = SharedMut(y.as_mut_ptr());
        with_data::<T, _>(&self.bias, "attention", |bias| {
            let mb = self.bias.dims()[0];
            // One block per (sequence, kv head): its g·t × t probabilities.
            par_blocks(&mut p, g * t * t, 1, |item, probs| {
                let (bi, kv) = (item / nkv, item % nkv);
                let qg = &qr[(bi * nh + kv * g) * t * hd..][..g * t * hd];
                let kg = &kr[(bi * nkv + kv) * t * hd..][..t * hd];
                let bias = &bias[if mb == 1 { 0 } else { bi } * g * t * t..][..g * t * t];
                let vg = View::new(v[bi * t * kw + kv * hd..].as_ptr(), kw, 1);
                let mut row = vec![zero; t];
                for hh in 0..g {
                    let h = kv * g + hh;
                    // Causal: query rows i0..i1 attend keys 0..i1 only; the rest of
                    // their probabilities stay zero.
                    for (i0, i1) in causal_blocks(t) {
                        let r0 = hh * t + i0;
                        // SAFETY: qg is g·t × hd and kg is t × hd, row-major; probs is
                        // g·t × t; v's rows for this sequence start at (bi·t)·kw, head kv
                        // at column kv·hd; the output block (rows of sequence bi,
                        // columns of head h) belongs to this item alone.
                        unsafe {
                            gemm_into(
                                (i1 - i0, i1, hd),
                                probs.as_mut_ptr().add(r0 * t),
                                t,
                                false,
                                View::new(qg.as_ptr().add(r0 * hd), hd, 1),
                                View::new(kg.as_ptr(), hd, 1).t(),
                            )
                        }
                        for r in r0..r0 + (i1 - i0) {
                            let pr = &mut probs[r * t..r * t + i1];
                            let row = &mut row[..i1];
                            for ((x, &s), &bb) in row.iter_mut().zip(pr.iter()).zip(&bias[r * t..])
                            {
                                *x = s * scale + bb;
                            }
                            let sum = T::exp_store(row, T::max_of(row), pr);
                            let inv = T::from_f64(1.0) / sum;
                            pr.iter_mut().for_each(|x| *x *= inv);
                        }
                        unsafe {
                            gemm_into(
                                (i1 - i0, hd, i1),
                                yp.at((bi * t + i0) * qw + h * hd),
                                qw,
                                false,
                                View::new(probs.as_ptr().add(r0 * t), t, 1),
                                vg,
                            )
                        }
                    }
                }
            });
        })?;
        let saved = [
            T::to_cpu_storage_owned(qr),
            T::to_cpu_storage_owned(kr),
            T::to_cpu_storage_owned(p),
        ];
        Ok((y, saved))
    }

    fn backward<T: Real>(
        &self,
        v: &[T],
        dy: &[T],
        [qr, kr, p]: &[CpuStorage; 3],
    ) -> Result<[Vec<T>; 3]> {
        let AttentionDims {
            batch: b,
            seq: t,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        } = self.dims;
        let (g, half, qw, kw) = (nh / nkv, hd / 2, nh * hd, nkv * hd);
        let scale = T::from_f64(1.0 / (hd as f64).sqrt());
        let zero = T::from_f64(0.0);
        let (qr, kr, p) = (
            T::cpu_storage_as_slice(qr)?,
            T::cpu_storage_as_slice(kr)?,
            T::cpu_storage_as_slice(p)?,
        );
        let mut dq = vec![zero; b * t * qw];
        let mut dk = vec![zero; b * t * kw];
        let mut dv = vec![zero; b * t * kw];
        let (dqp, dkp, dvp) = (
            SharedMut(dq.as_mut_ptr()),
            SharedMut(dk.as_mut_ptr()),
            SharedMut(dv.as_mut_ptr()),
        );
        with_data::<T, _>(&self.cos, "attention", |cos| {
            with_data::<T, _>(&self.sin, "attention", |sin| {
                let pool = candle_core::utils::barrier_pool();
                pool.execute_chunked(b * nkv, |items| {
                    let mut ds = vec![zero; t * t];
                    let mut dqh = vec![zero; t * hd];
                    let mut dkg = vec![zero; t * hd];
                    for item in items {
                        let (bi, kv) = (item / nkv, item % nkv);
                        let kg = &kr[(bi * nkv + kv) * t * hd..][..t * hd];
                        let vg = View::new(v[bi * t * kw + kv * hd..].as_ptr(), kw, 1);
                        dkg.fill(zero);
                        for hh in 0..g {
                            let h = kv * g + hh;
                            let ph = &p[((bi * nkv + kv) * g + hh) * t * t..][..t * t];
                            let qh = &qr[(bi * nh + h) * t * hd..][..t * hd];
                            let dyh = View::new(dy[bi * t * qw + h * hd..].as_ptr(), qw, 1);
                            // Causal blocks as in the forward pass: rows i0..i1 see keys 0..i1.
                            for (i0, i1) in causal_blocks(t) {
                                let (rows, dyb) = (i1 - i0, dyh.offset_rows(i0));
                                let pb = View::new(ph[i0 * t..].as_ptr(), t, 1);
                                // SAFETY (all gemms below): views and outputs are in bounds
                                // by the layouts above; dv/dk/dq blocks of (bi, kv) belong
                                // to this item alone.
                                unsafe {
                                    // dP = dY · Vᵀ
                                    gemm_into(
                                        (rows, i1, hd),
                                        ds.as_mut_ptr(),
                                        t,
                                        false,
                                        dyb,
                                        vg.t(),
                                    );
                                    // dV += Pᵀ · dY
                                    gemm_into(
                                        (i1, hd, rows),
                                        dvp.at(bi * t * kw + kv * hd),
                                        kw,
                                        true,
                                        pb.t(),
                                        dyb,
                                    );
                                }
                                // dS = P ⊙ (dP − ⟨dP, P⟩) · scale
                                for (dr, pr) in
                                    ds.chunks_mut(t).zip(ph[i0 * t..].chunks(t)).take(rows)
                                {
                                    let (dr, pr) = (&mut dr[..i1], &pr[..i1]);
                                    let mut dot = zero;
                                    for (&d, &p) in dr.iter().zip(pr) {
                                        dot += d * p;
                                    }
                                    for (d, &p) in dr.iter_mut().zip(pr) {
                                        *d = p * (*d - dot) * scale;
                                    }
                                }
                                let dsv = View::new(ds.as_ptr(), t, 1);
                                unsafe {
                                    // dQ = dS · K
                                    gemm_into(
                                        (rows, hd, i1),
                                        dqh.as_mut_ptr().add(i0 * hd),
                                        hd,
                                        false,
                                        dsv,
                                        View::new(kg.as_ptr(), hd, 1),
                                    );
                                    // dK += dSᵀ · Q
                                    gemm_into(
                                        (i1, hd, rows),
                                        dkg.as_mut_ptr(),
                                        hd,
                                        true,
                                        dsv.t(),
                                        View::new(qh[i0 * hd..].as_ptr(), hd, 1),
                                    );
                                }
                            }
                            for (pos, row) in dqh.chunks(hd).enumerate() {
                                // SAFETY: row (bi·t + pos), columns of head h, owned by this item.
                                let out = unsafe {
                                    std::slice::from_raw_parts_mut(
                                        dqp.at((bi * t + pos) * qw + h * hd),
                                        hd,
                                    )
                                };
                                let (c, s) =
                                    (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                                rotate(row, out, c, s, true);
                            }
                        }
                        for (pos, row) in dkg.chunks(hd).enumerate() {
                            // SAFETY: row (bi·t + pos), columns of kv head kv, owned by this item.
                            let out = unsafe {
                                std::slice::from_raw_parts_mut(
                                    dkp.at((bi * t + pos) * kw + kv * hd),
                                    hd,
                                )
                            };
                            let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                            rotate(row, out, c, s, true);
                        }
                    }
                });
            })
        })??;
        Ok([dq, dk, dv])
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
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
        by_dtype!(s1, "attention", |T| {
            let (y, saved) = self.forward::<T>(
                data(s1, l1, "attention")?,
                data(s2, l2, "attention")?,
                data(s3, l3, "attention")?,
            )?;
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
            Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(saved) = saved.as_ref() else {
            candle_core::bail!("attention: backward before forward")
        };
        let dev = q.device();
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => {
                let [dq, dk, dv] = with_data::<f32, _>(v, "attention", |vd| {
                    with_data::<f32, _>(&grad, "attention", |g| self.backward(vd, g, saved))
                })???;
                (
                    Tensor::from_vec(dq, q.shape(), dev)?,
                    Tensor::from_vec(dk, k.shape(), dev)?,
                    Tensor::from_vec(dv, v.shape(), dev)?,
                )
            }
            DType::F64 => {
                let [dq, dk, dv] = with_data::<f64, _>(v, "attention", |vd| {
                    with_data::<f64, _>(&grad, "attention", |g| self.backward(vd, g, saved))
                })???;
                (
                    Tensor::from_vec(dq, q.shape(), dev)?,
                    Tensor::from_vec(dk, k.shape(), dev)?,
                    Tensor::from_vec(dv, v.shape(), dev)?,
                )
            }
            other => candle_core::bail!("attention: unsupported dtype {other:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
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

    #[test]
    fn attention_matches_the_composite_path_with_gqa_and_padding() {
        // 5 positions fit one causal block; 70 need three, the last one ragged.
        for t in [5, 70] {
            attention_case(t);
        }
    }

    fn attention_case(t: usize) {
        let (b, nh, nkv, hd) = (2, 6, 2, 4);
        let dims = AttentionDims {
            batch: b,
            seq: t,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        };
        let g = nh / nkv;
        let cos = seeded(&[t, hd / 2], 7).cos().unwrap();
        let sin = seeded(&[t, hd / 2], 7).sin().unwrap();
        // Causal, and the second sequence's last two keys are padding.
        let bias: Vec<f64> = (0..b * g * t * t)
            .map(|idx| {
                let (bi, row, j) = (idx / (g * t * t), (idx / t) % (g * t), idx % t);
                let masked = j > row % t || (bi == 1 && j >= t - 2);
                if masked {
                    -1e9
                } else {
                    0.0
                }
            })
            .collect();
        let bias = Tensor::from_vec(bias, (b, 1, g * t, t), &Device::Cpu).unwrap();
        let cast = |x: &Tensor, like: &Tensor| x.to_dtype(like.dtype());
        agree(
            &[&[b * t, nh * hd], &[b * t, nkv * hd], &[b * t, nkv * hd]],
            |x| {
                let c = |y: &Tensor| cast(y, &x[0]);
                attention(&x[0], &x[1], &x[2], &c(&cos)?, &c(&sin)?, &c(&bias)?, dims)
            },
            |x| {
                let c = |y: &Tensor| cast(y, &x[0]);
                let heads = |y: &Tensor, n: usize| -> Result<Tensor> {
                    y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
                };
                let q = candle_nn::rotary_emb::rope_slow(&heads(&x[0], nh)?, &c(&cos)?, &c(&sin)?)?;
                let k =
                    candle_nn::rotary_emb::rope_slow(&heads(&x[1], nkv)?, &c(&cos)?, &c(&sin)?)?;
                let v = heads(&x[2], nkv)?;
                let q = q.reshape((b, nkv, g * t, hd))?;
                let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
                let probs = candle_nn::ops::softmax(&scores.broadcast_add(&c(&bias)?)?, D::Minus1)?;
                probs
                    .matmul(&v)?
                    .reshape((b, nh, t, hd))?
                    .transpose(1, 2)?
                    .reshape((b * t, nh * hd))
            },
        );
    }

    #[test]
    fn lora_linear_matches_the_composite_form_with_and_without_dropout() {
        let (m, k, n, r) = (11, 7, 9, 3);
        let w = seeded(&[n, k], 21);
        let keep: Vec<f64> = (0..m * k)
            .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
            .collect();
        let keep = Tensor::from_vec(keep, (m, k), &Device::Cpu).unwrap();
        for mask in [None, Some(keep)] {
            let term = |t: &[Tensor]| -> Result<LowRank> {
                Ok(LowRank {
                    a: t[1].clone(),
                    b: t[2].clone(),
                    scale: 2.0,
                    mask: mask
                        .as_ref()
                        .map(|m| m.to_dtype(t[0].dtype()))
                        .transpose()?,
                })
            };
            agree(
                &[&[m, k], &[r, k], &[n, r]],
                |t| lora_linear(&t[0], &w.to_dtype(t[0].dtype())?, &term(t)?),
                |t| {
                    let xd = match &mask {
                        Some(mk) => (&t[0] * mk.to_dtype(t[0].dtype())?)?,
                        None => t[0].clone(),
                    };
                    let base = t[0].matmul(&w.to_dtype(t[0].dtype())?.t()?)?;
                    base + (xd.matmul(&t[1].t()?)?.matmul(&t[2].t()?)? * 2.0)?
                },
            );
        }
    }
}
