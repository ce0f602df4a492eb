//! A frozen weight stored as int8 with one f32 scale per block of 32 values
//! of a row (the layout of GGUF's Q8_0, with an f32 scale): `[model]
//! compute = "int8"`, the QLoRA idea for memory. A projection takes 1.125
//! bytes a weight instead of bf16's 2 and f32's 4.
//!
//! Quantizing is symmetric and to nearest: each block's scale is its
//! largest magnitude over 127, so every value is within half a scale of
//! its original. Gradients still flow to the inputs: the forward `x · Wᵀ`
//! and the input gradient `g · W` both read the int8 blocks through
//! [`Stored`], a stretch of a row at a time, dequantized into the panels
//! the bf16 products pack (rounded to bf16, multiplied on `vdpbf16ps`
//! where the CPU has AVX512-BF16) or widened to f32 for `gemm` elsewhere.
//! Decoding (at most 8 rows of `x`) widens each row of blocks to f32 in
//! registers instead and multiplies it with `x` in f32. Activations stay
//! f32, so nothing is quantized but the frozen weight.
//!
//! Off the CPU (and with `FEDTUNE_KERNELS=composite`) the weight is
//! dequantized in candle's ops for each product: the same values, on any
//! device.

use std::ops::Range;

use candle_core::{DType, Device, Result, Tensor};
use half::bf16;

use super::bf16::{streamed_rows, Stored};
use super::linear::by_column_blocks;

/// Values of a row that share one scale.
pub const BLOCK: usize = 32;

/// Rows of `x` at most that decoding multiplies with int8 rows widened in
/// registers (see [`Int8Rows`]'s `streamed`).
const WIDENED_ROWS: usize = 8;

/// A frozen `(out, in)` weight as int8 blocks: `q` holds the int8 values'
/// bytes (two's complement, `U8` since candle has no int8), `scales` one
/// f32 per [`BLOCK`] values of a row (`(out, in.div_ceil(32))`).
#[derive(Debug, Clone)]
pub struct Int8Weight {
    q: Tensor,
    scales: Tensor,
}

impl Int8Weight {
    /// `w` (any float dtype, any device) quantized: per block, scale =
    /// largest magnitude / 127, value = round(w / scale). The blocks stay
    /// on `w`'s device.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        let values = w
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            candle_core::bail!(
                "quantizing a {n} × {k} weight to int8: value {bad} is {}",
                values[bad]
            )
        }
        let nb = k.div_ceil(BLOCK);
        let (mut q, mut scales) = (vec![0u8; n * k], vec![0f32; n * nb]);
        // Blocks restart at each row: a row's last block may be short.
        let rows = if k == 0 {
            [].chunks_exact(1)
        } else {
            values.chunks_exact(k)
        };
        for (j, row) in rows.enumerate() {
            for (c, block) in row.chunks(BLOCK).enumerate() {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = amax / 127.0;
                scales[j * nb + c] = scale;
                if scale > 0.0 {
                    for (d, v) in q[j * k + c * BLOCK..].iter_mut().zip(block) {
                        *d = ((v / scale).round() as i8) as u8;
                    }
                }
            }
        }
        let device = w.device();
        Ok(Self {
            q: Tensor::from_vec(q, (n, k), device)?,
            scales: Tensor::from_vec(scales, (n, nb), device)?,
        })
    }

    /// `(out, in)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        self.q.dims2()
    }

    /// The device the blocks are on.
    pub fn device(&self) -> &Device {
        self.q.device()
    }

    /// These blocks on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            q: self.q.to_device(device)?,
            scales: self.scales.to_device(device)?,
        })
    }

    /// The weight's values (`q · scale`) in `dtype`, in candle's ops on the
    /// blocks' device.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let (n, k) = self.dims2()?;
        let nb = k.div_ceil(BLOCK);
        let unsigned = self.q.to_dtype(DType::F32)?;
        let signed = (&unsigned - (unsigned.ge(128f64)?.to_dtype(DType::F32)? * 256.0)?)?;
        let scales = self
            .scales
            .unsqueeze(2)?
            .broadcast_as((n, nb, BLOCK))?
            .reshape((n, nb * BLOCK))?
            .narrow(1, 0, k)?;
        (signed * scales)?.to_dtype(dtype)
    }

    /// Bytes held: the values and their scales.
    pub fn bytes(&self) -> usize {
        self.q.elem_count() + 4 * self.scales.elem_count()
    }

    /// The int8 values' bytes and the scales, as tensors.
    pub(super) fn parts(&self) -> (&Tensor, &Tensor) {
        (&self.q, &self.scales)
    }
}

/// An int8 weight's CPU storage as [`Stored`] rows of `width` values.
pub(super) struct Int8Rows<'a> {
    pub(super) q: &'a [u8],
    pub(super) scales: &'a [f32],
    pub(super) width: usize,
}

impl Int8Rows<'_> {
    /// Row `j`'s values `cols` into `out`, a block (or the part of one in
    /// `cols`) at a time: `dequantize(bytes, scale, out)`.
    #[inline(always)]
    fn blocks<T>(
        &self,
        j: usize,
        cols: Range<usize>,
        out: &mut [T],
        mut dequantize: impl FnMut(&[u8], f32, &mut [T]),
    ) {
        assert_eq!(out.len(), cols.len());
        let scales = &self.scales[j * self.width.div_ceil(BLOCK)..];
        let row = &self.q[j * self.width..(j + 1) * self.width];
        let (mut c, mut o) = (cols.start, 0);
        while c < cols.end {
            let end = ((c / BLOCK + 1) * BLOCK).min(cols.end);
            dequantize(&row[c..end], scales[c / BLOCK], &mut out[o..o + end - c]);
            (o, c) = (o + end - c, end);
        }
    }
}

/// `bytes` (int8) times `scale`, each converted into `out`.
#[inline(always)]
fn dequantize<T>(bytes: &[u8], scale: f32, out: &mut [T], convert: impl Fn(f32) -> T) {
    for (d, &v) in out.iter_mut().zip(bytes) {
        *d = convert(f32::from(v as i8) * scale);
    }
}

/// `v` rounded to bf16, to nearest with ties to even, for the finite
/// values dequantizing gives (no NaN branch, unlike `bf16::from_f32`).
#[inline(always)]
fn round_bf16(v: f32) -> bf16 {
    let b = v.to_bits();
    bf16::from_bits((b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16)
}

impl Stored for Int8Rows<'_> {
    fn width(&self) -> usize {
        self.width
    }
    fn size(&self) -> usize {
        self.q.len()
    }
    fn bf16_row<'a>(&'a self, j: usize, cols: Range<usize>, buf: &'a mut Vec<bf16>) -> &'a [bf16] {
        buf.clear();
        buf.resize(cols.len(), bf16::ZERO);
        #[cfg(target_arch = "x86_64")]
        if super::bf16::bf16_units() {
            // SAFETY: the CPU has AVX512F and AVX512-BF16 (bf16_units).
            self.blocks(j, cols, buf, |q, s, out| unsafe {
                x86::dequantize(q, s, out)
            });
            return buf;
        }
        self.blocks(j, cols, buf, |q, s, out| dequantize(q, s, out, round_bf16));
        buf
    }
    fn f32_row(&self, j: usize, cols: Range<usize>, out: &mut Vec<f32>) {
        let start = out.len();
        out.resize(start + cols.len(), 0.0);
        self.blocks(j, cols, &mut out[start..], |q, s, out| {
            dequantize(q, s, out, |v| v)
        });
    }

    /// Decoding a row or two reads each int8 row once and multiplies it,
    /// widened to f32 in registers, with every row of `x` in f32: no bf16
    /// row in between. More rows go through bf16 rows, whose products
    /// take two multiplies an instruction.
    fn streamed(&self, x: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
        if m > WIDENED_ROWS {
            return streamed_rows(self, x, (m, k, n));
        }
        assert!(x.len() == m * k && self.width == k);
        let nb = k.div_ceil(BLOCK);
        by_column_blocks(m, n, |cols, local| {
            let c = cols.len();
            for (jj, j) in cols.enumerate() {
                let q = &self.q[j * k..(j + 1) * k];
                let scales = &self.scales[j * nb..(j + 1) * nb];
                #[cfg(target_arch = "x86_64")]
                // SAFETY: streamed runs only where bf16_units() holds, so AVX512F.
                unsafe {
                    x86::dots(x, m, (q, scales), &mut local[jj..], c)
                };
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("streamed runs only with the bf16 units ({q:?}, {scales:?}, {c})");
            }
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::bf16;

    use super::{BLOCK, WIDENED_ROWS};

    /// `bytes` (int8) times `scale`, rounded to bf16 (to nearest, ties to
    /// even, as [`super::round_bf16`]), 16 at a time.
    ///
    /// # Safety
    /// The CPU must have AVX512F and AVX512-BF16. Every load and store is
    /// of 16 values inside the first `full` sixteens of the slices, whose
    /// lengths are asserted equal.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn dequantize(bytes: &[u8], scale: f32, out: &mut [bf16]) {
        assert_eq!(bytes.len(), out.len());
        let full = bytes.len() / 16;
        let s = _mm512_set1_ps(scale);
        for c in 0..full {
            // SAFETY: c < full, so values 16c..16c+16 are inside both slices.
            unsafe {
                let q = _mm_loadu_si128(bytes.as_ptr().add(16 * c).cast());
                let v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), s);
                let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_storeu_si256(out.as_mut_ptr().add(16 * c).cast(), b);
            }
        }
        super::dequantize(
            &bytes[16 * full..],
            scale,
            &mut out[16 * full..],
            super::round_bf16,
        );
    }

    /// `out[i·stride] = x_i · w` for the `m` rows of `x` (`k` values each,
    /// `m` ≤ [`WIDENED_ROWS`]) and one int8 row `w = (q, scales)`.
    ///
    /// # Safety
    /// The CPU must have AVX512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dots(
        x: &[f32],
        m: usize,
        w: (&[u8], &[f32]),
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: as this function's.
        unsafe {
            match m {
                1 => dots_of::<1, 4>(x, w, out, stride),
                2 => dots_of::<2, 4>(x, w, out, stride),
                3 => dots_of::<3, 2>(x, w, out, stride),
                4 => dots_of::<4, 2>(x, w, out, stride),
                5 => dots_of::<5, 1>(x, w, out, stride),
                6 => dots_of::<6, 1>(x, w, out, stride),
                7 => dots_of::<7, 1>(x, w, out, stride),
                8 => dots_of::<8, 1>(x, w, out, stride),
                _ => unreachable!("1 to {WIDENED_ROWS} rows"),
            }
        }
    }

    /// [`dots`] for `R` rows: each 16 values of the int8 row widened and
    /// scaled once, then multiplied into every row's sums; `U` sums a row
    /// (`R · U` ≤ 8 registers), so consecutive multiply-adds do not wait on
    /// each other.
    ///
    /// # Safety
    /// The CPU must have AVX512F. Every load is of 16 values at an offset
    /// `off` with `off + 16 ≤ k` (the loops' bounds), inside `q` and inside
    /// each row of `x`, whose lengths are asserted.
    #[target_feature(enable = "avx512f")]
    unsafe fn dots_of<const R: usize, const U: usize>(
        x: &[f32],
        (q, scales): (&[u8], &[f32]),
        out: &mut [f32],
        stride: usize,
    ) {
        let k = q.len();
        assert!(R >= 1 && x.len() == R * k && scales.len() == k.div_ceil(BLOCK));
        assert!(out.len() > (R - 1) * stride);
        let mut acc = [[_mm512_setzero_ps(); U]; R];
        let sixteens = k / 16;
        // The 16 values at `off` into sum `u` of every row.
        macro_rules! step {
            ($off:expr, $u:expr) => {{
                let off = $off;
                // 16 divides BLOCK: these 16 values share one scale.
                let s = _mm512_set1_ps(scales[off / BLOCK]);
                // SAFETY: off + 16 ≤ 16 · sixteens ≤ k, inside q and each row of x.
                unsafe {
                    let w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        q.as_ptr().add(off).cast(),
                    )));
                    let w = _mm512_mul_ps(w, s);
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xv = _mm512_loadu_ps(x.as_ptr().add(r * k + off));
                        a[$u % U] = _mm512_fmadd_ps(xv, w, a[$u % U]);
                    }
                }
            }};
        }
        for c in 0..sixteens / 4 {
            step!(64 * c, 0);
            step!(64 * c + 16, 1);
            step!(64 * c + 32, 2);
            step!(64 * c + 48, 3);
        }
        for c in 4 * (sixteens / 4)..sixteens {
            step!(16 * c, 0);
        }
        for (r, a) in acc.iter().enumerate() {
            let tail: f32 = (16 * sixteens..k)
                .map(|c| x[r * k + c] * f32::from(q[c] as i8) * scales[c / BLOCK])
                .sum();
            let sum = a[1..].iter().fold(a[0], |s, &v| _mm512_add_ps(s, v));
            out[r * stride] = _mm512_reduce_add_ps(sum) + tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(n: usize, k: usize) -> Tensor {
        let values: Vec<f32> = (0..n * k)
            .map(|i| {
                let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * (1.0 + (i % 7) as f32)
            })
            .collect();
        Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap()
    }

    #[test]
    fn every_value_is_within_half_a_scale_and_each_block_reaches_127() {
        // 37 = one full block and a short one; row 2 zero (a zero scale).
        let w = weight(4, 37);
        let w = w
            .slice_assign(
                &[2..3, 0..37],
                &Tensor::zeros((1, 37), DType::F32, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let q = Int8Weight::quantize(&w).unwrap();
        assert_eq!(q.dims2().unwrap(), (4, 37));
        assert_eq!(q.bytes(), 4 * 37 + 4 * 4 * 2);
        let (bytes, scales) = q.parts();
        let (bytes, scales) = (
            bytes.to_vec2::<u8>().unwrap(),
            scales.to_vec2::<f32>().unwrap(),
        );
        let (orig, back) = (
            w.to_vec2::<f32>().unwrap(),
            q.dequantize(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
        );
        for j in 0..4 {
            for (b, cols) in [(0, 0..32), (1, 32..37)] {
                let s = scales[j][b];
                let amax = orig[j][cols.clone()]
                    .iter()
                    .fold(0f32, |m, v| m.max(v.abs()));
                assert!(
                    (s - amax / 127.0).abs() <= f32::EPSILON * amax,
                    "row {j} block {b}"
                );
                let peak = cols
                    .clone()
                    .map(|c| (bytes[j][c] as i8).unsigned_abs())
                    .max();
                assert_eq!(
                    peak,
                    Some(if j == 2 { 0 } else { 127 }),
                    "row {j} block {b}"
                );
                for c in cols {
                    let err = (back[j][c] - orig[j][c]).abs();
                    assert!(
                        err <= s / 2.0 * (1.0 + 1e-6),
                        "row {j} col {c}: {err} > {s}/2"
                    );
                    assert_eq!(back[j][c], f32::from(bytes[j][c] as i8) * s);
                }
            }
        }
    }

    #[test]
    fn the_rows_read_what_dequantize_gives() {
        let q = Int8Weight::quantize(&weight(3, 70)).unwrap();
        let dense = q.dequantize(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        let (bytes, scales) = q.parts();
        let (bytes, scales) = (
            bytes.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
            scales.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let rows = Int8Rows {
            q: &bytes,
            scales: &scales,
            width: 70,
        };
        let (mut wide, mut buf) = (Vec::new(), Vec::new());
        rows.f32_row(1, 30..67, &mut wide);
        assert_eq!(wide, dense[1][30..67]);
        let narrow = rows.bf16_row(2, 5..70, &mut buf);
        let expect: Vec<bf16> = dense[2][5..70].iter().map(|&v| bf16::from_f32(v)).collect();
        assert_eq!(narrow, expect);
    }

    #[test]
    fn a_weight_that_is_not_finite_is_refused() {
        let w = Tensor::new(&[[1f32, f32::NAN], [0.0, 2.0]], &Device::Cpu).unwrap();
        let e = Int8Weight::quantize(&w).unwrap_err().to_string();
        assert!(e.contains("value 1 is NaN"), "{e}");
    }
}
