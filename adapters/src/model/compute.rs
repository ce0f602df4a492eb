//! `[model] compute`: the dtype the frozen base is stored and multiplied in.

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::kernels::bf16::bf16_units;

/// What the frozen base's projections and output head are stored and
/// multiplied in. Adapter parameters, their gradients, the optimizer state,
/// norms, softmax, the loss and every activation stay f32 either way.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Compute {
    /// bf16 where the CPU multiplies bf16 natively (AVX512-BF16), else f32.
    Auto,
    /// Everything in f32.
    #[default]
    F32,
    /// The frozen weights in bf16 (half their memory); on a CPU without
    /// bf16 units they are widened to f32 block by block for each product.
    Bf16,
    /// The frozen projections as int8 blocks with f32 scales (1.125 bytes a
    /// weight), the embeddings and head in bf16; the blocks are dequantized
    /// into the bf16 products' panels ([`crate::kernels::int8`]).
    Int8,
}

impl Compute {
    /// Whether this is the default, f32.
    pub fn is_f32(&self) -> bool {
        *self == Compute::F32
    }

    /// The dtype of the frozen projections on this machine: `U8` stands
    /// for int8 blocks ([`crate::model::Frozen`]).
    pub fn dtype(self) -> DType {
        match self {
            Compute::Auto if bf16_units() => DType::BF16,
            Compute::Auto | Compute::F32 => DType::F32,
            Compute::Bf16 => DType::BF16,
            Compute::Int8 => DType::U8,
        }
    }

    /// The name configs and `--compute` use.
    pub fn name(self) -> &'static str {
        match self {
            Compute::Auto => "auto",
            Compute::F32 => "f32",
            Compute::Bf16 => "bf16",
            Compute::Int8 => "int8",
        }
    }

    /// The product path this setting takes here, for reports:
    /// `f32-avx512`, `bf16-avx512`, `int8-bf16-avx512`, `bf16-widened-f32`, …
    pub fn path(self) -> String {
        match self.dtype() {
            DType::BF16 => crate::kernels::bf16::bf16_path().to_string(),
            DType::U8 => format!("int8-{}", crate::kernels::bf16::bf16_path()),
            _ => format!("f32-{}", crate::simd::simd_path().name()),
        }
    }
}

/// A compute setting that is none of `auto`, `f32`, `bf16`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unknown compute `{0}` (auto, f32, bf16 or int8)")]
pub struct UnknownCompute(pub String);

impl std::str::FromStr for Compute {
    type Err = UnknownCompute;
    fn from_str(s: &str) -> Result<Self, UnknownCompute> {
        match s {
            "auto" => Ok(Compute::Auto),
            "f32" => Ok(Compute::F32),
            "bf16" => Ok(Compute::Bf16),
            "int8" => Ok(Compute::Int8),
            other => Err(UnknownCompute(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_and_resolve() {
        assert_eq!("bf16".parse::<Compute>().unwrap().dtype(), DType::BF16);
        assert_eq!("f32".parse::<Compute>().unwrap().dtype(), DType::F32);
        assert_eq!("int8".parse::<Compute>().unwrap().dtype(), DType::U8);
        let auto = "auto".parse::<Compute>().unwrap().dtype();
        assert_eq!(auto == DType::BF16, bf16_units());
        assert!("fp8"
            .parse::<Compute>()
            .unwrap_err()
            .to_string()
            .contains("auto, f32, bf16 or int8"));
        assert_eq!(Compute::default(), Compute::F32);
    }
}
