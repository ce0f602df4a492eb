//! The NATS transport against a real nats-server (started per test on a free
//! loopback port; tests/run.sh installs the Debian package when missing).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use fedtune_broker::{LocalNats, NatsOptions, NatsTransport};
use fedtune_kernel::course::{
    run_in_process, run_on, CourseReport, LeastSquaresTrainer, ServerSetup, SyntheticSpec,
    Transports,
};
use fedtune_kernel::{CourseConfig, FedAvg, MetricsLog, Party, Transport};

fn server() -> LocalNats {
    LocalNats::start(None).expect("nats-server starts (tests/run.sh installs it)")
}

async fn connect(nats: &LocalNats, name: &str) -> NatsTransport {
    let options = NatsOptions {
        name: name.to_string(),
        ..NatsOptions::default()
    };
    NatsTransport::connect(&nats.url(), "course-1", options)
        .await
        .unwrap()
}

fn frame(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_of_any_size_arrive_whole_with_the_sender_from_the_subject() {
    let nats = server();
    let srv = connect(&nats, "server").await;
    let c1 = connect(&nats, "client-1").await;
    let c2 = connect(&nats, "client-2").await;
    // The default server's max_payload is 1 MiB: bigger frames travel in parts.
    assert!(c1.chunk_bytes() < 1 << 20);
    let mut inbox = srv.subscribe(Party::Server).await.unwrap();
    let mut to_c2 = c2.subscribe(Party::Client(2)).await.unwrap();

    let sizes = [
        0usize,
        1,
        1000,
        c1.chunk_bytes(),
        c1.chunk_bytes() + 1,
        64 << 20,
    ];
    for (i, &n) in sizes.iter().enumerate() {
        let f = frame(n, i as u64);
        c1.send(Party::Client(1), Party::Server, f.clone())
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(30), inbox.recv())
            .await
            .expect("delivered in time")
            .unwrap();
        assert_eq!(got.from, Party::Client(1));
        assert!(got.frame == f, "frame of {n} bytes changed in transit");
    }
    let f = frame(3 << 20, 99);
    srv.send(Party::Server, Party::Client(2), f.clone())
        .await
        .unwrap();
    let got = to_c2.recv().await.unwrap();
    assert_eq!(got.from, Party::Server);
    assert!(got.frame == f);
    assert_eq!(srv.stats().rejected(), 0);
    assert_eq!(
        srv.stats().delivered.load(Ordering::Relaxed),
        sizes.len() as u64
    );
    // Clients talk only to the server.
    assert!(c1
        .send(Party::Client(1), Party::Client(2), Bytes::new())
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_or_foreign_messages_are_counted_and_never_delivered() {
    let nats = server();
    let srv = connect(&nats, "server").await;
    let raw = async_nats::connect(nats.url()).await.unwrap();
    let mut inbox = srv.subscribe(Party::Server).await.unwrap();
    let subject = "fedtune.course-1.server.1";
    let good_sha = "0".repeat(64);

    // No headers at all.
    raw.publish(subject, Bytes::from_static(b"hello"))
        .await
        .unwrap();
    // Headers whose digest does not match the payload.
    let mut h = HeaderMap::new();
    h.insert("Fedtune-Msg", "m1");
    h.insert("Fedtune-Part", "0/1");
    h.insert("Fedtune-Len", "5");
    h.insert("Fedtune-Sha256", good_sha.as_str());
    raw.publish_with_headers(subject, h, Bytes::from_static(b"hello"))
        .await
        .unwrap();
    // A length that the parts do not add up to.
    let mut h = HeaderMap::new();
    h.insert("Fedtune-Msg", "m2");
    h.insert("Fedtune-Part", "0/1");
    h.insert("Fedtune-Len", "6");
    h.insert(
        "Fedtune-Sha256",
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
    );
    raw.publish_with_headers(subject, h, Bytes::from_static(b"hello"))
        .await
        .unwrap();
    // A part index past the count.
    let mut h = HeaderMap::new();
    h.insert("Fedtune-Msg", "m3");
    h.insert("Fedtune-Part", "1/1");
    h.insert("Fedtune-Len", "5");
    h.insert("Fedtune-Sha256", good_sha.as_str());
    raw.publish_with_headers(subject, h, Bytes::from_static(b"hello"))
        .await
        .unwrap();
    // A sender id that is not canonical.
    raw.publish("fedtune.course-1.server.01", Bytes::from_static(b"x"))
        .await
        .unwrap();
    raw.flush().await.unwrap();

    // A good frame after all that still arrives, and is the only delivery.
    let client = connect(&nats, "client-3").await;
    client
        .send(Party::Client(3), Party::Server, Bytes::from_static(b"ok"))
        .await
        .unwrap();
    let got = inbox.recv().await.unwrap();
    assert_eq!((got.from, &got.frame[..]), (Party::Client(3), &b"ok"[..]));
    let stats = srv.stats();
    assert_eq!(
        stats.malformed.load(Ordering::Relaxed),
        2,
        "no headers; bad part index"
    );
    assert_eq!(
        stats.corrupt.load(Ordering::Relaxed),
        2,
        "bad digest; bad length"
    );
    assert_eq!(stats.unknown_subject.load(Ordering::Relaxed), 1);
    assert_eq!(stats.delivered.load(Ordering::Relaxed), 1);
}

/// The least-squares course of `cfg` (`clients` clients, synthetic data)
/// in one process and over `nats` with one connection per party, as
/// separate processes would have: (in process, over NATS).
async fn in_process_and_over_nats(
    nats: &LocalNats,
    cfg: &CourseConfig,
    clients: u32,
) -> (CourseReport, CourseReport) {
    let spec = SyntheticSpec {
        clients,
        ..SyntheticSpec::default()
    };
    let trainer = || Arc::new(Mutex::new(LeastSquaresTrainer::synthetic(spec, 0.1, 5)));
    let initial = trainer().lock().unwrap().initial_params();
    let local = run_in_process(
        cfg,
        initial.clone(),
        trainer(),
        Box::new(FedAvg),
        MetricsLog::in_memory(),
    )
    .await
    .unwrap();
    let server_t: Arc<dyn Transport> = Arc::new(connect(nats, "server").await);
    let mut transports: BTreeMap<u32, Arc<dyn Transport>> = BTreeMap::new();
    for id in 1..=clients {
        transports.insert(id, Arc::new(connect(nats, &format!("client-{id}")).await));
    }
    let remote = run_on(
        ServerSetup::new(
            cfg.clone(),
            initial,
            Box::new(FedAvg),
            MetricsLog::in_memory(),
        ),
        trainer(),
        Transports {
            server: server_t,
            clients: transports,
        },
    )
    .await
    .unwrap();
    (local, remote)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_course_over_nats_ends_where_the_in_process_course_ends() {
    let nats = server();
    let cfg = CourseConfig::from_toml(
        "[federate]\nname = \"course-1\"\nrounds = 3\nclients = 3\nseed = 7\n",
        "<test>",
    )
    .unwrap();
    let (local, remote) = in_process_and_over_nats(&nats, &cfg, 3).await;
    assert_eq!(remote.final_params, local.final_params);
    // Evaluation means are summed in arrival order, which NATS does not fix:
    // equal up to rounding.
    let (a, b) = (remote.loss_curve("test"), local.loss_curve("test"));
    assert_eq!(a.len(), b.len());
    for ((ra, la), (rb, lb)) in a.iter().zip(&b) {
        assert_eq!(ra, rb);
        assert!(
            (la - lb).abs() <= 1e-12 * lb.abs(),
            "round {ra}: {la} vs {lb}"
        );
    }
}

/// A broker started from `fedtune broker config`'s files.
fn secured(dir: &std::path::Path, clients: u32) -> (LocalNats, fedtune_broker::auth::BrokerFiles) {
    let files =
        fedtune_broker::auth::write_config("course-1", clients, ("127.0.0.1", 4222), dir).unwrap();
    let nats = LocalNats::start(Some(&files.config)).expect("nats-server starts with the config");
    (nats, files)
}

async fn login(nats: &LocalNats, creds: Option<&std::path::Path>) -> Result<NatsTransport, String> {
    let options = NatsOptions {
        credentials: creds.map(|p| fedtune_broker::auth::Credentials::load(p).unwrap()),
        ..NatsOptions::default()
    };
    NatsTransport::connect(&nats.url(), "course-1", options)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_can_neither_read_another_clients_messages_nor_post_as_it() {
    let dir = tempfile::tempdir().unwrap();
    let (nats, files) = secured(dir.path(), 2);
    let srv = login(&nats, Some(&files.server)).await.unwrap();
    let c1 = login(&nats, Some(&files.clients[0])).await.unwrap();
    let c2 = login(&nats, Some(&files.clients[1])).await.unwrap();
    let mut inbox = srv.subscribe(Party::Server).await.unwrap();
    let mut c2_inbox = c2.subscribe(Party::Client(2)).await.unwrap();
    // Client 1 tries to listen to client 2's subject, and to post as client 2.
    let mut snoop = c1.subscribe(Party::Client(2)).await.unwrap();
    c1.send(
        Party::Client(2),
        Party::Server,
        Bytes::from_static(b"forged"),
    )
    .await
    .unwrap();
    // What is allowed still flows.
    c1.send(Party::Client(1), Party::Server, Bytes::from_static(b"mine"))
        .await
        .unwrap();
    srv.send(
        Party::Server,
        Party::Client(2),
        Bytes::from_static(b"for 2"),
    )
    .await
    .unwrap();
    let got = inbox.recv().await.unwrap();
    assert_eq!((got.from, &got.frame[..]), (Party::Client(1), &b"mine"[..]));
    let got = c2_inbox.recv().await.unwrap();
    assert_eq!(&got.frame[..], b"for 2");
    let quiet = Duration::from_millis(500);
    assert!(
        tokio::time::timeout(quiet, inbox.recv()).await.is_err(),
        "the forged message reached the server"
    );
    assert!(
        tokio::time::timeout(quiet, snoop.recv()).await.is_err(),
        "client 1 read client 2's message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_valid_credentials_nobody_connects() {
    let dir = tempfile::tempdir().unwrap();
    let (nats, files) = secured(dir.path(), 1);
    let err = login(&nats, None).await.unwrap_err();
    assert!(err.contains("cannot connect to NATS"), "{err}");
    assert!(err.to_lowercase().contains("authoriz"), "{err}");
    let wrong = dir.path().join("wrong.json");
    let mut c = fedtune_broker::auth::Credentials::load(&files.clients[0]).unwrap();
    c.password.push('x');
    std::fs::write(&wrong, serde_json::to_string(&c).unwrap()).unwrap();
    let err = login(&nats, Some(&wrong)).await.unwrap_err();
    assert!(err.to_lowercase().contains("authoriz"), "{err}");
    assert!(login(&nats, Some(&files.clients[0])).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_aggregation_over_nats_sums_exactly_and_a_spy_on_the_server_sees_no_update() {
    use fedtune_kernel::course::protocol::secagg as sa;
    use fedtune_kernel::{decode, DecodeLimits};

    let nats = server();
    let cfg = CourseConfig::from_toml(
        "[federate]\nname = \"course-1\"\nrounds = 2\nclients = 4\nseed = 3\n[privacy]\nsecure_aggregation = true\n",
        "<test>",
    )
    .unwrap();
    // A spy with its own connection, listening on the server's subject.
    let spy_t = connect(&nats, "spy").await;
    let mut spy = spy_t.subscribe(Party::Server).await.unwrap();
    let (local, remote) = in_process_and_over_nats(&nats, &cfg, 4).await;
    // Ring sums do not depend on the order NATS delivers in: exact.
    assert_eq!(remote.final_params, local.final_params);
    let mut masked = 0;
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), spy.recv()).await {
        let env = decode(&d.frame, &DecodeLimits::default()).unwrap();
        assert!(env.payload.is_none(), "{} carried parameters", env.kind);
        masked += usize::from(env.kind.as_str() == sa::MASKED);
    }
    assert_eq!(masked, 2 * 4, "every masked update passed the spy");
}

/// `subscribe` returns once the broker has registered the subscription:
/// a message another, already connected party publishes right after it
/// returns is delivered (flushing the SUB to the socket is not enough; the
/// other connection's message can overtake it inside the broker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_the_moment_subscribe_returns_is_delivered() {
    let nats = server();
    let client = connect(&nats, "client-1").await;
    let mut lost = 0;
    for i in 0..=255u8 {
        let srv = connect(&nats, "server").await;
        let mut inbox = srv.subscribe(Party::Server).await.unwrap();
        client
            .send(Party::Client(1), Party::Server, Bytes::from(vec![i]))
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(2), inbox.recv()).await {
            Ok(Some(got)) => assert_eq!(&got.frame[..], &[i]),
            _ => lost += 1,
        }
    }
    assert_eq!(
        lost, 0,
        "messages sent right after subscribe returned were lost"
    );
}

/// A broker config written before probes existed refuses the probe subject:
/// subscribing still works (after the probe's wait, with a warning) and the
/// refused probe is not taken for a party out of bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_config_without_probe_permissions_still_carries_a_course() {
    let dir = tempfile::tempdir().unwrap();
    let files =
        fedtune_broker::auth::write_config("course-1", 1, ("127.0.0.1", 4222), dir.path()).unwrap();
    let text = std::fs::read_to_string(&files.config).unwrap();
    let old = text
        .replace(", \"fedtune.course-1.probe.server\"", "")
        .replace(", \"fedtune.course-1.probe.1\"", "");
    assert!(!old.contains("probe") && text.contains("probe"));
    std::fs::write(&files.config, old).unwrap();
    let nats = LocalNats::start(Some(&files.config)).expect("nats-server starts with the config");
    let srv = login(&nats, Some(&files.server)).await.unwrap();
    let c1 = login(&nats, Some(&files.clients[0])).await.unwrap();
    let mut inbox = srv.subscribe(Party::Server).await.unwrap();
    let mut to_c1 = c1.subscribe(Party::Client(1)).await.unwrap();
    c1.send(Party::Client(1), Party::Server, Bytes::from_static(b"up"))
        .await
        .unwrap();
    srv.send(Party::Server, Party::Client(1), Bytes::from_static(b"down"))
        .await
        .unwrap();
    assert_eq!(&inbox.recv().await.unwrap().frame[..], b"up");
    assert_eq!(&to_c1.recv().await.unwrap().frame[..], b"down");
    assert_eq!(*srv.refusals().borrow(), None);
    assert_eq!(*c1.refusals().borrow(), None);
}
