#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use mail_integration_operator::{
    metrics::Metrics,
    oauth::OAuthClient,
    provider::ProviderResolver,
    reconcile::controller::{self, Context},
    web::health::{self, HealthState},
};
use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
};
use tracing::info;

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
    /// Run the operator: watch MailIntegrations and keep their tokens fresh. Connects to the cluster
    /// from inside a pod, or through $KUBECONFIG / ~/.kube/config.
    Run(RunArgs),
    /// Print the MailIntegration CustomResourceDefinition as YAML (the file under crds/).
    Crd,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "MIO_HEALTH_ADDR", default_value = "0.0.0.0:9090")]
    health_addr: SocketAddr,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "MIO_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// How long a failing revocation (spec.revokeOnDelete) may delay a deletion, e.g. 5m.
    #[arg(long, env = "MIO_REVOKE_TIMEOUT", default_value = "5m")]
    revoke_timeout: kube::core::Duration,
    /// Log format.
    #[arg(long, env = "MIO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn,hyper=warn,tower=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_tracing(args.log_format);
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));

    let health = health::router(HealthState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    });
    let listener = tokio::net::TcpListener::bind(args.health_addr)
        .await
        .with_context(|| format!("binding the health address {}", args.health_addr))?;
    info!(addr = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
    tokio::spawn(async move { axum::serve(listener, health).await });

    let oauth = OAuthClient::new().context("building the HTTP client")?;
    let providers = ProviderResolver::new(oauth.http_client().clone());
    let mut ctx = Context::new(client, oauth, providers, metrics);
    ctx.revoke_timeout = args.revoke_timeout.into();
    let ctx = Arc::new(ctx);
    info!(
        namespace = args.namespace.as_deref().unwrap_or("(all)"),
        "watching MailIntegrations"
    );
    controller::run(ctx, args.namespace, ready).await;
    info!("stopped");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args).await?,
        Command::Crd => print!("{}", mail_integration_operator::api::crd_yaml()),
    }
    Ok(())
}
