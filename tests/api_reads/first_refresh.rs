//! What a refresh costs at the API server, counted in its audit log. A first refresh (an OIDC
//! integration with a grant and no token Secret yet) writes the write-ahead mark, creates its token
//! Secret without reading it first, applies its status once and publishes one event for its
//! transitions (Ready and Authorized together): 4 writes. The grant is written a second time only
//! when the provider rotates the refresh token or a grant brought by hand is bound (the store takes
//! the mark off); an issuer that does not rotate leaves the mark, resolved, and the token Secret
//! records it. Every later refresh of such a grant: mark, token Secret, status (3 writes).

use crate::{
    long_lived_server,
    support::{
        api_audit::{self, ApiRequest},
        oauth::{OAuthServer, OAuthServerConfig},
        world::{Env, annotate_refresh, is_ready},
    },
};
use k8s_openapi::api::core::v1::Secret;
use std::{collections::BTreeMap, sync::OnceLock, time::Duration};

const IN_FLIGHT: &str = "mailintegration.dev/refresh-in-flight";
const REFRESHED_UNDER: &str = "mailintegration.dev/refreshed-under";

/// An issuer that never rotates refresh tokens (Keycloak's and most OIDC servers' default), with
/// access tokens of 10 minutes.
fn non_rotating_server() -> &'static OAuthServer {
    static S: OnceLock<OAuthServer> = OnceLock::new();
    S.get_or_init(|| {
        OAuthServer::start(OAuthServerConfig {
            access_token_ttl: Duration::from_secs(600),
            rotate_refresh_token: false,
            ..Default::default()
        })
    })
}

fn counts(requests: &[(&str, usize)]) -> BTreeMap<String, usize> {
    requests
        .iter()
        .map(|(k, v)| ((*k).to_owned(), *v))
        .collect()
}

/// The requests in the test's namespace, by "verb kind".
fn by_verb_and_kind(requests: &[ApiRequest], ns: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in requests
        .iter()
        .filter(|r| r.namespace.as_deref() == Some(ns) && r.verb != "watch")
    {
        *out.entry(format!("{} {}", r.verb, r.kind())).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_refresh_creates_the_token_secret_unread_and_publishes_one_event() {
    let env = Env::new("first-refresh", long_lived_server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    env.grant("inbox", "alice").await;
    let before = op.api_requests();
    env.integration("inbox", "alice@example.test").await;
    env.wait_for(
        "inbox",
        "Ready=True",
        Duration::from_secs(30),
        &op,
        is_ready,
    )
    .await;
    // The reconciles that the operator's own writes bring write nothing more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let requests = api_audit::since(&before, &op.api_requests());
    let counts = by_verb_and_kind(&requests, &env.ns);
    let token = format!("secrets/{}", "inbox-token");
    let listing = api_audit::describe(&requests);
    assert!(
        !requests
            .iter()
            .any(|r| r.verb == "get" && r.uri.contains(&token)),
        "the token Secret was read before it was created:\n{listing}"
    );
    let expected: BTreeMap<String, usize> = [
        // The write-ahead mark (a merge patch of its annotation) and the grant store (a PUT): the
        // issuer rotated the refresh token (and the grant, brought by hand, is bound to where it
        // worked in the same write).
        ("patch secrets", 1),
        ("update secrets", 1),
        ("create secrets", 1),
        ("patch mailintegrations/status", 1),
        ("create events", 1),
        // The client Secret's data, once per version (its watch is metadata-only).
        ("get secrets", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(counts, expected, "{listing}");
    let writes = requests.iter().filter(|r| r.is_write()).count();
    eprintln!("first refresh: {writes} writes, {counts:?}");
}

/// Three integrations of one client, their grants as a sign-in stores them (bound to the token
/// endpoint and client), at an issuer that does not rotate: each first refresh is 4 writes (mark,
/// token Secret create, status, one event) and the client Secret is read once for all; each later
/// refresh 3 (mark, token Secret, status), nothing read. The mark stays on the grant and the token
/// Secret records it. On main before this change: 5 and 4 writes (the store that took the mark
/// off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_rotating_refresh_writes_the_mark_once_and_leaves_it_resolved() {
    const N: usize = 3;
    let env = Env::new("nonrot-refresh", non_rotating_server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    let token_url = env.proxy.token_url();
    for i in 0..N {
        let grant = env.server.obtain_grant("alice").await;
        env.put_secret(
            &format!("inbox-{i}-oauth-grant"),
            &[
                ("refresh_token", grant.refresh_token()),
                ("token_endpoint", &token_url),
                ("client_id", env.server.client_id()),
            ],
        )
        .await;
    }
    let before = op.api_requests();
    for i in 0..N {
        env.integration(&format!("inbox-{i}"), "alice@example.test")
            .await;
    }
    for i in 0..N {
        env.wait_for(
            &format!("inbox-{i}"),
            "Ready=True",
            Duration::from_secs(30),
            &op,
            is_ready,
        )
        .await;
    }
    // The reconciles that the operator's own writes bring write nothing more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let requests = api_audit::since(&before, &op.api_requests());
    let listing = api_audit::describe(&requests);
    assert_eq!(
        by_verb_and_kind(&requests, &env.ns),
        counts(&[
            // The marks (merge patches of the annotation).
            ("patch secrets", N),
            ("create secrets", N),
            ("patch mailintegrations/status", N),
            ("create events", N),
            // The client Secret's data, once per version, for all three.
            ("get secrets", 1),
        ]),
        "first refreshes:\n{listing}"
    );
    let writes = requests.iter().filter(|r| r.is_write()).count();
    assert!(writes <= 4 * N, "{writes} writes for {N} first refreshes");
    // The mark stays, and the token Secret records it: resolved for any process.
    let mut marks = Vec::new();
    for i in 0..N {
        let (mark, recorded) = mark_and_record(&env, i).await;
        assert!(mark.is_some(), "inbox-{i}: no mark on the grant");
        assert_eq!(
            mark, recorded,
            "inbox-{i}: the token Secret records another mark"
        );
        marks.push(mark);
    }

    // Every later refresh: the mark, the token Secret, the status; no event, no read.
    let before = op.api_requests();
    let last = |mi: &mail_integration_operator::api::MailIntegration| {
        mi.status.as_ref().and_then(|s| s.last_refresh_time.clone())
    };
    let mut was = Vec::new();
    for i in 0..N {
        was.push(last(&env.get(&format!("inbox-{i}")).await));
        annotate_refresh(&env, &format!("inbox-{i}"), "again").await;
    }
    for (i, was) in was.into_iter().enumerate() {
        env.wait_for(
            &format!("inbox-{i}"),
            "refreshed again",
            Duration::from_secs(30),
            &op,
            |mi| last(mi) != was && is_ready(mi),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let requests = api_audit::since(&before, &op.api_requests());
    let listing = api_audit::describe(&requests);
    assert_eq!(
        by_verb_and_kind(&requests, &env.ns),
        counts(&[
            // The marks and the token Secrets.
            ("patch secrets", 2 * N),
            ("patch mailintegrations/status", N),
        ]),
        "second refreshes:\n{listing}"
    );
    for (i, old) in marks.into_iter().enumerate() {
        let (mark, recorded) = mark_and_record(&env, i).await;
        assert_ne!(
            mark, old,
            "inbox-{i}: the second refresh wrote no mark of its own"
        );
        assert_eq!(mark, recorded, "inbox-{i}");
    }
    // One presentation per refresh.
    assert_eq!(
        env.proxy.refresh_requests(),
        2 * N as u64,
        "refresh requests at the issuer"
    );
}

/// A loopback IMAP server that accepts any XOAUTH2 token (greeting, AUTHENTICATE, EXAMINE,
/// LOGOUT): the mailbox check of a Google integration succeeds without Google.
async fn accepting_imap() -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                if write.write_all(b"* OK test IMAP ready\r\n").await.is_err() {
                    return;
                }
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut words = line.split_whitespace();
                    let tag = words.next().unwrap_or("*").to_owned();
                    let command = words.next().unwrap_or("").to_ascii_uppercase();
                    let answer = match command.as_str() {
                        "AUTHENTICATE" => {
                            if words.nth(1).is_none() {
                                let _ = write.write_all(b"+ \r\n").await;
                                let _ = lines.next_line().await;
                            }
                            format!("{tag} OK authenticated\r\n")
                        }
                        "EXAMINE" | "SELECT" => format!(
                            "* 0 EXISTS\r\n* 0 RECENT\r\n* FLAGS ()\r\n{tag} OK [READ-ONLY] done\r\n"
                        ),
                        "LOGOUT" => format!("* BYE bye\r\n{tag} OK done\r\n"),
                        "CAPABILITY" => format!(
                            "* CAPABILITY IMAP4rev1 AUTH=XOAUTH2 SASL-IR\r\n{tag} OK done\r\n"
                        ),
                        _ => format!("{tag} OK done\r\n"),
                    };
                    if write.write_all(answer.as_bytes()).await.is_err() || command == "LOGOUT" {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Google (no write-ahead mark: it never rotates), two integrations of one client, their grants as
/// a sign-in stores them: each first refresh creates the token Secret, applies the status once
/// and publishes one event (3 writes, no grant write). The mailbox check the new token makes due
/// answers within the join wait (`--mailbox-check-wait`), so its result (MailboxConnected) goes
/// out in the refresh's status apply, not in a status write of its own (2 status writes each on
/// main before). The client Secret's data is read once for both (its watch is metadata-only, see
/// `src/reconcile/marked.rs`): 3 requests per first refresh plus one read per client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_google_first_refresh_writes_no_grant() {
    use crate::support::{
        fault_proxy::FaultProxy,
        provider_standin::{Flavour, ProviderStandIn},
        world::condition,
    };
    const N: usize = 2;
    let env = Env::new("google-first", long_lived_server()).await;
    let standin = ProviderStandIn::start(Flavour::Google);
    let proxy = FaultProxy::start(&standin.url());
    let imap = accepting_imap().await;
    env.put_secret(
        "client",
        &[
            ("client_id", "provider-test-client"),
            ("client_secret", "provider-test-client-secret"),
        ],
    )
    .await;
    let op = env.operator_with("operator", &["--allow-endpoint-overrides"]);
    for i in 0..N {
        let rt = standin.issue_refresh_token();
        env.put_secret(
            &format!("inbox-{i}-oauth-grant"),
            &[
                ("refresh_token", &rt),
                ("token_endpoint", &proxy.token_url()),
                ("client_id", "provider-test-client"),
            ],
        )
        .await;
    }
    let before = op.api_requests();
    for i in 0..N {
        let spec = serde_json::json!({
            "provider": "Google",
            "mailbox": {
                "address": "alice@example.test",
                "server": {"host": "127.0.0.1", "port": imap, "tls": "None"},
            },
            "oauth": {
                "clientSecretRef": {"name": "client"},
                "redirectURL": "http://127.0.0.1:8080/oauth2/callback",
                "endpoints": {
                    "authorization": format!("{}/auth", proxy.url()),
                    "token": proxy.token_url(),
                },
            },
            "tokenSecret": {"name": format!("inbox-{i}-token")},
            "refreshBefore": "1m",
        });
        env.integrations()
            .create(
                &Default::default(),
                &crate::support::world::mail_integration(&format!("inbox-{i}"), spec),
            )
            .await
            .unwrap();
    }
    for i in 0..N {
        env.wait_for(
            &format!("inbox-{i}"),
            "Ready=True, MailboxConnected=True",
            Duration::from_secs(30),
            &op,
            |mi| is_ready(mi) && condition(mi, "MailboxConnected").is_some_and(|c| c.0 == "True"),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let requests = api_audit::since(&before, &op.api_requests());
    let listing = api_audit::describe(&requests);
    let counts = by_verb_and_kind(&requests, &env.ns);
    eprintln!("google first refreshes: {counts:?}");
    assert_eq!(
        counts,
        self::counts(&[
            ("create secrets", N),
            // The refresh's, with the mailbox check's result in it.
            ("patch mailintegrations/status", N),
            ("create events", N),
            // The client Secret's data, once for both.
            ("get secrets", 1),
        ]),
        "{listing}"
    );
}

/// The write-ahead mark on `inbox-{i}`'s grant Secret and the mark its token Secret records as
/// resolved.
async fn mark_and_record(env: &Env, i: usize) -> (Option<String>, Option<String>) {
    let annotation = |s: Secret, key: &str| s.metadata.annotations.and_then(|mut a| a.remove(key));
    let grant = env
        .secrets()
        .get(&format!("inbox-{i}-oauth-grant"))
        .await
        .unwrap();
    let token = env
        .secrets()
        .get(&format!("inbox-{i}-token"))
        .await
        .unwrap();
    (
        annotation(grant, IN_FLIGHT),
        annotation(token, REFRESHED_UNDER),
    )
}
