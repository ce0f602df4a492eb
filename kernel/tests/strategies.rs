//! The server's strategy as scripts: the shipped algorithms against hand
//! computations, the hooks in whole courses, and bad strategies refused.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fedtune_kernel::course::{run_in_process, LeastSquaresTrainer, SyntheticSpec};
use fedtune_kernel::linalg::{self, Matrix};
use fedtune_kernel::script::{AggregatorSection, ScriptAggregator, ScriptHost, ScriptSource};
use fedtune_kernel::{
    Aggregator, ClientUpdate, CourseConfig, Event, FedAvg, MetricsLog, ParamSet, ParamTensor,
};
use rand::{Rng, SeedableRng};

fn shipped(name: &str, hp: &str) -> ScriptAggregator {
    let section = AggregatorSection {
        script: Some(name.into()),
        params: hp.parse().unwrap(),
    };
    let source = section.resolve(None).unwrap().unwrap();
    ScriptAggregator::new(
        ScriptHost::new(&Default::default()),
        &source,
        &section.params,
    )
    .unwrap()
}

fn from_text(text: &str) -> ScriptAggregator {
    let leaked: &'static str = Box::leak(text.to_string().into_boxed_str());
    let source = ScriptSource::BuiltIn {
        name: "strategy",
        text: leaked,
    };
    ScriptAggregator::new(
        ScriptHost::new(&Default::default()),
        &source,
        &toml::Table::new(),
    )
    .unwrap()
}

fn vector(w: &[f32]) -> ParamSet {
    let mut p = ParamSet::new();
    p.insert("w", vec![w.len()], w.to_vec()).unwrap();
    p
}

fn w(p: &ParamSet) -> Vec<f32> {
    p.get("w").unwrap().data().to_vec()
}

#[test]
fn fednova_normalizes_by_local_steps() {
    // p = ½ each; d₁ = (0 − (−2, 0))/2 = (1, 0), d₂ = (0 − (0, −4))/4 = (0, 1);
    // τ_eff = 3, so x' = −3·(½, ½) = (−1.5, −1.5) (FedAvg would give (−1, −2)).
    let x = vector(&[0.0, 0.0]);
    let mut a = ClientUpdate::new(1, 5, vector(&[-2.0, 0.0]));
    a.local_steps = Some(2);
    let mut b = ClientUpdate::new(2, 5, vector(&[0.0, -4.0]));
    b.local_steps = Some(4);
    let out = shipped("fednova", "")
        .aggregate(&x, &[a.clone(), b.clone()], 1)
        .unwrap();
    assert_eq!(w(&out), [-1.5, -1.5]);
    // Equal steps: FedAvg.
    b.local_steps = Some(2);
    b.params = vector(&[0.0, -2.0]);
    let nova = shipped("fednova", "")
        .aggregate(&x, &[a.clone(), b.clone()], 1)
        .unwrap();
    assert_eq!(nova, FedAvg.aggregate(&x, &[a.clone(), b], 1).unwrap());
    // A client that does not say how many steps it took is an error, not a guess.
    a.local_steps = None;
    let err = shipped("fednova", "")
        .aggregate(&x, &[a], 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("did not report its local steps"), "{err}");
}

fn updates_of(values: &[[f32; 2]], samples: &[u64]) -> Vec<ClientUpdate> {
    values
        .iter()
        .zip(samples)
        .enumerate()
        .map(|(i, (v, &n))| ClientUpdate::new(i as u32 + 1, n, vector(v)))
        .collect()
}

#[test]
fn krum_and_multi_krum_keep_the_updates_with_the_closest_neighbours() {
    // Values 0, 1, 2, 100, 3 (and 0 in the second coordinate); f = 1, so each
    // score sums the 2 nearest squared distances: 5, 2, 2, ≫, 5.
    let values = [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [100.0, 0.0], [3.0, 0.0]];
    let ups = updates_of(&values, &[1, 1, 2, 1, 1]);
    let g = vector(&[0.0, 0.0]);
    // Krum: the tie between clients 2 and 3 goes to client 2.
    assert_eq!(
        w(&shipped("krum", "f = 1").aggregate(&g, &ups, 1).unwrap()),
        [1.0, 0.0]
    );
    // Multi-Krum, m = 3: clients 2, 3 and (tie at 5 with client 5) client 1,
    // averaged by samples: (0·1 + 1·1 + 2·2) / 4.
    let mk = shipped("krum", "f = 1\nm = 3")
        .aggregate(&g, &ups, 1)
        .unwrap();
    assert_eq!(w(&mk), [1.25, 0.0]);
    let err = shipped("krum", "f = 2")
        .aggregate(&g, &ups, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs at least 7 updates"), "{err}");
}

#[test]
fn bulyan_selects_by_krum_then_averages_around_the_median() {
    // Computed independently (Python, the paper's algorithm): Krum picks
    // clients 3, 4, 2, 5, 1; per coordinate the 3 values closest to the
    // median are averaged: (1 + 2 + 3)/3 = 2 and (5 + 4.9 + 4)/3.
    let values = [
        [0.0, 4.0],
        [1.0, 4.9],
        [2.0, 5.0],
        [3.0, 7.0],
        [4.0, 8.0],
        [100.0, -50.0],
        [-100.0, 70.0],
    ];
    let ups = updates_of(&values, &[1; 7]);
    let out = w(&shipped("bulyan", "f = 1")
        .aggregate(&vector(&[0.0, 0.0]), &ups, 1)
        .unwrap());
    assert!(
        (out[0] - 2.0).abs() < 1e-6 && (out[1] - 13.9 / 3.0).abs() < 1e-5,
        "{out:?}"
    );
    let err = shipped("bulyan", "f = 2")
        .aggregate(&vector(&[0.0, 0.0]), &ups, 1)
        .unwrap_err();
    assert!(err.to_string().contains("at least 11"), "{err}");
}

const A: &str = "m.q_proj.lora_A.weight";
const B: &str = "m.q_proj.lora_B.weight";

fn random_lora(r: usize, (d_in, d_out): (usize, usize), rng: &mut impl Rng) -> ParamSet {
    let mut p = ParamSet::new();
    let a: Vec<f32> = (0..r * d_in).map(|_| rng.random_range(-1.0..1.0)).collect();
    let b: Vec<f32> = (0..d_out * r)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    p.insert(A, vec![r, d_in], a).unwrap();
    p.insert(B, vec![d_out, r], b).unwrap();
    p
}

fn to_matrix(t: &ParamTensor) -> Matrix {
    let [r, c] = t.shape() else { panic!("2-D") };
    Matrix::from_rows(*r, *c, t.data().iter().map(|&x| f64::from(x)).collect()).unwrap()
}

/// `scale · B·A` of a LoRA set, in f64.
fn product(p: &ParamSet, alpha: f64) -> Matrix {
    let a = to_matrix(p.get(A).unwrap());
    let b = to_matrix(p.get(B).unwrap());
    let scale = alpha / a.rows as f64;
    let mut m = b.matmul(&a).unwrap();
    m.data.iter_mut().for_each(|x| *x *= scale);
    m
}

fn truncation(m: &Matrix, r: usize) -> Matrix {
    let d = linalg::svd(m, r);
    let mut us = d.u.clone();
    for i in 0..us.rows {
        for (k, s) in d.s.iter().enumerate() {
            us.data[i * us.cols + k] *= s;
        }
    }
    us.matmul(&d.v.transpose()).unwrap()
}

fn max_diff(a: &Matrix, b: &Matrix) -> f64 {
    assert_eq!((a.rows, a.cols), (b.rows, b.cols));
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn flexlora_redistributes_the_rank_truncated_weighted_sum_of_the_products() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let dims = (7, 6);
    let alpha = 6.0;
    let global = random_lora(3, dims, &mut rng);
    let mut flex = shipped("flexlora", "ranks = [1, 2, 3]\nlora_alpha = 6.0");
    // configure_fit: client c gets rank c, the truncation of the global product.
    let ins = flex.configure_fit(&global, &[1, 2, 3], 1).unwrap();
    let whole = product(&global, alpha);
    for (i, r) in ins.iter().zip([1usize, 2, 3]) {
        let p = i.params.as_ref().unwrap();
        assert_eq!(p.get(A).unwrap().shape(), [r, dims.0]);
        assert_eq!(i.config["rank"], serde_json::json!(r));
        let err = max_diff(&product(p, alpha), &truncation(&whole, r));
        assert!(err < 1e-4, "client {} rank {r}: {err}", i.client);
    }
    // aggregate_fit: the global product is the rank-3 truncation of Σ pᵢ·sᵢ·BᵢAᵢ.
    let clients: Vec<ClientUpdate> = [(1, 1, 10u64), (2, 2, 30), (3, 3, 60)]
        .iter()
        .map(|&(c, r, n)| ClientUpdate::new(c, n, random_lora(r, dims, &mut rng)))
        .collect();
    let mut sum = Matrix::zeros(dims.1, dims.0);
    for u in &clients {
        let p = u.n_samples as f64 / 100.0;
        for (s, x) in sum.data.iter_mut().zip(product(&u.params, alpha).data) {
            *s += p * x;
        }
    }
    let next = flex.aggregate(&global, &clients, 1).unwrap();
    let err = max_diff(&product(&next, alpha), &truncation(&sum, 3));
    assert!(err < 1e-4, "{err}");
    // The sum has rank up to 6: at rank 3 the truncation is not the sum itself.
    assert!(max_diff(&truncation(&sum, 3), &sum) > 1e-2);
}

#[test]
fn flexlora_sends_trainable_factors_when_the_global_product_is_zero() {
    // Round 1 of a fresh LoRA: B = 0. Clients must still get an A with
    // independent rows, or no gradient would ever reach B.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let mut global = random_lora(4, (5, 6), &mut rng);
    global.insert(B, vec![6, 4], vec![0.0; 24]).unwrap();
    let ins = shipped("flexlora", "ranks = [2]\nlora_alpha = 8.0")
        .configure_fit(&global, &[1], 1)
        .unwrap();
    let p = ins[0].params.as_ref().unwrap();
    assert!(p.get(B).unwrap().data().iter().all(|&x| x == 0.0));
    let a = to_matrix(p.get(A).unwrap());
    let gram = a.matmul(&a.transpose()).unwrap();
    assert!(max_diff(&gram, &Matrix::eye(2)) < 1e-6, "{gram:?}");
}

#[test]
fn hetlora_zero_pads_and_truncates_ranks() {
    // Global rank 2, alpha 2 (scale 1 at rank 2); client 1 has rank 1 (scale 2).
    let mut g = ParamSet::new();
    g.insert(A, vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
    g.insert(B, vec![1, 2], vec![5.0, 6.0]).unwrap();
    let mut het = shipped(
        "hetlora",
        "ranks = [1, 2]\nlora_alpha = 2.0\nweighting = \"samples\"",
    );
    let ins = het.configure_fit(&g, &[1, 2], 1).unwrap();
    // Client 1: the first rank, B rescaled so 2·B₁A₁ = 1·(first rank of BA).
    let p1 = ins[0].params.as_ref().unwrap();
    assert_eq!(p1.get(A).unwrap().data(), [1.0, 2.0]);
    assert_eq!(p1.get(B).unwrap().data(), [2.5]);
    assert_eq!(ins[1].params.as_ref().unwrap(), &g);
    // Aggregation, by samples 1 : 3. Client 1 (rank 1): A (1, 1), B (2) → in
    // the global scaling B' = 4, padded A [[1, 1], [0, 0]], B [4, 0].
    let mut p1 = ParamSet::new();
    p1.insert(A, vec![1, 2], vec![1.0, 1.0]).unwrap();
    p1.insert(B, vec![1, 1], vec![2.0]).unwrap();
    let mut p2 = ParamSet::new();
    p2.insert(A, vec![2, 2], vec![0.0, 4.0, 8.0, 0.0]).unwrap();
    p2.insert(B, vec![1, 2], vec![0.0, 4.0]).unwrap();
    let next = het
        .aggregate(
            &g,
            &[ClientUpdate::new(1, 1, p1), ClientUpdate::new(2, 3, p2)],
            1,
        )
        .unwrap();
    assert_eq!(next.get(A).unwrap().data(), [0.25, 3.25, 6.0, 0.0]);
    assert_eq!(next.get(B).unwrap().data(), [1.0, 3.0]);
}

const R: &str = "m.q_proj.lora_residual.weight";

/// `p` with the residual `res` (the same for every client: what the server sent).
fn with_residual(mut p: ParamSet, res: &ParamTensor) -> ParamSet {
    p.insert_tensor(R, res.clone());
    p
}

/// The weight change `R + scale · B·A` of a LoRA set with a residual.
fn effective(p: &ParamSet, alpha: f64) -> Matrix {
    let mut m = product(p, alpha);
    for (x, r) in m.data.iter_mut().zip(to_matrix(p.get(R).unwrap()).data) {
        *x += r;
    }
    m
}

/// `Σ pᵢ · effective(clientᵢ)`, pᵢ by samples.
fn weighted_effective(clients: &[ClientUpdate], alpha: f64) -> Matrix {
    let total: u64 = clients.iter().map(|u| u.n_samples).sum();
    let first = effective(&clients[0].params, alpha);
    let mut sum = Matrix::zeros(first.rows, first.cols);
    for u in clients {
        let p = u.n_samples as f64 / total as f64;
        for (s, x) in sum.data.iter_mut().zip(effective(&u.params, alpha).data) {
            *s += p * x;
        }
    }
    sum
}

fn random_residual((d_in, d_out): (usize, usize), rng: &mut impl Rng) -> ParamTensor {
    let values = (0..d_in * d_out)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    ParamTensor::new(vec![d_out, d_in], values).unwrap()
}

#[test]
fn fedex_lora_makes_the_global_weight_exactly_the_clients_average() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let (dims, alpha) = ((7, 6), 6.0);
    let res = random_residual(dims, &mut rng);
    let global = with_residual(random_lora(3, dims, &mut rng), &res);
    let clients: Vec<ClientUpdate> = [(1, 10u64), (2, 30), (3, 60)]
        .iter()
        .map(|&(c, n)| {
            let p = with_residual(random_lora(3, dims, &mut rng), &res);
            ClientUpdate::new(c, n, p)
        })
        .collect();
    let mut fedex = shipped("fedex_lora", "lora_alpha = 6.0");
    let next = fedex.aggregate(&global, &clients, 1).unwrap();
    let want = weighted_effective(&clients, alpha);
    let err = max_diff(&effective(&next, alpha), &want);
    assert!(err < 1e-5, "{err}");
    // The factors are FedAvg's: A = Σ pᵢ·Aᵢ (0.1, 0.3, 0.6).
    let a: Vec<f32> = (0..clients[0].params.get(A).unwrap().data().len())
        .map(|i| {
            [0.1f32, 0.3, 0.6]
                .iter()
                .zip(&clients)
                .map(|(p, u)| p * u.params.get(A).unwrap().data()[i])
                .sum()
        })
        .collect();
    for (x, y) in next.get(A).unwrap().data().iter().zip(&a) {
        assert!((x - y).abs() < 1e-6);
    }
    // Without the residual's correction FedAvg misses the average by far.
    let fedavg = FedAvg.aggregate(&global, &clients, 1).unwrap();
    assert!(max_diff(&effective(&fedavg, alpha), &want) > 1e-1);
    // An adapter without residuals is refused, naming the setting.
    let bare: Vec<ClientUpdate> = (1..=2)
        .map(|c| ClientUpdate::new(c, 1, random_lora(3, dims, &mut rng)))
        .collect();
    let err = fedex
        .aggregate(&random_lora(3, dims, &mut rng), &bare, 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[lora] residual = true"), "{err}");
}

#[test]
fn flora_merges_the_stacked_factors_into_the_residual_and_restarts_them() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
    let (dims, alpha) = ((5, 4), 6.0);
    let res = random_residual(dims, &mut rng);
    let global = with_residual(random_lora(3, dims, &mut rng), &res);
    let mut flora = shipped("flora", "ranks = [1, 2, 3]\nlora_alpha = 6.0");
    // configure_fit: client c gets the first c rows of the global A, a zero
    // B of rank c and the residual as it is.
    let ins = flora.configure_fit(&global, &[1, 2, 3], 1).unwrap();
    let global_a = global.get(A).unwrap().data();
    for (i, r) in ins.iter().zip([1usize, 2, 3]) {
        let p = i.params.as_ref().unwrap();
        assert_eq!(p.get(A).unwrap().shape(), [r, dims.0]);
        assert_eq!(p.get(A).unwrap().data(), &global_a[..r * dims.0]);
        assert_eq!(p.get(B).unwrap().shape(), [dims.1, r]);
        assert!(p.get(B).unwrap().data().iter().all(|&x| x == 0.0));
        assert_eq!(p.get(R).unwrap(), &res);
    }
    // aggregate_fit at ranks 1, 2, 3: R' = R + Σ pᵢ·(alpha/rᵢ)·BᵢAᵢ, by hand in f64.
    let clients: Vec<ClientUpdate> = [(1, 1, 10u64), (2, 2, 30), (3, 3, 60)]
        .iter()
        .map(|&(c, r, n)| {
            let p = with_residual(random_lora(r, dims, &mut rng), &res);
            ClientUpdate::new(c, n, p)
        })
        .collect();
    let next = flora.aggregate(&global, &clients, 1).unwrap();
    let want = weighted_effective(&clients, alpha);
    let err = max_diff(&to_matrix(next.get(R).unwrap()), &want);
    assert!(err < 1e-5, "{err}");
    // The next round starts from the initial A and a zero B.
    assert_eq!(next.get(A).unwrap(), global.get(A).unwrap());
    assert!(next.get(B).unwrap().data().iter().all(|&x| x == 0.0));
    assert!(max_diff(&effective(&next, alpha), &want) < 1e-5);
}

/// The residual strategies read each client's parameters once, so their
/// tensor work grows with the adapter, not with clients × modules × adapter:
/// 12 modules and 8 clients fit in a 1 MiB budget (reading every client's
/// parameters once per module, as a first version did, took 3 MiB).
#[test]
fn residual_strategies_fit_a_small_tensor_budget() {
    use fedtune_kernel::script::ScriptingSection;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let lora = |rng: &mut rand_chacha::ChaCha8Rng| {
        let mut p = ParamSet::new();
        for m in 0..12 {
            let name = |part: &str| format!("layers.{m}.q_proj.{part}.weight");
            let mut values = |n: usize| (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            p.insert(name("lora_A"), vec![2, 16], values(32)).unwrap();
            p.insert(name("lora_B"), vec![16, 2], values(32)).unwrap();
            p.insert(name("lora_residual"), vec![16, 16], values(256))
                .unwrap();
        }
        p
    };
    let global = lora(&mut rng);
    let clients: Vec<ClientUpdate> = (1..=8)
        .map(|c| ClientUpdate::new(c, 10, lora(&mut rng)))
        .collect();
    let limits = ScriptingSection {
        max_tensor_mib: 1,
        ..Default::default()
    };
    for name in ["fedex_lora", "flora"] {
        let section = AggregatorSection {
            script: Some(name.into()),
            params: "lora_alpha = 4.0".parse().unwrap(),
        };
        let source = section.resolve(None).unwrap().unwrap();
        let mut strategy =
            ScriptAggregator::new(ScriptHost::new(&limits), &source, &section.params).unwrap();
        strategy
            .aggregate(&global, &clients, 1)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn scaffold_sends_c_and_moves_it_by_the_clients_control_variate_updates() {
    let mut s = shipped("scaffold", "num_clients = 4");
    let x = vector(&[1.0, 1.0]);
    let ins = s.configure_fit(&x, &[1, 2], 1).unwrap();
    let sent = ins[0].params.as_ref().unwrap();
    assert_eq!(sent.get("extra/c/w").unwrap().data(), [0.0, 0.0]);
    assert_eq!(sent.get("w").unwrap().data(), [1.0, 1.0]);
    let with_dc = |c: u32, y: [f32; 2], dc: [f32; 2]| {
        let mut u = ClientUpdate::new(c, 1, vector(&y));
        u.extra.insert("dc/w", vec![2], dc.to_vec()).unwrap();
        u
    };
    let ups = [
        with_dc(1, [3.0, 1.0], [1.0, 2.0]),
        with_dc(2, [1.0, 5.0], [3.0, -2.0]),
    ];
    // x ← x + mean(yᵢ − x) = (2, 3); c ← c + (|S|/N)·mean(Δcᵢ) = (4, 0)/4 = (1, 0).
    assert_eq!(w(&s.aggregate(&x, &ups, 1).unwrap()), [2.0, 3.0]);
    let next = s.configure_fit(&x, &[3], 2).unwrap();
    assert_eq!(
        next[0]
            .params
            .as_ref()
            .unwrap()
            .get("extra/c/w")
            .unwrap()
            .data(),
        [1.0, 0.0]
    );
    // c is the strategy's state: a checkpoint keeps it.
    let saved = s.save_state().unwrap().unwrap();
    let mut resumed = shipped("scaffold", "num_clients = 4");
    resumed.load_state(&saved).unwrap();
    assert_eq!(resumed.configure_fit(&x, &[3], 2).unwrap(), next);
    // A client without its Δc is refused by name.
    let err = s
        .aggregate(&x, &[ClientUpdate::new(1, 1, x.clone())], 2)
        .unwrap_err();
    assert!(err.to_string().contains("dc/w"), "{err}");
}

fn course_config(extra: &str) -> CourseConfig {
    CourseConfig::from_toml(
        &format!("[federate]\nrounds = 3\nclients = 4\nseed = 5\n{extra}"),
        "<test>",
    )
    .unwrap()
}

async fn course(
    cfg: &CourseConfig,
    strategy: Box<dyn Aggregator>,
) -> Result<fedtune_kernel::course::CourseReport, fedtune_kernel::course::CourseError> {
    let spec = SyntheticSpec {
        clients: 4,
        ..SyntheticSpec::default()
    };
    let trainer = LeastSquaresTrainer::synthetic(spec, 0.1, 5);
    let initial = trainer.initial_params();
    run_in_process(
        cfg,
        initial,
        Arc::new(Mutex::new(trainer)),
        strategy,
        MetricsLog::in_memory(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_defining_only_aggregate_fit_is_fedavg_bit_for_bit() {
    let cfg = course_config("");
    let native = course(&cfg, Box::new(FedAvg)).await.unwrap();
    let script = from_text("fn aggregate_fit(global, results, round) { weighted_mean(results) }");
    let scripted = course(&cfg, Box::new(script)).await.unwrap();
    assert_eq!(native.final_params, scripted.final_params);
    assert_eq!(native.loss_curve("test"), scripted.loss_curve("test"));
}

const HOOKED: &str = r#"
fn on_round_start(round) { this.started = (this.started ?? 0) + 1; }
// Odd clients only.
fn sample(joined, round) { joined.filter(|c| c % 2 == 1) }
// Client c takes c local steps at its own learning rate.
fn configure_fit(global, clients, round) {
    clients.map(|c| fit_ins(c, #{ local_steps: c, lr: 0.05 }))
}
fn aggregate_fit(global, results, round) {
    for r in results {
        if r.local_steps != r.client { throw `client ${r.client} took ${r.local_steps} steps`; }
        if r.config.lr != 0.05 { throw "the config did not come back"; }
        if r.train_loss == () { throw "no training loss"; }
    }
    this.clients = results.len();
    weighted_mean(results)
}
fn on_round_end(global, round) { #{ started: this.started, clients_seen: this.clients } }
fn aggregate_evaluate(results, round) {
    let worst = 0.0;
    for r in results { if r.split == "test" && r.loss > worst { worst = r.loss; } }
    #{ worst_test_loss: worst, evaluated: results.len() }
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hook_of_a_scripted_strategy_takes_part_in_a_course() {
    let cfg = course_config("");
    let report = course(&cfg, Box::new(from_text(HOOKED))).await.unwrap();
    // sample: clients 1 and 3 in every round.
    assert!(
        report.sampled.iter().all(|(_, c)| c == &[1, 3]),
        "{:?}",
        report.sampled
    );
    let rounds: Vec<_> = report
        .records
        .iter()
        .filter(|r| r.event == Event::Round)
        .collect();
    assert_eq!(rounds.len(), 3);
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!(r.extra["started"], (i + 1) as f64);
        assert_eq!(r.extra["clients_seen"], 2.0);
    }
    // configure_fit's local steps reached the trainer (its records say so, too).
    let strategy: Vec<_> = report
        .records
        .iter()
        .filter(|r| r.event == Event::Eval && r.split.as_deref() == Some("strategy"))
        .collect();
    assert_eq!(strategy.len(), 4, "every evaluation, rounds 0 to 3");
    let strategy: Vec<_> = strategy.into_iter().filter(|r| r.round == 3).collect();
    let worst = report
        .records
        .iter()
        .filter(|r| r.event == Event::Eval && r.round == 3 && r.client.is_some())
        .filter(|r| r.split.as_deref() == Some("test"))
        .map(|r| r.loss.unwrap())
        .fold(0.0, f64::max);
    assert_eq!(strategy[0].extra["worst_test_loss"], worst);
    assert_eq!(strategy[0].extra["evaluated"], 8.0, "4 clients × 2 splits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_instructions_stop_the_course_at_the_scripts_line() {
    for (body, says) in [
        (
            "[fit_ins(99)]",
            "client 99 is not among this round's sampled clients",
        ),
        ("[fit_ins(1, #{}, global / 0.0)]", "non-finite"),
        ("[fit_ins(1, #{ rank: [1] })]", "config `rank` is a array"),
        (
            "let p = global; p.put(\"w\", zeros([3])); [fit_ins(1, #{}, p)]",
            "cannot load",
        ),
    ] {
        let text = format!(
            "fn aggregate_fit(g, r, n) {{ weighted_mean(r) }}\nfn configure_fit(global, clients, round) {{\n    {body}\n}}\n"
        );
        let err = course(&course_config(""), Box::new(from_text(&text)))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("<built-in strategy>:3:"), "{body}: {err}");
        assert!(err.contains(says), "{body}: {err}");
        assert!(err.contains("round 1"), "{body}: {err}");
    }
    // A native strategy gets the same checks from the server.
    struct Rogue;
    impl Aggregator for Rogue {
        fn name(&self) -> &str {
            "rogue"
        }
        fn aggregate(
            &mut self,
            g: &ParamSet,
            _: &[ClientUpdate],
            _: u64,
        ) -> Result<ParamSet, fedtune_kernel::AggregateError> {
            Ok(g.clone())
        }
        fn configure_fit(
            &mut self,
            _: &ParamSet,
            _: &[u32],
            _: u64,
        ) -> Result<Vec<fedtune_kernel::FitInstruction>, fedtune_kernel::AggregateError> {
            Ok(vec![fedtune_kernel::FitInstruction {
                client: 42,
                config: BTreeMap::new(),
                params: None,
            }])
        }
    }
    let err = course(&course_config(""), Box::new(Rogue))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("client 42, which is not among"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_strategy_reporting_a_non_finite_metric_stops_the_course_naming_it() {
    // Written to metrics.jsonl as null, it would make the run's records
    // unreadable at the end; the server refuses it when reported (scripts'
    // maps are checked by the script host already).
    struct Reports(bool);
    impl Aggregator for Reports {
        fn name(&self) -> &str {
            "reports"
        }
        fn aggregate(
            &mut self,
            _: &ParamSet,
            u: &[ClientUpdate],
            _: u64,
        ) -> Result<ParamSet, fedtune_kernel::AggregateError> {
            fedtune_kernel::aggregate_fedavg(u)
        }
        fn on_round_end(
            &mut self,
            _: &ParamSet,
            _: u64,
        ) -> Result<BTreeMap<String, f64>, fedtune_kernel::AggregateError> {
            let v = if self.0 { f64::INFINITY } else { 1.0 };
            Ok(BTreeMap::from([("spread".to_string(), v)]))
        }
        fn aggregate_evaluate(
            &mut self,
            _: &[fedtune_kernel::ClientEval],
            _: u64,
        ) -> Result<BTreeMap<String, f64>, fedtune_kernel::AggregateError> {
            let v = if self.0 { 1.0 } else { f64::NAN };
            Ok(BTreeMap::from([("spread".to_string(), v)]))
        }
    }
    for (inf_at_round_end, says) in [
        (true, "on_round_end returned"),
        (false, "aggregate_evaluate returned"),
    ] {
        let err = course(&course_config(""), Box::new(Reports(inf_at_round_end)))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{err}");
        assert!(
            err.contains("metric `spread`") && err.contains("not a finite number"),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fednova_gives_clients_their_steps_and_normalizes_a_course_by_them() {
    let cfg = course_config("");
    let report = course(&cfg, Box::new(shipped("fednova", "steps = [1, 3]")))
        .await
        .unwrap();
    // Each client trained the steps it was given (the LS trainer reports them).
    let curve = report.loss_curve("test");
    assert!(curve.last().unwrap().1 < curve[0].1, "{curve:?}");
    let native = course(&cfg, Box::new(FedAvg)).await.unwrap();
    assert_ne!(native.final_params, report.final_params);
}
