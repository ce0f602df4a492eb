//! What the fused ops share: the element types, access to candle's CPU
//! storage, the worker pool, and the skeleton of a row-wise op (each output
//! row computed from the same row of the inputs).

use std::cell::Cell;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard, OnceLock};

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, WithDType};

use crate::simd;

/// Element types the fused kernels support.
pub trait Real: WithDType {
    /// `e^x`.
    fn exp_(self) -> Self;
    /// Writes `e^(x − shift)` of each `x` in `row` to `out`; returns the sum.
    fn exp_store(row: &[Self], shift: Self, out: &mut [Self]) -> Self;
    /// Largest value of `row`.
    fn max_of(row: &[Self]) -> Self;
    /// `out[i·c + j] = x_i · w_j` over the `k`-long rows of `x` and `w`.
    fn dots(x: &[Self], w: &[Self], k: usize, out: &mut [Self]);
    /// `x (m × k) · B (k × n)` for a weight stored narrower than `x` (bf16,
    /// or int8 blocks) (`B = Wᵀ` when `transposed`), or `None` when this
    /// type does not multiply with such weights.
    fn bf16_product(
        x: &[Self],
        w: &impl super::bf16::Stored,
        transposed: bool,
        mkn: (usize, usize, usize),
    ) -> Option<Vec<Self>>;
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
    fn dots(x: &[Self], w: &[Self], k: usize, out: &mut [Self]) {
        simd::dots(x, w, k, out)
    }
    fn bf16_product(
        x: &[Self],
        w: &impl super::bf16::Stored,
        transposed: bool,
        mkn: (usize, usize, usize),
    ) -> Option<Vec<Self>> {
        Some(super::bf16::product(x, w, transposed, mkn))
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
    fn dots(x: &[Self], w: &[Self], k: usize, out: &mut [Self]) {
        let c = w.len().checked_div(k).unwrap_or(0);
        for (j, wj) in w.chunks_exact(k.max(1)).take(c).enumerate() {
            for (i, xi) in x.chunks_exact(k.max(1)).enumerate() {
                out[i * c + j] = xi.iter().zip(wj).map(|(p, q)| p * q).sum();
            }
        }
    }
    fn bf16_product(
        _: &[Self],
        _: &impl super::bf16::Stored,
        _: bool,
        _: (usize, usize, usize),
    ) -> Option<Vec<Self>> {
        None
    }
}

/// True when the fused kernels can take `t`.
pub(super) fn fused(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64) && !composite_forced()
}

thread_local! {
    static COMPOSITE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the fused CPU kernels are off and every op takes its composite
/// candle form, as on a GPU: `FEDTUNE_KERNELS=composite` for the whole
/// process, or inside [`composite_only`] on this thread.
pub fn composite_forced() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    COMPOSITE.with(Cell::get)
        || *ENV.get_or_init(|| kernels_setting(std::env::var("FEDTUNE_KERNELS").ok()))
}

/// `FEDTUNE_KERNELS`: `composite` turns the fused kernels off; `fused` (or
/// nothing) leaves them on; anything else is said and ignored.
pub(super) fn kernels_setting(value: Option<String>) -> bool {
    match value.as_deref().map(str::trim) {
        Some("composite") => true,
        None | Some("" | "fused") => false,
        Some(other) => {
            tracing::warn!("FEDTUNE_KERNELS={other:?} is neither \"composite\" nor \"fused\"; the fused kernels stay on");
            false
        }
    }
}

/// Runs `f` with every op on this thread in its composite candle form —
/// the math a GPU runs — so the two can be compared on the CPU.
pub fn composite_only<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            COMPOSITE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(COMPOSITE.with(|c| c.replace(true)));
    f()
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

/// Runs `block(b)` for each `b` in `0..blocks` on candle's CPU worker pool
/// (a single block on the calling thread).
pub(super) fn on_pool(blocks: usize, block: impl Fn(usize) + Sync) {
    if blocks > 1 {
        candle_core::utils::barrier_pool().execute_chunked(blocks, |range| range.for_each(&block));
    } else {
        (0..blocks).for_each(block);
    }
}

/// Threads of candle's CPU worker pool, the caller's included.
pub(super) fn pool_threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Rows per block so that the pool's threads each get a few blocks.
pub(super) fn block_rows(rows: usize) -> usize {
    rows.div_ceil(pool_threads() * 4).max(1)
}

/// Row-wise: `len` values in rows of `width`, row `r` written by `f(r, row)`
/// on the worker pool.
pub(super) fn map_rows<T: WithDType>(
    len: usize,
    width: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let width = width.max(1);
    let mut out = vec![T::from_f64(0.0); len];
    par_blocks(&mut out, width, block_rows(len / width), |r0, dst| {
        for (i, row) in dst.chunks_mut(width).enumerate() {
            f(r0 + i, row);
        }
    });
    out
}

/// The values of row `r` (of `width`) in `x`.
pub(super) fn row<T>(x: &[T], r: usize, width: usize) -> &[T] {
    &x[r * width..(r + 1) * width]
}

/// The width of a layout's last dimension.
pub(super) fn last_dim(l: &Layout) -> usize {
    *l.dims().last().unwrap_or(&1)
}

/// The contiguous data of a CPU storage.
pub(super) fn data<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous input"),
    }
}

/// Calls `f` with a captured tensor's contiguous CPU data.
pub(super) fn with_data<T: WithDType, R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{op}: a captured tensor left the CPU")
    };
    Ok(f(data::<T>(cpu, layout, op)?))
}

/// Runs `$body` with the type alias `$t` set to the storage's element type
/// (f32 or f64; anything else is an error naming `$op`).
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
pub(super) use by_dtype;
