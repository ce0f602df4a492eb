//! Fixtures shared by the kernel's course tests.

use std::sync::{Arc, Mutex};

use fedtune_kernel::course::{run_in_process, CourseReport, LeastSquaresTrainer};
use fedtune_kernel::{CourseConfig, FedAvg, MetricsLog};

/// A whole course of `cfg` in one process, every client on `t`, FedAvg.
pub async fn run_least_squares(cfg: &CourseConfig, t: LeastSquaresTrainer) -> CourseReport {
    let initial = t.initial_params();
    run_in_process(
        cfg,
        initial,
        Arc::new(Mutex::new(t)),
        Box::new(FedAvg),
        MetricsLog::in_memory(),
    )
    .await
    .unwrap()
}
