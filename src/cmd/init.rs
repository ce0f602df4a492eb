//! `fedtune init` and `fedtune scripts`: a course directory of your own,
//! and editable copies of the shipped scripts
//! (`fedtune_adapters::course::scaffold` does the work; the templates are
//! the shipped configs, compiled in so that an installed binary has them).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use fedtune_adapters::course::scaffold::{self, Template};

const QUICKSTART: (&str, &str) = (
    "quickstart.toml",
    include_str!("../../configs/quickstart.toml"),
);

/// The configs `--template` takes.
const TEMPLATES: [Template; 8] = [
    Template {
        name: "quickstart",
        about: "federated LoRA on Fed-GSM8K-3, FedAvg",
        files: &[QUICKSTART],
    },
    Template {
        name: "fedprox",
        about: "the quickstart with FedProx's proximal term (a trainer hook)",
        files: &[
            (
                "quickstart-fedprox.toml",
                include_str!("../../configs/quickstart-fedprox.toml"),
            ),
            QUICKSTART,
        ],
    },
    Template {
        name: "fedadam",
        about: "the quickstart with FedAdam on the server",
        files: &[
            (
                "quickstart-fedadam.toml",
                include_str!("../../configs/quickstart-fedadam.toml"),
            ),
            QUICKSTART,
        ],
    },
    Template {
        name: "ditto",
        about: "the quickstart with Ditto's personal adapters",
        files: &[
            (
                "quickstart-ditto.toml",
                include_str!("../../configs/quickstart-ditto.toml"),
            ),
            QUICKSTART,
        ],
    },
    Template {
        name: "pfedme",
        about: "the quickstart with pFedMe",
        files: &[
            (
                "quickstart-pfedme.toml",
                include_str!("../../configs/quickstart-pfedme.toml"),
            ),
            QUICKSTART,
        ],
    },
    Template {
        name: "local-adapter",
        about: "the quickstart with LoRA B kept on each client",
        files: &[
            (
                "quickstart-local-adapter.toml",
                include_str!("../../configs/quickstart-local-adapter.toml"),
            ),
            QUICKSTART,
        ],
    },
    Template {
        name: "robust",
        about: "the quickstart over 5 clients with a trimmed mean",
        files: &[
            (
                "quickstart-robust.toml",
                include_str!("../../configs/quickstart-robust.toml"),
            ),
            QUICKSTART,
        ],
    },
    Template {
        name: "least-squares",
        about: "the numeric reference course (runs in a second, no model)",
        files: &[(
            "least-squares.toml",
            include_str!("../../configs/least-squares.toml"),
        )],
    },
];

/// `fedtune init` arguments.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The folder to write (created; must not hold a config.toml yet).
    pub dir: PathBuf,
    /// The course to start from: quickstart, fedprox, fedadam, ditto, pfedme,
    /// local-adapter, robust or least-squares.
    #[arg(long, default_value = "quickstart")]
    pub template: String,
}

/// `fedtune scripts` subcommands.
#[derive(Debug, Subcommand)]
pub enum ScriptsCommand {
    /// List the shipped scripts (aggregators, hooks, pFL, searchers).
    List,
    /// Copy a shipped script to DIR/KIND/NAME.rhai to edit (a name, or
    /// KIND/NAME where two kinds share it, as `hooks/scaffold`).
    Export {
        /// The script.
        name: String,
        /// Where to write it.
        #[arg(default_value = "scripts")]
        dir: PathBuf,
    },
}

/// `fedtune init`.
pub fn init(args: InitArgs) -> Result<()> {
    let Some(template) = TEMPLATES.iter().find(|t| t.name == args.template) else {
        bail!(
            "no template `{}` (templates: {})",
            args.template,
            TEMPLATES
                .iter()
                .map(|t| t.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let made = scaffold::init(&args.dir, template)?;
    println!(
        "{}: {} — run it with\n  fedtune run {}",
        args.dir.display(),
        template.about,
        made.config.display()
    );
    println!("scripts it runs (edit them; the course uses these copies):");
    for s in &made.scripts {
        println!("  {}", s.display());
    }
    Ok(())
}

/// `fedtune scripts`.
pub fn scripts(cmd: ScriptsCommand) -> Result<()> {
    match cmd {
        ScriptsCommand::List => {
            for s in scaffold::shipped_scripts() {
                println!("{:<24} {}", s.id(), s.summary());
            }
        }
        ScriptsCommand::Export { name, dir } => {
            let script = scaffold::find_shipped(&name)?;
            let path = scaffold::export(&script, &dir)?;
            println!("{}", path.display());
        }
    }
    Ok(())
}
