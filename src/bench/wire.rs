//! `fedtune bench wire`: one broadcast-collect round — the server sends the
//! global parameters to every client, each client decodes them and sends an
//! update of the same size back, the server decodes all updates — timed on
//! the in-process bus and over NATS, for each quantization × compression.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use fedtune_broker::{LocalNats, NatsOptions, NatsTransport};
use fedtune_kernel::{
    decode, encode, Compression, DecodeLimits, EncodeOptions, Envelope, InProcTransport, MsgKind,
    ParamSet, Party, Quantization, Subscription, Transport,
};

use super::codec::lora_like;

/// The parties of one medium, subscribed.
struct Medium {
    server: Arc<dyn Transport>,
    inbox: Subscription,
    clients: Vec<(u32, Arc<dyn Transport>, Subscription)>,
}

async fn in_process(clients: u32) -> Result<Medium> {
    let bus: Arc<dyn Transport> = Arc::new(InProcTransport::new());
    let inbox = bus.subscribe(Party::Server).await?;
    let mut list = Vec::new();
    for id in 1..=clients {
        list.push((id, bus.clone(), bus.subscribe(Party::Client(id)).await?));
    }
    Ok(Medium {
        server: bus,
        inbox,
        clients: list,
    })
}

async fn over_nats(url: &str, clients: u32) -> Result<Medium> {
    let connect = |name: String| async move {
        let options = NatsOptions {
            name,
            ..NatsOptions::default()
        };
        NatsTransport::connect(url, "bench", options).await
    };
    let server: Arc<dyn Transport> = Arc::new(connect("server".into()).await?);
    let inbox = server.subscribe(Party::Server).await?;
    let mut list = Vec::new();
    for id in 1..=clients {
        let t: Arc<dyn Transport> = Arc::new(connect(format!("client-{id}")).await?);
        let sub = t.subscribe(Party::Client(id)).await?;
        list.push((id, t, sub));
    }
    Ok(Medium {
        server,
        inbox,
        clients: list,
    })
}

/// Runs `reps` rounds; returns the median seconds per round and the bytes
/// one round puts on the wire.
async fn rounds(
    medium: Medium,
    params: &ParamSet,
    opts: EncodeOptions,
    reps: usize,
) -> Result<(f64, usize)> {
    let Medium {
        server,
        mut inbox,
        clients,
    } = medium;
    let n = clients.len();
    let limits = DecodeLimits::default();
    let mut tasks = Vec::new();
    for (id, t, mut sub) in clients {
        tasks.push(tokio::spawn(async move {
            for _ in 0..reps {
                let got = sub.recv().await.context("the bus closed")?;
                let env = decode(&got.frame, &limits)?;
                let params = env.payload.context("no parameters")?;
                let update = Envelope::new(
                    "bench",
                    env.round,
                    Party::Client(id),
                    vec![Party::Server],
                    MsgKind::Update,
                )
                .with_payload(params);
                t.send(Party::Client(id), Party::Server, encode(&update, opts)?)
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    let mut times = Vec::new();
    let mut bytes = 0;
    for round in 0..reps as u64 {
        let started = Instant::now();
        let to: Vec<Party> = (1..=n as u32).map(Party::Client).collect();
        let global = Envelope::new("bench", round, Party::Server, to.clone(), MsgKind::Train)
            .with_payload(params.clone());
        let frame = encode(&global, opts)?;
        bytes = frame.len() * n;
        for p in to {
            server.send(Party::Server, p, frame.clone()).await?;
        }
        for _ in 0..n {
            let got = inbox.recv().await.context("the bus closed")?;
            bytes += got.frame.len();
            decode(&got.frame, &limits)?;
        }
        times.push(started.elapsed().as_secs_f64());
    }
    for t in tasks {
        t.await??;
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], bytes))
}

pub fn wire(clients: u32, reps: usize, nats: Option<String>) -> Result<()> {
    ensure!(
        clients > 0 && reps > 0,
        "--clients and --reps must be positive"
    );
    let local = match &nats {
        Some(_) => None,
        None => Some(
            LocalNats::start(None).context("starting a local nats-server (or pass --nats URL)")?,
        ),
    };
    let url = nats.unwrap_or_else(|| local.as_ref().expect("started").url());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let sets = [
        (
            "LoRA r 8 q/v of SmolLM2-135M (460,800 params)",
            lora_like(460_800)?,
        ),
        ("64 MiB (16,777,216 params)", lora_like(16 << 20)?),
    ];
    let encodings = [
        (Quantization::None, Compression::None, "f32"),
        (Quantization::None, Compression::Deflate, "f32 + DEFLATE"),
        (Quantization::F16, Compression::None, "f16"),
        (Quantization::F16, Compression::Deflate, "f16 + DEFLATE"),
        (Quantization::Int8, Compression::None, "int8"),
        (Quantization::Int8, Compression::Deflate, "int8 + DEFLATE"),
    ];
    println!(
        "one broadcast-collect round with {clients} clients, median of {reps}; NATS at {url}\n"
    );
    for (name, params) in &sets {
        println!("{name}\n");
        println!("| encoding | bytes per round | in-process s | NATS s | NATS / in-process |");
        println!("|---|---:|---:|---:|---:|");
        for (quantization, compression, label) in encodings {
            let opts = EncodeOptions {
                quantization,
                compression,
                ..EncodeOptions::default()
            };
            let (inproc, bytes) = runtime
                .block_on(async { rounds(in_process(clients).await?, params, opts, reps).await })?;
            let (remote, nats_bytes) = runtime.block_on(async {
                rounds(over_nats(&url, clients).await?, params, opts, reps).await
            })?;
            ensure!(
                bytes == nats_bytes,
                "the two media carried different frames"
            );
            println!(
                "| {label} | {bytes} | {inproc:.3} | {remote:.3} | {:.2} |",
                remote / inproc
            );
        }
        println!();
    }
    Ok(())
}
