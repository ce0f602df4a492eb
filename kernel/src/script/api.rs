//! The fedtune API that scripts see: parameter sets, tensors, client updates
//! and native helpers, so scripts never loop over elements.
//!
//! | type | what it is |
//! |---|---|
//! | `ParamSet` | named `f32` tensors (an adapter, a global model, an update) |
//! | `Tensor` | one of them |
//! | `Update` | a client's update: `.client`, `.n_samples`, `.params` |
//!
//! On `ParamSet` and `Tensor` alike: `a + b`, `a - b`, `a * b`, `a / b`
//! (element-wise, same names and shapes), `a * 0.5`, `0.5 * a`, `a / 2.0`,
//! `a + 1e-3`, `-a`; `add(a, b)`, `sub(a, b)`, `mul(a, b)`, `div(a, b)`,
//! `scale(a, x)`, `sqrt(a)`, `square(a)`, `abs(a)`, `sign(a)`,
//! `max(a, b)`, `min(a, b)`, `clamp(a, lo, hi)`, `zeros_like(a)`,
//! `fill_like(a, x)`, `norm(a)` (L2), `dot(a, b)`, `sum(a)`, `numel(a)`.
//! On `ParamSet`: `names(p)`, `p[name]` (get and set a `Tensor`),
//! `map_tensors(p, |name, t| …)` (per-tensor map by name), `len(p)`.
//! On `Tensor`: `shape(t)`.
//! On an array of `Update`s: `weighted_mean(updates)` (FedAvg, bit-identical to
//! the native one), `median(updates)`, `trimmed_mean(updates, beta)`,
//! `closest_to_median(updates, beta)` (Bulyan's coordinate rule). An `Update` also has `.local_steps` and `.train_loss` (`()` when the
//! client did not say), `.metrics` and `.config` (maps) and `.extra` (the
//! `ParamSet` of extra tensors it sent back).
//!
//! Differential privacy (`crate::privacy`): `clip_update(params, reference,
//! c)` → `#{params, norm}` (`reference` plus the difference scaled to L2
//! norm at most `c`, and the norm before), `gaussian_noise(params, std,
//! seed)` (N(0, std²) added to every value, from a seeded ChaCha stream),
//! `dp_epsilon(q, sigma, rounds, delta)` (the RDP accountant).
//!
//! Building parameter sets: `param_set()` (empty), `p.put(name, t)` (add or
//! replace, any shape), `p.remove(name)`, `p.contains(name)`,
//! `with_extra(p, extra)` (adds `extra`'s tensors as `extra/NAME`).
//!
//! Matrices (2-D tensors; computed in `f64`, stored as `f32`):
//! `tensor(shape, values)`, `zeros(shape)`, `eye(n)`, `diag(v)`,
//! `matmul(a, b)`, `transpose(t)`, `reshape(t, shape)`,
//! `slice(t, dim, start, end)`, `concat(a, b, dim)`, `concat([t…], dim)`,
//! `qr(t)` → `#{Q, R}` (thin), `svd(t, r)` → `#{U, S, V}` with
//! `t ≈ U·diag(S)·Vᵀ` truncated to rank `r`, `values(t)` (an array),
//! `at(t, i, j)`. `lora_pairs(p)` → one map per LoRA module with PEFT's
//! names: `#{module, a, b, A, B, r}`.
//!
//! In `configure_fit`, `fit_ins(client)`, `fit_ins(client, config)` and
//! `fit_ins(client, config, params)` make one client's instruction; a client
//! not sampled this round, a config value that is not a number, string or
//! boolean, or parameters the client could not load (other names, shapes
//! other than a LoRA rank, NaN) fail at that line.

use rhai::{Array, Dynamic, Engine, EvalAltResult, FnPtr, NativeCallContext, Position, INT};

use rhai::Map;

use crate::aggregate::{self, ClientUpdate, FitConfig, FitInstruction};
use crate::linalg::{self, Matrix};
use crate::params::{ParamSet, ParamTensor};

/// The script-side name of one tensor.
pub type Tensor = ParamTensor;
/// The script-side name of a client update.
pub type Update = ClientUpdate;

type Res<T> = Result<T, Box<EvalAltResult>>;

thread_local! {
    /// Elements of tensor data the running script call may still create
    /// (`None` outside a call made through the host).
    static BUDGET: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The tensor budget of one script call, in force while this guard lives
/// (calls nest: the previous budget comes back when it drops).
pub(crate) struct TensorBudget(Option<usize>);

impl TensorBudget {
    /// Starts a call's budget of `elements`.
    pub(crate) fn start(elements: usize) -> Self {
        Self(BUDGET.with(|b| b.replace(Some(elements))))
    }
}

impl Drop for TensorBudget {
    fn drop(&mut self) {
        BUDGET.with(|b| b.set(self.0));
    }
}

/// Charges `elements` new tensor elements to the running call's budget.
fn charge(elements: usize) -> Res<()> {
    BUDGET.with(|b| match b.get() {
        None => Ok(()),
        Some(left) if elements <= left => {
            b.set(Some(left - elements));
            Ok(())
        }
        Some(_) => fail(
            "the script created more tensor data in one call than scripting.max_tensor_mib allows",
        ),
    })
}

fn fail<T>(message: impl Into<String>) -> Res<T> {
    Err(Box::new(EvalAltResult::ErrorRuntime(
        Dynamic::from(message.into()),
        Position::NONE,
    )))
}

/// Element-wise arithmetic shared by `ParamSet` and `Tensor`.
/// Every result is new tensor data, charged to the call's budget first.
trait Elementwise: Clone + Send + Sync + 'static {
    const TYPE: &'static str;
    fn map(&self, f: impl Fn(f32) -> f32) -> Res<Self>;
    fn zip(&self, other: &Self, f: impl Fn(f32, f32) -> f32) -> Res<Self>;
    fn values(&self) -> Box<dyn Iterator<Item = f32> + '_>;
}

impl Elementwise for ParamSet {
    const TYPE: &'static str = "ParamSet";
    fn map(&self, f: impl Fn(f32) -> f32) -> Res<Self> {
        charge(self.num_elements())?;
        Ok(self.map_values(f))
    }
    fn zip(&self, other: &Self, f: impl Fn(f32, f32) -> f32) -> Res<Self> {
        charge(self.num_elements())?;
        self.zip_map(other, f).or_else(|e| fail(e.to_string()))
    }

    fn values(&self) -> Box<dyn Iterator<Item = f32> + '_> {
        Box::new(self.iter().flat_map(|(_, t)| t.data().iter().copied()))
    }
}

impl Elementwise for ParamTensor {
    const TYPE: &'static str = "Tensor";
    fn map(&self, f: impl Fn(f32) -> f32) -> Res<Self> {
        charge(self.len())?;
        let mut out = self.clone();
        out.data_mut().iter_mut().for_each(|x| *x = f(*x));
        Ok(out)
    }

    fn zip(&self, other: &Self, f: impl Fn(f32, f32) -> f32) -> Res<Self> {
        if self.shape() != other.shape() {
            return fail(format!(
                "tensor shapes {:?} and {:?} differ",
                self.shape(),
                other.shape()
            ));
        }
        charge(self.len())?;
        let mut out = self.clone();
        for (a, &b) in out.data_mut().iter_mut().zip(other.data()) {
            *a = f(*a, b);
        }
        Ok(out)
    }
    fn values(&self) -> Box<dyn Iterator<Item = f32> + '_> {
        Box::new(self.data().iter().copied())
    }
}

/// Registers the whole API on `engine`.
pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<ParamSet>("ParamSet");
    engine.register_type_with_name::<ParamTensor>("Tensor");
    engine.register_type_with_name::<ClientUpdate>("Update");
    engine.register_type_with_name::<FitInstruction>("FitIns");
    register_elementwise::<ParamSet>(engine);
    register_elementwise::<ParamTensor>(engine);
    register_param_set(engine);
    register_updates(engine);
    register_matrices(engine);
    register_fit_ins(engine);
}

thread_local! {
    /// While `configure_fit` runs: the round's sampled clients and the
    /// global parameters, which `fit_ins` checks against.
    static FIT_ROUND: std::cell::RefCell<Option<(Vec<u32>, ParamSet)>> =
        const { std::cell::RefCell::new(None) };
}

/// The sampled clients and global parameters `fit_ins` checks against,
/// while this guard lives.
pub(crate) struct FitRound;

impl FitRound {
    /// Starts checking instructions against `clients` and `global`.
    pub(crate) fn start(clients: Vec<u32>, global: ParamSet) -> Self {
        FIT_ROUND.with(|f| *f.borrow_mut() = Some((clients, global)));
        Self
    }
}

impl Drop for FitRound {
    fn drop(&mut self) {
        FIT_ROUND.with(|f| *f.borrow_mut() = None);
    }
}

/// A script value as a config value: a number, string or boolean.
pub fn config_value(key: &str, v: &Dynamic) -> Result<serde_json::Value, super::BadValue> {
    if let Some(i) = v.clone().try_cast::<INT>() {
        return Ok(i.into());
    }
    if let Some(x) = v.clone().try_cast::<f64>() {
        return serde_json::Number::from_f64(x)
            .map(serde_json::Value::Number)
            .ok_or_else(|| super::BadValue(format!("config `{key}` is {x}, not a finite number")));
    }
    if let Some(b) = v.clone().try_cast::<bool>() {
        return Ok(b.into());
    }
    if v.is_string() {
        return Ok(v.to_string().into());
    }
    Err(super::BadValue(format!(
        "config `{key}` is a {}; a config holds numbers, strings and booleans",
        v.type_name()
    )))
}

/// A config as a script map.
pub fn config_map(config: &FitConfig) -> Map {
    config
        .iter()
        .map(|(k, v)| {
            let d = match v {
                serde_json::Value::Bool(b) => Dynamic::from(*b),
                serde_json::Value::Number(n) => match n.as_i64() {
                    Some(i) => Dynamic::from(i),
                    None => Dynamic::from(n.as_f64().unwrap_or(f64::NAN)),
                },
                serde_json::Value::String(s) => Dynamic::from(s.clone()),
                other => Dynamic::from(other.to_string()),
            };
            (k.as_str().into(), d)
        })
        .collect()
}

fn fit_ins(client: INT, config: Map, params: Option<ParamSet>) -> Res<FitInstruction> {
    let client =
        u32::try_from(client).or_else(|_| fail(format!("fit_ins: {client} is not a client id")))?;
    let mut cfg = FitConfig::new();
    for (k, v) in &config {
        cfg.insert(k.to_string(), config_value(k, v).or_else(fail)?);
    }
    FIT_ROUND.with(|f| -> Res<()> {
        let f = f.borrow();
        let Some((clients, global)) = f.as_ref() else {
            return Ok(());
        };
        if !clients.contains(&client) {
            return fail(format!(
                "fit_ins: client {client} is not among this round's sampled clients {clients:?}"
            ));
        }
        if let Some(p) = &params {
            aggregate::check_payload(global, p)
                .and_then(|()| p.check_finite().map_err(aggregate::FitError::from))
                .or_else(|e| fail(format!("fit_ins: client {client}'s parameters: {e}")))?;
        }
        Ok(())
    })?;
    Ok(FitInstruction {
        client,
        config: cfg,
        params,
    })
}

fn register_fit_ins(engine: &mut Engine) {
    engine.register_fn("fit_ins", |c: INT| fit_ins(c, Map::new(), None));
    engine.register_fn("fit_ins", |c: INT, cfg: Map| fit_ins(c, cfg, None));
    engine.register_fn("fit_ins", |c: INT, cfg: Map, p: ParamSet| {
        fit_ins(c, cfg, Some(p))
    });
    engine.register_get("client", |i: &mut FitInstruction| INT::from(i.client));
    engine.register_get("config", |i: &mut FitInstruction| config_map(&i.config));
    engine.register_fn("to_string", |i: &mut FitInstruction| {
        format!("FitIns(client {}, config {:?})", i.client, i.config)
    });
}

fn matrix(t: &ParamTensor, what: &str) -> Res<Matrix> {
    match t.shape() {
        [r, c] => Ok(
            Matrix::from_rows(*r, *c, t.data().iter().map(|&x| f64::from(x)).collect())
                .expect("a tensor's data fits its shape"),
        ),
        other => fail(format!("{what}: needs a 2-D tensor, got shape {other:?}")),
    }
}

fn from_matrix(m: &Matrix) -> Res<ParamTensor> {
    charge(m.data.len())?;
    ParamTensor::new(
        vec![m.rows, m.cols],
        m.data.iter().map(|&x| x as f32).collect(),
    )
    .or_else(|e| fail(e.to_string()))
}

fn dims(shape: &Array, what: &str) -> Res<Vec<usize>> {
    let dims: Vec<usize> = shape
        .iter()
        .map(|d| d.as_int().ok().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<_>>()
        .map_or_else(
            || {
                fail(format!(
                    "{what}: a shape is an array of non-negative integers"
                ))
            },
            Ok,
        )?;
    let n = crate::params::element_count(&dims)
        .map_or_else(|| fail(format!("{what}: shape {dims:?} is too large")), Ok)?;
    charge(n)?;
    Ok(dims)
}

fn new_tensor(shape: Vec<usize>, data: Vec<f32>) -> Res<ParamTensor> {
    ParamTensor::new(shape, data).or_else(|e| fail(e.to_string()))
}

fn index(i: INT, len: usize, what: &str) -> Res<usize> {
    usize::try_from(i)
        .ok()
        .filter(|&i| i <= len)
        .map_or_else(|| fail(format!("{what}: {i} is outside 0..={len}")), Ok)
}

/// `t[.., start..end, ..]` along `dim`.
fn slice(t: &ParamTensor, dim: usize, start: usize, end: usize) -> Res<ParamTensor> {
    let shape = t.shape();
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let len = shape[dim];
    let mut out_shape = shape.to_vec();
    out_shape[dim] = end - start;
    charge(outer * (end - start) * inner)?;
    let mut data = Vec::with_capacity(outer * (end - start) * inner);
    for o in 0..outer {
        let base = o * len * inner;
        data.extend_from_slice(&t.data()[base + start * inner..base + end * inner]);
    }
    new_tensor(out_shape, data)
}

/// The tensors of `parts` joined along `dim` (all other dimensions equal).
fn concat(parts: &[ParamTensor], dim: usize) -> Res<ParamTensor> {
    let Some(first) = parts.first() else {
        return fail("concat: nothing to join");
    };
    let shape = first.shape();
    if dim >= shape.len() {
        return fail(format!(
            "concat: dimension {dim} of a {}-D tensor",
            shape.len()
        ));
    }
    for p in parts {
        let same = p.shape().len() == shape.len()
            && (0..shape.len()).all(|d| d == dim || p.shape()[d] == shape[d]);
        if !same {
            return fail(format!(
                "concat: shapes {shape:?} and {:?} differ beyond dimension {dim}",
                p.shape()
            ));
        }
    }
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let total: usize = parts.iter().map(|p| p.shape()[dim]).sum();
    charge(outer * total * inner)?;
    let mut data = Vec::with_capacity(outer * total * inner);
    for o in 0..outer {
        for p in parts {
            let chunk = p.shape()[dim] * inner;
            data.extend_from_slice(&p.data()[o * chunk..(o + 1) * chunk]);
        }
    }
    let mut out_shape = shape.to_vec();
    out_shape[dim] = total;
    new_tensor(out_shape, data)
}

/// Matrices for strategies: building, reshaping, decomposing, reading.
fn register_matrices(engine: &mut Engine) {
    register_construction(engine);
    register_shaping(engine);
    register_decompositions(engine);
}

/// `tensor`, `zeros`, `eye`, `diag`.
fn register_construction(engine: &mut Engine) {
    engine.register_fn(
        "tensor",
        |shape: Array, values: Array| -> Res<ParamTensor> {
            let dims = dims(&shape, "tensor")?;
            let data: Vec<f32> = values
                .iter()
                .map(|v| {
                    v.as_float()
                        .ok()
                        .or_else(|| v.as_int().ok().map(|i| i as f64))
                })
                .map(|v| v.map(|v| v as f32))
                .collect::<Option<_>>()
                .map_or_else(|| fail("tensor: the values must be numbers"), Ok)?;
            new_tensor(dims, data)
        },
    );
    engine.register_fn("zeros", |shape: Array| -> Res<ParamTensor> {
        let dims = dims(&shape, "zeros")?;
        ParamTensor::zeros(dims).or_else(|e| fail(e.to_string()))
    });
    engine.register_fn("eye", |n: INT| -> Res<ParamTensor> {
        let n = index(n, 1 << 14, "eye")?;
        from_matrix(&Matrix::eye(n))
    });
    engine.register_fn("diag", |v: &mut ParamTensor| -> Res<ParamTensor> {
        if v.shape().len() != 1 {
            return fail(format!(
                "diag: needs a 1-D tensor, got shape {:?}",
                v.shape()
            ));
        }
        let n = v.len();
        let mut m = Matrix::zeros(n, n);
        for (i, &x) in v.data().iter().enumerate() {
            m.data[i * n + i] = f64::from(x);
        }
        from_matrix(&m)
    });
}

/// `matmul`, `transpose`, `reshape`, `slice`, `concat`.
fn register_shaping(engine: &mut Engine) {
    engine.register_fn(
        "matmul",
        |a: &mut ParamTensor, b: ParamTensor| -> Res<ParamTensor> {
            let (ma, mb) = (matrix(a, "matmul")?, matrix(&b, "matmul")?);
            match ma.matmul(&mb) {
                Some(m) => from_matrix(&m),
                None => fail(format!(
                    "matmul: shapes {:?} and {:?} do not chain",
                    a.shape(),
                    b.shape()
                )),
            }
        },
    );
    engine.register_fn("transpose", |t: &mut ParamTensor| -> Res<ParamTensor> {
        from_matrix(&matrix(t, "transpose")?.transpose())
    });
    engine.register_fn(
        "reshape",
        |t: &mut ParamTensor, shape: Array| -> Res<ParamTensor> {
            let dims = dims(&shape, "reshape")?;
            if crate::params::element_count(&dims) != Some(t.len()) {
                return fail(format!(
                    "reshape: {} elements do not fit shape {dims:?}",
                    t.len()
                ));
            }
            new_tensor(dims, t.data().to_vec())
        },
    );
    engine.register_fn(
        "slice",
        |t: &mut ParamTensor, dim: INT, start: INT, end: INT| -> Res<ParamTensor> {
            let dim = index(dim, t.shape().len().saturating_sub(1), "slice (dimension)")?;
            if dim >= t.shape().len() {
                return fail("slice: a scalar has no dimension to slice");
            }
            let len = t.shape()[dim];
            let (start, end) = (
                index(start, len, "slice (start)")?,
                index(end, len, "slice (end)")?,
            );
            if start > end {
                return fail(format!("slice: start {start} is after end {end}"));
            }
            slice(t, dim, start, end)
        },
    );
    engine.register_fn("concat", |a: &mut ParamTensor, b: ParamTensor, dim: INT| {
        let dim = usize::try_from(dim).unwrap_or(usize::MAX);
        concat(&[a.clone(), b], dim)
    });
    engine.register_fn("concat", |parts: Array, dim: INT| -> Res<ParamTensor> {
        let parts: Vec<ParamTensor> = parts
            .into_iter()
            .map(|p| p.try_cast::<ParamTensor>())
            .collect::<Option<_>>()
            .map_or_else(|| fail("concat: the array must hold tensors"), Ok)?;
        concat(&parts, usize::try_from(dim).unwrap_or(usize::MAX))
    });
}

/// `qr`, `svd`, reading values (`values`, `at`) and `lora_pairs`.
fn register_decompositions(engine: &mut Engine) {
    engine.register_fn("qr", |t: &mut ParamTensor| -> Res<Map> {
        let (q, r) = linalg::qr(&matrix(t, "qr")?);
        let mut out = Map::new();
        out.insert("Q".into(), Dynamic::from(from_matrix(&q)?));
        out.insert("R".into(), Dynamic::from(from_matrix(&r)?));
        Ok(out)
    });
    engine.register_fn("svd", |t: &mut ParamTensor, rank: INT| -> Res<Map> {
        let m = matrix(t, "svd")?;
        let rank = usize::try_from(rank)
            .ok()
            .filter(|&r| r >= 1)
            .map_or_else(|| fail(format!("svd: the rank must be at least 1, got {rank}")), Ok)?;
        // One-sided Jacobi costs ~10·rows·cols² operations: keep it to what
        // strategies need (a module's factors, not a whole model).
        let (small, large) = (m.rows.min(m.cols), m.rows.max(m.cols));
        if small.saturating_mul(small).saturating_mul(large) > 1 << 31 {
            return fail(format!(
                "svd: a {}×{} matrix is too large to decompose here; decompose the small core of its factors (qr of each, then svd of R_B·R_Aᵀ)",
                m.rows, m.cols
            ));
        }
        let d = linalg::svd(&m, rank);
        let mut out = Map::new();
        out.insert("U".into(), Dynamic::from(from_matrix(&d.u)?));
        let s: Vec<f32> = d.s.iter().map(|&x| x as f32).collect();
        out.insert("S".into(), Dynamic::from(new_tensor(vec![s.len()], s)?));
        out.insert("V".into(), Dynamic::from(from_matrix(&d.v)?));
        Ok(out)
    });
    engine.register_fn("values", |t: &mut ParamTensor| -> Array {
        t.data()
            .iter()
            .map(|&x| Dynamic::from(f64::from(x)))
            .collect()
    });
    engine.register_fn("at", |t: &mut ParamTensor, i: INT, j: INT| -> Res<f64> {
        let [rows, cols] = t.shape() else {
            return fail(format!("at: needs a 2-D tensor, got shape {:?}", t.shape()));
        };
        let (rows, cols) = (*rows, *cols);
        match (usize::try_from(i), usize::try_from(j)) {
            (Ok(i), Ok(j)) if i < rows && j < cols => Ok(f64::from(t.data()[i * cols + j])),
            _ => fail(format!("at: ({i}, {j}) is outside {rows}×{cols}")),
        }
    });
    engine.register_fn("lora_pairs", |p: &mut ParamSet| -> Res<Array> {
        let mut out = Array::new();
        for pair in aggregate::lora_pairs(p) {
            let (a, b) = (
                p.get(&pair.a).expect("paired"),
                p.get(&pair.b).expect("paired"),
            );
            charge(a.len() + b.len())?;
            let mut m = Map::new();
            m.insert(
                "r".into(),
                Dynamic::from(a.shape().first().copied().unwrap_or(0) as INT),
            );
            m.insert("module".into(), Dynamic::from(pair.module));
            m.insert("a".into(), Dynamic::from(pair.a));
            m.insert("b".into(), Dynamic::from(pair.b));
            m.insert("A".into(), Dynamic::from(a.clone()));
            m.insert("B".into(), Dynamic::from(b.clone()));
            out.push(Dynamic::from_map(m));
        }
        Ok(out)
    });
}

type BinaryOp = fn(f32, f32) -> f32;

fn register_elementwise<T: Elementwise>(engine: &mut Engine) {
    let binary: [(&str, BinaryOp); 6] = [
        ("+", |a, b| a + b),
        ("-", |a, b| a - b),
        ("*", |a, b| a * b),
        ("/", |a, b| a / b),
        ("max", f32::max),
        ("min", f32::min),
    ];
    for (op, f) in binary {
        engine.register_fn(op, move |a: &mut T, b: T| a.zip(&b, f));
    }
    for (name, f) in [
        ("add", (|a, b| a + b) as BinaryOp),
        ("sub", |a, b| a - b),
        ("mul", |a, b| a * b),
        ("div", |a, b| a / b),
    ] {
        engine.register_fn(name, move |a: &mut T, b: T| a.zip(&b, f));
    }
    // Scalars, as floats or integers.
    engine.register_fn("*", |a: &mut T, x: f64| a.map(|v| v * x as f32));
    engine.register_fn("*", |x: f64, a: T| a.map(|v| v * x as f32));
    engine.register_fn("*", |a: &mut T, x: INT| a.map(|v| v * x as f32));
    engine.register_fn("*", |x: INT, a: T| a.map(|v| v * x as f32));
    engine.register_fn("/", |a: &mut T, x: f64| a.map(|v| v / x as f32));
    engine.register_fn("/", |a: &mut T, x: INT| a.map(|v| v / x as f32));
    engine.register_fn("+", |a: &mut T, x: f64| a.map(|v| v + x as f32));
    engine.register_fn("+", |x: f64, a: T| a.map(|v| v + x as f32));
    engine.register_fn("-", |a: &mut T, x: f64| a.map(|v| v - x as f32));
    engine.register_fn("-", |a: &mut T| a.map(|v| -v));
    engine.register_fn("scale", |a: &mut T, x: f64| a.map(|v| v * x as f32));
    engine.register_fn("scale", |a: &mut T, x: INT| a.map(|v| v * x as f32));
    for (name, f) in [
        ("sqrt", f32::sqrt as fn(f32) -> f32),
        ("square", |v| v * v),
        ("abs", f32::abs),
        ("sign", |v: f32| {
            if v > 0.0 {
                1.0
            } else if v < 0.0 {
                -1.0
            } else {
                0.0
            }
        }),
    ] {
        engine.register_fn(name, move |a: &mut T| a.map(f));
    }
    engine.register_fn("clamp", |a: &mut T, lo: f64, hi: f64| {
        a.map(|v| v.clamp(lo as f32, hi as f32))
    });
    engine.register_fn("zeros_like", |a: &mut T| a.map(|_| 0.0));
    engine.register_fn("fill_like", |a: &mut T, x: f64| a.map(|_| x as f32));
    engine.register_fn("norm", |a: &mut T| {
        a.values()
            .map(|v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
    });
    engine.register_fn("sum", |a: &mut T| a.values().map(f64::from).sum::<f64>());
    engine.register_fn("numel", |a: &mut T| a.values().count() as INT);
    engine.register_fn("dot", |a: &mut T, b: T| {
        let products = a.zip(&b, |x, y| x * y)?;
        // Sum in f64 for accuracy, as ParamSet::dot does.
        Ok::<_, Box<EvalAltResult>>(products.values().map(f64::from).sum::<f64>())
    });
    engine.register_fn("to_string", |a: &mut T| describe(a));
    engine.register_fn("to_debug", |a: &mut T| describe(a));
}

fn describe<T: Elementwise>(a: &T) -> String {
    let n = a.values().count();
    let norm = a
        .values()
        .map(|v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    format!("{}({n} elements, norm {norm:.6})", T::TYPE)
}

fn register_param_set(engine: &mut Engine) {
    engine.register_fn("len", |p: &mut ParamSet| p.len() as INT);
    engine.register_fn("param_set", ParamSet::new);
    engine.register_fn("put", |p: &mut ParamSet, name: &str, t: ParamTensor| {
        p.insert_tensor(name, t);
    });
    engine.register_fn(
        "remove",
        |p: &mut ParamSet, name: &str| -> Res<ParamTensor> {
            p.remove(name).map_or_else(
                || fail(format!("no tensor named `{name}` in this ParamSet")),
                Ok,
            )
        },
    );
    engine.register_fn("contains", |p: &mut ParamSet, name: &str| {
        p.get(name).is_some()
    });
    engine.register_fn(
        "with_extra",
        |p: &mut ParamSet, extra: ParamSet| -> Res<ParamSet> {
            charge(p.num_elements() + extra.num_elements())?;
            Ok(aggregate::join_extra(p.clone(), &extra))
        },
    );
    engine.register_fn("names", |p: &mut ParamSet| {
        p.names()
            .map(|n| Dynamic::from(n.to_string()))
            .collect::<Array>()
    });
    engine.register_indexer_get(|p: &mut ParamSet, name: &str| -> Res<ParamTensor> {
        match p.get(name) {
            Some(t) => {
                charge(t.len())?;
                Ok(t.clone())
            }
            None => fail(format!("no tensor named `{name}` in this ParamSet")),
        }
    });
    engine.register_indexer_set(|p: &mut ParamSet, name: &str, t: ParamTensor| -> Res<()> {
        match p.get(name) {
            Some(old) if old.shape() != t.shape() => fail(format!(
                "tensor `{name}`: cannot replace shape {:?} by {:?}",
                old.shape(),
                t.shape()
            )),
            Some(_) => {
                p.insert_tensor(name, t);
                Ok(())
            }
            None => fail(format!("no tensor named `{name}` in this ParamSet")),
        }
    });
    engine.register_fn(
        "map_tensors",
        |ctx: NativeCallContext, p: &mut ParamSet, f: FnPtr| -> Res<ParamSet> {
            charge(2 * p.num_elements())?;
            let mut out = p.clone();
            for (name, t) in out.iter_mut() {
                let mapped: ParamTensor =
                    f.call_within_context(&ctx, (name.to_string(), t.clone()))?;
                if mapped.shape() != t.shape() {
                    return fail(format!(
                        "map_tensors: the function changed tensor `{name}` from shape {:?} to {:?}",
                        t.shape(),
                        mapped.shape()
                    ));
                }
                *t = mapped;
            }
            Ok(out)
        },
    );
    engine.register_fn("shape", |t: &mut ParamTensor| {
        t.shape()
            .iter()
            .map(|&d| Dynamic::from(d as INT))
            .collect::<Array>()
    });
}

fn register_updates(engine: &mut Engine) {
    engine.register_get("client", |u: &mut ClientUpdate| INT::from(u.client));
    engine.register_get("n_samples", |u: &mut ClientUpdate| u.n_samples as INT);
    engine.register_get("params", |u: &mut ClientUpdate| -> Res<ParamSet> {
        charge(u.params.num_elements())?;
        Ok(u.params.clone())
    });
    engine.register_get("extra", |u: &mut ClientUpdate| -> Res<ParamSet> {
        charge(u.extra.num_elements())?;
        Ok(u.extra.clone())
    });
    engine.register_get("local_steps", |u: &mut ClientUpdate| {
        u.local_steps
            .map_or(Dynamic::UNIT, |n| Dynamic::from(n as INT))
    });
    engine.register_get("train_loss", |u: &mut ClientUpdate| {
        u.train_loss.map_or(Dynamic::UNIT, Dynamic::from)
    });
    engine.register_get("metrics", |u: &mut ClientUpdate| -> Map {
        u.metrics
            .iter()
            .map(|(k, v)| (k.as_str().into(), Dynamic::from(*v)))
            .collect()
    });
    engine.register_get("config", |u: &mut ClientUpdate| config_map(&u.config));
    engine.register_fn("weighted_mean", |updates: Array| {
        with_updates(&updates, aggregate::fedavg_of)
    });
    engine.register_fn("median", |updates: Array| {
        with_updates(&updates, aggregate::coordinate_median_of)
    });
    engine.register_fn("trimmed_mean", |updates: Array, beta: f64| {
        with_updates(&updates, |u| aggregate::trimmed_mean_of(u, beta))
    });
    engine.register_fn("closest_to_median", |updates: Array, beta: INT| {
        let beta = usize::try_from(beta).unwrap_or(0);
        with_updates(&updates, |u| aggregate::closest_to_median_of(u, beta))
    });
    register_privacy(engine);
}

/// DP's clipping, noise and accountant (see the module docs).
fn register_privacy(engine: &mut Engine) {
    use crate::privacy::{accountant, add_gaussian_noise, clip_update};
    engine.register_fn(
        "clip_update",
        |p: &mut ParamSet, reference: ParamSet, c: f64| -> Res<Map> {
            if !(c > 0.0 && c.is_finite()) {
                return fail(format!("clip_update: the norm must be positive, got {c}"));
            }
            charge(reference.num_elements())?;
            let (clipped, norm) = clip_update(p, &reference, c).or_else(|e| fail(e.to_string()))?;
            let mut out = Map::new();
            out.insert("params".into(), Dynamic::from(clipped));
            out.insert("norm".into(), Dynamic::from(norm));
            Ok(out)
        },
    );
    engine.register_fn(
        "gaussian_noise",
        |p: &mut ParamSet, std: f64, seed: INT| -> Res<ParamSet> {
            if !(std >= 0.0 && std.is_finite()) {
                return fail(format!("gaussian_noise: std must be 0 or more, got {std}"));
            }
            charge(p.num_elements())?;
            let mut out = p.clone();
            add_gaussian_noise(&mut out, std, seed as u64);
            Ok(out)
        },
    );
    engine.register_fn(
        "dp_epsilon",
        |q: f64, sigma: f64, rounds: INT, delta: f64| -> Res<f64> {
            let valid = (0.0..=1.0).contains(&q) && sigma >= 0.0 && rounds >= 0 && delta > 0.0 && delta < 1.0;
            if !valid {
                return fail(format!(
                    "dp_epsilon: needs 0 ≤ q ≤ 1, sigma ≥ 0, rounds ≥ 0, 0 < delta < 1 (got {q}, {sigma}, {rounds}, {delta})"
                ));
            }
            Ok(accountant::epsilon(q, sigma, rounds as u64, delta))
        },
    );
}

/// Borrows the `Update`s of a script array (no copies) for a native reduction.
fn with_updates(
    updates: &Array,
    f: impl FnOnce(&[&ClientUpdate]) -> Result<ParamSet, aggregate::AggregateError>,
) -> Res<ParamSet> {
    let mut guards = Vec::with_capacity(updates.len());
    for (i, item) in updates.iter().enumerate() {
        match item.read_lock::<ClientUpdate>() {
            Some(g) => guards.push(g),
            None => {
                return fail(format!(
                    "element {i} of the updates array is a {}, not an Update",
                    item.type_name()
                ))
            }
        }
    }
    let refs: Vec<&ClientUpdate> = guards.iter().map(|g| &**g).collect();
    charge(refs.first().map_or(0, |u| u.params.num_elements()))?;
    f(&refs).or_else(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        let mut e = Engine::new();
        register(&mut e);
        e
    }

    fn set(w: [f32; 2], b: f32) -> ParamSet {
        let mut p = ParamSet::new();
        p.insert("w", vec![2], w.to_vec()).unwrap();
        p.insert("b", vec![], vec![b]).unwrap();
        p
    }

    fn eval(script: &str, a: ParamSet, b: ParamSet) -> ParamSet {
        let mut scope = rhai::Scope::new();
        scope.push("a", a).push("b", b);
        engine()
            .eval_with_scope::<ParamSet>(&mut scope, script)
            .unwrap()
    }

    #[test]
    fn element_wise_operators_match_hand_computed_values() {
        let a = set([1.0, 4.0], -2.0);
        let b = set([3.0, 2.0], 0.5);
        let w = |p: &ParamSet| p.get("w").unwrap().data().to_vec();
        assert_eq!(w(&eval("a + b", a.clone(), b.clone())), [4.0, 6.0]);
        assert_eq!(w(&eval("a - b * 2", a.clone(), b.clone())), [-5.0, 0.0]);
        assert_eq!(w(&eval("a / b", a.clone(), b.clone())), [1.0 / 3.0, 2.0]);
        assert_eq!(
            w(&eval("sqrt(a) + 0.5 * b", a.clone(), b.clone())),
            [2.5, 3.0]
        );
        assert_eq!(
            w(&eval("sign(-a) * square(b)", a.clone(), b.clone())),
            [-9.0, -4.0]
        );
        assert_eq!(w(&eval("max(a, b)", a.clone(), b.clone())), [3.0, 4.0]);
        let scaled = eval(
            "map_tensors(a, |name, t| if name == \"w\" { t * 10 } else { t })",
            a.clone(),
            b.clone(),
        );
        assert_eq!(w(&scaled), [10.0, 40.0]);
        assert_eq!(scaled.get("b").unwrap().data(), &[-2.0]);
        let mut scope = rhai::Scope::new();
        scope.push("a", a.clone()).push("b", b.clone());
        let n: f64 = engine().eval_with_scope(&mut scope, "norm(a)").unwrap();
        assert!((n - 21f64.sqrt()).abs() < 1e-12);
        let d: f64 = engine().eval_with_scope(&mut scope, "dot(a, b)").unwrap();
        assert_eq!(d, 3.0 + 8.0 - 1.0);
    }

    fn floats(script: &str) -> Vec<f64> {
        let out: Array = engine().eval(&format!("values({script})")).unwrap();
        out.into_iter().map(|v| v.as_float().unwrap()).collect()
    }

    #[test]
    fn matrix_functions_match_hand_computed_values() {
        let a = "tensor([2, 3], [1, 2, 3, 4, 5, 6])";
        let b = "tensor([3, 2], [7, 8, 9, 10, 11, 12])";
        assert_eq!(
            floats(&format!("matmul({a}, {b})")),
            [58.0, 64.0, 139.0, 154.0]
        );
        assert_eq!(
            floats(&format!("transpose({a})")),
            [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
        );
        assert_eq!(
            floats(&format!("slice({a}, 1, 1, 3)")),
            [2.0, 3.0, 5.0, 6.0]
        );
        assert_eq!(floats(&format!("slice({a}, 0, 1, 2)")), [4.0, 5.0, 6.0]);
        assert_eq!(
            floats(&format!("concat({a}, zeros([2, 1]), 1)")),
            [1.0, 2.0, 3.0, 0.0, 4.0, 5.0, 6.0, 0.0]
        );
        assert_eq!(
            floats(&format!("concat([{a}, eye(3)], 0)")),
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        );
        let shape: Array = engine()
            .eval(&format!("shape(reshape({a}, [3, 2]))"))
            .unwrap();
        assert_eq!(
            shape
                .iter()
                .map(|d| d.as_int().unwrap())
                .collect::<Vec<_>>(),
            [3, 2]
        );
        assert_eq!(floats("diag(tensor([2], [3, 4]))"), [3.0, 0.0, 0.0, 4.0]);
        // svd of [[3, 0], [4, 5]]: √45 and √5; QR of [[3, 1], [4, 2]]: |R| = 5, 2.2, 0.4.
        let s = floats("svd(tensor([2, 2], [3, 0, 4, 5]), 2).S");
        assert!((s[0] - 45f64.sqrt()).abs() < 1e-5 && (s[1] - 5f64.sqrt()).abs() < 1e-5);
        let rank1 = floats("svd(tensor([2, 2], [3, 0, 4, 5]), 1).U");
        assert_eq!(rank1.len(), 2);
        let r = floats("qr(tensor([2, 2], [3, 1, 4, 2])).R");
        assert!((r[0].abs() - 5.0).abs() < 1e-5 && (r[1].abs() - 2.2).abs() < 1e-5);
        assert_eq!(r[2], 0.0);
        assert!((r[3].abs() - 0.4).abs() < 1e-5);
        let at: f64 = engine().eval(&format!("at({a}, 1, 2)")).unwrap();
        assert_eq!(at, 6.0);
        for (bad, says) in [
            (format!("matmul({a}, {a})"), "do not chain"),
            (format!("slice({a}, 1, 2, 5)"), "outside"),
            (format!("reshape({a}, [4, 2])"), "do not fit"),
            (format!("concat({a}, eye(2), 0)"), "differ beyond"),
            ("svd(tensor([3], [1, 2, 3]), 1)".to_string(), "2-D"),
        ] {
            let err = engine().eval::<Dynamic>(&bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn lora_pairs_and_param_set_building_use_peft_names() {
        let mut p = ParamSet::new();
        p.insert("m.q.lora_A.weight", vec![2, 3], vec![1.0; 6])
            .unwrap();
        p.insert("m.q.lora_B.weight", vec![4, 2], vec![2.0; 8])
            .unwrap();
        p.insert("m.v.lora_A.weight", vec![2, 3], vec![0.0; 6])
            .unwrap();
        let mut scope = rhai::Scope::new();
        scope.push("p", p);
        let pairs: Array = engine()
            .eval_with_scope(&mut scope, "lora_pairs(p)")
            .unwrap();
        assert_eq!(pairs.len(), 1, "m.v has no lora_B");
        let m = pairs[0].clone().cast::<rhai::Map>();
        assert_eq!(m["module"].to_string(), "m.q");
        assert_eq!(m["r"].as_int().unwrap(), 2);
        assert_eq!(m["B"].clone().cast::<ParamTensor>().shape(), [4, 2]);
        let built: ParamSet = engine()
            .eval_with_scope(
                &mut scope,
                "let q = param_set(); q.put(\"x\", eye(2)); q.put(\"y\", zeros([1])); q.remove(\"y\"); with_extra(q, q)",
            )
            .unwrap();
        assert_eq!(built.names().collect::<Vec<_>>(), ["extra/x", "x"]);
    }

    #[test]
    fn mismatched_sets_and_missing_tensors_are_script_errors() {
        let mut other = ParamSet::new();
        other.insert("w", vec![2], vec![0.0, 0.0]).unwrap();
        let mut scope = rhai::Scope::new();
        scope.push("a", set([1.0, 1.0], 1.0)).push("b", other);
        let err = engine()
            .eval_with_scope::<ParamSet>(&mut scope, "a + b")
            .unwrap_err();
        assert!(err.to_string().contains("differ in names"), "{err}");
        let err = engine()
            .eval_with_scope::<ParamTensor>(&mut scope, "a[\"nope\"]")
            .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn dp_functions_are_the_native_ones() {
        use crate::privacy::{accountant, add_gaussian_noise, clip_update};
        let e = engine();
        let mut scope = rhai::Scope::new();
        scope
            .push("a", set([4.0, 5.0], 1.0))
            .push("g", set([1.0, 1.0], 1.0));
        let out: Map = e
            .eval_with_scope(&mut scope, "clip_update(a, g, 1.0)")
            .unwrap();
        let (want, norm) = clip_update(&set([4.0, 5.0], 1.0), &set([1.0, 1.0], 1.0), 1.0).unwrap();
        assert_eq!(out["params"].clone().cast::<ParamSet>(), want);
        assert_eq!(out["norm"].as_float().unwrap(), norm);
        let noised: ParamSet = e
            .eval_with_scope(&mut scope, "gaussian_noise(g, 0.5, 11)")
            .unwrap();
        let mut native = set([1.0, 1.0], 1.0);
        add_gaussian_noise(&mut native, 0.5, 11);
        assert_eq!(noised, native);
        let eps: f64 = e
            .eval_with_scope(&mut scope, "dp_epsilon(0.1, 1.0, 100, 1e-5)")
            .unwrap();
        assert_eq!(eps, accountant::epsilon(0.1, 1.0, 100, 1e-5));
        for bad in [
            "clip_update(a, g, 0.0)",
            "gaussian_noise(g, -1.0, 1)",
            "dp_epsilon(2.0, 1.0, 1, 1e-5)",
        ] {
            assert!(
                e.eval_with_scope::<Dynamic>(&mut scope, bad).is_err(),
                "{bad}"
            );
        }
    }
}
