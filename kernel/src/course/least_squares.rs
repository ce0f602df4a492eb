//! A numeric reference trainer: linear least squares on synthetic data per client.
//!
//! It exercises every path of a course — sampling, training off the executor,
//! FedAvg, evaluation, cost accounting — in milliseconds, and it has a known
//! answer: the centralized least-squares solution over the union of all
//! clients' data, which federated averaging should approach when clients are
//! IID. Tests, demos and `fedtune bench` use it; real courses use the adapters'
//! LLM trainer through the same [`LocalTrainer`] port.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigDoc, ConfigError};
use crate::course::trainer::{LocalTrainer, LocalUpdate, SplitEval, TrainContext, TrainerError};
use crate::params::ParamSet;

/// Rows `x` (n × d, row-major) and targets `y` (n).
#[derive(Debug, Clone)]
struct Samples {
    x: Vec<f64>,
    y: Vec<f64>,
}

impl Samples {
    fn len(&self) -> usize {
        self.y.len()
    }
}

/// Least-squares regression `y ≈ x·w + b`, one synthetic data set per client.
#[derive(Debug, Clone)]
pub struct LeastSquaresTrainer {
    dim: usize,
    lr: f64,
    local_steps: usize,
    clients: BTreeMap<u32, (Samples, Samples)>,
}

/// How [`LeastSquaresTrainer::synthetic`] draws its data.
#[derive(Debug, Clone, Copy)]
pub struct SyntheticSpec {
    /// Number of clients (ids 1..=clients).
    pub clients: u32,
    /// Training rows per client (each also gets a test set of a quarter of that).
    pub samples_per_client: usize,
    /// Feature dimension.
    pub dim: usize,
    /// Standard deviation-like amplitude of the label noise.
    pub noise: f64,
    /// How far each client's true weights stray from the shared ones (0 = IID).
    pub heterogeneity: f64,
    /// Seed of all draws.
    pub seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            clients: 3,
            samples_per_client: 200,
            dim: 8,
            noise: 0.1,
            heterogeneity: 0.0,
            seed: 1,
        }
    }
}

/// The most synthetic data a least-squares course may draw.
const MAX_DATA_BYTES: u128 = 4 << 30;

/// `[least_squares]`: the numeric reference task of a course file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeastSquaresSection {
    /// Feature dimension.
    pub dim: usize,
    /// Training rows per client.
    pub samples_per_client: usize,
    /// Amplitude of the label noise.
    pub noise: f64,
    /// How far each client's true weights stray from the shared ones (0 = IID).
    pub heterogeneity: f64,
    /// Gradient-descent step size.
    pub lr: f64,
    /// Gradient steps per client per round.
    pub local_steps: usize,
    /// Seed of the synthetic data.
    pub data_seed: u64,
}

impl Default for LeastSquaresSection {
    fn default() -> Self {
        let spec = SyntheticSpec::default();
        Self {
            dim: spec.dim,
            samples_per_client: spec.samples_per_client,
            noise: spec.noise,
            heterogeneity: spec.heterogeneity,
            lr: 0.1,
            local_steps: 5,
            data_seed: spec.seed,
        }
    }
}

impl LeastSquaresSection {
    /// Reads the `[least_squares]` section of `doc` and checks that it
    /// describes a task that can run for `clients` clients — in memory too,
    /// before any data is drawn.
    pub fn from_doc(doc: &ConfigDoc, clients: u32) -> Result<Self, ConfigError> {
        let s: Self = doc.section("least_squares")?;
        let positive = [
            ("dim", s.dim > 0),
            ("samples_per_client", s.samples_per_client > 0),
            ("local_steps", s.local_steps > 0),
            ("lr", s.lr > 0.0),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, ok)| !ok) {
            return Err(doc.key_error(
                &format!("least_squares.{key}"),
                "dim, samples_per_client, local_steps and lr must be positive".into(),
            ));
        }
        // Each client holds samples_per_client training rows and a quarter as
        // many test rows of dim + 1 f64 values.
        let rows = (s.samples_per_client as u128) * 5 / 4 + 1;
        let bytes = u128::from(clients) * rows * (s.dim as u128 + 1) * 8;
        if bytes > MAX_DATA_BYTES {
            return Err(doc.key_error(
                "least_squares.dim",
                format!(
                    "{clients} clients × {} rows × {} features would take {:.1} GiB of synthetic data; at most {} GiB",
                    rows,
                    s.dim,
                    bytes as f64 / (1u64 << 30) as f64,
                    MAX_DATA_BYTES >> 30
                ),
            ));
        }
        Ok(s)
    }

    /// The trainer of this task for `clients` clients, with every client's data drawn.
    pub fn trainer(&self, clients: u32) -> LeastSquaresTrainer {
        let spec = SyntheticSpec {
            clients,
            samples_per_client: self.samples_per_client,
            dim: self.dim,
            noise: self.noise,
            heterogeneity: self.heterogeneity,
            seed: self.data_seed,
        };
        LeastSquaresTrainer::synthetic(spec, self.lr, self.local_steps)
    }
}

impl LeastSquaresTrainer {
    /// Draws each client's data from `y = x·w* + b* + noise`, `x` uniform in [−1, 1]ᵈ.
    pub fn synthetic(spec: SyntheticSpec, lr: f64, local_steps: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let d = spec.dim;
        let w_true: Vec<f64> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let b_true: f64 = rng.random_range(-1.0..1.0);
        let mut clients = BTreeMap::new();
        for id in 1..=spec.clients {
            let w_client: Vec<f64> = w_true
                .iter()
                .map(|w| w + spec.heterogeneity * rng.random_range(-1.0..1.0))
                .collect();
            let mut draw = |n: usize| {
                let mut x = Vec::with_capacity(n * d);
                let mut y = Vec::with_capacity(n);
                for _ in 0..n {
                    let row: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let clean: f64 =
                        row.iter().zip(&w_client).map(|(a, b)| a * b).sum::<f64>() + b_true;
                    y.push(clean + spec.noise * rng.random_range(-1.0..1.0));
                    x.extend(row);
                }
                Samples { x, y }
            };
            let train = draw(spec.samples_per_client);
            let test = draw((spec.samples_per_client / 4).max(1));
            clients.insert(id, (train, test));
        }
        Self {
            dim: d,
            lr,
            local_steps,
            clients,
        }
    }

    /// Zero weights `w` (d) and bias `b` (scalar): the usual starting point.
    pub fn initial_params(&self) -> ParamSet {
        let mut p = ParamSet::new();
        p.insert("w", vec![self.dim], vec![0.0; self.dim])
            .expect("shape matches data");
        p.insert("b", vec![], vec![0.0])
            .expect("shape matches data");
        p
    }

    /// The exact least-squares fit over all clients' training data (normal equations).
    pub fn centralized_solution(&self) -> ParamSet {
        let d = self.dim + 1;
        let mut ata = vec![0f64; d * d];
        let mut atb = vec![0f64; d];
        for (train, _) in self.clients.values() {
            for (i, &y) in train.y.iter().enumerate() {
                let row: Vec<f64> = train.x[i * self.dim..(i + 1) * self.dim]
                    .iter()
                    .copied()
                    .chain([1.0])
                    .collect();
                for r in 0..d {
                    atb[r] += row[r] * y;
                    for c in 0..d {
                        ata[r * d + c] += row[r] * row[c];
                    }
                }
            }
        }
        let theta = solve(ata, atb, d);
        let mut p = ParamSet::new();
        p.insert(
            "w",
            vec![self.dim],
            theta[..self.dim].iter().map(|&v| v as f32).collect(),
        )
        .expect("shape matches data");
        p.insert("b", vec![], vec![theta[self.dim] as f32])
            .expect("shape matches data");
        p
    }

    /// Mean squared error of `params` over all clients' training data.
    pub fn global_train_loss(&self, params: &ParamSet) -> Result<f64, TrainerError> {
        let (w, b) = self.unpack(params)?;
        let (mut sum, mut n) = (0.0, 0usize);
        for (train, _) in self.clients.values() {
            sum += mse(&w, b, train) * train.len() as f64;
            n += train.len();
        }
        Ok(sum / n as f64)
    }

    fn unpack(&self, params: &ParamSet) -> Result<(Vec<f64>, f64), TrainerError> {
        let w = params.get("w").ok_or("parameter `w` is missing")?;
        let b = params.get("b").ok_or("parameter `b` is missing")?;
        if w.shape() != [self.dim] || b.len() != 1 {
            return Err(format!("expected w of shape [{}] and a scalar b", self.dim).into());
        }
        Ok((
            w.data().iter().map(|&v| f64::from(v)).collect(),
            f64::from(b.data()[0]),
        ))
    }

    fn client(&self, id: u32) -> Result<&(Samples, Samples), TrainerError> {
        self.clients
            .get(&id)
            .ok_or_else(|| format!("no data for client {id}").into())
    }
}

fn mse(w: &[f64], b: f64, s: &Samples) -> f64 {
    let d = w.len();
    let sum: f64 =
        s.y.iter()
            .enumerate()
            .map(|(i, y)| {
                let pred: f64 = s.x[i * d..(i + 1) * d]
                    .iter()
                    .zip(w)
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
                    + b;
                (pred - y).powi(2)
            })
            .sum();
    sum / s.len() as f64
}

/// Solves `a·x = b` (n × n) by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<f64>, mut b: Vec<f64>, n: usize) -> Vec<f64> {
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))
            .expect("non-empty range");
        if pivot != col {
            for k in 0..n {
                a.swap(col * n + k, pivot * n + k);
            }
            b.swap(col, pivot);
        }
        let p = a[col * n + col];
        for row in col + 1..n {
            let f = a[row * n + col] / p;
            for k in col..n {
                a[row * n + k] -= f * a[col * n + k];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0f64; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row * n + k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row * n + row];
    }
    x
}

impl LocalTrainer for LeastSquaresTrainer {
    /// `local_steps` of full-batch gradient descent on the client's mean squared error.
    fn train(
        &mut self,
        client: u32,
        global: &ParamSet,
        ctx: &TrainContext,
    ) -> Result<LocalUpdate, TrainerError> {
        let (mut w, mut b) = self.unpack(global)?;
        // A strategy may set this client's steps and learning rate.
        let steps = match ctx.config.get("local_steps") {
            None => self.local_steps,
            Some(v) => v
                .as_u64()
                .filter(|&n| (1..=1_000_000).contains(&n))
                .ok_or_else(|| {
                    format!("config local_steps = {v} is not a step count in 1..=1000000")
                })? as usize,
        };
        let lr = match ctx.config.get("lr") {
            None => self.lr,
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| format!("config lr = {v} is not a positive number"))?,
        };
        let (train, _) = self.client(client)?;
        let (d, n) = (self.dim, train.len() as f64);
        let mut losses = Vec::with_capacity(steps);
        for step in 1..=steps {
            if ctx.is_cancelled() {
                return Err("cancelled".into());
            }
            let mut gw = vec![0f64; d];
            let mut gb = 0.0;
            let mut loss = 0.0;
            for (i, y) in train.y.iter().enumerate() {
                let row = &train.x[i * d..(i + 1) * d];
                let r = row.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>() + b - y;
                loss += r * r;
                for (g, a) in gw.iter_mut().zip(row) {
                    *g += 2.0 * r * a / n;
                }
                gb += 2.0 * r / n;
            }
            losses.push(loss / n);
            w.iter_mut().zip(&gw).for_each(|(w, g)| *w -= lr * g);
            b -= lr * gb;
            let finite = w.iter().all(|v| (*v as f32).is_finite()) && (b as f32).is_finite();
            if !(finite && (loss / n).is_finite()) {
                return Err(format!(
                    "diverged at local step {step} of {steps}: loss {:.3e}, parameters {} (lower least_squares.lr, now {lr})",
                    loss / n,
                    if finite { "finite" } else { "not finite" },
                )
                .into());
            }
        }
        let mut params = ParamSet::new();
        params.insert("w", vec![d], w.iter().map(|&v| v as f32).collect())?;
        params.insert("b", vec![], vec![b as f32])?;
        let loss = (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64);
        Ok(LocalUpdate {
            params,
            n_samples: train.len() as u64,
            loss,
            local_steps: Some(steps as u64),
            ..LocalUpdate::default()
        })
    }

    /// Mean squared error on the client's training and test data.
    fn evaluate(
        &mut self,
        client: u32,
        global: &ParamSet,
        _ctx: &TrainContext,
    ) -> Result<Vec<SplitEval>, TrainerError> {
        let (w, b) = self.unpack(global)?;
        let (train, test) = self.client(client)?;
        Ok([("train", train), ("test", test)]
            .into_iter()
            .map(|(split, s)| SplitEval {
                split: split.into(),
                loss: mse(&w, b, s),
                samples: s.len() as u64,
                metrics: BTreeMap::new(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn centralized_solution_recovers_noise_free_weights() {
        let spec = SyntheticSpec {
            noise: 0.0,
            ..SyntheticSpec::default()
        };
        let t = LeastSquaresTrainer::synthetic(spec, 0.1, 1);
        let theta = t.centralized_solution();
        assert!(t.global_train_loss(&theta).unwrap() < 1e-10);
    }

    #[test]
    fn local_training_lowers_the_clients_loss() {
        let mut t = LeastSquaresTrainer::synthetic(SyntheticSpec::default(), 0.1, 20);
        let init = t.initial_params();
        let ctx = TrainContext::new(1, 0, Default::default(), Arc::new(AtomicBool::new(false)));
        let before = t.evaluate(1, &init, &ctx).unwrap()[0].loss;
        let update = t.train(1, &init, &ctx).unwrap();
        let after = t.evaluate(1, &update.params, &ctx).unwrap()[0].loss;
        assert_eq!(update.n_samples, 200);
        assert!(after < 0.5 * before, "{before} → {after}");
    }
}
