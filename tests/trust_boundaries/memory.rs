//! What the operator holds of the Secrets labelled for it (issue 21, point 4): anyone who may
//! write Secrets in a watched namespace can label any number of them, with no MailIntegration,
//! and the operator must neither run out of memory nor stop serving the other tenants.

use super::*;
use futures::StreamExt as _;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use mail_integration_operator::reconcile::cached_secret::MAX_HELD_BYTES;

/// Just under the API server's limit of one Secret (1 MiB).
const BIG: usize = 1000 * 1024;

/// Create Secrets `names` of [`BIG`] bytes with `labels` (a few at a time).
async fn big_secrets(env: &Env, names: Vec<String>, labels: serde_json::Value) {
    let api = env.secrets();
    futures::stream::iter(names)
        .map(|name| {
            let api = api.clone();
            let labels = labels.clone();
            async move {
                let mut s: Secret = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "labels": labels},
                }))
                .unwrap();
                s.data = Some(
                    [
                        ("client_id".to_owned(), ByteString(b"big-client".to_vec())),
                        (
                            "client_secret".to_owned(),
                            ByteString(b"big-client-secret-value".to_vec()),
                        ),
                        ("refresh_token".to_owned(), ByteString(b"rt".to_vec())),
                        ("filler".to_owned(), ByteString(vec![b'x'; BIG])),
                    ]
                    .into_iter()
                    .collect(),
                );
                api.create(&PostParams::default(), &s).await.unwrap();
            }
        })
        .buffer_unordered(4)
        .collect::<Vec<()>>()
        .await;
}

/// The peak and current resident memory of process `pid`, in MiB (VmHWM, VmRSS).
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
    };
    (kib("VmHWM:") / 1024.0, kib("VmRSS:") / 1024.0)
}

/// The most the operator (a debug build) may reach with the Secrets below: its own memory, a few
/// Secrets in flight at a time, and their markers. Holding the 150 MiB of them is far above it.
const PEAK_BOUND_MIB: f64 = 96.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_secrets_of_a_mebibyte_are_not_held_and_the_others_are_served() {
    let env = Env::new("memory", server()).await;
    // Before the operator starts: 130 marked Secrets of 1 MiB that no integration names, 20 of
    // 1 MiB labelled as integrations' grants (of integrations that do not exist), and one that is
    // the grant Secret of an integration below.
    let started = std::time::Instant::now();
    let names = |prefix: &str, n: usize| (0..n).map(|i| format!("{prefix}-{i}")).collect();
    big_secrets(
        &env,
        names("big-client", 130),
        serde_json::json!({"mailintegration.dev/oauth-client": "true"}),
    )
    .await;
    big_secrets(
        &env,
        names("big-grant", 20),
        serde_json::json!({"mailintegration.dev/integration": "ghost"}),
    )
    .await;
    big_secrets(
        &env,
        vec!["bloated-oauth-grant".into()],
        serde_json::json!({"mailintegration.dev/integration": "bloated"}),
    )
    .await;
    eprintln!("151 Secrets of 1 MiB created in {:?}", started.elapsed());

    let op = env.operator("operator");
    // Another tenant is served.
    env.ready_integration(&op, "tenant").await;
    // By then the Secret watches have listed everything (reconciles wait for them).
    let pid = op.process.child_pid().expect("the operator runs");
    let (peak, now) = memory_mib(pid);
    eprintln!(
        "operator with 151 labelled Secrets of 1 MiB: VmHWM {peak:.1} MiB, VmRSS {now:.1} MiB"
    );
    assert!(
        peak < PEAK_BOUND_MIB,
        "the operator's peak RSS was {peak:.1} MiB (bound {PEAK_BOUND_MIB} MiB): it holds the labelled Secrets' data"
    );
    // An integration naming a marked Secret over the bound is told so, by name and limit.
    env.integration_with(
        "heavy",
        "alice@example.test",
        serde_json::json!({"oauth": {"clientSecretRef": {"name": "big-client-7"}}}),
    )
    .await;
    let mi = env
        .wait_for("heavy", "ClientSecretTooLarge", WAIT, &op, |mi| {
            condition(mi, "Ready") == Some(("False", "ClientSecretTooLarge"))
        })
        .await;
    let text = message(&mi, "Ready");
    assert!(
        text.contains("big-client-7") && text.contains(&MAX_HELD_BYTES.to_string()),
        "{text}"
    );
    // An integration whose grant Secret is over the bound: neither used nor written.
    env.integration("bloated", "alice@example.test").await;
    let mi = env
        .wait_for("bloated", "SecretTooLarge", WAIT, &op, |mi| {
            condition(mi, "Ready") == Some(("False", "SecretTooLarge"))
        })
        .await;
    assert!(
        message(&mi, "Ready").contains("bloated-oauth-grant"),
        "{}",
        message(&mi, "Ready")
    );
    assert!(env.token_secret("bloated").await.is_none());

    // The tenant is still served after all this.
    assert!(is_ready(&env.get("tenant").await));
    assert_no_secrets_in_logs_or_events(&env, &op, &["big-client-secret-value"]).await;
}
