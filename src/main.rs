#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

/// Keeps mailbox integrations connected through OAuth 2.0: serves the sign-in page, refreshes access
/// tokens before they expire, writes them into Secrets that mail workloads mount, and reports the
/// state of each MailIntegration as conditions, events and metrics.
#[derive(Parser, Debug)]
#[command(name = "mail-integration-operator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the MailIntegration CustomResourceDefinition as YAML (the file under crds/).
    Crd,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => print!("{}", mail_integration_operator::api::crd_yaml()),
    }
    Ok(())
}
