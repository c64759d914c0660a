//! The mail gateway (`mail-integration-operator gateway`): IMAP, POP3 and SMTP for apps that speak
//! passwords only, with the operator's access tokens upstream (docs/gateway.md).
//!
//! The operator writes, per integration with `spec.gateway`, a gateway Secret holding the current
//! access token and [`config::GatewayConfig`] (verifiers of the apps' passwords, never a password);
//! the gateway reads only those Secrets ([`directory`]). Stateless: replicas share nothing and
//! serve at once.
//!
//! A connection goes: [`listen`] (TLS, plaintext policy, connection cap) → a protocol handler's
//! `serve` ([`imap`], [`pop3`], `smtp`) → [`session::Login`] ([`login::Gate`]: [`throttle`],
//! verifiers, session cap) → [`upstream`] (the integration's server, XOAUTH2/OAUTHBEARER) →
//! [`relay`].

pub mod config;
pub mod credentials;
pub mod crypto;
pub mod directory;
pub mod imap;
pub mod listen;
pub mod login;
pub mod logout;
pub mod metrics;
pub mod parked;
pub mod pop3;
pub mod prelogin;
pub mod relay;
pub mod reuse;
pub mod session;
pub mod smtp;
pub mod stream;
pub mod throttle;
pub mod upstream;
pub mod usage;
pub mod wire;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use ipnet::IpNet;
use tokio::{net::TcpListener, sync::Semaphore};

use crate::mailbox::allowed::AllowedHosts;
use listen::{Certificates, ClientStream, Port, TlsState};
use session::Protocol;

/// Bounds on what an app may do (flags with defaults; GATEWAY.md "Bounds").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Longest command line before login.
    pub max_line: usize,
    /// Longest IMAP literal before login.
    pub max_literal: usize,
    /// Commands before login; the connection is closed past it.
    pub max_commands_before_login: usize,
    /// Idle time before login.
    pub pre_login_idle: Duration,
    /// Idle time of a relayed session (POP3, SMTP).
    pub idle: Duration,
    /// Idle time of a relayed IMAP session (longer than IDLE's 29-minute renewals).
    pub imap_idle: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            max_line: 8 * 1024,
            max_literal: 8 * 1024,
            max_commands_before_login: 10,
            pre_login_idle: Duration::from_secs(30),
            idle: Duration::from_secs(30 * 60),
            imap_idle: Duration::from_secs(31 * 60),
        }
    }
}

/// What every protocol handler gets: the login, the upstream rules, metrics and bounds.
pub struct Ctx {
    pub login: Arc<login::Gate>,
    /// The SMTP sessions' server (helper G3's `smtp`), sharing the login.
    pub smtp: smtp::SmtpServer<login::Gate>,
    pub allowed: Arc<AllowedHosts>,
    pub metrics: Arc<metrics::GatewayMetrics>,
    pub bounds: Bounds,
    /// The name in greetings (`--hostname`).
    pub hostname: String,
    /// Parked upstream IMAP sessions (`--imap-reuse-*`).
    pub parked: Arc<parked::Pool>,
}

/// `mail-integration-operator gateway`: the flags (each also an environment variable, for the chart).
#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    /// Watch the gateway Secrets of this namespace only; repeat or comma-separate for several
    /// (default: all namespaces).
    #[arg(long, env = "MIO_WATCH_NAMESPACE", value_delimiter = ',')]
    pub namespace: Vec<String>,
    /// PEM certificate chain the gateway presents (re-read every minute, for cert-manager renewals).
    #[arg(long, env = "MIO_GATEWAY_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// PEM private key of the certificate.
    #[arg(long, env = "MIO_GATEWAY_TLS_KEY")]
    pub tls_key: PathBuf,
    /// Address the mail ports listen on.
    #[arg(long, env = "MIO_GATEWAY_LISTEN", default_value = "0.0.0.0")]
    pub listen: IpAddr,
    /// IMAP with implicit TLS (0: off).
    #[arg(long, env = "MIO_GATEWAY_IMAPS_PORT", default_value_t = 993)]
    pub imaps_port: u16,
    /// IMAP with STARTTLS (0: off).
    #[arg(long, env = "MIO_GATEWAY_IMAP_PORT", default_value_t = 143)]
    pub imap_port: u16,
    /// POP3 with implicit TLS (0: off).
    #[arg(long, env = "MIO_GATEWAY_POP3S_PORT", default_value_t = 995)]
    pub pop3s_port: u16,
    /// POP3 with STLS (0: off, the default).
    #[arg(long, env = "MIO_GATEWAY_POP3_PORT", default_value_t = 0)]
    pub pop3_port: u16,
    /// SMTP submission with STARTTLS (0: off).
    #[arg(long, env = "MIO_GATEWAY_SUBMISSION_PORT", default_value_t = 587)]
    pub submission_port: u16,
    /// SMTP submission with implicit TLS (0: off).
    #[arg(long, env = "MIO_GATEWAY_SUBMISSIONS_PORT", default_value_t = 465)]
    pub submissions_port: u16,
    /// Allow logins without TLS on the STARTTLS ports, from --plaintext-networks only.
    #[arg(long, env = "MIO_GATEWAY_ALLOW_PLAINTEXT")]
    pub allow_plaintext: bool,
    /// Networks plaintext logins may come from (with --allow-plaintext); default: private ranges
    /// and loopback.
    #[arg(long, env = "MIO_GATEWAY_PLAINTEXT_NETWORKS", value_delimiter = ',',
          default_values_t = listen::DEFAULT_PLAINTEXT_NETWORKS.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
    pub plaintext_networks: Vec<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "MIO_HEALTH_ADDR", default_value = "0.0.0.0:9090")]
    pub health_addr: SocketAddr,
    /// Extra mail hosts the gateway may connect to, as the operator's flag of the same name.
    #[arg(long, env = "MIO_MAILBOX_ALLOWED_HOSTS", value_delimiter = ',')]
    pub mailbox_allowed_hosts: Vec<String>,
    /// Allow mail servers on loopback (development and tests).
    #[arg(long, env = "MIO_ALLOW_LOOPBACK")]
    pub allow_loopback: bool,
    /// Sessions one credential may have open at once.
    #[arg(
        long,
        env = "MIO_GATEWAY_MAX_SESSIONS_PER_CREDENTIAL",
        default_value_t = 20
    )]
    pub max_sessions_per_credential: usize,
    /// Connections open at once in all (past it new ones are closed at once).
    #[arg(long, env = "MIO_GATEWAY_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,
    /// Longest command line before login, in bytes.
    #[arg(long, env = "MIO_GATEWAY_MAX_LINE", default_value_t = 8192)]
    pub max_line: usize,
    /// Longest IMAP literal before login, in bytes.
    #[arg(long, env = "MIO_GATEWAY_MAX_LITERAL", default_value_t = 8192)]
    pub max_literal: usize,
    /// Commands before login; the connection is closed past it.
    #[arg(
        long,
        env = "MIO_GATEWAY_MAX_COMMANDS_BEFORE_LOGIN",
        default_value_t = 10
    )]
    pub max_commands_before_login: usize,
    /// Idle time before login (e.g. 30s).
    #[arg(long, env = "MIO_GATEWAY_PRE_LOGIN_IDLE", default_value = "30s")]
    pub pre_login_idle: kube::core::Duration,
    /// Idle time of a relayed POP3 or SMTP session.
    #[arg(long, env = "MIO_GATEWAY_IDLE", default_value = "30m")]
    pub idle: kube::core::Duration,
    /// Idle time of a relayed IMAP session (IMAP IDLE renews every 29 minutes).
    #[arg(long, env = "MIO_GATEWAY_IMAP_IDLE", default_value = "31m")]
    pub imap_idle: kube::core::Duration,
    /// How long an authenticated upstream IMAP session stays parked after its app's LOGOUT, for
    /// the same credential's next login (0: off; docs/gateway.md "Reusing upstream IMAP
    /// sessions").
    #[arg(long, env = "MIO_GATEWAY_IMAP_REUSE_IDLE", default_value = "60s")]
    pub imap_reuse_idle: kube::core::Duration,
    /// Parked upstream IMAP sessions per credential at most (counted within
    /// --max-sessions-per-credential).
    #[arg(
        long,
        env = "MIO_GATEWAY_IMAP_REUSE_PER_CREDENTIAL",
        default_value_t = 2
    )]
    pub imap_reuse_per_credential: usize,
    /// Parked upstream IMAP sessions of one integration (all its apps) on this replica at most:
    /// each is a connection the provider counts against the mailbox (Gmail allows 15 IMAP
    /// connections, Exchange Online 20), so idle ones must leave room for active logins.
    #[arg(long, env = "MIO_GATEWAY_IMAP_REUSE_PER_MAILBOX", default_value_t = 4)]
    pub imap_reuse_per_mailbox: usize,
    /// Failed logins per source address or username answered at once.
    #[arg(long, env = "MIO_GATEWAY_LOGIN_BUDGET", default_value_t = 5)]
    pub login_budget: u32,
    /// Failed logins per source address before it is refused (a username: before its failures are
    /// answered "throttled"; its correct password still works).
    #[arg(long, env = "MIO_GATEWAY_LOGIN_REFUSE_AFTER", default_value_t = 20)]
    pub login_refuse_after: u32,
    /// One failed login forgiven per this.
    #[arg(long, env = "MIO_GATEWAY_LOGIN_PERIOD", default_value = "30s")]
    pub login_period: kube::core::Duration,
    /// The delay of a failed login past the budget.
    #[arg(long, env = "MIO_GATEWAY_LOGIN_DELAY", default_value = "2s")]
    pub login_delay: kube::core::Duration,
    /// At most one write of an app's status.gateway.apps[].lastUsedTime per this per replica.
    #[arg(long, env = "MIO_GATEWAY_USAGE_PERIOD", default_value = "1h")]
    pub usage_period: kube::core::Duration,
    /// The name the gateway gives in its greetings.
    #[arg(
        long,
        env = "MIO_GATEWAY_HOSTNAME",
        default_value = "mail-integration-gateway"
    )]
    pub hostname: String,
    /// Requests per second to the Kubernetes API at most, whatever the API server's signals: a
    /// hard cap over the adaptive limit (or the fixed limit with --kube-api-adaptive=false). 0: no
    /// cap. The operator's flag; the gateway's default is a cap of 20, as its needs are a few
    /// watches and at most one status write per app and hour.
    #[arg(long, env = "MIO_KUBE_API_QPS", default_value_t = 20)]
    pub kube_api_qps: u64,
    /// Adapt the request rate to the Kubernetes API server (the operator's flag): grow while it
    /// answers promptly, halve on a 429 (API Priority and Fairness) or slow answers, under
    /// --kube-api-qps. false: a fixed limit of --kube-api-qps (none when 0). Either way a 429,
    /// 503 or 504 is sent again after its Retry-After.
    #[arg(long, env = "MIO_KUBE_API_ADAPTIVE", default_value_t = true, action = clap::ArgAction::Set)]
    pub kube_api_adaptive: bool,
}

impl GatewayArgs {
    fn bounds(&self) -> Bounds {
        Bounds {
            max_line: self.max_line.clamp(512, 1 << 20),
            max_literal: self.max_literal.min(1 << 20),
            max_commands_before_login: self.max_commands_before_login.max(1),
            pre_login_idle: self.pre_login_idle.into(),
            idle: self.idle.into(),
            imap_idle: self.imap_idle.into(),
        }
    }

    /// The listener table: one row per enabled port.
    pub fn ports(&self) -> Vec<Port> {
        [
            (Protocol::Imap, self.imaps_port, true),
            (Protocol::Imap, self.imap_port, false),
            (Protocol::Pop3, self.pop3s_port, true),
            (Protocol::Pop3, self.pop3_port, false),
            (Protocol::Smtp, self.submission_port, false),
            (Protocol::Smtp, self.submissions_port, true),
        ]
        .into_iter()
        .filter(|(_, port, _)| *port != 0)
        .map(|(protocol, port, implicit_tls)| Port {
            protocol,
            port,
            implicit_tls,
        })
        .collect()
    }
}

/// Run the gateway until SIGTERM/SIGINT.
pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let networks: Vec<IpNet> =
        listen::parse_networks(&args.plaintext_networks).map_err(anyhow::Error::msg)?;
    let certs = Arc::new(
        Certificates::load(args.tls_cert.clone(), args.tls_key.clone())
            .map_err(anyhow::Error::msg)
            .context("loading --tls-cert/--tls-key")?,
    );
    let kube_config = kube::Config::infer()
        .await
        .context("finding the Kubernetes API (in-cluster, $KUBECONFIG or ~/.kube/config)")?;
    let metrics = Arc::new(metrics::GatewayMetrics::default());
    // The operator's client layer: requests paced under an adaptive limit, 429/503/504 sent
    // again after their Retry-After, instead of kube's own retry under a fixed limit.
    let client = crate::kube_client::client(
        &kube_config,
        crate::kube_client::Settings::from_flags(args.kube_api_qps, args.kube_api_adaptive),
        metrics.kube_api.clone(),
    )
    .context("building the Kubernetes client")?;
    let directory = Arc::new(directory::Directory::new(metrics.clone()));
    let usage = Arc::new(usage::Usage::new(
        client.clone(),
        metrics.clone(),
        args.usage_period.into(),
    ));
    let mut allowed =
        AllowedHosts::with_defaults(args.mailbox_allowed_hosts.iter().map(String::as_str));
    if args.allow_loopback {
        allowed = allowed.with_loopback();
    }
    tracing::info!(hosts = %allowed.describe(), "mail hosts the gateway may connect to");
    let reuse_idle: Duration = args.imap_reuse_idle.into();
    let parked = parked::Pool::new(
        parked::Settings {
            idle: reuse_idle,
            per_credential: args.imap_reuse_per_credential,
            per_mailbox: args.imap_reuse_per_mailbox,
        },
        directory.clone(),
        metrics.clone(),
    );
    let gate = Arc::new(login::Gate {
        directory: directory.clone(),
        throttle: throttle::Throttle::new(throttle::ThrottleConfig {
            free: args.login_budget,
            refuse: args.login_refuse_after,
            period: args.login_period.into(),
            delay: args.login_delay.into(),
        }),
        counts: Arc::default(),
        metrics: metrics.clone(),
        max_sessions_per_credential: args.max_sessions_per_credential.max(1),
        usage: Some(usage.clone()),
        parked: Some(parked.clone()),
    });
    let allowed = Arc::new(allowed);
    let bounds = args.bounds();
    let reporter = kube::runtime::events::Reporter {
        controller: usage::FIELD_MANAGER.into(),
        instance: std::env::var("POD_NAME").ok().filter(|v| !v.is_empty()),
    };
    let smtp = smtp::SmtpServer {
        login: gate.clone(),
        allowed: allowed.clone(),
        hostname: args.hostname.clone(),
        limits: smtp::Limits {
            commands_before_login: u32::try_from(bounds.max_commands_before_login)
                .unwrap_or(u32::MAX),
            ..Default::default()
        },
        idle_before_login: bounds.pre_login_idle,
        idle_after_login: bounds.idle,
        report: Arc::new(smtp::report::KubeReport::new(
            client.clone(),
            crate::reconcile::events::EventPublisher::new(client.clone(), reporter),
        )),
        metrics: metrics.clone(),
    };
    let ctx = Arc::new(Ctx {
        login: gate,
        smtp,
        allowed,
        metrics: metrics.clone(),
        bounds,
        hostname: args.hostname.clone(),
        parked: parked.clone(),
    });

    // Health first, so that a probe sees "starting" rather than nothing.
    let health = TcpListener::bind(args.health_addr)
        .await
        .with_context(|| format!("listening on {}", args.health_addr))?;
    tracing::info!(addr = %health.local_addr()?, "serving /healthz, /readyz and /metrics");
    tokio::spawn(crate::web::serve::serve(
        health,
        health_router(metrics.clone(), directory.clone()),
        crate::web::serve::Limits::default(),
    ));
    tokio::spawn(
        directory
            .clone()
            .run(client.clone(), args.namespace.clone()),
    );
    tokio::spawn(usage.run());
    {
        let certs = certs.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(listen::CERT_RELOAD_PERIOD);
            loop {
                tick.tick().await;
                certs.reload();
            }
        });
    }
    let connections = Arc::new(Semaphore::new(
        args.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let plaintext = Arc::new((args.allow_plaintext, networks));
    for port in args.ports() {
        let addr = SocketAddr::new(args.listen, port.port);
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr} ({})", port.protocol))?;
        tracing::info!(%addr, protocol = %port.protocol, implicit_tls = port.implicit_tls, "gateway port open");
        tokio::spawn(accept_loop(
            listener,
            port,
            ctx.clone(),
            certs.clone(),
            connections.clone(),
            plaintext.clone(),
        ));
    }
    shutdown_signal().await;
    tracing::info!("gateway stopping");
    // Parked upstream sessions are logged out, not dropped.
    parked.close().await;
    Ok(())
}

fn health_router(
    metrics: Arc<metrics::GatewayMetrics>,
    directory: Arc<directory::Directory>,
) -> axum::Router {
    use axum::{http::StatusCode, routing::get};
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = directory.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.encode();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
}

/// How long to wait after a failed `accept` (out of file descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(200);

async fn accept_loop(
    listener: TcpListener,
    port: Port,
    ctx: Arc<Ctx>,
    certs: Arc<Certificates>,
    connections: Arc<Semaphore>,
    plaintext: Arc<(bool, Vec<IpNet>)>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, port = port.port, "accepting a connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            ctx.metrics.closed(port.protocol, "max_connections");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let source = listen::source(peer);
        let ctx = ctx.clone();
        let acceptor = certs.acceptor();
        let plaintext_login = listen::plaintext_allowed(plaintext.0, &plaintext.1, source.ip());
        tokio::spawn(async move {
            let _permit = permit;
            let (stream, tls) = if port.implicit_tls {
                let mut state = TlsState {
                    tls: true,
                    starttls: None,
                    plaintext_login,
                    greeted: false,
                };
                // The greeting goes out with the handshake (listen::early_greeting).
                let greeting = listen::early_greeting(port.protocol, &state, &ctx.hostname);
                state.greeted = greeting.is_some();
                // Boxed, as each protocol's session below: the task keeps only what the phase it
                // is in needs (an idle relayed session is small; docs/gateway.md "Capacity").
                let handshake = Box::pin(acceptor.accept_with(tcp, |conn| {
                    if let Some(greeting) = &greeting {
                        // Buffered by rustls (far below its limit) until the keys are there.
                        let _ = std::io::Write::write_all(&mut conn.writer(), greeting.as_bytes());
                    }
                }));
                match tokio::time::timeout(ctx.bounds.pre_login_idle, handshake).await {
                    Ok(Ok(tls)) => (ClientStream::Tls(Box::new(tls)), state),
                    _ => {
                        ctx.metrics.closed(port.protocol, "tls");
                        return;
                    }
                }
            } else {
                (
                    ClientStream::Plain(tcp),
                    TlsState {
                        tls: false,
                        starttls: Some(acceptor),
                        plaintext_login,
                        greeted: false,
                    },
                )
            };
            serve(port.protocol, stream, source, tls, ctx).await;
        });
    }
}

/// The listener table's handlers: `async fn serve(stream, source, tls_state, ctx)` per protocol.
pub async fn serve(
    protocol: Protocol,
    stream: ClientStream,
    source: SocketAddr,
    tls: TlsState,
    ctx: Arc<Ctx>,
) {
    match protocol {
        Protocol::Imap => Box::pin(imap::serve(stream, source, tls, ctx)).await,
        Protocol::Pop3 => Box::pin(pop3::serve(stream, source, tls, ctx)).await,
        Protocol::Smtp => {
            let ended = Box::pin(ctx.smtp.serve(smtp::Connection {
                stream: Box::new(stream),
                source,
                tls: tls.tls,
                starttls: tls.starttls,
                plaintext_auth: tls.plaintext_login,
            }))
            .await;
            tracing::debug!(source = %source, protocol = "SMTP", ended = ?ended, "SMTP connection ended");
        }
    }
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
