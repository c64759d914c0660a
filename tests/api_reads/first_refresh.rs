//! What a first refresh costs at the API server, counted in its audit log: an OIDC integration
//! with a grant and no token Secret yet writes the write-ahead mark and the grant store (2
//! updates of the grant Secret), creates its token Secret without reading it first, applies its
//! status once and publishes one event for its transitions (Ready and Authorized together).

use crate::{
    long_lived_server,
    support::{
        api_audit::{self, ApiRequest},
        world::{Env, is_ready},
    },
};
use std::{collections::BTreeMap, time::Duration};

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
        // The write-ahead mark and the grant store that clears it (OIDC).
        ("update secrets", 2),
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
