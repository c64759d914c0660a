//! `spec.tokenSecret.template` as a tenant's weapon: a template that allocates without bound, a
//! label or annotation that asks a Secret-mirroring controller for a copy of the token, maps and
//! names larger than the operator can use. Against the real kube-apiserver and operator process.

use super::{WAIT, assert_refused, force_refresh, message, server, spec};
use kube::api::{Patch, PatchParams};
use std::time::{Duration, Instant};
use support::world::{Env, assert_no_secrets_in_logs_or_events, condition, is_ready, tail};

use crate::support;

/// The operator's peak RSS must stay under the chart's memory limit (128 Mi) whatever templates
/// its tenants write. On main, `'x' * 100000000` alone raised it to 232 MiB, and
/// `''|indent(1000000000000)` killed the process.
const RSS_BOUND_KIB: u64 = 128 * 1024;

/// `VmHWM` (peak resident set) of the operator process, in KiB.
fn peak_rss_kib(op: &support::operator::Operator) -> u64 {
    let pid = op.process.child_pid().expect("the operator runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    mail_integration_operator::reconcile::template::sandbox::status_kib(&status, "VmHWM:")
        .expect("VmHWM in /proc/<pid>/status")
}

/// How a refusal at the memory limit names it: "16 MiB of memory".
fn limit() -> String {
    let mib = mail_integration_operator::reconcile::template::sandbox::MEMORY_LIMIT >> 20;
    format!("{mib} MiB of memory")
}

fn doubling() -> String {
    (b'b'..=b'z').fold("{% set a = 'xxxx' %}".to_owned(), |s, c| {
        let (prev, this) = ((c - 1) as char, c as char);
        format!("{s}{{% set {this} = {prev} ~ {prev} %}}")
    }) + "{{ z|length }}"
}

fn invalid_template(mi: &mail_integration_operator::api::MailIntegration) -> bool {
    condition(mi, "Ready") == Some(("False", "TokenTemplateInvalid"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_allocates_without_bound_is_refused_and_the_others_go_on() {
    let env = Env::new("tplbomb", server()).await;
    let mut op = env.operator("operator");
    env.ready_integration(&op, "bystander").await;
    env.grant("edited", "alice").await;
    env.integration_with(
        "edited",
        "alice@example.test",
        serde_json::json!({"tokenSecret": {"name": "edited-token", "template": {"data": {"password": "{{ access_token }}"}}}}),
    )
    .await;
    env.wait_for("edited", "Ready", WAIT, &op, is_ready).await;
    let start_kib = peak_rss_kib(&op);

    // New integrations whose template is hostile (the check before their first refresh)...
    let bombs = [
        ("indent", "{{ ''|indent(1000000000000) }}".to_owned()),
        ("repeat", "{{ 'x' * 100000000 }}".to_owned()),
        ("doubling", doubling()),
    ];
    for (name, template) in &bombs {
        env.grant(name, "alice").await;
        env.integration_with(
            name,
            "alice@example.test",
            serde_json::json!({"tokenSecret": {"name": format!("{name}-token"), "template": {"data": {"fine": "{{ username }}", "bomb": template}}}}),
        )
        .await;
    }
    // ...and an edit of a Ready integration's template (rendered on its next idle reconcile).
    let patch = serde_json::json!({"spec": {"tokenSecret": {"template": {"data": {"password": "{{ ''|indent(1000000000000) }}"}}}}});
    env.integrations()
        .patch("edited", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();

    for (name, _) in &bombs {
        let mi = env
            .wait_for(name, "TokenTemplateInvalid", WAIT, &op, invalid_template)
            .await;
        let msg = message(&mi, "Ready");
        assert!(
            msg.contains("spec.tokenSecret.template.data[\"bomb\"]") && msg.contains(&limit()),
            "{name}: {msg}"
        );
        assert!(
            env.token_secret(name).await.is_none(),
            "{name}: nothing published"
        );
    }
    let mi = env
        .wait_for(
            "edited",
            "TokenTemplateInvalid",
            WAIT,
            &op,
            invalid_template,
        )
        .await;
    let msg = message(&mi, "Ready");
    assert!(
        msg.contains("data[\"password\"]") && msg.contains(&limit()),
        "{msg}"
    );

    // The operator process is the same one, and still refreshes the others.
    assert!(op.process.is_running(), "{}", tail(&op.log(), 30));
    let before = env.data("bystander-token", "access_token").await.unwrap();
    force_refresh(&env, "bystander").await;
    let deadline = Instant::now() + WAIT;
    while env.data("bystander-token", "access_token").await.unwrap() == before {
        assert!(
            Instant::now() < deadline,
            "bystander was not refreshed\n{}",
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let peak_kib = peak_rss_kib(&op);
    eprintln!(
        "operator VmHWM: {} KiB before the hostile templates, {peak_kib} KiB after",
        start_kib
    );
    assert!(
        peak_kib < RSS_BOUND_KIB,
        "the operator's peak RSS reached {peak_kib} KiB (bound {RSS_BOUND_KIB} KiB)"
    );
    assert!(op.process.is_running());
    let token = env.data("bystander-token", "access_token").await.unwrap();
    assert_no_secrets_in_logs_or_events(&env, &op, &[&token]).await;
}

/// Reconciles after the token was published render nothing; a change of the template renders once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_reconcile_renders_nothing() {
    let env = Env::new("tplidle", server()).await;
    let op = env.operator("operator");
    env.client_secret(env.server.client_secret()).await;
    env.grant("inbox", "alice").await;
    env.integration_with(
        "inbox",
        "alice@example.test",
        serde_json::json!({"tokenSecret": {"name": "inbox-token", "template": {"data": {"password": "{{ access_token }}"}}}}),
    )
    .await;
    env.wait_for("inbox", "Ready", WAIT, &op, is_ready).await;
    let renders = || {
        op.log()
            .matches("rendering spec.tokenSecret.template in a child process")
            .count()
    };
    let reconciles = || {
        op.metric("mailintegration_reconcile_duration_seconds_count")
            .unwrap_or(0.0)
    };
    // Let the reconciles that follow the first publication settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rendered, reconciled) = (renders(), reconciles());
    assert!(rendered >= 1, "the first publication rendered the template");
    // Each label edit of the token Secret is an event of its watch: an idle reconcile.
    for i in 0..3 {
        let patch = serde_json::json!({"metadata": {"labels": {"touched": i.to_string()}}});
        env.secrets()
            .patch(
                "inbox-token",
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = Instant::now() + WAIT;
    while reconciles() < reconciled + 3.0 {
        assert!(Instant::now() < deadline, "no idle reconciles happened");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(renders(), rendered, "idle reconciles rendered the template");
    assert!(is_ready(&env.get("inbox").await));

    // A changed template is rendered (once per change) and published without a refresh.
    let patch = serde_json::json!({"spec": {"tokenSecret": {"template": {"data": {"user": "{{ username }}"}}}}});
    env.integrations()
        .patch("inbox", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while env.data("inbox-token", "user").await.as_deref() != Some("alice@example.test") {
        assert!(
            Instant::now() < deadline,
            "the changed template was not published\n{}",
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = renders();
    // Once: what is compared with the Secret is what is written (main rendered it again to write).
    assert_eq!(
        after,
        rendered + 1,
        "the changed template was rendered once"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(renders(), after, "rendered again though nothing changed");
}

/// What the CRD refuses at `kubectl apply`: mirroring keys, more than 32 template entries, scopes
/// longer than 256 characters, names longer than a label value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crd_refuses_mirroring_keys_oversized_maps_and_long_names() {
    let env = Env::new("tplcrd", server()).await;
    let with = |extra: serde_json::Value| {
        let mut s = spec(&env, "client", "inbox-token");
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            match (s.get_mut(&k).and_then(|x| x.as_object_mut()), v.as_object()) {
                (Some(into), Some(from)) => into.extend(from.clone()),
                _ => s[&k] = v,
            }
        }
        s
    };
    for (name, field, key) in [
        (
            "reflector",
            "annotations",
            "reflector.v1.k8s.emberstack.com/reflection-allowed",
        ),
        (
            "reflector-auto",
            "annotations",
            "reflector.v1.k8s.emberstack.com/reflection-auto-enabled",
        ),
        (
            "replicator",
            "annotations",
            "replicator.v1.mittwald.de/replicate-to",
        ),
        ("kubed", "annotations", "kubed.appscode.com/sync"),
        (
            "replicator-label",
            "labels",
            "replicator.v1.mittwald.de/replicate-to",
        ),
    ] {
        let extra = serde_json::json!({"tokenSecret": {"name": "inbox-token", "template": {field: {key: "true"}}}});
        assert_refused(&env, name, with(extra), "Secret-mirroring controller").await;
    }
    let many: serde_json::Map<String, serde_json::Value> = (0..33)
        .map(|i| (format!("k{i}"), serde_json::json!("v")))
        .collect();
    for field in ["labels", "annotations", "data"] {
        let extra =
            serde_json::json!({"tokenSecret": {"name": "inbox-token", "template": {field: many}}});
        assert_refused(&env, &format!("many-{field}"), with(extra), "32").await;
    }
    let extra = serde_json::json!({"oauth": {"scopes": ["x".repeat(257)]}});
    assert_refused(&env, "long-scope", with(extra), "256").await;
    let long = "n".repeat(64);
    assert_refused(
        &env,
        &long,
        with(serde_json::json!({})),
        "at most 63 characters",
    )
    .await;
    // What stays allowed: 32 entries, a 63-character name, other controllers' annotations.
    let fine: serde_json::Map<String, serde_json::Value> = (0..32)
        .map(|i| (format!("k{i}"), serde_json::json!("v")))
        .collect();
    let mut ok = with(
        serde_json::json!({"tokenSecret": {"name": "inbox-token", "template": {"labels": fine, "annotations": {"argocd.argoproj.io/sync-wave": "1"}}}}),
    );
    ok["oauth"]["scopes"] = serde_json::json!(["x".repeat(256)]);
    let mi = support::world::mail_integration(&"n".repeat(63), ok);
    env.integrations()
        .create(&Default::default(), &mi)
        .await
        .expect("a spec at the limits is accepted");
}
