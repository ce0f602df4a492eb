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
//! the native one), `median(updates)`, `trimmed_mean(updates, beta)`.

use rhai::{Array, Dynamic, Engine, EvalAltResult, FnPtr, NativeCallContext, Position, INT};

use crate::aggregate::{self, ClientUpdate};
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
    register_elementwise::<ParamSet>(engine);
    register_elementwise::<ParamTensor>(engine);
    register_param_set(engine);
    register_updates(engine);
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
    engine.register_fn("weighted_mean", |updates: Array| {
        with_updates(&updates, aggregate::fedavg_of)
    });
    engine.register_fn("median", |updates: Array| {
        with_updates(&updates, aggregate::coordinate_median_of)
    });
    engine.register_fn("trimmed_mean", |updates: Array, beta: f64| {
        with_updates(&updates, |u| aggregate::trimmed_mean_of(u, beta))
    });
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
}
