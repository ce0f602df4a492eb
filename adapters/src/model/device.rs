//! `[model] device`: where the model's weights live and its products run.
//!
//! The fused kernels ([`crate::kernels`]) are CPU code; on any other device
//! every op takes its composite candle form, whose values and gradients the
//! kernel tests (and a whole training step, `kernels::tests`) check against
//! the fused ones on the CPU.

use std::fmt;
use std::sync::Mutex;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::Compute;

/// A device setting: `cpu` (the default), `cuda` (the first GPU) or `cuda:N`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// The CPU, with the fused kernels.
    #[default]
    Cpu,
    /// The CUDA device of this ordinal.
    Cuda(usize),
}

/// A device setting that is none of `cpu`, `cuda`, `cuda:N`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unknown device `{0}` (cpu, cuda or cuda:N)")]
pub struct UnknownDevice(pub String);

/// A device that cannot be opened here.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// This binary has no CUDA backend.
    #[error("device `{0}`: this fedtune was built without CUDA; build it with `cargo build --release --features cuda` on a machine with the CUDA toolkit (docs/gpu.md), or use device \"cpu\"")]
    NotBuilt(DeviceSpec),
    /// The CUDA backend is there, the device is not (no driver, no GPU,
    /// an ordinal past the last one).
    #[error("device `{spec}`: no usable CUDA device ({source})")]
    Unavailable {
        /// What was asked for.
        spec: DeviceSpec,
        /// What CUDA said.
        #[source]
        source: candle_core::Error,
    },
}

impl DeviceSpec {
    /// Whether this is the default, the CPU.
    pub fn is_cpu(&self) -> bool {
        *self == DeviceSpec::Cpu
    }

    /// Opens the device, or says why it cannot be used: called when a
    /// command starts, before any data or model is read.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(_) if !cfg!(feature = "cuda") => Err(DeviceError::NotBuilt(self)),
            DeviceSpec::Cuda(n) => {
                // One handle per GPU and process: candle treats two handles
                // of one GPU as different devices, whose tensors never meet.
                static OPENED: Mutex<Vec<(usize, Device)>> = Mutex::new(Vec::new());
                let mut opened = OPENED.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((_, d)) = opened.iter().find(|(m, _)| *m == n) {
                    return Ok(d.clone());
                }
                let d = Device::new_cuda(n)
                    .map_err(|source| DeviceError::Unavailable { spec: self, source })?;
                opened.push((n, d.clone()));
                Ok(d)
            }
        }
    }
}

/// Whether a CUDA device multiplies bf16 on its tensor cores: compute
/// capability 8.0 (Ampere) or newer. False when it cannot be asked.
#[cfg(feature = "cuda")]
fn cuda_has_bf16(device: &Device) -> bool {
    device
        .as_cuda_device()
        .ok()
        .and_then(|d| d.cuda_stream().context().compute_capability().ok())
        .is_some_and(|(major, _)| major >= 8)
}

#[cfg(not(feature = "cuda"))]
fn cuda_has_bf16(_: &Device) -> bool {
    false
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = UnknownDevice;
    fn from_str(s: &str) -> Result<Self, UnknownDevice> {
        let unknown = || UnknownDevice(s.to_string());
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(unknown)?;
                // Digits only: `cuda:+1` and `cuda: 1` are typos, not devices.
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(unknown());
                }
                n.parse().map(DeviceSpec::Cuda).map_err(|_| unknown())
            }
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = UnknownDevice;
    fn try_from(s: String) -> Result<Self, UnknownDevice> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

/// Where a model goes and what its frozen base is multiplied in: `[model]`'s
/// `device` and `compute`, as commands resolve them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Placement {
    /// The frozen base's dtype setting.
    pub compute: Compute,
    /// The device.
    pub device: DeviceSpec,
}

impl Placement {
    /// The dtype of the frozen weights: on a GPU `auto` means bf16 where
    /// its tensor cores multiply bf16 (compute capability 8.0, Ampere, or
    /// newer) and f32 on an older one; on the CPU what [`Compute::dtype`]
    /// says.
    pub fn dtype(&self) -> DType {
        match (self.device, self.compute) {
            (DeviceSpec::Cuda(_), Compute::Auto) => {
                let bf16 = self.device.open().is_ok_and(|d| cuda_has_bf16(&d));
                if bf16 {
                    DType::BF16
                } else {
                    DType::F32
                }
            }
            (_, c) => c.dtype(),
        }
    }

    /// The product path, for reports: `f32-avx512`, `bf16-avx512`,
    /// `cuda:0-bf16`, …
    pub fn path(&self) -> String {
        match self.device {
            DeviceSpec::Cpu => self.compute.path(),
            d => format!(
                "{d}-{}",
                match self.dtype() {
                    DType::BF16 => "bf16",
                    DType::U8 => "int8",
                    _ => "f32",
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_and_print() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:0", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec, "{text}");
            assert_eq!(spec.to_string().parse::<DeviceSpec>().unwrap(), spec);
        }
        for bad in [
            "gpu", "CUDA", "cuda:", "cuda:-1", "cuda:+1", "cuda: 1", "cuda:x", "",
        ] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains("cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        assert_eq!(DeviceSpec::default(), DeviceSpec::Cpu);
    }

    #[test]
    fn the_cpu_opens_and_cuda_fails_with_a_clear_error() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        let Err(e) = DeviceSpec::Cuda(0).open() else {
            return; // a GPU is here
        };
        let e = e.to_string();
        if cfg!(feature = "cuda") {
            assert!(e.contains("no usable CUDA device"), "{e}");
        } else {
            assert!(
                e.contains("built without CUDA") && e.contains("--features cuda"),
                "{e}"
            );
        }
    }

    #[test]
    fn auto_is_bf16_only_on_a_gpu_that_has_it() {
        // A GPU that cannot be opened (none here) or asked gives f32; one of
        // compute capability 8.0 or newer gives bf16 (adapters/tests/gpu.rs).
        let on = |device, compute| Placement { compute, device };
        if DeviceSpec::Cuda(0).open().is_err() {
            assert_eq!(on(DeviceSpec::Cuda(0), Compute::Auto).dtype(), DType::F32);
        }
        assert_eq!(on(DeviceSpec::Cuda(1), Compute::F32).dtype(), DType::F32);
        assert_eq!(on(DeviceSpec::Cuda(1), Compute::F32).path(), "cuda:1-f32");
        assert_eq!(on(DeviceSpec::Cpu, Compute::Bf16).dtype(), DType::BF16);
        assert_eq!(
            on(DeviceSpec::Cpu, Compute::F32).path(),
            Compute::F32.path()
        );
    }
}
