//! A course's data: the `[data]` set split over the clients as the course
//! file says, each client's splits tokenized with the prompt template and
//! cut into batches.
//!
//! Every process of a course splits the data the same way (the split is
//! seeded), so a client process that tokenizes only its own part trains on
//! exactly what the in-process course gives that client.

use std::path::Path;

use candle_core::Device;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::config::{CourseFile, LlmConfig};
use super::{ensure, Context, CourseError, Result};
use crate::data::{self, collate, FederatedData, Template, Tokenized};
use crate::round_robin::ClientData;
use crate::tokenizer::TextTokenizer;
use crate::train::Batch;

/// One client's tokenized data.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The client's name (its meta label, or its number).
    pub name: String,
    /// Training examples.
    pub train: Vec<Tokenized>,
    /// Held-out test examples.
    pub test: Vec<Tokenized>,
    /// Validation examples.
    pub val: Vec<Tokenized>,
}

/// The course's data, split over its clients, and its prompt template.
pub fn course_data(course: &CourseFile, root: &Path) -> Result<(FederatedData, Template)> {
    let llm = course.llm()?;
    let fed = data::build(&llm.data, root, course.cfg.course.clients as usize)
        .with_context(|| format!("{}: [data]", course.doc.origin()))?;
    let dir = course.dir().unwrap_or(Path::new("."));
    let template = Template::resolve(&llm.data.template, dir)
        .with_context(|| format!("{}: data.template", course.doc.origin()))?;
    Ok((fed, template))
}

/// Client `c` (0-based) of `fed`, tokenized.
fn prepare_one(
    fed: &FederatedData,
    c: usize,
    template: &Template,
    tok: &TextTokenizer,
    max_tokens: usize,
) -> Result<Prepared> {
    let client = fed
        .clients
        .get(c)
        .ok_or_else(|| CourseError::invalid(format!("the data has no client {}", c + 1)))?;
    let tokenize = |idx: &[usize]| {
        fed.tokenize(idx, template, tok, max_tokens)
            .with_context(|| format!("tokenizing client {}'s data", c + 1))
    };
    Ok(Prepared {
        name: client.name.clone(),
        train: tokenize(&client.train)?,
        val: tokenize(&client.val)?,
        test: tokenize(&client.test)?,
    })
}

/// Every client's splits, tokenized; a client without training examples is an error.
pub fn prepare(
    fed: &FederatedData,
    template: &Template,
    tok: &TextTokenizer,
    max_tokens: usize,
) -> Result<Vec<Prepared>> {
    (0..fed.clients.len())
        .map(|c| {
            let p = prepare_one(fed, c, template, tok, max_tokens)?;
            ensure!(
                !p.train.is_empty(),
                "client {c} ({}) has no training examples",
                p.name
            );
            Ok(p)
        })
        .collect()
}

/// `items` in batches of `size` (shuffled first when `shuffle` gives a seed).
pub fn batches(
    items: &[Tokenized],
    size: usize,
    shuffle: Option<u64>,
    pad: u32,
) -> Result<Vec<Batch>> {
    let mut order: Vec<&Tokenized> = items.iter().collect();
    if let Some(s) = shuffle {
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(s));
    }
    order
        .chunks(size)
        .map(|c| collate(c, pad, &Device::Cpu).context("collating a batch"))
        .collect()
}

/// Client `c`'s (0-based) batches: training (shuffled by the course seed), val and test.
pub fn client_data(
    p: &Prepared,
    c: u64,
    llm: &LlmConfig,
    seed: u64,
    pad: u32,
) -> Result<ClientData> {
    let mut eval = Vec::new();
    let eval_size = llm.train.eval_batch_size;
    if !p.val.is_empty() {
        eval.push(("val".to_string(), batches(&p.val, eval_size, None, pad)?));
    }
    if !p.test.is_empty() {
        eval.push(("test".to_string(), batches(&p.test, eval_size, None, pad)?));
    }
    Ok(ClientData {
        train: batches(&p.train, llm.train.batch_size, Some(seed ^ c), pad)?,
        eval,
        n_samples: p.train.len() as u64,
    })
}

/// Client `id`'s batches in a client process: the course's data split as
/// `fedtune run` splits it, only this client's part tokenized.
pub fn client_process_data(
    course: &CourseFile,
    tok: &TextTokenizer,
    data_root: Option<&Path>,
    id: u32,
) -> Result<ClientData> {
    let llm = course.llm()?;
    let root = data::data_root(data_root);
    let (fed, template) = course_data(course, &root)?;
    ensure!(
        (1..=fed.clients.len() as u32).contains(&id),
        "the data has no client {id}"
    );
    let p = prepare_one(&fed, id as usize - 1, &template, tok, llm.data.max_tokens)?;
    ensure!(
        !p.train.is_empty(),
        "client {id} ({}) has no training examples",
        p.name
    );
    tracing::info!(client = id, name = %p.name, train = p.train.len(), test = p.test.len(), "client data");
    client_data(
        &p,
        u64::from(id - 1),
        llm,
        course.cfg.course.seed,
        tok.eos_id,
    )
}
