//! Vectorized row kernels for the fused CPU ops (cross-entropy, softmax).
//!
//! The exponential is Cephes' `expf` (range reduction by `ln 2`, a degree-6
//! polynomial; relative error below 2e-7 on the range that matters), written
//! without branches or library calls so the compiler vectorizes it. Each
//! kernel is compiled twice: for the baseline target and for AVX2 + FMA,
//! picked at run time (`FEDTUNE_SIMD=scalar` forces the baseline, see
//! [`simd_path`]). Sums use eight independent accumulators, so they
//! vectorize too (the summation order differs from a sequential loop by
//! rounding only).

/// Which SIMD kernels the matrix products and row kernels run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdPath {
    /// 512-bit AVX-512F kernels.
    Avx512,
    /// 256-bit AVX2 + FMA kernels.
    Avx2,
    /// Plain scalar code.
    Scalar,
    /// Whatever `gemm` picks (non-x86 CPUs, and dtypes other than f32/f64).
    Auto,
}

impl SimdPath {
    /// Its name in benchmark reports: `avx512`, `avx2`, `scalar`, `auto`.
    pub fn name(self) -> &'static str {
        match self {
            SimdPath::Avx512 => "avx512",
            SimdPath::Avx2 => "avx2",
            SimdPath::Scalar => "scalar",
            SimdPath::Auto => "auto",
        }
    }
}

/// The path f32/f64 matrix products (and, below AVX-512, the row kernels)
/// take in this process: the widest the CPU has,
/// detected at run time, or a narrower one named by `FEDTUNE_SIMD`
/// (`avx2`, `scalar`; to test the fallbacks on a CPU that has more). A
/// path the CPU lacks is never taken: asking for it gets the widest one
/// the CPU has below it.
pub fn simd_path() -> SimdPath {
    static PATH: std::sync::OnceLock<SimdPath> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| detect(std::env::var("FEDTUNE_SIMD").ok().as_deref()))
}

pub(crate) fn detect(wanted: Option<&str>) -> SimdPath {
    #[cfg(target_arch = "x86_64")]
    {
        let cap = if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            SimdPath::Avx512
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            SimdPath::Avx2
        } else {
            SimdPath::Scalar
        };
        let want = match wanted.map(str::trim) {
            Some("avx2") => SimdPath::Avx2,
            Some("scalar") => SimdPath::Scalar,
            _ => SimdPath::Avx512,
        };
        let rank = |p: SimdPath| match p {
            SimdPath::Avx512 => 2,
            SimdPath::Avx2 => 1,
            _ => 0,
        };
        if rank(want) < rank(cap) {
            want
        } else {
            cap
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = wanted;
        SimdPath::Auto
    }
}

const LANES: usize = 8;

/// `e^x` for `x` in f32, with `x` clamped to `[-87.3, 88.7]` (results below
/// `1.2e-38` become that bound; there is no infinity).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 · 2^23: adding it rounds to the nearest integer, kept in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.7);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from the integer kept in `t`'s mantissa.
    let n = t.to_bits() as i32 - ROUND.to_bits() as i32;
    e * f32::from_bits(((n + 127) << 23) as u32)
}

macro_rules! dispatch {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty; $body:ident) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if simd_path() != SimdPath::Scalar
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

#[inline(always)]
fn max_body(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    tail.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Exponents below this give exactly 0 in sums and stored rows.
///
/// `e^-64` is 1.6e-28: a softmax term that small changes no result, but kept
/// it ends up subnormal once divided by the row's sum (masked attention keys
/// all do), and a subnormal operand slows every later multiply on x86 about
/// a hundredfold. On the default model it made the attention of a 726-token
/// prompt 7x slower than the rest of the forward.
const FLUSH_BELOW: f32 = -64.0;

/// `e^x`, or 0 for `x` below [`FLUSH_BELOW`] (branch-free, so it vectorizes).
#[inline(always)]
fn exp_flushed(x: f32) -> f32 {
    let e = exp(x);
    if x < FLUSH_BELOW {
        0.0
    } else {
        e
    }
}

#[inline(always)]
fn exp_sum_body(row: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += exp_flushed(x - shift);
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for &x in tail {
        sum += exp_flushed(x - shift);
    }
    sum
}

#[inline(always)]
fn exp_store_body(row: &[f32], shift: f32, out: &mut [f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = row.len().min(out.len());
    let (row, out) = (&row[..n], &mut out[..n]);
    let split = n - n % LANES;
    for (c, o) in row[..split]
        .chunks_exact(LANES)
        .zip(out[..split].chunks_exact_mut(LANES))
    {
        for ((a, o), &x) in acc.iter_mut().zip(o).zip(c) {
            *o = exp_flushed(x - shift);
            *a += *o;
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (o, &x) in out[split..].iter_mut().zip(&row[split..]) {
        *o = exp_flushed(x - shift);
        sum += *o;
    }
    sum
}

/// `out[i·c + j] = x_i · w_j` for the `m = x.len() / k` rows `x_i` of `x`
/// and the `c = w.len() / k` rows `w_j` of `w` (each `k` long).
#[inline(always)]
fn dots_body(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let c = w.len() / k;
    for (j, wj) in w.chunks_exact(k).enumerate() {
        for (i, xi) in x.chunks_exact(k).enumerate() {
            let mut acc = [0f32; 2 * LANES];
            let (xc, wc) = (xi.chunks_exact(2 * LANES), wj.chunks_exact(2 * LANES));
            let (xt, wt) = (xc.remainder(), wc.remainder());
            for (a, b) in xc.zip(wc) {
                for ((s, &p), &q) in acc.iter_mut().zip(a).zip(b) {
                    *s += p * q;
                }
            }
            let mut sum = acc.iter().sum::<f32>();
            for (&p, &q) in xt.iter().zip(wt) {
                sum += p * q;
            }
            out[i * c + j] = sum;
        }
    }
}

#[inline(always)]
fn scale_body(xs: &mut [f32], s: f32) {
    xs.iter_mut().for_each(|x| *x *= s);
}

/// `out[i·c + j] = x_i · w_j` over the `k`-long rows of `x` (`m`) and
/// `w` (`c`): a product that streams `w` once, unpacked. With AVX2 and FMA,
/// four rows of `x` at a time meet each chunk of `w` in fused
/// multiply-adds (one load of `w` for four products); otherwise, and for
/// the rows left over, the portable loop.
pub fn dots(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if k > 0
        && simd_path() != SimdPath::Scalar
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has AVX2 and FMA, which `dots_fma` is compiled for.
        unsafe { dots_fma(x, w, k, out) };
        return;
    }
    dots_body(x, w, k, out)
}

/// [`dots`] on AVX2 + FMA: blocks of four rows of `x` through
/// [`dots4_fma`], the rest through [`dots_body`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_fma(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    let (m, c) = (x.len() / k, w.len() / k);
    let blocked = m - m % 4;
    for (j, wj) in w.chunks_exact(k).enumerate() {
        for i in (0..blocked).step_by(4) {
            let rows = [0, 1, 2, 3].map(|r| &x[(i + r) * k..(i + r + 1) * k]);
            // SAFETY: every row and `wj` are `k` long; the features are this function's.
            let sums = unsafe { dots4_fma(rows, wj) };
            for (r, s) in sums.into_iter().enumerate() {
                out[(i + r) * c + j] = s;
            }
        }
    }
    if blocked < m {
        let rest = &x[blocked * k..m * k];
        let mut tail = vec![0f32; (m - blocked) * c];
        dots_body(rest, w, k, &mut tail);
        for (r, row) in tail.chunks_exact(c).enumerate() {
            out[(blocked + r) * c..(blocked + r + 1) * c].copy_from_slice(row);
        }
    }
}

/// The four dot products `x[r] · w`; every `x[r]` is as long as `w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots4_fma(x: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let k = w.len();
    assert!(x.iter().all(|r| r.len() == k), "rows as long as w");
    let whole = k - k % LANES;
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut t = 0;
    while t < whole {
        // SAFETY: t + LANES <= whole <= k, the length of `w` and every row.
        unsafe {
            let wv = _mm256_loadu_ps(w.as_ptr().add(t));
            for (a, row) in acc.iter_mut().zip(&x) {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(row.as_ptr().add(t)), wv, *a);
            }
        }
        t += LANES;
    }
    let mut out = [0f32; 4];
    for ((o, a), row) in out.iter_mut().zip(acc).zip(&x) {
        // Lanes summed pairwise: 8 → 4 → 2 → 1.
        let half = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
        let one = _mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1));
        *o = _mm_cvtss_f32(one);
        for t in whole..k {
            *o += row[t] * w[t];
        }
    }
    out
}

dispatch! {
    /// The largest value of `row` (−∞ when empty; NaNs are skipped).
    pub fn max(row: &[f32]) -> f32; max_body
}

dispatch! {
    /// `Σ e^(x − shift)` over `row`.
    pub fn exp_sum(row: &[f32], shift: f32) -> f32; exp_sum_body
}

dispatch! {
    /// Writes `e^(x − shift)` of each `x` in `row` to `out` and returns their sum.
    pub fn exp_store(row: &[f32], shift: f32, out: &mut [f32]) -> f32; exp_store_body
}

dispatch! {
    /// Multiplies every value by `s`.
    pub fn scale(xs: &mut [f32], s: f32) -> (); scale_body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_std_over_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1e30) > 0.0 && exp(-1e30) < 1e-37);
    }

    #[test]
    fn far_below_the_maximum_is_exactly_zero_never_subnormal() {
        // Shifted by 3: e^-63 stays, e^-65 and below are zero.
        let row = [0.0f32, -10.0, -60.0, -62.0, -1e4, -87.5, -1e30, 0.0, 3.0];
        let mut out = [1f32; 9];
        let sum = exp_store(&row, 3.0, &mut out);
        assert_eq!(sum, exp_sum(&row, 3.0));
        assert!(out[2] > 0.0 && out[3] == 0.0);
        for (o, &x) in out.iter().zip(&row) {
            if x - 3.0 < FLUSH_BELOW {
                assert_eq!(*o, 0.0, "e^{}", x - 3.0);
            } else {
                assert!(o.is_normal(), "e^{} = {o:e}", x - 3.0);
            }
        }
    }

    /// Every row count (blocks of four and the rest) and width (whole
    /// chunks, a tail, only a tail) against an f64 loop.
    #[test]
    fn dots_match_an_f64_loop_for_every_row_count_and_width() {
        for k in [0usize, 1, 7, 8, 9, 37, 576] {
            for m in 1..=9 {
                let c = 5;
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 29 % 97) as f32 - 48.0) * 0.01)
                    .collect();
                let w: Vec<f32> = (0..c * k)
                    .map(|i| ((i * 13 % 89) as f32 - 44.0) * 0.02)
                    .collect();
                let mut out = vec![f32::NAN; m * c];
                dots(&x, &w, k, &mut out);
                for i in 0..m {
                    for j in 0..c {
                        let want: f64 = (0..k)
                            .map(|t| f64::from(x[i * k + t]) * f64::from(w[j * k + t]))
                            .sum();
                        let got = f64::from(out[i * c + j]);
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "m {m} k {k} ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn kernels_match_sequential_loops_on_ragged_lengths() {
        for n in [0usize, 1, 7, 8, 9, 100, 1003] {
            let row: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3)
                .collect();
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&row), m, "n = {n}");
            let shift = if n == 0 { 0.0 } else { m };
            let want: f64 = row.iter().map(|&x| f64::from(x - shift).exp()).sum();
            let got = f64::from(exp_sum(&row, shift));
            assert!((got - want).abs() <= 1e-6 * want.max(1.0), "n = {n}");
            let mut out = vec![0f32; n];
            let stored = exp_store(&row, shift, &mut out);
            assert_eq!(stored, exp_sum(&row, shift), "n = {n}");
            for (o, &x) in out.iter().zip(&row) {
                let w = f64::from(x - shift).exp();
                assert!((f64::from(*o) - w).abs() <= 3e-7 * w, "n = {n}");
            }
            scale(&mut out, 2.0);
            assert!(out.iter().zip(&row).all(|(o, &x)| {
                let w = 2.0 * f64::from(x - shift).exp();
                (f64::from(*o) - w).abs() <= 6e-7 * w
            }));
        }
    }
}
