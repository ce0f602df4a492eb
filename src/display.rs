//! The terminal display of long work: progress bars drawn from the reports
//! of a course or an evaluation (the library's [`Observer`]).
//!
//! On a terminal a course shows a bar over its rounds and one over the
//! current client's local steps, with log lines printed above them; an
//! evaluation shows a bar over its items. Without a terminal there are no
//! bars: the lines go to stderr as they are (an evaluation adds one at every
//! tenth of the way), and with `--quiet` or `--json` nowhere.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use fedtune_adapters::progress::Observer;
use fedtune_kernel::{Event, Record};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress bars and lines on stderr.
pub struct Display {
    multi: MultiProgress,
    /// The bars over a course's rounds and a client's local steps, once a course starts.
    course: OnceLock<(ProgressBar, ProgressBar)>,
    /// The bar over the running evaluation's items.
    items: Mutex<Option<ProgressBar>>,
    quiet: bool,
    live: bool,
    /// `say` lines carry the seconds since this instant, when set.
    clock: Option<Instant>,
    /// A prefix for `say` lines (`client 2: `).
    prefix: String,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl Display {
    /// A display; `quiet` shows nothing.
    pub fn new(quiet: bool) -> Self {
        let live = !quiet && std::io::stderr().is_terminal();
        let target = if live {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        Self {
            multi,
            course: OnceLock::new(),
            items: Mutex::new(None),
            quiet,
            live,
            clock: None,
            prefix: String::new(),
        }
    }

    /// `say` lines carry the seconds since now, as `[  12.3 s] line`.
    pub fn timed(mut self) -> Self {
        self.clock = Some(Instant::now());
        self
    }

    /// `say` lines start with `prefix`.
    pub fn prefixed(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// As an observer to hand to the library.
    pub fn shared(self) -> Arc<Self> {
        Arc::new(self)
    }

    /// Prints a line above the bars (or to stderr without a terminal).
    pub fn line(&self, text: String) {
        if self.quiet {
            return;
        }
        if self.live {
            let _ = self.multi.println(text);
        } else {
            eprintln!("{text}");
        }
    }
}

impl Observer for Display {
    fn say(&self, line: &str) {
        let text = match self.clock {
            Some(t) => format!(
                "[{:6.1} s] {}{line}",
                t.elapsed().as_secs_f64(),
                self.prefix
            ),
            None => format!("{}{line}", self.prefix),
        };
        self.line(text);
    }

    fn course_started(&self, rounds: u64) {
        let (bar, _) = self.course.get_or_init(|| {
            let rounds = self.multi.add(
                ProgressBar::new(rounds)
                    .with_style(style(
                        "{prefix:>7} [{bar:30}] {pos}/{len} rounds  {elapsed_precise} (eta {eta})",
                    ))
                    .with_prefix("course"),
            );
            let steps = self.multi.add(
                ProgressBar::new(1)
                    .with_style(style("{prefix:>7} [{bar:30}] {pos}/{len} steps  {msg}"))
                    .with_prefix("local"),
            );
            (rounds, steps)
        });
        bar.set_length(rounds);
    }

    fn record(&self, r: &Record, rounds: u64) {
        match (r.event, r.client) {
            (Event::Round, None) => {
                if let Some((bar, _)) = self.course.get() {
                    bar.inc(1);
                }
                // The privacy spent so far, when the course has DP.
                let mut eps = r
                    .extra
                    .get("dp_epsilon")
                    .map_or(String::new(), |e| format!(", ε = {e:.3}"));
                if let Some(f) = r.extra.get("flops") {
                    eps.push_str(&format!(", {:.2} TFLOP", f / 1e12));
                }
                // Secure aggregation: the server knows only the mean loss.
                if let (Some(loss), true) = (r.loss, r.extra.contains_key("secagg_overhead_bytes"))
                {
                    eps.push_str(&format!(
                        ", securely aggregated (mean train loss {loss:.4})"
                    ));
                }
                self.line(format!(
                    "round {}/{rounds}: {} clients trained, {:.1} KB up, {:.1} KB down, {:.1} s{eps}",
                    r.round,
                    r.extra.get("clients").copied().unwrap_or(0.0),
                    r.bytes_up as f64 / 1e3,
                    r.bytes_down as f64 / 1e3,
                    r.wall_s
                ));
            }
            (Event::Train, Some(c)) => self.line(match r.loss {
                Some(loss) => {
                    format!("  client {c}: mean train loss {loss:.4} over this round's steps")
                }
                None => format!(
                    "  client {c}: update received ({:.1} s of training)",
                    r.compute_s
                ),
            }),
            // What the strategy's aggregate_evaluate made of an evaluation.
            (Event::Eval, None) if r.loss.is_none() => self.line(format!(
                "  {} after round {}: {}",
                r.split.as_deref().unwrap_or("?"),
                r.round,
                r.extra
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.4}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            (Event::Eval, None) => self.line(format!(
                "  evaluation after round {}: {} loss {:.4} ({} examples)",
                r.round,
                r.split.as_deref().unwrap_or("?"),
                r.loss.unwrap_or(f64::NAN),
                r.samples.unwrap_or(0)
            )),
            _ => {}
        }
    }

    fn step(&self, client: u32, step: usize, steps: usize, loss: f64) {
        if let Some((_, bar)) = self.course.get() {
            bar.set_length(steps as u64);
            bar.set_position(step as u64);
            bar.set_message(format!("client {client}, loss {loss:.4}"));
        }
    }

    fn items(&self, task: &str, done: usize, total: usize, tokens: usize, seconds: f64) {
        let secs = seconds.max(1e-9);
        if self.live {
            let Ok(mut slot) = self.items.lock() else {
                return;
            };
            let bar = slot.get_or_insert_with(|| {
                self.multi.add(
                    ProgressBar::new(total as u64)
                        .with_style(style(
                            "{prefix:>10} [{bar:30}] {pos}/{len} items  {elapsed_precise} (eta {eta})  {msg}",
                        ))
                        .with_prefix(task.to_string()),
                )
            });
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(format!("{:.1} tok/s", tokens as f64 / secs));
        } else if !self.quiet && done > 0 && done.is_multiple_of((total / 10).max(1)) {
            // Without a terminal, a line at every tenth of the way.
            eprintln!(
                "{task}: {done}/{total} items, {secs:.0} s, {:.1} tokens/s",
                tokens as f64 / secs
            );
        }
    }

    fn finished(&self) {
        if let Some((rounds, steps)) = self.course.get() {
            steps.finish_and_clear();
            rounds.finish_and_clear();
        }
        if let Some(items) = self.items.lock().ok().and_then(|mut s| s.take()) {
            items.finish_and_clear();
        }
    }
}
