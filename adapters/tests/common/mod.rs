//! Fixtures shared by the tests that use the real default model.

use std::sync::OnceLock;

use fedtune_adapters::fetch::ensure_default_model;

/// About 150 tokens of GSM8K-style English with numbers.
pub const TEXT: &str = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. \
How many clips did Natalia sell altogether in April and May? Natalia sold 48/2 = 24 clips in May. \
Natalia sold 48+24 = 72 clips altogether in April and May. The answer is 72. \
Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn? \
Weng earns 12/60 = $0.2 per minute. Working 50 minutes, she earned 0.2 x 50 = $10. The answer is 10. \
Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs.";

/// The default model, fetched into the cache on first use.
pub fn model_path() -> &'static std::path::Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        ensure_default_model(|line| eprintln!("{line}")).expect("the default model can be fetched")
    })
}
