//! Every fused op against its composite reference, values and gradients, in f64 and f32.

use super::*;
use candle_core::{DType, Device, Result, Tensor, Var, D};

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
            .map(|(i, d)| Var::from_tensor(&seeded(d, i as u64).to_dtype(dtype).unwrap()).unwrap())
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
    // 18 rows go through gemm; 1 and 6 rows (decoding) stream W's rows, in
    // several blocks when W is tall, with `in` a multiple of the vector
    // width (32) or not (37, 5).
    for (x, w) in [
        (&[2, 9, 5][..], [7, 5]),
        (&[1, 1, 37][..], [100, 37]),
        (&[2, 3, 32][..], [300, 32]),
        (&[6, 37][..], [9, 37]),
    ] {
        let w = seeded(&w, 3);
        agree(
            &[x],
            |t| frozen_linear(&t[0], &w.to_dtype(t[0].dtype())?),
            |t| t[0].broadcast_matmul(&w.to_dtype(t[0].dtype())?.t()?),
        );
    }
    let w = seeded(&[7, 5], 3);
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
fn a_residual_plus_a_frozen_projection_matches_the_two_ops() {
    for (x, w) in [(&[2, 9, 5][..], [7, 5]), (&[1, 1, 37][..], [100, 37])] {
        let w = seeded(&w, 3);
        let out: Vec<usize> = x[..x.len() - 1]
            .iter()
            .copied()
            .chain([w.dim(0).unwrap()])
            .collect();
        agree(
            &[x, &out],
            |t| frozen_linear_add(&t[0], &w.to_dtype(t[0].dtype())?, &t[1]),
            |t| &t[1] + t[0].broadcast_matmul(&w.to_dtype(t[0].dtype())?.t()?)?,
        );
    }
}

#[test]
fn swiglu_then_a_frozen_projection_into_a_residual_matches_the_ops() {
    // Through gemm (19 rows) and the streamed rows of decoding (1 row).
    for (rows, out) in [
        (&[19, 23][..], &[19, 7][..]),
        (&[1, 1, 23][..], &[1, 1, 7][..]),
    ] {
        let w = seeded(&[7, 23], 6);
        agree(
            &[rows, rows, out],
            |t| swiglu_linear_add(&t[0], &t[1], &w.to_dtype(t[0].dtype())?, &t[2]),
            |t| {
                &t[2] + (t[0].silu()? * &t[1])?.broadcast_matmul(&w.to_dtype(t[0].dtype())?.t()?)?
            },
        );
    }
    // A bf16 projection: the same products as the gating then the frozen op.
    let w = seeded(&[7, 23], 6).to_dtype(DType::BF16).unwrap();
    let var =
        |seed| Var::from_tensor(&seeded(&[9, 23], seed).to_dtype(DType::F32).unwrap()).unwrap();
    let (g, u) = (var(1), var(2));
    let r = Var::from_tensor(&seeded(&[9, 7], 3).to_dtype(DType::F32).unwrap()).unwrap();
    let (g, u, r) = (g.as_tensor(), u.as_tensor(), r.as_tensor());
    let a = swiglu_linear_add(g, u, &w, r).unwrap();
    let b = (r + frozen_linear(&swiglu(g, u).unwrap(), &w).unwrap()).unwrap();
    assert!(max_diff(&a, &b) < 1e-6, "{}", max_diff(&a, &b));
    let ga = a.sum_all().unwrap().backward().unwrap();
    let gb = b.sum_all().unwrap().backward().unwrap();
    for t in [g, u, r] {
        let d = max_diff(ga.get(t).unwrap(), gb.get(t).unwrap());
        assert!(d < 1e-6, "gradients differ by {d}");
    }
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
            let k = candle_nn::rotary_emb::rope_slow(&heads(&x[1], nkv)?, &c(&cos)?, &c(&sin)?)?;
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

/// `t` in f32 as the bf16 products see it: rounded to bf16 where they run
/// on the bf16 units, as it is where the weight is widened to f32.
fn as_bf16_operand(t: &Tensor) -> Tensor {
    if bf16::bf16_units() {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    } else {
        t.clone()
    }
}

/// A frozen weight stored narrower than f32 multiplies as the f32 values
/// it holds: `op(x, w)` stores `w` so and multiplies, `values(w)` are the
/// values it holds. Where the products run on the bf16 units both operands
/// are rounded to bf16, except, when `f32_when_streamed`, in a forward of
/// at most 8 rows (decoding), which multiplies them in f32.
fn narrow_weights_multiply_as_their_values(
    op: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    values: impl Fn(&Tensor) -> Tensor,
    f32_when_streamed: bool,
) {
    // Rows through the packed kernel (1 to 40, so the 8-row tiles and their
    // remainders) and streamed (1, 2, 3, 5 and 16), outputs not a multiple of the
    // 32-column panel, odd `in`.
    for (x, w) in [
        (&[2, 9, 5][..], [7, 5]),
        (&[1, 1, 37][..], [100, 37]),
        (&[1, 2, 70][..], [50, 70]),
        (&[3, 150][..], [20, 150]),
        (&[5, 70][..], [40, 70]),
        (&[4, 4, 37][..], [50, 37]),
        (&[2, 20, 64][..], [70, 64]),
        (&[40, 33][..], [33, 33]),
    ] {
        let w32 = seeded(&w, 3).to_dtype(DType::F32).unwrap();
        let wide = as_bf16_operand(&values(&w32));
        let xv = Var::from_tensor(&seeded(x, 1).to_dtype(DType::F32).unwrap()).unwrap();
        let y = op(xv.as_tensor(), &w32).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        let rows: usize = x[..x.len() - 1].iter().product();
        let (xf, wf) = if f32_when_streamed && rows <= 8 {
            (xv.as_tensor().clone(), values(&w32))
        } else {
            (as_bf16_operand(xv.as_tensor()), wide.clone())
        };
        let expect = xf
            .to_dtype(DType::F64)
            .unwrap()
            .broadcast_matmul(&wf.to_dtype(DType::F64).unwrap().t().unwrap())
            .unwrap();
        let scale = 1.0 + max_diff(&expect, &expect.zeros_like().unwrap());
        assert!(
            max_diff(&y.to_dtype(DType::F64).unwrap(), &expect) < 1e-5 * scale,
            "{x:?} · {w:?}: values differ by {}",
            max_diff(&y.to_dtype(DType::F64).unwrap(), &expect)
        );
        // d/dx of sum(y ⊙ p) is p · W, with p rounded as the kernel rounds it.
        let p = seeded(y.dims(), 99).to_dtype(DType::F32).unwrap();
        let grads = (y * &p).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(xv.as_tensor()).unwrap();
        let expect = as_bf16_operand(&p)
            .to_dtype(DType::F64)
            .unwrap()
            .broadcast_matmul(&wide.to_dtype(DType::F64).unwrap())
            .unwrap();
        let scale = 1.0 + max_diff(&expect, &expect.zeros_like().unwrap());
        assert!(
            max_diff(&dx.to_dtype(DType::F64).unwrap(), &expect) < 1e-5 * scale,
            "{x:?} · {w:?}: input gradients differ by {}",
            max_diff(&dx.to_dtype(DType::F64).unwrap(), &expect)
        );
    }
}

#[test]
fn bf16_weights_give_the_f32_products_of_their_values_forward_and_back() {
    let bf16 = |w: &Tensor| w.to_dtype(DType::BF16);
    narrow_weights_multiply_as_their_values(
        |x, w| frozen_linear(x, &bf16(w)?),
        |w| bf16(w).unwrap().to_dtype(DType::F32).unwrap(),
        false,
    );
}

#[test]
fn int8_weights_give_the_f32_products_of_their_values_forward_and_back() {
    // Dequantized values are rounded to bf16 as they are packed; decoding
    // widens the int8 rows in registers and multiplies in f32.
    let int8 = |w: &Tensor| Int8Weight::quantize(w).unwrap();
    narrow_weights_multiply_as_their_values(
        |x, w| frozen_linear(x, Frozen::Int8(int8(w))),
        |w| int8(w).dequantize(DType::F32).unwrap(),
        true,
    );
}

#[test]
fn lora_over_a_bf16_weight_adds_the_same_low_rank_term() {
    // The fused LoRA op with a bf16 base against the bf16 base product plus
    // the low-rank term in composite ops: values and gradients of x, A, B.
    let w16 = seeded(&[70, 37], 3).to_dtype(DType::BF16).unwrap();
    let f32_var = |dims: &[usize], seed| {
        Var::from_tensor(&seeded(dims, seed).to_dtype(DType::F32).unwrap()).unwrap()
    };
    let (x, a, b) = (
        f32_var(&[3, 11, 37], 1),
        f32_var(&[4, 37], 5),
        f32_var(&[70, 4], 6),
    );
    let term = LowRank {
        a: a.as_tensor().clone(),
        b: b.as_tensor().clone(),
        scale: 0.5,
        mask: None,
    };
    let fused = lora_linear(x.as_tensor(), &w16, &term).unwrap();
    let low = x
        .as_tensor()
        .broadcast_matmul(&a.as_tensor().t().unwrap())
        .unwrap()
        .broadcast_matmul(&b.as_tensor().t().unwrap())
        .unwrap();
    let reference = (frozen_linear(x.as_tensor(), &w16).unwrap() + (low * 0.5).unwrap()).unwrap();
    assert!(
        max_diff(&fused, &reference) < 1e-4,
        "values differ by {}",
        max_diff(&fused, &reference)
    );
    let p = seeded(fused.dims(), 99).to_dtype(DType::F32).unwrap();
    let gf = (fused * &p).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (reference * &p)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for v in [&x, &a, &b] {
        let (f, r) = (
            gf.get(v.as_tensor()).unwrap(),
            gr.get(v.as_tensor()).unwrap(),
        );
        assert!(
            max_diff(f, r) < 1e-3,
            "gradients differ by {}",
            max_diff(f, r)
        );
    }
}

/// Composite-only mode turns the fused path off on its thread and only there.
#[test]
fn composite_only_switches_this_thread_off_the_fused_path() {
    for (value, composite) in [
        (None, false),
        (Some("fused"), false),
        (Some("composite"), true),
        (Some(" composite "), true),
        (Some("composit"), false),
    ] {
        assert_eq!(
            super::rows::kernels_setting(value.map(String::from)),
            composite,
            "{value:?}"
        );
    }
    let t = seeded(&[2, 3], 1).to_dtype(DType::F32).unwrap();
    let fused_here = || super::rows::fused(&t);
    assert!(fused_here());
    assert!(composite_only(|| !fused_here() && composite_forced()));
    assert!(fused_here(), "restored afterwards");
    std::thread::scope(|s| {
        composite_only(|| s.spawn(|| assert!(super::rows::fused(&t))).join().unwrap());
    });
    // Restored after a panic inside, too.
    let _ = std::panic::catch_unwind(|| composite_only(|| panic!("inside")));
    assert!(fused_here());
}

/// Two micro-batches of two sequences over a 40-token vocabulary: the
/// second sequence right-padded, some labels ignored (−100).
fn step_batches() -> Vec<crate::train::Batch> {
    let batch = |shift: u32| {
        let ids: Vec<u32> = (0..14u32).map(|i| (i * 7 + shift * 3 + 1) % 40).collect();
        let mask: Vec<u32> = (0..14)
            .map(|i| u32::from(i < 5 || (7..12).contains(&i)))
            .collect();
        let labels: Vec<i64> = ids
            .iter()
            .zip(&mask)
            .enumerate()
            .map(|(i, (&id, &m))| {
                if m == 0 || i == 0 || i == 7 {
                    -100
                } else {
                    id as i64
                }
            })
            .collect();
        let t = |v: Tensor| v.reshape((2, 7)).unwrap();
        crate::train::Batch {
            tokens: t(Tensor::new(ids, &Device::Cpu).unwrap()),
            attention_mask: t(Tensor::new(mask, &Device::Cpu).unwrap()),
            labels: t(Tensor::new(labels, &Device::Cpu).unwrap()),
        }
    };
    vec![batch(0), batch(1)]
}

/// Three AdamW steps (two micro-batches each, gradient clipping) of
/// `spec` on a tiny grouped-query model: the losses and the final
/// parameters.
fn three_steps(spec: &crate::adapter::AdapterSpec, dtype: DType) -> (Vec<f64>, Vec<Tensor>) {
    use crate::train::{NoHooks, Stepper, TrainConfig};
    let cfg = crate::model::LlamaConfig {
        vocab_size: 40,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 64,
        ..Default::default()
    };
    let model = crate::model::Llama::random(cfg, 5, dtype, &Device::Cpu).unwrap();
    let adapter = spec.build(&model, 11).unwrap();
    let train = TrainConfig {
        lr: 2e-2,
        grad_accum: 2,
        max_grad_norm: Some(0.5),
        ..TrainConfig::default()
    };
    let mut stepper = Stepper::new(adapter.as_ref(), train).unwrap();
    let batches = step_batches();
    let losses = (0..3)
        .map(|s| {
            let r = stepper
                .step(&model, adapter.as_ref(), &batches, (s, 3), &mut NoHooks)
                .unwrap();
            assert!(!r.skipped);
            r.loss
        })
        .collect();
    let params = adapter
        .vars()
        .iter()
        .map(|v| v.as_tensor().clone())
        .collect();
    (losses, params)
}

/// A whole training step — embeddings, RMSNorm, RoPE, grouped-query
/// attention with padding, SwiGLU, LoRA or prompt parameters, the head, the
/// loss, backward, clipping, AdamW — gives the same losses and parameters
/// with the fused CPU kernels as with the composite candle ops a GPU runs:
/// the GPU path's math is the tested math.
#[test]
fn a_training_step_is_the_same_fused_and_composite() {
    use crate::adapter::AdapterSpec;
    use crate::lora::LoraConfig;
    use crate::prompt::{PromptConfig, PromptMethod};
    let every_projection = LoraConfig {
        r: 4,
        target_modules: crate::model::Projection::ALL
            .map(|p| p.name().to_string())
            .to_vec(),
        ..Default::default()
    };
    let prompt = |method| AdapterSpec::Prompt {
        method,
        config: PromptConfig {
            num_virtual_tokens: 3,
            encoder_hidden_size: 8,
            ..Default::default()
        },
        init_ids: None,
    };
    let specs = [
        ("lora", AdapterSpec::Lora(every_projection)),
        // q and v only: the MLP's gating and down projection run as one op.
        (
            "lora q/v",
            AdapterSpec::Lora(LoraConfig {
                r: 4,
                ..Default::default()
            }),
        ),
        ("prefix", prompt(PromptMethod::Prefix)),
        ("p-tuning", prompt(PromptMethod::PTuning)),
    ];
    for (dtype, tol) in [(DType::F64, 1e-9), (DType::F32, 2e-4)] {
        for (name, spec) in &specs {
            let (fused_losses, fused) = three_steps(spec, dtype);
            let (losses, params) = composite_only(|| three_steps(spec, dtype));
            for (a, b) in fused_losses.iter().zip(&losses) {
                assert!(
                    (a - b).abs() < tol * a.abs(),
                    "{name} {dtype:?}: loss {a} vs {b}"
                );
            }
            // The steps moved the parameters, so agreeing is not trivial.
            assert!(
                fused_losses[2] < fused_losses[0] - 1e-3,
                "{name}: {fused_losses:?}"
            );
            for (a, b) in fused.iter().zip(&params) {
                let scale = 1.0 + max_diff(a, &a.zeros_like().unwrap());
                assert!(
                    max_diff(a, b) < tol * scale,
                    "{name} {dtype:?}: {}",
                    max_diff(a, b)
                );
            }
        }
    }
}

/// The head and the loss as one op over blocks of rows (4 blocks, the last
/// shorter) give the per-row NLL and the input gradient of the two ops
/// apart: in f64, f32 and with a bf16 head; and the value alone when the
/// input tracks no gradient.
#[test]
fn the_head_loss_in_blocks_matches_the_head_then_the_loss() {
    let (k, h, v) = (11, 6, 50);
    let targets: Vec<u32> = (0..k as u32).map(|i| (i * 17 + 3) % v as u32).collect();
    // With a bf16 head the incoming gradient is rounded to bf16 for the
    // product: the two ops apart round `weight · dlogits`, the fused op
    // `dlogits` then scales, so their gradients agree to bf16's precision.
    for (dtype, head, tol, grad_tol) in [
        (DType::F64, DType::F64, 1e-12, 1e-11),
        (DType::F32, DType::F32, 1e-5, 1e-4),
        (DType::F32, DType::BF16, 1e-5, 1e-2),
    ] {
        let w = seeded(&[v, h], 4).to_dtype(head).unwrap();
        let block = 3 * v * dtype.size_in_bytes();
        let x = Var::from_tensor(&seeded(&[k, h], 5).to_dtype(dtype).unwrap()).unwrap();
        let fused = head_loss::head_nll_rows_in(x.as_tensor(), &w, &targets, block)
            .unwrap()
            .expect("the fused path takes these");
        let logits = frozen_linear(x.as_tensor(), &w).unwrap();
        let picks = Tensor::new(targets.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let reference = candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .gather(&picks, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        let d = max_diff(&fused, &reference);
        assert!(d < tol, "{dtype:?}/{head:?}: NLL differs by {d}");
        // A per-row weighting reaches each row's gradient.
        let weights = seeded(&[k], 8).to_dtype(dtype).unwrap();
        let g = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let r = (reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (gx, rx) = (g.get(x.as_tensor()).unwrap(), r.get(x.as_tensor()).unwrap());
        let d = max_diff(gx, rx) / max_diff(rx, &rx.zeros_like().unwrap());
        assert!(
            d < grad_tol,
            "{dtype:?}/{head:?}: gradients differ by {d} relative"
        );
        // Untracked (evaluation): the same values, no gradient prepared.
        let plain = x.as_tensor().detach();
        let value = head_loss::head_nll_rows_in(&plain, &w, &targets, block)
            .unwrap()
            .unwrap();
        assert!(max_diff(&value, &fused_value(&x, &w, &targets)) < tol);
    }
}

fn fused_value(x: &Var, w: &Tensor, targets: &[u32]) -> Tensor {
    head_loss::head_nll_rows(x.as_tensor(), w, targets)
        .unwrap()
        .unwrap()
}
