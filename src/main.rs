#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use mail_integration_operator::{
    kube_client,
    lease::{self, Fence, LeaseConfig},
    sync::GrantLocks,
};
use mail_integration_operator::{
    metrics::Metrics,
    oauth::OAuthClient,
    provider::ProviderResolver,
    reconcile::{
        context::{self, Context},
        held,
        template::sandbox,
        watches,
    },
    web::{
        health::{self, HealthState},
        signin::{self, KubeBackend, SignIn, SignInConfig, Signer},
    },
};
use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
};
use tracing::{info, warn};

// See Cargo.toml: jemalloc with background purging instead of the platform's allocator.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Run the mail gateway: IMAP, POP3 and SMTP for apps with gateway credentials
    /// (spec.gateway), with the integrations' access tokens upstream (docs/gateway.md).
    Gateway(Box<GatewayCommand>),
}

#[derive(clap::Args, Debug)]
struct GatewayCommand {
    /// Log format.
    #[arg(long, env = "MIO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    gateway: mail_integration_operator::gateway::GatewayArgs,
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
    /// What deleting a MailIntegration does to its grant Secret when its spec.grantDeletionPolicy is
    /// unset: Delete (it goes with it) or Retain (it stays for a re-created integration of the same
    /// name, client and mailbox; never for one with spec.revokeOnDelete).
    #[arg(long, env = "MIO_GRANT_DELETION_POLICY", default_value = "Delete", value_parser = ["Delete", "Retain"])]
    grant_deletion_policy: String,
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
    /// Seconds a leader's Lease stays valid without renewal: a standby takes over after this. The
    /// leader renews it every third of this (one conditional write each); it stops refreshing once
    /// four fifths of it passed since its last acknowledged renewal was sent, and steps down once
    /// all of it passed.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=3600))]
    leader_election_lease_seconds: u64,
    /// On SIGTERM, how long running refreshes may take to store their result before the process
    /// exits (a grant the API server did not take is retried until then); on a lost Lease, how long
    /// running refreshes may take. The default covers one refresh's worst case (write-ahead mark
    /// 10 s + provider 30 s + grant store 20 s). Keep it below the pod's
    /// terminationGracePeriodSeconds.
    #[arg(long, env = "MIO_SHUTDOWN_TIMEOUT", default_value = "70s", value_parser = parse_any_duration)]
    shutdown_timeout: std::time::Duration,
    /// /readyz fails while a watch (of the integrations or the operator's Secrets) has been
    /// failing for longer than this: the caches are stale (the API server out of reach, RBAC
    /// taken away). The gauge mailintegration_watch_failing_seconds shows each watch.
    #[arg(long, env = "MIO_WATCH_FAILURE_LIMIT", default_value = "2m", value_parser = parse_any_duration)]
    watch_failure_limit: std::time::Duration,
    /// Test only, hidden, never set by the chart or the kustomize base: divide the protocol's
    /// windows (write-ahead mark window, mark-write budget, holder grace, provider request
    /// timeout, store deadline, mailbox check interval) by this (1-10). docs/operations.md,
    /// "Settings for tests only".
    #[arg(long, env = "MIO_TEST_PROTOCOL_SCALE", hide = true, value_parser = clap::value_parser!(u32).range(1..=10))]
    test_protocol_scale: Option<u32>,
    /// Requests per second to the Kubernetes API at most, whatever the API server's signals: a
    /// hard cap over the adaptive limit (or the fixed limit with --kube-api-adaptive=false). 0: no
    /// cap.
    #[arg(long, env = "MIO_KUBE_API_QPS", default_value_t = 0)]
    kube_api_qps: u64,
    /// Adapt the request rate to the Kubernetes API server: start at 100 requests/s, grow while it
    /// answers promptly, halve on a 429 (API Priority and Fairness) or slow answers. false: a fixed
    /// limit of --kube-api-qps (none when 0). Either way a 429 is retried after its Retry-After.
    #[arg(long, env = "MIO_KUBE_API_ADAPTIVE", default_value_t = true, action = clap::ArgAction::Set)]
    kube_api_adaptive: bool,
    /// Reconciles that run at once: bounds memory and the requests in flight when thousands of
    /// integrations come due together (a refresh waits for the token endpoint, so more than the
    /// API server's own concurrency helps when the provider is slow).
    #[arg(long, env = "MIO_CONCURRENCY", default_value_t = context::DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// The lowest interval between two token requests of one integration, whatever the provider's
    /// `expires_in` or a refresh request (the refresh-requested-at annotation) asks for: a token
    /// that lives shorter is refreshed once per interval (Ready=False, TokenLifetimeTooShort), and
    /// a request within it waits until it is over.
    #[arg(long, env = "MIO_MIN_REFRESH_INTERVAL", default_value = "30s", value_parser = parse_min_refresh_interval)]
    min_refresh_interval: std::time::Duration,
    /// The percentage of the reconciles (--concurrency) that one namespace may have waiting for
    /// providers (token, discovery and revocation requests) at once, of the mailbox checks that
    /// run at once (--mailbox-check-concurrency) and of the template renderers that run at once
    /// (2): a namespace whose servers or templates are slow keeps the rest free for the others.
    /// Calls over it are deferred by a few seconds. 100: no per-namespace limit.
    #[arg(long, env = "MIO_MAX_NAMESPACE_SHARE", default_value_t = mail_integration_operator::reconcile::share::DEFAULT_MAX_NAMESPACE_SHARE, value_parser = clap::value_parser!(u8).range(1..=100))]
    max_namespace_share: u8,
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
    /// How long a sign-in link in status.signIn.url works (Go duration, at least 15m, e.g. 1h, 30m).
    #[arg(long, env = "MIO_SIGN_IN_LINK_TTL", default_value = "1h", value_parser = parse_duration)]
    sign_in_link_ttl: std::time::Duration,
    /// Mail hosts the mailbox check may connect to, besides the providers' own (imap.gmail.com,
    /// outlook.office365.com, ...): host names, `*.example.com` patterns, IP addresses or networks
    /// (`10.20.0.0/16`), comma-separated. A listed name that resolves to a loopback, link-local,
    /// private or other special address is refused unless that address or its network is listed
    /// too. The check sends a live access token: it goes nowhere else.
    #[arg(long, env = "MIO_MAILBOX_ALLOWED_HOSTS", value_delimiter = ',')]
    mailbox_allowed_hosts: Vec<String>,
    /// How long a first refresh's status write waits for the mailbox check the new token makes due
    /// (Go duration, at most 10s; 0s: never), so that it writes Ready and MailboxConnected in one
    /// status write. Only while no result is known, and at most --mailbox-check-concurrency
    /// refreshes, never more than half --concurrency, wait at once (the others wait for one of
    /// them to finish while they are being freed: at most 1 s, and 250 ms once none was); a slower
    /// check reports in a status write of its own, so Ready is late by at most this.
    #[arg(long, env = "MIO_MAILBOX_CHECK_WAIT", default_value = "3s", value_parser = parse_mailbox_check_wait)]
    mailbox_check_wait: std::time::Duration,
    /// Mailbox checks that run at once (each a connection and a login to a mail server, at most
    /// 10 s); as many first refreshes (at most half --concurrency) may wait for theirs
    /// (--mailbox-check-wait). One namespace runs at most its share (--max-namespace-share). Raise
    /// it when many integrations start at once against slow mail servers: a check a refresh
    /// cannot wait for reports in a status write of its own.
    #[arg(long, env = "MIO_MAILBOX_CHECK_CONCURRENCY", default_value_t = mail_integration_operator::reconcile::mailbox_check::DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..=256))]
    mailbox_check_concurrency: u16,
    /// Let spec.oauth.endpoints replace Google's and Microsoft's own endpoints (for a test double
    /// or a proxy). Off: such an integration is refused with EndpointOverrideNotAllowed.
    #[arg(long, env = "MIO_ALLOW_ENDPOINT_OVERRIDES")]
    allow_endpoint_overrides: bool,
    /// For development and tests only: let specs name endpoints on loopback (localhost,
    /// 127.0.0.0/8, ::1; http is allowed only there) and let the mailbox check connect to mail
    /// servers on loopback. Off (the default, and in the chart): on loopback are the pod's own
    /// sidecars (an Envoy admin API on 127.0.0.1:15000, say), which no spec may reach.
    #[arg(long, env = "MIO_ALLOW_LOOPBACK")]
    allow_loopback: bool,
    /// The host name apps reach the mail gateway at, written into every gateway credential Secret
    /// (`<integration>-gateway-<app>`; default: mail-integration-operator-gateway.$POD_NAMESPACE.svc).
    #[arg(long, env = "MIO_GATEWAY_HOST", value_parser = parse_gateway_host)]
    gateway_host: Option<String>,
    /// The gateway Service's IMAP port with STARTTLS, as written into the credential Secrets.
    #[arg(long, env = "MIO_GATEWAY_IMAP_PORT", default_value_t = 143)]
    gateway_imap_port: u16,
    /// The gateway Service's IMAPS (implicit TLS) port, as written into the credential Secrets.
    #[arg(long, env = "MIO_GATEWAY_IMAPS_PORT", default_value_t = 993)]
    gateway_imaps_port: u16,
    /// The gateway Service's POP3S (implicit TLS) port, as written into the credential Secrets.
    #[arg(long, env = "MIO_GATEWAY_POP3S_PORT", default_value_t = 995)]
    gateway_pop3s_port: u16,
    /// The gateway Service's SMTP submission port with STARTTLS, as written into the credential Secrets.
    #[arg(long, env = "MIO_GATEWAY_SMTP_PORT", default_value_t = 587)]
    gateway_smtp_port: u16,
    /// The gateway Service's SMTPS (implicit TLS) port, as written into the credential Secrets.
    #[arg(long, env = "MIO_GATEWAY_SMTPS_PORT", default_value_t = 465)]
    gateway_smtps_port: u16,
}

/// A host name or IP address for the gateway credentials' URLs: nothing that would change a URL's
/// meaning (`/`, `@`, `?`, `#`, spaces) or be empty.
fn parse_gateway_host(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a host name or IP address (letters, digits, '.', '-'; an IPv6 address in [ ])"
        ))
    }
}

fn parse_public_url(s: &str) -> Result<url::Url, String> {
    signin::parse_public_url(s)
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d: kube::core::Duration = s
        .parse()
        .map_err(|e| format!("{s:?} is not a duration such as 1h or 30m: {e}"))?;
    let d = std::time::Duration::from(d);
    // A link is renewed once it has less than 10 minutes left (and 5 minutes before it expires):
    // a shorter lifetime would have every reconcile write a new one.
    if d < std::time::Duration::from_secs(15 * 60) {
        return Err(format!("{s:?} is shorter than 15 minutes"));
    }
    Ok(d)
}

fn parse_min_refresh_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_any_duration(s)?;
    if d < std::time::Duration::from_secs(1) || d > std::time::Duration::from_secs(3600) {
        return Err(format!("{s:?} is not between 1s and 1h"));
    }
    Ok(d)
}

fn parse_mailbox_check_wait(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_any_duration(s)?;
    if d > std::time::Duration::from_secs(10) {
        return Err(format!("{s:?} is longer than 10s"));
    }
    Ok(d)
}

fn parse_any_duration(s: &str) -> Result<std::time::Duration, String> {
    let d: kube::core::Duration = s
        .parse()
        .map_err(|e| format!("{s:?} is not a duration such as 40s or 1m: {e}"))?;
    Ok(d.into())
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
    mail_integration_operator::api::set_default_grant_deletion_policy(
        match args.grant_deletion_policy.as_str() {
            "Retain" => mail_integration_operator::api::GrantDeletionPolicy::Retain,
            _ => mail_integration_operator::api::GrantDeletionPolicy::Delete,
        },
    );
    init_tracing(args.log_format);
    if let Some(n) = args.test_protocol_scale {
        mail_integration_operator::time::set_test_scale(n);
        warn!(
            scale = n,
            "--test-protocol-scale is set: the refresh protocol's windows are divided for tests; never use it in production"
        );
    }
    let kube_config = kube::Config::infer()
        .await
        .context("finding the Kubernetes API (in-cluster, $KUBECONFIG or ~/.kube/config)")?;
    let mut metrics = Metrics::default();
    let api_metrics = kube_client::ApiMetrics::default();
    api_metrics.register(&mut metrics.registry);
    let client = kube_client::client(
        &kube_config,
        kube_client::Settings::from_flags(args.kube_api_qps, args.kube_api_adaptive),
        api_metrics,
    )
    .context("building the Kubernetes client")?;
    let metrics = Arc::new(metrics);
    let ready = Arc::new(AtomicBool::new(false));

    let health = health::router(HealthState {
        metrics: metrics.clone(),
        ready: ready.clone(),
        watch_failure_limit: args.watch_failure_limit,
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

    // Without --allow-loopback, no name a spec or a provider gives may lead into the pod either.
    let oauth = if args.allow_loopback {
        OAuthClient::new()
    } else {
        OAuthClient::not_to_own_host()
    }
    .context("building the HTTP client")?;
    let providers = ProviderResolver::new(oauth.http_client().clone())
        .with_endpoint_overrides(args.allow_endpoint_overrides)
        .with_loopback(args.allow_loopback);
    let (key_ns, key_name) = key_secret_ref(&args.sign_in_key_secret)?;
    let key = signin::key::load_or_create(client.clone(), &key_ns, &key_name).await?;
    let signer = Signer::new(key).map_err(anyhow::Error::msg)?;
    let mut config = SignInConfig::new(args.public_url.clone());
    config.link_ttl = args.sign_in_link_ttl;
    // Scaled for tests only (--test-protocol-scale), like the provider request timeout.
    let sign_in_limits = mail_integration_operator::web::serve::Limits {
        request_timeout: mail_integration_operator::time::scaled(
            mail_integration_operator::web::serve::Limits::default().request_timeout,
        ),
        ..Default::default()
    };
    config.request_timeout = sign_in_limits.request_timeout;
    let grant_locks = Arc::new(GrantLocks::default());
    let written = Arc::new(mail_integration_operator::reconcile::cache::WrittenVersions::default());
    let sign_in = SignIn::new(
        config,
        signer,
        Arc::new(
            mail_integration_operator::web::signin::counting::CountingBackend::new(
                KubeBackend::new(client.clone())
                    .with_grant_locks(grant_locks.clone(), written.clone()),
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
        sign_in_limits,
    ));

    let mut ctx = Context::new(client, oauth, providers, metrics);
    ctx.grant_locks = grant_locks;
    ctx.written = written;
    ctx.concurrency = args.concurrency;
    ctx.pace = mail_integration_operator::reconcile::decide::Pace {
        min_refresh_interval: args.min_refresh_interval,
    };
    ctx.provider_share = mail_integration_operator::reconcile::share::NamespaceShare::new(
        mail_integration_operator::reconcile::share::share_of(
            usize::from(args.concurrency),
            args.max_namespace_share,
        ),
    );
    ctx.renderer = Arc::new(
        mail_integration_operator::reconcile::template::Renderer::of_this_binary()
            .with_namespace_share(args.max_namespace_share),
    );
    if args.leader_election {
        ctx.fence = Arc::new(Fence::leased());
    }
    ctx.sign_in = Some(Arc::new(sign_in));
    ctx.revoke_timeout = args.revoke_timeout.into();
    let mut allowed = mail_integration_operator::mailbox::allowed::AllowedHosts::with_defaults(
        args.mailbox_allowed_hosts.iter().map(String::as_str),
    );
    if args.allow_loopback {
        allowed = allowed.with_loopback();
    }
    info!(hosts = %allowed.describe(), "mail hosts the mailbox check may connect to");
    ctx.mailbox = Arc::new(
        mail_integration_operator::reconcile::mailbox_check::MailboxChecker::new(
            usize::from(args.mailbox_check_concurrency),
            mail_integration_operator::mailbox::DEFAULT_TIMEOUT,
            ctx.metrics.clone(),
        )
        .with_namespace_share(args.max_namespace_share)
        .with_reconcile_workers(usize::from(args.concurrency))
        .with_allowed_hosts(allowed)
        .with_join_wait(args.mailbox_check_wait),
    );
    let ctx = Arc::new(ctx);
    let credentials = Arc::new(
        mail_integration_operator::gateway::credentials::Credentials {
            client: ctx.client.clone(),
            settings: mail_integration_operator::gateway::credentials::GatewaySettings {
                host: args.gateway_host.clone().unwrap_or_else(|| {
                    mail_integration_operator::gateway::credentials::default_host(
                        std::env::var("POD_NAMESPACE").ok().as_deref(),
                    )
                }),
                ports: mail_integration_operator::gateway::credentials::GatewayPorts {
                    imap: args.gateway_imap_port,
                    imaps: args.gateway_imaps_port,
                    pop3s: args.gateway_pop3s_port,
                    smtp: args.gateway_smtp_port,
                    smtps: args.gateway_smtps_port,
                },
            },
            metrics: ctx.metrics.clone(),
        },
    );
    // SIGTERM / SIGINT: no new provider call from now on (the fence closes at once, with or without
    // leader election); the controller stops taking reconciles and lets the running ones finish.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let fence = ctx.fence.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        fence.close();
        let _ = stop_tx.send(true);
    });
    info!(
        namespaces = %if args.namespace.is_empty() { "(all)".to_owned() } else { args.namespace.join(",") },
        "watching MailIntegrations"
    );
    if args.leader_election {
        let lease = LeaseConfig {
            name: args.leader_election_lease.clone(),
            namespace: args
                .leader_election_namespace
                .clone()
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "default".into()),
            identity: std::env::var("POD_NAME")
                .unwrap_or_else(|_| format!("mail-integration-operator-{}", rand::random::<u32>())),
            duration: std::time::Duration::from_secs(args.leader_election_lease_seconds),
        };
        let lease_client =
            lease::lease_client(&kube_config, &lease).context("building the Lease client")?;
        run_as_leader(
            Controllers {
                ctx,
                credentials,
                namespace: args.namespace,
                ready,
            },
            stop,
            lease_client,
            &lease,
            args.shutdown_timeout,
        )
        .await?;
    } else {
        let mut running = Controllers {
            ctx: ctx.clone(),
            credentials,
            namespace: args.namespace,
            ready,
        }
        .spawn(stop.clone());
        let mut stopping = stop;
        tokio::select! {
            _ = &mut running => {}
            _ = stopping.wait_for(|s| *s) => {
                let deadline = deadline_after(args.shutdown_timeout);
                drain(running, deadline).await;
                held::store_held(&ctx, deadline).await;
            }
        }
    }
    info!("stopped");
    Ok(())
}

/// The controllers of a leader: the main one (tokens, status) and the gateway credentials.
struct Controllers {
    ctx: Arc<Context>,
    credentials: Arc<mail_integration_operator::gateway::credentials::Credentials>,
    namespace: Vec<String>,
    ready: Arc<AtomicBool>,
}

impl Controllers {
    /// Run both until `stop`.
    fn spawn(self, stop: tokio::sync::watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            tokio::join!(
                watches::run(self.ctx, self.namespace.clone(), self.ready, stop.clone()),
                mail_integration_operator::gateway::credentials::run(
                    self.credentials,
                    self.namespace,
                    stop
                ),
            );
        })
    }
}

/// `timeout` from now (far in the future if that overflows).
fn deadline_after(timeout: std::time::Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(86_400 * 365))
}

/// Let the running reconciles finish (the controller takes no new ones once told to stop), until
/// `deadline`: a refresh that has the provider's answer stores it within `secrets::STORE_DEADLINE`,
/// or holds it in memory for [`held::store_held`]. The default `--shutdown-timeout` covers a refresh's
/// worst case (docs/operations.md), so no refresh holding a token is aborted.
async fn drain(mut running: tokio::task::JoinHandle<()>, deadline: tokio::time::Instant) {
    info!(
        deadline_s = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .as_secs(),
        "stopping: no new provider calls; letting running refreshes store their results"
    );
    if tokio::time::timeout_at(deadline, &mut running)
        .await
        .is_err()
    {
        tracing::warn!("running reconciles did not finish in time; stopping them");
        running.abort();
    }
}

/// Reconcile only while holding the Lease, and only while the [`Fence`] confirms it. Readiness
/// does not depend on leadership: a standby is ready (it serves the sign-in pages) while it waits.
/// Losing leadership drains the running reconciles and ends the process with an error, so that
/// Kubernetes restarts it as a standby with nothing left over from its time as the leader.
async fn run_as_leader(
    controllers: Controllers,
    stop: tokio::sync::watch::Receiver<bool>,
    lease_client: kube::Client,
    lease: &LeaseConfig,
    shutdown_timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(lease_client, &lease.namespace);
    let ctx = controllers.ctx.clone();
    let fence = ctx.fence.clone();
    let (leader_tx, mut leader) = tokio::sync::watch::channel(false);
    let electing = tokio::spawn(lease::elect::run(
        api.clone(),
        lease.clone(),
        fence.clone(),
        leader_tx,
    ));
    controllers
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    info!(lease = %lease.name, namespace = %lease.namespace, identity = %lease.identity, "waiting for leadership");
    let mut stopping = stop.clone();
    let mut shutdown = std::pin::pin!(async move {
        let _ = stopping.wait_for(|s| *s).await;
    });
    let release = |electing: tokio::task::JoinHandle<()>| {
        let api = api.clone();
        async move {
            // Hand the Lease over at once instead of letting it expire (nothing when another
            // holds it).
            electing.abort();
            let _ = electing.await;
            if let Err(e) = lease::elect::release(&api, lease).await {
                tracing::warn!(error = %e, "could not release the Lease");
            }
        }
    };
    // Wait until this process holds the Lease.
    loop {
        let leads = *leader.borrow_and_update();
        if leads && fence.check().is_ok() {
            break;
        }
        tokio::select! {
            changed = leader.changed() => changed.context("leader election stopped")?,
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
            _ = &mut shutdown => {
                release(electing).await;
                return Ok(());
            }
        }
    }
    info!(identity = %lease.identity, "became the leader: reconciling");
    let (term_tx, term) = tokio::sync::watch::channel(false);
    let mut running = controllers.spawn(term);
    // A fence lapsed for a slow renewal only pauses provider calls; leadership ends when the
    // election gives it up (another holder, or no renewal acknowledged for the whole duration).
    let lost = async {
        loop {
            if !*leader.borrow_and_update() {
                return;
            }
            tokio::select! {
                changed = leader.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
            }
        }
    };
    let outcome: Result<std::convert::Infallible, Stopped> = tokio::select! {
        // The controller ends only when told to; ending otherwise must not leave a pod that holds
        // the Lease and reports healthy while nothing refreshes.
        ended = &mut running => Err(Stopped::Ended(anyhow::anyhow!("the controller stopped while leading ({}): restarting", match ended {
            Ok(()) => "it returned".to_owned(),
            Err(e) => e.to_string(),
        }))),
        _ = lost => {
            // Refuse new provider calls at once and for good (a renewal finishing during the drain
            // cannot open the fence again); refreshes that have an answer still store it (their
            // writes are conditional on the write-ahead mark, not on the Lease).
            fence.close();
            tracing::warn!(identity = %lease.identity, "lost the Lease (not renewed in time, or taken over): stopping reconciles");
            let _ = term_tx.send(true);
            drain(running, deadline_after(shutdown_timeout)).await;
            Err(Stopped::LostLease)
        }
        _ = &mut shutdown => {
            // The fence was closed when the signal came.
            let deadline = deadline_after(shutdown_timeout);
            let _ = term_tx.send(true);
            drain(running, deadline).await;
            Err(Stopped::Signal(deadline))
        }
    };
    fence.close();
    release(electing).await;
    // The grants still held in memory are stored before the exit, the Lease already released (a
    // new leader waits for this process's write-ahead marks meanwhile).
    match outcome {
        Ok(never) => match never {},
        Err(Stopped::Ended(e)) => Err(e),
        Err(Stopped::Signal(deadline)) => {
            held::store_held(&ctx, deadline).await;
            Ok(())
        }
        Err(Stopped::LostLease) => {
            held::store_held(&ctx, deadline_after(held::HELD_GRANT_BOUND)).await;
            Err(anyhow::anyhow!(
                "lost leadership of Lease {}/{}: exiting to restart as a standby",
                lease.namespace,
                lease.name
            ))
        }
    }
}

/// Why a leader stops leading.
enum Stopped {
    /// The controller ended by itself.
    Ended(anyhow::Error),
    /// The Lease was lost.
    LostLease,
    /// SIGTERM / SIGINT, with the drain's deadline.
    Signal(tokio::time::Instant),
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

fn main() -> anyhow::Result<()> {
    // A renderer child of spec.tokenSecret.template (see reconcile::template::sandbox): before any
    // thread or runtime exists, so that its memory limit covers little more than the template.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == sandbox::SUBCOMMAND)
    {
        std::process::exit(sandbox::child_main());
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(run(*args))?,
        Command::Crd => print!("{}", mail_integration_operator::api::crd_yaml()),
        Command::Gateway(args) => {
            init_tracing(args.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(mail_integration_operator::gateway::run(args.gateway))?
        }
    }
    Ok(())
}
