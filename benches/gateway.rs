//! Gateway benchmark (issue 22): in one run against the same Dovecot (oauth2 passdb at
//! oidc-provider, real delivery through msmtpd and Dovecot's LDA), IMAP logins/s and SMTP
//! messages/s straight to Dovecot (XOAUTH2 with a real access token) and through the gateway
//! process (an app's password; the gateway logs in upstream with XOAUTH2), and the gateway's RSS
//! idle and with many idle logged-in IMAP sessions open through it. The IMAP rates are measured
//! twice: through the gateway as it ships (reuse of upstream IMAP sessions on,
//! MIO_BENCH_GATEWAY_REUSE_IDLE, 60s) and through a second gateway with reuse off
//! (`--imap-reuse-idle=0`: a new upstream session per login), each paired with direct windows;
//! the share of logins that got a parked session is printed with the first.
//!
//!   cargo bench --bench gateway
//!
//! One figure a line, `gateway NAME VALUE [target...]` (benches/README.md "Gateway" explains them).
//! The rates are measured in rounds (MIO_BENCH_GATEWAY_ROUNDS, 5): each round runs the direct and
//! the gateway window back to back, in alternating order, so that the machine's load drifts over
//! both paths alike; each round's ratio is printed, then the median of the rounds and their
//! spread. Where the time of a session goes is printed per step (the client's clock) and, for the
//! gateway's upstream set-up, per step as the gateway logs it.
//! Knobs (environment): MIO_BENCH_GATEWAY_SECONDS (5: each IMAP window of a round; SMTP windows
//! are twice as long), MIO_BENCH_GATEWAY_ROUNDS (5),
//! MIO_BENCH_GATEWAY_CONCURRENCY (8: clients at once, the same on both paths),
//! MIO_BENCH_GATEWAY_SESSIONS (10000: idle IMAP sessions), MIO_BENCH_GATEWAY_PER_SESSION (5:
//! messages per SMTP session in the batched case), MIO_BENCH_GATEWAY_SMTP_UPSTREAM (`starttls`:
//! the gateway reaches Dovecot's submission port with STARTTLS, as it does Microsoft's; `implicit`:
//! its submissions port with implicit TLS, the port the direct clients use).

#[path = "../tests/support/mod.rs"]
mod support;

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use mail_integration_operator::{
    api::TlsMode,
    gateway::{
        config::{
            self, GatewayAppConfig, GatewayConfig, UpstreamMechanism, UpstreamServer, Verifier,
        },
        session::Protocol,
    },
    secret::SecretValue,
};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use support::{
    dovecot::{Dovecot, DovecotConfig},
    world::Env,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

const MAILBOX: &str = "alice@example.test";
const PASSWORD: &str = "Zm9vYmFyLWdhdGV3YXktYmVuY2gtcGFzc3dvcmQtMTIzNDU2";

/// Dovecot's "high-performance mode" for many sessions: login processes that each serve many
/// clients, IMAP and submission processes that each serve many sessions, and no
/// per-user-and-address cap. Without it each submission session forked a login process and a
/// submission process of its own, which under this machine's load took most of a one-message
/// session's time (the client's `MAIL` step, waiting for the post-login process and its relay
/// connection: 0.5-1 s at load 13-20) and swung the SMTP rates tenfold from one window to the next
/// on both paths.
/// `process_min_avail = 1`: one login process serves until its `client_limit` is full (then more
/// start). Each login process encrypts its TLS session tickets with a key of its own, so with two
/// a ticket resumed only when the next connection landed on the same process; one process lets
/// every later connection resume, on both paths alike (the bench's direct clients and the
/// gateway's upstream connections reach the same IMAPS listener and process).
const DOVECOT_MANY_SESSIONS: &str = r#"
default_client_limit = 20000
default_vsz_limit = 1G
service imap-login {
  service_count = 0
  client_limit = 2000
  process_limit = 10
  process_min_avail = 1
}
service imap {
  service_count = 0
  client_limit = 1000
  process_limit = 30
}
service submission-login {
  service_count = 0
  client_limit = 2000
  process_min_avail = 1
}
service submission {
  service_count = 0
  client_limit = 100
  process_min_avail = 1
}
service auth {
  client_limit = 20000
}
service anvil {
  client_limit = 20000
}
protocol imap {
  mail_max_userip_connections = 20000
}
"#;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

type Conn = BufReader<TlsStream<TcpStream>>;

struct Tls {
    connector: TlsConnector,
}

impl Tls {
    fn new(ca_pems: &[&[u8]]) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for pem in ca_pems {
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots.add(cert.expect("CA PEM")).expect("CA certificate");
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Self {
            connector: TlsConnector::from(Arc::new(config)),
        }
    }

    async fn connect(&self, port: u16) -> std::io::Result<Conn> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost").expect("name");
        Ok(BufReader::new(self.connector.connect(name, tcp).await?))
    }
}

fn io_error(what: String) -> std::io::Error {
    std::io::Error::other(what)
}

/// Lines up to the one starting with `tag ` (IMAP), which is returned.
async fn imap_tagged(conn: &mut Conn, tag: &str) -> std::io::Result<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 {
            return Err(io_error(format!("closed before {tag}")));
        }
        if line.starts_with(tag) && line.as_bytes().get(tag.len()) == Some(&b' ') {
            return Ok(line);
        }
    }
}

/// Time a client spent in each step of its operations (the client's clock: the step's request
/// written to its answer read), summed over the operations of one path.
struct Steps {
    names: &'static [&'static str],
    nanos: Vec<AtomicU64>,
    /// Operations completed.
    ops: AtomicU64,
}

const IMAP_STEPS: &[&str] = &["connect_tls", "greeting", "login", "logout"];
const SMTP_STEPS: &[&str] = &[
    "connect_tls",
    "greeting",
    "ehlo",
    "auth",
    "mail",
    "rcpt",
    "data",
    "body",
    "quit",
];

impl Steps {
    fn new(names: &'static [&'static str]) -> Arc<Self> {
        Arc::new(Self {
            names,
            nanos: names.iter().map(|_| AtomicU64::new(0)).collect(),
            ops: AtomicU64::new(0),
        })
    }

    /// Adds the time since `*since` to step `i` and restarts the clock.
    fn lap(&self, i: usize, since: &mut Instant) {
        let now = Instant::now();
        let ns = u64::try_from(now.duration_since(*since).as_nanos()).unwrap_or(u64::MAX);
        if let Some(sum) = self.nanos.get(i) {
            sum.fetch_add(ns, Ordering::Relaxed);
        }
        *since = now;
    }

    /// `name=ms ...`: the mean per operation of each step, in ms.
    fn means(&self) -> String {
        let ops = self.ops.load(Ordering::Relaxed).max(1) as f64;
        let mut total = 0.0;
        let mut out: Vec<String> = self
            .names
            .iter()
            .zip(&self.nanos)
            .map(|(name, sum)| {
                let ms = sum.load(Ordering::Relaxed) as f64 / 1e6 / ops;
                total += ms;
                format!("{name}={ms:.2}")
            })
            .collect();
        out.push(format!("total={total:.2}"));
        out.join(" ")
    }
}

/// Greeting, the login command given, OK expected.
async fn imap_login(tls: &Tls, port: u16, login: &str, steps: &Steps) -> std::io::Result<Conn> {
    let mut t = Instant::now();
    let mut conn = tls.connect(port).await?;
    steps.lap(0, &mut t);
    let mut greeting = String::new();
    conn.read_line(&mut greeting).await?;
    if !greeting.starts_with("* OK") {
        return Err(io_error(format!("greeting {greeting:?}")));
    }
    steps.lap(1, &mut t);
    conn.get_mut()
        .write_all(format!("a {login}\r\n").as_bytes())
        .await?;
    let answer = imap_tagged(&mut conn, "a").await?;
    if !answer.starts_with("a OK") {
        return Err(io_error(format!("login answered {answer:?}")));
    }
    steps.lap(2, &mut t);
    Ok(conn)
}

async fn imap_login_logout(
    tls: &Tls,
    port: u16,
    login: &str,
    steps: &Steps,
) -> std::io::Result<()> {
    let mut conn = imap_login(tls, port, login, steps).await?;
    let mut t = Instant::now();
    conn.get_mut().write_all(b"b LOGOUT\r\n").await?;
    imap_tagged(&mut conn, "b").await?;
    steps.lap(3, &mut t);
    steps.ops.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// One SMTP reply (its last line), with the code expected.
async fn smtp_reply(conn: &mut Conn, code: &str) -> std::io::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 {
            return Err(io_error(format!("closed waiting for {code}")));
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            break;
        }
    }
    if line.starts_with(code) {
        Ok(())
    } else {
        Err(io_error(format!("expected {code}, got {:?}", line.trim())))
    }
}

async fn smtp_command(conn: &mut Conn, command: &str, code: &str) -> std::io::Result<()> {
    conn.get_mut()
        .write_all(format!("{command}\r\n").as_bytes())
        .await?;
    smtp_reply(conn, code).await
}

/// One session over implicit TLS: AUTH with `auth`, `messages` messages to the mailbox, QUIT.
/// The steps' times are added to `steps` (one operation a message).
async fn smtp_session(
    tls: &Tls,
    port: u16,
    auth: &str,
    messages: usize,
    subject: &str,
    steps: &Steps,
) -> std::io::Result<()> {
    let mut t = Instant::now();
    let mut conn = tls.connect(port).await?;
    steps.lap(0, &mut t);
    smtp_reply(&mut conn, "220").await?;
    steps.lap(1, &mut t);
    smtp_command(&mut conn, "EHLO bench.test", "250").await?;
    steps.lap(2, &mut t);
    smtp_command(&mut conn, auth, "235").await?;
    steps.lap(3, &mut t);
    for i in 0..messages {
        smtp_command(&mut conn, &format!("MAIL FROM:<{MAILBOX}>"), "250").await?;
        steps.lap(4, &mut t);
        smtp_command(&mut conn, &format!("RCPT TO:<{MAILBOX}>"), "250").await?;
        steps.lap(5, &mut t);
        smtp_command(&mut conn, "DATA", "354").await?;
        steps.lap(6, &mut t);
        let body = format!(
            "From: {MAILBOX}\r\nTo: {MAILBOX}\r\nSubject: {subject} {i}\r\n\r\nA message of the gateway benchmark.\r\n.\r\n"
        );
        conn.get_mut().write_all(body.as_bytes()).await?;
        smtp_reply(&mut conn, "250").await?;
        steps.lap(7, &mut t);
    }
    smtp_command(&mut conn, "QUIT", "221").await?;
    steps.lap(8, &mut t);
    steps.ops.fetch_add(messages as u64, Ordering::Relaxed);
    Ok(())
}

/// Runs `op` from `concurrency` clients for `window`; completed operations per second (and the
/// number of failures, which must be 0).
async fn rate<F, Fut>(concurrency: usize, window: Duration, op: F) -> (f64, u64)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::io::Result<usize>> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + window;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (op, done, failed) = (op.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                match op().await {
                    Ok(n) => done.fetch_add(n as u64, Ordering::Relaxed),
                    Err(e) => {
                        if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("bench operation failed: {e}");
                        }
                        0
                    }
                };
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let elapsed = start.elapsed().as_secs_f64();
    (
        done.load(Ordering::Relaxed) as f64 / elapsed,
        failed.load(Ordering::Relaxed),
    )
}

/// VmRSS and VmHWM of a process, in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time (user + system, all threads, living and gone) of a process, in seconds. /proc's
/// clock ticks are USER_HZ, 100 a second on Linux whatever the kernel's HZ.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name (in parentheses, which may hold spaces): state is field 3, utime 14.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => (user + system) / 100.0,
        _ => f64::NAN,
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Raise this process's open-file limit; Dovecot and the gateway, started from it, inherit it.
/// Raising the hard limit takes CAP_SYS_RESOURCE (being root is not enough: a container's
/// capability set may lack it); without it the soft limit goes up to the hard one. The limit
/// reached and, if short of `want`, why.
fn raise_nofile(want: u64) -> (u64, Option<String>) {
    use rlimit::Resource;
    let (soft, hard) = Resource::NOFILE.get().expect("getrlimit");
    let target = want.max(soft);
    let refused = match Resource::NOFILE.set(target, hard.max(target)) {
        Ok(()) => None,
        Err(e) => {
            let _ = rlimit::increase_nofile_limit(u64::MAX);
            Some(format!(
                "raising the hard limit {hard} to {target}: {e} (needs CAP_SYS_RESOURCE)"
            ))
        }
    };
    let now = Resource::NOFILE.get().map(|(s, _)| s).unwrap_or(soft);
    (now, refused.filter(|_| now < want))
}

/// Descriptors a process holds now.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::main]
async fn main() {
    let seconds: u64 = env_or("MIO_BENCH_GATEWAY_SECONDS", 5);
    let rounds: usize = env_or("MIO_BENCH_GATEWAY_ROUNDS", 5);
    let smtp_implicit =
        std::env::var("MIO_BENCH_GATEWAY_SMTP_UPSTREAM").as_deref() == Ok("implicit");
    let concurrency: usize = env_or("MIO_BENCH_GATEWAY_CONCURRENCY", 8);
    let wanted: usize = env_or("MIO_BENCH_GATEWAY_SESSIONS", 10_000);
    let per_session: usize = env_or("MIO_BENCH_GATEWAY_PER_SESSION", 5);
    let window = Duration::from_secs(seconds);
    // The gateway holds two descriptors a session (the app's and the upstream one) besides its
    // own; the bench one a session.
    let want_fds = u64::try_from(wanted).unwrap_or(u64::MAX).saturating_mul(2) + 1000;
    let (nofile, short) = raise_nofile(want_fds.max(65_536));
    println!("gateway nofile_limit {nofile}");
    if let Some(why) = &short {
        eprintln!("gateway bench: fewer descriptors than {want_fds}: {why}");
    }
    println!("gateway idle_sessions_wanted {wanted}");
    println!("gateway load_average_start {}", load_average());

    // oidc-provider (tokens of 1 h), Dovecot validating them by introspection, delivering.
    let server = support::oauth::with_token_ttl(3600);
    let (id, secret) = server.introspection_client();
    let url = server
        .introspection_url()
        .replacen("http://", &format!("http://{id}:{secret}@"), 1);
    let dovecot = Dovecot::start(DovecotConfig {
        username_attribute: "email".into(),
        deliver: true,
        extra_conf: DOVECOT_MANY_SESSIONS.into(),
        ..DovecotConfig::new(url)
    });
    let env = Env::new("gwbench", server).await;
    env.integration_with(
        "inbox",
        MAILBOX,
        serde_json::json!({"gateway": {"apps": [
            {"name": "bench", "protocols": ["IMAP", "SMTP"]},
        ]}}),
    )
    .await;
    let token = server.obtain_grant("alice").await.access_token;
    let username = config::username(&env.ns, "inbox", "bench");
    // The gateway Secret as the operator writes it; upstream over loopback TLS (implicit TLS to
    // Dovecot's IMAPS, STARTTLS to its submission port).
    let gateway_json = GatewayConfig {
        namespace: env.ns.clone(),
        integration: "inbox".into(),
        uid: "uid-inbox".into(),
        mailbox: MAILBOX.into(),
        mechanism: UpstreamMechanism::XOAuth2,
        imap: Some(UpstreamServer {
            host: "127.0.0.1".into(),
            port: dovecot.imaps_port,
            tls: TlsMode::Implicit,
        }),
        pop3: None,
        smtp: Some(if smtp_implicit {
            UpstreamServer {
                host: "127.0.0.1".into(),
                port: dovecot.submissions_port,
                tls: TlsMode::Implicit,
            }
        } else {
            UpstreamServer {
                host: "127.0.0.1".into(),
                port: dovecot.submission_port,
                tls: TlsMode::StartTls,
            }
        }),
        ca_pem: Some(String::from_utf8(dovecot.ca_pem.clone()).expect("PEM")),
        max_message_bytes: 26_214_400,
        apps: vec![GatewayAppConfig {
            name: "bench".into(),
            username: username.clone(),
            protocols: vec![Protocol::Imap, Protocol::Smtp],
            send_as: vec![],
            verifiers: vec![Verifier::new(b"bench-salt", &SecretValue::new(PASSWORD))],
        }],
    };
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "inbox-gateway", "labels": {
            "mailintegration.dev/gateway": "true",
            "mailintegration.dev/integration": "inbox",
        }},
        "stringData": {
            "gateway.json": serde_json::to_string(&gateway_json).expect("json"),
            "access_token": token,
            "expiry": "2999-01-01T00:00:00Z",
        },
    }))
    .expect("Secret");
    env.secrets()
        .patch(
            "inbox-gateway",
            &PatchParams::apply("gateway-bench").force(),
            &Patch::Apply(&secret),
        )
        .await
        .expect("gateway Secret");
    let cert = support::gateway::certificate(env.log_dir.path());
    let max_sessions = (wanted + 100).to_string();
    let reuse_idle: String = env_or("MIO_BENCH_GATEWAY_REUSE_IDLE", "60s".to_owned());
    let start_gateway = |name: &str, reuse: &str| {
        support::gateway::Gateway::start(
            name,
            &env.cp.kubeconfig,
            &env.ns,
            &cert,
            &[
                &format!("--max-sessions-per-credential={max_sessions}"),
                &format!("--max-connections={}", 2 * wanted + 1000),
                // The session phase connects every session first and logs them in after: the
                // first ones wait longer than the default 30 s before their login.
                "--pre-login-idle=10m",
                &format!("--imap-reuse-idle={reuse}"),
            ],
            env.log_dir.path(),
        )
    };
    // The gateway as it ships (reuse of upstream IMAP sessions on), and a second one with reuse
    // off, for the IMAP rates only, against the same Dovecot.
    let gw = start_gateway("gateway-bench", &reuse_idle);
    let gw_off = start_gateway("gateway-bench-noreuse", "0");
    let gw_pid = gw.process.child_pid().expect("gateway pid");
    let gw_off_pid = gw_off.process.child_pid().expect("gateway pid");
    println!("gateway imap_reuse_idle {reuse_idle}");
    // Without the privilege to raise the hard limit, fewer sessions than wanted may fit beside
    // the gateway's own descriptors (listeners, the API server's connections, logs).
    let gw_fds = open_fds(gw_pid);
    let fd_cap = usize::try_from(nofile)
        .unwrap_or(usize::MAX)
        .saturating_sub(gw_fds + 16)
        / 2;
    let sessions = wanted.min(fd_cap);
    println!("gateway gateway_own_fds {gw_fds}");
    println!("gateway idle_sessions_fd_cap {fd_cap}");
    let gw_ca = std::fs::read(&gw.ca_path).expect("gateway CA");
    let tls = Arc::new(Tls::new(&[&dovecot.ca_pem, &gw_ca]));

    let b64 = base64::engine::general_purpose::STANDARD;
    let xoauth2 = b64.encode(format!("user={MAILBOX}\x01auth=Bearer {token}\x01\x01"));
    let imap_direct = Arc::new(format!("AUTHENTICATE XOAUTH2 {xoauth2}"));
    let imap_gateway = Arc::new(format!("LOGIN \"{username}\" \"{PASSWORD}\""));
    let smtp_direct = Arc::new(format!("AUTH XOAUTH2 {xoauth2}"));
    let smtp_gateway = Arc::new(format!(
        "AUTH PLAIN {}",
        b64.encode(format!("\0{username}\0{PASSWORD}"))
    ));

    // Warm both paths (TLS, introspection, Dovecot's processes), and check each works at all.
    for (port, login) in [
        (dovecot.imaps_port, &imap_direct),
        (gw.imaps_port, &imap_gateway),
        (gw_off.imaps_port, &imap_gateway),
    ] {
        imap_login_logout(&tls, port, login, &Steps::new(IMAP_STEPS))
            .await
            .unwrap_or_else(|e| panic!("IMAP login on {port}: {e}\n{}", gw.log()));
    }
    for (port, auth) in [
        (dovecot.submissions_port, &smtp_direct),
        (gw.submissions_port, &smtp_gateway),
    ] {
        smtp_session(&tls, port, auth, 1, "warm-up", &Steps::new(SMTP_STEPS))
            .await
            .unwrap_or_else(|e| panic!("SMTP on {port}: {e}\n{}", gw.log()));
    }
    let (idle_rss, idle_hwm) = rss_mib(gw_pid);
    println!("gateway idle_rss_mib {idle_rss:.1}");
    println!("gateway idle_hwm_mib {idle_hwm:.1}");
    println!("gateway concurrency {concurrency}");
    println!("gateway window_s imap={seconds} smtp={}", 2 * seconds);
    println!("gateway rounds {rounds}");
    println!(
        "gateway smtp_upstream {}",
        if smtp_implicit {
            "implicit"
        } else {
            "starttls"
        }
    );

    let paths = Paths {
        tls: tls.clone(),
        gw_pid,
        gw_off_pid,
        imap_direct: (dovecot.imaps_port, imap_direct),
        imap_gateway: (gw.imaps_port, imap_gateway.clone()),
        imap_gateway_off: (gw_off.imaps_port, imap_gateway.clone()),
        smtp_direct: (dovecot.submissions_port, smtp_direct),
        smtp_gateway: (gw.submissions_port, smtp_gateway),
    };
    if seconds > 0 && rounds > 0 {
        let plan = Plan {
            concurrency,
            window,
            rounds,
            per_session,
        };
        rates(&paths, &plan, &dovecot, &gw).await;
        upstream_setup_steps(&gw.log(), "");
        upstream_setup_steps(&gw_off.log(), "_noreuse");
    }
    drop(gw_off);
    if sessions > 0 {
        idle_sessions(&paths, sessions, wanted, idle_rss).await;
    }
    println!("gateway load_average_end {}", load_average());
    drop(gw);
    drop(dovecot);
}

/// Where each path's clients go, and how they log in.
struct Paths {
    tls: Arc<Tls>,
    gw_pid: u32,
    /// The gateway with reuse of upstream IMAP sessions off.
    gw_off_pid: u32,
    imap_direct: (u16, Arc<String>),
    imap_gateway: (u16, Arc<String>),
    imap_gateway_off: (u16, Arc<String>),
    smtp_direct: (u16, Arc<String>),
    smtp_gateway: (u16, Arc<String>),
}

/// How the rates are measured.
struct Plan {
    concurrency: usize,
    /// One IMAP window; SMTP windows are twice as long (their rates are ~30 times lower).
    window: Duration,
    rounds: usize,
    per_session: usize,
}

/// One path's figures in one round.
#[derive(Clone, Copy, Default)]
struct Window {
    rate: f64,
    failed: u64,
    /// The gateway's CPU seconds during the window.
    gw_cpu: f64,
    /// Operations completed in the window.
    ops: f64,
}

/// Median, minimum and maximum (NaN for none).
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    };
    (median, v[0], v[v.len() - 1])
}

/// Runs `direct` and `gateway` for `window` each, in `rounds` rounds (the order alternating), and
/// prints each round and the medians as `{name}_...`. `unit` names the operation (`logins`,
/// `messages`).
async fn paired<D, DF, G, GF>(
    name: &str,
    unit: &str,
    plan: &Plan,
    window: Duration,
    gw_pid: u32,
    direct: D,
    gateway: G,
) -> u64
where
    D: Fn() -> DF + Clone + Send + Sync + 'static,
    DF: std::future::Future<Output = std::io::Result<usize>> + Send,
    G: Fn() -> GF + Clone + Send + Sync + 'static,
    GF: std::future::Future<Output = std::io::Result<usize>> + Send,
{
    let mut d_rates = Vec::new();
    let mut g_rates = Vec::new();
    let mut ratios = Vec::new();
    let (mut cpu, mut ops, mut failed) = (0.0, 0.0, 0);
    for round in 1..=plan.rounds {
        let load = load_average();
        let mut d = Window::default();
        let mut g = Window::default();
        // Odd rounds direct first, even rounds the gateway first.
        for gateway_turn in [round % 2 == 0, round % 2 == 1] {
            let cpu_before = cpu_s(gw_pid);
            let started = Instant::now();
            let (rate_, failed_) = if gateway_turn {
                rate(plan.concurrency, window, gateway.clone()).await
            } else {
                rate(plan.concurrency, window, direct.clone()).await
            };
            let w = Window {
                rate: rate_,
                failed: failed_,
                gw_cpu: cpu_s(gw_pid) - cpu_before,
                ops: rate_ * started.elapsed().as_secs_f64(),
            };
            if gateway_turn { g = w } else { d = w }
        }
        let ratio = g.rate / d.rate;
        println!(
            "gateway {name}_round_{round} {ratio:.2} direct={:.1} gateway={:.1} {unit}/s load={}",
            d.rate,
            g.rate,
            load.replace(' ', "/")
        );
        d_rates.push(d.rate);
        g_rates.push(g.rate);
        ratios.push(ratio);
        cpu += g.gw_cpu;
        ops += g.ops;
        failed += d.failed + g.failed;
    }
    let (d_med, d_min, d_max) = spread(&d_rates);
    let (g_med, g_min, g_max) = spread(&g_rates);
    let (r_med, r_min, r_max) = spread(&ratios);
    let above = ratios.iter().filter(|r| **r >= 0.8).count();
    println!("gateway {name}_direct_per_s {d_med:.1} median min={d_min:.1} max={d_max:.1}");
    println!("gateway {name}_gateway_per_s {g_med:.1} median min={g_min:.1} max={g_max:.1}");
    println!(
        "gateway {name}_ratio {r_med:.2} target>=0.8 median_of_rounds={} min={r_min:.2} max={r_max:.2} rounds_at_target={above}/{}",
        plan.rounds, plan.rounds
    );
    println!(
        "gateway {name}_gateway_cpu_ms_per_op {:.2}",
        cpu * 1000.0 / ops.max(1.0)
    );
    failed
}

/// IMAP logins/s and SMTP messages/s on both paths, with the gateway's CPU per operation and
/// where a session's time goes, step by step.
async fn rates(paths: &Paths, plan: &Plan, dovecot: &Dovecot, gw: &support::gateway::Gateway) {
    let gw_pid = paths.gw_pid;
    let imap = |(port, login): (u16, Arc<String>), steps: Arc<Steps>| {
        let tls = paths.tls.clone();
        move || {
            let (tls, login, steps) = (tls.clone(), login.clone(), steps.clone());
            async move {
                imap_login_logout(&tls, port, &login, &steps)
                    .await
                    .map(|()| 1)
            }
        }
    };
    let (imap_d, imap_g) = (Steps::new(IMAP_STEPS), Steps::new(IMAP_STEPS));
    let reuse_counts = || {
        (
            gw.metric("mailintegration_gateway_imap_upstream_reused_total"),
            gw.metric(r#"mailintegration_gateway_logins_total{protocol="IMAP",result="success"}"#),
        )
    };
    let (reused_before, logins_before) = reuse_counts();
    let mut failed = paired(
        "imap_login",
        "logins",
        plan,
        plan.window,
        gw_pid,
        imap(paths.imap_direct.clone(), imap_d.clone()),
        imap(paths.imap_gateway.clone(), imap_g.clone()),
    )
    .await;
    let (reused_after, logins_after) = reuse_counts();
    let (reused, logins) = (reused_after - reused_before, logins_after - logins_before);
    println!(
        "gateway imap_login_reused_share {:.2} reused={reused} logins={logins}",
        reused / logins.max(1.0)
    );
    let reuse_metrics: Vec<String> = gw
        .get("/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("mailintegration_gateway_imap_upstream_"))
        .map(|l| {
            l.trim_start_matches("mailintegration_gateway_imap_upstream_")
                .replace(' ', "=")
        })
        .collect();
    println!("gateway imap_reuse_metrics {}", reuse_metrics.join(" "));
    // The same against the gateway with reuse off (a fresh upstream session per login).
    let imap_o = Steps::new(IMAP_STEPS);
    let imap_d2 = Steps::new(IMAP_STEPS);
    failed += paired(
        "imap_login_noreuse",
        "logins",
        plan,
        plan.window,
        paths.gw_off_pid,
        imap(paths.imap_direct.clone(), imap_d2.clone()),
        imap(paths.imap_gateway_off.clone(), imap_o.clone()),
    )
    .await;
    println!("gateway imap_login_failures {failed} target=0");
    println!("gateway imap_steps_ms_direct {}", imap_d.means());
    println!("gateway imap_steps_ms_gateway {}", imap_g.means());
    println!(
        "gateway imap_steps_ms_direct_noreuse_run {}",
        imap_d2.means()
    );
    println!("gateway imap_steps_ms_gateway_noreuse {}", imap_o.means());

    // SMTP messages/s, one session per message and `per_session` per session.
    let sent = Arc::new(AtomicU64::new(2));
    let mut failures = 0;
    for (label, count) in [("1", 1), ("n", plan.per_session)] {
        let smtp = |(port, auth): (u16, Arc<String>), path: &'static str, steps: Arc<Steps>| {
            let (tls, sent) = (paths.tls.clone(), sent.clone());
            move || {
                let (tls, auth, sent, steps) =
                    (tls.clone(), auth.clone(), sent.clone(), steps.clone());
                async move {
                    smtp_session(&tls, port, &auth, count, path, &steps).await?;
                    sent.fetch_add(count as u64, Ordering::Relaxed);
                    Ok(count)
                }
            }
        };
        println!("gateway smtp_messages_per_session_{label} {count}");
        let (smtp_d, smtp_g) = (Steps::new(SMTP_STEPS), Steps::new(SMTP_STEPS));
        failures += paired(
            &format!("smtp_{label}"),
            "messages",
            plan,
            plan.window * 2,
            gw_pid,
            smtp(paths.smtp_direct.clone(), "direct", smtp_d.clone()),
            smtp(paths.smtp_gateway.clone(), "gateway", smtp_g.clone()),
        )
        .await;
        println!(
            "gateway smtp_{label}_steps_ms_per_message_direct {}",
            smtp_d.means()
        );
        println!(
            "gateway smtp_{label}_steps_ms_per_message_gateway {}",
            smtp_g.means()
        );
    }
    println!("gateway smtp_failures {failures} target=0");
    // Delivered for real: every accepted message reaches the mailbox through msmtpd and the LDA.
    let accepted = sent.load(Ordering::Relaxed) as usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    while dovecot.deliveries().len() < accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let delivered = dovecot.deliveries().len();
    println!("gateway smtp_accepted {accepted}");
    println!("gateway smtp_delivered {delivered} target={accepted}");
    let (rss, _) = rss_mib(gw_pid);
    println!("gateway after_rates_rss_mib {rss:.1}");
}

/// The gateway's own account of its upstream set-ups (its debug lines `upstream set-up steps`,
/// microseconds a step): the mean of each step, per protocol.
fn upstream_setup_steps(log: &str, suffix: &str) {
    let mut sums: std::collections::BTreeMap<(String, String), (u64, u64)> = Default::default();
    for line in log.lines().filter(|l| l.contains("upstream set-up steps")) {
        let protocol = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("protocol="))
            .unwrap_or("?")
            .trim_matches('"')
            .to_owned();
        for field in line.split_whitespace() {
            if let Some((key, value)) = field.split_once("_us=")
                && let Ok(us) = value.parse::<u64>()
            {
                let e = sums.entry((protocol.clone(), key.to_owned())).or_default();
                e.0 += us;
                e.1 += 1;
            }
        }
    }
    let mut by_protocol: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for ((protocol, key), (sum, n)) in sums {
        by_protocol.entry(protocol).or_default().push(format!(
            "{key}={:.2}",
            sum as f64 / 1000.0 / n.max(1) as f64
        ));
    }
    for (protocol, steps) in by_protocol {
        println!(
            "gateway upstream_setup_ms_{}{suffix} {}",
            protocol.to_lowercase(),
            steps.join(" ")
        );
    }
}

/// Runs `op(i)` for i in 0..n, 64 at a time; the successes, in no particular order.
async fn in_parallel<T, F, Fut>(n: usize, what: &'static str, op: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::io::Result<T>> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(n)));
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (op, done, next, failed) = (op.clone(), done.clone(), next.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    return;
                }
                match op(i).await {
                    Ok(t) => done.lock().await.push(t),
                    Err(e) => {
                        if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("{what} failed: {e}");
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("session task");
    }
    let mut done = done.lock().await;
    std::mem::take(&mut *done)
}

/// Idle logged-in IMAP sessions through the gateway: first connected (TLS, greeting; a pre-login
/// session holds no upstream connection), then logged in, then closed; the gateway's RSS at each
/// stage.
async fn idle_sessions(paths: &Paths, sessions: usize, wanted: usize, idle_rss: f64) {
    let gw_pid = paths.gw_pid;
    let (port, login) = paths.imap_gateway.clone();
    let start = Instant::now();
    let tls = paths.tls.clone();
    let connected = in_parallel(sessions, "connecting a session", move |_| {
        let tls = tls.clone();
        async move {
            let mut conn = tls.connect(port).await?;
            let mut greeting = String::new();
            conn.read_line(&mut greeting).await?;
            if !greeting.starts_with("* OK") {
                return Err(io_error(format!("greeting {greeting:?}")));
            }
            Ok(conn)
        }
    })
    .await;
    let connected_s = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (pre_login_rss, _) = rss_mib(gw_pid);
    let pre = connected.len();
    println!("gateway pre_login_sessions {pre}");
    println!("gateway pre_login_sessions_open_s {connected_s:.1}");
    println!("gateway pre_login_rss_mib {pre_login_rss:.1}");
    println!(
        "gateway rss_per_pre_login_session_kib {:.1}",
        (pre_login_rss - idle_rss) * 1024.0 / pre.max(1) as f64
    );

    let start = Instant::now();
    let waiting = Arc::new(std::sync::Mutex::new(connected));
    let logged_in = in_parallel(pre, "logging a session in", move |_| {
        let (waiting, login) = (waiting.clone(), login.clone());
        async move {
            let conn = waiting.lock().expect("sessions").pop();
            let mut conn = conn.ok_or_else(|| io_error("no session left".into()))?;
            conn.get_mut()
                .write_all(format!("a {login}\r\n").as_bytes())
                .await?;
            let answer = imap_tagged(&mut conn, "a").await?;
            if !answer.starts_with("a OK") {
                return Err(io_error(format!("login answered {answer:?}")));
            }
            Ok(conn)
        }
    })
    .await;
    let opened_s = start.elapsed().as_secs_f64();
    // Settle, then check the sessions are alive: a NOOP on a sample of them.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut open = logged_in;
    let mut alive_sample = 0;
    let sample = open.len().min(100);
    let step = (open.len() / sample.max(1)).max(1);
    for conn in open.iter_mut().step_by(step).take(sample) {
        if conn.get_mut().write_all(b"n NOOP\r\n").await.is_ok()
            && imap_tagged(conn, "n")
                .await
                .is_ok_and(|l| l.starts_with("n OK"))
        {
            alive_sample += 1;
        }
    }
    let (rss, hwm) = rss_mib(gw_pid);
    let n = open.len();
    println!("gateway idle_sessions_open {n} target={wanted}");
    println!("gateway idle_sessions_failed {}", sessions - n);
    println!("gateway idle_sessions_noop_ok {alive_sample}/{sample}");
    println!("gateway idle_sessions_login_s {opened_s:.1}");
    println!("gateway sessions_rss_mib {rss:.1} target<=256");
    println!("gateway sessions_hwm_mib {hwm:.1}");
    // jemalloc hands freed pages (the TLS handshakes', the logins') back after its 10 s decay.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (settled, _) = rss_mib(gw_pid);
    let per_session = (settled - idle_rss) * 1024.0 / n.max(1) as f64;
    println!("gateway sessions_rss_settled_mib {settled:.1} target<=256");
    println!("gateway rss_per_session_settled_kib {per_session:.1}");
    println!(
        "gateway rss_per_session_kib {:.1}",
        (rss - idle_rss) * 1024.0 / n.max(1) as f64
    );
    println!(
        "gateway rss_per_session_upstream_side_kib {:.1}",
        (settled - pre_login_rss) * 1024.0 / n.max(1) as f64
    );
    if n < wanted {
        // Fewer than wanted fitted under the descriptor limit: the same per-session cost at the
        // wanted number, marked as a projection.
        println!(
            "gateway sessions_rss_projected_mib {:.1} sessions={wanted} target<=256",
            idle_rss + per_session * wanted as f64 / 1024.0
        );
    }
    drop(open);
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (closed, _) = rss_mib(gw_pid);
    println!("gateway closed_sessions_rss_mib {closed:.1}");
}
