//! The gateway's login path made shorter (benches/README.md "Gateway"), against the real Dovecot.
//!
//! IMAP LOGOUT (`src/gateway/logout.rs`): with nothing else outstanding the gateway answers it
//! itself (`* BYE`, the tagged OK, its own text) and then, unless it parks the session for the
//! app's next login (tests/gateway/reuse.rs), logs the session out at Dovecot (whose log says
//! `Logged out`, not a dropped connection); behind a command still running, pipelined,
//! or after a synchronizing literal, LOGOUT is relayed and the app gets every earlier answer first
//! (Dovecot's own LOGOUT text). Real clients (Python's imaplib, curl) end their sessions through it.
//!
//! TLS (`src/gateway/crypto.rs`): TLS_AES_128_GCM_SHA256 on both of a login's handshakes, the
//! app's (the gateway's choice, whatever the app prefers) and the mail server's (offered first;
//! Dovecot picks by the client's order).

use std::{sync::Arc, time::Duration};

use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use mail_integration_operator::{
    api::TlsMode,
    gateway::{
        config::UpstreamServer,
        upstream::{self, Stream},
    },
    mailbox::allowed::AllowedHosts,
};
use rustls::CipherSuite;

use crate::{
    imap_pop3::{MAILBOX, PASSWORD, World, curl_args, imaplib, message, run, world},
    support::gateway::Gateway,
};

pub(crate) type Conn = BufReader<tokio_rustls::client::TlsStream<TcpStream>>;

/// The gateway's own answer (Dovecot's tagged text is `Logout completed (… secs).`).
fn gateway_answer(tag: &str) -> String {
    format!("* BYE Logging out\r\n{tag} OK LOGOUT completed\r\n")
}

/// rustls' default client configuration (ring) trusting only the CA in `ca_pem`.
fn client_config(ca_pem: &[u8]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A TLS connection to `port` trusting the CA in `ca_pem`, with rustls' defaults (its client
/// offers TLS_AES_256_GCM_SHA384 first).
pub(crate) async fn tls_connect(port: u16, ca_pem: &[u8]) -> Conn {
    let config = client_config(ca_pem);
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    BufReader::new(tls)
}

fn suite(conn: &Conn) -> Option<CipherSuite> {
    conn.get_ref()
        .get_ref()
        .1
        .negotiated_cipher_suite()
        .map(|s| s.suite())
}

/// An IMAPS connection to the gateway, logged in as the helpdesk app.
async fn logged_in(w: &World, gw: &Gateway) -> Conn {
    let mut conn = tls_connect(gw.imaps_port, &std::fs::read(&gw.ca_path).unwrap()).await;
    let mut greeting = String::new();
    conn.read_line(&mut greeting).await.unwrap();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let user = w.user("inbox", "helpdesk");
    let answer = command(
        &mut conn,
        &format!("a LOGIN \"{user}\" \"{PASSWORD}\"\r\n"),
        "a",
    )
    .await;
    assert!(answer.contains("a OK"), "{answer}");
    conn
}

/// Everything up to and including the tagged reply `tag` (literals included as they come).
pub(crate) async fn until_tagged(conn: &mut Conn, tag: &str) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read_line(&mut line))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert!(n > 0, "closed before {tag}'s reply; so far:\n{all}");
        all.push_str(&line);
        if line.starts_with(&format!("{tag} ")) {
            return all;
        }
    }
}

pub(crate) async fn command(conn: &mut Conn, text: &str, tag: &str) -> String {
    conn.get_mut().write_all(text.as_bytes()).await.unwrap();
    until_tagged(conn, tag).await
}

/// What the gateway sends until it closes the connection.
pub(crate) async fn to_the_end(conn: &mut Conn) -> String {
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest))
        .await
        .expect("closed within 10 s");
    String::from_utf8_lossy(&rest).into_owned()
}

/// Dovecot's `Logged out` lines (a session ended by LOGOUT; a dropped one says `Disconnected`).
pub(crate) fn logged_out(w: &World) -> usize {
    let log = std::fs::read_to_string(w.dovecot.dir.path().join("dovecot.log")).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains(&format!("imap({MAILBOX})")) && l.contains("Logged out"))
        .count()
}

pub(crate) async fn wait_logged_out(w: &World, count: usize) {
    for _ in 0..100 {
        if logged_out(w) >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "Dovecot logged {} LOGOUTs, {count} expected:\n{}",
        logged_out(w),
        w.dovecot.log_tail(20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_with_nothing_outstanding_is_answered_by_the_gateway_and_logged_out_upstream() {
    let w = world("gw-logout-own").await;
    for i in 0..3 {
        w.dovecot.deliver(MAILBOX, &message(&format!("logout-{i}")));
    }
    // Reuse off: each session is logged out upstream at its LOGOUT. With reuse on, a reset-safe
    // session is parked instead and logged out upstream when it is not taken within the idle
    // limit (tests/gateway/reuse.rs::a_parked_session_is_logged_out_upstream_after_the_idle_limit),
    // and one that sent ENABLE at once (a_session_that_sent_enable_is_logged_out_not_parked).
    let gw = w.gateway("gateway", &["--imap-reuse-idle=0"]);

    // A session that read mail (the body's literal passed through the watch), then LOGOUT.
    let mut conn = logged_in(&w, &gw).await;
    let select = command(&mut conn, "c SELECT INBOX\r\n", "c").await;
    assert!(select.contains("c OK"), "{select}");
    let fetch = command(&mut conn, "d FETCH 1:* (BODY.PEEK[])\r\n", "d").await;
    assert!(
        fetch.contains("Subject: logout-2") && fetch.contains("d OK"),
        "{fetch}"
    );
    conn.get_mut().write_all(b"b LOGOUT\r\n").await.unwrap();
    assert_eq!(to_the_end(&mut conn).await, gateway_answer("b"));
    // Dovecot got the LOGOUT the gateway sent on the app's behalf.
    wait_logged_out(&w, 1).await;

    // IDLE, then DONE and its reply, then LOGOUT: answered here too.
    let mut conn = logged_in(&w, &gw).await;
    assert!(
        command(&mut conn, "c SELECT INBOX\r\n", "c")
            .await
            .contains("c OK")
    );
    conn.get_mut().write_all(b"i IDLE\r\n").await.unwrap();
    let mut line = String::new();
    conn.read_line(&mut line).await.unwrap();
    assert!(line.starts_with('+'), "{line}");
    assert!(command(&mut conn, "DONE\r\n", "i").await.contains("i OK"));
    conn.get_mut().write_all(b"z LOGOUT\r\n").await.unwrap();
    assert_eq!(to_the_end(&mut conn).await, gateway_answer("z"));
    wait_logged_out(&w, 2).await;

    // Real clients end their sessions with LOGOUT through it: imaplib (login, SELECT, SEARCH,
    // FETCH, LOGOUT) and curl (IMAP: LOGIN, SELECT, FETCH, LOGOUT).
    let user = w.user("inbox", "helpdesk");
    let (ok, out) = imaplib(&gw, gw.imaps_port, &user, PASSWORD, "ssl").await;
    assert!(ok && out.contains("MSG Subject: logout-1"), "{out}");
    let url = format!("imaps://localhost:{}/INBOX;UID=1", gw.imaps_port);
    let user_pass = format!("{user}:{PASSWORD}");
    let (ok, out) = run("curl", &curl_args(&gw, &user_pass, &url)).await;
    assert!(ok && out.contains("Subject: logout-"), "{out}");
    wait_logged_out(&w, 4).await;
    // The gateway logs a session's end once the server has closed its side, after Dovecot logs
    // the LOGOUT: wait for the line (the close is bounded by LOGOUT_TIMEOUT, 5 s).
    let ended_here = |log: &str| {
        log.lines()
            .filter(|l| l.contains("gateway session ended") && l.contains("logout"))
            .count()
    };
    for _ in 0..100 {
        if ended_here(&gw.log()) >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = gw.log();
    assert!(ended_here(&log) >= 4, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_behind_unanswered_commands_is_relayed_after_their_answers() {
    let w = world("gw-logout-relayed").await;
    for i in 0..20 {
        w.dovecot
            .deliver(MAILBOX, &message(&format!("relayed-{i}")));
    }
    let gw = w.gateway("gateway", &[]);

    // Pipelined in one write: NOOP's reply first, then Dovecot's own LOGOUT answer.
    let mut conn = logged_in(&w, &gw).await;
    conn.get_mut()
        .write_all(b"x1 NOOP\r\nx2 LOGOUT\r\n")
        .await
        .unwrap();
    let rest = to_the_end(&mut conn).await;
    let noop = rest.find("x1 OK").unwrap_or(usize::MAX);
    let bye = rest.find("* BYE").unwrap_or(usize::MAX);
    assert!(
        noop < bye && rest.contains("x2 OK Logout completed ("),
        "{rest}"
    );

    // A FETCH of every message, and LOGOUT written at once behind it (its own write): FETCH's
    // whole answer comes first, whichever way the gateway answers LOGOUT.
    let mut conn = logged_in(&w, &gw).await;
    assert!(
        command(&mut conn, "c SELECT INBOX\r\n", "c")
            .await
            .contains("c OK")
    );
    conn.get_mut()
        .write_all(b"f FETCH 1:* (BODY.PEEK[])\r\n")
        .await
        .unwrap();
    conn.get_mut().flush().await.unwrap();
    conn.get_mut().write_all(b"g LOGOUT\r\n").await.unwrap();
    let rest = to_the_end(&mut conn).await;
    let fetched = rest.find("f OK").unwrap_or(usize::MAX);
    let bye = rest.find("* BYE").unwrap_or(usize::MAX);
    assert!(
        rest.contains("Subject: relayed-19") && fetched < bye && rest.contains("g OK"),
        "{rest}"
    );

    // After a synchronizing literal (which the server may refuse) the gateway stops following
    // the session: its LOGOUT is relayed (Dovecot's text), and the message was appended.
    let mut conn = logged_in(&w, &gw).await;
    let body = message("appended").replace('\n', "\r\n");
    let go_ahead = command(
        &mut conn,
        &format!("p APPEND INBOX {{{}}}\r\n", body.len()),
        "+",
    )
    .await;
    assert!(go_ahead.starts_with('+'), "{go_ahead}");
    let appended = command(&mut conn, &format!("{body}\r\n"), "p").await;
    assert!(appended.contains("p OK"), "{appended}");
    conn.get_mut().write_all(b"q LOGOUT\r\n").await.unwrap();
    let rest = to_the_end(&mut conn).await;
    assert!(rest.contains("q OK Logout completed ("), "{rest}");
    assert!(
        w.dovecot
            .inbox_files(MAILBOX)
            .iter()
            .any(|m| m.contains("Subject: appended")),
        "the appended message is in the mailbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_tls_sessions_of_a_login_use_aes_128_gcm_sha256() {
    let w = world("gw-tls-suite").await;
    let gw = w.gateway("gateway", &[]);
    // The app's side: the gateway picks by its own order, not the app's (rustls' client here
    // offers AES-256 first).
    let conn = logged_in(&w, &gw).await;
    assert_eq!(suite(&conn), Some(CipherSuite::TLS13_AES_128_GCM_SHA256));
    // Dovecot follows the client's order: a default client gets AES-256 ...
    let direct = tls_connect(w.dovecot.imaps_port, &w.dovecot.ca_pem).await;
    assert_eq!(suite(&direct), Some(CipherSuite::TLS13_AES_256_GCM_SHA384));
    // ... the gateway's upstream connection (the same code as its logins) AES-128.
    let server = UpstreamServer {
        host: "127.0.0.1".into(),
        port: w.dovecot.imaps_port,
        tls: TlsMode::Implicit,
    };
    let ca = String::from_utf8(w.dovecot.ca_pem.clone()).unwrap();
    let (stream, _) = upstream::open_stream(&server, Some(&ca), &AllowedHosts::new(["127.0.0.1"]))
        .await
        .expect("TLS connection to Dovecot");
    let Stream::Tls(tls) = stream else {
        panic!("implicit TLS gave a plain stream");
    };
    assert_eq!(
        tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
        Some(CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
}

/// What a TLS client reads from `port` once its own handshake is done but before its `Finished`
/// reaches the server (it is never sent): a server that greets only after checking the client's
/// `Finished` sends nothing then.
fn greeting_before_the_client_finished(port: u16, ca_pem: &[u8]) -> String {
    use std::io::Read;
    let config = client_config(ca_pem);
    let mut tls =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    // The ClientHello only.
    tls.write_tls(&mut tcp).unwrap();
    let mut got = Vec::new();
    loop {
        match tls.read_tls(&mut tcp) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        tls.process_new_packets().unwrap();
        let mut buf = [0u8; 512];
        if let Ok(n) = tls.reader().read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
            if got.ends_with(b"\r\n") {
                break;
            }
        }
    }
    assert!(
        !tls.is_handshaking(),
        "the client's side of the handshake completed"
    );
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_greeting_of_an_implicit_tls_port_comes_with_the_handshake() {
    let w = world("gw-early-greeting").await;
    let gw = w.gateway("gateway", &[]);
    let ca = std::fs::read(&gw.ca_path).unwrap();
    let (imaps, pop3s) = (gw.imaps_port, gw.pop3s_port);
    let ca2 = ca.clone();
    let imap =
        tokio::task::spawn_blocking(move || greeting_before_the_client_finished(imaps, &ca2))
            .await
            .unwrap();
    assert_eq!(
        imap,
        "* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] gateway.test ready\r\n"
    );
    let pop3 = tokio::task::spawn_blocking(move || greeting_before_the_client_finished(pop3s, &ca))
        .await
        .unwrap();
    assert_eq!(pop3, "+OK gateway.test ready\r\n");
    // Sent once: a client that completes its handshake reads the greeting, then the answer to
    // its first command (the gateway's own, before login).
    let mut conn = tls_connect(gw.imaps_port, &std::fs::read(&gw.ca_path).unwrap()).await;
    let mut greeting = String::new();
    conn.read_line(&mut greeting).await.unwrap();
    assert!(greeting.starts_with("* OK [CAPABILITY"), "{greeting}");
    let noop = command(&mut conn, "n NOOP\r\n", "n").await;
    assert_eq!(noop, "n OK NOOP completed\r\n");
    // POP3 with curl (STLS-free, implicit TLS) and IMAP with imaplib: real clients read it.
    let user = w.user("inbox", "helpdesk");
    let (ok, out) = imaplib(&gw, gw.imaps_port, &user, PASSWORD, "ssl").await;
    assert!(ok, "{out}");
    let url = format!("pop3s://localhost:{}/", gw.pop3s_port);
    let (ok, out) = run("curl", &curl_args(&gw, &format!("{user}:{PASSWORD}"), &url)).await;
    assert!(ok, "{out}");
}
