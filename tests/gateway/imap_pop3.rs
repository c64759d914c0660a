//! IMAP and POP3 through the gateway process (issue 22 points 2, 3, 5 and 6; docs/gateway.md):
//! the built binary (`mail-integration-operator gateway`) in front of Dovecot, whose oauth2 passdb
//! asks oidc-provider about every token; real clients (curl, Python's imaplib, fetchmail) log in
//! with an app's password. Dovecot's own log counts the logins that reached it, so "nothing sent
//! upstream" is the mail server's word.
//!
//! The gateway Secret is written here from `config.rs`'s types, as the operator writes it.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

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
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{
    self,
    dovecot::{Dovecot, DovecotConfig},
    gateway::{self as gw, Gateway},
    oauth::OAuthServer,
    world::Env,
};

pub(crate) const MAILBOX: &str = "alice@example.test";
pub(crate) const PASSWORD: &str = "cGFzc3dvcmQtb2YtdGhlLWhlbHBkZXNrLWFwcC0xMjM0";
const OTHER_PASSWORD: &str = "b3RoZXItaW50ZWdyYXRpb24tcGFzc3dvcmQtOTg3NjU";

pub(crate) fn server() -> &'static OAuthServer {
    support::oauth::with_token_ttl(600)
}

pub(crate) fn dovecot(server: &OAuthServer) -> Dovecot {
    let (id, secret) = server.introspection_client();
    let url = server
        .introspection_url()
        .replacen("http://", &format!("http://{id}:{secret}@"), 1);
    Dovecot::start(DovecotConfig {
        username_attribute: "email".into(),
        ..DovecotConfig::new(url)
    })
}

pub(crate) struct World {
    pub(crate) env: Env,
    pub(crate) dovecot: Dovecot,
    cert: (PathBuf, PathBuf, PathBuf),
    pub(crate) token: String,
    refresh_token: String,
}

impl World {
    pub(crate) fn user(&self, integration: &str, app: &str) -> String {
        config::username(&self.env.ns, integration, app)
    }

    pub(crate) fn gateway(&self, name: &str, extra: &[&str]) -> Gateway {
        Gateway::start(
            name,
            &self.env.cp.kubeconfig,
            &self.env.ns,
            &self.cert,
            extra,
            self.env.log_dir.path(),
        )
    }
}

pub(crate) fn app(
    ns: &str,
    mi: &str,
    name: &str,
    password: &str,
    protocols: Vec<Protocol>,
) -> GatewayAppConfig {
    GatewayAppConfig {
        name: name.into(),
        username: config::username(ns, mi, name),
        protocols,
        send_as: vec![],
        verifiers: vec![Verifier::new(name.as_bytes(), &SecretValue::new(password))],
    }
}

pub(crate) fn gateway_config(w: &World, mi: &str, apps: Vec<GatewayAppConfig>) -> GatewayConfig {
    GatewayConfig {
        namespace: w.env.ns.clone(),
        integration: mi.into(),
        uid: format!("uid-{mi}"),
        mailbox: MAILBOX.into(),
        mechanism: UpstreamMechanism::XOAuth2,
        imap: Some(UpstreamServer {
            host: "127.0.0.1".into(),
            port: w.dovecot.imaps_port,
            tls: TlsMode::Implicit,
        }),
        // POP3 upstream over STLS: the gateway's STARTTLS path towards the server.
        pop3: Some(UpstreamServer {
            host: "127.0.0.1".into(),
            port: w.dovecot.pop3_port,
            tls: TlsMode::StartTls,
        }),
        smtp: None,
        ca_pem: Some(String::from_utf8(w.dovecot.ca_pem.clone()).unwrap()),
        max_message_bytes: 26_214_400,
        apps,
    }
}

/// Write the gateway Secret `<mi>-gateway` as the operator does (server-side apply).
pub(crate) async fn put_gateway_secret(env: &Env, config: &GatewayConfig, token: &str) {
    let name = format!("{}-gateway", config.integration);
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "labels": {
            "mailintegration.dev/gateway": "true",
            "mailintegration.dev/integration": config.integration,
        }},
        "stringData": {
            "gateway.json": serde_json::to_string(config).unwrap(),
            "access_token": token,
            "expiry": "2999-01-01T00:00:00Z",
        },
    }))
    .unwrap();
    env.secrets()
        .patch(
            &name,
            &PatchParams::apply("gateway-test").force(),
            &Patch::Apply(&secret),
        )
        .await
        .unwrap();
}

/// Dovecot, a namespace with the MailIntegration `inbox` (apps helpdesk: IMAP+POP3, mailer: SMTP)
/// and its gateway Secret with alice's access token.
pub(crate) async fn world(prefix: &str) -> World {
    world_on(prefix, server()).await
}

/// [`world`] with the tokens of `server` (and Dovecot asking it about them).
async fn world_on(prefix: &str, server: &'static OAuthServer) -> World {
    let dovecot = dovecot(server);
    let env = Env::new(prefix, server).await;
    env.integration_with(
        "inbox",
        MAILBOX,
        serde_json::json!({"gateway": {"apps": [
            {"name": "helpdesk", "protocols": ["IMAP", "POP3"]},
            {"name": "mailer", "protocols": ["SMTP"]},
        ]}}),
    )
    .await;
    let grant = server.obtain_grant("alice").await;
    let cert = gw::certificate(env.log_dir.path());
    let w = World {
        env,
        dovecot,
        cert,
        token: grant.access_token.clone(),
        refresh_token: grant.refresh_token().to_owned(),
    };
    let ns = w.env.ns.clone();
    let config = gateway_config(
        &w,
        "inbox",
        vec![
            app(
                &ns,
                "inbox",
                "helpdesk",
                PASSWORD,
                vec![Protocol::Imap, Protocol::Pop3],
            ),
            app(&ns, "inbox", "mailer", PASSWORD, vec![Protocol::Smtp]),
        ],
    );
    put_gateway_secret(&w.env, &config, &w.token).await;
    w
}

/// Run a program to its end (at most 60 s): (success, stdout + stderr).
pub(crate) async fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new("timeout")
        .arg("60")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program} is needed (tools/install-test-deps.sh): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub(crate) fn curl_args<'a>(gw: &'a Gateway, user_pass: &'a str, url: &'a str) -> Vec<&'a str> {
    vec![
        "-sS",
        "--max-time",
        "30",
        "--cacert",
        gw.ca_path.to_str().unwrap(),
        "--user",
        user_pass,
        url,
    ]
}

/// Python's imaplib: log in (over IMAPS, or STARTTLS on the plain port), open INBOX and print the
/// subjects; or print the refusal.
const IMAPLIB: &str = r#"
import imaplib, ssl, sys
host, port, ca, user, pw, mode = sys.argv[1:7]
ctx = ssl.create_default_context(cafile=ca)
if mode == 'starttls':
    m = imaplib.IMAP4(host, int(port))
    m.starttls(ssl_context=ctx)
else:
    m = imaplib.IMAP4_SSL(host, int(port), ssl_context=ctx)
try:
    m.login(user, pw)
except imaplib.IMAP4.error as e:
    print('REFUSED', e)
    sys.exit(3)
m.select('INBOX')
typ, data = m.search(None, 'ALL')
# PEEK: reading sets no \Seen flag, and the parts are taken by shape: another session on the
# same mailbox (tests run two at once) can bring an unsolicited `* n FETCH (FLAGS ...)` into the
# answer as a plain bytes item.
for num in data[0].split():
    typ, msg = m.fetch(num, '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
    for part in msg:
        if isinstance(part, tuple):
            print('MSG', part[1].decode().strip())
m.logout()
"#;

pub(crate) async fn imaplib(
    gw: &Gateway,
    port: u16,
    user: &str,
    password: &str,
    mode: &str,
) -> (bool, String) {
    let port = port.to_string();
    run(
        "python3",
        &[
            "-c",
            IMAPLIB,
            "localhost",
            &port,
            gw.ca_path.to_str().unwrap(),
            user,
            password,
            mode,
        ],
    )
    .await
}

pub(crate) fn message(subject: &str) -> String {
    format!(
        "From: bob@example.test\nTo: {MAILBOX}\nSubject: {subject}\nMessage-ID: <{subject}@example.test>\n\nHello through the gateway.\n"
    )
}

/// The apps' status as the gateway wrote it: (app, lastUsedTime).
async fn last_used(w: &World, name: &str) -> Vec<(String, String)> {
    let mi = w.env.get(name).await;
    mi.status
        .and_then(|s| s.gateway)
        .map(|g| {
            g.apps
                .into_iter()
                .filter_map(|a| Some((a.name, a.last_used_time?.0.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_read_the_mailbox_through_the_gateway() {
    let w = world("gw-imap-clients").await;
    w.dovecot.deliver(MAILBOX, &message("hello-gateway"));
    let gw = w.gateway("gateway", &[]);
    let user = w.user("inbox", "helpdesk");
    let user_pass = format!("{user}:{PASSWORD}");
    let logins_before = w.dovecot.logins(MAILBOX);

    // curl over IMAPS (AUTHENTICATE PLAIN with SASL-IR) and POP3S (AUTH PLAIN; upstream over STLS).
    let url = format!("imaps://localhost:{}/INBOX;UID=1", gw.imaps_port);
    let (ok, out) = run("curl", &curl_args(&gw, &user_pass, &url)).await;
    assert!(
        ok && out.contains("Subject: hello-gateway"),
        "curl imaps: {out}\n{}",
        gw.log()
    );
    let url = format!("pop3s://localhost:{}/1", gw.pop3s_port);
    let (ok, out) = run("curl", &curl_args(&gw, &user_pass, &url)).await;
    assert!(
        ok && out.contains("Subject: hello-gateway"),
        "curl pop3s: {out}\n{}",
        gw.log()
    );
    // And POP3 with STLS on the plain port (curl --ssl-reqd).
    let url = format!("pop3://localhost:{}/1", gw.pop3_port);
    let mut args = curl_args(&gw, &user_pass, &url);
    args.push("--ssl-reqd");
    let (ok, out) = run("curl", &args).await;
    assert!(
        ok && out.contains("Subject: hello-gateway"),
        "curl pop3 STLS: {out}\n{}",
        gw.log()
    );

    // Python's imaplib with LOGIN, over IMAPS and over STARTTLS on the plain port.
    for (port, mode) in [(gw.imaps_port, "ssl"), (gw.imap_port, "starttls")] {
        let (ok, out) = imaplib(&gw, port, &user, PASSWORD, mode).await;
        assert!(
            ok && out.contains("MSG Subject: hello-gateway"),
            "imaplib {mode}: {out}\n{}",
            gw.log()
        );
    }

    // fetchmail over POP3S, verifying the gateway's certificate, delivering to a file.
    let dir = w.env.log_dir.path();
    let inbox = dir.join("fetched.mbox");
    let rc = dir.join("fetchmailrc");
    std::fs::write(
        &rc,
        format!(
            "set no bouncemail\npoll localhost service {} protocol POP3 auth password\n  user \"{user}\" password \"{PASSWORD}\"\n  ssl sslcertck sslcertfile \"{}\" keep\n  mda \"/bin/sh -c 'cat >> {}'\"\n",
            gw.pop3s_port,
            gw.ca_path.display(),
            inbox.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&rc, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let idfile = dir.join("fetchids");
    let (ok, out) = run(
        "fetchmail",
        &[
            "--fetchmailrc",
            rc.to_str().unwrap(),
            "--idfile",
            idfile.to_str().unwrap(),
            "--nosyslog",
            "--nodetach",
            "-v",
        ],
    )
    .await;
    let fetched = std::fs::read_to_string(&inbox).unwrap_or_default();
    assert!(
        ok && fetched.contains("Subject: hello-gateway"),
        "fetchmail: {out}\n{}",
        gw.log()
    );

    // Every session reached Dovecot with the token (6 clients), and the metrics say so.
    assert_eq!(
        w.dovecot.logins(MAILBOX) - logins_before,
        6,
        "{}",
        w.dovecot.log_tail(20)
    );
    let success = |p: &str| {
        gw.metric(&format!(
            "mailintegration_gateway_logins_total{{protocol=\"{p}\",result=\"success\"}}"
        ))
    };
    assert_eq!((success("IMAP"), success("POP3")), (3.0, 3.0));
    assert!(
        gw.metric(
            r#"mailintegration_gateway_relayed_bytes_total{protocol="IMAP",direction="to_app"}"#
        ) > 100.0
    );
    // Each login is logged with the app, the source and the result; no password, no token.
    let log = gw.log();
    assert!(
        log.lines().any(|l| l.contains("gateway login")
            && l.contains(&user)
            && l.contains("127.0.0.1")
            && l.contains("success")),
        "{log}"
    );
    assert!(
        !log.contains(PASSWORD) && !log.contains(&w.token),
        "a credential in the log"
    );

    // The gateway wrote status.gateway.apps[].lastUsedTime for helpdesk (and for no other app).
    let deadline = Instant::now() + Duration::from_secs(40);
    let used = loop {
        let used = last_used(&w, "inbox").await;
        if !used.is_empty() || Instant::now() > deadline {
            break used;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(used.len(), 1, "{used:?}\n{}", gw.log());
    assert_eq!(used[0].0, "helpdesk");
    assert_eq!(
        gw.metric(r#"mailintegration_gateway_usage_writes_total{kind="written"}"#),
        1.0,
        "one write for six logins"
    );
}

/// A raw IMAP exchange on the plain port: the greeting and the answer to `lines`.
async fn plain_exchange(port: u16, lines: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut greeting = vec![0u8; 512];
    let n = s.read(&mut greeting).await.unwrap();
    s.write_all(lines.as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    format!(
        "{}{}",
        String::from_utf8_lossy(&greeting[..n]),
        String::from_utf8_lossy(&rest)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_logins_send_nothing_upstream() {
    let w = world("gw-imap-refused").await;
    let ns = w.env.ns.clone();
    // A second integration of the namespace, with an app of the same name and its own password.
    let other = gateway_config(
        &w,
        "other",
        vec![app(
            &ns,
            "other",
            "helpdesk",
            OTHER_PASSWORD,
            vec![Protocol::Imap],
        )],
    );
    put_gateway_secret(&w.env, &other, &w.token).await;
    let gw = w.gateway("gateway", &[]);
    let helpdesk = w.user("inbox", "helpdesk");
    let before = w.dovecot.logins(MAILBOX);

    // A wrong password; another integration's password; the other integration's username with
    // this one's password; an app without IMAP.
    for (user, password, expect) in [
        (helpdesk.as_str(), "wrong-password", "AUTHENTICATIONFAILED"),
        (helpdesk.as_str(), OTHER_PASSWORD, "AUTHENTICATIONFAILED"),
        (
            &w.user("other", "helpdesk"),
            PASSWORD,
            "AUTHENTICATIONFAILED",
        ),
        (&w.user("inbox", "mailer"), PASSWORD, "AUTHORIZATIONFAILED"),
    ] {
        let (ok, out) = imaplib(&gw, gw.imaps_port, user, password, "ssl").await;
        assert!(
            !ok && out.contains("REFUSED") && out.contains(expect),
            "{user}: {out}"
        );
    }
    let url = format!("pop3s://localhost:{}/1", gw.pop3s_port);
    let bad = format!("{helpdesk}:wrong-password");
    let (ok, out) = run("curl", &curl_args(&gw, &bad, &url)).await;
    assert!(!ok, "curl pop3s with a wrong password: {out}");

    // Plaintext: the STARTTLS port says LOGINDISABLED and refuses LOGIN and AUTHENTICATE before
    // TLS (no --allow-plaintext); POP3's plain port refuses USER.
    let out = plain_exchange(
        gw.imap_port,
        &format!("a1 LOGIN {helpdesk} {PASSWORD}\r\na2 AUTHENTICATE PLAIN\r\na3 LOGOUT\r\n"),
    )
    .await;
    assert!(
        out.contains("LOGINDISABLED") && out.contains("STARTTLS"),
        "{out}"
    );
    assert!(out.contains("a1 NO [PRIVACYREQUIRED]"), "{out}");
    assert!(out.contains("a2 NO [PRIVACYREQUIRED]"), "{out}");
    let out = plain_exchange(gw.pop3_port, &format!("USER {helpdesk}\r\nQUIT\r\n")).await;
    assert!(out.contains("-ERR [AUTH] Logins need TLS"), "{out}");

    // Nothing reached Dovecot, and the gateway counted each refusal.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        w.dovecot.logins(MAILBOX),
        before,
        "{}",
        w.dovecot.log_tail(20)
    );
    let count = |p: &str, r: &str| {
        gw.metric(&format!(
            "mailintegration_gateway_logins_total{{protocol=\"{p}\",result=\"{r}\"}}"
        ))
    };
    assert_eq!(count("IMAP", "bad_credential"), 3.0);
    assert_eq!(count("IMAP", "protocol_not_allowed"), 1.0);
    assert_eq!(count("POP3", "bad_credential"), 1.0);
    assert_eq!(count("IMAP", "plaintext_refused"), 2.0);
    assert_eq!(count("POP3", "plaintext_refused"), 1.0);
    let log = gw.log();
    assert!(
        !log.contains(PASSWORD) && !log.contains(OTHER_PASSWORD),
        "a password in the log"
    );
    assert!(
        log.lines().any(|l| l.contains("gateway login refused")
            && l.contains(&helpdesk)
            && l.contains("bad_credential")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brute_force_run_is_throttled_while_another_address_logs_in() {
    let w = world("gw-imap-brute").await;
    let gw = w.gateway(
        "gateway",
        &[
            "--login-budget=3",
            "--login-refuse-after=6",
            "--login-delay=300ms",
            "--login-period=1h",
        ],
    );
    let helpdesk = w.user("inbox", "helpdesk");
    let before = w.dovecot.logins(MAILBOX);
    // Ten wrong passwords from 127.0.0.1, one connection each (a bounded loop).
    let mut answers = Vec::new();
    for i in 0..10 {
        let started = Instant::now();
        let (ok, out) = imaplib(&gw, gw.imaps_port, &helpdesk, &format!("guess-{i}"), "ssl").await;
        assert!(!ok, "{out}");
        answers.push((out, started.elapsed()));
    }
    let refused = |(out, _): &(String, Duration)| out.contains("Too many failed logins");
    assert!(answers[..3].iter().all(|a| !refused(a)), "{answers:?}");
    assert!(answers[6..].iter().all(refused), "{answers:?}");
    // The right password from the throttled address is refused too (before it is checked) ...
    let (ok, out) = imaplib(&gw, gw.imaps_port, &helpdesk, PASSWORD, "ssl").await;
    assert!(!ok && out.contains("Too many failed logins"), "{out}");
    // ... and works from another address meanwhile.
    let url = format!("imaps://localhost:{}/INBOX", gw.imaps_port);
    let user_pass = format!("{helpdesk}:{PASSWORD}");
    let mut args = curl_args(&gw, &user_pass, &url);
    args.extend(["--interface", "127.0.0.2", "-X", "EXAMINE INBOX"]);
    let (ok, out) = run("curl", &args).await;
    assert!(ok, "a good login from 127.0.0.2: {out}\n{}", gw.log());
    assert_eq!(
        w.dovecot.logins(MAILBOX) - before,
        1,
        "only the good login reached Dovecot"
    );
    assert!(gw.metric(r#"mailintegration_gateway_login_throttle_total{kind="delay"}"#) >= 2.0);
    assert!(gw.metric(r#"mailintegration_gateway_login_throttle_total{kind="refusal"}"#) >= 4.0);
    assert!(
        gw.metric(r#"mailintegration_gateway_logins_total{protocol="IMAP",result="throttled"}"#)
            >= 4.0
    );
}

/// An IMAP client that logs in, selects INBOX and IDLEs, printing what the server says.
const IDLER: &str = r#"
import imaplib, ssl, sys
host, port, ca, user, pw = sys.argv[1:6]
m = imaplib.IMAP4_SSL(host, int(port), ssl_context=ssl.create_default_context(cafile=ca))
m.login(user, pw)
m.select('INBOX')
m.send(b'i1 IDLE\r\n')
print('IDLING', m.readline().decode().strip(), flush=True)
m.sock.settimeout(120)
while True:
    line = m.readline()
    if not line:
        print('CLOSED', flush=True)
        break
    print('LINE', line.decode(errors='replace').strip(), flush=True)
"#;

/// Python's imaplib appending a message through the gateway.
const APPENDER: &str = r#"
import imaplib, ssl, sys, time
host, port, ca, user, pw, subject = sys.argv[1:7]
m = imaplib.IMAP4_SSL(host, int(port), ssl_context=ssl.create_default_context(cafile=ca))
m.login(user, pw)
msg = ('From: bob@example.test\r\nSubject: %s\r\n\r\nhi\r\n' % subject).encode()
print(m.append('INBOX', None, imaplib.Time2Internaldate(time.time()), msg))
m.logout()
"#;

struct Idler {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Idler {
    async fn start(gw: &Gateway, user: &str) -> Self {
        let mut child = tokio::process::Command::new("python3")
            .args(["-c", IDLER, "localhost", &gw.imaps_port.to_string()])
            .arg(&gw.ca_path)
            .args([user, PASSWORD])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut idler = Self { child, lines };
        let first = idler.next(Duration::from_secs(30)).await;
        assert!(first.starts_with("IDLING +"), "{first}\n{}", gw.log());
        idler
    }

    async fn next(&mut self, within: Duration) -> String {
        match tokio::time::timeout(within, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => format!("(nothing: {other:?})"),
        }
    }

    /// Read lines until one contains `needle`.
    async fn wait_for(&mut self, needle: &str, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            let line = self
                .next(deadline.saturating_duration_since(Instant::now()))
                .await;
            let done = line.contains(needle);
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_survives_a_token_refresh_and_ends_with_its_credential() {
    // Tokens that live 20 s: the one the session logged in with expires during the test.
    let server = support::oauth::with_token_ttl(20);
    let w = world_on("gw-imap-idle", server).await;
    let gw = w.gateway("gateway", &[]);
    let helpdesk = w.user("inbox", "helpdesk");
    let mut idler = Idler::start(&gw, &helpdesk).await;

    // The token the idling session logged in with expires; then it is refreshed, and the gateway
    // Secret gets the new one (as the operator writes it).
    let deadline = Instant::now() + Duration::from_secs(40);
    while server.introspect(&w.token).await {
        assert!(Instant::now() < deadline, "the first token did not expire");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let fresh = server.refresh(&w.refresh_token).await.into_grant();
    let ns = w.env.ns.clone();
    let helpdesk_app = app(
        &ns,
        "inbox",
        "helpdesk",
        PASSWORD,
        vec![Protocol::Imap, Protocol::Pop3],
    );
    let config = gateway_config(&w, "inbox", vec![helpdesk_app.clone()]);
    put_gateway_secret(&w.env, &config, &fresh.access_token).await;

    // A second session appends a message (it can only be with the new token: the old one is
    // expired, and Dovecot asks oidc-provider about every login).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (ok, out) = run(
            "python3",
            &[
                "-c",
                APPENDER,
                "localhost",
                &gw.imaps_port.to_string(),
                gw.ca_path.to_str().unwrap(),
                &helpdesk,
                PASSWORD,
                "after-refresh",
            ],
        )
        .await;
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "append: {out}\n{}\nthe new token: {}",
            gw.log(),
            server.introspection(&fresh.access_token).await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The session that was idling since before the refresh hears of it.
    let seen = idler.wait_for("EXISTS", Duration::from_secs(40)).await;
    assert!(
        seen.iter().any(|l| l.contains("EXISTS")),
        "{seen:?}\n{}",
        w.dovecot.log_tail(20)
    );

    // The app is removed from the integration: its session ends.
    let config = gateway_config(&w, "inbox", vec![]);
    put_gateway_secret(&w.env, &config, &fresh.access_token).await;
    let seen = idler.wait_for("CLOSED", Duration::from_secs(20)).await;
    assert!(seen.iter().any(|l| l.contains("revoked")), "{seen:?}");
    assert_eq!(seen.last().map(String::as_str), Some("CLOSED"), "{seen:?}");
    let _ = idler.child.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_replicas_serve_at_once() {
    let w = world("gw-imap-replicas").await;
    w.dovecot.deliver(MAILBOX, &message("two-replicas"));
    let a = w.gateway("gateway-a", &[]);
    let b = w.gateway("gateway-b", &[]);
    let helpdesk = w.user("inbox", "helpdesk");
    // A session held open on each, then a login on each while they are open.
    let mut idle_a = Idler::start(&a, &helpdesk).await;
    let mut idle_b = Idler::start(&b, &helpdesk).await;
    let (ra, rb) = tokio::join!(
        imaplib(&a, a.imaps_port, &helpdesk, PASSWORD, "ssl"),
        imaplib(&b, b.imaps_port, &helpdesk, PASSWORD, "ssl"),
    );
    assert!(ra.0 && ra.1.contains("two-replicas"), "{}", ra.1);
    assert!(rb.0 && rb.1.contains("two-replicas"), "{}", rb.1);
    for gw in [&a, &b] {
        assert_eq!(
            gw.metric(r#"mailintegration_gateway_logins_total{protocol="IMAP",result="success"}"#),
            2.0
        );
    }
    // One replica gone: the other still serves its session and new ones.
    drop(a);
    let out = idle_a.wait_for("CLOSED", Duration::from_secs(20)).await;
    assert_eq!(out.last().map(String::as_str), Some("CLOSED"), "{out:?}");
    let (ok, out) = imaplib(&b, b.imaps_port, &helpdesk, PASSWORD, "ssl").await;
    assert!(ok, "{out}");
    w.dovecot.deliver(MAILBOX, &message("still-there"));
    let seen = idle_b.wait_for("EXISTS", Duration::from_secs(40)).await;
    assert!(seen.iter().any(|l| l.contains("EXISTS")), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_credential_holds_at_most_its_sessions() {
    let w = world("gw-imap-cap").await;
    let gw = w.gateway("gateway", &["--max-sessions-per-credential=2"]);
    let helpdesk = w.user("inbox", "helpdesk");
    let first = Idler::start(&gw, &helpdesk).await;
    let _second = Idler::start(&gw, &helpdesk).await;
    let (ok, out) = imaplib(&gw, gw.imaps_port, &helpdesk, PASSWORD, "ssl").await;
    assert!(!ok && out.contains("[LIMIT]"), "{out}");
    assert_eq!(
        gw.metric(
            r#"mailintegration_gateway_logins_total{protocol="IMAP",result="too_many_sessions"}"#
        ),
        1.0
    );
    // A session ends: its place is free again.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out) = imaplib(&gw, gw.imaps_port, &helpdesk, PASSWORD, "ssl").await;
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
