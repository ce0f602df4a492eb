//! `fedtune bench secagg`: what secure aggregation adds to a round — time
//! and bytes — for rounds of several sizes: whole courses through the
//! kernel's server and clients, with updates the size of the quickstart's
//! LoRA adapter, plain FedAvg and secure aggregation alternating so that
//! the machine's drift hits both alike. The clients' "training" is a fixed
//! nudge of the parameters, so what is timed is the protocol: encoding,
//! key agreement, sharing and sealing, masking, unmasking, the wire.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Context, Result};
use fedtune_broker::{LocalNats, NatsOptions, NatsTransport};
use fedtune_kernel::course::{run_on, ServerSetup, Transports};
use fedtune_kernel::{
    CourseConfig, Event, FedAvg, InProcTransport, LocalTrainer, LocalUpdate, MetricsLog, ParamSet,
    SplitEval, TrainContext, Transport,
};

use super::codec::lora_like;

/// Every client moves each value by a small amount of its own.
struct Nudge;

impl LocalTrainer for Nudge {
    fn train(
        &mut self,
        client: u32,
        global: &ParamSet,
        _ctx: &TrainContext,
    ) -> Result<LocalUpdate, fedtune_kernel::course::TrainerError> {
        let step = 1e-3 * client as f32;
        Ok(LocalUpdate {
            params: global.map_values(|v| v + step),
            n_samples: 100 + u64::from(client),
            loss: Some(1.0),
            metrics: BTreeMap::new(),
            local_steps: Some(1),
            extra: ParamSet::new(),
        })
    }

    fn evaluate(
        &mut self,
        _client: u32,
        _global: &ParamSet,
        _ctx: &TrainContext,
    ) -> Result<Vec<SplitEval>, fedtune_kernel::course::TrainerError> {
        Ok(Vec::new())
    }
}

/// Per round: median seconds, bytes of the round's messages (the global
/// parameters down, the updates up, and the protocol's own messages).
struct Cost {
    seconds: f64,
    bytes: f64,
    /// Of `bytes`, the protocol's own messages.
    protocol: f64,
}

async fn course(clients: u32, secure: bool, params: &ParamSet, nats: Option<&str>) -> Result<Cost> {
    let rounds = 3;
    let text = format!(
        "[federate]\nname = \"bench\"\nrounds = {rounds}\nclients = {clients}\nseed = 1\neval_before_training = false\neval_every = {rounds}\n[privacy]\nsecure_aggregation = {secure}\n"
    );
    let cfg = CourseConfig::from_toml(&text, "<bench>")?;
    let transports = match nats {
        None => {
            let bus: Arc<dyn Transport> = Arc::new(InProcTransport::new());
            Transports {
                server: bus.clone(),
                clients: (1..=clients).map(|id| (id, bus.clone())).collect(),
            }
        }
        Some(url) => {
            let connect = |name: String| async move {
                let options = NatsOptions {
                    name,
                    ..NatsOptions::default()
                };
                NatsTransport::connect(url, "bench", options).await
            };
            let mut list: BTreeMap<u32, Arc<dyn Transport>> = BTreeMap::new();
            for id in 1..=clients {
                list.insert(id, Arc::new(connect(format!("client-{id}")).await?));
            }
            Transports {
                server: Arc::new(connect("server".into()).await?),
                clients: list,
            }
        }
    };
    let setup = ServerSetup::new(
        cfg,
        params.clone(),
        Box::new(FedAvg),
        MetricsLog::in_memory(),
    );
    let report = run_on(setup, Arc::new(Mutex::new(Nudge)), transports)
        .await
        .context("the benchmark course failed")?;
    let mut seconds = Vec::new();
    let (mut bytes, mut protocol) = (0.0, 0.0);
    for r in report.records.iter().filter(|r| r.event == Event::Round) {
        seconds.push(r.wall_s);
        let overhead = r.extra.get("secagg_overhead_bytes").copied().unwrap_or(0.0);
        bytes += (r.bytes_up + r.bytes_down) as f64 + overhead;
        protocol += overhead;
    }
    ensure!(
        seconds.len() == rounds,
        "the course ran {} rounds",
        seconds.len()
    );
    seconds.sort_by(f64::total_cmp);
    Ok(Cost {
        seconds: seconds[seconds.len() / 2],
        bytes: bytes / rounds as f64,
        protocol: protocol / rounds as f64,
    })
}

pub fn secagg(clients: &[u32], params: usize, reps: usize, nats: bool) -> Result<()> {
    ensure!(
        clients.iter().all(|&c| c >= 3),
        "secure aggregation needs at least 3 clients a round"
    );
    let local = nats
        .then(|| LocalNats::start(None).context("starting a local nats-server"))
        .transpose()?;
    let url = local.as_ref().map(LocalNats::url);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let set = lora_like(params)?;
    println!(
        "{} medium, updates of {params} values, median round of 3, best of {reps} alternating courses\n",
        if nats { "NATS (local nats-server)" } else { "in-process" }
    );
    println!("| clients | FedAvg s/round | secure s/round | added s | FedAvg MB/round | secure MB/round | added MB | of which keys and shares, KB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in clients {
        let mut best: [Option<Cost>; 2] = [None, None];
        for rep in 0..reps.max(1) {
            for (i, secure) in [false, true].into_iter().enumerate() {
                let c = runtime.block_on(course(n, secure, &set, url.as_deref()))?;
                eprintln!(
                    "{n} clients, rep {rep}, {}: {:.3} s/round, {:.2} MB/round",
                    if secure { "secure" } else { "FedAvg" },
                    c.seconds,
                    c.bytes / 1e6
                );
                if best[i].as_ref().is_none_or(|b| c.seconds < b.seconds) {
                    best[i] = Some(c);
                }
            }
        }
        let [Some(plain), Some(secure)] = best else {
            unreachable!("at least one rep");
        };
        println!(
            "| {n} | {:.3} | {:.3} | {:+.3} | {:.2} | {:.2} | {:+.2} | {:.1} |",
            plain.seconds,
            secure.seconds,
            secure.seconds - plain.seconds,
            plain.bytes / 1e6,
            secure.bytes / 1e6,
            (secure.bytes - plain.bytes) / 1e6,
            secure.protocol / 1e3
        );
    }
    Ok(())
}
