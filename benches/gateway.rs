//! Gateway benchmark (issue 22): in one run against the same Dovecot (oauth2 passdb at
//! oidc-provider, real delivery through msmtpd and Dovecot's LDA), IMAP logins/s and SMTP
//! messages/s straight to Dovecot (XOAUTH2 with a real access token) and through the gateway
//! process (an app's password; the gateway logs in upstream with XOAUTH2), and the gateway's RSS
//! idle and with many idle logged-in IMAP sessions open through it.
//!
//!   cargo bench --bench gateway
//!
//! One figure a line, `gateway NAME VALUE [target...]` (benches/README.md "Gateway" explains them).
//! Knobs (environment): MIO_BENCH_GATEWAY_SECONDS (10: each rate's window),
//! MIO_BENCH_GATEWAY_CONCURRENCY (8: clients at once, the same on both paths),
//! MIO_BENCH_GATEWAY_SESSIONS (10000: idle IMAP sessions), MIO_BENCH_GATEWAY_PER_SESSION (5:
//! messages per SMTP session in the batched case).

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
/// clients, IMAP processes that each serve many sessions, and no per-user-and-address cap.
const DOVECOT_MANY_SESSIONS: &str = r#"
default_client_limit = 20000
default_vsz_limit = 1G
service imap-login {
  service_count = 0
  client_limit = 2000
  process_limit = 10
  process_min_avail = 2
}
service imap {
  service_count = 0
  client_limit = 1000
  process_limit = 30
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

/// Greeting, the login command given, OK expected.
async fn imap_login(tls: &Tls, port: u16, login: &str) -> std::io::Result<Conn> {
    let mut conn = tls.connect(port).await?;
    let mut greeting = String::new();
    conn.read_line(&mut greeting).await?;
    if !greeting.starts_with("* OK") {
        return Err(io_error(format!("greeting {greeting:?}")));
    }
    conn.get_mut()
        .write_all(format!("a {login}\r\n").as_bytes())
        .await?;
    let answer = imap_tagged(&mut conn, "a").await?;
    if !answer.starts_with("a OK") {
        return Err(io_error(format!("login answered {answer:?}")));
    }
    Ok(conn)
}

async fn imap_login_logout(tls: &Tls, port: u16, login: &str) -> std::io::Result<()> {
    let mut conn = imap_login(tls, port, login).await?;
    conn.get_mut().write_all(b"b LOGOUT\r\n").await?;
    imap_tagged(&mut conn, "b").await?;
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
async fn smtp_session(
    tls: &Tls,
    port: u16,
    auth: &str,
    messages: usize,
    subject: &str,
) -> std::io::Result<()> {
    let mut conn = tls.connect(port).await?;
    smtp_reply(&mut conn, "220").await?;
    smtp_command(&mut conn, "EHLO bench.test", "250").await?;
    smtp_command(&mut conn, auth, "235").await?;
    for i in 0..messages {
        smtp_command(&mut conn, &format!("MAIL FROM:<{MAILBOX}>"), "250").await?;
        smtp_command(&mut conn, &format!("RCPT TO:<{MAILBOX}>"), "250").await?;
        smtp_command(&mut conn, "DATA", "354").await?;
        let body = format!(
            "From: {MAILBOX}\r\nTo: {MAILBOX}\r\nSubject: {subject} {i}\r\n\r\nA message of the gateway benchmark.\r\n.\r\n"
        );
        conn.get_mut().write_all(body.as_bytes()).await?;
        smtp_reply(&mut conn, "250").await?;
    }
    smtp_command(&mut conn, "QUIT", "221").await
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

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Raise this process's open-file limit; Dovecot and the gateway, started from it, inherit it.
fn raise_nofile(want: u64) -> u64 {
    use rlimit::Resource;
    let (soft, hard) = Resource::NOFILE.get().expect("getrlimit");
    let target = want.max(soft);
    if Resource::NOFILE.set(target, hard.max(target)).is_err() {
        let _ = rlimit::increase_nofile_limit(u64::MAX);
    }
    Resource::NOFILE.get().map(|(s, _)| s).unwrap_or(soft)
}

#[tokio::main]
async fn main() {
    let seconds: u64 = env_or("MIO_BENCH_GATEWAY_SECONDS", 10);
    let concurrency: usize = env_or("MIO_BENCH_GATEWAY_CONCURRENCY", 8);
    let wanted: usize = env_or("MIO_BENCH_GATEWAY_SESSIONS", 10_000);
    let per_session: usize = env_or("MIO_BENCH_GATEWAY_PER_SESSION", 5);
    let window = Duration::from_secs(seconds);
    let nofile = raise_nofile(65_536);
    println!("gateway nofile_limit {nofile}");
    // The gateway holds two descriptors a session (the app's and the upstream one): without the
    // privilege to raise the hard limit, fewer sessions than wanted fit.
    let fd_cap = usize::try_from(nofile.saturating_sub(200) / 2).unwrap_or(usize::MAX);
    let sessions = wanted.min(fd_cap);
    println!("gateway idle_sessions_wanted {wanted}");
    println!("gateway idle_sessions_fd_cap {fd_cap}");
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
        smtp: Some(UpstreamServer {
            host: "127.0.0.1".into(),
            port: dovecot.submission_port,
            tls: TlsMode::StartTls,
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
    let max_sessions = (sessions + 100).to_string();
    let gw = support::gateway::Gateway::start(
        "gateway-bench",
        &env.cp.kubeconfig,
        &env.ns,
        &cert,
        &[
            &format!("--max-sessions-per-credential={max_sessions}"),
            &format!("--max-connections={}", 2 * sessions + 1000),
        ],
        env.log_dir.path(),
    );
    let gw_pid = gw.process.child_pid().expect("gateway pid");
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
    ] {
        imap_login_logout(&tls, port, login)
            .await
            .unwrap_or_else(|e| panic!("IMAP login on {port}: {e}\n{}", gw.log()));
    }
    for (port, auth) in [
        (dovecot.submissions_port, &smtp_direct),
        (gw.submissions_port, &smtp_gateway),
    ] {
        smtp_session(&tls, port, auth, 1, "warm-up")
            .await
            .unwrap_or_else(|e| panic!("SMTP on {port}: {e}\n{}", gw.log()));
    }
    let (idle_rss, idle_hwm) = rss_mib(gw_pid);
    println!("gateway idle_rss_mib {idle_rss:.1}");
    println!("gateway idle_hwm_mib {idle_hwm:.1}");
    println!("gateway concurrency {concurrency}");
    println!("gateway window_s {seconds}");

    // IMAP logins/s.
    let imap = |port: u16, login: Arc<String>| {
        let tls = tls.clone();
        move || {
            let (tls, login) = (tls.clone(), login.clone());
            async move { imap_login_logout(&tls, port, &login).await.map(|()| 1) }
        }
    };
    let (direct, direct_failed) = rate(
        concurrency,
        window,
        imap(dovecot.imaps_port, imap_direct.clone()),
    )
    .await;
    let (through, through_failed) = rate(
        concurrency,
        window,
        imap(gw.imaps_port, imap_gateway.clone()),
    )
    .await;
    println!("gateway imap_logins_per_s_direct {direct:.1}");
    println!("gateway imap_logins_per_s_gateway {through:.1}");
    println!(
        "gateway imap_login_failures {} target=0",
        direct_failed + through_failed
    );
    println!(
        "gateway imap_login_ratio {:.2} target>=0.8",
        through / direct
    );

    // SMTP messages/s, one session per message and `per_session` per session.
    let sent = Arc::new(AtomicU64::new(2));
    let mut failures = 0;
    for (label, count) in [("1", 1), ("n", per_session)] {
        let smtp = |port: u16, auth: Arc<String>, path: &'static str| {
            let (tls, sent) = (tls.clone(), sent.clone());
            move || {
                let (tls, auth, sent) = (tls.clone(), auth.clone(), sent.clone());
                async move {
                    smtp_session(&tls, port, &auth, count, path).await?;
                    sent.fetch_add(count as u64, Ordering::Relaxed);
                    Ok(count)
                }
            }
        };
        let (direct, f1) = rate(
            concurrency,
            window,
            smtp(dovecot.submissions_port, smtp_direct.clone(), "direct"),
        )
        .await;
        let (through, f2) = rate(
            concurrency,
            window,
            smtp(gw.submissions_port, smtp_gateway.clone(), "gateway"),
        )
        .await;
        failures += f1 + f2;
        let per = if label == "1" {
            "1".to_owned()
        } else {
            per_session.to_string()
        };
        println!("gateway smtp_messages_per_session_{label} {per}");
        println!("gateway smtp_messages_per_s_direct_{label} {direct:.1}");
        println!("gateway smtp_messages_per_s_gateway_{label} {through:.1}");
        println!(
            "gateway smtp_ratio_{label} {:.2} target>=0.8",
            through / direct
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

    // Idle logged-in IMAP sessions through the gateway.
    let start = Instant::now();
    let open = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(sessions)));
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (tls, open, next, failed, login) = (
            tls.clone(),
            open.clone(),
            next.clone(),
            failed.clone(),
            imap_gateway.clone(),
        );
        let port = gw.imaps_port;
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < sessions as u64 {
                match imap_login(&tls, port, &login).await {
                    Ok(conn) => open.lock().await.push(conn),
                    Err(e) => {
                        if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("idle session failed: {e}");
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("session task");
    }
    let opened_s = start.elapsed().as_secs_f64();
    // Settle, then check the sessions are alive: a NOOP on a sample of them.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut open = open.lock().await;
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
    println!(
        "gateway idle_sessions_failed {}",
        failed.load(Ordering::Relaxed)
    );
    println!("gateway idle_sessions_noop_ok {alive_sample}/{sample}");
    println!("gateway idle_sessions_open_s {opened_s:.1}");
    println!("gateway sessions_rss_mib {rss:.1} target<=256");
    println!("gateway sessions_hwm_mib {hwm:.1}");
    // jemalloc hands freed pages (the TLS handshakes', the logins') back after its 10 s decay.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (settled, _) = rss_mib(gw_pid);
    println!("gateway sessions_rss_settled_mib {settled:.1} target<=256");
    println!(
        "gateway rss_per_session_settled_kib {:.1}",
        (settled - idle_rss) * 1024.0 / n.max(1) as f64
    );
    println!(
        "gateway rss_per_session_kib {:.1}",
        (rss - idle_rss) * 1024.0 / n.max(1) as f64
    );
    println!("gateway load_average_end {}", load_average());
    drop(open);
    drop(gw);
    drop(dovecot);
}
