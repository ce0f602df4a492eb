//! How frames travel between workers: the [`Transport`] port and the in-process bus.
//!
//! A transport moves encoded frames ([`bytes::Bytes`]) between parties; it
//! neither encodes nor interprets them. Separating the two keeps every path —
//! in-process simulation or NATS between machines — on the same codec, so
//! bytes-on-the-wire figures are real in simulation too, and a transport only
//! has to get addressing and identity right.
//!
//! Identity belongs to the transport: each [`Delivery`] says who sent it as the
//! transport knows it (over NATS, from the subject a message arrived on, never
//! from its payload), and the worker rejects an envelope that claims otherwise.
//!
//! [`InProcTransport`] is the embedded default: one unbounded tokio channel per
//! subscribed party. Unbounded, because FL traffic is a handful of messages per
//! round and a bounded queue would let two workers block each other while each
//! waits to send.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use thiserror::Error;
use tokio::sync::mpsc;

use crate::message::Party;

/// Errors a transport reports.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum TransportError {
    /// Nobody is subscribed as this party.
    #[error("{0} is not reachable (not subscribed, or gone)")]
    Unreachable(Party),
    /// This party already has a subscription.
    #[error("{0} is already subscribed")]
    AlreadySubscribed(Party),
    /// The transport is closed.
    #[error("transport closed")]
    Closed,
    /// Any other failure of the underlying medium.
    #[error("transport failure: {0}")]
    Other(String),
}

/// One frame as delivered to a subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The sender, as established by the transport.
    pub from: Party,
    /// The encoded frame.
    pub frame: Bytes,
}

/// The stream of frames addressed to one party.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::UnboundedReceiver<Delivery>,
}

impl Subscription {
    /// Wraps a channel; transports feed the sending half.
    pub fn new(rx: mpsc::UnboundedReceiver<Delivery>) -> Self {
        Self { rx }
    }

    /// The next frame, or `None` once the transport has closed this subscription.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }
}

/// Moves frames between parties of one course.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Sends one frame from `from` to `to`.
    async fn send(&self, from: Party, to: Party, frame: Bytes) -> Result<(), TransportError>;

    /// Starts receiving the frames addressed to `me`.
    async fn subscribe(&self, me: Party) -> Result<Subscription, TransportError>;
}

/// The embedded transport: tokio channels inside one process.
#[derive(Debug, Clone, Default)]
pub struct InProcTransport {
    inboxes: Arc<Mutex<HashMap<Party, mpsc::UnboundedSender<Delivery>>>>,
}

impl InProcTransport {
    /// A bus with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops a party's inbox, as if it left; later sends to it fail as unreachable.
    pub fn disconnect(&self, party: Party) {
        self.lock().remove(&party);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Party, mpsc::UnboundedSender<Delivery>>> {
        // The map is never left half-updated, so a poisoned lock is still usable.
        self.inboxes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Transport for InProcTransport {
    async fn send(&self, from: Party, to: Party, frame: Bytes) -> Result<(), TransportError> {
        let inboxes = self.lock();
        let inbox = inboxes.get(&to).ok_or(TransportError::Unreachable(to))?;
        inbox
            .send(Delivery { from, frame })
            .map_err(|_| TransportError::Unreachable(to))
    }

    async fn subscribe(&self, me: Party) -> Result<Subscription, TransportError> {
        let mut inboxes = self.lock();
        if inboxes.get(&me).is_some_and(|tx| !tx.is_closed()) {
            return Err(TransportError::AlreadySubscribed(me));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        inboxes.insert(me, tx);
        Ok(Subscription::new(rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_reach_the_addressed_party_with_the_sender() {
        let bus = InProcTransport::new();
        let mut server = bus.subscribe(Party::Server).await.unwrap();
        let mut client = bus.subscribe(Party::Client(1)).await.unwrap();
        bus.send(Party::Client(1), Party::Server, Bytes::from_static(b"up"))
            .await
            .unwrap();
        bus.send(Party::Server, Party::Client(1), Bytes::from_static(b"down"))
            .await
            .unwrap();
        let d = server.recv().await.unwrap();
        assert_eq!((d.from, &d.frame[..]), (Party::Client(1), &b"up"[..]));
        let d = client.recv().await.unwrap();
        assert_eq!((d.from, &d.frame[..]), (Party::Server, &b"down"[..]));
    }

    #[tokio::test]
    async fn unknown_and_departed_parties_are_unreachable() {
        let bus = InProcTransport::new();
        let err = bus
            .send(Party::Server, Party::Client(9), Bytes::new())
            .await
            .unwrap_err();
        assert_eq!(err, TransportError::Unreachable(Party::Client(9)));
        let sub = bus.subscribe(Party::Client(1)).await.unwrap();
        assert_eq!(
            bus.subscribe(Party::Client(1)).await.unwrap_err(),
            TransportError::AlreadySubscribed(Party::Client(1))
        );
        drop(sub);
        assert!(bus
            .send(Party::Server, Party::Client(1), Bytes::new())
            .await
            .is_err());
        // A party that left may subscribe again.
        let _again = bus.subscribe(Party::Client(1)).await.unwrap();
        bus.disconnect(Party::Client(1));
        assert!(bus
            .send(Party::Server, Party::Client(1), Bytes::new())
            .await
            .is_err());
    }
}
