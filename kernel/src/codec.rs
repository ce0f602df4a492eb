//! The wire format: how an [`Envelope`] becomes bytes and back.
//!
//! A frame is a four-byte header followed by a body:
//!
//! ```text
//! b'F' b'T' <format version: u8> <compression: u8>  body…
//! ```
//!
//! The body is the envelope as MessagePack (rmp-serde), compressed with DEFLATE
//! or gzip when the header says so. Each tensor of the payload records its own
//! storage type — `f32`, `f16`, `bf16`, or `int8` with a per-tensor scale and
//! zero point — so a receiver decodes any frame without configuration: the codec
//! order is quantize → MessagePack → compress on the way out and the reverse on
//! the way in.
//!
//! Frames come from the network, so decoding trusts nothing: it checks the
//! header, bounds every size before allocating (including the decompressed
//! size, against zip bombs), checks that every tensor's bytes fill its shape,
//! that names are unique and that all values are finite, and fails with a typed
//! [`CodecError`] — never a panic.

use std::collections::HashSet;
use std::io::{Read, Write};

use bytes::Bytes;
use flate2::read::{DeflateDecoder, GzDecoder};
use flate2::write::{DeflateEncoder, GzEncoder};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::message::{Envelope, Meta, MsgKind, Party};
use crate::params::{element_count, ParamSet, ParamTensor};

/// The frame format version this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;
const MAGIC: [u8; 2] = *b"FT";
const HEADER_LEN: usize = 4;
/// Nesting allowed in MessagePack bodies (envelopes nest a few levels; metadata a few more).
const MAX_DEPTH: usize = 32;

/// Errors from encoding or decoding a frame.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CodecError {
    /// The frame ends before its header does.
    #[error("frame truncated: {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    Truncated { len: usize },
    /// The frame does not start with the fedtune magic bytes.
    #[error("not a fedtune frame (bad magic bytes {found:02x?})")]
    BadMagic { found: [u8; 2] },
    /// The frame was written by an incompatible format version.
    #[error(
        "frame format version {found} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion { found: u8 },
    /// The header names a compression this build does not know.
    #[error("unknown compression id {0}")]
    UnknownCompression(u8),
    /// A size exceeds the configured limit.
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    /// The compressed body is corrupt.
    #[error("cannot decompress frame body: {0}")]
    Decompress(String),
    /// The body is not a valid MessagePack envelope.
    #[error("malformed frame body: {0}")]
    Malformed(String),
    /// A tensor's description is inconsistent.
    #[error("tensor `{name}`: {reason}")]
    BadTensor { name: String, reason: String },
    /// A tensor holds NaN or an infinity.
    #[error("tensor `{name}` holds a non-finite value at element {index}")]
    NonFinite { name: String, index: usize },
    /// Encoding failed (for example on a non-finite value that int8 cannot represent).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// How payload tensors are stored on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// Full precision, 4 bytes per value.
    #[default]
    None,
    /// IEEE half precision, 2 bytes per value.
    F16,
    /// bfloat16, 2 bytes per value (f32's range, 8 bits of mantissa).
    Bf16,
    /// 1 byte per value, per-tensor affine: `x ≈ scale · (q − zero_point)`.
    Int8,
}

/// How the frame body is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Not compressed.
    #[default]
    None,
    /// Raw DEFLATE (RFC 1951).
    Deflate,
    /// gzip (RFC 1952).
    Gzip,
}

impl Compression {
    fn id(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Deflate => 1,
            Compression::Gzip => 2,
        }
    }

    fn from_id(id: u8) -> Result<Self, CodecError> {
        match id {
            0 => Ok(Compression::None),
            1 => Ok(Compression::Deflate),
            2 => Ok(Compression::Gzip),
            other => Err(CodecError::UnknownCompression(other)),
        }
    }
}

/// What the sender chooses; the receiver reads it back from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Payload storage type.
    pub quantization: Quantization,
    /// Body compression.
    pub compression: Compression,
    /// DEFLATE effort, 0 (store) to 9 (smallest). On float payloads level 1
    /// encodes about 8× faster than level 6 for frames 0.2% larger.
    pub level: u32,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            quantization: Quantization::None,
            compression: Compression::None,
            level: 1,
        }
    }
}

impl EncodeOptions {
    /// Options with the default compression level.
    pub fn new(quantization: Quantization, compression: Compression) -> Self {
        Self {
            quantization,
            compression,
            ..Self::default()
        }
    }
}

/// Bounds a decoder enforces before allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest frame accepted, as received.
    pub max_frame_bytes: usize,
    /// Largest body accepted after decompression.
    pub max_body_bytes: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        // P-tuning adapters of 7B models reach ~256 MB in f32; leave room above that.
        Self {
            max_frame_bytes: 1 << 30,
            max_body_bytes: 1 << 30,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct WireEnvelope {
    course: String,
    round: u64,
    from: Party,
    to: Vec<Party>,
    kind: String,
    meta: Meta,
    payload: Option<Vec<WireTensor>>,
    #[serde(default, with = "serde_bytes")]
    blob: Option<Vec<u8>>,
}

#[derive(Serialize, Deserialize)]
struct WireTensor {
    name: String,
    shape: Vec<u64>,
    data: WireData,
}

#[derive(Serialize, Deserialize)]
enum WireData {
    F32(#[serde(with = "serde_bytes")] Vec<u8>),
    F16(#[serde(with = "serde_bytes")] Vec<u8>),
    Bf16(#[serde(with = "serde_bytes")] Vec<u8>),
    Int8 {
        scale: f32,
        zero_point: f32,
        #[serde(with = "serde_bytes")]
        values: Vec<u8>,
    },
}

/// Encodes an envelope into one frame.
pub fn encode(env: &Envelope, opts: EncodeOptions) -> Result<Bytes, CodecError> {
    let payload = env
        .payload
        .as_ref()
        .map(|params| {
            params
                .iter()
                .map(|(name, t)| encode_tensor(name, t, opts.quantization))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let wire = WireEnvelope {
        course: env.course.clone(),
        round: env.round,
        from: env.from,
        to: env.to.clone(),
        kind: env.kind.as_str().to_string(),
        meta: env.meta.clone(),
        payload,
        blob: env.blob.clone(),
    };
    let body = rmp_serde::to_vec(&wire).map_err(|e| CodecError::Encode(e.to_string()))?;
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&MAGIC);
    frame.push(FORMAT_VERSION);
    frame.push(opts.compression.id());
    let io = |e: std::io::Error| CodecError::Encode(e.to_string());
    match opts.compression {
        Compression::None => frame.extend_from_slice(&body),
        Compression::Deflate => {
            let mut enc = DeflateEncoder::new(frame, flate2::Compression::new(opts.level.min(9)));
            enc.write_all(&body).map_err(io)?;
            frame = enc.finish().map_err(io)?;
        }
        Compression::Gzip => {
            let mut enc = GzEncoder::new(frame, flate2::Compression::new(opts.level.min(9)));
            enc.write_all(&body).map_err(io)?;
            frame = enc.finish().map_err(io)?;
        }
    }
    Ok(Bytes::from(frame))
}

/// Decodes and validates one frame.
pub fn decode(frame: &[u8], limits: &DecodeLimits) -> Result<Envelope, CodecError> {
    if frame.len() > limits.max_frame_bytes {
        return Err(CodecError::TooLarge {
            what: "frame",
            size: frame.len(),
            limit: limits.max_frame_bytes,
        });
    }
    let Some((header, rest)) = frame.split_first_chunk::<HEADER_LEN>() else {
        return Err(CodecError::Truncated { len: frame.len() });
    };
    if header[..2] != MAGIC {
        return Err(CodecError::BadMagic {
            found: [header[0], header[1]],
        });
    }
    if header[2] != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion { found: header[2] });
    }
    let compression = Compression::from_id(header[3])?;
    let inflated;
    let body: &[u8] = match compression {
        Compression::None => rest,
        Compression::Deflate => {
            inflated = inflate(DeflateDecoder::new(rest), limits.max_body_bytes)?;
            &inflated
        }
        Compression::Gzip => {
            inflated = inflate(GzDecoder::new(rest), limits.max_body_bytes)?;
            &inflated
        }
    };
    if body.len() > limits.max_body_bytes {
        return Err(CodecError::TooLarge {
            what: "frame body",
            size: body.len(),
            limit: limits.max_body_bytes,
        });
    }
    let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(body));
    de.set_max_depth(MAX_DEPTH);
    let wire =
        WireEnvelope::deserialize(&mut de).map_err(|e| CodecError::Malformed(e.to_string()))?;
    let consumed = de.position() as usize;
    if consumed != body.len() {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes after the envelope",
            body.len() - consumed
        )));
    }
    let payload = wire.payload.map(decode_payload).transpose()?;
    let kind: MsgKind = match wire.kind.parse() {
        Ok(kind) => kind,
        Err(never) => match never {},
    };
    Ok(Envelope {
        course: wire.course,
        round: wire.round,
        from: wire.from,
        to: wire.to,
        kind,
        meta: wire.meta,
        payload,
        blob: wire.blob,
    })
}

/// Reads a decompressor to its end, failing once more than `limit` bytes come out.
fn inflate(decoder: impl Read, limit: usize) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| CodecError::Decompress(e.to_string()))?;
    if out.len() > limit {
        return Err(CodecError::TooLarge {
            what: "decompressed frame body",
            size: out.len(),
            limit,
        });
    }
    Ok(out)
}

fn encode_tensor(name: &str, t: &ParamTensor, q: Quantization) -> Result<WireTensor, CodecError> {
    let data = match q {
        Quantization::None => {
            WireData::F32(t.data().iter().flat_map(|v| v.to_le_bytes()).collect())
        }
        Quantization::F16 => WireData::F16(
            t.data()
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
        ),
        Quantization::Bf16 => WireData::Bf16(
            t.data()
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        ),
        Quantization::Int8 => {
            let q = quantize_int8(t.data()).map_err(|index| {
                CodecError::Encode(format!(
                    "tensor `{name}` holds a non-finite value at element {index}, which int8 cannot represent"
                ))
            })?;
            WireData::Int8 {
                scale: q.scale,
                zero_point: q.zero_point,
                values: q.values.into_iter().map(|v| v as u8).collect(),
            }
        }
    };
    Ok(WireTensor {
        name: name.to_string(),
        shape: t.shape().iter().map(|&d| d as u64).collect(),
        data,
    })
}

fn decode_payload(tensors: Vec<WireTensor>) -> Result<ParamSet, CodecError> {
    let mut seen = HashSet::with_capacity(tensors.len());
    let mut params = ParamSet::new();
    for wt in tensors {
        let bad = |reason: String| CodecError::BadTensor {
            name: wt.name.clone(),
            reason,
        };
        if wt.name.is_empty() {
            return Err(bad("empty tensor name".into()));
        }
        if !seen.insert(wt.name.clone()) {
            return Err(bad("name appears twice".into()));
        }
        let shape = wt
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<usize>, _>>()
            .map_err(|_| bad(format!("shape {:?} does not fit this machine", wt.shape)))?;
        let n = element_count(&shape).ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        let check_len = |bytes: usize, width: usize| {
            if n.checked_mul(width) != Some(bytes) {
                Err(bad(format!(
                    "shape {shape:?} needs {n} values of {width} bytes but {bytes} bytes were sent"
                )))
            } else {
                Ok(())
            }
        };
        let data: Vec<f32> = match &wt.data {
            WireData::F32(b) => {
                check_len(b.len(), 4)?;
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            }
            WireData::F16(b) => {
                check_len(b.len(), 2)?;
                b.chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect()
            }
            WireData::Bf16(b) => {
                check_len(b.len(), 2)?;
                b.chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect()
            }
            WireData::Int8 {
                scale,
                zero_point,
                values,
            } => {
                check_len(values.len(), 1)?;
                if !(scale.is_finite() && *scale > 0.0 && zero_point.is_finite()) {
                    return Err(bad(format!(
                        "invalid int8 scale {scale} or zero point {zero_point}"
                    )));
                }
                values
                    .iter()
                    .map(|&q| dequantize_int8(q as i8, *scale, *zero_point))
                    .collect()
            }
        };
        if let Some(index) = data.iter().position(|v| !v.is_finite()) {
            return Err(CodecError::NonFinite {
                name: wt.name,
                index,
            });
        }
        let tensor = ParamTensor::new(shape, data).map_err(|e| bad(e.to_string()))?;
        params.insert_tensor(wt.name, tensor);
    }
    Ok(params)
}

/// A tensor quantized to int8 with a per-tensor affine map.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Tensor {
    /// Step between adjacent levels.
    pub scale: f32,
    /// The (real-valued) level that maps to zero.
    pub zero_point: f32,
    /// Quantized values.
    pub values: Vec<i8>,
}

/// Quantizes to int8 so that the tensor's minimum maps to −128 and its maximum
/// to 127: `q = round(x / scale + zero_point)`, `x ≈ scale · (q − zero_point)`,
/// with an error of at most `scale / 2` per element. Fails with the index of
/// the first non-finite value.
pub fn quantize_int8(data: &[f32]) -> Result<Int8Tensor, usize> {
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(i);
    }
    let (min, max) = data
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if data.is_empty() {
        return Ok(Int8Tensor {
            scale: 1.0,
            zero_point: 0.0,
            values: Vec::new(),
        });
    }
    // Work in f64: max − min can overflow f32 for values near f32::MAX.
    let range = f64::from(max) - f64::from(min);
    let mut scale = (range / 255.0) as f32;
    if !(scale.is_normal()) {
        // A constant (or nearly constant) tensor: any positive scale represents
        // the minimum exactly at level −128.
        scale = if min != 0.0 { min.abs() } else { 1.0 };
    }
    let zero_point = (-128.0 - f64::from(min) / f64::from(scale)) as f32;
    let values = data
        .iter()
        .map(|&x| {
            let level = (f64::from(x) / f64::from(scale) + f64::from(zero_point)).round();
            level.clamp(-128.0, 127.0) as i8
        })
        .collect();
    Ok(Int8Tensor {
        scale,
        zero_point,
        values,
    })
}

/// Inverse of [`quantize_int8`] for one value.
pub fn dequantize_int8(q: i8, scale: f32, zero_point: f32) -> f32 {
    (f64::from(scale) * (f64::from(q) - f64::from(zero_point))) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const QUANTS: [Quantization; 4] = [
        Quantization::None,
        Quantization::F16,
        Quantization::Bf16,
        Quantization::Int8,
    ];
    const COMPS: [Compression; 3] = [Compression::None, Compression::Deflate, Compression::Gzip];

    fn sample_params(seed: u64) -> ParamSet {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut p = ParamSet::new();
        let shapes: [(&str, Vec<usize>); 4] = [
            ("layers.0.lora_A.weight", vec![8, 64]),
            ("layers.0.lora_B.weight", vec![64, 8]),
            ("bias", vec![17]),
            ("scalar", vec![]),
        ];
        for (name, shape) in shapes {
            let n = element_count(&shape).unwrap();
            let scale = rng.random_range(0.01f32..10.0);
            let data = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
            p.insert(name, shape, data).unwrap();
        }
        // A constant tensor and an all-zero tensor, the int8 corner cases.
        p.insert("const", vec![3], vec![-0.75; 3]).unwrap();
        p.insert("zeros", vec![2, 2], vec![0.0; 4]).unwrap();
        p
    }

    fn sample_envelope(payload: Option<ParamSet>) -> Envelope {
        let mut env = Envelope::new(
            "course-α",
            7,
            Party::Client(3),
            vec![Party::Server],
            MsgKind::Update,
        )
        .with_meta("n_samples", 128u64)
        .with_meta("loss", 1.25)
        .with_meta("tags", serde_json::json!({"split": "train", "ok": [1, 2]}));
        env.payload = payload;
        env
    }

    /// Largest error each storage type may make on a value `x` of a tensor.
    fn tolerance(q: Quantization, x: f32, int8_scale: f32) -> f32 {
        match q {
            Quantization::None => 0.0,
            // f16: 11 significant bits; bf16: 8. Round-to-nearest halves the ulp.
            Quantization::F16 => x.abs() * 2f32.powi(-11) + 6.0e-8,
            Quantization::Bf16 => x.abs() * 2f32.powi(-8),
            Quantization::Int8 => int8_scale * 0.5 * (1.0 + 1e-5) + x.abs() * 1e-6,
        }
    }

    #[test]
    fn every_quantization_and_compression_round_trips_within_its_precision() {
        let params = sample_params(1);
        for q in QUANTS {
            for c in COMPS {
                let env = sample_envelope(Some(params.clone()));
                let opts = EncodeOptions::new(q, c);
                let frame = encode(&env, opts).unwrap();
                assert_eq!(frame[3], c.id());
                let back = decode(&frame, &DecodeLimits::default()).unwrap();
                assert_eq!(back.course, env.course);
                assert_eq!(back.round, env.round);
                assert_eq!(back.from, env.from);
                assert_eq!(back.to, env.to);
                assert_eq!(back.kind, env.kind);
                assert_eq!(back.meta, env.meta);
                let got = back.payload.unwrap();
                params.check_compatible(&got).unwrap();
                for (name, t) in params.iter() {
                    let scale = quantize_int8(t.data()).unwrap().scale;
                    for (i, (&want, &have)) in t
                        .data()
                        .iter()
                        .zip(got.get(name).unwrap().data())
                        .enumerate()
                    {
                        let tol = tolerance(q, want, scale);
                        assert!(
                            (want - have).abs() <= tol,
                            "{q:?}/{c:?} `{name}`[{i}]: {want} decoded as {have}, tolerance {tol}"
                        );
                    }
                }
                if q == Quantization::None {
                    assert_eq!(got, params, "f32 must round-trip exactly");
                }
            }
        }
    }

    #[test]
    fn int8_error_is_within_half_a_step_and_keeps_extremes() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..200 {
            let n = rng.random_range(1..300);
            let lo = rng.random_range(-100.0f32..100.0);
            let width = 10f32.powf(rng.random_range(-6.0..3.0));
            let data: Vec<f32> = (0..n).map(|_| lo + rng.random_range(0.0..=width)).collect();
            let q = quantize_int8(&data).unwrap();
            for (&x, &v) in data.iter().zip(&q.values) {
                let back = dequantize_int8(v, q.scale, q.zero_point);
                assert!(
                    (x - back).abs() <= q.scale * 0.5 * (1.0 + 1e-4) + x.abs() * 1e-6,
                    "x {x} back {back} scale {}",
                    q.scale
                );
            }
        }
        let q = quantize_int8(&[f32::MAX, -f32::MAX, 0.0]).unwrap();
        assert!(q.scale.is_finite());
        assert_eq!(quantize_int8(&[1.0, f32::NAN]), Err(1));
    }

    #[test]
    fn blobs_round_trip_byte_for_byte_under_every_option() {
        let blob: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let env = sample_envelope(None).with_blob(blob.clone());
        for q in [Quantization::None, Quantization::Int8] {
            for c in [Compression::None, Compression::Deflate] {
                let back = decode(
                    &encode(&env, EncodeOptions::new(q, c)).unwrap(),
                    &DecodeLimits::default(),
                )
                .unwrap();
                assert_eq!(back.blob.as_deref(), Some(&blob[..]));
            }
        }
    }

    #[test]
    fn messages_without_payload_and_custom_kinds_round_trip() {
        let mut env = sample_envelope(None);
        env.kind = MsgKind::Custom("emulator_ready".into());
        for c in COMPS {
            let frame = encode(&env, EncodeOptions::new(Quantization::Int8, c)).unwrap();
            assert_eq!(decode(&frame, &DecodeLimits::default()).unwrap(), env);
        }
    }

    #[test]
    fn int8_refuses_to_encode_non_finite_values() {
        let mut p = ParamSet::new();
        p.insert("w", vec![2], vec![1.0, f32::INFINITY]).unwrap();
        let err = encode(
            &sample_envelope(Some(p)),
            EncodeOptions::new(Quantization::Int8, Compression::None),
        )
        .unwrap_err();
        assert!(matches!(err, CodecError::Encode(ref m) if m.contains("`w`")));
    }

    #[test]
    fn header_errors_are_typed() {
        let frame = encode(&sample_envelope(None), EncodeOptions::default()).unwrap();
        let limits = DecodeLimits::default();
        assert_eq!(
            decode(&frame[..3], &limits),
            Err(CodecError::Truncated { len: 3 })
        );
        let mut bad = frame.to_vec();
        bad[0] = b'X';
        assert!(matches!(
            decode(&bad, &limits),
            Err(CodecError::BadMagic { .. })
        ));
        let mut bad = frame.to_vec();
        bad[2] = FORMAT_VERSION + 1;
        assert_eq!(
            decode(&bad, &limits),
            Err(CodecError::UnsupportedVersion {
                found: FORMAT_VERSION + 1
            })
        );
        let mut bad = frame.to_vec();
        bad[3] = 9;
        assert_eq!(
            decode(&bad, &limits),
            Err(CodecError::UnknownCompression(9))
        );
        let mut bad = frame.to_vec();
        bad.push(0xc0);
        assert!(
            matches!(decode(&bad, &limits), Err(CodecError::Malformed(ref m)) if m.contains("trailing"))
        );
    }

    #[test]
    fn oversized_frames_and_zip_bombs_are_rejected() {
        let mut p = ParamSet::new();
        p.insert("zeros", vec![1 << 20], vec![0.0; 1 << 20])
            .unwrap();
        let env = sample_envelope(Some(p));
        let plain = encode(&env, EncodeOptions::default()).unwrap();
        let small = DecodeLimits {
            max_frame_bytes: 1 << 16,
            max_body_bytes: 1 << 16,
        };
        assert!(matches!(
            decode(&plain, &small),
            Err(CodecError::TooLarge { what: "frame", .. })
        ));
        // 4 MiB of zeros deflate to a few KiB: the frame passes, the body does not.
        for compression in [Compression::Deflate, Compression::Gzip] {
            let bomb = encode(&env, EncodeOptions::new(Quantization::None, compression)).unwrap();
            assert!(bomb.len() < small.max_frame_bytes);
            assert!(matches!(
                decode(&bomb, &small),
                Err(CodecError::TooLarge {
                    what: "decompressed frame body",
                    ..
                })
            ));
        }
    }

    /// Builds a body by hand so that the decoder's checks on tensors can be hit directly.
    fn frame_with_tensors(tensors: Vec<WireTensor>) -> Vec<u8> {
        let wire = WireEnvelope {
            course: "c".into(),
            round: 0,
            from: Party::Server,
            to: vec![Party::Client(1)],
            kind: "train".into(),
            meta: Meta::new(),
            payload: Some(tensors),
            blob: None,
        };
        let mut frame = vec![b'F', b'T', FORMAT_VERSION, 0];
        frame.extend(rmp_serde::to_vec(&wire).unwrap());
        frame
    }

    #[test]
    fn inconsistent_tensors_are_rejected() {
        let limits = DecodeLimits::default();
        let t = |name: &str, shape: Vec<u64>, data: WireData| WireTensor {
            name: name.into(),
            shape,
            data,
        };
        let cases = vec![
            (
                vec![t("w", vec![2, 2], WireData::F32(vec![0; 12]))],
                "needs 4 values",
            ),
            (
                vec![t("w", vec![3], WireData::F16(vec![0; 4]))],
                "needs 3 values",
            ),
            (
                vec![t("w", vec![u64::MAX, 4], WireData::F32(vec![]))],
                "overflows",
            ),
            (
                vec![
                    t("w", vec![1], WireData::F32(vec![0; 4])),
                    t("w", vec![1], WireData::F32(vec![0; 4])),
                ],
                "twice",
            ),
            (vec![t("", vec![1], WireData::F32(vec![0; 4]))], "empty"),
            (
                vec![t(
                    "w",
                    vec![1],
                    WireData::Int8 {
                        scale: 0.0,
                        zero_point: 0.0,
                        values: vec![0],
                    },
                )],
                "scale",
            ),
            (
                vec![t(
                    "w",
                    vec![1],
                    WireData::Int8 {
                        scale: 1.0,
                        zero_point: f32::NAN,
                        values: vec![0],
                    },
                )],
                "zero point",
            ),
        ];
        for (tensors, needle) in cases {
            let err = decode(&frame_with_tensors(tensors), &limits).unwrap_err();
            assert!(
                matches!(&err, CodecError::BadTensor { reason, .. } if reason.contains(needle)),
                "expected `{needle}`, got {err}"
            );
        }
        let nan = f32::NAN.to_le_bytes().to_vec();
        let err = decode(
            &frame_with_tensors(vec![t("w", vec![1], WireData::F32(nan))]),
            &limits,
        )
        .unwrap_err();
        assert_eq!(
            err,
            CodecError::NonFinite {
                name: "w".into(),
                index: 0
            }
        );
        let inf = f16::INFINITY.to_le_bytes().to_vec();
        assert!(matches!(
            decode(
                &frame_with_tensors(vec![t("w", vec![1], WireData::F16(inf))]),
                &limits
            ),
            Err(CodecError::NonFinite { .. })
        ));
    }

    #[test]
    fn deeply_nested_metadata_is_rejected() {
        let mut nested = serde_json::json!(1);
        for _ in 0..200 {
            nested = serde_json::json!([nested]);
        }
        let env = sample_envelope(None).with_meta("deep", nested);
        let frame = encode(&env, EncodeOptions::default()).unwrap();
        assert!(matches!(
            decode(&frame, &DecodeLimits::default()),
            Err(CodecError::Malformed(_))
        ));
    }

    fn valid_frames() -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        for q in QUANTS {
            for c in COMPS {
                let env = sample_envelope(Some(sample_params(2)));
                let opts = EncodeOptions::new(q, c);
                frames.push(encode(&env, opts).unwrap().to_vec());
            }
        }
        frames
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        /// Any prefix of a valid frame either fails with a typed error or (for
        /// the full frame only) decodes; it never panics.
        #[test]
        fn truncated_frames_never_panic(which in 0usize..12, cut in 0.0f64..1.0) {
            let frames = valid_frames();
            let frame = &frames[which];
            let len = ((frame.len() as f64) * cut) as usize;
            prop_assert!(len < frame.len());
            prop_assert!(decode(&frame[..len], &DecodeLimits::default()).is_err());
        }

        /// Random bytes, with or without a valid header, never panic the decoder.
        #[test]
        fn garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..2048), header in 0u8..4) {
            let mut frame = match header {
                0 => Vec::new(),
                h => vec![b'F', b'T', FORMAT_VERSION, h - 1],
            };
            frame.extend(body);
            let _ = decode(&frame, &DecodeLimits::default());
        }

        /// Flipping bytes of a valid frame yields either an error or a frame that
        /// still satisfies every invariant the decoder promises.
        #[test]
        fn corrupted_frames_never_panic(which in 0usize..12, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut frame = valid_frames()[which].clone();
            for (pos, byte) in flips {
                let i = pos % frame.len();
                frame[i] ^= byte | 1;
            }
            if let Ok(env) = decode(&frame, &DecodeLimits::default()) {
                if let Some(p) = env.payload {
                    prop_assert!(p.check_finite().is_ok());
                }
            }
        }

        /// Frames above the limit are refused before any parsing.
        #[test]
        fn oversize_is_refused(extra in 1usize..4096) {
            let frame = valid_frames()[0].clone();
            let limits = DecodeLimits { max_frame_bytes: frame.len() - 1, max_body_bytes: 1 << 30 };
            let mut big = frame.clone();
            big.extend(std::iter::repeat_n(0u8, extra));
            let frame_too_large = matches!(decode(&big, &limits), Err(CodecError::TooLarge { what: "frame", .. }));
            prop_assert!(frame_too_large);
        }
    }
}
