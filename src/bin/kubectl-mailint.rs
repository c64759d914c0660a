//! `kubectl mailint`: kubectl finds this binary on PATH by its name (see docs/kubectl-plugin.md).

use clap::Parser as _;
use mail_integration_operator::cli::{Cli, run};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
