//! SMTP through the gateway (issue 22 points 3 and 4; docs/gateway.md "SMTP rules"): real mail
//! clients (swaks, msmtp, curl, Python's smtplib, Prometheus Alertmanager) log in to the gateway's
//! SMTP handler with an app's password; the gateway logs in to Dovecot's submission service with the
//! integration's access token (XOAUTH2, validated by introspection at oidc-provider); Dovecot relays
//! to msmtpd, which delivers with Dovecot's LDA into the mailbox, where each message is read back
//! over IMAP. The refusals are counted where mail is delivered: nothing arrives.
//!
//! The handler ([`SmtpServer`]) runs in the test process behind a login layer of the test's own
//! (one app, one password): the gateway process's login layer and directory have tests of their own.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use mail_integration_operator::{
    api::TlsMode,
    gateway::{
        config::{GatewayAppConfig, GatewayConfig, UpstreamMechanism, UpstreamServer},
        session::{AppId, Authorized, Entry, Login, LoginRefused, Protocol, SessionLease},
        smtp::{
            Connection, Limits, SmtpServer,
            report::{KubeReport, NoReport, Report},
        },
    },
    mailbox::allowed::AllowedHosts,
    secret::SecretValue,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::support::{
    self,
    dovecot::{Dovecot, DovecotConfig, TestCa},
    oauth::OAuthServer,
    world::Env,
};

const MAILBOX: &str = "alice@example.test";
const SEND_AS: &str = "alerts@example.test";
const USERNAME: &str = "team/inbox/mailer";
const PASSWORD: &str = "Zm9vYmFyLWdhdGV3YXktdGVzdC1wYXNzd29yZC0xMjM";
/// The integration's maxMessageBytes in these tests.
const LIMIT: u64 = 200_000;

fn server() -> &'static OAuthServer {
    support::oauth::with_token_ttl(600)
}

/// The one app the test's login layer knows.
struct TestLogin {
    entry: Arc<Entry>,
    app: AppId,
}

impl Login for TestLogin {
    async fn login(
        &self,
        protocol: Protocol,
        username: &str,
        password: &SecretValue,
        source: SocketAddr,
    ) -> Result<Authorized, LoginRefused> {
        if username != USERNAME || password.expose() != PASSWORD {
            return Err(LoginRefused::BadCredential);
        }
        if protocol != Protocol::Smtp {
            return Err(LoginRefused::ProtocolNotAllowed);
        }
        Ok(Authorized {
            app: self.app.clone(),
            entry: self.entry.clone(),
            source,
            lease: SessionLease::detached(),
        })
    }
}

/// Dovecot with delivery, the gateway's SMTP handler in front of it on a STARTTLS port (like 587)
/// and an implicit-TLS port (like 465), and what a client needs to trust it.
struct World {
    dovecot: Dovecot,
    token: String,
    /// STARTTLS (the submission port).
    submission: u16,
    /// Implicit TLS.
    submissions: u16,
    /// The CA of the gateway's certificate (and, in another file, Dovecot's).
    gateway_ca: PathBuf,
    dovecot_ca: PathBuf,
    dir: tempfile::TempDir,
}

/// Dovecot asking oidc-provider about each token, delivering what its submission service takes.
fn delivering_dovecot() -> Dovecot {
    let (id, secret) = server().introspection_client();
    let url =
        server()
            .introspection_url()
            .replacen("http://", &format!("http://{id}:{secret}@"), 1);
    Dovecot::start(DovecotConfig {
        username_attribute: "email".into(),
        deliver: true,
        ..DovecotConfig::new(url)
    })
}

async fn world() -> World {
    let dovecot = delivering_dovecot();
    let token = server().obtain_grant("alice").await.access_token;
    let upstream = UpstreamServer {
        host: "127.0.0.1".into(),
        port: dovecot.submission_port,
        tls: TlsMode::StartTls,
    };
    let ca_pem = String::from_utf8(dovecot.ca_pem.clone()).unwrap();
    let gw = gateway(
        upstream,
        Some(ca_pem),
        &token,
        AppId::new("team", "inbox", "mailer"),
        Arc::new(NoReport),
    )
    .await;
    let dovecot_ca = gw.dir.path().join("dovecot-ca.pem");
    std::fs::write(&dovecot_ca, &dovecot.ca_pem).unwrap();
    World {
        dovecot,
        token,
        submission: gw.submission,
        submissions: gw.submissions,
        gateway_ca: gw.ca,
        dovecot_ca,
        dir: gw.dir,
    }
}

/// The gateway's SMTP handler on two ports, for one app of one integration whose mail server is
/// `upstream`.
struct Gateway {
    submission: u16,
    submissions: u16,
    ca: PathBuf,
    dir: tempfile::TempDir,
}

async fn gateway(
    upstream: UpstreamServer,
    ca_pem: Option<String>,
    token: &str,
    app: AppId,
    report: Arc<dyn Report>,
) -> Gateway {
    let dir = tempfile::Builder::new()
        .prefix("mio-gw-smtp-")
        .tempdir()
        .unwrap();
    let ca = TestCa::generate(&dir.path().join("ca"), "gateway-ca");
    let (cert, key) = ca.issue_server_cert(&dir.path().join("ca"), "gateway");
    let ca_path = dir.path().join("gateway-ca.pem");
    std::fs::write(&ca_path, &ca.cert_pem).unwrap();
    let entry = Arc::new(Entry {
        config: Arc::new(GatewayConfig {
            namespace: app.namespace.clone(),
            integration: app.integration.clone(),
            uid: "uid-1".into(),
            mailbox: MAILBOX.into(),
            mechanism: UpstreamMechanism::XOAuth2,
            imap: None,
            pop3: None,
            smtp: Some(upstream),
            ca_pem,
            max_message_bytes: LIMIT,
            apps: vec![GatewayAppConfig {
                name: app.app.clone(),
                username: USERNAME.into(),
                protocols: vec![Protocol::Smtp],
                send_as: vec![SEND_AS.into()],
                verifiers: vec![],
            }],
        }),
        access_token: SecretValue::new(token),
        expiry: None,
    });
    let smtp = Arc::new(SmtpServer {
        login: Arc::new(TestLogin { entry, app }),
        allowed: Arc::new(AllowedHosts::new([]).with_loopback()),
        hostname: "gateway.test".into(),
        limits: Limits::default(),
        idle_before_login: Duration::from_secs(30),
        idle_after_login: Duration::from_secs(300),
        report,
        metrics: Arc::new(Default::default()),
    });
    let acceptor = acceptor(&cert, &key);
    let submission = listen(smtp.clone(), acceptor.clone(), false).await;
    let submissions = listen(smtp, acceptor, true).await;
    Gateway {
        submission,
        submissions,
        ca: ca_path,
        dir,
    }
}

fn acceptor(cert: &Path, key: &Path) -> TlsAcceptor {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

/// Serve SMTP on a free loopback port: STARTTLS offered, or implicit TLS.
async fn listen(smtp: Arc<SmtpServer<TestLogin>>, acceptor: TlsAcceptor, implicit: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, source)) = listener.accept().await else {
                return;
            };
            let smtp = smtp.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let conn = if implicit {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    Connection {
                        stream: Box::new(tls),
                        source,
                        tls: true,
                        starttls: None,
                        plaintext_auth: false,
                    }
                } else {
                    Connection {
                        stream: Box::new(tcp),
                        source,
                        tls: false,
                        starttls: Some(acceptor),
                        plaintext_auth: false,
                    }
                };
                smtp.serve(conn).await;
            });
        }
    });
    port
}

/// Python 3 running `script` as the app: `CA` (a CA file), `PORT`, `GW_USER` and `GW_PASSWORD`
/// (its credential), `FROM` and `TO` ([`MAILBOX`]) in its environment, and `extra`.
async fn python_as_app(
    ca: &str,
    port: &str,
    script: &str,
    extra: &[(&str, &str)],
) -> (bool, String) {
    let mut envs = vec![
        ("CA", ca),
        ("PORT", port),
        ("GW_USER", USERNAME),
        ("GW_PASSWORD", PASSWORD),
        ("FROM", MAILBOX),
        ("TO", MAILBOX),
    ];
    envs.extend_from_slice(extra);
    run("python3", &["-c", script], &envs, "").await
}

/// Run a program with a deadline; its exit status and output.
async fn run(program: &str, args: &[&str], envs: &[(&str, &str)], stdin: &str) -> (bool, String) {
    use tokio::io::AsyncWriteExt as _;
    let mut cmd = tokio::process::Command::new("timeout");
    cmd.arg("60")
        .arg(program)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!("cannot run {program}: {e} (tools/install-test-deps.sh installs it)")
    });
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The Subject and From of every message in the INBOX at `host:port` over IMAPS (trusting the CA
/// file `ca`), read with Python's imaplib: with XOAUTH2 as the mailbox when `TOKEN` is among
/// `login`, else with `LOGIN` as `GW_USER` with `GW_PASSWORD`.
async fn read_inbox(
    ca: &str,
    host: &str,
    port: u16,
    login: &[(&str, &str)],
) -> (bool, Vec<String>) {
    const SCRIPT: &str = r#"
import imaplib, os, ssl, sys
ctx = ssl.create_default_context(cafile=os.environ["CA"])
m = imaplib.IMAP4_SSL(os.environ["HOST"], int(os.environ["PORT"]), ssl_context=ctx)
if os.environ.get("TOKEN"):
    m.authenticate("XOAUTH2", lambda _: ("user=%s\x01auth=Bearer %s\x01\x01" % (os.environ["USER_NAME"], os.environ["TOKEN"])).encode())
else:
    m.login(os.environ["GW_USER"], os.environ["GW_PASSWORD"])
m.select("INBOX", readonly=True)
typ, data = m.search(None, "ALL")
for num in data[0].split():
    typ, d = m.fetch(num, "(BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])")
    print(" ".join(d[0][1].decode().split()))
m.logout()
"#;
    let port = port.to_string();
    let mut envs = vec![("CA", ca), ("HOST", host), ("PORT", port.as_str())];
    envs.extend_from_slice(login);
    let (ok, out) = run("python3", &["-c", SCRIPT], &envs, "").await;
    (ok, out.lines().map(str::to_owned).collect())
}

/// The INBOX read over IMAPS from Dovecot (XOAUTH2 with the integration's token).
async fn inbox(w: &World) -> Vec<String> {
    let ca = w.dovecot_ca.display().to_string();
    let login = [("USER_NAME", MAILBOX), ("TOKEN", w.token.as_str())];
    let (ok, lines) = read_inbox(&ca, "127.0.0.1", w.dovecot.imaps_port, &login).await;
    assert!(ok, "reading the INBOX over IMAP failed: {lines:?}");
    lines
}

/// Wait until a message with `subject` is in the INBOX (read over IMAP); its header line.
async fn arrived(w: &World, subject: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(line) = inbox(w).await.into_iter().find(|l| l.contains(subject)) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no message {subject:?} in the INBOX after 30 s; deliveries: {:?}\nDovecot: {}\nmsmtpd: {}",
            w.dovecot.deliveries(),
            w.dovecot.log_tail(30),
            w.dovecot.relay_log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn message(from: &str, subject: &str) -> String {
    format!(
        "From: {from}\r\nTo: {MAILBOX}\r\nSubject: {subject}\r\nDate: Sun, 06 Dec 2026 21:00:00 +0000\r\n\r\nSent through the gateway.\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_send_through_the_gateway_and_the_mail_arrives() {
    let w = world().await;
    let submission = w.submission.to_string();
    let submissions = w.submissions.to_string();
    let ca = w.gateway_ca.display().to_string();
    let started = Instant::now();

    // swaks: STARTTLS, AUTH PLAIN, then again with AUTH LOGIN, sending as the send-as address.
    for (auth, from, subject) in [
        ("PLAIN", MAILBOX, "via swaks PLAIN"),
        ("LOGIN", SEND_AS, "via swaks LOGIN"),
    ] {
        let (ok, out) = run(
            "swaks",
            &[
                "--server",
                "127.0.0.1",
                "--port",
                &submission,
                "--tls",
                "--tls-verify",
                "--tls-ca-path",
                &ca,
                "--tls-sni",
                "localhost",
                "--auth",
                auth,
                "--auth-user",
                USERNAME,
                "--auth-password",
                PASSWORD,
                "--from",
                from,
                "--to",
                MAILBOX,
                "--h-Subject",
                subject,
                "--body",
                "Sent by swaks.",
            ],
            &[],
            "",
        )
        .await;
        assert!(ok, "swaks {auth} failed:\n{out}");
        assert!(out.contains("235 2.7.0 Authentication successful"), "{out}");
    }

    // msmtp: implicit TLS (like port 465), AUTH PLAIN.
    let msmtprc = w.dir.path().join("msmtprc");
    std::fs::write(
        &msmtprc,
        format!(
            "account gw\nhost 127.0.0.1\nport {submissions}\ntls on\ntls_starttls off\ntls_trust_file {ca}\ntls_host_override localhost\nauth plain\nuser {USERNAME}\npassword {PASSWORD}\nfrom {MAILBOX}\naccount default : gw\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &msmtprc,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let rc = msmtprc.display().to_string();
    let (ok, out) = run(
        "msmtp",
        &["-C", &rc, "--read-envelope-from", MAILBOX],
        &[],
        &message(MAILBOX, "via msmtp"),
    )
    .await;
    assert!(ok, "msmtp failed:\n{out}");

    // curl smtp:// with STARTTLS required.
    let mail_file = w.dir.path().join("curl-mail.txt");
    std::fs::write(&mail_file, message(SEND_AS, "via curl")).unwrap();
    let (ok, out) = run(
        "curl",
        &[
            "--silent",
            "--show-error",
            "--ssl-reqd",
            "--cacert",
            &ca,
            "--connect-to",
            &format!("localhost:{submission}:127.0.0.1:{submission}"),
            &format!("smtp://localhost:{submission}"),
            "--user",
            &format!("{USERNAME}:{PASSWORD}"),
            "--mail-from",
            SEND_AS,
            "--mail-rcpt",
            MAILBOX,
            "--upload-file",
            &mail_file.display().to_string(),
        ],
        &[],
        "",
    )
    .await;
    assert!(ok, "curl failed:\n{out}");

    // Python's smtplib over implicit TLS.
    let script = r#"
import os, smtplib, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
with smtplib.SMTP_SSL("localhost", int(os.environ["PORT"]), context=ctx) as s:
    s.login(os.environ["GW_USER"], os.environ["GW_PASSWORD"])
    s.sendmail(os.environ["FROM"], [os.environ["TO"]], os.environ["MESSAGE"])
"#;
    let (ok, out) = python_as_app(
        &ca,
        &submissions,
        script,
        &[("MESSAGE", message(MAILBOX, "via smtplib").as_str())],
    )
    .await;
    assert!(ok, "smtplib failed:\n{out}");

    for subject in [
        "via swaks PLAIN",
        "via swaks LOGIN",
        "via msmtp",
        "via curl",
        "via smtplib",
    ] {
        let line = arrived(&w, subject).await;
        println!("arrived over IMAP: {line}");
    }
    assert_eq!(
        w.dovecot.deliveries().len(),
        5,
        "{:?}",
        w.dovecot.deliveries()
    );
    println!(
        "5 messages from 4 clients sent and read back in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Prometheus Alertmanager (Debian's package) in `dir`, mailing every alert to [`MAILBOX`] from
/// [`SEND_AS`] through the gateway's STARTTLS submission port `port` as `user` with [`PASSWORD`],
/// trusting `ca`: the process (stopped when dropped) and its web port.
fn alertmanager(
    dir: &Path,
    port: u16,
    user: &str,
    ca: &Path,
) -> (support::process::Supervised, u16) {
    let binary = Path::new("/usr/bin/prometheus-alertmanager");
    assert!(
        binary.is_file(),
        "{} not found: apt-get install -y --no-install-recommends prometheus-alertmanager (tools/install-test-deps.sh)",
        binary.display()
    );
    let web = support::process::reserve_port();
    let config = dir.join("alertmanager.yml");
    std::fs::write(
        &config,
        format!(
            r#"global:
  smtp_smarthost: "127.0.0.1:{port}"
  smtp_from: "{SEND_AS}"
  smtp_hello: "alertmanager.test"
  smtp_auth_username: "{user}"
  smtp_auth_password: "{PASSWORD}"
  smtp_require_tls: true
route:
  receiver: mail
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: mail
    email_configs:
      - to: "{MAILBOX}"
        send_resolved: false
        tls_config:
          ca_file: "{ca}"
          server_name: localhost
"#,
            ca = ca.display()
        ),
    )
    .unwrap();
    let storage = dir.join("alertmanager-data");
    std::fs::create_dir_all(&storage).unwrap();
    let process = support::process::Supervised::spawn(
        "alertmanager",
        binary,
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.path={}", storage.display()),
            format!("--web.listen-address=127.0.0.1:{web}"),
            "--cluster.listen-address=".into(),
        ],
        &[],
        dir.join("alertmanager.log"),
    );
    (process, web)
}

/// Post `alerts` (JSON) to Alertmanager's API on `web`, retrying for 30 s while it starts.
async fn post_alert(web: u16, alerts: &str, dir: &Path) {
    let url = format!("http://127.0.0.1:{web}/api/v2/alerts");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = run(
            "curl",
            &[
                "--silent",
                "--show-error",
                "--fail",
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "--data",
                alerts,
                &url,
            ],
            &[],
            "",
        )
        .await;
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Alertmanager took no alert within 30 s: {out}\n{}",
            std::fs::read_to_string(dir.join("alertmanager.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_alertmanager_delivers_an_alert_through_the_gateway() {
    let w = world().await;
    let (_alertmanager, web) = alertmanager(w.dir.path(), w.submission, USERNAME, &w.gateway_ca);
    post_alert(
        web,
        r#"[{"labels":{"alertname":"GatewaySmtpTest","severity":"page"},"annotations":{"summary":"sent through the mail gateway"}}]"#,
        w.dir.path(),
    )
    .await;
    let line = arrived(&w, "GatewaySmtpTest").await;
    assert!(line.contains(SEND_AS), "{line}");
    println!("Alertmanager's alert arrived over IMAP: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_senders_and_oversized_messages_are_refused_with_nothing_delivered() {
    let w = world().await;
    // smtplib speaking command by command, printing each answer: a foreign envelope sender, a
    // foreign From: header, SIZE= over the limit, a body over the limit without SIZE=, then a good
    // message in the same session.
    let script = r#"
import os, smtplib, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
limit = int(os.environ["LIMIT"])
def msg(frm, subject, body="hello\r\n"):
    return ("From: %s\r\nTo: %s\r\nSubject: %s\r\n\r\n%s" % (frm, os.environ["TO"], subject, body)).encode()
s = smtplib.SMTP("localhost", int(os.environ["PORT"]))
s.starttls(context=ctx)
s.login(os.environ["GW_USER"], os.environ["GW_PASSWORD"])
print("MAIL-FOREIGN", *s.mail("ceo@example.test"))
s.rset()
print("MAIL-OK", *s.mail(os.environ["FROM"]))
print("RCPT", *s.rcpt(os.environ["TO"]))
print("DATA-FOREIGN-FROM", *s.data(msg("CEO <ceo@example.test>", "forged")))
print("MAIL-SIZE", *s.mail(os.environ["FROM"], ["SIZE=%d" % (limit + 1)]))
s.rset()
s.mail(os.environ["FROM"]); s.rcpt(os.environ["TO"])
print("DATA-TOO-BIG", *s.data(msg(os.environ["FROM"], "too big", ("x" * 998 + "\r\n") * (limit // 1000 + 10))))
s.mail(os.environ["FROM"]); s.rcpt(os.environ["TO"])
print("DATA-OK", *s.data(msg(os.environ["FROM"], "after the refusals")))
s.quit()
"#;
    let port = w.submission.to_string();
    let ca = w.gateway_ca.display().to_string();
    let limit = LIMIT.to_string();
    let (ok, out) = python_as_app(&ca, &port, script, &[("LIMIT", limit.as_str())]).await;
    assert!(ok, "the smtplib session failed:\n{out}");
    let answer = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} answer in:\n{out}"))
            .to_owned()
    };
    let foreign = answer("MAIL-FOREIGN");
    assert!(
        foreign.starts_with("MAIL-FOREIGN 550 b'5.7.1 Sender <ceo@example.test> is not allowed"),
        "{foreign}"
    );
    assert!(
        foreign.contains("alice@example.test, alerts@example.test"),
        "{foreign}"
    );
    let forged = answer("DATA-FOREIGN-FROM");
    assert!(
        forged.starts_with("DATA-FOREIGN-FROM 550 b'5.7.1 From: ceo@example.test is not allowed"),
        "{forged}"
    );
    assert!(
        answer("MAIL-SIZE").starts_with("MAIL-SIZE 552 b'5.3.4"),
        "{out}"
    );
    assert!(
        answer("DATA-TOO-BIG").starts_with("DATA-TOO-BIG 552 b'5.3.4"),
        "{out}"
    );
    assert!(answer("DATA-OK").starts_with("DATA-OK 250 "), "{out}");

    arrived(&w, "after the refusals").await;
    // Only the last message was delivered: the refused ones never reached the MTA.
    let deliveries = w.dovecot.deliveries();
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    let subjects = inbox(&w).await;
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert!(
        !subjects
            .iter()
            .any(|s| s.contains("forged") || s.contains("too big"))
    );
    // Dovecot saw no MAIL FROM of the foreign sender: the gateway refused it before relaying.
    let log = std::fs::read_to_string(w.dovecot.dir.path().join("dovecot.log")).unwrap_or_default();
    assert!(
        !log.contains("ceo@example.test"),
        "Dovecot heard of the foreign sender:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commands_are_answered_in_order_and_none_ride_behind_starttls() {
    let w = world().await;
    // A raw client: after the login, MAIL, RCPT and DATA in one write (RFC 2920), then the message;
    // and on the STARTTLS port, a command written behind STARTTLS before the handshake.
    let script = r#"
import base64, os, socket, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
def lines(f, n):
    out = []
    while len(out) < n:
        l = f.readline().decode().rstrip("\r\n")
        if not l:
            break
        if l[3:4] != "-":
            out.append(l)
    return out
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(os.environ["TLS_PORT"]))), server_hostname="localhost")
f = s.makefile("rb")
lines(f, 1)
auth = base64.b64encode(("\0%s\0%s" % (os.environ["GW_USER"], os.environ["GW_PASSWORD"])).encode()).decode()
s.sendall(("EHLO raw\r\nAUTH PLAIN %s\r\n" % auth).encode())
print("LOGIN", lines(f, 2))
s.sendall(("MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n" % (os.environ["FROM"], os.environ["TO"])).encode())
print("PIPELINED", lines(f, 3))
s.sendall(("From: %s\r\nSubject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n" % os.environ["FROM"]).encode())
print("END", lines(f, 2))
p = socket.create_connection(("127.0.0.1", int(os.environ["PORT"])))
g = p.makefile("rb")
lines(g, 1)
p.sendall(b"EHLO raw\r\nSTARTTLS\r\nMAIL FROM:<x@example.test>\r\n")
print("STARTTLS", lines(g, 3))
"#;
    let port = w.submission.to_string();
    let tls_port = w.submissions.to_string();
    let ca = w.gateway_ca.display().to_string();
    let (ok, out) = python_as_app(&ca, &port, script, &[("TLS_PORT", tls_port.as_str())]).await;
    assert!(ok, "the raw session failed:\n{out}");
    let line = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
            .to_owned()
    };
    assert!(line("LOGIN").contains("'235 2.7.0"), "{out}");
    let pipelined = line("PIPELINED");
    assert!(
        pipelined.contains("['250 2.1.0")
            && pipelined.contains("'250 2.")
            && pipelined.contains("'354 "),
        "{pipelined}"
    );
    let end = line("END");
    assert!(
        end.contains("['250 ") && end.contains("'221 2.0.0"),
        "{end}"
    );
    // Behind STARTTLS: no 220 go-ahead, the session is closed.
    let starttls = line("STARTTLS");
    assert!(
        starttls.contains("'421 4.7.0 Commands sent after STARTTLS"),
        "{starttls}"
    );
    assert!(!starttls.contains("'220 2.0.0"), "{starttls}");
    arrived(&w, "pipelined").await;
}

/// A mail server that answers AUTH as Exchange Online does for a mailbox or tenant with SMTP AUTH
/// switched off; counts the MAIL commands it is sent (none may come).
async fn fake_exchange() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mails = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = mails.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let (read, mut write) = tcp.into_split();
                let mut lines = tokio::io::BufReader::new(read).lines();
                let _ = write
                    .write_all(b"220 fake.outlook.test Microsoft ESMTP MAIL Service ready\r\n")
                    .await;
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" => b"250-fake.outlook.test Hello\r\n250-SIZE 157286400\r\n250-8BITMIME\r\n250 AUTH LOGIN XOAUTH2\r\n",
                        "AUTH" => b"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [AM0PR01CA0001.test]\r\n",
                        "MAIL" => {
                            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            b"530 5.7.57 Client not authenticated\r\n"
                        }
                        "QUIT" => b"221 2.0.0 Bye\r\n",
                        _ => b"500 5.3.3 Unrecognized command\r\n",
                    };
                    if write.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, mails)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsofts_smtp_auth_switch_is_reported_on_the_mail_integration() {
    use k8s_openapi::api::events::v1::Event;
    let env = Env::new("gw-smtp-disabled", server()).await;
    env.integration("inbox", MAILBOX).await;
    let (port, mails) = fake_exchange().await;
    let report = KubeReport::new(
        env.client.clone(),
        mail_integration_operator::reconcile::events::EventPublisher::new(
            env.client.clone(),
            kube::runtime::events::Reporter {
                controller: "mail-integration-gateway".into(),
                instance: None,
            },
        ),
    );
    let gw = gateway(
        UpstreamServer {
            host: "127.0.0.1".into(),
            port,
            tls: TlsMode::None,
        },
        None,
        "a-valid-token-that-microsoft-will-not-look-at",
        AppId::new(env.ns.clone(), "inbox", "mailer"),
        Arc::new(report),
    )
    .await;
    let script = r#"
import os, smtplib, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
with smtplib.SMTP_SSL("localhost", int(os.environ["PORT"]), context=ctx) as s:
    try:
        s.login(os.environ["GW_USER"], os.environ["GW_PASSWORD"])
        print("LOGIN-OK")
    except smtplib.SMTPAuthenticationError as e:
        print("LOGIN", e.smtp_code, e.smtp_error.decode())
"#;
    let port = gw.submissions.to_string();
    let ca = gw.ca.display().to_string();
    let (ok, out) = python_as_app(&ca, &port, script, &[]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("LOGIN 535 5.7.139 The mailbox's provider has SMTP AUTH switched off for alice@example.test"),
        "{out}"
    );
    assert_eq!(mails.load(std::sync::atomic::Ordering::SeqCst), 0);

    // status.gateway.apps[mailer].lastError and a Warning event, written by the gateway.
    let deadline = Instant::now() + Duration::from_secs(20);
    let error = loop {
        let mi = env.get("inbox").await;
        let error = mi
            .status
            .as_ref()
            .and_then(|s| s.gateway.as_ref())
            .and_then(|g| g.apps.iter().find(|a| a.name == "mailer"))
            .and_then(|a| a.last_error.clone());
        if let Some(error) = error {
            break error;
        }
        assert!(
            Instant::now() < deadline,
            "no lastError after 20 s: {:?}",
            mi.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(error.reason, "SmtpClientAuthenticationDisabled");
    assert!(
        error.message.contains(
            "Set-CASMailbox -Identity alice@example.test -SmtpClientAuthenticationDisabled $false"
        ),
        "{}",
        error.message
    );
    assert!(
        !error.message.contains("a-valid-token"),
        "{}",
        error.message
    );
    let events: kube::Api<Event> = kube::Api::namespaced(env.client.clone(), &env.ns);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = events.list(&Default::default()).await.unwrap();
        let found: Vec<&Event> = list
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("SmtpClientAuthenticationDisabled"))
            .collect();
        if let Some(e) = found.first() {
            assert_eq!(e.type_.as_deref(), Some("Warning"));
            // smtplib tried PLAIN and then LOGIN: two refusals, one report an hour.
            assert_eq!(found.len(), 1, "{found:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no SmtpClientAuthenticationDisabled event after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Messages sent one session each (connect, TLS, AUTH, MAIL, RCPT, DATA, QUIT):
/// directly to Dovecot's submission port as the gateway reaches it (STARTTLS, XOAUTH2), or to the
/// gateway's implicit-TLS port with the app's password.
async fn send_many(w: &World, direct: bool, count: usize) {
    let script = r#"
import os, smtplib, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
n = int(os.environ["COUNT"])
msg = "From: %s\r\nTo: %s\r\nSubject: %%s %%d\r\n\r\nbody\r\n" % (os.environ["FROM"], os.environ["FROM"])
for i in range(n):
    direct = os.environ["DIRECT"] == "1"
    with (smtplib.SMTP("localhost", int(os.environ["PORT"])) if direct else smtplib.SMTP_SSL("localhost", int(os.environ["PORT"]), context=ctx)) as s:
        if direct:
            # As the gateway reaches Dovecot: STARTTLS, then XOAUTH2.
            s.starttls(context=ctx)
            s.ehlo()
            auth = "user=%s\x01auth=Bearer %s\x01\x01" % (os.environ["FROM"], os.environ["TOKEN"])
            s.auth("XOAUTH2", lambda challenge=None: auth, initial_response_ok=True)
        else:
            s.login(os.environ["GW_USER"], os.environ["GW_PASSWORD"])
        s.sendmail(os.environ["FROM"], [os.environ["FROM"]], msg % (os.environ["TAG"], i))
"#;
    let (port, ca, tag) = if direct {
        (w.dovecot.submission_port, &w.dovecot_ca, "bench-direct")
    } else {
        (w.submissions, &w.gateway_ca, "bench-gateway")
    };
    let port = port.to_string();
    let ca = ca.display().to_string();
    let count_s = count.to_string();
    let (ok, out) = python_as_app(
        &ca,
        &port,
        script,
        &[
            ("COUNT", count_s.as_str()),
            ("DIRECT", if direct { "1" } else { "0" }),
            ("TOKEN", w.token.as_str()),
            ("TAG", tag),
        ],
    )
    .await;
    assert!(ok, "sending {count} messages ({tag}) failed:\n{out}");
}

/// Messages sent one session each (as an Alertmanager or a cron job sends them), directly to Dovecot
/// and through the gateway against the same Dovecot, all arrive. A correctness test, with no
/// throughput assertion: the rates and their ratio (target >= 0.8) are figures of
/// `cargo bench --bench gateway` (benches/README.md "Gateway"), printed beside the target in one
/// release run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_direct_and_through_the_gateway_are_all_delivered() {
    const COUNT: usize = 5;
    let w = world().await;
    let before = w.dovecot.deliveries().len();
    send_many(&w, true, COUNT).await;
    send_many(&w, false, COUNT).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.dovecot.deliveries().len() < before + 2 * COUNT {
        assert!(
            Instant::now() < deadline,
            "{} of {} messages delivered",
            w.dovecot.deliveries().len() - before,
            2 * COUNT
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Through the gateway process (`mail-integration-operator gateway`, tests/support/gateway.rs)
// ---------------------------------------------------------------------------------------------

/// A namespace with the MailIntegration `inbox` (apps `alertmanager`: SMTP, sending as
/// [`SEND_AS`] too; `reader`: IMAP), its gateway Secret written as the operator writes it, and
/// Dovecot with delivery as its mail server.
struct ProcessWorld {
    env: Env,
    dovecot: Dovecot,
    cert: (PathBuf, PathBuf, PathBuf),
}

async fn process_world(prefix: &str) -> ProcessWorld {
    use mail_integration_operator::gateway::config::{self, Verifier};
    let dovecot = delivering_dovecot();
    let env = Env::new(prefix, server()).await;
    env.integration_with(
        "inbox",
        MAILBOX,
        serde_json::json!({"gateway": {"apps": [
            {"name": "alertmanager", "protocols": ["SMTP"], "sendAs": [SEND_AS]},
            {"name": "reader", "protocols": ["IMAP"]},
        ]}}),
    )
    .await;
    let token = server().obtain_grant("alice").await.access_token;
    let app = |name: &str, protocols: Vec<Protocol>, send_as: Vec<String>| GatewayAppConfig {
        name: name.into(),
        username: config::username(&env.ns, "inbox", name),
        protocols,
        send_as,
        verifiers: vec![Verifier::new(name.as_bytes(), &SecretValue::new(PASSWORD))],
    };
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
        ca_pem: Some(String::from_utf8(dovecot.ca_pem.clone()).unwrap()),
        max_message_bytes: LIMIT,
        apps: vec![
            app("alertmanager", vec![Protocol::Smtp], vec![SEND_AS.into()]),
            app("reader", vec![Protocol::Imap], vec![]),
        ],
    };
    crate::imap_pop3::put_gateway_secret(&env, &gateway_json, &token).await;
    let cert = support::gateway::certificate(env.log_dir.path());
    ProcessWorld { env, dovecot, cert }
}

impl ProcessWorld {
    fn gateway(&self, name: &str) -> support::gateway::Gateway {
        support::gateway::Gateway::start(
            name,
            &self.env.cp.kubeconfig,
            &self.env.ns,
            &self.cert,
            &[],
            self.env.log_dir.path(),
        )
    }

    fn user(&self, app: &str) -> String {
        format!("{}/inbox/{app}", self.env.ns)
    }

    /// The subjects in the INBOX, read over IMAPS through the gateway with the reader's password.
    async fn inbox_through(&self, gw: &support::gateway::Gateway) -> Vec<String> {
        let ca = gw.ca_path.display().to_string();
        let user = self.user("reader");
        let login = [("GW_USER", user.as_str()), ("GW_PASSWORD", PASSWORD)];
        let (ok, lines) = read_inbox(&ca, "localhost", gw.imaps_port, &login).await;
        assert!(
            ok,
            "reading the INBOX through the gateway failed: {lines:?}\n{}",
            gw.log()
        );
        lines
    }

    async fn arrived_through(&self, gw: &support::gateway::Gateway, subject: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self
                .inbox_through(gw)
                .await
                .into_iter()
                .find(|l| l.contains(subject))
            {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no {subject:?} through the gateway after 30 s; deliveries {:?}\n{}",
                self.dovecot.deliveries(),
                gw.log()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alertmanager_through_the_gateway_process_and_read_back_through_it() {
    let w = process_world("gw-smtp-process").await;
    let gw = w.gateway("gateway");
    let dir = w.env.log_dir.path();
    let (_alertmanager, web) = alertmanager(
        dir,
        gw.submission_port,
        &w.user("alertmanager"),
        &gw.ca_path,
    );
    post_alert(
        web,
        r#"[{"labels":{"alertname":"GatewayProcessTest"}}]"#,
        dir,
    )
    .await;
    let line = w.arrived_through(&gw, "GatewayProcessTest").await;
    assert!(line.contains(SEND_AS), "{line}");
    println!("through the gateway process: {line}");
    let sessions = format!(
        r#"mailintegration_gateway_sessions_opened_total{{protocol="SMTP",app="{}"}}"#,
        w.user("alertmanager")
    );
    assert_eq!(
        gw.metric(&sessions),
        1.0,
        "{}",
        gw.get("/metrics").unwrap_or_default()
    );
    let bytes = gw.metric(
        r#"mailintegration_gateway_relayed_bytes_total{protocol="SMTP",direction="to_upstream"}"#,
    );
    assert!(bytes > 100.0, "{bytes} message bytes counted");
    assert_eq!(
        gw.metric(r#"mailintegration_gateway_logins_total{protocol="SMTP",result="success"}"#),
        1.0,
        "{}",
        gw.get("/metrics").unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_message_loses_nothing_and_the_retry_is_delivered() {
    let w = process_world("gw-smtp-kill").await;
    let a = w.gateway("gateway-a");
    let b = w.gateway("gateway-b");
    // Half a message through replica a, which then dies; the same message again through b.
    let script = r#"
import base64, os, socket, ssl, sys, time
ctx = ssl.create_default_context(cafile=os.environ["CA"])
def session(port):
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
    f = s.makefile("rb")
    def reply():
        while True:
            l = f.readline().decode()
            if not l:
                return "CLOSED"
            if l[3:4] != "-":
                return l.strip()
    reply()
    auth = base64.b64encode(("\0%s\0%s" % (os.environ["GW_USER"], os.environ["GW_PASSWORD"])).encode()).decode()
    for cmd in ["EHLO killer", "AUTH PLAIN " + auth, "MAIL FROM:<%s>" % os.environ["FROM"], "RCPT TO:<%s>" % os.environ["FROM"], "DATA"]:
        s.sendall((cmd + "\r\n").encode())
        r = reply()
        print(cmd.split()[0], r, flush=True)
    return s, reply
msg = "From: %s\r\nSubject: cut-mid-message\r\n\r\n" % os.environ["FROM"]
s, reply = session(int(os.environ["PORT_A"]))
s.sendall((msg + "first half\r\n").encode())
print("HALF-SENT", flush=True)
sys.stdin.readline()  # the test kills replica a now
try:
    s.sendall(b"second half\r\n.\r\n")
    print("END-A", reply(), flush=True)
except OSError as e:
    print("END-A", "ERROR", e, flush=True)
s, reply = session(int(os.environ["PORT_B"]))
s.sendall((msg + "first half\r\nsecond half\r\n.\r\n").encode())
print("END-B", reply(), flush=True)
"#;
    let port_a = a.submissions_port.to_string();
    let port_b = b.submissions_port.to_string();
    let ca = a.ca_path.display().to_string();
    let user = w.user("alertmanager");
    let mut child = tokio::process::Command::new("timeout")
        .args(["60", "python3", "-c", script])
        .envs([
            ("CA", ca.as_str()),
            ("PORT_A", port_a.as_str()),
            ("PORT_B", port_b.as_str()),
            ("GW_USER", user.as_str()),
            ("GW_PASSWORD", PASSWORD),
            ("FROM", MAILBOX),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let mut stdin = child.stdin.take().unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut said = Vec::new();
    while let Some(line) = out.next_line().await.unwrap() {
        let half = line == "HALF-SENT";
        said.push(line);
        if half {
            break;
        }
    }
    assert!(said.iter().any(|l| l.starts_with("DATA 354")), "{said:?}");
    drop(a);
    stdin.write_all(b"go\n").await.unwrap();
    drop(stdin);
    while let Some(line) = out.next_line().await.unwrap() {
        said.push(line);
    }
    let end_a = said
        .iter()
        .find(|l| l.starts_with("END-A"))
        .cloned()
        .unwrap_or_default();
    assert!(
        !end_a.contains(" 250"),
        "the cut session was told 250: {said:?}"
    );
    let end_b = said
        .iter()
        .find(|l| l.starts_with("END-B"))
        .cloned()
        .unwrap_or_default();
    assert!(end_b.starts_with("END-B 250"), "{said:?}\n{}", b.log());
    println!("the cut and the retried session: {said:?}");
    w.arrived_through(&b, "cut-mid-message").await;
    // Exactly one copy: the cut message never completed at the mail server.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        w.dovecot.deliveries().len(),
        1,
        "{:?}",
        w.dovecot.deliveries()
    );
}
