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

dispatch! {
    /// `out[i·c + j] = x_i · w_j` over the `k`-long rows of `x` (`m`) and
    /// `w` (`c`): a product that streams `w` once, unpacked.
    pub fn dots(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) -> (); dots_body
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
