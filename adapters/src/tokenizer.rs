//! Tokenizers: from `tokenizer.json`, or rebuilt from a GGUF file's metadata.
//!
//! A GGUF file of a `gpt2`-style model carries its byte-level BPE vocabulary
//! (`tokenizer.ggml.tokens`), merges (`tokenizer.ggml.merges`), token types
//! (control tokens are special) and bos/eos ids. From them this module builds
//! the same `tokenizers::Tokenizer` the Hugging Face `tokenizer.json` would
//! describe, with the pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`.

use std::path::Path;

use candle_core::quantized::gguf_file;
use thiserror::Error;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

/// llama.cpp's token type of control tokens (`<|im_start|>`, …).
const TOKEN_TYPE_CONTROL: i32 = 3;

/// Why a tokenizer could not be built or used.
#[derive(Debug, Error)]
pub enum TokenizerError {
    /// A metadata key is missing or of the wrong type.
    #[error("GGUF tokenizer metadata: {0}")]
    Metadata(String),
    /// The tokenizer model is not supported.
    #[error("tokenizer model `{0}` is not supported (only gpt2-style byte-level BPE)")]
    Unsupported(String),
    /// The tokenizers crate failed.
    #[error("tokenizer: {0}")]
    Tokenizers(String),
}

/// A tokenizer with the ids a trainer and a generator need.
pub struct TextTokenizer {
    /// The underlying Hugging Face tokenizer.
    pub inner: Tokenizer,
    /// Beginning-of-sequence id, if the model has one.
    pub bos_id: Option<u32>,
    /// End-of-sequence id.
    pub eos_id: u32,
    /// Whether the model expects a bos token in front of every text.
    pub add_bos: bool,
    /// The chat template (Jinja), if the model ships one.
    pub chat_template: Option<String>,
}

impl TextTokenizer {
    /// Encodes text (special tokens written out, such as `<|im_start|>`, are recognized).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if self.add_bos {
            if let Some(bos) = self.bos_id {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// The tokenizer of a GGUF model file, without loading its weights.
    pub fn from_gguf_path(path: &Path) -> Result<Self, TokenizerError> {
        let file = std::fs::File::open(path).map_err(|e| {
            TokenizerError::Metadata(format!("cannot open {}: {e}", path.display()))
        })?;
        let content =
            gguf_file::Content::read(&mut std::io::BufReader::new(file)).map_err(|e| {
                TokenizerError::Metadata(format!(
                    "{} is not a readable GGUF file: {e}",
                    path.display()
                ))
            })?;
        Self::from_gguf(&content)
    }

    /// Encodes text that continues a sequence: never a bos token in front.
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids back to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))
    }

    /// Loads `tokenizer.json`, with the end-of-sequence id from the model's config.
    pub fn from_file(path: &Path, eos_id: u32) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Tokenizers(format!("{}: {e}", path.display())))?;
        if inner.id_to_token(eos_id).is_none() {
            return Err(TokenizerError::Metadata(format!(
                "{} has no token with id {eos_id}",
                path.display()
            )));
        }
        Ok(Self {
            inner,
            bos_id: None,
            eos_id,
            add_bos: false,
            chat_template: None,
        })
    }

    /// Rebuilds the tokenizer from GGUF metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, TokenizerError> {
        let md = |key: &str| {
            content
                .metadata
                .get(key)
                .ok_or_else(|| TokenizerError::Metadata(format!("missing `{key}`")))
        };
        let bad =
            |key: &str, e: candle_core::Error| TokenizerError::Metadata(format!("`{key}`: {e}"));
        let model = md("tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| bad("tokenizer.ggml.model", e))?;
        if model != "gpt2" {
            return Err(TokenizerError::Unsupported(model.clone()));
        }
        let strings = |key: &str| -> Result<Vec<String>, TokenizerError> {
            md(key)?
                .to_vec()
                .map_err(|e| bad(key, e))?
                .iter()
                .map(|v| v.to_string().cloned().map_err(|e| bad(key, e)))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        TokenizerError::Metadata(format!("merge `{m}` is not two tokens"))
                    })
            })
            .collect::<Result<_, _>>()?;
        let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| bad("tokenizer.ggml.token_type", e))?
                .iter()
                .map(|t| t.to_i32().map_err(|e| bad("tokenizer.ggml.token_type", e)))
                .collect::<Result<_, _>>()?,
            None => vec![1; tokens.len()],
        };
        let id = |key: &str| -> Result<Option<u32>, TokenizerError> {
            content
                .metadata
                .get(key)
                .map(|v| v.to_u32().map_err(|e| bad(key, e)))
                .transpose()
        };
        let eos_id = id("tokenizer.ggml.eos_token_id")?.ok_or_else(|| {
            TokenizerError::Metadata("missing `tokenizer.ggml.eos_token_id`".into())
        })?;
        let bos_id = id("tokenizer.ggml.bos_token_id")?;
        let add_bos = content
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let pre = content
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "default".into());
        let chat_template = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer(&pre)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        inner.add_special_tokens(&specials);
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            add_bos,
            chat_template,
        })
    }
}

/// The pre-tokenizer llama.cpp associates with `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    let byte_level: PreTokenizerWrapper = ByteLevel::new(false, true, true).into();
    match pre {
        // GPT-2's regex, with every digit its own token first (SmolLM, StarCoder, …).
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            Ok(Sequence::new(vec![Digits::new(true).into(), byte_level]).into())
        }
        "gpt-2" | "gpt2" | "default" => Ok(byte_level),
        other => Err(TokenizerError::Unsupported(format!(
            "pre-tokenizer `{other}`"
        ))),
    }
}
