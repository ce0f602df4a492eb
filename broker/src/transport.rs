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
    /// User and password, when the server requires them (see [`crate::auth`]).
    pub credentials: Option<Credentials>,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            name: "fedtune".to_string(),
            chunk_bytes: None,
            max_frame_bytes: 1 << 30,
            reassembly_timeout: Duration::from_secs(120),
            credentials: None,
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
}

impl NatsStats {
    /// Frames rejected for any reason.
    pub fn rejected(&self) -> u64 {
        self.unknown_subject.load(Ordering::Relaxed)
            + self.malformed.load(Ordering::Relaxed)
            + self.corrupt.load(Ordering::Relaxed)
            + self.incomplete.load(Ordering::Relaxed)
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
        // The broker refuses a publish or subscription outside the user's
        // permissions with an asynchronous error, not on the call: keep it.
        let (refused_tx, refusals) = watch::channel(None);
        let refused_tx = Arc::new(refused_tx);
        connect = connect.event_callback(move |event| {
            let refused_tx = refused_tx.clone();
            async move {
                match event {
                    async_nats::Event::ServerError(async_nats::ServerError::Other(m))
                        if m.to_ascii_lowercase().contains("permissions violation") =>
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
                self.options.max_frame_bytes,
                self.options.reassembly_timeout,
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
        // The server has registered the subscriptions once it answers a ping:
        // nothing sent after this returns can miss them.
        self.client
            .flush()
            .await
            .map_err(|e| TransportError::Other(format!("subscribing: {e}")))?;
        Ok(Subscription::new(rx))
    }
}

/// A frame being put together.
struct Partial {
    parts: Vec<Option<Bytes>>,
    received: usize,
    len: usize,
    sha: String,
    last_seen: Instant,
}

/// Puts frames back together from their parts, checking them.
struct Reassembler {
    subjects: Subjects,
    max_frame: usize,
    timeout: Duration,
    stats: Arc<NatsStats>,
    partial: HashMap<(String, String), Partial>,
}

impl Reassembler {
    fn new(subjects: Subjects, max_frame: usize, timeout: Duration, stats: Arc<NatsStats>) -> Self {
        Self {
            subjects,
            max_frame,
            timeout,
            stats,
            partial: HashMap::new(),
        }
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
                &self.stats.unknown_subject,
                subject,
                "not a subject of this course",
            );
            return None;
        };
        let Some(h) = headers.and_then(Header::parse) else {
            self.reject(
                &self.stats.malformed,
                subject,
                "missing or malformed fedtune headers",
            );
            return None;
        };
        if h.len > self.max_frame || h.count > h.len.max(1) {
            self.reject(&self.stats.malformed, subject, "claimed size out of bounds");
            return None;
        }
        let key = (subject.to_string(), h.msg.clone());
        let entry = self.partial.entry(key.clone()).or_insert_with(|| Partial {
            parts: vec![None; h.count],
            received: 0,
            len: h.len,
            sha: h.sha.clone(),
            last_seen: Instant::now(),
        });
        if entry.parts.len() != h.count || entry.len != h.len || entry.sha != h.sha {
            self.partial.remove(&key);
            self.reject(
                &self.stats.malformed,
                subject,
                "parts of one message disagree",
            );
            return None;
        }
        entry.last_seen = Instant::now();
        if entry.parts[h.index].replace(payload).is_none() {
            entry.received += 1;
        }
        if entry.received < entry.parts.len() {
            return None;
        }
        let done = self.partial.remove(&key).expect("present");
        let mut frame = BytesMut::with_capacity(done.len);
        for part in done.parts.into_iter().flatten() {
            frame.extend_from_slice(&part);
        }
        if frame.len() != done.len || hex(&Sha256::digest(&frame)) != done.sha {
            self.reject(&self.stats.corrupt, subject, "length or SHA-256 mismatch");
            return None;
        }
        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        Some(Delivery {
            from,
            frame: frame.freeze(),
        })
    }

    /// Drops frames that stopped receiving parts.
    fn expire(&mut self) {
        let timeout = self.timeout;
        let before = self.partial.len();
        self.partial.retain(|_, p| p.last_seen.elapsed() < timeout);
        let dropped = before - self.partial.len();
        if dropped > 0 {
            self.stats
                .incomplete
                .fetch_add(dropped as u64, Ordering::Relaxed);
            tracing::warn!(dropped, "incomplete NATS frames dropped after {timeout:?}");
        }
    }

    fn reject(&self, counter: &AtomicU64, subject: &str, why: &str) {
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(subject, "NATS message rejected: {why}");
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
