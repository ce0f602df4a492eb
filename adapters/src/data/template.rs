//! Prompt templates, tokenization with the prompt masked out, and batching.
//!
//! Templates are text in `configs/templates/*.toml` (two strings, with and
//! without input, holding `{instruction}` and `{input}`). The ones fedtune
//! ships are also compiled in, so a config outside the repository can name
//! them.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::{DataError, Example};
use crate::loss::IGNORE_INDEX;
use crate::tokenizer::TextTokenizer;
use crate::train::Batch;

/// The templates shipped in `configs/templates/`, by name.
const BUILT_IN: [(&str, &str); 2] = [
    ("alpaca", include_str!("../../assets/templates/alpaca.toml")),
    ("chatml", include_str!("../../assets/templates/chatml.toml")),
];

/// A prompt template.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// Its name.
    pub name: String,
    /// Used when the example has an input.
    pub with_input: String,
    /// Used when it has none.
    pub without_input: String,
}

impl Template {
    /// A template by name (`alpaca`, `chatml`: looked up in `dir` first, then
    /// the built-in copies) or by path (anything ending in `.toml`, relative
    /// to `dir`).
    pub fn resolve(spec: &str, dir: &Path) -> Result<Self, DataError> {
        let as_path = if spec.ends_with(".toml") {
            Some(dir.join(spec))
        } else {
            let p = dir.join("templates").join(format!("{spec}.toml"));
            p.exists().then_some(p)
        };
        if let Some(path) = as_path {
            let text = std::fs::read_to_string(&path).map_err(|e| DataError::File {
                path: path.clone(),
                msg: format!("cannot read template: {e}"),
            })?;
            return Self::parse(&text, &path.display().to_string());
        }
        match BUILT_IN.iter().find(|(n, _)| *n == spec) {
            Some((n, text)) => Self::parse(text, &format!("built-in template `{n}`")),
            None => Err(DataError::Config(format!(
                "unknown template `{spec}`: use one of {} or a path to a .toml file",
                BUILT_IN.map(|(n, _)| n).join(", ")
            ))),
        }
    }

    /// Parses a template file's text.
    pub fn parse(text: &str, origin: &str) -> Result<Self, DataError> {
        let t: Template = toml::from_str(text)
            .map_err(|e| DataError::Config(format!("{origin}: {}", e.message())))?;
        for (key, body) in [
            ("with_input", &t.with_input),
            ("without_input", &t.without_input),
        ] {
            if !body.contains("{instruction}") {
                return Err(DataError::Config(format!(
                    "{origin}: `{key}` has no {{instruction}} placeholder"
                )));
            }
        }
        if !t.with_input.contains("{input}") {
            return Err(DataError::Config(format!(
                "{origin}: `with_input` has no {{input}} placeholder"
            )));
        }
        Ok(t)
    }

    /// The prompt for `ex`: its fields put in place of the placeholders (in one
    /// pass, so braces inside the example's text are left alone).
    pub fn render(&self, ex: &Example) -> String {
        let body = if ex.input.trim().is_empty() {
            &self.without_input
        } else {
            &self.with_input
        };
        let mut out = String::with_capacity(body.len() + ex.instruction.len() + ex.input.len());
        let mut rest = body.as_str();
        while let Some(i) = rest.find('{') {
            out.push_str(&rest[..i]);
            let tail = &rest[i..];
            if let Some(r) = tail.strip_prefix("{instruction}") {
                out.push_str(&ex.instruction);
                rest = r;
            } else if let Some(r) = tail.strip_prefix("{input}") {
                out.push_str(&ex.input);
                rest = r;
            } else {
                out.push('{');
                rest = &tail[1..];
            }
        }
        out.push_str(rest);
        out
    }
}

/// One tokenized example: ids and labels (`IGNORE_INDEX` over the prompt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// Token ids: prompt, then response and end-of-sequence.
    pub tokens: Vec<u32>,
    /// The ids again where the loss counts (the response), −100 elsewhere.
    pub labels: Vec<i64>,
    /// Prompt tokens dropped to fit `max_tokens`.
    pub prompt_cut: usize,
    /// Response tokens dropped to fit `max_tokens`.
    pub response_cut: usize,
}

/// Tokenizes `prompt` and `response` + end-of-sequence, at most `max_tokens`
/// in all. When too long, the response keeps at least half the budget (all of
/// it if shorter), the prompt keeps its end (next to the response; a leading
/// bos token stays), and the response keeps its beginning.
pub fn tokenize(
    tok: &TextTokenizer,
    prompt: &str,
    response: &str,
    max_tokens: usize,
) -> Result<Tokenized, DataError> {
    if max_tokens < 2 {
        return Err(DataError::Config("max_tokens must be at least 2".into()));
    }
    let err = |e: crate::tokenizer::TokenizerError| DataError::Config(e.to_string());
    let mut p = tok.encode(prompt).map_err(err)?;
    let mut r = tok.encode_continuation(response).map_err(err)?;
    r.push(tok.eos_id);
    let (mut prompt_cut, mut response_cut) = (0, 0);
    if p.len() + r.len() > max_tokens {
        let r_keep = r.len().min(max_tokens - p.len().min(max_tokens / 2));
        let p_keep = max_tokens - r_keep;
        response_cut = r.len() - r_keep;
        r.truncate(r_keep);
        prompt_cut = p.len() - p_keep;
        let bos = tok.add_bos && tok.bos_id.is_some() && p_keep > 0;
        let start = usize::from(bos);
        p.drain(start..start + prompt_cut);
    }
    let labels = std::iter::repeat_n(IGNORE_INDEX, p.len())
        .chain(r.iter().map(|&id| i64::from(id)))
        .collect();
    p.extend(r);
    Ok(Tokenized {
        tokens: p,
        labels,
        prompt_cut,
        response_cut,
    })
}

/// A batch of examples, right-padded with `pad_id` to the longest one
/// (padding masked from attention and loss).
pub fn collate(items: &[&Tokenized], pad_id: u32, device: &Device) -> candle_core::Result<Batch> {
    let b = items.len();
    let t = items.iter().map(|x| x.tokens.len()).max().unwrap_or(0);
    if b == 0 || t == 0 {
        candle_core::bail!("cannot batch zero examples or empty examples")
    }
    let mut tokens = vec![pad_id; b * t];
    let mut mask = vec![0u32; b * t];
    let mut labels = vec![IGNORE_INDEX; b * t];
    for (i, x) in items.iter().enumerate() {
        let n = x.tokens.len();
        tokens[i * t..i * t + n].copy_from_slice(&x.tokens);
        mask[i * t..i * t + n].fill(1);
        labels[i * t..i * t + n].copy_from_slice(&x.labels);
    }
    Ok(Batch {
        tokens: Tensor::from_vec(tokens, (b, t), device)?,
        attention_mask: Tensor::from_vec(mask, (b, t), device)?,
        labels: Tensor::from_vec(labels, (b, t), device)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ex(instruction: &str, input: &str) -> Example {
        Example {
            instruction: instruction.into(),
            input: input.into(),
            output: "out".into(),
            meta: BTreeMap::new(),
        }
    }

    #[test]
    fn alpaca_matches_fs_llm_prompt_dict() {
        let t = Template::resolve("alpaca", Path::new("/nonexistent")).unwrap();
        assert_eq!(
            t.render(&ex("Sum {a}", "1 2")),
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nSum {a}\n\n### Input:\n1 2\n\n### Response:"
        );
        assert_eq!(
            t.render(&ex("Say hi", "")),
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi\n\n### Response:"
        );
        assert!(Template::resolve("nope", Path::new(".")).is_err());
        let bad = Template::parse(
            "name='x'\nwith_input='{input}'\nwithout_input='{instruction}'",
            "t",
        );
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("`with_input` has no {instruction}"));
    }

    #[test]
    fn collate_pads_right_and_masks_padding() {
        let a = Tokenized {
            tokens: vec![5, 6, 7],
            labels: vec![-100, 6, 7],
            prompt_cut: 0,
            response_cut: 0,
        };
        let b = Tokenized {
            tokens: vec![8],
            labels: vec![8],
            prompt_cut: 0,
            response_cut: 0,
        };
        let batch = collate(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            batch.tokens.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7], vec![8, 0, 0]]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 1], vec![1, 0, 0]]
        );
        assert_eq!(
            batch.labels.to_vec2::<i64>().unwrap(),
            vec![vec![-100, 6, 7], vec![8, -100, -100]]
        );
    }
}
