//! Named parameter tensors: the unit that crosses the wire and that aggregators combine.
//!
//! A [`ParamSet`] maps names (PEFT-style, such as
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) to plain
//! row-major `f32` tensors. The kernel deliberately knows nothing of candle: the
//! adapters convert their tensors to and from this type, which keeps the kernel
//! testable with a tiny numeric trainer and free of ML dependencies.
//!
//! Names are kept sorted (a `BTreeMap`), so iteration, encoding and aggregation
//! visit tensors in one deterministic order. Every binary operation first checks
//! that both sides have the same names and shapes and fails with a
//! [`ParamError`] that names the offending tensor.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors from building or combining parameter sets.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ParamError {
    /// The shape's element count disagrees with the data length.
    #[error("tensor `{name}`: shape {shape:?} holds {expected} elements but {actual} were given")]
    DataLength {
        name: String,
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
    /// A shape whose element count overflows `usize`.
    #[error("tensor `{name}`: shape {shape:?} is too large")]
    ShapeOverflow { name: String, shape: Vec<usize> },
    /// Two sets do not hold the same tensor names.
    #[error("parameter sets differ in names: missing {missing:?}, unexpected {unexpected:?}")]
    NameMismatch {
        missing: Vec<String>,
        unexpected: Vec<String>,
    },
    /// Two sets hold a tensor of the same name with different shapes.
    #[error("tensor `{name}`: shape {left:?} does not match {right:?}")]
    ShapeMismatch {
        name: String,
        left: Vec<usize>,
        right: Vec<usize>,
    },
    /// A weighted mean over nothing, or with weights that do not sum to a positive number.
    #[error("weighted mean needs at least one set and a positive total weight (got {count} sets, total weight {total})")]
    BadWeights { count: usize, total: f64 },
    /// A tensor holds NaN or an infinity.
    #[error("tensor `{name}` holds a non-finite value at element {index}")]
    NonFinite { name: String, index: usize },
}

/// One named tensor: a shape and its row-major `f32` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamTensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl ParamTensor {
    /// Builds a tensor, checking that `data` fills `shape` exactly.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, ParamError> {
        let expected = element_count(&shape).ok_or_else(|| ParamError::ShapeOverflow {
            name: String::new(),
            shape: shape.clone(),
        })?;
        if expected != data.len() {
            return Err(ParamError::DataLength {
                name: String::new(),
                shape,
                expected,
                actual: data.len(),
            });
        }
        Ok(Self { shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Result<Self, ParamError> {
        let n = element_count(&shape).ok_or_else(|| ParamError::ShapeOverflow {
            name: String::new(),
            shape: shape.clone(),
        })?;
        Ok(Self {
            shape,
            data: vec![0.0; n],
        })
    }

    /// The shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements in row-major order.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// Mutable access to the elements; the shape stays fixed.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True for a tensor with no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Gives up the tensor, returning its shape and data.
    pub fn into_parts(self) -> (Vec<usize>, Vec<f32>) {
        (self.shape, self.data)
    }
}

/// The number of elements a shape holds, or `None` on overflow. A shape of no
/// dimensions is a scalar and holds one element.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Named `f32` tensors with shapes, kept in name order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ParamSet {
    tensors: BTreeMap<String, ParamTensor>,
}

impl ParamSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts (or replaces) a tensor, checking its data length against its shape.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        shape: Vec<usize>,
        data: Vec<f32>,
    ) -> Result<(), ParamError> {
        let name = name.into();
        let tensor = ParamTensor::new(shape, data).map_err(|e| e.with_name(&name))?;
        self.tensors.insert(name, tensor);
        Ok(())
    }

    /// The tensors by name, consumed.
    pub fn into_tensors(self) -> impl Iterator<Item = (String, ParamTensor)> {
        self.tensors.into_iter()
    }

    /// Inserts an already-built tensor.
    pub fn insert_tensor(&mut self, name: impl Into<String>, tensor: ParamTensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// A set with the same names and shapes as `self`, all zeros.
    pub fn zeros_like(&self) -> Self {
        let tensors = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let zeros = ParamTensor {
                    shape: t.shape.clone(),
                    data: vec![0.0; t.data.len()],
                };
                (name.clone(), zeros)
            })
            .collect();
        Self { tensors }
    }

    /// The tensor of this name, if present.
    pub fn get(&self, name: &str) -> Option<&ParamTensor> {
        self.tensors.get(name)
    }

    /// Mutable access to the tensor of this name, if present.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut ParamTensor> {
        self.tensors.get_mut(name)
    }

    /// Removes and returns the tensor of this name.
    pub fn remove(&mut self, name: &str) -> Option<ParamTensor> {
        self.tensors.remove(name)
    }

    /// Iterates over `(name, tensor)` in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ParamTensor)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Iterates mutably over `(name, tensor)` in name order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut ParamTensor)> {
        self.tensors.iter_mut().map(|(n, t)| (n.as_str(), t))
    }

    /// The tensor names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when the set holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.tensors.values().map(ParamTensor::len).sum()
    }

    /// Checks that `other` has exactly the same names and shapes.
    pub fn check_compatible(&self, other: &ParamSet) -> Result<(), ParamError> {
        let missing: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !other.tensors.contains_key(*k))
            .cloned()
            .collect();
        let unexpected: Vec<String> = other
            .tensors
            .keys()
            .filter(|k| !self.tensors.contains_key(*k))
            .cloned()
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(ParamError::NameMismatch {
                missing,
                unexpected,
            });
        }
        for (name, t) in &self.tensors {
            let o = &other.tensors[name];
            if t.shape != o.shape {
                return Err(ParamError::ShapeMismatch {
                    name: name.clone(),
                    left: t.shape.clone(),
                    right: o.shape.clone(),
                });
            }
        }
        Ok(())
    }

    /// Fails on the first NaN or infinity, naming the tensor.
    pub fn check_finite(&self) -> Result<(), ParamError> {
        for (name, t) in &self.tensors {
            if let Some(index) = t.data.iter().position(|v| !v.is_finite()) {
                return Err(ParamError::NonFinite {
                    name: name.clone(),
                    index,
                });
            }
        }
        Ok(())
    }

    /// `self += other`, element by element.
    pub fn add_assign(&mut self, other: &ParamSet) -> Result<(), ParamError> {
        self.zip_apply(other, |a, b| *a += b)
    }

    /// `self -= other`, element by element.
    pub fn sub_assign(&mut self, other: &ParamSet) -> Result<(), ParamError> {
        self.zip_apply(other, |a, b| *a -= b)
    }

    /// `self += alpha * other` (BLAS's axpy).
    pub fn axpy(&mut self, alpha: f32, other: &ParamSet) -> Result<(), ParamError> {
        self.zip_apply(other, |a, b| *a += alpha * b)
    }

    /// `self + other` as a new set.
    pub fn add(&self, other: &ParamSet) -> Result<ParamSet, ParamError> {
        let mut out = self.clone();
        out.add_assign(other)?;
        Ok(out)
    }

    /// `self - other` as a new set.
    pub fn sub(&self, other: &ParamSet) -> Result<ParamSet, ParamError> {
        let mut out = self.clone();
        out.sub_assign(other)?;
        Ok(out)
    }

    /// Multiplies every element by `factor`.
    pub fn scale_assign(&mut self, factor: f32) {
        for t in self.tensors.values_mut() {
            t.data.iter_mut().for_each(|v| *v *= factor);
        }
    }

    /// `factor * self` as a new set.
    pub fn scale(&self, factor: f32) -> ParamSet {
        let mut out = self.clone();
        out.scale_assign(factor);
        out
    }

    /// The Euclidean norm over all elements of all tensors (accumulated in `f64`).
    pub fn l2_norm(&self) -> f64 {
        self.tensors
            .values()
            .flat_map(|t| t.data.iter())
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
    }

    /// The dot product over all elements (accumulated in `f64`).
    pub fn dot(&self, other: &ParamSet) -> Result<f64, ParamError> {
        self.check_compatible(other)?;
        Ok(self
            .tensors
            .iter()
            .flat_map(|(name, t)| t.data.iter().zip(other.tensors[name].data.iter()))
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum())
    }

    /// `Σ wᵢ·setᵢ / Σ wᵢ`, accumulated in `f64` in the order given, so the result
    /// is the same bit for bit whenever the inputs come in the same order.
    ///
    /// ```
    /// use fedtune_kernel::ParamSet;
    /// let mut a = ParamSet::new();
    /// a.insert("w", vec![2], vec![1.0, 2.0]).unwrap();
    /// let mut b = ParamSet::new();
    /// b.insert("w", vec![2], vec![3.0, 6.0]).unwrap();
    /// let mean = ParamSet::weighted_mean(&[(&a, 1.0), (&b, 3.0)]).unwrap();
    /// assert_eq!(mean.get("w").unwrap().data(), &[2.5, 5.0]);
    /// ```
    pub fn weighted_mean(sets: &[(&ParamSet, f64)]) -> Result<ParamSet, ParamError> {
        let total: f64 = sets.iter().map(|(_, w)| *w).sum();
        let weights_ok = sets.iter().all(|(_, w)| w.is_finite() && *w >= 0.0);
        let Some(((first, _), rest)) = sets.split_first() else {
            return Err(ParamError::BadWeights { count: 0, total });
        };
        if !(weights_ok && total > 0.0 && total.is_finite()) {
            return Err(ParamError::BadWeights {
                count: sets.len(),
                total,
            });
        }
        for (set, _) in rest {
            first.check_compatible(set)?;
        }
        let mut tensors = BTreeMap::new();
        for (name, t) in &first.tensors {
            let mut acc = vec![0f64; t.data.len()];
            for (set, w) in sets {
                let w = *w / total;
                for (a, &v) in acc.iter_mut().zip(&set.tensors[name].data) {
                    *a += w * f64::from(v);
                }
            }
            let data = acc.into_iter().map(|v| v as f32).collect();
            tensors.insert(
                name.clone(),
                ParamTensor {
                    shape: t.shape.clone(),
                    data,
                },
            );
        }
        Ok(ParamSet { tensors })
    }

    /// A new set with `f` applied to every element.
    pub fn map_values(&self, f: impl Fn(f32) -> f32) -> ParamSet {
        let mut out = self.clone();
        for t in out.tensors.values_mut() {
            t.data.iter_mut().for_each(|x| *x = f(*x));
        }
        out
    }

    /// A new set with `f(a, b)` of matching elements of `self` and `other`.
    pub fn zip_map(
        &self,
        other: &ParamSet,
        f: impl Fn(f32, f32) -> f32,
    ) -> Result<ParamSet, ParamError> {
        let mut out = self.clone();
        out.zip_apply(other, |a, b| *a = f(*a, b))?;
        Ok(out)
    }

    fn zip_apply(
        &mut self,
        other: &ParamSet,
        mut f: impl FnMut(&mut f32, f32),
    ) -> Result<(), ParamError> {
        self.check_compatible(other)?;
        for (name, t) in self.tensors.iter_mut() {
            for (a, &b) in t.data.iter_mut().zip(&other.tensors[name].data) {
                f(a, b);
            }
        }
        Ok(())
    }
}

impl ParamError {
    /// Fills in the tensor name of an error raised before the name was known.
    fn with_name(self, tensor: &str) -> Self {
        match self {
            ParamError::DataLength {
                shape,
                expected,
                actual,
                ..
            } => ParamError::DataLength {
                name: tensor.to_string(),
                shape,
                expected,
                actual,
            },
            ParamError::ShapeOverflow { shape, .. } => ParamError::ShapeOverflow {
                name: tensor.to_string(),
                shape,
            },
            other => other,
        }
    }
}

impl<'a> IntoIterator for &'a ParamSet {
    type Item = (&'a String, &'a ParamTensor);
    type IntoIter = std::collections::btree_map::Iter<'a, String, ParamTensor>;

    fn into_iter(self) -> Self::IntoIter {
        self.tensors.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(values: &[(&str, Vec<usize>, Vec<f32>)]) -> ParamSet {
        let mut s = ParamSet::new();
        for (n, shape, data) in values {
            s.insert(*n, shape.clone(), data.clone()).unwrap();
        }
        s
    }

    #[test]
    fn insert_checks_length_against_shape() {
        let mut s = ParamSet::new();
        let err = s.insert("w", vec![2, 3], vec![0.0; 5]).unwrap_err();
        assert_eq!(
            err,
            ParamError::DataLength {
                name: "w".into(),
                shape: vec![2, 3],
                expected: 6,
                actual: 5
            }
        );
        let err = s.insert("big", vec![usize::MAX, 2], vec![]).unwrap_err();
        assert!(matches!(err, ParamError::ShapeOverflow { ref name, .. } if name == "big"));
    }

    #[test]
    fn arithmetic_matches_hand_computation() {
        let a = set(&[("a", vec![2], vec![1.0, 2.0]), ("b", vec![], vec![3.0])]);
        let b = set(&[("a", vec![2], vec![0.5, -1.0]), ("b", vec![], vec![1.0])]);
        assert_eq!(a.add(&b).unwrap().get("a").unwrap().data(), &[1.5, 1.0]);
        assert_eq!(a.sub(&b).unwrap().get("b").unwrap().data(), &[2.0]);
        assert_eq!(a.scale(2.0).get("a").unwrap().data(), &[2.0, 4.0]);
        let mut c = a.clone();
        c.axpy(-2.0, &b).unwrap();
        assert_eq!(c.get("a").unwrap().data(), &[0.0, 4.0]);
        assert_eq!(a.l2_norm(), (1.0f64 + 4.0 + 9.0).sqrt());
        assert_eq!(a.dot(&b).unwrap(), 0.5 - 2.0 + 3.0);
        assert_eq!(a.num_elements(), 3);
        assert_eq!(a.names().collect::<Vec<_>>(), vec!["a", "b"]);
    }

    #[test]
    fn mismatched_names_and_shapes_are_rejected() {
        let a = set(&[("a", vec![2], vec![1.0, 2.0])]);
        let b = set(&[("b", vec![2], vec![1.0, 2.0])]);
        let err = a.add(&b).unwrap_err();
        assert_eq!(
            err,
            ParamError::NameMismatch {
                missing: vec!["a".into()],
                unexpected: vec!["b".into()]
            }
        );
        let c = set(&[("a", vec![1, 2], vec![1.0, 2.0])]);
        let err = a.add(&c).unwrap_err();
        assert!(matches!(err, ParamError::ShapeMismatch { ref name, .. } if name == "a"));
        // The failed operation left the target untouched.
        let mut d = a.clone();
        assert!(d.add_assign(&c).is_err());
        assert_eq!(d, a);
    }

    #[test]
    fn weighted_mean_matches_hand_computed_values() {
        let a = set(&[("w", vec![3], vec![1.0, 0.0, -2.0])]);
        let b = set(&[("w", vec![3], vec![4.0, 2.0, 2.0])]);
        let c = set(&[("w", vec![3], vec![-1.0, 8.0, 0.5])]);
        // weights 10, 30, 60 → (0.1, 0.3, 0.6)
        let m = ParamSet::weighted_mean(&[(&a, 10.0), (&b, 30.0), (&c, 60.0)]).unwrap();
        let expected = [
            0.1 * 1.0 + 0.3 * 4.0 - 0.6 * 1.0,
            0.1 * 0.0 + 0.3 * 2.0 + 0.6 * 8.0,
            -0.1 * 2.0 + 0.3 * 2.0 + 0.6 * 0.5,
        ];
        for (got, want) in m.get("w").unwrap().data().iter().zip(expected) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn weighted_mean_rejects_bad_weights() {
        let a = set(&[("w", vec![1], vec![1.0])]);
        assert!(matches!(
            ParamSet::weighted_mean(&[]),
            Err(ParamError::BadWeights { count: 0, .. })
        ));
        assert!(ParamSet::weighted_mean(&[(&a, 0.0)]).is_err());
        assert!(ParamSet::weighted_mean(&[(&a, -1.0), (&a, 2.0)]).is_err());
        assert!(ParamSet::weighted_mean(&[(&a, f64::NAN)]).is_err());
    }

    #[test]
    fn check_finite_names_the_tensor() {
        let a = set(&[
            ("ok", vec![1], vec![1.0]),
            ("bad", vec![2], vec![0.0, f32::NAN]),
        ]);
        assert_eq!(
            a.check_finite().unwrap_err(),
            ParamError::NonFinite {
                name: "bad".into(),
                index: 1
            }
        );
    }
}
