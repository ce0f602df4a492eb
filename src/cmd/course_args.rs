//! What every command that runs a course shares: `fedtune run`'s
//! arguments (the course file, its overrides, the run directory) and the
//! default run directory's name.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use clap::Args;
use fedtune_adapters::course::{CourseFile, Output};

/// Arguments of `fedtune run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The course configuration (TOML).
    pub config: PathBuf,
    /// Override a config value: `--set federate.rounds=3` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Where the model runs: cpu, cuda or cuda:N (`--set model.device=…`).
    #[arg(long)]
    pub device: Option<fedtune_adapters::model::DeviceSpec>,
    /// Output directory (default: runs/<course>-<timestamp>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the fully resolved configuration and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Print only the final summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress lines, only the final table.
    #[arg(long)]
    pub quiet: bool,
    /// Continue the LoRA course in --out DIR from its newest checkpoint
    /// (the configuration must be the same, except for more rounds).
    #[arg(long)]
    pub resume: bool,
    /// Data root (default: $FEDTUNE_DATA_ROOT, else ./data, else ../shared/data).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Replace an earlier run in --out DIR (its files are deleted, nothing else).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Follow the course in a browser: serve the live view on ADDR
    /// (default 127.0.0.1:0, a free loopback port; the address is printed).
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:0")]
    pub serve: Option<String>,
}

impl RunArgs {
    /// The config overrides: `--set`s, then `--device`'s.
    pub fn overrides(&self) -> Vec<String> {
        let device = self.device.map(|d| format!("model.device=\"{d}\""));
        self.set.iter().cloned().chain(device).collect()
    }
}

/// Where a course run writes: `out`, or `runs/<course>-<timestamp>`;
/// `--resume` needs the directory to continue named.
pub fn run_output(
    course: &CourseFile,
    out: Option<&Path>,
    (resume, overwrite): (bool, bool),
    data_root: Option<&Path>,
) -> Result<Output> {
    if resume && out.is_none() {
        bail!("--resume needs --out DIR, the run directory to continue");
    }
    Ok(Output {
        dir: out
            .map(Path::to_path_buf)
            .unwrap_or_else(|| default_run_dir(&course.cfg.course.name)),
        resume,
        overwrite,
        data_root: data_root.map(Path::to_path_buf),
        managed: false,
    })
}

/// `runs/<course>-<UTC timestamp>`.
pub fn default_run_dir(course: &str) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("{course}-{}", utc_timestamp(secs)))
}

/// `YYYYMMDD-HHMMSS` in UTC (civil-from-days, after Howard Hinnant).
fn utc_timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(0), "19700101-000000");
        assert_eq!(utc_timestamp(951_782_400), "20000229-000000");
        assert_eq!(utc_timestamp(1_795_563_330), "20261124-233530");
    }
}
