//! What long work reports while it runs: courses, evaluations.
//!
//! A course or an evaluation takes minutes to hours; whoever started it
//! wants to see it move. The work reports through an [`Observer`] and never
//! prints: the command line draws progress bars from the reports, a test or
//! a search running many courses passes [`Silent`].

use fedtune_kernel::Record;

/// Receives the reports of a course or an evaluation. Every method has a
/// do-nothing default, so an observer implements only what it shows.
pub trait Observer: Send + Sync {
    /// A line worth telling (the model loaded, the data split, a resumption).
    fn say(&self, line: &str) {
        let _ = line;
    }

    /// A course of `rounds` rounds begins (for a progress bar's length).
    fn course_started(&self, rounds: u64) {
        let _ = rounds;
    }

    /// A metrics record of a course of `rounds` rounds, as it is written.
    fn record(&self, record: &Record, rounds: u64) {
        let _ = (record, rounds);
    }

    /// Client `client` finished local step `step` of `steps` with this loss.
    fn step(&self, client: u32, step: usize, steps: usize, loss: f64) {
        let _ = (client, step, steps, loss);
    }

    /// `done` of `total` items of `task` are scored; `tokens` were generated
    /// in `seconds` so far.
    fn items(&self, task: &str, done: usize, total: usize, tokens: usize, seconds: f64) {
        let _ = (task, done, total, tokens, seconds);
    }

    /// The work is over: clear whatever is drawn.
    fn finished(&self) {}
}

/// An observer that shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Observer for Silent {}
