//! Tokenizing templated examples with the real SmolLM2 tokenizer: the prompt
//! is masked from the loss token for token, the response ends in
//! end-of-sequence, and truncation keeps the response.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use fedtune_adapters::data::{collate, tokenize, Example, Template};
use fedtune_adapters::loss::IGNORE_INDEX;
use fedtune_adapters::tokenizer::TextTokenizer;

fn example(instruction: &str, output: &str) -> Example {
    Example {
        instruction: instruction.into(),
        input: String::new(),
        output: output.into(),
        meta: BTreeMap::new(),
    }
}

#[test]
fn prompts_are_masked_responses_kept_and_batches_padded() {
    let tok = TextTokenizer::from_gguf_path(common::model_path()).unwrap();
    let t = Template::resolve("alpaca", Path::new("/nonexistent")).unwrap();
    let ex = example("Add 2 and 3.", "2 + 3 = 5\n#### 5");
    let prompt = t.render(&ex);
    let x = tokenize(&tok, &prompt, &ex.output, 512).unwrap();
    let n_prompt = tok.encode(&prompt).unwrap().len();
    assert_eq!(
        x.labels.iter().filter(|&&l| l == IGNORE_INDEX).count(),
        n_prompt
    );
    assert!(x.labels[..n_prompt].iter().all(|&l| l == IGNORE_INDEX));
    assert_eq!(*x.tokens.last().unwrap(), tok.eos_id);
    assert_eq!(
        tok.decode(&x.tokens[n_prompt..x.tokens.len() - 1]).unwrap(),
        ex.output
    );
    for (&id, &l) in x.tokens.iter().zip(&x.labels).skip(n_prompt) {
        assert_eq!(l, i64::from(id), "the response is its own target");
    }

    // A prompt longer than the budget loses its beginning, never the response.
    let long = example(&"Count the sheep. ".repeat(200), "42");
    let cut = tokenize(&tok, &t.render(&long), &long.output, 64).unwrap();
    assert_eq!(cut.tokens.len(), 64);
    assert_eq!(cut.response_cut, 0);
    assert!(cut.prompt_cut > 0);
    let tail = tok.decode(&cut.tokens[..64 - 3]).unwrap();
    assert!(
        tail.ends_with("### Response:"),
        "the prompt keeps its end: {tail:?}"
    );
    // A response longer than the budget keeps at least half of it.
    let verbose = example("Say it.", &"word ".repeat(300));
    let cut = tokenize(&tok, &t.render(&verbose), &verbose.output, 64).unwrap();
    assert_eq!(cut.tokens.len(), 64);
    assert!(cut.labels.iter().filter(|&&l| l != IGNORE_INDEX).count() >= 32);

    let batch = collate(&[&x, &cut], tok.eos_id, &Device::Cpu).unwrap();
    assert_eq!(batch.tokens.dims(), &[2, 64.max(x.tokens.len())]);
}
