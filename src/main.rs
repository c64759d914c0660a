#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use mail_integration_operator::{
    metrics::Metrics,
    oauth::OAuthClient,
    provider::ProviderResolver,
    reconcile::controller::{self, Context},
    web::{
        health::{self, HealthState},
        signin::{self, KubeBackend, SignIn, SignInConfig, Signer},
    },
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
    Run(Box<RunArgs>),
    /// Print the MailIntegration CustomResourceDefinition as YAML (the file under crds/).
    Crd,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "MIO_HEALTH_ADDR", default_value = "0.0.0.0:9090")]
    health_addr: SocketAddr,
    /// Watch only this namespace; repeat the flag for several (default: all namespaces).
    #[arg(long, env = "MIO_WATCH_NAMESPACE", value_delimiter = ',')]
    namespace: Vec<String>,
    /// How long a failing revocation (spec.revokeOnDelete) may delay a deletion, e.g. 5m.
    #[arg(long, env = "MIO_REVOKE_TIMEOUT", default_value = "5m")]
    revoke_timeout: kube::core::Duration,
    /// Elect a leader among replicas through a Lease: only the leader reconciles and refreshes;
    /// every replica serves the sign-in pages and health endpoints.
    #[arg(long, env = "MIO_LEADER_ELECTION")]
    leader_election: bool,
    /// Name of the Lease (in $POD_NAMESPACE, or --leader-election-namespace).
    #[arg(
        long,
        env = "MIO_LEADER_ELECTION_LEASE",
        default_value = "mail-integration-operator"
    )]
    leader_election_lease: String,
    /// Namespace of the Lease (default: $POD_NAMESPACE, else "default").
    #[arg(long, env = "MIO_LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Seconds a leader's Lease stays valid without renewal: a standby takes over after this.
    #[arg(long, default_value_t = 15)]
    leader_election_lease_seconds: u64,
    /// Log format.
    #[arg(long, env = "MIO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Address of the sign-in pages and the OAuth callback (the port an Ingress exposes).
    #[arg(long, env = "MIO_SIGN_IN_ADDR", default_value = "0.0.0.0:8080")]
    sign_in_addr: SocketAddr,
    /// The externally reachable base URL of the sign-in server, as browsers open it (same host as
    /// the redirect URL registered at the provider). Sign-in links and the default redirect URL
    /// `{public-url}/oauth2/callback` are built from it.
    #[arg(long, env = "MIO_PUBLIC_URL", default_value = "http://127.0.0.1:8080", value_parser = parse_public_url)]
    public_url: url::Url,
    /// The Secret holding the HMAC key of sign-in links and states, as `[NAMESPACE/]NAME`; created
    /// when missing. NAMESPACE defaults to $POD_NAMESPACE, else "default".
    #[arg(long, env = "MIO_SIGN_IN_KEY_SECRET", default_value = signin::key::DEFAULT_KEY_SECRET)]
    sign_in_key_secret: String,
    /// How long a sign-in link in status.signIn.url works (Go duration, e.g. 1h, 30m).
    #[arg(long, env = "MIO_SIGN_IN_LINK_TTL", default_value = "1h", value_parser = parse_duration)]
    sign_in_link_ttl: std::time::Duration,
    /// Mail hosts the mailbox check may connect to, besides the providers' own (imap.gmail.com,
    /// outlook.office365.com, ...) and loopback: host names, `*.example.com` patterns or IP
    /// addresses, comma-separated. The check sends a live access token: it goes nowhere else.
    #[arg(long, env = "MIO_MAILBOX_ALLOWED_HOSTS", value_delimiter = ',')]
    mailbox_allowed_hosts: Vec<String>,
    /// Let spec.oauth.endpoints replace Google's and Microsoft's own endpoints (for a test double
    /// or a proxy). Off: such an integration is refused with EndpointOverrideNotAllowed.
    #[arg(long, env = "MIO_ALLOW_ENDPOINT_OVERRIDES")]
    allow_endpoint_overrides: bool,
}

fn parse_public_url(s: &str) -> Result<url::Url, String> {
    signin::parse_public_url(s)
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d: kube::core::Duration = s
        .parse()
        .map_err(|e| format!("{s:?} is not a duration such as 1h or 30m: {e}"))?;
    let d = std::time::Duration::from(d);
    if d < std::time::Duration::from_secs(60) {
        return Err(format!("{s:?} is shorter than a minute"));
    }
    Ok(d)
}

/// `[NAMESPACE/]NAME` of the key Secret.
fn key_secret_ref(s: &str) -> anyhow::Result<(String, String)> {
    let (ns, name) = match s.split_once('/') {
        Some((ns, name)) => (ns.to_owned(), name.to_owned()),
        None => (
            std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            s.to_owned(),
        ),
    };
    anyhow::ensure!(
        !ns.is_empty() && !name.is_empty() && !name.contains('/'),
        "--sign-in-key-secret must be NAME or NAMESPACE/NAME, got {s:?}"
    );
    Ok((ns, name))
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
    tokio::spawn(mail_integration_operator::web::serve::serve(
        listener,
        health,
        Default::default(),
    ));

    let oauth = OAuthClient::new().context("building the HTTP client")?;
    let providers = ProviderResolver::new(oauth.http_client().clone())
        .with_endpoint_overrides(args.allow_endpoint_overrides);
    let (key_ns, key_name) = key_secret_ref(&args.sign_in_key_secret)?;
    let key = signin::key::load_or_create(client.clone(), &key_ns, &key_name).await?;
    let signer = Signer::new(key).map_err(anyhow::Error::msg)?;
    let mut config = SignInConfig::new(args.public_url.clone());
    config.link_ttl = args.sign_in_link_ttl;
    let sign_in = SignIn::new(
        config,
        signer,
        Arc::new(
            mail_integration_operator::metrics::sign_ins::CountingBackend::new(
                KubeBackend::new(client.clone()),
                metrics.clone(),
            ),
        ),
        oauth.clone(),
        providers.clone(),
    );
    let listener = tokio::net::TcpListener::bind(args.sign_in_addr)
        .await
        .with_context(|| format!("binding the sign-in address {}", args.sign_in_addr))?;
    info!(
        addr = %listener.local_addr()?,
        public_url = %args.public_url,
        callback = %sign_in.callback_url(),
        "serving the sign-in pages"
    );
    let router = sign_in.router();
    tokio::spawn(mail_integration_operator::web::serve::serve(
        listener,
        router,
        Default::default(),
    ));

    let mut ctx = Context::new(client, oauth, providers, metrics);
    ctx.sign_in = Some(Arc::new(sign_in));
    ctx.revoke_timeout = args.revoke_timeout.into();
    let allowed = mail_integration_operator::mailbox::allowed::AllowedHosts::with_defaults(
        args.mailbox_allowed_hosts.iter().map(String::as_str),
    );
    info!(hosts = %allowed.describe(), "mail hosts the mailbox check may connect to");
    ctx.mailbox = ctx.mailbox.with_allowed_hosts(allowed);
    let ctx = Arc::new(ctx);
    // SIGTERM / SIGINT: the controller stops taking reconciles and lets the running ones finish.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    info!(
        namespaces = %if args.namespace.is_empty() { "(all)".to_owned() } else { args.namespace.join(",") },
        "watching MailIntegrations"
    );
    if args.leader_election {
        let lease_ns = args
            .leader_election_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into());
        let identity = std::env::var("POD_NAME")
            .unwrap_or_else(|_| format!("mail-integration-operator-{}", rand::random::<u32>()));
        run_as_leader(
            ctx,
            args.namespace,
            ready,
            stop,
            &LeaseSettings {
                name: &args.leader_election_lease,
                namespace: &lease_ns,
                identity: &identity,
                seconds: args.leader_election_lease_seconds,
            },
        )
        .await?;
    } else {
        controller::run(ctx, args.namespace, ready, stop).await;
    }
    info!("stopped");
    Ok(())
}

/// Which Lease to hold, as whom, for how long.
#[derive(Clone, Copy)]
struct LeaseSettings<'a> {
    name: &'a str,
    namespace: &'a str,
    identity: &'a str,
    seconds: u64,
}

/// Reconcile only while holding the Lease. Readiness does not depend on leadership: a standby is
/// ready (it serves the sign-in pages) while it waits.
async fn run_as_leader(
    ctx: Arc<Context>,
    namespace: Vec<String>,
    ready: Arc<AtomicBool>,
    stop: tokio::sync::watch::Receiver<bool>,
    lease: &LeaseSettings<'_>,
) -> anyhow::Result<()> {
    let LeaseSettings {
        name: lease,
        namespace: lease_ns,
        identity,
        seconds: lease_seconds,
    } = *lease;
    let manager = kube_lease_manager::LeaseManagerBuilder::new(ctx.client.clone(), lease)
        .with_namespace(lease_ns)
        .with_identity(identity)
        .with_duration(lease_seconds)
        .with_grace((lease_seconds / 3).max(1))
        .build()
        .await
        .context("setting up leader election")?;
    let (mut leader, task) = manager.watch().await;
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    info!(lease, lease_ns, identity, "waiting for leadership");
    let mut stopping = stop.clone();
    let mut shutdown = std::pin::pin!(async move {
        let _ = stopping.wait_for(|s| *s).await;
    });
    loop {
        while !*leader.borrow_and_update() {
            tokio::select! {
                changed = leader.changed() => changed.context("leader election stopped")?,
                _ = &mut shutdown => break,
            }
        }
        info!(identity, "became the leader: reconciling");
        let mut running = tokio::spawn(controller::run(
            ctx.clone(),
            namespace.clone(),
            ready.clone(),
            stop.clone(),
        ));
        tokio::select! {
            // The controller ends only on a signal; ending otherwise must not leave a pod that
            // holds the Lease and reports healthy while nothing refreshes.
            ended = &mut running, if !*stop.borrow() => {
                drop(leader);
                if let Ok(Ok(manager)) = task.await {
                    let _ = manager.release().await;
                }
                anyhow::bail!("the controller stopped while leading ({}): restarting", match ended {
                    Ok(()) => "it returned".to_owned(),
                    Err(e) => e.to_string(),
                });
            }
            _ = async { while *leader.borrow_and_update() { if leader.changed().await.is_err() { break } } } => {
                info!(identity, "lost leadership: stopping reconciles");
                running.abort();
            }
            _ = &mut shutdown => {
                // The controller saw the same signal: give its running reconciles a moment.
                if tokio::time::timeout(std::time::Duration::from_secs(20), &mut running).await.is_err() {
                    running.abort();
                }
                break;
            }
        }
    }
    // Hand the Lease over at once instead of letting it expire.
    drop(leader);
    if let Ok(Ok(manager)) = task.await
        && let Err(e) = manager.release().await
    {
        tracing::warn!(error = %e, "could not release the Lease");
    }
    Ok(())
}

/// SIGINT (Ctrl-C) or SIGTERM (what Kubernetes sends).
async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(*args).await?,
        Command::Crd => print!("{}", mail_integration_operator::api::crd_yaml()),
    }
    Ok(())
}
