//! [`NatsTransport`]: the kernel's [`Transport`] over a NATS connection.
//!
//! Each party (the server, or one client) holds its own connection. A frame
//! from a client to the server is published on `fedtune.<course>.server.<id>`,
//! one from the server to a client on `fedtune.<course>.client.<id>`; the
//! receiver takes the sender from the subject (see [`Subjects::sender_of`]),
//! never from the frame, so once the broker's permissions let each client
//! publish only on its own subject, no client can speak for another.
//!
//! **Large frames.** NATS refuses a message above the server's `max_payload`
//! (1 MiB by default), and a LoRA adapter of the default model is 1.8 MiB at
//! f32. Every frame therefore travels as one or more parts of at most
//! `chunk_bytes`, each carrying headers: a message id unique to the sending
//! connection, the part number and count, the total length and the frame's
//! SHA-256. The receiver reassembles parts by (subject, message id) and
//! delivers the frame only when every part arrived and the length and digest
//! match; anything else is dropped and counted in [`NatsStats`], never passed
//! on half-built. Parts of one message keep their order (NATS preserves the
//! order of one publisher's messages on one subject), but reassembly does not
//! rely on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, ConnectOptions, HeaderMap};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use fedtune_kernel::{Delivery, Party, Subscription, Transport, TransportError};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::auth::Credentials;
use crate::subjects::{Route, Subjects};

/// Header: the message id (unique per sending connection).
const H_MSG: &str = "Fedtune-Msg";
/// Header: `index/count` of this part, 0-based.
const H_PART: &str = "Fedtune-Part";
/// Header: the whole frame's length in bytes.
const H_LEN: &str = "Fedtune-Len";
/// Header: the whole frame's SHA-256, lowercase hex.
const H_SHA: &str = "Fedtune-Sha256";

/// Room left in each NATS message for the headers above.
const HEADER_ROOM: usize = 1024;

/// How long `subscribe` waits for its probe to come back before it goes on
/// without the guarantee (a broker config written before probes existed
/// refuses the probe subject).
const PROBE_WAIT: Duration = Duration::from_secs(3);

/// How to connect.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// The connection's name, as the server's monitoring shows it.
    pub name: String,
    /// Bytes of frame per NATS message; by default the server's `max_payload`
    /// less room for the headers.
    pub chunk_bytes: Option<usize>,
    /// The largest frame accepted for reassembly (a claimed length above it
    /// is rejected before any buffer is kept).
    pub max_frame_bytes: usize,
    /// A partly received frame is dropped when no part of it arrived for this long.
    pub reassembly_timeout: Duration,
    /// Frames one sender may have partly sent at once; a further one evicts
    /// its oldest (a well-behaved sender has one in flight).
    pub max_partial_frames: usize,
    /// Bytes of partly received frames kept for all senders together; past
    /// it the least recently fed frames are evicted.
    pub max_inflight_bytes: usize,
    /// A sender whose messages were rejected this many times is cut off:
    /// everything it sends afterwards is dropped unread (0: never).
    pub max_bad_frames: u64,
    /// User and password, when the server requires them (see [`crate::auth`]).
    pub credentials: Option<Credentials>,
    /// A PEM file of the certificate authority that signed the broker's TLS
    /// certificate: when set, the connection must be TLS and the broker is
    /// trusted only if that authority signed its certificate.
    pub tls_ca: Option<std::path::PathBuf>,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            name: "fedtune".to_string(),
            chunk_bytes: None,
            max_frame_bytes: 1 << 30,
            reassembly_timeout: Duration::from_secs(120),
            max_partial_frames: 4,
            max_inflight_bytes: 2 << 30,
            max_bad_frames: 1000,
            credentials: None,
            tls_ca: None,
        }
    }
}

/// What a transport's receivers dropped.
#[derive(Debug, Default)]
pub struct NatsStats {
    /// Frames delivered whole.
    pub delivered: AtomicU64,
    /// Messages on a subject that names no sender of this course.
    pub unknown_subject: AtomicU64,
    /// Parts without valid fedtune headers.
    pub malformed: AtomicU64,
    /// Frames whose length or SHA-256 did not match.
    pub corrupt: AtomicU64,
    /// Frames left incomplete past the reassembly timeout.
    pub incomplete: AtomicU64,
    /// Partly received frames evicted to keep within the memory bounds.
    pub evicted: AtomicU64,
    /// Messages dropped unread because their sender was cut off.
    pub cut_off: AtomicU64,
}

impl NatsStats {
    /// Frames rejected for any reason.
    pub fn rejected(&self) -> u64 {
        self.unknown_subject.load(Ordering::Relaxed)
            + self.malformed.load(Ordering::Relaxed)
            + self.corrupt.load(Ordering::Relaxed)
            + self.incomplete.load(Ordering::Relaxed)
            + self.evicted.load(Ordering::Relaxed)
            + self.cut_off.load(Ordering::Relaxed)
    }
}

/// The kernel's transport over one NATS connection.
#[derive(Debug, Clone)]
pub struct NatsTransport {
    client: Client,
    subjects: Subjects,
    chunk_bytes: usize,
    options: NatsOptions,
    /// Prefix of this connection's message ids.
    nonce: String,
    next_id: Arc<AtomicU64>,
    stats: Arc<NatsStats>,
    refusals: watch::Receiver<Option<String>>,
}

impl NatsTransport {
    /// Connects to the NATS server at `url` for the course `course`.
    pub async fn connect(
        url: &str,
        course: &str,
        options: NatsOptions,
    ) -> Result<Self, TransportError> {
        let subjects = Subjects::new(course).map_err(|e| TransportError::Other(e.to_string()))?;
        let mut connect = ConnectOptions::new()
            .name(&options.name)
            .connection_timeout(Duration::from_secs(5));
        if let Some(c) = &options.credentials {
            connect = connect.user_and_password(c.user.clone(), c.password.clone());
        }
        if let Some(ca) = &options.tls_ca {
            if !ca.is_file() {
                return Err(TransportError::Other(format!(
                    "the TLS certificate authority {} is not a file",
                    ca.display()
                )));
            }
            connect = connect.add_root_certificates(ca.clone()).require_tls(true);
        }
        // The broker refuses a publish or subscription outside the user's
        // permissions with an asynchronous error, not on the call: keep it.
        let (refused_tx, refusals) = watch::channel(None);
        let refused_tx = Arc::new(refused_tx);
        // A refused probe only tells of a broker config older than probes
        // (see `round_trip`), not of a party out of bounds.
        let probes = Arc::new(subjects.probe_prefix());
        connect = connect.event_callback(move |event| {
            let refused_tx = refused_tx.clone();
            let probes = probes.clone();
            async move {
                match event {
                    async_nats::Event::ServerError(async_nats::ServerError::Other(m))
                        if m.to_ascii_lowercase().contains("permissions violation")
                            && !m.contains(probes.as_str()) =>
                    {
                        tracing::warn!("the NATS server refused: {m}");
                        // The first refusal is the telling one; keep it.
                        refused_tx.send_if_modified(|r| {
                            let first = r.is_none();
                            if first {
                                *r = Some(m);
                            }
                            first
                        });
                    }
                    async_nats::Event::ServerError(e) => tracing::warn!("NATS server error: {e}"),
                    other => tracing::debug!("NATS: {other}"),
                }
            }
        });
        let client = connect
            .connect(url)
            .await
            .map_err(|e| TransportError::Other(format!("cannot connect to NATS at {url}: {e}")))?;
        let max_payload = client.server_info().max_payload;
        let chunk_bytes = match options.chunk_bytes {
            Some(n) => n,
            None => max_payload.saturating_sub(HEADER_ROOM),
        };
        if chunk_bytes == 0 || chunk_bytes + HEADER_ROOM > max_payload {
            return Err(TransportError::Other(format!(
                "chunk size {chunk_bytes} B does not fit the server's max_payload of {max_payload} B"
            )));
        }
        let nonce = format!(
            "{:x}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        Ok(Self {
            client,
            subjects,
            chunk_bytes,
            options,
            nonce,
            next_id: Arc::new(AtomicU64::new(0)),
            stats: Arc::new(NatsStats::default()),
            refusals,
        })
    }

    /// What this transport's receivers delivered and dropped.
    pub fn stats(&self) -> Arc<NatsStats> {
        self.stats.clone()
    }

    /// The first publish or subscription the broker refused for lack of
    /// permission (e.g. a client using another client's credentials), once
    /// one happens.
    pub fn refusals(&self) -> watch::Receiver<Option<String>> {
        self.refusals.clone()
    }

    /// Bytes of frame per NATS message.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// The underlying connection (for tests and tools).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Returns once the broker has registered every subscription this
    /// connection made before: it publishes a token on `me`'s probe subject
    /// and waits for it to come back. The broker handles one connection's
    /// operations in order, so the echo proves the earlier SUBs are live and
    /// nothing another party sends afterwards can miss them. (`flush` only
    /// empties the socket buffer: another connection's message can still
    /// overtake the SUB inside the broker.) Without the echo in time — a
    /// broker config written before probes existed refuses the subject — it
    /// warns and goes on: the course protocol's retries cover the gap.
    async fn round_trip(&self, me: Party) -> Result<(), TransportError> {
        let subject = self.subjects.probe(me);
        let fail = |e: &dyn std::fmt::Display| {
            TransportError::Other(format!("probing the broker on {subject}: {e}"))
        };
        let token = Bytes::from(format!(
            "{}-probe-{}",
            self.nonce,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        ));
        let mut echo = self
            .client
            .subscribe(subject.clone())
            .await
            .map_err(|e| fail(&e))?;
        self.client
            .publish(subject.clone(), token.clone())
            .await
            .map_err(|e| fail(&e))?;
        self.client.flush().await.map_err(|e| fail(&e))?;
        let heard = tokio::time::timeout(PROBE_WAIT, async {
            while let Some(m) = echo.next().await {
                if m.payload == token {
                    return true;
                }
            }
            false
        })
        .await;
        echo.unsubscribe().await.ok();
        if heard != Ok(true) {
            tracing::warn!(
                "the NATS broker did not echo {subject} within {PROBE_WAIT:?}; going on \
                 (regenerate its config with `fedtune broker config` to allow the probe)"
            );
        }
        Ok(())
    }

    async fn publish(&self, subject: String, frame: Bytes) -> Result<(), TransportError> {
        let id = format!(
            "{}-{}",
            self.nonce,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let digest = hex(&Sha256::digest(&frame));
        let count = frame.len().div_ceil(self.chunk_bytes).max(1);
        for index in 0..count {
            let start = index * self.chunk_bytes;
            let end = (start + self.chunk_bytes).min(frame.len());
            let mut headers = HeaderMap::new();
            headers.insert(H_MSG, id.as_str());
            headers.insert(H_PART, format!("{index}/{count}"));
            headers.insert(H_LEN, frame.len().to_string());
            headers.insert(H_SHA, digest.as_str());
            self.client
                .publish_with_headers(subject.clone(), headers, frame.slice(start..end))
                .await
                .map_err(|e| TransportError::Other(format!("publishing on {subject}: {e}")))?;
        }
        self.client
            .flush()
            .await
            .map_err(|e| TransportError::Other(format!("flushing {subject}: {e}")))
    }
}

#[async_trait]
impl Transport for NatsTransport {
    async fn send(&self, from: Party, to: Party, frame: Bytes) -> Result<(), TransportError> {
        let route = Subjects::route(from, to).map_err(|e| TransportError::Other(e.to_string()))?;
        self.publish(self.subjects.subject(route), frame).await
    }

    async fn subscribe(&self, me: Party) -> Result<Subscription, TransportError> {
        let subjects = match me {
            Party::Server => vec![self.subjects.server_inbox()],
            Party::Client(id) => vec![
                self.subjects.subject(Route::ToClient(id)),
                self.subjects.subject(Route::Broadcast),
            ],
        };
        let (tx, rx) = mpsc::unbounded_channel();
        for subject in subjects {
            let sub = self
                .client
                .subscribe(subject.clone())
                .await
                .map_err(|e| TransportError::Other(format!("subscribing to {subject}: {e}")))?;
            let mut receiver = Reassembler::new(
                self.subjects.clone(),
                Bounds::of(&self.options),
                self.stats.clone(),
            );
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut sub = sub;
                while let Some(msg) = sub.next().await {
                    if let Some(delivery) =
                        receiver.accept(msg.subject.as_str(), msg.headers.as_ref(), msg.payload)
                    {
                        if tx.send(delivery).is_err() {
                            break; // the subscriber is gone
                        }
                    }
                }
            });
        }
        self.round_trip(me).await?;
        Ok(Subscription::new(rx))
    }
}

/// What a receiver keeps for frames still arriving, at most.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    max_frame: usize,
    timeout: Duration,
    max_partial: usize,
    max_inflight: usize,
    max_bad: u64,
}

impl Bounds {
    fn of(o: &NatsOptions) -> Self {
        Self {
            max_frame: o.max_frame_bytes,
            timeout: o.reassembly_timeout,
            max_partial: o.max_partial_frames.max(1),
            max_inflight: o.max_inflight_bytes,
            max_bad: o.max_bad_frames,
        }
    }
}

/// Why a message was rejected, for its counter in [`NatsStats`].
#[derive(Debug, Clone, Copy)]
enum Rejected {
    UnknownSubject,
    Malformed,
    Corrupt,
}

/// What one stored part costs beyond its bytes (map entry, `Bytes` handle).
const PART_OVERHEAD: usize = 64;
/// What one partial frame costs beyond its parts (key, digest, bookkeeping).
const PARTIAL_OVERHEAD: usize = 256;

/// A frame being put together. Parts are kept sparsely, as they arrive: a
/// claimed part count costs nothing until parts come.
struct Partial {
    from: Party,
    parts: std::collections::BTreeMap<usize, Bytes>,
    count: usize,
    len: usize,
    sha: String,
    /// Bytes of the parts received.
    bytes: usize,
    last_seen: Instant,
}

impl Partial {
    /// Memory this frame holds.
    fn footprint(&self) -> usize {
        PARTIAL_OVERHEAD + self.bytes + self.parts.len() * PART_OVERHEAD
    }
}

/// Puts frames back together from their parts, checking them, within
/// [`Bounds`]: a claimed length or part count is checked before anything is
/// kept, parts are kept only as they arrive and never beyond the claimed
/// length, each sender may have a few frames in flight, and all of them
/// together a bounded number of bytes. A sender whose messages keep being
/// rejected is cut off.
struct Reassembler {
    subjects: Subjects,
    bounds: Bounds,
    stats: Arc<NatsStats>,
    partial: HashMap<(String, String), Partial>,
    /// Bytes held by `partial`.
    inflight: usize,
    /// Rejected messages per sender.
    bad: HashMap<Party, u64>,
}

impl Reassembler {
    fn new(subjects: Subjects, bounds: Bounds, stats: Arc<NatsStats>) -> Self {
        Self {
            subjects,
            bounds,
            stats,
            partial: HashMap::new(),
            inflight: 0,
            bad: HashMap::new(),
        }
    }

    /// Bytes held for frames still arriving.
    #[cfg(test)]
    fn inflight(&self) -> usize {
        self.inflight
    }

    /// Takes one NATS message; returns a frame when it completes one.
    fn accept(
        &mut self,
        subject: &str,
        headers: Option<&HeaderMap>,
        payload: Bytes,
    ) -> Option<Delivery> {
        self.expire();
        let Some(from) = self.subjects.sender_of(subject) else {
            self.reject(
                None,
                Rejected::UnknownSubject,
                "not a subject of this course",
            );
            return None;
        };
        if self.is_cut_off(from) {
            self.stats.cut_off.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let Some(h) = headers.and_then(Header::parse) else {
            self.reject(
                Some(from),
                Rejected::Malformed,
                "missing or malformed fedtune headers",
            );
            return None;
        };
        // Everything a header claims is checked before anything is kept.
        if h.len > self.bounds.max_frame || h.count > h.len.max(1) || payload.len() > h.len {
            self.reject(
                Some(from),
                Rejected::Malformed,
                "claimed size out of bounds",
            );
            return None;
        }
        let key = (subject.to_string(), h.msg.clone());
        if !self.partial.contains_key(&key) {
            self.make_room_for(from);
            self.partial.insert(
                key.clone(),
                Partial {
                    from,
                    parts: Default::default(),
                    count: h.count,
                    len: h.len,
                    sha: h.sha.clone(),
                    bytes: 0,
                    last_seen: Instant::now(),
                },
            );
            self.inflight += PARTIAL_OVERHEAD;
        }
        let entry = self.partial.get_mut(&key).expect("present");
        let disagrees = entry.count != h.count || entry.len != h.len || entry.sha != h.sha;
        let repeated = entry.parts.contains_key(&h.index);
        if disagrees || repeated || entry.bytes + payload.len() > entry.len {
            self.drop_partial(&key);
            let why = if disagrees {
                "parts of one message disagree"
            } else if repeated {
                "a part arrived twice"
            } else {
                "parts exceed the claimed length"
            };
            self.reject(Some(from), Rejected::Malformed, why);
            return None;
        }
        entry.last_seen = Instant::now();
        entry.bytes += payload.len();
        entry.parts.insert(h.index, payload.clone());
        self.inflight += payload.len() + PART_OVERHEAD;
        self.within_total(&key);
        let entry = self.partial.get(&key)?;
        if entry.parts.len() < entry.count {
            return None;
        }
        let done = self.drop_partial(&key)?;
        let mut frame = BytesMut::with_capacity(done.len);
        for part in done.parts.into_values() {
            frame.extend_from_slice(&part);
        }
        if frame.len() != done.len || hex(&Sha256::digest(&frame)) != done.sha {
            self.reject(Some(from), Rejected::Corrupt, "length or SHA-256 mismatch");
            return None;
        }
        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        Some(Delivery {
            from,
            frame: frame.freeze(),
        })
    }

    fn is_cut_off(&self, from: Party) -> bool {
        self.bounds.max_bad > 0
            && self
                .bad
                .get(&from)
                .is_some_and(|&n| n >= self.bounds.max_bad)
    }

    /// Removes a partial frame and gives back its memory.
    fn drop_partial(&mut self, key: &(String, String)) -> Option<Partial> {
        let p = self.partial.remove(key)?;
        self.inflight -= p.footprint();
        Some(p)
    }

    /// Evicts the least recently fed frames among `keys`' candidates.
    fn evict_oldest(&mut self, of: Option<Party>, keep: Option<&(String, String)>) -> bool {
        let oldest = self
            .partial
            .iter()
            .filter(|(k, p)| of.is_none_or(|f| p.from == f) && Some(*k) != keep)
            .min_by_key(|(_, p)| p.last_seen)
            .map(|(k, _)| k.clone());
        let Some(key) = oldest else {
            return false;
        };
        self.drop_partial(&key);
        let n = self.stats.evicted.fetch_add(1, Ordering::Relaxed) + 1;
        if fedtune_kernel::worker::worth_a_warning(n) {
            tracing::warn!(
                evicted = n,
                "a partly received NATS frame was evicted to stay within the memory bounds"
            );
        }
        true
    }

    /// Before a new frame of `from`: at most `max_partial` per sender.
    fn make_room_for(&mut self, from: Party) {
        while self.partial.values().filter(|p| p.from == from).count() >= self.bounds.max_partial {
            if !self.evict_oldest(Some(from), None) {
                break;
            }
        }
    }

    /// After a part of `key`: all frames together within `max_inflight`,
    /// evicting others first and `key` itself last.
    fn within_total(&mut self, key: &(String, String)) {
        while self.inflight > self.bounds.max_inflight {
            if !self.evict_oldest(None, Some(key)) {
                self.drop_partial(key);
                self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }

    /// Drops frames that stopped receiving parts.
    fn expire(&mut self) {
        let timeout = self.bounds.timeout;
        let stale: Vec<(String, String)> = self
            .partial
            .iter()
            .filter(|(_, p)| p.last_seen.elapsed() >= timeout)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &stale {
            self.drop_partial(key);
        }
        if !stale.is_empty() {
            let n = self
                .stats
                .incomplete
                .fetch_add(stale.len() as u64, Ordering::Relaxed)
                + stale.len() as u64;
            if fedtune_kernel::worker::worth_a_warning(n) {
                tracing::warn!(
                    incomplete = n,
                    "incomplete NATS frames dropped after {timeout:?}"
                );
            }
        }
    }

    /// Counts a rejected message against `from` (cutting it off past
    /// `max_bad`); warnings are rate-limited.
    fn reject(&mut self, from: Option<Party>, kind: Rejected, why: &str) {
        let counter = match kind {
            Rejected::UnknownSubject => &self.stats.unknown_subject,
            Rejected::Malformed => &self.stats.malformed,
            Rejected::Corrupt => &self.stats.corrupt,
        };
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(from) = from {
            let bad = self.bad.entry(from).or_insert(0);
            *bad += 1;
            if self.bounds.max_bad > 0 && *bad == self.bounds.max_bad {
                tracing::warn!(%from, "{} rejected NATS messages: cut off, its messages are dropped from now on", self.bounds.max_bad);
                self.partial.retain(|_, p| p.from != from);
                self.inflight = self.partial.values().map(Partial::footprint).sum();
            }
        }
        if fedtune_kernel::worker::worth_a_warning(n) {
            tracing::warn!(rejected = n, "NATS message rejected: {why}");
        }
    }
}

/// The fedtune headers of one part.
struct Header {
    msg: String,
    index: usize,
    count: usize,
    len: usize,
    sha: String,
}

impl Header {
    fn parse(h: &HeaderMap) -> Option<Self> {
        let get = |k: &str| h.get(k).map(|v| v.as_str().to_string());
        let (index, count) = get(H_PART)?
            .split_once('/')
            .and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)))?;
        let sha = get(H_SHA)?;
        let ok = index < count && sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit());
        ok.then_some(())?;
        Some(Self {
            msg: get(H_MSG)?,
            index,
            count,
            len: get(H_LEN)?.parse().ok()?,
            sha,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded xorshift stream.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    fn bounds() -> Bounds {
        Bounds {
            max_frame: 1 << 20,
            timeout: Duration::from_secs(600),
            max_partial: 2,
            max_inflight: 4 << 20,
            max_bad: 0,
        }
    }

    fn reassembler(b: Bounds) -> Reassembler {
        Reassembler::new(
            Subjects::new("c").unwrap(),
            b,
            Arc::new(NatsStats::default()),
        )
    }

    fn headers(msg: &str, part: &str, len: &str, sha: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(H_MSG, msg);
        h.insert(H_PART, part);
        h.insert(H_LEN, len);
        h.insert(H_SHA, sha);
        h
    }

    /// The parts a well-behaved sender would publish for `frame`.
    fn parts(msg: &str, frame: &[u8], chunk: usize) -> Vec<(HeaderMap, Bytes)> {
        let sha = hex(&Sha256::digest(frame));
        let count = frame.len().div_ceil(chunk).max(1);
        (0..count)
            .map(|i| {
                let body = &frame[(i * chunk).min(frame.len())..((i + 1) * chunk).min(frame.len())];
                (
                    headers(msg, &format!("{i}/{count}"), &frame.len().to_string(), &sha),
                    Bytes::copy_from_slice(body),
                )
            })
            .collect()
    }

    /// The bookkeeping matches what is held.
    fn consistent(r: &Reassembler) {
        let held: usize = r.partial.values().map(Partial::footprint).sum();
        assert_eq!(r.inflight(), held);
        assert!(
            r.inflight() <= r.bounds.max_inflight,
            "{} held",
            r.inflight()
        );
    }

    #[test]
    fn one_tiny_message_claiming_a_huge_frame_costs_only_its_bytes() {
        // The reproduction of the report: 1 byte announcing 2^30 parts of a 2^30-byte frame.
        let mut r = reassembler(Bounds {
            max_frame: 1 << 30,
            ..bounds()
        });
        let sha = "0".repeat(64);
        let h = headers("m", "0/1073741824", "1073741824", &sha);
        assert!(r
            .accept("fedtune.c.server.1", Some(&h), Bytes::from_static(b"x"))
            .is_none());
        assert!(r.inflight() < 1024, "{} bytes held", r.inflight());
        consistent(&r);
        // Past max_frame it is refused outright.
        let h = headers("n", "0/2", &(1u64 << 31).to_string(), &sha);
        assert!(r
            .accept("fedtune.c.server.1", Some(&h), Bytes::from_static(b"x"))
            .is_none());
        assert_eq!(r.partial.len(), 1);
    }

    #[test]
    fn random_garbage_stays_within_the_memory_bounds_and_good_frames_still_arrive() {
        let mut rng = Rng(0x5eed_f00d);
        let mut r = reassembler(bounds());
        let subjects = Subjects::new("c").unwrap();
        let mut delivered = 0;
        for round in 0..400u64 {
            // A well-behaved client 1 sends a whole frame, its parts shuffled.
            let len = rng.below(300_000) as usize;
            let frame: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let mut good = parts(&format!("good-{round}"), &frame, 64 << 10);
            for i in (1..good.len()).rev() {
                good.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let from1 = subjects.subject(Route::ToServerFrom(1));
            let mut got = None;
            for (h, body) in good {
                // Attackers 2..=4 interleave garbage between the good parts.
                for _ in 0..rng.below(6) {
                    let who = 2 + rng.below(3) as u32;
                    let subject = subjects.subject(Route::ToServerFrom(who));
                    let claimed = rng.below(1 << 21) + 1;
                    let count = match rng.below(3) {
                        0 => claimed,
                        1 => 1 + rng.below(64),
                        _ => u64::MAX / 2,
                    };
                    let index = rng.below(count.min(1 << 20));
                    let sha = if rng.below(2) == 0 {
                        "a".repeat(64)
                    } else {
                        "zz".into()
                    };
                    let msg = format!("bad-{}", rng.below(50));
                    let h = headers(
                        &msg,
                        &format!("{index}/{count}"),
                        &claimed.to_string(),
                        &sha,
                    );
                    let body = Bytes::from(vec![7u8; rng.below(70_000) as usize]);
                    assert!(r.accept(&subject, Some(&h), body).is_none());
                    consistent(&r);
                }
                if let Some(d) = r.accept(&from1, Some(&h), body) {
                    got = Some(d);
                }
                consistent(&r);
            }
            let d = got.expect("the good frame completes");
            assert_eq!(d.from, Party::Client(1));
            assert_eq!(&d.frame[..], &frame[..]);
            delivered += 1;
        }
        assert_eq!(delivered, 400);
        assert!(r.stats.rejected() > 0);
    }

    #[test]
    fn a_sender_that_keeps_sending_garbage_is_cut_off() {
        let mut r = reassembler(Bounds {
            max_bad: 5,
            ..bounds()
        });
        let subject = "fedtune.c.server.3";
        for _ in 0..20 {
            r.accept(subject, None, Bytes::from_static(b"junk"));
        }
        assert_eq!(r.stats.malformed.load(Ordering::Relaxed), 5);
        assert_eq!(r.stats.cut_off.load(Ordering::Relaxed), 15);
        // Another sender is not affected.
        let frame = b"hello".to_vec();
        let (h, body) = parts("ok", &frame, 1024).remove(0);
        let d = r.accept("fedtune.c.server.1", Some(&h), body).unwrap();
        assert_eq!(&d.frame[..], b"hello");
    }

    #[test]
    fn repeated_or_overlong_parts_drop_their_frame() {
        let mut r = reassembler(bounds());
        let frame = vec![1u8; 3000];
        let ps = parts("m", &frame, 1000);
        assert!(r
            .accept("fedtune.c.server.1", Some(&ps[0].0), ps[0].1.clone())
            .is_none());
        assert!(r
            .accept("fedtune.c.server.1", Some(&ps[0].0), ps[0].1.clone())
            .is_none());
        assert!(r.partial.is_empty(), "a repeated part drops the frame");
        // Parts adding up to more than the claimed length.
        let (h, _) = &ps[1];
        assert!(r
            .accept("fedtune.c.server.1", Some(h), Bytes::from(vec![0u8; 2000]))
            .is_none());
        assert!(r
            .accept(
                "fedtune.c.server.1",
                Some(&ps[2].0),
                Bytes::from(vec![0u8; 1500])
            )
            .is_none());
        assert!(r.partial.is_empty(), "overlong parts drop the frame");
        consistent(&r);
    }
}
