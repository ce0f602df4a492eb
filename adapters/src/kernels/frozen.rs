//! A frozen weight as the model holds it and the products take it: a dense
//! tensor (f32, f64 or bf16) or int8 blocks ([`Int8Weight`]).

use candle_core::{DType, Device, Result, Tensor};

use super::int8::Int8Weight;
use super::linear::weight_fits;

/// A frozen projection weight `(out, in)`.
#[derive(Debug, Clone)]
pub enum Frozen {
    /// Stored as a tensor of its dtype.
    Dense(Tensor),
    /// Stored as int8 blocks with f32 scales.
    Int8(Int8Weight),
}

impl From<Tensor> for Frozen {
    fn from(t: Tensor) -> Self {
        Frozen::Dense(t)
    }
}

impl From<&Tensor> for Frozen {
    fn from(t: &Tensor) -> Self {
        Frozen::Dense(t.clone())
    }
}

impl From<&Frozen> for Frozen {
    fn from(w: &Frozen) -> Self {
        w.clone()
    }
}

impl Frozen {
    /// The storage dtype: the tensor's, or `U8` for int8 blocks (the
    /// dtype [`crate::model::Compute::Int8`] resolves to).
    pub fn dtype(&self) -> DType {
        match self {
            Frozen::Dense(t) => t.dtype(),
            Frozen::Int8(_) => DType::U8,
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Frozen::Dense(t) => t.dims2(),
            Frozen::Int8(q) => q.dims2(),
        }
    }

    /// Whether the fused CPU products take this weight beside `x` (itself
    /// on the CPU, see [`super::rows::fused`]): a contiguous weight of
    /// `x`'s dtype, a bf16 one beside f32, or int8 blocks on the CPU
    /// beside f32.
    pub(super) fn fits(&self, x: &Tensor) -> bool {
        match self {
            Frozen::Dense(w) => weight_fits(x, w) && w.is_contiguous() && w.rank() == 2,
            Frozen::Int8(q) => x.dtype() == DType::F32 && q.device().is_cpu(),
        }
    }

    /// This weight on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(match self {
            Frozen::Dense(t) => Frozen::Dense(t.to_device(device)?),
            Frozen::Int8(q) => Frozen::Int8(q.to_device(device)?),
        })
    }

    /// This weight stored in `dtype`: `U8` quantizes it to int8 blocks, a
    /// float dtype converts it (int8 blocks are dequantized).
    pub fn to_storage(&self, dtype: DType) -> Result<Self> {
        Ok(match (self, dtype) {
            (Frozen::Int8(_), DType::U8) => self.clone(),
            (Frozen::Dense(t), DType::U8) => Frozen::Int8(Int8Weight::quantize(t)?),
            (w, dtype) => Frozen::Dense(w.values(dtype)?),
        })
    }

    /// The weight's values as a tensor in `dtype`.
    pub fn values(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Frozen::Dense(t) => t.to_dtype(dtype),
            Frozen::Int8(q) => q.dequantize(dtype),
        }
    }

    /// The weight as a tensor: itself when dense, its values in f32 when
    /// int8.
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            Frozen::Dense(t) => Ok(t.clone()),
            Frozen::Int8(q) => q.dequantize(DType::F32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_converts_there_and_back() {
        let w = Tensor::arange(0f32, 40.0, &Device::Cpu)
            .unwrap()
            .reshape((4, 10))
            .unwrap();
        let dense = Frozen::from(w.clone());
        let int8 = dense.to_storage(DType::U8).unwrap();
        assert_eq!(int8.dtype(), DType::U8);
        assert_eq!(int8.dims().unwrap(), (4, 10));
        // Row 3 is 30..39: its scale is 39/127; every value within half of it.
        let back = int8.to_storage(DType::F32).unwrap().tensor().unwrap();
        let err = (back - &w).unwrap().abs().unwrap().max_all().unwrap();
        assert!(err.to_scalar::<f32>().unwrap() <= 39.0 / 254.0 + 1e-6);
        let bf16 = dense.to_storage(DType::BF16).unwrap();
        assert_eq!(bf16.dtype(), DType::BF16);
        assert!(matches!(
            bf16.to_storage(DType::U8).unwrap(),
            Frozen::Int8(_)
        ));
    }
}
