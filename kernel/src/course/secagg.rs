//! Secure aggregation in a course: the round's protocol between the
//! server and its clients, on top of [`crate::privacy::secagg`]'s
//! arithmetic. With `[privacy] secure_aggregation = true` a training round
//! runs (Bonawitz et al. 2017, the semi-honest variant without signatures):
//!
//! ```text
//! server ── train (global) ──────────────▶ clients   each generates two X25519 pairs,
//! server ◀─ secagg_keys ─────────────────  clients   sends the public halves, starts training
//! server ── secagg_peers (all keys) ─────▶ clients   each Shamir-shares its self-mask seed b
//! server ◀─ secagg_shares (sealed) ──────  clients   and mask secret, sealed per peer
//! server ── secagg_inbox (per client) ───▶ clients   once trained: x + PRG(b) ± PRG(s_uv)
//! server ◀─ secagg_masked (ring blob) ───  clients
//! server ── secagg_unmask (who is in) ───▶ clients   survivors: shares of b; dropped: of s
//! server ◀─ secagg_reveal ───────────────  clients   server: Σ masked − PRG(b_u) ∓ PRG(s_vu)
//! ```
//!
//! Each step waits for every client it asked, or, when the course has a
//! `round_timeout_s`, drops those that have not answered in time and goes
//! on; a round whose clients fall below the threshold ends the course with
//! an error naming the step. The server relays keys and sealed shares it
//! cannot open, and sees each client's update only as uniformly random ring
//! elements; the strategy receives the unmasked sum as one update.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// Why a secure-aggregation message is refused, or a stage cannot go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

impl Refused {
    fn new(why: impl Into<String>) -> Self {
        Self(why.into())
    }

    /// The refusal that `e` explains.
    fn from_display(e: impl std::fmt::Display) -> Self {
        Self(e.to_string())
    }
}

impl From<String> for Refused {
    fn from(why: String) -> Self {
        Self(why)
    }
}

impl From<&str> for Refused {
    fn from(why: &str) -> Self {
        Self(why.to_string())
    }
}

use crate::message::{Envelope, MsgKind, Party};
use crate::params::ParamSet;
use crate::privacy::secagg::{self as ring, RoundKeys, SharePair, Sign};

use super::protocol::secagg::{
    Inbox, Keys, Masked, PeerKeys, Peers, Reveal, Revealed, Sealed, Shares, Unmask, INBOX, KEYS,
    MASKED, PEERS, REVEAL, SHARES, UNMASK,
};

/// The bytes of one sealed pair of shares: two shares and the AEAD tag.
const SEALED_LEN: usize = 2 * ring::SHARE_WORDS * 8 + 16;

/// A secure-aggregation round's stage on the server: what it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// The participants' public keys.
    Keys = 0,
    /// Their sealed shares.
    Shares = 1,
    /// Their masked updates.
    Masked = 2,
    /// Their revealed shares.
    Reveal = 3,
}

impl Stage {
    /// The message the stage waits for.
    pub fn awaits(self) -> &'static str {
        match self {
            Stage::Keys => KEYS,
            Stage::Shares => SHARES,
            Stage::Masked => MASKED,
            Stage::Reveal => REVEAL,
        }
    }
}

/// What the server does next in a round.
#[derive(Debug)]
pub enum Next {
    /// Wait for the clients of the stage.
    Wait,
    /// The round's sum is known.
    Done(ring::Aggregate),
}

/// The server's side of one round.
#[derive(Debug)]
pub struct ServerSession {
    round: u64,
    threshold: usize,
    stage: Stage,
    awaited: BTreeSet<u32>,
    keys: BTreeMap<u32, Keys>,
    shares: BTreeMap<u32, Shares>,
    participants: Vec<u32>,
    masked: BTreeMap<u32, Vec<u64>>,
    dropped_before_masking: Vec<u32>,
    reveals: BTreeMap<u32, Reveal>,
    ring_len: usize,
    /// Clients that left the round, and at which stage.
    pub left: Vec<(u32, Stage)>,
    /// Bytes of the protocol's own messages (keys, shares, reveals and the
    /// server's relays), apart from the masked updates.
    pub overhead_bytes: u64,
    /// Seconds the server spent removing masks.
    pub unmask_s: f64,
}

impl ServerSession {
    /// A round with the `picked` clients, `threshold` of whom must stay,
    /// whose updates hold `ring_len` ring elements.
    pub fn new(round: u64, picked: &[u32], threshold: usize, ring_len: usize) -> Self {
        Self {
            round,
            threshold,
            stage: Stage::Keys,
            awaited: picked.iter().copied().collect(),
            keys: BTreeMap::new(),
            shares: BTreeMap::new(),
            participants: Vec::new(),
            masked: BTreeMap::new(),
            dropped_before_masking: Vec::new(),
            reveals: BTreeMap::new(),
            ring_len,
            left: Vec::new(),
            overhead_bytes: 0,
            unmask_s: 0.0,
        }
    }

    /// The stage the round is in.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Whether `id` is still awaited in the current stage.
    pub fn awaits(&self, id: u32) -> bool {
        self.awaited.contains(&id)
    }

    /// Whether every awaited client answered.
    pub fn complete(&self) -> bool {
        self.awaited.is_empty()
    }

    /// The clients whose masked update was used.
    pub fn survivors(&self) -> Vec<u32> {
        self.masked.keys().copied().collect()
    }

    fn expect(&self, stage: Stage, round: u64, id: u32) -> Result<(), Refused> {
        if round != self.round {
            return Err(Refused::new(format!(
                "{} for round {round} arrived during round {}",
                stage.awaits(),
                self.round
            )));
        }
        if self.stage != stage {
            return Err(Refused::new(format!(
                "{} arrived while the round waits for {}",
                stage.awaits(),
                self.stage.awaits()
            )));
        }
        if !self.awaited.contains(&id) {
            return Err(Refused::new(format!(
                "client {id} was not asked for {} in round {round}, or already answered",
                stage.awaits()
            )));
        }
        Ok(())
    }

    /// Takes `id`'s public keys.
    /// A client asked again (it rejoined) sends new keys, which replace its old ones.
    pub fn on_keys(&mut self, round: u64, id: u32, keys: Keys) -> Result<(), Refused> {
        if self.stage == Stage::Keys && round == self.round && self.keys.remove(&id).is_some() {
            self.awaited.insert(id);
        }
        self.expect(Stage::Keys, round, id)?;
        if !ring::usable_public(&keys.mask_key) || !ring::usable_public(&keys.seal_key) {
            return Err(Refused::new("a public key of small order"));
        }
        if self
            .keys
            .values()
            .any(|k| k.mask_key == keys.mask_key || k.seal_key == keys.seal_key)
        {
            return Err(Refused::new("its public keys repeat another client's"));
        }
        self.awaited.remove(&id);
        self.keys.insert(id, keys);
        Ok(())
    }

    /// Takes `id`'s sealed shares: one for each other client that sent keys.
    pub fn on_shares(&mut self, round: u64, id: u32, shares: Shares) -> Result<(), Refused> {
        self.expect(Stage::Shares, round, id)?;
        let mut to: Vec<u32> = shares.sealed.iter().map(|s| s.peer).collect();
        to.sort_unstable();
        let want: Vec<u32> = self.keys.keys().copied().filter(|&c| c != id).collect();
        if to != want {
            return Err(Refused::new(format!(
                "shares addressed to {to:?}, but the round's other clients are {want:?}"
            )));
        }
        if let Some(s) = shares.sealed.iter().find(|s| s.data.len() != SEALED_LEN) {
            return Err(Refused::new(format!(
                "the shares for client {} are {} bytes, not {SEALED_LEN}",
                s.peer,
                s.data.len()
            )));
        }
        self.awaited.remove(&id);
        self.shares.insert(id, shares);
        Ok(())
    }

    /// Takes `id`'s masked update (`Ok(Some(reason))`: its training failed,
    /// and it leaves the round).
    pub fn on_masked(
        &mut self,
        round: u64,
        id: u32,
        body: &Masked,
        blob: Option<&[u8]>,
    ) -> Result<Option<String>, Refused> {
        self.expect(Stage::Masked, round, id)?;
        if let Some(reason) = &body.failed {
            self.awaited.remove(&id);
            self.left.push((id, Stage::Masked));
            return Ok(Some(reason.clone()));
        }
        let blob = blob.ok_or("a masked update without its ring elements")?;
        let x = ring::from_bytes(blob, self.ring_len).ok_or_else(|| {
            format!(
                "a masked update of {} bytes; the parameters need {} ring elements of 8 bytes",
                blob.len(),
                self.ring_len
            )
        })?;
        self.awaited.remove(&id);
        self.masked.insert(id, x);
        Ok(None)
    }

    /// Takes `id`'s revealed shares: exactly one of every survivor's self
    /// mask and of every dropped participant's mask secret.
    pub fn on_reveal(&mut self, round: u64, id: u32, reveal: Reveal) -> Result<(), Refused> {
        self.expect(Stage::Reveal, round, id)?;
        // Shares of survivors' self masks and dropped clients' mask
        // secrets only, each client at most once (a client that could not
        // open a peer's shares leaves that peer out).
        let survivors = self.survivors();
        let fits = |r: &[Revealed], allowed: &[u32]| {
            let mut seen = BTreeSet::new();
            r.iter()
                .all(|s| allowed.contains(&s.client) && seen.insert(s.client))
                && r.iter().flat_map(|s| s.share).all(|w| w < ring::FIELD)
        };
        if !fits(&reveal.self_masks, &survivors)
            || !fits(&reveal.mask_secrets, &self.dropped_before_masking)
        {
            return Err(Refused::new(format!(
                "its revealed shares are not of the survivors {survivors:?} and the dropped {:?}, once each",
                self.dropped_before_masking
            )));
        }
        self.awaited.remove(&id);
        self.reveals.insert(id, reveal);
        Ok(())
    }

    /// Gives up on the clients still awaited (their time is up, or they
    /// lost their state); returns them.
    pub fn drop_awaited(&mut self) -> Vec<u32> {
        let gone: Vec<u32> = std::mem::take(&mut self.awaited).into_iter().collect();
        self.left.extend(gone.iter().map(|&c| (c, self.stage)));
        gone
    }

    /// Gives up on client `id` if the current stage awaits it.
    pub fn drop_client(&mut self, id: u32) -> bool {
        let was = self.awaited.remove(&id);
        if was {
            self.left.push((id, self.stage));
        }
        was
    }

    fn enough(&self, have: usize, what: &str) -> Result<(), Refused> {
        if have < self.threshold {
            return Err(Refused::new(format!(
                "secure aggregation needs {} clients of the round at every step, but only {have} {what} (left the round: {:?})",
                self.threshold, self.left
            )));
        }
        Ok(())
    }

    /// Moves on once the stage is complete (or its stragglers dropped):
    /// the envelopes the server sends next, or the round's sum.
    pub fn advance(
        &mut self,
        course: &str,
        global: &ParamSet,
    ) -> Result<(Vec<Envelope>, Next), Refused> {
        let round = self.round;
        let to_all = |ids: &[u32], kind: &str| {
            Envelope::new(
                course,
                round,
                Party::Server,
                ids.iter().map(|&c| Party::Client(c)).collect(),
                MsgKind::Custom(kind.into()),
            )
        };
        let body_err = Refused::from_display;
        match self.stage {
            Stage::Keys => {
                self.enough(self.keys.len(), "sent their keys")?;
                let ids: Vec<u32> = self.keys.keys().copied().collect();
                let peers = Peers {
                    threshold: self.threshold as u32,
                    peers: self
                        .keys
                        .iter()
                        .map(|(&client, k)| PeerKeys {
                            client,
                            keys: k.clone(),
                        })
                        .collect(),
                };
                self.stage = Stage::Shares;
                self.awaited = ids.iter().copied().collect();
                Ok((
                    vec![to_all(&ids, PEERS).with_body(&peers).map_err(body_err)?],
                    Next::Wait,
                ))
            }
            Stage::Shares => {
                self.enough(self.shares.len(), "sent their shares")?;
                self.participants = self.shares.keys().copied().collect();
                let mut out = Vec::new();
                for &v in &self.participants {
                    let sealed = self
                        .shares
                        .iter()
                        .filter(|(&u, _)| u != v)
                        .filter_map(|(&u, s)| {
                            s.sealed.iter().find(|x| x.peer == v).map(|x| Sealed {
                                peer: u,
                                data: x.data.clone(),
                            })
                        })
                        .collect();
                    let inbox = Inbox {
                        participants: self.participants.clone(),
                        sealed,
                    };
                    out.push(to_all(&[v], INBOX).with_body(&inbox).map_err(body_err)?);
                }
                self.stage = Stage::Masked;
                self.awaited = self.participants.iter().copied().collect();
                Ok((out, Next::Wait))
            }
            Stage::Masked => {
                self.enough(self.masked.len(), "sent their masked updates")?;
                let survivors = self.survivors();
                self.dropped_before_masking = self
                    .participants
                    .iter()
                    .copied()
                    .filter(|c| !self.masked.contains_key(c))
                    .collect();
                let unmask = Unmask {
                    survivors: survivors.clone(),
                    dropped: self.dropped_before_masking.clone(),
                };
                self.stage = Stage::Reveal;
                self.awaited = survivors.iter().copied().collect();
                Ok((
                    vec![to_all(&survivors, UNMASK)
                        .with_body(&unmask)
                        .map_err(body_err)?],
                    Next::Wait,
                ))
            }
            Stage::Reveal => {
                self.enough(self.reveals.len(), "revealed their shares")?;
                let started = std::time::Instant::now();
                let sum = self.unmask()?;
                let aggregate = ring::decode_sum(&sum, global).map_err(Refused::from_display)?;
                self.unmask_s = started.elapsed().as_secs_f64();
                Ok((Vec::new(), Next::Done(aggregate)))
            }
        }
    }

    /// The sum of the survivors' updates: their masked vectors added, the
    /// self masks and the dropped clients' pair masks taken out.
    fn unmask(&self) -> Result<Vec<u64>, Refused> {
        let mut sum = vec![0u64; self.ring_len];
        for x in self.masked.values() {
            for (s, v) in sum.iter_mut().zip(x) {
                *s = s.wrapping_add(*v);
            }
        }
        let shares_of = |client: u32, pick: fn(&Reveal) -> &[Revealed]| {
            self.reveals
                .iter()
                .filter_map(|(&holder, r)| {
                    pick(r)
                        .iter()
                        .find(|s| s.client == client)
                        .map(|s| (holder, s.share))
                })
                .collect::<Vec<_>>()
        };
        // A secret of `client`'s from the revealed shares, as `check` knows it.
        let recovered = |client: u32,
                         pick: fn(&Reveal) -> &[Revealed],
                         what: &str,
                         check: &dyn Fn(&[u8; 32]) -> bool| {
            ring::recover(&shares_of(client, pick), self.threshold, check).ok_or_else(|| {
                format!("the revealed shares of client {client}'s {what} do not recover it (a client sent bad shares)")
            })
        };
        for &u in self.masked.keys() {
            let commit = self.shares[&u].commit;
            let b = recovered(u, |r| &r.self_masks, "self mask", &|b| {
                ring::commit(b) == commit
            })?;
            ring::apply_mask(&mut sum, &ring::self_seed(&b, self.round, u), Sign::Minus);
        }
        for &v in &self.dropped_before_masking {
            let public = self.keys[&v].mask_key;
            let secret = recovered(v, |r| &r.mask_secrets, "mask secret", &|s| {
                ring::mask_public(s) == public
            })?;
            for &u in self.masked.keys() {
                let seed = ring::pair_seed(&secret, &self.keys[&u].mask_key, self.round, (v, u))
                    .map_err(Refused::from_display)?;
                // Survivor u applied this mask with its own sign: undo it.
                let undo = match ring::pair_sign(u, v) {
                    Sign::Plus => Sign::Minus,
                    Sign::Minus => Sign::Plus,
                };
                ring::apply_mask(&mut sum, &seed, undo);
            }
        }
        Ok(sum)
    }
}

/// A client's trained `params` (every tensor of `global`) as ring elements,
/// with room for `per_round` of them in the sum.
pub fn ring_update(
    n_samples: u64,
    loss: Option<f64>,
    params: &ParamSet,
    global: &ParamSet,
    per_round: usize,
) -> Result<Vec<u64>, Refused> {
    ring::encode(n_samples, loss, params, global, per_round).map_err(Refused::from_display)
}

/// The trained update of a client, ready to mask: its ring elements and
/// the seconds training took, or why training failed.
pub type Trained = Result<(Vec<u64>, f64), (String, f64)>;

/// A client's side of one round.
pub struct ClientSession {
    round: u64,
    me: u32,
    keys: RoundKeys,
    b: Option<[u8; 32]>,
    peers: BTreeMap<u32, Keys>,
    pair_seeds: BTreeMap<u32, [u8; 32]>,
    threshold: usize,
    own: Option<SharePair>,
    received: BTreeMap<u32, SharePair>,
    participants: Option<Vec<u32>>,
    trained: Option<Trained>,
    training: bool,
    masked_sent: bool,
    revealed: Option<Envelope>,
}

/// Where a client keeps its current round's session (shared with its training job).
pub type ClientSlot = Arc<Mutex<Option<ClientSession>>>;

/// The masking of a trained update, to run off the message loop.
pub struct MaskJob {
    x: Vec<u64>,
    seeds: Vec<([u8; 32], Sign)>,
    reply: Envelope,
}

impl MaskJob {
    /// The masked update, ready to send.
    pub fn run(mut self) -> Envelope {
        if self.seeds.is_empty() {
            // A failure report: no update, no blob.
            return self.reply;
        }
        for (seed, sign) in &self.seeds {
            ring::apply_mask(&mut self.x, seed, *sign);
        }
        self.reply.with_blob(ring::to_bytes(&self.x))
    }
}

fn reply(course: &str, round: u64, me: u32, kind: &str) -> Envelope {
    Envelope::new(
        course,
        round,
        Party::Client(me),
        vec![Party::Server],
        MsgKind::Custom(kind.into()),
    )
}

fn lock(slot: &ClientSlot) -> std::sync::MutexGuard<'_, Option<ClientSession>> {
    // A session is never left half-updated.
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens round `round` for client `me` (again, if the server repeats its
/// request: new keys, but a training already done or running is kept):
/// the `secagg_keys` to send, and whether to start training.
pub fn begin(
    slot: &ClientSlot,
    course: &str,
    round: u64,
    me: u32,
) -> Result<(Envelope, bool), Refused> {
    let keys = RoundKeys::generate().map_err(Refused::from_display)?;
    let msg = reply(course, round, me, KEYS)
        .with_body(&Keys {
            seal_key: keys.c_public,
            mask_key: keys.s_public,
        })
        .map_err(Refused::from_display)?;
    let mut guard = lock(slot);
    let (trained, training) = match guard.take() {
        Some(old) if old.round == round => (old.trained, old.training),
        _ => (None, false),
    };
    let start = trained.is_none() && !training;
    *guard = Some(ClientSession {
        round,
        me,
        keys,
        b: None,
        peers: BTreeMap::new(),
        pair_seeds: BTreeMap::new(),
        threshold: 0,
        own: None,
        received: BTreeMap::new(),
        participants: None,
        trained,
        training: training || start,
        masked_sent: false,
        revealed: None,
    });
    Ok((msg, start))
}

fn session<'a>(
    guard: &'a mut std::sync::MutexGuard<'_, Option<ClientSession>>,
    round: u64,
    what: &str,
) -> Result<&'a mut ClientSession, Refused> {
    match guard.as_mut() {
        Some(s) if s.round == round => Ok(s),
        _ => Err(Refused::new(format!(
            "{what} for round {round}, which this client is not in"
        ))),
    }
}

/// The server's list of keys: share this client's secrets among the
/// peers; the `secagg_shares` to send. `min_fraction` is the threshold
/// fraction this client's configuration demands at least.
pub fn on_peers(
    slot: &ClientSlot,
    course: &str,
    env: &Envelope,
    min_fraction: f64,
) -> Result<Envelope, Refused> {
    let peers: Peers = env.body().map_err(Refused::from_display)?;
    let mut guard = lock(slot);
    let s = session(&mut guard, env.round, PEERS)?;
    if s.b.is_some() {
        return Err(Refused::new("a second list of peers in one round"));
    }
    let ids: Vec<u32> = peers.peers.iter().map(|p| p.client).collect();
    let set: BTreeSet<u32> = ids.iter().copied().collect();
    if set.len() != ids.len() || set.contains(&0) {
        return Err(Refused::new(format!(
            "peers {ids:?} repeat a client or name client 0"
        )));
    }
    let mine = peers.peers.iter().find(|p| p.client == s.me);
    if mine.map(|p| (p.keys.seal_key, p.keys.mask_key)) != Some((s.keys.c_public, s.keys.s_public))
    {
        return Err(Refused::new(
            "the peers list does not hold this client's own keys",
        ));
    }
    let t = peers.threshold as usize;
    let floor = ring::threshold(ids.len(), min_fraction);
    if t < floor || t > ids.len() {
        return Err(Refused::new(format!(
            "a threshold of {t} for {} peers (this client accepts {floor} to {})",
            ids.len(),
            ids.len()
        )));
    }
    // Every pairwise seed now: a key that agrees on nothing is refused here.
    let mut pair_seeds = BTreeMap::new();
    for p in peers.peers.iter().filter(|p| p.client != s.me) {
        let seed = ring::pair_seed(
            s.keys.mask_secret(),
            &p.keys.mask_key,
            env.round,
            (s.me, p.client),
        )
        .map_err(|e| format!("client {}'s key: {e}", p.client))?;
        pair_seeds.insert(p.client, seed);
    }
    let b = ring::os_random().map_err(Refused::from_display)?;
    let random = || ring::os_random();
    let b_shares = ring::split(&b, &ids, t, random).map_err(Refused::from_display)?;
    let s_shares =
        ring::split(s.keys.mask_secret(), &ids, t, random).map_err(Refused::from_display)?;
    let mut sealed = Vec::new();
    for p in &peers.peers {
        let pair = SharePair {
            b: b_shares[&p.client],
            s: s_shares[&p.client],
        };
        if p.client == s.me {
            s.own = Some(pair);
            continue;
        }
        let data = ring::seal(&s.keys, &p.keys.seal_key, env.round, (s.me, p.client), pair)
            .map_err(Refused::from_display)?;
        sealed.push(Sealed {
            peer: p.client,
            data,
        });
    }
    s.b = Some(b);
    s.pair_seeds = pair_seeds;
    s.threshold = t;
    s.peers = peers
        .peers
        .into_iter()
        .map(|p| (p.client, p.keys))
        .collect();
    reply(course, env.round, s.me, SHARES)
        .with_body(&Shares {
            commit: ring::commit(&b),
            sealed,
        })
        .map_err(Refused::from_display)
}

/// The shares sealed for this client: kept; the masking to run if the
/// update is already trained.
pub fn on_inbox(
    slot: &ClientSlot,
    course: &str,
    env: &Envelope,
) -> Result<Option<MaskJob>, Refused> {
    let inbox: Inbox = env.body().map_err(Refused::from_display)?;
    let mut guard = lock(slot);
    let s = session(&mut guard, env.round, INBOX)?;
    if s.b.is_none() || s.participants.is_some() {
        return Err(Refused::new("an inbox before the peers, or a second one"));
    }
    let set: BTreeSet<u32> = inbox.participants.iter().copied().collect();
    if set.len() != inbox.participants.len()
        || !set.contains(&s.me)
        || !set.iter().all(|c| s.peers.contains_key(c))
        || set.len() < s.threshold
    {
        return Err(Refused::new(format!(
            "participants {:?} are not at least {} of this round's peers with this client among them",
            inbox.participants, s.threshold
        )));
    }
    for sealed in &inbox.sealed {
        let Some(from) = s
            .peers
            .get(&sealed.peer)
            .filter(|_| set.contains(&sealed.peer))
        else {
            continue;
        };
        // Shares that do not open are left out; the others may still suffice.
        if let Some(pair) = ring::open(
            &s.keys,
            &from.seal_key,
            env.round,
            (sealed.peer, s.me),
            &sealed.data,
        ) {
            s.received.insert(sealed.peer, pair);
        }
    }
    s.participants = Some(inbox.participants);
    Ok(mask_job(s, course))
}

/// The training job's result for round `round`: kept; the masking to run
/// if the inbox is already here (or the failure to report).
pub fn trained(slot: &ClientSlot, course: &str, round: u64, result: Trained) -> Option<MaskJob> {
    let mut guard = lock(slot);
    let s = guard.as_mut().filter(|s| s.round == round)?;
    s.training = false;
    s.trained = Some(result);
    mask_job(s, course)
}

fn mask_job(s: &mut ClientSession, course: &str) -> Option<MaskJob> {
    if s.masked_sent {
        return None;
    }
    let (trained, participants) = (s.trained.as_ref()?, s.participants.as_ref());
    let reply = reply(course, s.round, s.me, MASKED);
    let job = match trained {
        // A failure needs no inbox: the server hears it at once.
        Err((reason, compute_s)) => MaskJob {
            x: Vec::new(),
            seeds: Vec::new(),
            reply: reply
                .with_body(&Masked {
                    compute_s: *compute_s,
                    failed: Some(reason.clone()),
                })
                .ok()?,
        },
        Ok((x, compute_s)) => {
            let participants = participants?;
            let b = s.b?;
            let mut seeds = vec![(ring::self_seed(&b, s.round, s.me), Sign::Plus)];
            for &v in participants.iter().filter(|&&v| v != s.me) {
                seeds.push((*s.pair_seeds.get(&v)?, ring::pair_sign(s.me, v)));
            }
            MaskJob {
                x: x.clone(),
                seeds,
                reply: reply
                    .with_body(&Masked {
                        compute_s: *compute_s,
                        failed: None,
                    })
                    .ok()?,
            }
        }
    };
    s.masked_sent = true;
    Some(job)
}

/// The server asks for shares: of every survivor's self mask and every
/// dropped participant's mask secret — never both of one client; the
/// `secagg_reveal` to send (the same again if asked again).
pub fn on_unmask(slot: &ClientSlot, course: &str, env: &Envelope) -> Result<Envelope, Refused> {
    let unmask: Unmask = env.body().map_err(Refused::from_display)?;
    let mut guard = lock(slot);
    let s = session(&mut guard, env.round, UNMASK)?;
    if let Some(done) = &s.revealed {
        return Ok(done.clone());
    }
    let participants: BTreeSet<u32> = s
        .participants
        .clone()
        .ok_or("an unmask request before the inbox")?
        .into_iter()
        .collect();
    let survivors: BTreeSet<u32> = unmask.survivors.iter().copied().collect();
    let dropped: BTreeSet<u32> = unmask.dropped.iter().copied().collect();
    if !s.masked_sent
        || survivors.len() != unmask.survivors.len()
        || dropped.len() != unmask.dropped.len()
        || !survivors.is_disjoint(&dropped)
        || survivors
            .union(&dropped)
            .copied()
            .collect::<BTreeSet<u32>>()
            != participants
        || !survivors.contains(&s.me)
        || survivors.len() < s.threshold
    {
        return Err(Refused::new(format!(
            "refusing to reveal: survivors {:?} and dropped {:?} must split this round's participants {participants:?}, hold this client, and keep at least {} survivors",
            unmask.survivors, unmask.dropped, s.threshold
        )));
    }
    let own = s.own.ok_or("no own shares")?;
    let share_of = |c: u32| {
        if c == s.me {
            Some(own)
        } else {
            s.received.get(&c).copied()
        }
    };
    // Of each client of `whose`, the share `part` picks.
    let revealed = |whose: &BTreeSet<u32>, part: fn(SharePair) -> ring::Share| -> Vec<Revealed> {
        whose
            .iter()
            .filter_map(|&c| {
                share_of(c).map(|p| Revealed {
                    client: c,
                    share: part(p),
                })
            })
            .collect()
    };
    let reveal = Reveal {
        self_masks: revealed(&survivors, |p| p.b),
        mask_secrets: revealed(&dropped, |p| p.s),
    };
    let env = reply(course, env.round, s.me, REVEAL)
        .with_body(&reveal)
        .map_err(Refused::from_display)?;
    s.revealed = Some(env.clone());
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COURSE: &str = "c";

    fn params(v: &[f32]) -> ParamSet {
        let mut p = ParamSet::new();
        p.insert("a", vec![2], v[..2].to_vec()).unwrap();
        p.insert("b", vec![v.len() - 2], v[2..].to_vec()).unwrap();
        p
    }

    /// Client `id`'s update: a different change for every client.
    fn update(id: u32) -> (u64, ParamSet) {
        let f = id as f32;
        (
            u64::from(10 + 7 * id),
            params(&[0.1 * f, -0.3 * f, 1.0 / f, f * f * 1e-3, -2.0 + f]),
        )
    }

    struct Round {
        server: ServerSession,
        slots: BTreeMap<u32, ClientSlot>,
        global: ParamSet,
        plain_sum: Vec<u64>,
    }

    fn deliver(
        r: &mut Round,
        env: &Envelope,
        f: impl Fn(&ClientSlot, &Envelope) -> Option<Envelope>,
    ) -> Vec<(u32, Envelope)> {
        let Party::Client(_) = env.to[0] else {
            panic!()
        };
        env.to
            .iter()
            .filter_map(|p| match p {
                Party::Client(c) => f(&r.slots[c], env).map(|e| (*c, e)),
                Party::Server => None,
            })
            .collect()
    }

    /// Runs a round of clients 1..=n up to the masked updates; clients in
    /// `silent_masked` never send theirs.
    fn up_to_masking(n: u32, silent_masked: &[u32]) -> Round {
        let ids: Vec<u32> = (1..=n).collect();
        let global = params(&[0.5, 0.25, -1.0, 0.0, 3.0]);
        let len = ring::ring_len(&global);
        let mut r = Round {
            server: ServerSession::new(7, &ids, ring::threshold(ids.len(), 0.5), len),
            slots: ids.iter().map(|&c| (c, ClientSlot::default())).collect(),
            global,
            plain_sum: vec![0; len],
        };
        for &c in &ids {
            let (keys, start) = begin(&r.slots[&c], COURSE, 7, c).unwrap();
            assert!(start);
            r.server.on_keys(7, c, keys.body().unwrap()).unwrap();
        }
        assert!(r.server.complete());
        let (out, _) = r.server.advance(COURSE, &r.global).unwrap();
        for (c, shares) in deliver(&mut r, &out[0], |slot, env| {
            Some(on_peers(slot, COURSE, env, 0.5).unwrap())
        }) {
            // The server relays ciphertexts it cannot read.
            r.server.on_shares(7, c, shares.body().unwrap()).unwrap();
        }
        let (inboxes, _) = r.server.advance(COURSE, &r.global).unwrap();
        assert_eq!(inboxes.len(), n as usize);
        for inbox in &inboxes {
            let Party::Client(c) = inbox.to[0] else {
                panic!()
            };
            assert!(
                on_inbox(&r.slots[&c], COURSE, inbox).unwrap().is_none(),
                "not trained yet"
            );
            let (samples, p) = update(c);
            let x = ring_update(samples, Some(f64::from(c)), &p, &r.global, n as usize).unwrap();
            if !silent_masked.contains(&c) {
                for (s, v) in r.plain_sum.iter_mut().zip(&x) {
                    *s = s.wrapping_add(*v);
                }
            }
            let masked = trained(&r.slots[&c], COURSE, 7, Ok((x.clone(), 0.0)))
                .unwrap()
                .run();
            let blob = masked.blob.clone().unwrap();
            assert_ne!(ring::from_bytes(&blob, len).unwrap(), x, "sent masked");
            if !silent_masked.contains(&c) {
                assert_eq!(
                    r.server
                        .on_masked(7, c, &masked.body().unwrap(), Some(&blob)),
                    Ok(None)
                );
            }
        }
        r
    }

    #[test]
    fn the_unmasked_sum_is_exactly_the_sum_of_the_updates_despite_dropouts() {
        // Five clients, threshold 3: client 5 never sends its masked update,
        // client 4 sends it and then never reveals.
        let mut r = up_to_masking(5, &[5]);
        assert_eq!(r.server.drop_awaited(), vec![5]);
        let (out, _) = r.server.advance(COURSE, &r.global).unwrap();
        let unmask: Unmask = out[0].body().unwrap();
        assert_eq!(
            (unmask.survivors.clone(), unmask.dropped.clone()),
            (vec![1, 2, 3, 4], vec![5])
        );
        for (c, reveal) in deliver(&mut r, &out[0], |slot, env| {
            Some(on_unmask(slot, COURSE, env).unwrap())
        }) {
            if c != 4 {
                r.server.on_reveal(7, c, reveal.body().unwrap()).unwrap();
            }
        }
        assert_eq!(r.server.drop_awaited(), vec![4]);
        let (_, next) = r.server.advance(COURSE, &r.global).unwrap();
        let Next::Done(agg) = next else {
            panic!("not done")
        };
        // Exact in the ring: the same sum decodes to the same floats.
        let want = ring::decode_sum(&r.plain_sum, &r.global).unwrap();
        assert_eq!(agg, want);
        // And that is FedAvg over clients 1–4, within the fixed point's error.
        let ups: Vec<(u64, ParamSet)> = (1..=4).map(update).collect();
        let fedavg =
            ParamSet::weighted_mean(&ups.iter().map(|(n, p)| (p, *n as f64)).collect::<Vec<_>>())
                .unwrap();
        for ((_, a), (_, b)) in agg.params.iter().zip(fedavg.iter()) {
            for (x, y) in a.data().iter().zip(b.data()) {
                assert!((x - y).abs() < 1e-6, "{x} vs {y}");
            }
        }
        assert_eq!(agg.n_samples, ups.iter().map(|(n, _)| n).sum::<u64>());
    }

    #[test]
    fn too_few_survivors_end_the_round_with_the_step_named() {
        let mut r = up_to_masking(4, &[3, 4]);
        r.server.drop_awaited();
        let e = r.server.advance(COURSE, &r.global).unwrap_err().0;
        assert!(e.contains("needs 3") && e.contains("masked updates"), "{e}");
    }

    #[test]
    fn a_client_never_reveals_both_secrets_of_one_peer() {
        let r = up_to_masking(4, &[]);
        let ask = |survivors: Vec<u32>, dropped: Vec<u32>| {
            let env = Envelope::new(
                COURSE,
                7,
                Party::Server,
                vec![Party::Client(1)],
                MsgKind::Custom(UNMASK.into()),
            )
            .with_body(&Unmask { survivors, dropped })
            .unwrap();
            on_unmask(&r.slots[&1], COURSE, &env)
        };
        // Client 2 both survived and dropped: refused.
        assert!(ask(vec![1, 2, 3, 4], vec![2]).is_err());
        // Client 4 left out of both: refused (the sets must split the participants).
        assert!(ask(vec![1, 2, 3], vec![]).is_err());
        // Too few survivors for the threshold: refused.
        assert!(ask(vec![1, 2], vec![3, 4]).is_err());
        // A proper request is answered, and a different second one gets the first answer.
        let first = ask(vec![1, 2, 3], vec![4]).unwrap();
        assert_eq!(ask(vec![1, 2, 3, 4], vec![]).unwrap(), first);
    }

    #[test]
    fn keys_that_agree_on_nothing_or_repeat_anothers_are_refused() {
        let mut server = ServerSession::new(1, &[1, 2, 3], 2, 4);
        let good = |seed: u8| {
            let k = RoundKeys::from_bytes([seed; 32], [seed + 1; 32]);
            Keys {
                seal_key: k.c_public,
                mask_key: k.s_public,
            }
        };
        let mut low = good(1);
        low.mask_key = [0; 32];
        assert!(server
            .on_keys(1, 1, low)
            .unwrap_err()
            .0
            .contains("small order"));
        server.on_keys(1, 1, good(1)).unwrap();
        assert!(server
            .on_keys(1, 2, good(1))
            .unwrap_err()
            .0
            .contains("repeat"));
        // Client 1 asked again (it rejoined): its new keys replace the old.
        server.on_keys(1, 1, good(5)).unwrap();
        server.on_keys(1, 2, good(1)).unwrap();
        assert!(server.on_keys(1, 4, good(9)).is_err(), "not picked");
    }

    #[test]
    fn the_server_rejects_what_does_not_fit_the_stage() {
        let mut r = up_to_masking(3, &[3]);
        // A second masked update, and one of the wrong length.
        let m = Masked {
            compute_s: 0.0,
            failed: None,
        };
        assert!(r.server.on_masked(7, 1, &m, Some(&[0u8; 8])).is_err());
        let e = r.server.on_masked(7, 3, &m, Some(&[0u8; 8])).unwrap_err().0;
        assert!(e.contains("ring elements"), "{e}");
        assert!(r.server.on_masked(6, 3, &m, None).is_err());
        let keys = Keys {
            seal_key: [1; 32],
            mask_key: [2; 32],
        };
        assert!(r
            .server
            .on_keys(7, 3, keys)
            .unwrap_err()
            .0
            .contains("waits for secagg_masked"));
    }
}
