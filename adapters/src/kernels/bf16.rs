//! Products with a frozen weight stored in bf16: `x · Wᵀ` (the forward) and
//! `g · W` (the input gradient), `x` and `g` in f32, sums in f32.
//!
//! Stored in bf16 a frozen weight takes half the memory, and on CPUs with
//! AVX512-BF16 the product runs on `vdpbf16ps`, which multiplies *pairs* of
//! bf16 and adds both products into one f32 lane: twice the multiplies of
//! an f32 FMA per instruction. The operand `x` is rounded to bf16 (to
//! nearest, ties to even) once per call; the weight is packed per call into
//! panels of 32 output columns holding, for each pair of the summed index,
//! the 32 columns' two values side by side — the layout `vdpbf16ps` reads.
//! One thread packs and multiplies a block of columns, so a panel is packed
//! once and swept by every row of `x` while it is in cache.
//!
//! Without AVX512-BF16 (or when `FEDTUNE_SIMD` narrows the path) each
//! column block of the weight is widened to f32 and multiplied by the f32
//! `gemm`: the same numbers as the bf16 weight with f32 activations, at f32
//! speed, never an illegal instruction.
//!
//! `unsafe` here is the intrinsics: every pointer the microkernel reads is
//! inside a slice whose length is asserted before the loop (see
//! [`tile`]).

use std::ops::Range;

use half::bf16;

use super::gemm::{gemm, Mat, Shared};
use super::linear::{by_column_blocks, STREAM_ROWS};
use super::rows::{on_pool, pool_threads};
use crate::simd::{simd_path, SimdPath};

/// Output columns per packed panel: two 16-lane registers.
const NR: usize = 32;
/// Rows of `x` per microkernel call: 8 × 2 accumulators stay in registers.
const MR: usize = 8;
/// Pairs of the summed index per packed chunk: 32 columns' chunk is 64 KiB.
const KC: usize = 512;
/// Words of packed panels swept together (256 KiB, within L2).
const GROUP_WORDS: usize = 64 * 1024;

/// Whether this process multiplies bf16 weights on `vdpbf16ps`.
pub fn bf16_units() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        simd_path() == SimdPath::Avx512
            && std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The name of the path a bf16 product takes here, for benchmark reports.
pub fn bf16_path() -> &'static str {
    if bf16_units() {
        "bf16-avx512"
    } else {
        "bf16-widened-f32"
    }
}

/// `y (m × n) = x (m × k) · B (k × n)` with `B = Wᵀ` for `W (n × k)` when
/// `transposed` (a projection's forward), else `B = W` for `W (k × n)`
/// (its input gradient).
pub(crate) fn product(
    x: &[f32],
    w: &impl Stored,
    transposed: bool,
    (m, k, n): (usize, usize, usize),
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "bf16 product: x is not {m} × {k}");
    let width = if transposed { k } else { n };
    assert!(
        w.size() == k * n && w.width() == width,
        "bf16 product: W does not hold {k} × {n}"
    );
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    if bf16_units() && transposed && m <= STREAM_ROWS {
        // Decoding: W's rows streamed once, unpacked, each dotted with every row of x.
        return w.streamed(x, (m, k, n));
    }
    // Rows are written one by one: the output starts zeroed.
    let out = Shared::zeroed(m, n);
    // As many column blocks as threads, each a whole number of panels.
    let per = n.div_ceil(NR).div_ceil(pool_threads()) * NR;
    if bf16_units() {
        let (xb, k2) = (pairs(x, m, k), k.div_ceil(2));
        on_pool(n.div_ceil(per), |b| {
            let cols = b * per..((b + 1) * per).min(n);
            let mut dst = out.block(0..m, cols.clone());
            let panels: Vec<usize> = cols.clone().step_by(NR).collect();
            // A chunk of the summed index and a group of panels at a time,
            // packed into about 256 KiB, so they stay in cache while every
            // row of x passes them.
            let group = (GROUP_WORDS / (KC.min(k2) * NR)).max(1);
            let mut packed = vec![0u32; group * KC.min(k2) * NR];
            for kc0 in (0..k2).step_by(KC) {
                let chunk = kc0..(kc0 + KC).min(k2);
                let size = chunk.len() * NR;
                for starts in panels.chunks(group) {
                    for (p, &c0) in starts.iter().enumerate() {
                        let cols = c0..(c0 + NR).min(cols.end);
                        let panel = &mut packed[p * size..][..size];
                        pack(w, transposed, k, (cols, chunk.clone()), panel);
                    }
                    let used = &packed[..starts.len() * size];
                    sweep(&xb, used, (m, k2), chunk.clone(), |row, p, values| {
                        let c0 = starts[p] - cols.start;
                        let width = NR.min(cols.end - starts[p]);
                        for (d, v) in dst.row(row)[c0..][..width].iter_mut().zip(values) {
                            *d += v;
                        }
                    });
                }
            }
        });
    } else {
        on_pool(n.div_ceil(per), |b| {
            let cols = b * per..((b + 1) * per).min(n);
            let wide = widen(w, transposed, k, cols.clone());
            gemm(
                &mut out.block(0..m, cols.clone()),
                Mat::new(x, m, k),
                Mat::new(&wide, k, cols.len()),
                false,
            );
        });
    }
    out.into_vec()
}

/// A frozen weight as the products read it: a row-major matrix of
/// [`Stored::width`] values a row, one stretch of a row at a time.
pub trait Stored: Sync {
    /// Values a stored row.
    fn width(&self) -> usize;
    /// Values in all.
    fn size(&self) -> usize;
    /// Row `j`'s values `cols` in bf16: borrowed where the weight is stored
    /// so, else written into `buf`.
    fn bf16_row<'a>(&'a self, j: usize, cols: Range<usize>, buf: &'a mut Vec<bf16>) -> &'a [bf16];
    /// Row `j`'s values `cols` in f32, appended to `out`.
    fn f32_row(&self, j: usize, cols: Range<usize>, out: &mut Vec<f32>);

    /// `x (m × k) · Wᵀ` for `W` `(n × k)` and a few rows of `x`, where the
    /// CPU has the bf16 units: each row of `W` read once and dotted with
    /// every row of `x` (rounded to bf16), on the worker pool.
    fn streamed(&self, x: &[f32], mkn: (usize, usize, usize)) -> Vec<f32>
    where
        Self: Sized,
    {
        streamed_rows(self, x, mkn)
    }
}

/// [`Stored::streamed`] through [`Stored::bf16_row`]: each row of `W` in
/// bf16, dotted with every row of `x` rounded to bf16 pairs.
pub(super) fn streamed_rows(
    w: &impl Stored,
    x: &[f32],
    (m, k, n): (usize, usize, usize),
) -> Vec<f32> {
    let xb = pairs(x, m, k);
    by_column_blocks(m, n, |cols, local| streamed(&xb, w, cols, (m, k), local))
}

/// A weight stored in bf16, `width` values a row.
pub(super) struct Bf16Rows<'a> {
    pub(super) values: &'a [bf16],
    pub(super) width: usize,
}

impl Stored for Bf16Rows<'_> {
    fn width(&self) -> usize {
        self.width
    }
    fn size(&self) -> usize {
        self.values.len()
    }
    fn bf16_row<'a>(&'a self, j: usize, cols: Range<usize>, _: &'a mut Vec<bf16>) -> &'a [bf16] {
        &self.values[j * self.width..][cols]
    }
    fn f32_row(&self, j: usize, cols: Range<usize>, out: &mut Vec<f32>) {
        out.extend(
            self.values[j * self.width..][cols]
                .iter()
                .map(|v| v.to_f32()),
        );
    }
}

/// `B`'s columns `cols` (see [`product`]) as an f32 `k × cols` matrix.
fn widen(w: &impl Stored, transposed: bool, k: usize, cols: Range<usize>) -> Vec<f32> {
    let mut out = Vec::with_capacity(k * cols.len());
    if transposed {
        // B's column j is W's row j: read whole, then laid across.
        let mut row = Vec::with_capacity(k);
        out.resize(k * cols.len(), 0.0);
        for (jj, j) in cols.clone().enumerate() {
            row.clear();
            w.f32_row(j, 0..k, &mut row);
            for (kk, v) in row.iter().enumerate() {
                out[kk * cols.len() + jj] = *v;
            }
        }
    } else {
        for kk in 0..k {
            w.f32_row(kk, cols.clone(), &mut out);
        }
    }
    out
}

/// `x (m × k)` rounded to bf16, each row's values in pairs (`k` padded to
/// even with a zero): the low half of each word is the even element.
fn pairs(x: &[f32], m: usize, k: usize) -> Vec<u32> {
    let k2 = k.div_ceil(2);
    let mut out = vec![0u32; m * k2];
    for (row, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(k2)) {
        round_row(row, dst);
    }
    out
}

/// Two values rounded to bf16 in one word, the first in the low half (a
/// missing second one is zero).
fn pair(lo: f32, hi: Option<f32>) -> u32 {
    let bits = |v: f32| u32::from(bf16::from_f32(v).to_bits());
    bits(lo) | hi.map_or(0, bits) << 16
}

/// One row of [`pairs`].
fn round_row(row: &[f32], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if bf16_units() {
        // SAFETY: the CPU has AVX512-BF16 (checked by bf16_units).
        unsafe { x86::round_row(row, dst) };
        return;
    }
    for (d, p) in dst.iter_mut().zip(row.chunks(2)) {
        *d = pair(p[0], p.get(1).copied());
    }
}

/// Packs `B`'s columns `cols` (at most [`NR`]) for the pairs `pairs` of the
/// summed index into `panel`: for each pair `kk`, `NR` words
/// `(B[2kk, j], B[2kk+1, j])`, columns past `cols` zero.
fn pack(
    w: &impl Stored,
    transposed: bool,
    k: usize,
    (cols, pairs): (Range<usize>, Range<usize>),
    panel: &mut [u32],
) {
    assert_eq!(panel.len(), pairs.len() * NR);
    assert!(pairs.end <= k.div_ceil(2) && cols.len() <= NR);
    panel.fill(0);
    let (mut buf, mut odd_buf) = (Vec::new(), Vec::new());
    if transposed {
        // Row j of W holds B's column j: its pairs are consecutive.
        for (jj, j) in cols.enumerate() {
            let row = w.bf16_row(j, 2 * pairs.start..(2 * pairs.end).min(k), &mut buf);
            for (kk, p) in row.chunks(2).enumerate() {
                let lo = p[0].to_bits() as u32;
                let hi = p.get(1).map_or(0, |v| v.to_bits() as u32);
                panel[kk * NR + jj] = lo | hi << 16;
            }
        }
    } else {
        // Rows 2kk and 2kk + 1 of W, interleaved (the last alone when k is odd).
        let width = cols.len();
        for (dst, kk) in panel.chunks_exact_mut(NR).zip(pairs) {
            let even = w.bf16_row(2 * kk, cols.clone(), &mut buf);
            debug_assert_eq!(even.len(), width);
            if 2 * kk + 1 < k {
                let odd = w.bf16_row(2 * kk + 1, cols.clone(), &mut odd_buf);
                for ((d, e), o) in dst.iter_mut().zip(even).zip(odd) {
                    *d = e.to_bits() as u32 | (o.to_bits() as u32) << 16;
                }
            } else {
                for (d, e) in dst.iter_mut().zip(even) {
                    *d = e.to_bits() as u32;
                }
            }
        }
    }
}

/// `out[i·c + jj] = x_i · w_j` for the `m` rows of `xb` (pairs, see
/// [`pairs`]) and the `c` rows `rows` of `w` (`k` values each).
fn streamed(
    xb: &[u32],
    w: &impl Stored,
    rows: Range<usize>,
    (m, k): (usize, usize),
    out: &mut [f32],
) {
    let (k2, c) = (k.div_ceil(2), rows.len());
    assert!(xb.len() == m * k2 && w.width() == k && out.len() == m * c);
    let mut buf = Vec::new();
    for (j, row) in rows.enumerate() {
        let wj = w.bf16_row(row, 0..k, &mut buf);
        for (i, xi) in xb.chunks_exact(k2).enumerate() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: streamed runs only where bf16_units() holds (see product).
            let dot = unsafe { x86::dot(xi, wj) };
            #[cfg(not(target_arch = "x86_64"))]
            let dot = 0.0;
            out[i * c + j] = dot;
        }
    }
}

/// Every row of `xb` (`m` rows of `k2` pairs), its pairs `chunk`, times each
/// packed panel of `packed` (that chunk of one panel after another);
/// `emit(row, panel, values)` takes the [`NR`] partial sums.
fn sweep(
    xb: &[u32],
    packed: &[u32],
    (m, k2): (usize, usize),
    chunk: std::ops::Range<usize>,
    mut emit: impl FnMut(usize, usize, &[f32]),
) {
    let size = chunk.len() * NR;
    assert!(xb.len() == m * k2 && chunk.end <= k2 && size > 0 && packed.len().is_multiple_of(size));
    let mut row = 0;
    while row < m {
        let rows = MR.min(m - row);
        // Rows row.. of x from the chunk's first pair on: `rows` rows `k2` apart.
        let x = &xb[row * k2 + chunk.start..(row + rows - 1) * k2 + chunk.end];
        for (p, panel) in packed.chunks_exact(size).enumerate() {
            let mut acc = [[0f32; NR]; MR];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: sweep runs only where bf16_units() holds (see product).
            unsafe {
                x86::tile_any(x, k2, panel, rows, &mut acc)
            };
            for (r, values) in acc.iter().take(rows).enumerate() {
                emit(row + r, p, values);
            }
        }
        row += rows;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// One row of [`super::pairs`], 32 values per conversion.
    ///
    /// # Safety
    /// The CPU must have AVX512F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_row(row: &[f32], dst: &mut [u32]) {
        let full = row.len() / 32;
        for c in 0..full {
            let src = &row[c * 32..c * 32 + 32];
            let out = &mut dst[c * 16..c * 16 + 16];
            // SAFETY: src holds 32 values, out 16 words (sliced above).
            unsafe {
                let lo = _mm512_loadu_ps(src.as_ptr());
                let hi = _mm512_loadu_ps(src.as_ptr().add(16));
                let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(out.as_mut_ptr().cast(), both);
            }
        }
        for (i, d) in dst.iter_mut().enumerate().skip(full * 16) {
            *d = super::pair(row[2 * i], row.get(2 * i + 1).copied());
        }
    }

    /// The dot product of one row of pairs `x` (`k.div_ceil(2)` words) and
    /// one weight row `w` (`k` values).
    ///
    /// # Safety
    /// The CPU must have AVX512F and AVX512-BF16. Every load is of 16 words
    /// of `x` and 32 values of `w` inside the first `full` blocks (below),
    /// the tail read through the slices.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn dot(x: &[u32], w: &[half::bf16]) -> f32 {
        let k = w.len();
        assert!(x.len() == k.div_ceil(2));
        let full = k / 32;
        let mut acc = _mm512_setzero_ps();
        for b in 0..full {
            // SAFETY: b < full = k / 32, so words 16b..16b+16 of x and
            // values 32b..32b+32 of w are inside the slices.
            unsafe {
                let xv: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(x.as_ptr().add(16 * b).cast()));
                let wv: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(w.as_ptr().add(32 * b).cast()));
                acc = _mm512_dpbf16_ps(acc, xv, wv);
            }
        }
        let mut sum = _mm512_reduce_add_ps(acc);
        for q in 32 * full..k {
            let word = x[q / 2];
            let bits = if q % 2 == 0 {
                word & 0xffff
            } else {
                word >> 16
            } as u16;
            sum += half::bf16::from_bits(bits).to_f32() * w[q].to_f32();
        }
        sum
    }

    /// [`tile`] for 1 to [`MR`] rows.
    ///
    /// # Safety
    /// The CPU must have AVX512F and AVX512-BF16.
    pub(super) unsafe fn tile_any(
        x: &[u32],
        stride: usize,
        panel: &[u32],
        rows: usize,
        acc: &mut [[f32; NR]; MR],
    ) {
        // SAFETY: as this function's.
        unsafe {
            match rows {
                8 => tile::<8>(x, stride, panel, acc),
                7 => tile::<7>(x, stride, panel, acc),
                6 => tile::<6>(x, stride, panel, acc),
                5 => tile::<5>(x, stride, panel, acc),
                4 => tile::<4>(x, stride, panel, acc),
                3 => tile::<3>(x, stride, panel, acc),
                2 => tile::<2>(x, stride, panel, acc),
                1 => tile::<1>(x, stride, panel, acc),
                _ => unreachable!("1 to {MR} rows"),
            }
        }
    }

    /// `acc[r] = x_r · panel` for the `R` rows of `x`, `stride` words apart,
    /// each `kc = panel.len() / NR` pairs long.
    ///
    /// # Safety
    /// The CPU must have AVX512F and AVX512-BF16. Bounds are asserted
    /// here: every read is of `x[r·stride + kk]` (r < R, kk < kc) or of
    /// `panel[kk·NR .. kk·NR + NR]`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile<const R: usize>(
        x: &[u32],
        stride: usize,
        panel: &[u32],
        acc: &mut [[f32; NR]; MR],
    ) {
        let kc = panel.len() / NR;
        assert!(R >= 1 && R <= MR && kc <= stride && x.len() >= (R - 1) * stride + kc);
        let mut c = [[_mm512_setzero_ps(); 2]; R];
        let (xp, pp) = (x.as_ptr(), panel.as_ptr());
        for kk in 0..kc {
            // SAFETY: kk < kc and the lengths asserted above.
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(pp.add(kk * NR).cast()));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(pp.add(kk * NR + 16).cast()));
                for (r, cr) in c.iter_mut().enumerate() {
                    let a: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*xp.add(r * stride + kk) as i32));
                    cr[0] = _mm512_dpbf16_ps(cr[0], a, b0);
                    cr[1] = _mm512_dpbf16_ps(cr[1], a, b1);
                }
            }
        }
        for (cr, out) in c.iter().zip(acc.iter_mut()) {
            // SAFETY: out holds NR = 32 values.
            unsafe {
                _mm512_storeu_ps(out.as_mut_ptr(), cr[0]);
                _mm512_storeu_ps(out.as_mut_ptr().add(16), cr[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product in f64 of `x` and the bf16 weight, with `x` rounded to
    /// bf16 as the fast path rounds it (`round_x`) or not.
    fn reference(
        x: &[f32],
        w: &[bf16],
        transposed: bool,
        (m, k, n): (usize, usize, usize),
        round_x: bool,
    ) -> Vec<f64> {
        let xr = |v: f32| {
            if round_x {
                f64::from(bf16::from_f32(v).to_f32())
            } else {
                f64::from(v)
            }
        };
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|q| {
                        let b = if transposed {
                            w[j * k + q]
                        } else {
                            w[q * n + j]
                        };
                        xr(x[i * k + q]) * f64::from(b.to_f32())
                    })
                    .sum();
            }
        }
        y
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn products_match_f64_at_odd_shapes_both_ways() {
        // Odd k (a padded pair), rows not a multiple of MR, columns not of
        // NR; k over one chunk (2·KC) so partial sums add up across chunks.
        for (m, k, n) in [
            (19, 2 * KC + 3, 40),
            (25, 4 * KC, 33),
            (1, 1, 1),
            (3, 7, 5),
            (13, 33, 70),
            (9, 64, 32),
            (17, 129, 100),
        ] {
            for transposed in [true, false] {
                let x = data(m * k, 1);
                let w: Vec<bf16> = data(k * n, 7).into_iter().map(bf16::from_f32).collect();
                let width = if transposed { k } else { n };
                let stored = Bf16Rows { values: &w, width };
                let y = product(&x, &stored, transposed, (m, k, n));
                // The fast path rounds x to bf16; the widened one keeps f32.
                let exact = reference(&x, &w, transposed, (m, k, n), bf16_units());
                for (i, (&a, &b)) in y.iter().zip(&exact).enumerate() {
                    assert!(
                        (f64::from(a) - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{m}×{k}×{n} transposed {transposed}, element {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even_in_both_paths() {
        // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even (1).
        let x = [1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5, 3.0e38];
        assert_eq!(bf16::from_f32(x[0]).to_f32(), 1.0);
        // A short row (the scalar tail alone) and one long enough for the
        // vector conversion, with a tail; words against half's rounding.
        for row in [x.to_vec(), data(70, 3)] {
            let mut fast = vec![0u32; row.len() / 2];
            round_row(&row, &mut fast);
            let expect: Vec<u32> = row
                .chunks(2)
                .map(|p| {
                    u32::from(bf16::from_f32(p[0]).to_bits())
                        | u32::from(bf16::from_f32(p[1]).to_bits()) << 16
                })
                .collect();
            assert_eq!(fast, expect);
        }
    }
}
