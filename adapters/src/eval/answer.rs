//! Scoring rules, each as its benchmark publishes it: GSM8K's final number,
//! SQuAD-style answer normalization (NaturalQuestions exact match), and the
//! unbiased pass@k estimator of Chen et al. (2021).

/// The answer of a GSM8K completion as FS-LLM's `clean_answer` extracts it:
/// in the lower-cased text with every comma removed, the first number after
/// the first "the answer is", or the last number of the whole text when the
/// phrase is absent; numbers are `-?\d+\.?\d*` and a trailing `.` (end of
/// sentence) is dropped. `None` when there is no number where it looks
/// (also when the phrase is followed by no number before the next one,
/// FS-LLM's `[invalid]`).
pub fn gsm8k_answer(completion: &str) -> Option<String> {
    let lower = completion.to_lowercase().replace(',', "");
    let trigger = crate::data::GSM8K_TRIGGER.to_lowercase();
    let mut parts = lower.split(trigger.as_str());
    let whole = parts.next().unwrap_or_default();
    let pick = match parts.next() {
        Some(after) => numbers(after).into_iter().next(),
        None => numbers(whole).pop(),
    }?;
    Some(pick.strip_suffix('.').unwrap_or(pick).to_string())
}

/// The matches of the regular expression `-?\d+\.?\d*` in `text`, left to
/// right and non-overlapping, as Python's `re.findall` returns them.
fn numbers(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let digits_from = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        i
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let sign = usize::from(b[i] == b'-');
        if !b.get(i + sign).is_some_and(u8::is_ascii_digit) {
            i += 1;
            continue;
        }
        let mut end = digits_from(i + sign);
        if b.get(end) == Some(&b'.') {
            end = digits_from(end + 1);
        }
        out.push(&text[i..end]);
        i = end;
    }
    out
}

/// Whether two numbers written as text are equal (`18` = `18.0` = `18.00`);
/// texts that are not numbers compare as text.
pub fn numbers_equal(a: &str, b: &str) -> bool {
    let clean = |s: &str| s.trim().replace(',', "");
    match (clean(a).parse::<f64>(), clean(b).parse::<f64>()) {
        (Ok(x), Ok(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => clean(a) == clean(b),
    }
}

/// SQuAD's answer normalization: lower case, punctuation and the articles
/// `a`, `an`, `the` removed, whitespace collapsed.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Exact match after normalization against any of the gold answers.
pub fn exact_match(prediction: &str, golds: &[String]) -> bool {
    let p = normalize_answer(prediction);
    golds.iter().any(|g| normalize_answer(g) == p)
}

/// SQuAD's token F1 against the best of the gold answers: the harmonic
/// mean of precision and recall of the normalized tokens the prediction
/// shares with a gold answer (counted with multiplicity); 1 when both are
/// empty after normalization, 0 when only one is.
pub fn f1(prediction: &str, golds: &[String]) -> f64 {
    let tokens = |s: &str| {
        normalize_answer(s)
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let pred = tokens(prediction);
    golds
        .iter()
        .map(|g| {
            let gold = tokens(g);
            if pred.is_empty() || gold.is_empty() {
                return f64::from(u8::from(pred == gold));
            }
            let mut left: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
            for t in &gold {
                *left.entry(t.as_str()).or_default() += 1;
            }
            let common = pred
                .iter()
                .filter(|t| match left.get_mut(t.as_str()) {
                    Some(n) if *n > 0 => {
                        *n -= 1;
                        true
                    }
                    _ => false,
                })
                .count();
            if common == 0 {
                return 0.0;
            }
            let precision = common as f64 / pred.len() as f64;
            let recall = common as f64 / gold.len() as f64;
            2.0 * precision * recall / (precision + recall)
        })
        .fold(0.0, f64::max)
}

/// The unbiased estimator of pass@k from `n` samples of which `c` passed:
/// 1 − C(n − c, k) / C(n, k), computed as a stable product.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    assert!(c <= n && k >= 1, "pass@k needs c ≤ n and k ≥ 1");
    if n - c < k {
        return 1.0;
    }
    // C(n−c, k)/C(n, k) = Π_{i=n−c+1}^{n} (1 − k/i)
    let fail: f64 = ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product();
    1.0 - fail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_takes_the_number_after_the_answer_is_as_fs_llm_does() {
        let cases = [
            // The first number after the first trigger, not the last number.
            ("The answer is 18. Then she buys 20 more.", "18"),
            ("so 3 + 4 = 7\nThe answer is 7", "7"),
            ("THE ANSWER IS -12.5 degrees", "-12.5"),
            ("The answer is $1,018.", "1018"),
            ("The answer is 5 apples. The answer is 7.", "5"),
            // Raw GSM8K form: no trigger, the last number.
            ("48/2 = <<48/2=24>>24 clips\n#### 72", "72"),
            // Trailing period dropped, decimals kept.
            ("It costs 7.5.", "7.5"),
        ];
        for (text, want) in cases {
            assert_eq!(gsm8k_answer(text).as_deref(), Some(want), "{text}");
        }
        // The trigger followed by no number is invalid, as in FS-LLM, even
        // if a number came before it.
        assert_eq!(gsm8k_answer("I get 4. The answer is unknown."), None);
        // Python's re.findall(r'-?\d+\.?\d*', ...) on a few strings.
        assert_eq!(numbers("3-2 = 1"), ["3", "-2", "1"]);
        assert_eq!(numbers("a 1.2.3 b"), ["1.2", "3"]);
        assert_eq!(numbers("--5 x12. 7"), ["-5", "12.", "7"]);
    }

    #[test]
    fn gsm8k_takes_the_last_number_as_written() {
        let cases = [
            ("So she makes 9 * 2 = 18 dollars. The answer is 18.", "18"),
            ("The total is 1,234,567 apples.", "1234567"),
            ("He is left with -5 degrees, i.e. -5.", "-5"),
            ("Each costs 2.50, so 3 cost 7.5.", "7.5"),
            ("The answer is 42\n\nQ: what", "42"),
            ("The answer is $1,000.00 per month", "1000.00"),
            ("lists 1, 2, 3", "3"),
            ("x = 3-2 = 1", "1"),
            ("The answer is 8. Extra text follows without numbers.", "8"),
        ];
        for (text, want) in cases {
            assert_eq!(gsm8k_answer(text).as_deref(), Some(want), "{text}");
        }
        assert_eq!(gsm8k_answer("no digits here"), None);
        assert!(numbers_equal("1000.00", "1000"));
        assert!(numbers_equal("1,000", "1000"));
        assert!(!numbers_equal("18", "19"));
        assert!(numbers_equal("-5", "-5.0"));
    }

    #[test]
    fn gold_answers_come_from_the_hash_line() {
        let gold = crate::data::gsm8k_gold("so 9*2 = 18\n#### 1,018").unwrap();
        assert_eq!(gold, "1018");
        assert!(numbers_equal(
            &gsm8k_answer("The answer is 1,018.").unwrap(),
            &gold
        ));
    }

    #[test]
    fn answers_normalize_as_squad_does() {
        assert_eq!(normalize_answer("The  Beatles!"), "beatles");
        assert_eq!(
            normalize_answer("14 December, 1972 UTC"),
            "14 december 1972 utc"
        );
        assert!(exact_match(
            "the Bobby Scott.",
            &["Bob Russell".into(), "Bobby Scott".into()]
        ));
        assert!(!exact_match("Bobby", &["Bobby Scott".into()]));
    }

    #[test]
    fn f1_is_squads_token_overlap_by_hand() {
        let g = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // "Bobby" vs "Bobby Scott": P 1, R 1/2, F1 2/3.
        assert!((f1("Bobby", &g(&["Bobby Scott"])) - 2.0 / 3.0).abs() < 1e-12);
        // Articles and punctuation go before counting: exact.
        assert_eq!(f1("The Eiffel Tower!", &g(&["eiffel tower"])), 1.0);
        // A repeated token counts once per occurrence in the gold: "cat cat
        // sat" vs "cat sat": common 2, P 2/3, R 1, F1 0.8.
        assert!((f1("cat cat sat", &g(&["cat sat"])) - 0.8).abs() < 1e-12);
        // The best gold counts; nothing shared is 0; empty vs empty is 1.
        assert_eq!(f1("Paris", &g(&["London", "paris"])), 1.0);
        assert_eq!(f1("Rome", &g(&["London"])), 0.0);
        assert_eq!(f1("the", &g(&["a"])), 1.0);
        assert_eq!(f1("", &g(&["London"])), 0.0);
    }

    #[test]
    fn pass_at_k_matches_hand_computed_values() {
        // n = 5, c = 2, k = 1: 2/5.
        assert!((pass_at_k(5, 2, 1) - 0.4).abs() < 1e-12);
        // n = 5, c = 2, k = 2: 1 − C(3,2)/C(5,2) = 1 − 3/10.
        assert!((pass_at_k(5, 2, 2) - 0.7).abs() < 1e-12);
        // n = 10, c = 3, k = 5: 1 − C(7,5)/C(10,5) = 1 − 21/252.
        assert!((pass_at_k(10, 3, 5) - (1.0 - 21.0 / 252.0)).abs() < 1e-12);
        assert_eq!(pass_at_k(3, 0, 1), 0.0);
        assert_eq!(pass_at_k(3, 2, 2), 1.0);
        assert_eq!(pass_at_k(1, 1, 1), 1.0);
    }
}
