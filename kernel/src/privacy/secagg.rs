//! Secure aggregation's arithmetic and cryptography (Bonawitz et al.,
//! "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
//! CCS 2017): what each client computes so that the server learns only the
//! sum of the clients' updates, and what the server computes to recover
//! that sum when clients drop out.
//!
//! - **The ring.** An update enters as fixed-point integers in Z/2⁶⁴
//!   ([`encode`]): the client's sample count `n`, `n × loss` and
//!   `n × (params − global)` for every value, each scaled by 2^[`FRACTION_BITS`]
//!   and rounded. The clients fold FedAvg's weights in, so the sum is the
//!   weighted sum, and [`decode_sum`] divides by the summed weight.
//! - **Masks.** Each client `u` adds a mask from its own random seed `b_u`
//!   and, for every other participant `v`, a mask from a seed agreed with
//!   `v` by X25519 (`s_uv`): added by the lower id, subtracted by the
//!   higher, so the pairwise masks cancel in the sum. ChaCha20 expands a
//!   seed into one ring element per value ([`apply_mask`]).
//! - **Dropouts.** `b_u` and the X25519 secret behind `s_uv` are each split
//!   into Shamir shares ([`split`], over the prime field 2⁶¹ − 1, any
//!   `threshold` of them recover the secret) and sent to the other
//!   participants sealed with ChaCha20-Poly1305 under a key agreed with a
//!   second X25519 pair ([`seal`]), so the server that relays them can read
//!   none. At the end each surviving client reveals, for every peer, either
//!   its share of that peer's `b` (the peer sent its masked update) or of
//!   its mask secret (it did not) — never both — and the server removes the
//!   masks that did not cancel.
//!
//! Every secret comes from the operating system's random source
//! ([`RoundKeys::generate`]), never from the course seed, which the server
//! knows. What the server could check, it checks: a recovered mask secret
//! must give the public key its owner advertised, a recovered `b` the hash
//! its owner committed to.

use std::collections::BTreeMap;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::params::ParamSet;

/// Binary digits after the point of the fixed-point ring encoding: values
/// are kept to 2⁻²⁴ ≈ 6·10⁻⁸ of a sample-weighted unit.
pub const FRACTION_BITS: u32 = 24;

/// The Shamir field's prime, 2⁶¹ − 1.
pub const FIELD: u64 = (1 << 61) - 1;
const P: u64 = FIELD;
/// Bytes of a 32-byte secret held by one field element.
const CHUNK: usize = 7;
/// Field elements per shared 32-byte secret.
pub const SHARE_WORDS: usize = 32usize.div_ceil(CHUNK);

/// One participant's share of a 32-byte secret: the field elements of the
/// polynomial evaluated at the participant's id.
pub type Share = [u64; SHARE_WORDS];

/// Why a secure-aggregation step cannot go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("secure aggregation: {0}")]
pub struct SecAggError(pub String);

fn err(msg: impl Into<String>) -> SecAggError {
    SecAggError(msg.into())
}

/// 32 bytes from the operating system's random source.
pub fn os_random() -> Result<[u8; 32], SecAggError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| err(format!("no OS randomness: {e}")))?;
    Ok(b)
}

/// SHA-256 over a label and length-prefixed parts: every key and seed of
/// the protocol is one of these, so no two uses can collide.
pub fn derive(label: &str, parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((label.len() as u64).to_le_bytes());
    h.update(label.as_bytes());
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// A client's two X25519 key pairs for one round: one to seal shares
/// (`c`), one to agree pairwise mask seeds (`s`).
pub struct RoundKeys {
    c_secret: StaticSecret,
    s_secret: [u8; 32],
    /// The public half of the sealing pair.
    pub c_public: [u8; 32],
    /// The public half of the masking pair.
    pub s_public: [u8; 32],
}

impl RoundKeys {
    /// Fresh keys from the OS's random source.
    pub fn generate() -> Result<Self, SecAggError> {
        Ok(Self::from_bytes(os_random()?, os_random()?))
    }

    /// Keys from given secret bytes (tests).
    pub fn from_bytes(c: [u8; 32], s: [u8; 32]) -> Self {
        let c_secret = StaticSecret::from(c);
        let c_public = PublicKey::from(&c_secret).to_bytes();
        let s_public = mask_public(&s);
        Self {
            c_secret,
            s_secret: s,
            c_public,
            s_public,
        }
    }

    /// The masking secret (what is Shamir-shared for dropout recovery).
    pub fn mask_secret(&self) -> &[u8; 32] {
        &self.s_secret
    }
}

/// The public key of a masking secret.
pub fn mask_public(secret: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*secret)).to_bytes()
}

/// Whether `public` is a usable X25519 public key: not of small order
/// (whose shared secrets an attacker would know).
pub fn usable_public(public: &[u8; 32]) -> bool {
    // Clamping makes every scalar a multiple of the cofactor, so any one
    // sends a small-order point to the identity.
    agree(&StaticSecret::from([7u8; 32]), public).is_ok()
}

/// X25519 of `secret` with `peer`, refusing a peer key of small order
/// (whose result an attacker would know).
fn agree(secret: &StaticSecret, peer: &[u8; 32]) -> Result<[u8; 32], SecAggError> {
    let shared = secret.diffie_hellman(&PublicKey::from(*peer));
    if !shared.was_contributory() {
        return Err(err("a peer's public key is of small order"));
    }
    Ok(shared.to_bytes())
}

/// The seed of the pairwise mask between clients `a` and `b` in `round`,
/// from `a`'s masking secret and `b`'s masking public key (the same from
/// either side).
pub fn pair_seed(
    secret: &[u8; 32],
    peer_public: &[u8; 32],
    round: u64,
    (a, b): (u32, u32),
) -> Result<[u8; 32], SecAggError> {
    let shared = agree(&StaticSecret::from(*secret), peer_public)?;
    let (lo, hi) = (a.min(b), a.max(b));
    Ok(derive(
        "fedtune secagg pair mask",
        &[
            &shared,
            &round.to_le_bytes(),
            &lo.to_le_bytes(),
            &hi.to_le_bytes(),
        ],
    ))
}

/// The AEAD key of what `from` sends `to` in `round`: each direction its
/// own key, so the fixed nonce never meets one key twice.
fn seal_key(
    keys: &RoundKeys,
    peer_c_public: &[u8; 32],
    round: u64,
    (from, to): (u32, u32),
) -> Result<ChaCha20Poly1305, SecAggError> {
    let shared = agree(&keys.c_secret, peer_c_public)?;
    let key = derive(
        "fedtune secagg seal",
        &[
            &shared,
            &round.to_le_bytes(),
            &from.to_le_bytes(),
            &to.to_le_bytes(),
        ],
    );
    Ok(ChaCha20Poly1305::new(Key::from_slice(&key)))
}

/// What one client hands another through the server: its shares of its
/// own `b` and masking secret at the receiver's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharePair {
    /// The share of the sender's self-mask seed.
    pub b: Share,
    /// The share of the sender's masking secret.
    pub s: Share,
}

impl SharePair {
    fn to_bytes(self) -> Vec<u8> {
        self.b
            .iter()
            .chain(&self.s)
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != 2 * SHARE_WORDS * 8 {
            return None;
        }
        let mut words = b
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
        let mut take = || {
            let mut s = [0u64; SHARE_WORDS];
            for w in &mut s {
                *w = words.next().expect("length checked");
            }
            s
        };
        let b = take();
        let s = take();
        (b.iter().chain(&s).all(|&w| w < P)).then_some(Self { b, s })
    }
}

/// Seals `shares` from client `from` to client `to` (whose sealing public
/// key is `to_public`).
pub fn seal(
    keys: &RoundKeys,
    to_public: &[u8; 32],
    round: u64,
    (from, to): (u32, u32),
    shares: SharePair,
) -> Result<Vec<u8>, SecAggError> {
    let aad = [
        round.to_le_bytes().as_slice(),
        &from.to_le_bytes(),
        &to.to_le_bytes(),
    ]
    .concat();
    seal_key(keys, to_public, round, (from, to))?
        .encrypt(
            Nonce::from_slice(&[0u8; 12]),
            Payload {
                msg: &shares.to_bytes(),
                aad: &aad,
            },
        )
        .map_err(|_| err("cannot seal shares"))
}

/// Opens what client `from` (sealing public key `from_public`) sealed for
/// client `to`, whose keys are `keys`: `None` if it was not sealed by
/// `from` for `to` in `round`, or is malformed.
pub fn open(
    keys: &RoundKeys,
    from_public: &[u8; 32],
    round: u64,
    (from, to): (u32, u32),
    sealed: &[u8],
) -> Option<SharePair> {
    let aad = [
        round.to_le_bytes().as_slice(),
        &from.to_le_bytes(),
        &to.to_le_bytes(),
    ]
    .concat();
    let plain = seal_key(keys, from_public, round, (from, to))
        .ok()?
        .decrypt(
            Nonce::from_slice(&[0u8; 12]),
            Payload {
                msg: sealed,
                aad: &aad,
            },
        )
        .ok()?;
    SharePair::from_bytes(&plain)
}

fn mul(a: u64, b: u64) -> u64 {
    ((u128::from(a) * u128::from(b)) % u128::from(P)) as u64
}

fn add(a: u64, b: u64) -> u64 {
    (a + b) % P
}

fn sub(a: u64, b: u64) -> u64 {
    (a + P - b) % P
}

fn inverse(a: u64) -> u64 {
    // Fermat: a^(p−2).
    let (mut base, mut exp, mut acc) = (a, P - 2, 1u64);
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

/// Splits `secret` into one share per id of `ids` (all distinct and
/// non-zero), any `threshold` of which recover it; the polynomials'
/// coefficients come from `coefficients` (32 random bytes per call of it).
pub fn split(
    secret: &[u8; 32],
    ids: &[u32],
    threshold: usize,
    mut coefficients: impl FnMut() -> Result<[u8; 32], SecAggError>,
) -> Result<BTreeMap<u32, Share>, SecAggError> {
    if threshold == 0 || threshold > ids.len() {
        return Err(err(format!(
            "a threshold of {threshold} among {} participants",
            ids.len()
        )));
    }
    // One polynomial per 7-byte chunk of the secret, its constant term.
    let mut padded = [0u8; SHARE_WORDS * CHUNK];
    padded[..32].copy_from_slice(secret);
    let mut polys = Vec::with_capacity(SHARE_WORDS);
    let mut rng = ChaCha20Rng::from_seed(coefficients()?);
    for chunk in padded.chunks_exact(CHUNK) {
        let mut word = [0u8; 8];
        word[..CHUNK].copy_from_slice(chunk);
        let mut poly = vec![u64::from_le_bytes(word)];
        for _ in 1..threshold {
            poly.push(rng.next_u64() % P);
        }
        polys.push(poly);
    }
    let mut out = BTreeMap::new();
    for &id in ids {
        let x = u64::from(id);
        if x == 0 {
            return Err(err("a participant with id 0"));
        }
        let mut share = [0u64; SHARE_WORDS];
        for (w, poly) in share.iter_mut().zip(&polys) {
            // Horner.
            *w = poly.iter().rev().fold(0, |acc, &c| add(mul(acc, x), c));
        }
        if out.insert(id, share).is_some() {
            return Err(err(format!("participant {id} listed twice")));
        }
    }
    Ok(out)
}

/// The secret behind `shares` (by participant id), by Lagrange
/// interpolation at 0: `None` if the shares cannot be a secret's (a chunk
/// outside its range), which betrays a bad share.
pub fn combine(shares: &[(u32, Share)]) -> Option<[u8; 32]> {
    let xs: Vec<u64> = shares.iter().map(|&(id, _)| u64::from(id)).collect();
    let mut padded = [0u8; SHARE_WORDS * CHUNK];
    for (w, out) in padded.chunks_exact_mut(CHUNK).enumerate() {
        let mut acc = 0u64;
        for (i, (_, share)) in shares.iter().enumerate() {
            // ℓ_i(0) = Π_{j≠i} x_j / (x_j − x_i)
            let (mut num, mut den) = (1u64, 1u64);
            for (j, &xj) in xs.iter().enumerate() {
                if j != i {
                    num = mul(num, xj);
                    den = mul(den, sub(xj, xs[i]));
                }
            }
            if den == 0 {
                return None;
            }
            acc = add(acc, mul(share[w], mul(num, inverse(den))));
        }
        if acc >> (8 * CHUNK) != 0 {
            return None;
        }
        out.copy_from_slice(&acc.to_le_bytes()[..CHUNK]);
    }
    if padded[32..].iter().any(|&b| b != 0) {
        return None;
    }
    Some(padded[..32].try_into().expect("32 bytes"))
}

/// The secret behind `shares` that passes `check`: the first `threshold`
/// shares, or, should a bad share spoil them, other subsets of them (a
/// bounded number of tries).
pub fn recover(
    shares: &[(u32, Share)],
    threshold: usize,
    check: impl Fn(&[u8; 32]) -> bool,
) -> Option<[u8; 32]> {
    if shares.len() < threshold || threshold == 0 {
        return None;
    }
    let n = shares.len();
    let mut pick: Vec<usize> = (0..threshold).collect();
    for _ in 0..256 {
        let subset: Vec<(u32, Share)> = pick.iter().map(|&i| shares[i]).collect();
        if let Some(secret) = combine(&subset).filter(|s| check(s)) {
            return Some(secret);
        }
        // The next combination in lexicographic order.
        let mut i = threshold;
        loop {
            if i == 0 {
                return None;
            }
            i -= 1;
            if pick[i] < n - threshold + i {
                break;
            }
        }
        pick[i] += 1;
        for j in i + 1..threshold {
            pick[j] = pick[j - 1] + 1;
        }
    }
    None
}

/// How a mask enters a vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sign {
    /// Added.
    Plus,
    /// Subtracted.
    Minus,
}

/// Adds (or subtracts) the ChaCha20 stream of `seed` to `x`, element-wise
/// in Z/2⁶⁴.
pub fn apply_mask(x: &mut [u64], seed: &[u8; 32], sign: Sign) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    match sign {
        Sign::Plus => x
            .iter_mut()
            .for_each(|v| *v = v.wrapping_add(rng.next_u64())),
        Sign::Minus => x
            .iter_mut()
            .for_each(|v| *v = v.wrapping_sub(rng.next_u64())),
    }
}

/// The sign with which client `me` applies the pair mask it shares with
/// `peer`: the lower id adds it, the higher subtracts it.
pub fn pair_sign(me: u32, peer: u32) -> Sign {
    if me < peer {
        Sign::Plus
    } else {
        Sign::Minus
    }
}

/// The seed of a client's self mask, from its `b`.
pub fn self_seed(b: &[u8; 32], round: u64, client: u32) -> [u8; 32] {
    derive(
        "fedtune secagg self mask",
        &[b, &round.to_le_bytes(), &client.to_le_bytes()],
    )
}

/// The commitment to `b` a client publishes with its shares.
pub fn commit(b: &[u8; 32]) -> [u8; 32] {
    derive("fedtune secagg commit", &[b])
}

/// The length of the ring vector of `params`: the weight, the weighted
/// loss and one element per value.
pub fn ring_len(params: &ParamSet) -> usize {
    2 + params.num_elements()
}

/// `v` in fixed point, or `None` outside `±bound` (or not finite).
fn to_fixed(v: f64, bound: f64) -> Option<u64> {
    let scaled = (v * f64::from(1u32 << FRACTION_BITS)).round();
    (scaled.abs() < bound).then_some(scaled as i64 as u64)
}

fn unfit(what: &str, v: f64, bound: f64) -> SecAggError {
    err(format!(
        "{what} = {v} does not fit the fixed-point ring (|value × 2^{FRACTION_BITS}| must stay under {bound:e})"
    ))
}

/// A client's update as ring elements: `[n, n·loss, n·(params − sent)…]`,
/// fixed-point, with room for the sum of `participants` such vectors.
/// `params` and `sent` hold the same tensors (the client fills in what it
/// left out).
pub fn encode(
    n_samples: u64,
    loss: Option<f64>,
    params: &ParamSet,
    sent: &ParamSet,
    participants: usize,
) -> Result<Vec<u64>, SecAggError> {
    params.check_compatible(sent).map_err(|e| {
        err(format!(
            "the update does not fit the global parameters: {e}"
        ))
    })?;
    // Each of `participants` values must stay within 2⁶³ / participants.
    let bound = 2f64.powi(63) / participants.max(1) as f64;
    let n = n_samples as f64;
    if n >= bound {
        return Err(err(format!("{n_samples} samples is too many")));
    }
    let mut out = Vec::with_capacity(ring_len(params));
    out.push(n_samples);
    let loss = n * loss.unwrap_or(0.0);
    out.push(to_fixed(loss, bound).ok_or_else(|| unfit("the weighted loss", loss, bound))?);
    for ((name, p), (_, s)) in params.iter().zip(sent.iter()) {
        for (&a, &b) in p.data().iter().zip(s.data()) {
            let v = n * (f64::from(a) - f64::from(b));
            let fixed = to_fixed(v, bound)
                .ok_or_else(|| unfit(&format!("a weighted change of `{name}`"), v, bound))?;
            out.push(fixed);
        }
    }
    Ok(out)
}

/// What the server learns from the unmasked sum.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// Total samples behind the sum.
    pub n_samples: u64,
    /// The sample-weighted mean training loss.
    pub loss: f64,
    /// `global` plus the sample-weighted mean change: FedAvg's result.
    pub params: ParamSet,
}

/// Reads the unmasked `sum` of the participants' [`encode`]d vectors
/// against the `global` parameters they started from.
pub fn decode_sum(sum: &[u64], global: &ParamSet) -> Result<Aggregate, SecAggError> {
    if sum.len() != ring_len(global) {
        return Err(err(format!(
            "the sum holds {} elements, the parameters need {}",
            sum.len(),
            ring_len(global)
        )));
    }
    let n = sum[0];
    if n == 0 || n > 1 << 53 {
        return Err(err(format!(
            "the summed sample count is {}, which no honest clients send",
            n as i64
        )));
    }
    let unit = f64::from(1u32 << FRACTION_BITS) * n as f64;
    let value = |x: u64| x as i64 as f64 / unit;
    let mut params = global.clone();
    let mut it = sum[2..].iter();
    for (_, t) in params.iter_mut() {
        for v in t.data_mut() {
            *v = (f64::from(*v) + value(*it.next().expect("length checked"))) as f32;
        }
    }
    params
        .check_finite()
        .map_err(|e| err(format!("the unmasked sum holds {e}")))?;
    Ok(Aggregate {
        n_samples: n,
        loss: value(sum[1]),
        params,
    })
}

/// Ring elements as the bytes that travel (little-endian).
pub fn to_bytes(x: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 * x.len());
    for v in x {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Bytes back to ring elements: `None` unless exactly `len` of them.
pub fn from_bytes(b: &[u8], len: usize) -> Option<Vec<u64>> {
    (b.len() == len.checked_mul(8)?).then(|| {
        b.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    })
}

/// Default threshold for `n` participants with `fraction` (the
/// `[privacy] secagg_threshold`): `⌊fraction·n⌋ + 1`, at least 2, at most `n`.
pub fn threshold(n: usize, fraction: f64) -> usize {
    (((fraction * n as f64).floor() as usize) + 1).clamp(2.min(n), n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(seed: u64) -> impl FnMut() -> Result<[u8; 32], SecAggError> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        move || {
            let mut b = [0u8; 32];
            rng.fill_bytes(&mut b);
            Ok(b)
        }
    }

    fn keys(seed: u64) -> RoundKeys {
        let mut r = seeded(seed);
        RoundKeys::from_bytes(r().unwrap(), r().unwrap())
    }

    #[test]
    fn any_threshold_shares_recover_the_secret_and_fewer_do_not() {
        let secret = seeded(1)().unwrap();
        let ids = [3, 7, 8, 12, 40];
        let shares = split(&secret, &ids, 3, seeded(2)).unwrap();
        let all: Vec<(u32, Share)> = shares.iter().map(|(&i, &s)| (i, s)).collect();
        for a in 0..5 {
            for b in a + 1..5 {
                for c in b + 1..5 {
                    let pick = [all[a], all[b], all[c]];
                    assert_eq!(combine(&pick), Some(secret), "{a} {b} {c}");
                }
            }
        }
        // Two shares interpolate a line: not the secret.
        assert_ne!(combine(&all[..2]), Some(secret));
        // A corrupted share is caught by the owner's check and routed around.
        let mut bad = all.clone();
        bad[0].1[2] = (bad[0].1[2] + 1) % P;
        assert_ne!(combine(&bad[..3]), Some(secret));
        let got = recover(&bad, 3, |s| commit(s) == commit(&secret));
        assert_eq!(got, Some(secret));
        assert_eq!(recover(&bad[..3], 3, |s| *s == secret), None);
    }

    #[test]
    fn shamir_matches_a_hand_computed_polynomial() {
        // Secret chunk 5, threshold 2 with coefficient c: share(x) = 5 + c·x.
        let mut secret = [0u8; 32];
        secret[0] = 5;
        let shares = split(&secret, &[1, 2], 2, seeded(9)).unwrap();
        let c = sub(shares[&1][0], 5);
        assert_eq!(shares[&2][0], add(5, mul(c, 2)));
        // Other chunks of a zero secret: pure coefficient times x.
        assert_eq!(shares[&2][1], mul(shares[&1][1], 2));
        assert_eq!(inverse(2), P / 2 + 1);
    }

    #[test]
    fn pair_seeds_agree_from_both_sides_and_differ_between_pairs_and_rounds() {
        let (a, b, c) = (keys(1), keys(2), keys(3));
        let ab = pair_seed(a.mask_secret(), &b.s_public, 4, (1, 2)).unwrap();
        let ba = pair_seed(b.mask_secret(), &a.s_public, 4, (2, 1)).unwrap();
        assert_eq!(ab, ba);
        let ac = pair_seed(a.mask_secret(), &c.s_public, 4, (1, 3)).unwrap();
        assert_ne!(ab, ac);
        assert_ne!(
            ab,
            pair_seed(a.mask_secret(), &b.s_public, 5, (1, 2)).unwrap()
        );
        // A small-order point is refused.
        assert!(pair_seed(a.mask_secret(), &[0u8; 32], 4, (1, 2)).is_err());
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(!usable_public(&[0u8; 32]) && !usable_public(&one));
        assert!(usable_public(&a.s_public) && usable_public(&b.c_public));
        assert_eq!(mask_public(a.mask_secret()), a.s_public);
    }

    #[test]
    fn sealed_shares_open_only_for_their_receiver() {
        let (a, b, c) = (keys(1), keys(2), keys(3));
        let pair = SharePair {
            b: [1, 2, 3, 4, 5],
            s: [6, 7, 8, 9, 10],
        };
        let sealed = seal(&a, &b.c_public, 3, (1, 2), pair).unwrap();
        assert_eq!(open(&b, &a.c_public, 3, (1, 2), &sealed), Some(pair));
        // Another receiver, another round, a forged sender, a flipped bit.
        assert_eq!(open(&c, &a.c_public, 3, (1, 3), &sealed), None);
        assert_eq!(open(&b, &a.c_public, 4, (1, 2), &sealed), None);
        assert_eq!(open(&b, &c.c_public, 3, (3, 2), &sealed), None);
        let mut flipped = sealed.clone();
        flipped[5] ^= 1;
        assert_eq!(open(&b, &a.c_public, 3, (1, 2), &flipped), None);
    }

    fn params(values: &[f32]) -> ParamSet {
        let mut p = ParamSet::new();
        p.insert("w", vec![values.len()], values.to_vec()).unwrap();
        p
    }

    #[test]
    fn pair_masks_cancel_and_the_sum_decodes_to_fedavg() {
        let global = params(&[0.5, -1.0, 2.0]);
        let updates = [
            (3u64, params(&[0.6, -1.1, 2.5]), 1.5),
            (5, params(&[0.4, -0.9, 1.0]), 0.5),
            (2, params(&[0.5, -1.0, 2.25]), 1.0),
        ];
        let ids = [2u32, 5, 9];
        let k: Vec<RoundKeys> = (0..3).map(|i| keys(10 + i)).collect();
        let mut sum = vec![0u64; ring_len(&global)];
        for (u, (n, p, loss)) in updates.iter().enumerate() {
            let mut x = encode(*n, Some(*loss), p, &global, 3).unwrap();
            let plain = x.clone();
            for (v, other) in k.iter().enumerate().filter(|&(v, _)| v != u) {
                let seed =
                    pair_seed(k[u].mask_secret(), &other.s_public, 1, (ids[u], ids[v])).unwrap();
                apply_mask(&mut x, &seed, pair_sign(ids[u], ids[v]));
            }
            assert_ne!(x, plain);
            for (s, v) in sum.iter_mut().zip(&x) {
                *s = s.wrapping_add(*v);
            }
        }
        let agg = decode_sum(&sum, &global).unwrap();
        assert_eq!(agg.n_samples, 10);
        assert!((agg.loss - (3.0 * 1.5 + 5.0 * 0.5 + 2.0) / 10.0).abs() < 1e-6);
        let want = ParamSet::weighted_mean(&[
            (&updates[0].1, 3.0),
            (&updates[1].1, 5.0),
            (&updates[2].1, 2.0),
        ])
        .unwrap();
        for (a, b) in agg
            .params
            .get("w")
            .unwrap()
            .data()
            .iter()
            .zip(want.get("w").unwrap().data())
        {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn values_outside_the_ring_are_refused_by_name() {
        let global = params(&[0.0]);
        let e = encode(1, None, &params(&[f32::MAX]), &global, 8).unwrap_err();
        assert!(e.to_string().contains("`w`"), "{e}");
        let e = encode(1, Some(f64::NAN), &global, &global, 8).unwrap_err();
        assert!(e.to_string().contains("loss"), "{e}");
        assert!(decode_sum(&[0, 0, 0], &global).is_err());
        assert!(decode_sum(&[1, 0], &global).is_err());
    }

    #[test]
    fn thresholds() {
        assert_eq!(threshold(3, 0.5), 2);
        assert_eq!(threshold(8, 0.5), 5);
        assert_eq!(threshold(32, 0.5), 17);
        assert_eq!(threshold(2, 0.5), 2);
        assert_eq!(threshold(4, 0.99), 4);
        assert_eq!(threshold(10, 0.0), 2);
    }
}
