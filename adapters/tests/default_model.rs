//! Tests on the real default model, SmolLM2-135M-Instruct (fetched on first use).

mod common;

use std::sync::OnceLock;

use candle_core::{DType, Device};
use common::{model_path, TEXT};
use fedtune_adapters::model::{load_gguf, GgufModel};
use fedtune_adapters::tokenizer::TextTokenizer;

fn loaded() -> &'static (GgufModel, TextTokenizer) {
    static MODEL: OnceLock<(GgufModel, TextTokenizer)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let m = load_gguf(model_path(), DType::F32, &Device::Cpu).unwrap();
        let tok = TextTokenizer::from_gguf(&m.content).unwrap();
        (m, tok)
    })
}

#[test]
fn gguf_tokenizer_round_trips_exactly() {
    let (_, tok) = loaded();
    for text in [
        TEXT,
        "Unicode: naïve café — 日本語のテキスト, emoji 🚀🔥, Ελληνικά, русский.",
        "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\tprint(fib(10))  # 55\r\n",
        "  leading spaces, trailing   \n\n\n",
        "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n",
    ] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
    let ids = tok.encode("<|im_start|>user").unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is the special token 1");
    assert_eq!(tok.eos_id, 2);
    // Digits are split one by one, as SmolLM's pre-tokenizer does.
    let ids = tok.encode("2024").unwrap();
    assert_eq!(ids.len(), 4);
    assert!(tok
        .chat_template
        .as_deref()
        .is_some_and(|t| t.contains("<|im_start|>")));
}
