//! The `coral-controller` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kube::CustomResourceExt;

#[derive(Parser)]
#[command(
    name = "coral-controller",
    version,
    about = "The ImageSeed operator: builds seed volume snapshots and rolls them out to nodes."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ImageSeed CustomResourceDefinition (YAML).
    Crd,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crd => {
            let crd = coral_controller::crd::ImageSeed::crd();
            match serde_norway::to_string(&crd) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("coral-controller: error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
