//! Reuse of authenticated upstream IMAP sessions, per credential (src/gateway/reuse.rs,
//! src/gateway/parked.rs), against the real Dovecot: its log counts the logins that reached it
//! (`Login: user=<...>`) and the sessions the gateway logged out (`Logged out`).
//!
//! After the gateway answered an app's LOGOUT itself, a reset-safe session is parked for the same
//! credential's next login, which gets the same login answer and a session with nothing selected;
//! a session that sent ENABLE is logged out; another app never gets it; it is logged out when the
//! app is removed, the integration's Secret deleted, the token replaced or its idle limit passed.

use std::time::Duration;

use mail_integration_operator::gateway::session::Protocol;
use tokio::io::AsyncWriteExt;

use crate::{
    imap_pop3::{
        MAILBOX, PASSWORD, World, app, curl_args, gateway_config, imaplib, message,
        put_gateway_secret, run, server, world,
    },
    login_path::{
        Conn, command, logged_out, tls_connect, to_the_end, until_tagged, wait_logged_out,
    },
    support::gateway::Gateway,
};

const CRM_PASSWORD: &str = "Y3JtLWFwcC1wYXNzd29yZC1mb3ItdGhlLXJldXNlLXRlc3Q";

const PARKED_NOW: &str = "mailintegration_gateway_imap_upstream_parked_now";
const REUSED: &str = "mailintegration_gateway_imap_upstream_reused_total";

fn dropped(reason: &str) -> String {
    format!("mailintegration_gateway_imap_upstream_park_dropped_total{{reason=\"{reason}\"}}")
}

fn not_parked(reason: &str) -> String {
    format!("mailintegration_gateway_imap_upstream_not_parked_total{{reason=\"{reason}\"}}")
}

/// A gateway with reuse on (`idle` parked at most).
fn gateway(w: &World, idle: &str) -> Gateway {
    w.gateway("gateway", &[&format!("--imap-reuse-idle={idle}")])
}

/// Log `user` in over IMAPS: the connection and everything the gateway answered to the login
/// (untagged lines and the tagged reply).
async fn login(gw: &Gateway, user: &str, password: &str) -> (Conn, String) {
    let mut conn = tls_connect(gw.imaps_port, &std::fs::read(&gw.ca_path).unwrap()).await;
    let greeting = until_tagged(&mut conn, "*").await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let answer = command(
        &mut conn,
        &format!("a LOGIN \"{user}\" \"{password}\"\r\n"),
        "a",
    )
    .await;
    assert!(answer.contains("a OK"), "{answer}");
    (conn, answer)
}

/// LOGOUT answered by the gateway itself (the condition for parking).
async fn logout(mut conn: Conn) {
    conn.get_mut().write_all(b"z LOGOUT\r\n").await.unwrap();
    let rest = to_the_end(&mut conn).await;
    assert_eq!(rest, "* BYE Logging out\r\nz OK LOGOUT completed\r\n");
}

/// Wait until the metric `sample` is `value` (10 s at most).
async fn wait_metric(gw: &Gateway, sample: &str, value: f64) {
    for _ in 0..100 {
        if gw.metric(sample) == value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{sample} is {}, {value} expected\n{}",
        gw.metric(sample),
        gw.log()
    );
}

/// A session that read mail and logged out, parked (after UNSELECT).
async fn read_and_park(w: &World, gw: &Gateway, user: &str, parked: f64) -> String {
    let (mut conn, answer) = login(gw, user, PASSWORD).await;
    let select = command(&mut conn, "s SELECT INBOX\r\n", "s").await;
    assert!(select.contains("s OK"), "{select}");
    let fetch = command(&mut conn, "f FETCH 1 (BODY.PEEK[])\r\n", "f").await;
    assert!(fetch.contains("Subject: reuse-"), "{fetch}");
    logout(conn).await;
    wait_metric(gw, PARKED_NOW, parked).await;
    let _ = w;
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_login_of_the_same_app_gets_the_parked_session_unselected() {
    let w = world("gw-reuse-same").await;
    w.dovecot.deliver(MAILBOX, &message("reuse-1"));
    let gw = gateway(&w, "30s");
    let user = w.user("inbox", "helpdesk");
    let before = w.dovecot.logins(MAILBOX);

    let first = read_and_park(&w, &gw, &user, 1.0).await;
    assert_eq!(
        w.dovecot.logins_reaching(MAILBOX, before + 1).await,
        before + 1
    );
    assert_eq!(logged_out(&w), 0, "parked, not logged out");

    // The second login: the same answer as a fresh login (Dovecot's capabilities after login),
    // no login at Dovecot, and a session with no mailbox selected.
    let (mut conn, second) = login(&gw, &user, PASSWORD).await;
    assert_eq!(second, first);
    assert_eq!(gw.metric(REUSED), 1.0);
    assert_eq!(gw.metric(PARKED_NOW), 0.0);
    let early = command(&mut conn, "e FETCH 1 (FLAGS)\r\n", "e").await;
    assert!(early.contains("e BAD"), "a FETCH before SELECT: {early}");
    let select = command(&mut conn, "s SELECT INBOX\r\n", "s").await;
    assert!(select.contains("s OK"), "{select}");
    let fetch = command(&mut conn, "f FETCH 1 (BODY.PEEK[])\r\n", "f").await;
    assert!(
        fetch.contains("Subject: reuse-1") && fetch.contains("f OK"),
        "{fetch}"
    );
    logout(conn).await;
    wait_metric(&gw, PARKED_NOW, 1.0).await;

    // Real clients through the parked session: imaplib (LOGIN, SELECT, SEARCH, FETCH, LOGOUT) and
    // curl (AUTHENTICATE PLAIN, SELECT, FETCH, LOGOUT), each reusing it.
    let (ok, out) = imaplib(&gw, gw.imaps_port, &user, PASSWORD, "ssl").await;
    assert!(ok && out.contains("MSG Subject: reuse-1"), "{out}");
    wait_metric(&gw, PARKED_NOW, 1.0).await;
    let url = format!("imaps://localhost:{}/INBOX;UID=1", gw.imaps_port);
    let user_pass = format!("{user}:{PASSWORD}");
    let (ok, out) = run("curl", &curl_args(&gw, &user_pass, &url)).await;
    assert!(ok && out.contains("Subject: reuse-1"), "{out}");
    wait_metric(&gw, PARKED_NOW, 1.0).await;
    assert_eq!(gw.metric(REUSED), 3.0);
    assert_eq!(
        w.dovecot.logins(MAILBOX),
        before + 1,
        "one upstream login for four app logins\n{}",
        w.dovecot.log_tail(20)
    );
    let log = gw.log();
    assert!(
        log.lines().any(
            |l| l.contains("gateway login") && l.contains("upstream=\"reused\"")
                || l.contains("gateway login") && l.contains("upstream=reused")
        ),
        "{log}"
    );
    assert!(
        !log.contains(PASSWORD) && !log.contains(&w.token),
        "a credential in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_sent_enable_is_logged_out_not_parked() {
    let w = world("gw-reuse-enable").await;
    let gw = gateway(&w, "30s");
    let user = w.user("inbox", "helpdesk");
    let before = w.dovecot.logins(MAILBOX);
    let (mut conn, _) = login(&gw, &user, PASSWORD).await;
    let enabled = command(&mut conn, "e ENABLE CONDSTORE\r\n", "e").await;
    assert!(enabled.contains("e OK"), "{enabled}");
    logout(conn).await;
    wait_logged_out(&w, 1).await;
    assert_eq!(gw.metric(&not_parked("command")), 1.0);
    assert_eq!(gw.metric(PARKED_NOW), 0.0);
    // The next login is a login at Dovecot of its own.
    let (conn, _) = login(&gw, &user, PASSWORD).await;
    assert_eq!(
        w.dovecot.logins_reaching(MAILBOX, before + 2).await,
        before + 2
    );
    assert_eq!(gw.metric(REUSED), 0.0);
    // A FETCH with MODSEQ enables CONDSTORE too (RFC 7162 3.1): not parked either.
    let mut conn = conn;
    let select = command(&mut conn, "s SELECT INBOX\r\n", "s").await;
    assert!(select.contains("s OK"), "{select}");
    let _ = command(&mut conn, "f FETCH 1:* (FLAGS MODSEQ)\r\n", "f").await;
    logout(conn).await;
    wait_logged_out(&w, 2).await;
    assert_eq!(gw.metric(&not_parked("command")), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_app_of_the_integration_never_gets_the_parked_session() {
    let w = world("gw-reuse-other-app").await;
    w.dovecot.deliver(MAILBOX, &message("reuse-2"));
    let ns = w.env.ns.clone();
    let config = gateway_config(
        &w,
        "inbox",
        vec![
            app(&ns, "inbox", "helpdesk", PASSWORD, vec![Protocol::Imap]),
            app(&ns, "inbox", "crm", CRM_PASSWORD, vec![Protocol::Imap]),
        ],
    );
    put_gateway_secret(&w.env, &config, &w.token).await;
    let gw = gateway(&w, "30s");
    let (helpdesk, crm) = (w.user("inbox", "helpdesk"), w.user("inbox", "crm"));
    let before = w.dovecot.logins(MAILBOX);
    read_and_park(&w, &gw, &helpdesk, 1.0).await;
    // crm: a login of its own at Dovecot; helpdesk's session stays parked.
    let (conn, _) = login(&gw, &crm, CRM_PASSWORD).await;
    assert_eq!(
        w.dovecot.logins_reaching(MAILBOX, before + 2).await,
        before + 2
    );
    assert_eq!(gw.metric(REUSED), 0.0);
    assert_eq!(gw.metric(PARKED_NOW), 1.0);
    logout(conn).await;
    wait_metric(&gw, PARKED_NOW, 2.0).await;
    // Each app gets its own back.
    let (conn, _) = login(&gw, &helpdesk, PASSWORD).await;
    let (conn2, _) = login(&gw, &crm, CRM_PASSWORD).await;
    assert_eq!(gw.metric(REUSED), 2.0);
    assert_eq!(
        w.dovecot.logins_reaching(MAILBOX, before + 2).await,
        before + 2
    );
    drop((conn, conn2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_app_or_the_integration_logs_its_parked_session_out() {
    let w = world("gw-reuse-revoked").await;
    w.dovecot.deliver(MAILBOX, &message("reuse-3"));
    let ns = w.env.ns.clone();
    let with_helpdesk = gateway_config(
        &w,
        "inbox",
        vec![
            app(&ns, "inbox", "helpdesk", PASSWORD, vec![Protocol::Imap]),
            app(&ns, "inbox", "crm", CRM_PASSWORD, vec![Protocol::Imap]),
        ],
    );
    put_gateway_secret(&w.env, &with_helpdesk, &w.token).await;
    let gw = gateway(&w, "10m");
    let helpdesk = w.user("inbox", "helpdesk");
    read_and_park(&w, &gw, &helpdesk, 1.0).await;
    assert_eq!(logged_out(&w), 0);
    // helpdesk removed from spec.gateway: the operator rewrites the Secret without it.
    let without = gateway_config(
        &w,
        "inbox",
        vec![app(&ns, "inbox", "crm", CRM_PASSWORD, vec![Protocol::Imap])],
    );
    put_gateway_secret(&w.env, &without, &w.token).await;
    wait_logged_out(&w, 1).await;
    wait_metric(&gw, PARKED_NOW, 0.0).await;
    assert_eq!(gw.metric(&dropped("revoked")), 1.0);

    // The integration deleted: its gateway Secret goes.
    let crm = w.user("inbox", "crm");
    let (conn, _) = login(&gw, &crm, CRM_PASSWORD).await;
    logout(conn).await;
    wait_metric(&gw, PARKED_NOW, 1.0).await;
    w.env
        .secrets()
        .delete("inbox-gateway", &Default::default())
        .await
        .unwrap();
    wait_logged_out(&w, 2).await;
    wait_metric(&gw, PARKED_NOW, 0.0).await;
    assert_eq!(gw.metric(&dropped("revoked")), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_token_refresh_the_parked_session_is_logged_out_not_reused() {
    let w = world("gw-reuse-token").await;
    w.dovecot.deliver(MAILBOX, &message("reuse-4"));
    let gw = gateway(&w, "10m");
    let user = w.user("inbox", "helpdesk");
    let before = w.dovecot.logins(MAILBOX);
    read_and_park(&w, &gw, &user, 1.0).await;
    // The operator's refresh writes the new access token into the gateway Secret.
    let fresh = server().obtain_grant("alice").await.access_token;
    assert_ne!(fresh, w.token);
    let ns = w.env.ns.clone();
    let config = gateway_config(
        &w,
        "inbox",
        vec![app(
            &ns,
            "inbox",
            "helpdesk",
            PASSWORD,
            vec![Protocol::Imap, Protocol::Pop3],
        )],
    );
    put_gateway_secret(&w.env, &config, &fresh).await;
    wait_logged_out(&w, 1).await;
    wait_metric(&gw, PARKED_NOW, 0.0).await;
    assert_eq!(gw.metric(&dropped("token_changed")), 1.0);
    let (conn, _) = login(&gw, &user, PASSWORD).await;
    assert_eq!(gw.metric(REUSED), 0.0);
    assert_eq!(
        w.dovecot.logins_reaching(MAILBOX, before + 2).await,
        before + 2
    );
    drop(conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_session_is_logged_out_upstream_after_the_idle_limit() {
    let w = world("gw-reuse-idle").await;
    w.dovecot.deliver(MAILBOX, &message("reuse-5"));
    let gw = gateway(&w, "2s");
    let user = w.user("inbox", "helpdesk");
    let before = w.dovecot.logins(MAILBOX);
    read_and_park(&w, &gw, &user, 1.0).await;
    assert_eq!(logged_out(&w), 0);
    wait_logged_out(&w, 1).await;
    wait_metric(&gw, PARKED_NOW, 0.0).await;
    assert_eq!(gw.metric(&dropped("idle")), 1.0);
    let (conn, _) = login(&gw, &user, PASSWORD).await;
    assert_eq!(gw.metric(REUSED), 0.0);
    assert_eq!(
        w.dovecot.logins_reaching(MAILBOX, before + 2).await,
        before + 2
    );
    drop(conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_session_never_keeps_an_active_login_out_of_the_session_cap() {
    let w = world("gw-reuse-cap").await;
    w.dovecot.deliver(MAILBOX, &message("reuse-6"));
    let gw = w.gateway(
        "gateway",
        &["--imap-reuse-idle=10m", "--max-sessions-per-credential=2"],
    );
    let user = w.user("inbox", "helpdesk");
    // One active session and one parked: the credential's cap of 2 is taken.
    let (active, _) = login(&gw, &user, PASSWORD).await;
    read_and_park(&w, &gw, &user, 1.0).await;
    // Another login: the parked session makes way (logged out upstream), the login is served.
    let (mut second, answer) = login(&gw, &user, PASSWORD).await;
    assert!(answer.contains("a OK"), "{answer}");
    wait_logged_out(&w, 1).await;
    assert_eq!(gw.metric(&dropped("evicted")), 1.0);
    assert_eq!(gw.metric(PARKED_NOW), 0.0);
    let select = command(&mut second, "s SELECT INBOX\r\n", "s").await;
    assert!(select.contains("s OK"), "{select}");
    // Two active sessions: a third is refused as before (nothing parked to make way).
    let mut conn = tls_connect(gw.imaps_port, &std::fs::read(&gw.ca_path).unwrap()).await;
    let _ = until_tagged(&mut conn, "*").await;
    let refused = command(
        &mut conn,
        &format!("a LOGIN \"{user}\" \"{PASSWORD}\"\r\n"),
        "a",
    )
    .await;
    assert!(refused.contains("a NO [LIMIT]"), "{refused}");
    drop((active, second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_logs_its_parked_sessions_out() {
    let w = world("gw-reuse-stop").await;
    w.dovecot.deliver(MAILBOX, &message("reuse-7"));
    let mut gw = gateway(&w, "10m");
    let user = w.user("inbox", "helpdesk");
    read_and_park(&w, &gw, &user, 1.0).await;
    assert_eq!(logged_out(&w), 0);
    // SIGTERM: the parked session gets a LOGOUT (Dovecot: `Logged out`, not `Disconnected`).
    tokio::task::block_in_place(|| gw.process.stop());
    wait_logged_out(&w, 1).await;
    let log = gw.log();
    assert!(
        log.lines()
            .any(|l| l.contains("parked upstream session ended") && l.contains("shutdown")),
        "{log}"
    );
}
