//! Causal grouped-query self-attention with rotary embeddings, as one op.
//!
//! Scores, probabilities and the head reshuffles stay inside the op; the
//! probabilities are kept for the backward pass. Query rows are taken in
//! causal blocks: rows `i0..i1` need keys `0..i1` only, so about half of a
//! full `t × t` product is skipped.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

use super::gemm::{gemm, Mat, MatMut, Shared};
use super::rope::rotate;
use super::rows::{block_rows, by_dtype, data, fused, par_blocks, with_data, Real};

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
        let y = Shared::zeroed(b * t, qw);
        with_data::<T, _>(&self.bias, "attention", |bias| {
            let mb = self.bias.dims()[0];
            // One block per (sequence, kv head): its g·t × t probabilities.
            par_blocks(&mut p, g * t * t, 1, |item, probs| {
                let (bi, kv) = (item / nkv, item % nkv);
                let qg = Mat::new(&qr[(bi * nh + kv * g) * t * hd..][..g * t * hd], g * t, hd);
                let kg = Mat::new(&kr[(bi * nkv + kv) * t * hd..][..t * hd], t, hd);
                let bias = &bias[if mb == 1 { 0 } else { bi } * g * t * t..][..g * t * t];
                // This sequence's values of kv head `kv`: rows bi·t.., columns kv·hd..
                let vg = Mat::strided(&v[bi * t * kw + kv * hd..], t, hd, kw);
                let mut row = vec![zero; t];
                for hh in 0..g {
                    let h = kv * g + hh;
                    // Causal: query rows i0..i1 attend keys 0..i1 only; the rest of
                    // their probabilities stay zero.
                    for (i0, i1) in causal_blocks(t) {
                        let r0 = hh * t + i0;
                        let rows = r0..r0 + (i1 - i0);
                        // Scores of rows i0..i1 against keys 0..i1.
                        gemm(
                            &mut MatMut::new(&mut probs[r0 * t..], i1 - i0, t).cols(0..i1),
                            qg.rows(rows.clone()),
                            kg.rows(0..i1).t(),
                            false,
                        );
                        for r in rows {
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
                        // Y rows of sequence bi, columns of head h: P · V.
                        gemm(
                            &mut y.block(bi * t + i0..bi * t + i1, h * hd..(h + 1) * hd),
                            Mat::new(&probs[r0 * t..], i1 - i0, t).cols(0..i1),
                            vg.rows(0..i1),
                            false,
                        );
                    }
                }
            });
        })?;
        let y = y.into_vec();
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
        let (dq, dk, dv) = (
            Shared::zeroed(b * t, qw),
            Shared::zeroed(b * t, kw),
            Shared::zeroed(b * t, kw),
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
                        let kg = Mat::new(&kr[(bi * nkv + kv) * t * hd..][..t * hd], t, hd);
                        let vg = Mat::strided(&v[bi * t * kw + kv * hd..], t, hd, kw);
                        let seq = bi * t..(bi + 1) * t;
                        let kv_cols = kv * hd..(kv + 1) * hd;
                        dkg.fill(zero);
                        for hh in 0..g {
                            let h = kv * g + hh;
                            let ph = &p[((bi * nkv + kv) * g + hh) * t * t..][..t * t];
                            let qh = Mat::new(&qr[(bi * nh + h) * t * hd..][..t * hd], t, hd);
                            let dyh = Mat::strided(&dy[bi * t * qw + h * hd..], t, hd, qw);
                            // Causal blocks as in the forward pass: rows i0..i1 see keys 0..i1.
                            for (i0, i1) in causal_blocks(t) {
                                let rows = i1 - i0;
                                let dyb = dyh.rows(i0..i1);
                                let pb = Mat::new(&ph[i0 * t..], rows, t).cols(0..i1);
                                // dP = dY · Vᵀ
                                gemm(
                                    &mut MatMut::new(&mut ds, rows, t).cols(0..i1),
                                    dyb,
                                    vg.rows(0..i1).t(),
                                    false,
                                );
                                // dV += Pᵀ · dY (this sequence's rows, kv head kv's columns)
                                gemm(
                                    &mut dv.block(bi * t..bi * t + i1, kv_cols.clone()),
                                    pb.t(),
                                    dyb,
                                    true,
                                );
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
                                let dsv = Mat::new(&ds, rows, t).cols(0..i1);
                                // dQ = dS · K
                                gemm(
                                    &mut MatMut::new(&mut dqh[i0 * hd..], rows, hd),
                                    dsv,
                                    kg.rows(0..i1),
                                    false,
                                );
                                // dK += dSᵀ · Q
                                gemm(
                                    &mut MatMut::new(&mut dkg, i1, hd),
                                    dsv.t(),
                                    qh.rows(i0..i1),
                                    true,
                                );
                            }
                            // dQ of head h, rotated back.
                            let mut out = dq.block(seq.clone(), h * hd..(h + 1) * hd);
                            for (pos, row) in dqh.chunks(hd).enumerate() {
                                let (c, s) =
                                    (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                                rotate(row, out.row(pos), c, s, true);
                            }
                        }
                        let mut out = dk.block(seq.clone(), kv_cols.clone());
                        for (pos, row) in dkg.chunks(hd).enumerate() {
                            let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                            rotate(row, out.row(pos), c, s, true);
                        }
                    }
                });
            })
        })??;
        let (dq, dk, dv) = (dq.into_vec(), dk.into_vec(), dv.into_vec());
        Ok([dq, dk, dv])
    }
}

impl Attention {
    /// The backward pass for tensors of element type `T`: `(dq, dk, dv)`.
    fn grads<T: Real>(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        grad: &Tensor,
        saved: &[CpuStorage; 3],
    ) -> Result<[Tensor; 3]> {
        let [dq, dk, dv] = with_data::<T, _>(v, "attention", |vd| {
            with_data::<T, _>(grad, "attention", |g| self.backward(vd, g, saved))
        })???;
        let dev = q.device();
        Ok([
            Tensor::from_vec(dq, q.shape(), dev)?,
            Tensor::from_vec(dk, k.shape(), dev)?,
            Tensor::from_vec(dv, v.shape(), dev)?,
        ])
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
        let [dq, dk, dv] = match q.dtype() {
            DType::F32 => self.grads::<f32>((q, k, v), &grad, saved)?,
            DType::F64 => self.grads::<f64>((q, k, v), &grad, saved)?,
            other => candle_core::bail!("attention: unsupported dtype {other:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
