//! The mailbox check runs off the refresh path: a mail server that accepts the connection and then
//! says nothing holds only its own check (until the check's timeout), never a due refresh.
//!
//! The mail server below never answers, so a check ends only at its 10 s timeout: when checks ran
//! inside the reconcile, no refresh could come before that; now the next refresh (due ~3 s after
//! the last, tokens live 4 s) comes while the check is still running.

mod support;

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use support::{
    oauth::{OAuthServer, OAuthServerConfig},
    operator::Operator,
    world::{Env, is_ready},
};

/// Access tokens that live 4 s: refreshes come every ~3 s.
fn very_short_lived_server() -> &'static OAuthServer {
    static S: OnceLock<OAuthServer> = OnceLock::new();
    S.get_or_init(|| {
        OAuthServer::start(OAuthServerConfig {
            access_token_ttl: Duration::from_secs(4),
            ..Default::default()
        })
    })
}

/// A TCP server on 127.0.0.1 that accepts connections and keeps them open without a byte.
/// Returns its port and how many connections it holds now.
fn silent_mail_server() -> (u16, Arc<AtomicU64>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = Arc::new(AtomicU64::new(0));
    let h = held.clone();
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in listener.incoming().flatten() {
            h.fetch_add(1, Ordering::Relaxed);
            open.push(stream);
        }
    });
    (port, held)
}

fn refreshes(op: &Operator) -> f64 {
    op.metric(r#"mailintegration_refreshes_total{result="success",reason="TokenRefreshed"}"#)
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_mail_server_does_not_hold_a_due_refresh() {
    let env = Env::new("slow-mailbox", very_short_lived_server()).await;
    let (port, held) = silent_mail_server();
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    env.grant("inbox", "alice").await;
    env.integration_with(
        "inbox",
        "alice@example.test",
        serde_json::json!({"mailbox": {"server": {"host": "127.0.0.1", "port": port, "tls": "None"}}}),
    )
    .await;
    env.wait_for(
        "inbox",
        "Ready=True (the token; no check has finished)",
        Duration::from_secs(30),
        &op,
        is_ready,
    )
    .await;
    // A check is connected to the silent server now and holds that connection until its timeout.
    let deadline = Instant::now() + Duration::from_secs(20);
    while held.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "no mailbox check connected:\n{}",
            op.process.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r0 = refreshes(&op);
    // The next refresh comes while that check is still running: none has finished (a check ends
    // only by its answer or its 10 s timeout, and this server never answers).
    let deadline = Instant::now() + Duration::from_secs(30);
    while refreshes(&op) < r0 + 1.0 {
        assert!(
            Instant::now() < deadline,
            "no refresh while the mailbox check hangs:\n{}",
            op.process.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        finished_checks(&op),
        0.0,
        "the refresh came only after the mailbox check had ended:\n{}",
        op.process.log_tail(30)
    );
}

/// Mailbox checks that have finished, whatever their result.
fn finished_checks(op: &Operator) -> f64 {
    op.metric_sum("mailintegration_mailbox_checks_total{")
}
