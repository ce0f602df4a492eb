//! Matrix products for the fused kernels: the one place that calls the
//! `gemm` crate, and so the one place with `unsafe` for it.
//!
//! `gemm` takes raw pointers and strides and trusts them. The kernels never
//! do: they describe operands as [`Mat`] (a slice with a shape and strides)
//! and outputs as [`MatMut`], and [`gemm`] checks that the shapes agree and
//! that every element an operand's shape and strides reach lies inside its
//! slice — out of bounds is a panic, as slice indexing is, never a wild read
//! or write.
//!
//! The pool threads of one op write disjoint blocks of one output (column
//! blocks of a wide projection, one attention head's columns). Rust's `&mut`
//! cannot hand out interleaved blocks, so [`Shared`] does, at run time: each
//! [`Shared::block`] claims a rectangle, a claim that overlaps a live one
//! panics, and a claim ends when its block is dropped. An output that starts
//! uninitialized ([`Shared::uninit`]) keeps every claim and is handed back by
//! [`Shared::into_vec`] only when its claims cover it exactly, each written
//! whole — so no element is read before it is written.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Mutex;

use candle_core::WithDType;

use crate::simd::{simd_path, SimdPath};

/// A matrix operand: `rows × cols`, element `(r, c)` at `data[r·rs + c·cs]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// `data` as a row-major `rows × cols` matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// `rows × cols` with rows `rs` elements apart (a column block of a wider matrix).
    pub fn strided(data: &'a [T], rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The transposed matrix, over the same data.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Rows `r` of this matrix.
    pub fn rows(self, r: Range<usize>) -> Self {
        assert!(
            r.start <= r.end && r.end <= self.rows,
            "rows {r:?} of {}",
            self.rows
        );
        Self {
            data: &self.data[(r.start * self.rs).min(self.data.len())..],
            rows: r.end - r.start,
            ..self
        }
    }

    /// Columns `c` of this matrix.
    pub fn cols(self, c: Range<usize>) -> Self {
        assert!(
            c.start <= c.end && c.end <= self.cols,
            "columns {c:?} of {}",
            self.cols
        );
        Self {
            data: &self.data[(c.start * self.cs).min(self.data.len())..],
            cols: c.end - c.start,
            ..self
        }
    }

    /// Panics unless every element the shape reaches is inside the slice.
    fn check(&self, what: &str) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
        assert!(
            last < self.data.len(),
            "gemm: {what} {}×{} (strides {}, {}) reaches element {last} of {}",
            self.rows,
            self.cols,
            self.rs,
            self.cs,
            self.data.len()
        );
    }
}

/// A matrix to write: `rows × cols`, row-major with rows `rs` elements apart.
pub(crate) struct MatMut<'a, T> {
    ptr: *mut T,
    rows: usize,
    cols: usize,
    rs: usize,
    /// Whether every element holds a value (an uninitialized block may only be overwritten).
    initialized: bool,
    /// The block's claim on a [`Shared`] output, if it is one.
    claim: Option<Claim<'a>>,
    _borrow: PhantomData<&'a mut [T]>,
}

impl<'a, T> MatMut<'a, T> {
    /// `data` as a row-major `rows × cols` matrix.
    pub fn new(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        assert!(
            rows * cols <= data.len(),
            "gemm: a {rows}×{cols} output in {} elements",
            data.len()
        );
        Self {
            ptr: data.as_mut_ptr(),
            rows,
            cols,
            rs: cols,
            initialized: true,
            claim: None,
            _borrow: PhantomData,
        }
    }

    /// Columns `c` of this block.
    pub fn cols(self, c: Range<usize>) -> Self {
        assert!(
            c.start <= c.end && c.end <= self.cols,
            "columns {c:?} of {}",
            self.cols
        );
        Self {
            // Inside the block: c.start ≤ cols, and an empty block is never written through.
            ptr: self.ptr.wrapping_add(c.start),
            cols: c.end - c.start,
            ..self
        }
    }

    /// Row `r`, to write directly (only of an initialized block).
    pub fn row(&mut self, r: usize) -> &mut [T] {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        assert!(self.initialized, "a row of an uninitialized block");
        // SAFETY: row r of this block lies inside the memory the block was
        // made from (checked at construction), which this block borrows
        // exclusively (a slice's &mut, or a claim no live claim overlaps).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r * self.rs), self.cols) }
    }
}

/// `dst (+)= a · b`: `accumulate` adds to what `dst` holds. On the calling
/// thread; panics if the shapes disagree or an operand reaches outside its slice.
pub(crate) fn gemm<T: WithDType>(
    dst: &mut MatMut<'_, T>,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    accumulate: bool,
) {
    assert!(
        a.rows == dst.rows && b.cols == dst.cols && a.cols == b.rows,
        "gemm: ({}×{}) · ({}×{}) into {}×{}",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        dst.rows,
        dst.cols
    );
    assert!(
        dst.initialized || !accumulate,
        "gemm: accumulating into an uninitialized block"
    );
    a.check("lhs");
    b.check("rhs");
    if dst.rows == 0 || dst.cols == 0 {
        return;
    }
    // SAFETY: dst's rows × cols block lies in memory it borrows exclusively
    // (a `MatMut`), a and b reach only elements inside their
    // slices (checked above); the shapes agree (asserted above).
    unsafe {
        let (lhs, rhs) = (a.data.as_ptr(), b.data.as_ptr());
        let alpha = if accumulate { 1.0 } else { 0.0 };
        let path = simd_path();
        match T::DTYPE {
            // f32 and f64 run on the path chosen at run time; the pointers
            // are of that very type (T::DTYPE says so).
            candle_core::DType::F32 if path != SimdPath::Auto => gemm_on::<f32>(
                path,
                (dst.rows, dst.cols, a.cols),
                (dst.ptr.cast(), dst.rs as isize, accumulate),
                (lhs.cast(), a.cs as isize, a.rs as isize),
                (rhs.cast(), b.cs as isize, b.rs as isize),
                alpha as f32,
            ),
            candle_core::DType::F64 if path != SimdPath::Auto => gemm_on::<f64>(
                path,
                (dst.rows, dst.cols, a.cols),
                (dst.ptr.cast(), dst.rs as isize, accumulate),
                (lhs.cast(), a.cs as isize, a.rs as isize),
                (rhs.cast(), b.cs as isize, b.rs as isize),
                alpha,
            ),
            _ => gemm::gemm(
                dst.rows,
                dst.cols,
                a.cols,
                dst.ptr,
                1,
                dst.rs as isize,
                accumulate,
                lhs,
                a.cs as isize,
                a.rs as isize,
                rhs,
                b.cs as isize,
                b.rs as isize,
                T::from_f64(alpha),
                T::from_f64(1.0),
                false,
                false,
                false,
                gemm::Parallelism::None,
            ),
        }
    }
    if !dst.initialized {
        // Every element of the block now holds a value.
        dst.initialized = true;
        if let Some(claim) = &dst.claim {
            claim.lock().written += dst.rows * dst.cols;
        }
    }
}

/// One element type's kernels on each path.
trait PathKernels: Copy + 'static {
    /// `dst = alpha·dst + a·b` on `path` (see [`gemm_on`]).
    ///
    /// # Safety
    /// As `gemm_on`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        path: SimdPath,
        mnk: (usize, usize, usize),
        dst: (*mut Self, isize, isize, bool),
        lhs: (*const Self, isize, isize),
        rhs: (*const Self, isize, isize),
        alpha: Self,
    );
}

/// Calls `gemm_common`'s driver with one path's microkernels for one type.
macro_rules! path_kernels {
    ($ty:ident, $krate:ident, $mult:expr) => {
        impl PathKernels for $ty {
            unsafe fn run(
                path: SimdPath,
                (m, n, k): (usize, usize, usize),
                (dst, dst_cs, dst_rs, read_dst): (*mut $ty, isize, isize, bool),
                (lhs, lhs_cs, lhs_rs): (*const $ty, isize, isize),
                (rhs, rhs_cs, rhs_rs): (*const $ty, isize, isize),
                alpha: $ty,
            ) {
                macro_rules! on {
                    ($simd:expr, $module:ident, $n:expr) => {{
                        use $krate::microkernel::$module::$ty as uk;
                        gemm_common::gemm::gemm_basic_generic::<
                            _,
                            $ty,
                            { $n },
                            { uk::MR_DIV_N * $n },
                            { uk::NR },
                            { uk::MR_DIV_N },
                            { uk::H_M },
                            { uk::H_N },
                        >(
                            $simd,
                            m,
                            n,
                            k,
                            dst,
                            dst_cs,
                            dst_rs,
                            read_dst,
                            lhs,
                            lhs_cs,
                            lhs_rs,
                            rhs,
                            rhs_cs,
                            rhs_rs,
                            alpha,
                            1.0,
                            false,
                            false,
                            false,
                            |a, b, c| a * b + c,
                            &uk::UKR,
                            &uk::H_UKR,
                            false,
                            gemm_common::Parallelism::None,
                        )
                    }};
                }
                match path {
                    #[cfg(target_arch = "x86_64")]
                    SimdPath::Avx512 => match gemm_common::simd::V4::try_new() {
                        Some(simd) => on!(simd, avx512f, 8 * $mult),
                        None => unreachable!("avx512f was detected"),
                    },
                    #[cfg(target_arch = "x86_64")]
                    SimdPath::Avx2 => match gemm_common::simd::V3::try_new() {
                        Some(simd) => on!(simd, fma, 4 * $mult),
                        None => unreachable!("avx2 and fma were detected"),
                    },
                    _ => on!(gemm_common::simd::Scalar, scalar, 1),
                }
            }
        }
    };
}

// The vector widths are gemm's own (`gemm_def!(f32, 2)`, `gemm_def!(f64, 1)`).
path_kernels!(f32, gemm_f32, 2);
path_kernels!(f64, gemm_f64, 1);

/// `dst = alpha·dst + lhs·rhs` (`m × n`, inner `k`; `dst` column stride 1)
/// with `path`'s microkernels.
///
/// As `gemm::gemm` does before it dispatches, a row-major destination is
/// computed as the transposed product (`dstᵀ = rhsᵀ·lhsᵀ`): the
/// microkernels write columns, and the vocabulary head runs at half speed
/// without it.
///
/// # Safety
/// As `gemm::gemm`: every element the shapes and strides reach lies in
/// live memory, `dst`'s exclusively borrowed; `path` is one the CPU has.
unsafe fn gemm_on<E: PathKernels>(
    path: SimdPath,
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, read_dst): (*mut E, isize, bool),
    lhs: (*const E, isize, isize),
    rhs: (*const E, isize, isize),
    alpha: E,
) {
    // SAFETY: passed on from the caller; the transposed call reaches the
    // same elements.
    unsafe {
        if dst_rs > 1 {
            let ((l, l_cs, l_rs), (r, r_cs, r_rs)) = (lhs, rhs);
            E::run(
                path,
                (n, m, k),
                (dst, dst_rs, 1, read_dst),
                (r, r_rs, r_cs),
                (l, l_rs, l_cs),
                alpha,
            )
        } else {
            E::run(path, (m, n, k), (dst, 1, dst_rs, read_dst), lhs, rhs, alpha)
        }
    }
}

/// `a (m × k) · bᵀ` for `b` `(n × k)`, both row-major, as a new row-major `m × n`.
pub(crate) fn matmul_t<T: WithDType>(a: &[T], b: &[T], (m, k, n): (usize, usize, usize)) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); m * n];
    gemm(
        &mut MatMut::new(&mut out, m, n),
        Mat::new(a, m, k),
        Mat::new(b, n, k).t(),
        false,
    );
    out
}

/// A claimed rectangle of a [`Shared`] output.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rect {
    rows: (usize, usize),
    cols: (usize, usize),
}

impl Rect {
    fn overlaps(&self, o: &Rect) -> bool {
        self.rows.0 < o.rows.1
            && o.rows.0 < self.rows.1
            && self.cols.0 < o.cols.1
            && o.cols.0 < self.cols.1
    }
}

#[derive(Debug, Default)]
struct Claims {
    live: Vec<Rect>,
    /// Elements written whole through blocks of an uninitialized output.
    written: usize,
}

/// A block's claim on its rectangle of a [`Shared`] output; a zeroed
/// output's claim ends when the block is dropped.
struct Claim<'a> {
    claims: &'a Mutex<Claims>,
    rect: Rect,
    /// Kept for good (an uninitialized output's).
    keep: bool,
}

impl Claim<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.claims.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let rect = self.rect;
        let mut claims = self.lock();
        if let Some(i) = claims.live.iter().position(|o| *o == rect) {
            claims.live.swap_remove(i);
        }
    }
}

/// An output matrix whose disjoint blocks pool threads write at once.
pub(crate) struct Shared<T> {
    buf: Vec<T>,
    /// The buffer's start, taken once: blocks write through it.
    ptr: *mut T,
    rows: usize,
    cols: usize,
    /// Starts uninitialized: claims are kept for good, and must cover it.
    uninit: bool,
    claims: Mutex<Claims>,
}

// SAFETY: blocks handed to threads never overlap while alive (checked under
// the mutex), so concurrent writes through them touch distinct elements.
unsafe impl<T: Send> Sync for Shared<T> {}
// SAFETY: the pointer is into the buffer this value owns.
unsafe impl<T: Send> Send for Shared<T> {}

impl<T: WithDType> Shared<T> {
    fn with(mut buf: Vec<T>, rows: usize, cols: usize, uninit: bool) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            buf,
            rows,
            cols,
            uninit,
            claims: Mutex::new(Claims::default()),
        }
    }

    /// A `rows × cols` output of zeros.
    pub fn zeroed(rows: usize, cols: usize) -> Self {
        Self::with(vec![T::from_f64(0.0); rows * cols], rows, cols, false)
    }

    /// A `rows × cols` output whose blocks must each be written whole, and
    /// together cover it, before [`Self::into_vec`] hands it back.
    pub fn uninit(rows: usize, cols: usize) -> Self {
        Self::with(Vec::with_capacity(rows * cols), rows, cols, true)
    }

    /// The block of rows `r` and columns `c`; panics if it leaves the
    /// matrix or overlaps a block still alive (or, uninitialized, any block).
    pub fn block(&self, r: Range<usize>, c: Range<usize>) -> MatMut<'_, T> {
        assert!(
            r.start <= r.end && r.end <= self.rows && c.start <= c.end && c.end <= self.cols,
            "block rows {r:?} columns {c:?} of a {}×{} output",
            self.rows,
            self.cols
        );
        let rect = Rect {
            rows: (r.start, r.end),
            cols: (c.start, c.end),
        };
        let empty = r.is_empty() || c.is_empty();
        {
            let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(other) = claims.live.iter().find(|o| o.overlaps(&rect)) {
                panic!("block {rect:?} overlaps block {other:?} of the same output");
            }
            if !empty {
                claims.live.push(rect);
            }
        }
        MatMut {
            // An empty block is never written through; a non-empty one
            // starts inside the rows · cols elements of the buffer.
            ptr: self.ptr.wrapping_add(r.start * self.cols + c.start),
            rows: r.end - r.start,
            cols: c.end - c.start,
            rs: self.cols,
            initialized: !self.uninit,
            claim: (!empty).then_some(Claim {
                claims: &self.claims,
                rect,
                keep: self.uninit,
            }),
            _borrow: PhantomData,
        }
    }

    /// The output, once every element holds a value.
    pub fn into_vec(self) -> Vec<T> {
        let Self {
            mut buf,
            rows,
            cols,
            uninit,
            claims,
            ..
        } = self;
        if uninit {
            let claims = claims.into_inner().unwrap_or_else(|e| e.into_inner());
            // Claims never overlap and each written one was written whole: if
            // their areas add up to the matrix, they cover it.
            assert_eq!(
                claims.written,
                rows * cols,
                "an uninitialized output was not written whole"
            );
            // SAFETY: every one of the rows · cols elements was written (above).
            unsafe { buf.set_len(rows * cols) };
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path this CPU has, from the widest down.
    fn paths() -> Vec<SimdPath> {
        let widest = crate::simd::detect(None);
        [SimdPath::Avx512, SimdPath::Avx2, SimdPath::Scalar]
            .into_iter()
            .filter(|p| crate::simd::detect(Some(p.name())) == *p)
            .chain((widest == SimdPath::Auto).then_some(SimdPath::Auto))
            .collect()
    }

    #[test]
    fn every_path_the_cpu_has_computes_the_same_products() {
        // Shapes that are not multiples of any vector width or block size,
        // strided and transposed operands, accumulating or not.
        let (m, k, n) = (37, 29, 53);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) / 8.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 19) as f32 - 9.0) / 4.0)
            .collect();
        let want = |r: usize, c: usize, acc: f32| -> f32 {
            acc + (0..k).map(|j| a[r * k + j] * b[j * n + c]).sum::<f32>()
        };
        for path in paths() {
            if path == SimdPath::Auto {
                continue;
            }
            for accumulate in [false, true] {
                let mut out = vec![0.5f32; m * n];
                // SAFETY: operands and output are the full slices, their
                // shapes as stated; `path` is one this CPU has.
                unsafe {
                    gemm_on::<f32>(
                        path,
                        (m, n, k),
                        (out.as_mut_ptr(), n as isize, accumulate),
                        (a.as_ptr(), 1, k as isize),
                        (b.as_ptr(), 1, n as isize),
                        if accumulate { 1.0 } else { 0.0 },
                    );
                }
                for r in 0..m {
                    for c in 0..n {
                        let w = want(r, c, if accumulate { 0.5 } else { 0.0 });
                        let got = out[r * n + c];
                        assert!(
                            (got - w).abs() <= 1e-4 * w.abs().max(1.0),
                            "{path:?} ({r}, {c}): {got} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_narrower_path_can_be_asked_for_never_a_wider_one() {
        use crate::simd::detect;
        let widest = detect(None);
        assert_eq!(
            detect(Some("scalar")),
            if widest == SimdPath::Auto {
                widest
            } else {
                SimdPath::Scalar
            }
        );
        let avx2 = detect(Some("avx2"));
        assert!(
            avx2 == widest || avx2 == SimdPath::Avx2,
            "{avx2:?} on {widest:?}"
        );
        assert_eq!(detect(Some("no-such-path")), widest);
        assert!(paths().contains(&widest));
    }

    #[test]
    fn products_match_a_naive_loop_for_every_layout() {
        let a: Vec<f64> = (0..12).map(f64::from).collect(); // 3 × 4
        let b: Vec<f64> = (0..8).map(|i| f64::from(i) * 0.5).collect(); // 4 × 2
        let mut out = vec![0.0; 6];
        gemm(
            &mut MatMut::new(&mut out, 3, 2),
            Mat::new(&a, 3, 4),
            Mat::new(&b, 4, 2),
            false,
        );
        for r in 0..3 {
            for c in 0..2 {
                let want: f64 = (0..4).map(|k| a[r * 4 + k] * b[k * 2 + c]).sum();
                assert_eq!(out[r * 2 + c], want);
            }
        }
        // bᵀ given as its transpose's view, accumulating: twice the product.
        let bt: Vec<f64> = (0..8).map(|i| b[(i % 4) * 2 + i / 4]).collect(); // 2 × 4
        gemm(
            &mut MatMut::new(&mut out, 3, 2),
            Mat::new(&a, 3, 4),
            Mat::new(&bt, 2, 4).t(),
            true,
        );
        assert_eq!(
            out[5],
            2.0 * (0..4).map(|k| a[2 * 4 + k] * b[k * 2 + 1]).sum::<f64>()
        );
    }

    #[test]
    #[should_panic(expected = "reaches element")]
    fn an_operand_reaching_past_its_slice_panics() {
        let a = vec![1.0f32; 5];
        let mut out = vec![0.0f32; 4];
        gemm(
            &mut MatMut::new(&mut out, 2, 2),
            Mat::new(&a, 2, 3),
            Mat::new(&a, 3, 2),
            false,
        );
    }

    #[test]
    fn shared_blocks_cover_an_uninitialized_output() {
        let a: Vec<f32> = (0..6).map(|i| i as f32).collect(); // 2 × 3
        let eye: Vec<f32> = vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let out = Shared::<f32>::uninit(2, 3);
        for c in 0..3 {
            let mut blk = out.block(0..2, c..c + 1);
            gemm(
                &mut blk,
                Mat::new(&a, 2, 3),
                Mat::strided(&eye[c..], 3, 1, 3),
                false,
            );
        }
        assert_eq!(out.into_vec(), a);
    }

    #[test]
    #[should_panic(expected = "not written whole")]
    fn an_uninitialized_output_with_a_gap_is_refused() {
        let a = vec![1.0f32; 2];
        let out = Shared::<f32>::uninit(2, 2);
        gemm(
            &mut out.block(0..2, 0..1),
            Mat::new(&a, 2, 1),
            Mat::new(&a, 1, 1),
            false,
        );
        let _ = out.into_vec();
    }

    #[test]
    #[should_panic(expected = "overlaps")]
    fn overlapping_live_blocks_panic() {
        let out = Shared::<f32>::zeroed(4, 4);
        let _first = out.block(0..2, 0..3);
        let _second = out.block(1..3, 2..4);
    }

    #[test]
    fn a_dropped_block_can_be_claimed_again() {
        let out = Shared::<f32>::zeroed(2, 2);
        for _ in 0..2 {
            let mut blk = out.block(0..2, 0..2);
            blk.row(1)[0] += 1.0;
        }
        assert_eq!(out.into_vec(), [0.0, 0.0, 2.0, 0.0]);
    }
}
