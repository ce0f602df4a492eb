//! `fedtune bench scripts`: what the Rhai script host costs per training step
//! and per aggregation, next to the native path, on the default model.
//!
//! Per aggregation: native FedAvg against `fedavg.rhai` (the same native
//! reduction behind a script call: the difference is the host) and
//! `fedadam.rhai` (a server optimizer written in the script, a dozen
//! element-wise passes), each the median of `--calls` calls over the default
//! model's LoRA adapter (r 8 on q/v) with `--clients` updates.
//!
//! Per training step: the four per-step hook points (`on_batch_start` …
//! `on_batch_end`) of a script that defines them all and does nothing — the
//! host's own cost — and FedProx's `on_batch_forward`, which also builds the
//! proximal term; each the median of `--calls`, as a share of the median time
//! of `--steps` real training steps (batch 4 × 128, AdamW) without hooks. The
//! whole step with the FedProx hook (its term's backward included) is timed too.

use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::{DType, Device};
use fedtune_adapters::adapter::Adapter;
use fedtune_adapters::hooks::{HookScript, BUILT_IN_HOOKS};
use fedtune_adapters::lora::{Lora, LoraConfig};
use fedtune_adapters::train::{Batch, HookCtx, NoHooks, Stepper, TrainConfig, TrainHooks};
use fedtune_kernel::script::{ScriptAggregator, ScriptHost, ScriptSource, ScriptingSection};
use fedtune_kernel::{Aggregator, ClientUpdate, FedAvg, ParamSet};
use serde::Serialize;

#[derive(Debug, Serialize)]
struct ScriptBench {
    calls: usize,
    clients: usize,
    adapter_parameters: usize,
    native_fedavg_ms: f64,
    script_fedavg_ms: f64,
    script_fedadam_ms: f64,
    step_s: f64,
    step_with_fedprox_s: f64,
    empty_hooks_per_step_ms: f64,
    fedprox_forward_hook_ms: f64,
    empty_hooks_share_of_step: f64,
    fedprox_hook_share_of_step: f64,
}

fn median_ms(calls: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[calls / 2])
}

fn built_in_hook(name: &str) -> ScriptSource {
    let (name, text) = BUILT_IN_HOOKS
        .iter()
        .find(|(n, _)| *n == name)
        .expect("a shipped hook");
    ScriptSource::BuiltIn { name, text }
}

/// Median milliseconds per aggregation: native FedAvg, `fedavg.rhai` and `fedadam.rhai`.
fn aggregation_ms(
    global: &ParamSet,
    updates: &[ClientUpdate],
    calls: usize,
) -> Result<(f64, f64, f64)> {
    let native = median_ms(calls, || {
        FedAvg.aggregate(global, updates, 1)?;
        Ok(())
    })?;
    let aggregator = |name: &str| -> Result<ScriptAggregator> {
        let source = fedtune_kernel::script::AggregatorSection {
            script: Some(name.into()),
            params: toml::Table::new(),
        }
        .resolve(None)?
        .expect("a shipped aggregator");
        Ok(ScriptAggregator::new(
            ScriptHost::new(&ScriptingSection::default()),
            &source,
            &toml::Table::new(),
        )?)
    };
    let mut fedavg = aggregator("fedavg")?;
    ensure!(
        fedavg.aggregate(global, updates, 1)? == FedAvg.aggregate(global, updates, 1)?,
        "fedavg.rhai differs from native FedAvg"
    );
    let script_fedavg = median_ms(calls, || {
        fedavg.aggregate(global, updates, 1)?;
        Ok(())
    })?;
    let mut fedadam = aggregator("fedadam")?;
    let mut round = 0;
    let script_fedadam = median_ms(calls, || {
        round += 1;
        fedadam.aggregate(global, updates, round)?;
        Ok(())
    })?;
    Ok((native, script_fedavg, script_fedadam))
}

/// `this.hp` of a hook script: `mu`.
fn hp(mu: f64) -> fedtune_kernel::script::rhai::Map {
    let mut m = fedtune_kernel::script::rhai::Map::new();
    m.insert("mu".into(), mu.into());
    m
}

/// Median milliseconds of the four per-step hook points of a script that
/// defines them all and does nothing, and of FedProx's `on_batch_forward`.
fn hook_ms(lora: &Lora, global: &ParamSet, b: &Batch, calls: usize) -> Result<(f64, f64)> {
    let empty = "fn on_batch_start(ctx) {}\nfn on_batch_forward(ctx) {}\nfn on_batch_backward(ctx) {}\nfn on_batch_end(ctx) {}\n";
    let mut empty = HookScript::new(
        &ScriptingSection::default(),
        &ScriptSource::BuiltIn {
            name: "empty",
            text: empty,
        },
        hp(0.0),
    )?;
    let empty_ms = {
        let mut hooks = empty.bind(lora, global, (1, 1, 100, calls))?;
        median_ms(calls, || {
            let mut ctx = HookCtx::new(0, 0, 1e-4, b, lora);
            hooks.on_batch_start(&mut ctx)?;
            ctx.loss = Some(2.0);
            hooks.on_batch_forward(&mut ctx)?;
            hooks.on_batch_backward(&mut ctx)?;
            hooks.on_batch_end(&mut ctx)?;
            Ok(())
        })?
    };
    let mut fedprox = HookScript::new(
        &ScriptingSection::default(),
        &built_in_hook("fedprox"),
        hp(0.01),
    )?;
    let fedprox_ms = {
        let mut hooks = fedprox.bind(lora, global, (1, 1, 100, calls))?;
        median_ms(calls, || {
            let mut ctx = HookCtx::new(0, 0, 1e-4, b, lora);
            ctx.loss = Some(2.0);
            hooks.on_batch_forward(&mut ctx)?;
            ensure!(ctx.added_loss().is_some(), "fedprox added no term");
            Ok(())
        })?
    };
    Ok((empty_ms, fedprox_ms))
}

/// `fedtune bench scripts`.
pub fn scripts(calls: usize, clients: usize, steps: usize, json: bool) -> Result<()> {
    ensure!(
        calls > 0 && clients > 0 && steps > 0,
        "--calls, --clients and --steps must be positive"
    );
    let device = Device::Cpu;
    let loaded = super::train::default_model_f32()?;
    let model = &loaded.model;
    let lora_cfg = LoraConfig {
        lora_dropout: 0.0,
        ..LoraConfig::default()
    };
    let lora = Lora::new(model.config(), lora_cfg, 1, DType::F32, &device)?;
    let global = lora.to_param_set()?;

    // Aggregation: `clients` updates a small, distinct step away from the global adapter.
    let updates: Vec<ClientUpdate> = (1..=clients as u32)
        .map(|c| {
            ClientUpdate::new(
                c,
                100 * u64::from(c),
                global.map_values(|x| x + 1e-3 * c as f32),
            )
        })
        .collect();
    let (native_fedavg_ms, script_fedavg_ms, script_fedadam_ms) =
        aggregation_ms(&global, &updates, calls)?;

    // Training steps, as in `fedtune bench train-step`.
    let b = super::train::seeded_batch(model.config().vocab_size, 4, 128, &device)?;
    let one = std::slice::from_ref(&b);
    let mut stepper = Stepper::new(&lora, TrainConfig::default())?;
    stepper.step(model, &lora, one, (0, 1), &mut NoHooks)?;
    let step_s = median_ms(steps, || {
        stepper.step(model, &lora, one, (1, 2), &mut NoHooks)?;
        Ok(())
    })? / 1e3;
    let mut fedprox = HookScript::new(
        &ScriptingSection::default(),
        &built_in_hook("fedprox"),
        hp(0.01),
    )?;
    let step_with_fedprox_s = {
        let mut hooks = fedprox.bind(&lora, &global, (1, 1, 100, steps))?;
        median_ms(steps, || {
            stepper.step(model, &lora, one, (1, 2), &mut hooks)?;
            Ok(())
        })? / 1e3
    };
    let (empty_hooks_per_step_ms, fedprox_forward_hook_ms) = hook_ms(&lora, &global, &b, calls)?;
    let report = ScriptBench {
        calls,
        clients,
        adapter_parameters: global.num_elements(),
        native_fedavg_ms,
        script_fedavg_ms,
        script_fedadam_ms,
        step_s,
        step_with_fedprox_s,
        empty_hooks_per_step_ms,
        fedprox_forward_hook_ms,
        empty_hooks_share_of_step: empty_hooks_per_step_ms / 1e3 / step_s,
        fedprox_hook_share_of_step: fedprox_forward_hook_ms / 1e3 / step_s,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report, steps);
    }
    Ok(())
}

fn print_table(r: &ScriptBench, steps: usize) {
    println!(
        "Script host on the default model (LoRA r 8 q/v, {} parameters), medians of {} calls:\n\
         | path | native | script | script / native |\n|---|---|---|---|\n\
         | aggregation, FedAvg, {} clients | {:.3} ms | {:.3} ms | {:.2}x |\n\
         | aggregation, FedAdam (script only) | | {:.3} ms | |\n\
         | training step, 4 per-step hooks doing nothing | {:.3} s | +{:.3} ms | +{:.4}% |\n\
         | training step, FedProx on_batch_forward (builds the term) | {:.3} s | +{:.3} ms | +{:.3}% |\n\
         | whole step with FedProx (term's backward included), median of {steps} | {:.3} s | {:.3} s | {:.3}x |",
        r.adapter_parameters,
        r.calls,
        r.clients,
        r.native_fedavg_ms,
        r.script_fedavg_ms,
        r.script_fedavg_ms / r.native_fedavg_ms,
        r.script_fedadam_ms,
        r.step_s,
        r.empty_hooks_per_step_ms,
        100.0 * r.empty_hooks_share_of_step,
        r.step_s,
        r.fedprox_forward_hook_ms,
        100.0 * r.fedprox_hook_share_of_step,
        r.step_s,
        r.step_with_fedprox_s,
        r.step_with_fedprox_s / r.step_s,
    );
}
