//! Secure aggregation in whole courses (the least-squares trainer, one
//! process, each party on its own view of the bus): the server's result is
//! plain FedAvg's, what reaches the server's inbox reveals no client's
//! update, and clients that die mid-round are recovered from.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use fedtune_kernel::course::protocol::secagg as sa;
use fedtune_kernel::course::{
    run_on, CourseReport, LeastSquaresTrainer, ServerSetup, SyntheticSpec, Transports,
};
use fedtune_kernel::privacy::secagg as ring;
use fedtune_kernel::{
    decode, CourseConfig, DecodeLimits, Envelope, Event, FedAvg, InProcTransport, MetricsLog,
    MsgKind, Party, Subscription, Transport, TransportError,
};
use tokio::sync::mpsc;

const CLIENTS: u32 = 5;

fn config(extra: &str) -> CourseConfig {
    let text = format!(
        "[federate]\nrounds = 3\nclients = {CLIENTS}\nseed = 11\nround_timeout_s = 1.5\n{extra}"
    );
    CourseConfig::from_toml(&text, "<test>").unwrap()
}

/// One round, which goes on with whoever answered in time.
fn one_round(extra: &str) -> CourseConfig {
    let mut c = config(extra);
    c.course.rounds = 1;
    c.course.min_clients = 1;
    c
}

const SECAGG: &str = "[privacy]\nsecure_aggregation = true\n";

/// Everything delivered to the server, decoded.
#[derive(Clone, Default)]
struct Spy(Arc<Mutex<Vec<Envelope>>>);

/// A view of the bus: a spy on what the server receives, or a client that
/// dies (sends nothing more) after — or instead of — its first message of a kind.
struct View {
    bus: Arc<InProcTransport>,
    spy: Option<Spy>,
    dies_at: Option<(String, bool)>,
    dead: AtomicBool,
}

impl View {
    fn new(bus: &Arc<InProcTransport>) -> Self {
        Self {
            bus: bus.clone(),
            spy: None,
            dies_at: None,
            dead: AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl Transport for View {
    async fn send(&self, from: Party, to: Party, frame: Bytes) -> Result<(), TransportError> {
        if self.dead.load(Ordering::SeqCst) {
            return Ok(());
        }
        if let Some((kind, sends_it)) = &self.dies_at {
            let env = decode(&frame, &DecodeLimits::default()).unwrap();
            if env.kind.as_str() == kind {
                self.dead.store(true, Ordering::SeqCst);
                if !sends_it {
                    return Ok(());
                }
            }
        }
        self.bus.send(from, to, frame).await
    }

    async fn subscribe(&self, me: Party) -> Result<Subscription, TransportError> {
        let mut inner = self.bus.subscribe(me).await?;
        let Some(spy) = self.spy.clone() else {
            return Ok(inner);
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(d) = inner.recv().await {
                if let Ok(env) = decode(&d.frame, &DecodeLimits::default()) {
                    spy.0.lock().unwrap().push(env);
                }
                if tx.send(d).is_err() {
                    break;
                }
            }
        });
        Ok(Subscription::new(rx))
    }
}

fn trainer() -> LeastSquaresTrainer {
    // Uneven data (37 rows a client) and 150 weights: enough ring
    // elements for the spy's statistics.
    let spec = SyntheticSpec {
        clients: CLIENTS,
        dim: 150,
        samples_per_client: 37,
        heterogeneity: 0.3,
        ..SyntheticSpec::default()
    };
    LeastSquaresTrainer::synthetic(spec, 0.1, 5)
}

/// Runs `cfg`; `spy` watches the server's inbox, client `dies.0` dies at `dies.1`.
async fn run(
    cfg: &CourseConfig,
    spy: Option<Spy>,
    dies: Option<(u32, &str, bool)>,
) -> CourseReport {
    let bus = Arc::new(InProcTransport::new());
    let t = trainer();
    let setup = ServerSetup::new(
        cfg.clone(),
        t.initial_params(),
        Box::new(FedAvg),
        MetricsLog::in_memory(),
    );
    let mut server = View::new(&bus);
    server.spy = spy;
    let clients: BTreeMap<u32, Arc<dyn Transport>> = (1..=CLIENTS)
        .map(|id| {
            let mut v = View::new(&bus);
            if let Some((who, kind, sends_it)) = dies {
                if who == id {
                    v.dies_at = Some((kind.to_string(), sends_it));
                }
            }
            (id, Arc::new(v) as Arc<dyn Transport>)
        })
        .collect();
    let transports = Transports {
        server: Arc::new(server),
        clients,
    };
    run_on(setup, Arc::new(Mutex::new(t)), transports)
        .await
        .unwrap()
}

/// A one-round course's round record.
fn round_record(r: &CourseReport) -> &fedtune_kernel::Record {
    r.records.iter().find(|r| r.event == Event::Round).unwrap()
}

fn assert_close(a: &CourseReport, b: &CourseReport, tol: f32) {
    for ((name, x), (_, y)) in a.final_params.iter().zip(b.final_params.iter()) {
        for (u, v) in x.data().iter().zip(y.data()) {
            assert!((u - v).abs() <= tol, "{name}: {u} vs {v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_gets_fedavgs_result_and_sees_only_uniform_ring_elements() {
    let plain = run(&config(""), None, None).await;
    let spy = Spy::default();
    let secure = run(&config(SECAGG), Some(spy.clone()), None).await;
    // The sum is FedAvg's, within the fixed point's rounding (2⁻²⁴ of a
    // sample-weighted unit: here below f32's own).
    assert_close(&secure, &plain, 1e-5);
    let rounds: Vec<_> = secure
        .records
        .iter()
        .filter(|r| r.event == Event::Round)
        .collect();
    assert_eq!(rounds.len(), 3);
    for r in &rounds {
        assert_eq!(r.extra["clients"], f64::from(CLIENTS));
        assert!(r.extra["secagg_overhead_bytes"] > 0.0);
    }
    // The learning went on: the test loss fell.
    let curve = secure.loss_curve("test");
    assert!(curve.last().unwrap().1 < 0.5 * curve[0].1, "{curve:?}");

    // What the server saw: no client parameters, and masked updates whose
    // 64-bit elements look uniform, though the updates are small numbers
    // (their plain fixed-point words have all-0 or all-1 top bytes).
    let seen = spy.0.lock().unwrap().clone();
    let from_clients: Vec<&Envelope> = seen.iter().filter(|e| e.from != Party::Server).collect();
    assert!(
        from_clients.iter().all(|e| e.payload.is_none()),
        "no parameters went up"
    );
    assert!(!from_clients.iter().any(|e| e.kind == MsgKind::Update));
    let masked: Vec<&Envelope> = from_clients
        .iter()
        .copied()
        .filter(|e| e.kind.as_str() == sa::MASKED)
        .collect();
    assert_eq!(masked.len(), 3 * CLIENTS as usize);
    let words: Vec<u64> = masked
        .iter()
        .flat_map(|e| {
            let b = e.blob.as_ref().unwrap();
            ring::from_bytes(b, b.len() / 8).unwrap()
        })
        .collect();
    // Chi-square of the top bytes over 256 cells (255 degrees of freedom):
    // uniform data stays far under 400 (p ≈ 1e-8); the plain encodings
    // would put nearly everything in two cells.
    let mut cells = [0f64; 256];
    for w in &words {
        cells[(w >> 56) as usize] += 1.0;
    }
    let expect = words.len() as f64 / 256.0;
    let chi2: f64 = cells.iter().map(|c| (c - expect).powi(2) / expect).sum();
    assert!(
        words.len() > 2000 && chi2 < 400.0,
        "chi2 {chi2} over {} words",
        words.len()
    );
    // The same client's two masked updates are unrelated (fresh masks each round).
    let of = |client: u32| -> Vec<Vec<u64>> {
        masked
            .iter()
            .filter(|e| e.from == Party::Client(client))
            .map(|e| {
                ring::from_bytes(e.blob.as_ref().unwrap(), e.blob.as_ref().unwrap().len() / 8)
                    .unwrap()
            })
            .collect()
    };
    let ups = of(1);
    let equal_top = ups[0]
        .iter()
        .zip(&ups[1])
        .filter(|(a, b)| (*a >> 56) == (*b >> 56))
        .count();
    assert!(
        equal_top * 20 < ups[0].len(),
        "{equal_top} of {}",
        ups[0].len()
    );
    // The sealed shares the server relays are ciphertexts of fixed size.
    let sealed: Vec<sa::Shares> = from_clients
        .iter()
        .filter(|e| e.kind.as_str() == sa::SHARES)
        .map(|e| e.body().unwrap())
        .collect();
    assert_eq!(sealed.len(), 3 * CLIENTS as usize);
    assert!(sealed
        .iter()
        .all(|s| s.sealed.len() == CLIENTS as usize - 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_after_its_masked_update_is_recovered_and_counted() {
    // One round: its sum is every client's, the dead one's included.
    let cfg = one_round;
    let plain = run(&cfg(""), None, None).await;
    let secure = run(&cfg(SECAGG), None, Some((3, sa::MASKED, true))).await;
    assert_close(&secure, &plain, 1e-5);
    let round = round_record(&secure);
    assert_eq!(
        round.extra["clients"],
        f64::from(CLIENTS),
        "its update counts"
    );
    assert_eq!(round.extra["secagg_left"], 1.0, "it never revealed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_before_its_masked_update_is_excluded_and_the_sum_is_the_others() {
    let cfg = one_round;
    // The plain course loses the same client's update the same way.
    let plain = run(&cfg(""), None, Some((3, "update", false))).await;
    let secure = run(&cfg(SECAGG), None, Some((3, sa::MASKED, false))).await;
    assert_close(&secure, &plain, 1e-5);
    let round = round_record(&secure);
    assert_eq!(round.extra["clients"], f64::from(CLIENTS - 1));
    // Without its masks removed, the sum would be uniform garbage: the
    // plain FedAvg of the others is what came out.
    let full = run(&cfg(""), None, None).await;
    assert_ne!(secure.final_params, full.final_params);
}

#[test]
fn secure_aggregation_refuses_what_it_cannot_serve_with_the_key() {
    let err = |extra: &str| {
        let text = format!("[federate]\nrounds = 1\nclients = 5\n{extra}");
        CourseConfig::from_toml(&text, "course.toml")
            .unwrap_err()
            .to_string()
    };
    let e = err(&format!("[aggregator]\nscript = \"krum\"\n{SECAGG}"));
    assert!(e.contains("aggregator.script") && e.contains("sum"), "{e}");
    let e = err(&format!("{SECAGG}dp = \"central\"\n"));
    assert!(
        e.contains("privacy.secure_aggregation") && e.contains("local"),
        "{e}"
    );
    let e = err(&format!("sample_clients = 2\n{SECAGG}"));
    assert!(e.contains("at least 3"), "{e}");
    let e = err(&format!("{SECAGG}secagg_threshold = 1.5\n"));
    assert!(e.contains("privacy.secagg_threshold"), "{e}");
}
