//! Tests on the real default model, SmolLM2-135M-Instruct (fetched on first use).

mod common;

use std::sync::OnceLock;

use candle_core::{DType, Device};
use common::{model_path, TEXT};
use fedtune_adapters::adapter::Adapter;
use fedtune_adapters::model::{load_gguf, GgufModel};
use fedtune_adapters::tokenizer::TextTokenizer;

fn loaded() -> &'static (GgufModel, TextTokenizer) {
    static MODEL: OnceLock<(GgufModel, TextTokenizer)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let m = load_gguf(model_path(), DType::F32, &Device::Cpu).unwrap();
        let tok = TextTokenizer::from_gguf(&m.content).unwrap();
        (m, tok)
    })
}

#[test]
fn the_default_config_is_the_default_models_shape() {
    let got = loaded().0.model.config();
    let mut want = fedtune_adapters::model::LlamaConfig::default();
    // The header stores epsilon as an f32 (1e-5 reads back as 9.99999975e-6).
    assert!((got.rms_norm_eps - want.rms_norm_eps).abs() < 1e-12);
    want.rms_norm_eps = got.rms_norm_eps;
    assert_eq!(got, &want);
}

#[test]
fn gguf_tokenizer_round_trips_exactly() {
    let (_, tok) = loaded();
    for text in [
        TEXT,
        "Unicode: naïve café — 日本語のテキスト, emoji 🚀🔥, Ελληνικά, русский.",
        "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\tprint(fib(10))  # 55\r\n",
        "  leading spaces, trailing   \n\n\n",
        "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n",
    ] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
    let ids = tok.encode("<|im_start|>user").unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is the special token 1");
    assert_eq!(tok.eos_id, 2);
    // Digits are split one by one, as SmolLM's pre-tokenizer does.
    let ids = tok.encode("2024").unwrap();
    assert_eq!(ids.len(), 4);
    assert!(tok
        .chat_template
        .as_deref()
        .is_some_and(|t| t.contains("<|im_start|>")));

    // Saved as tokenizer.json, it loads as a Hugging Face tokenizer and encodes identically.
    let dir = std::env::temp_dir().join(format!("fedtune-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    tok.inner.save(&path, false).unwrap();
    let again = TextTokenizer::from_file(&path, tok.eos_id).unwrap();
    for text in [TEXT, "<|im_start|>assistant\nx = 3.14159<|im_end|>"] {
        assert_eq!(again.encode(text).unwrap(), tok.encode(text).unwrap());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn twenty_adamw_steps_halve_the_loss_and_the_exported_adapter_reloads_exactly() {
    use candle_core::Tensor;
    use fedtune_adapters::lora::{Lora, LoraConfig};
    use fedtune_adapters::loss::IGNORE_INDEX;
    use fedtune_adapters::peft::{load_lora, save_lora};
    use fedtune_adapters::train::{fit, Batch, NoHooks, Stepper, TrainConfig};

    let (m, tok) = loaded();
    let model = &m.model;
    let device = Device::Cpu;
    let ids = tok.encode(TEXT).unwrap();
    let (t, rows) = (64usize, 2usize);
    assert!(ids.len() >= t * rows);
    let tokens: Vec<u32> = ids[..t * rows].to_vec();
    // The first 8 tokens of each row are "prompt": no loss there.
    let labels: Vec<i64> = tokens
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if i % t < 8 {
                IGNORE_INDEX
            } else {
                i64::from(id)
            }
        })
        .collect();
    let batch = Batch {
        tokens: Tensor::from_vec(tokens, (rows, t), &device).unwrap(),
        attention_mask: Tensor::ones((rows, t), DType::U32, &device).unwrap(),
        labels: Tensor::from_vec(labels, (rows, t), &device).unwrap(),
    };
    let lora = Lora::new(
        model.config(),
        LoraConfig::default(),
        1,
        DType::F32,
        &device,
    )
    .unwrap();
    assert_eq!(
        lora.num_parameters(),
        30 * 2 * (8 * 576 + 576 * 8 + 8 * 576 + 192 * 8) / 2
    );
    let tc = TrainConfig {
        lr: 3e-3,
        ..TrainConfig::default()
    };
    let mut stepper = Stepper::new(&lora, tc).unwrap();
    let reports = fit(
        model,
        &lora,
        &mut stepper,
        std::slice::from_ref(&batch),
        20,
        &mut NoHooks,
    )
    .unwrap();
    let (first, last) = (reports[0].loss, reports[19].loss);
    println!("LoRA loss over 20 AdamW steps: {first:.4} → {last:.4}");
    assert!(last <= 0.5 * first, "loss {first} → {last}");

    let dir = std::env::temp_dir().join(format!("fedtune-adapter-{}", std::process::id()));
    save_lora(
        &dir,
        lora.config(),
        &lora.to_param_set().unwrap(),
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    .unwrap();
    let (config, params) = load_lora(&dir).unwrap();
    let reloaded = Lora::new(model.config(), config, 2, DType::F32, &device).unwrap();
    reloaded.load_param_set(&params).unwrap();
    let a = model
        .forward(&batch.tokens, Some(&batch.attention_mask), Some(&lora))
        .unwrap();
    let b = model
        .forward(&batch.tokens, Some(&batch.attention_mask), Some(&reloaded))
        .unwrap();
    let diff = common::max_abs_diff(&a, &b);
    assert_eq!(diff, 0.0, "re-imported adapter gives identical logits");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn greedy_generation_with_the_cache_matches_recomputing_everything() {
    use candle_core::{Tensor, D};
    use fedtune_adapters::generate::{generate, FinishReason, GenerationConfig};

    let (m, tok) = loaded();
    let prompt = tok
        .encode("<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        ..GenerationConfig::default()
    };
    let fast = generate(&m.model, tok, &prompt, &cfg, None).unwrap();
    assert!(!fast.ids.is_empty());

    // The naive way: a full forward pass over everything for each new token.
    let mut ids = prompt.clone();
    let mut naive = Vec::new();
    for _ in 0..fast.ids.len() {
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = m.model.forward(&x, None, None).unwrap().squeeze(0).unwrap();
        let next = logits
            .get(ids.len() - 1)
            .unwrap()
            .argmax(D::Minus1)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        naive.push(next);
        ids.push(next);
    }
    assert_eq!(fast.ids, naive);
    println!("greedy: {:?} ({:?})", fast.text, fast.finish);

    // Seeded sampling is reproducible; a vanishing nucleus is greedy.
    let sample = |seed, top_p| {
        let c = GenerationConfig {
            max_new_tokens: 8,
            temperature: 0.9,
            top_p,
            seed,
            stop: vec![],
            ignore_eos: false,
        };
        generate(&m.model, tok, &prompt, &c, None).unwrap().ids
    };
    assert_eq!(sample(7, 0.95), sample(7, 0.95));
    assert_eq!(sample(7, 1e-9), fast.ids[..8.min(fast.ids.len())].to_vec());

    // A stop sequence ends the continuation and is cut from the text.
    let first_word = fast.text.split_whitespace().next().unwrap().to_string();
    let stopped = generate(
        &m.model,
        tok,
        &prompt,
        &GenerationConfig {
            stop: vec![first_word.clone()],
            ..cfg
        },
        None,
    )
    .unwrap();
    assert_eq!(stopped.finish, FinishReason::Stop(first_word.clone()));
    assert!(!stopped.text.contains(&first_word), "{:?}", stopped.text);
}

#[test]
fn batched_generation_over_a_shared_prefix_matches_generating_alone() {
    use fedtune_adapters::eval::batch::{
        aligned_batches, generate_aligned, loglikelihoods, SharedPrefix,
    };
    use fedtune_adapters::generate::{generate, GenerationConfig};

    let (m, tok) = loaded();
    let prefix_text = "Q: What is 2 + 3?\nA: 2 + 3 = 5. The answer is 5.";
    let questions = [
        "\n\nQ: What is 4 + 4?\nA:",
        "\n\nQ: What is 9 - 1?\nA:",
        "\n\nQ: Name a fruit that is red.\nA:",
        "\n\nQ: What is 7 + 6?\nA:",
    ];
    let cfg = GenerationConfig {
        max_new_tokens: 10,
        stop: vec!["\n\n".into()],
        ..GenerationConfig::default()
    };
    let prefix = SharedPrefix::new(&m.model, tok, prefix_text, None).unwrap();
    let ids: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| {
            prefix
                .continuation(tok, q)
                .unwrap()
                .expect("clean boundary")
        })
        .collect();
    let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
    let groups = aligned_batches(&lengths, 8);
    assert!(groups.iter().any(|g| g.len() >= 2), "{lengths:?}");
    for group in groups {
        let seqs: Vec<&[u32]> = group.iter().map(|&i| ids[i].as_slice()).collect();
        let seeds = vec![0; seqs.len()];
        let batched = generate_aligned(&m.model, tok, &prefix, &seqs, &seeds, &cfg, None).unwrap();
        for (&i, got) in group.iter().zip(&batched) {
            let whole = tok
                .encode(&format!("{prefix_text}{}", questions[i]))
                .unwrap();
            let alone = generate(&m.model, tok, &whole, &cfg, None).unwrap();
            assert_eq!(got.ids, alone.ids, "{:?}", questions[i]);
            assert_eq!(got.text, alone.text);
        }
    }

    // Log-likelihoods over the prefix cache equal a full forward pass's.
    let ctx = &ids[0];
    let choices: Vec<Vec<u32>> = [" 8", " 16 apples"]
        .iter()
        .map(|c| tok.encode_continuation(c).unwrap())
        .collect();
    let pairs: Vec<(&[u32], &[u32])> = choices.iter().map(|c| (&ctx[..], &c[..])).collect();
    let fast = loglikelihoods(&m.model, &prefix, &pairs, None).unwrap();
    for (c, got) in choices.iter().zip(fast) {
        let mut all = tok
            .encode(&format!("{prefix_text}{}", questions[0]))
            .unwrap();
        let start = all.len();
        all.extend_from_slice(c);
        let x = candle_core::Tensor::new(all.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = m.model.forward(&x, None, None).unwrap().squeeze(0).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap();
        let want: f64 = c
            .iter()
            .enumerate()
            .map(|(j, &id)| {
                f64::from(
                    logp.get(start + j - 1)
                        .unwrap()
                        .get(id as usize)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                )
            })
            .sum();
        assert!((got - want).abs() < 1e-3, "{got} vs {want}");
    }
}

#[test]
fn a_bf16_base_predicts_and_trains_as_the_f32_one_does() {
    // The bar issue 17 sets for bf16 compute: the next-token argmax agrees
    // with f32 at ≥ 98% of 128 tokens of real text, and 50 LoRA steps on a
    // fixed batch end within 2% of the f32 loss.
    predicts_and_trains_as_f32(DType::BF16, 0.02);
}

#[test]
fn an_int8_base_predicts_and_trains_as_the_f32_one_does() {
    // Issue 17's bar for an int8 base: within 5% of the f32 loss after 50
    // LoRA steps; the argmax bar of bf16 holds as well.
    predicts_and_trains_as_f32(DType::U8, 0.05);
}

/// The default model with its frozen base in `dtype` against f32: next-token
/// argmax over 128 tokens of real text agrees at ≥ 98%, and 50 LoRA steps
/// on a fixed batch end within `tolerance` of the f32 loss.
fn predicts_and_trains_as_f32(dtype: DType, tolerance: f64) {
    use candle_core::Tensor;
    use fedtune_adapters::lora::{Lora, LoraConfig};
    use fedtune_adapters::train::{fit, NoHooks, Stepper, TrainConfig};

    let (m, tok) = loaded();
    let device = Device::Cpu;
    let f32_model = &m.model;
    let narrow_model = f32_model.with_compute(dtype).unwrap();
    assert_eq!(narrow_model.compute_dtype(), dtype);
    assert_eq!(narrow_model.dtype(), DType::F32, "activations stay f32");
    let ids = tok.encode(TEXT).unwrap();
    assert!(ids.len() >= 128);
    let tokens = Tensor::from_vec(ids[..128].to_vec(), (1, 128), &device).unwrap();
    let logits = |model: &fedtune_adapters::model::Llama| {
        let l = model.forward(&tokens, None, None).unwrap();
        assert_eq!(l.dtype(), DType::F32);
        l
    };
    let (la, lb) = (logits(f32_model), logits(&narrow_model));
    // The bf16 weights did take part: the logits move, a little.
    let moved = common::max_abs_diff(&la, &lb);
    let scale = common::max_abs_diff(&la, &la.zeros_like().unwrap());
    println!("{dtype:?} vs f32 logits: max difference {moved:.4} of {scale:.1}");
    assert!(
        moved > 1e-3 && moved < 0.1 * scale,
        "max logit difference {moved} of {scale}"
    );
    let argmax = |l: &Tensor| -> Vec<u32> {
        l.argmax(candle_core::D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (argmax(&la), argmax(&lb));
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    println!("{dtype:?} vs f32 next-token argmax: {agree} of 128 agree");
    assert!(agree * 100 >= 98 * 128, "{agree} of 128 agree");

    let batch = common::lm_batch(ids[..128].to_vec(), 2, 64);
    let final_loss = |model: &fedtune_adapters::model::Llama| -> f64 {
        let lora = Lora::new(
            model.config(),
            LoraConfig::default(),
            1,
            DType::F32,
            &device,
        )
        .unwrap();
        let tc = TrainConfig {
            lr: 1e-3,
            ..TrainConfig::default()
        };
        let mut stepper = Stepper::new(&lora, tc).unwrap();
        let reports = fit(
            model,
            &lora,
            &mut stepper,
            std::slice::from_ref(&batch),
            50,
            &mut NoHooks,
        )
        .unwrap();
        reports.last().unwrap().loss
    };
    // The f32 run is shared by the tests that compare with it.
    static F32_LOSS: OnceLock<f64> = OnceLock::new();
    let l32 = *F32_LOSS.get_or_init(|| final_loss(f32_model));
    let narrow = final_loss(&narrow_model);
    println!("50 LoRA steps: f32 loss {l32:.6}, {dtype:?} base {narrow:.6}");
    assert!(
        (narrow - l32).abs() <= tolerance * l32,
        "f32 {l32} vs {dtype:?} {narrow}"
    );
}
