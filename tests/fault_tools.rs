//! The fault tools of the tests, proven against the real servers: the [`ApiProxy`] in front of the
//! real kube-apiserver, the refresh-token bookkeeping and held answers of the [`FaultProxy`] in front
//! of the real oidc-provider, and the stop/start of a dedicated control plane's kube-apiserver.

mod support;

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use std::time::{Duration, Instant};
use support::{
    api_proxy::{ApiProxy, Match},
    control_plane::{ControlPlane, control_plane},
    fault_proxy::{FaultProxy, digest},
    oauth, unique_namespace,
    world::Env,
};

fn config_map(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "data": {"value": value},
    }))
    .unwrap()
}

fn secret(name: &str, value: &str) -> Secret {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "stringData": {"refresh_token": value},
    }))
    .unwrap()
}

async fn secret_value(api: &Api<Secret>, name: &str) -> String {
    let s = api.get(name).await.expect("get the Secret directly");
    String::from_utf8(s.data.unwrap()["refresh_token"].0.clone()).unwrap()
}

/// The next watch event carrying an object named `name`, within `timeout`.
async fn next_event_for<S>(stream: &mut S, name: &str, timeout: Duration) -> WatchEvent<ConfigMap>
where
    S: futures::Stream<Item = kube::Result<WatchEvent<ConfigMap>>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let ev = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("no watch event for {name} within {timeout:?}"))
            .unwrap_or_else(|| panic!("the watch ended before an event for {name}"))
            .unwrap_or_else(|e| panic!("the watch failed before an event for {name}: {e}"));
        let obj_name = match &ev {
            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => {
                o.metadata.name.clone()
            }
            _ => None,
        };
        if obj_name.as_deref() == Some(name) {
            return ev;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_proxy_lists_watches_and_passes_headers_and_bodies() {
    let ns = unique_namespace("proxy-basic");
    let proxy = ApiProxy::start();
    // A client from the kubeconfig the proxy writes (what the operator process would read).
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    proxy.kubeconfig(&kubeconfig);
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    assert!(
        config
            .cluster_url
            .to_string()
            .starts_with("http://127.0.0.1:")
    );
    let client = kube::Client::try_from(config).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let direct: Api<ConfigMap> = Api::namespaced(control_plane().client().await, &ns);

    direct
        .create(&PostParams::default(), &config_map("before", "1"))
        .await
        .unwrap();
    let list = cms.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1, "the list through the proxy");
    let rv = list.metadata.resource_version.unwrap();

    let mut watch = cms
        .watch(&WatchParams::default().timeout(60), &rv)
        .await
        .unwrap()
        .boxed();
    direct
        .create(&PostParams::default(), &config_map("during", "2"))
        .await
        .unwrap();
    let ev = next_event_for(&mut watch, "during", Duration::from_secs(10)).await;
    assert!(matches!(ev, WatchEvent::Added(_)), "{ev:?}");

    // A merge patch (Content-Type application/merge-patch+json) through the proxy, streamed to the watch.
    let patch = serde_json::json!({"data": {"value": "3"}});
    cms.patch("during", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let ev = next_event_for(&mut watch, "during", Duration::from_secs(10)).await;
    match ev {
        WatchEvent::Modified(cm) => {
            assert_eq!(cm.data.unwrap()["value"], "3");
        }
        other => panic!("expected Modified, got {other:?}"),
    }
    // Server-side apply: another Content-Type and a query.
    let apply = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "applied"}, "data": {"value": "4"},
    });
    cms.patch(
        "applied",
        &PatchParams::apply("fault-tools"),
        &Patch::Apply(&apply),
    )
    .await
    .unwrap();
    assert_eq!(
        direct.get("applied").await.unwrap().data.unwrap()["value"],
        "4"
    );

    // Accept: protobuf comes back as protobuf (the header reaches the apiserver, the bytes come back).
    let req = http::Request::get(format!("/api/v1/namespaces/{ns}/configmaps/before"))
        .header(http::header::ACCEPT, "application/vnd.kubernetes.protobuf")
        .body(Vec::new())
        .unwrap();
    let resp = client.send(req.map(Into::into)).await.unwrap();
    assert_eq!(
        resp.headers()[http::header::CONTENT_TYPE],
        "application/vnd.kubernetes.protobuf"
    );
    let body = axum::body::to_bytes(axum::body::Body::new(resp.into_body()), 1 << 20)
        .await
        .unwrap();
    assert!(
        body.starts_with(b"k8s\0"),
        "a protobuf answer starts with the k8s magic"
    );

    let path = format!("/api/v1/namespaces/{ns}/configmaps");
    // list, watch, and the protobuf GET of configmaps/before (the path contains `path`).
    assert_eq!(
        proxy.count("GET", &path),
        3,
        "{}",
        proxy.requests_log_text()
    );
    assert_eq!(proxy.count("PATCH", &path), 2);
    assert_eq!(proxy.count("*", &path), 5);
    let log = proxy.requests_log();
    assert_eq!(log[0], ("GET".to_owned(), path.clone()));
    assert!(
        proxy.requests_log_with_query()[1].1.contains("watch=true"),
        "{}",
        proxy.requests_log_text()
    );
    assert_eq!(proxy.upstream_errors(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_put_lands_when_released_and_not_when_dropped() {
    let ns = unique_namespace("proxy-hold");
    let proxy = ApiProxy::start();
    let via_proxy: Api<Secret> = Api::namespaced(proxy.client().await, &ns);
    let direct: Api<Secret> = Api::namespaced(control_plane().client().await, &ns);
    direct
        .create(&PostParams::default(), &secret("x-oauth-grant", "old"))
        .await
        .unwrap();

    let replace = |value: &'static str| {
        let api = via_proxy.clone();
        let direct = direct.clone();
        tokio::spawn(async move {
            let mut s = direct.get("x-oauth-grant").await.unwrap();
            s.data = None;
            s.string_data = Some([("refresh_token".to_owned(), value.to_owned())].into());
            api.replace("x-oauth-grant", &PostParams::default(), &s)
                .await
        })
    };

    // Held, then released: the write lands.
    let hold = proxy.hold(Match::suffix("PUT", "/secrets/x-oauth-grant"));
    let task = replace("released");
    hold.wait_held(1, Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!task.is_finished(), "a held request gets no answer");
    assert_eq!(secret_value(&direct, "x-oauth-grant").await, "old");
    // Other requests pass meanwhile.
    via_proxy.get("x-oauth-grant").await.unwrap();
    hold.release();
    let written = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the released request is answered")
        .unwrap()
        .expect("the released PUT succeeds");
    assert_eq!(
        String::from_utf8(written.data.unwrap()["refresh_token"].0.clone()).unwrap(),
        "released"
    );
    assert_eq!(secret_value(&direct, "x-oauth-grant").await, "released");
    assert_eq!((hold.held_count(), hold.hits()), (0, 1));

    // Held, then dropped: the client sees its connection closed without an answer, nothing lands.
    let hold = proxy.hold(Match::suffix("PUT", "/secrets/x-oauth-grant"));
    let task = replace("dropped");
    hold.wait_held(1, Duration::from_secs(10));
    hold.drop_held();
    let result = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the dropped request ends")
        .unwrap();
    match result {
        Err(kube::Error::Api(s)) => panic!("a dropped request has no answer, got {s:?}"),
        Err(_) => {}
        Ok(_) => panic!("a dropped PUT must not succeed"),
    }
    assert_eq!(hold.held_count(), 0);
    assert_eq!(secret_value(&direct, "x-oauth-grant").await, "released");

    // The rule stays after drop_held: the next PUT is held again; clear() forwards it.
    let task = replace("cleared");
    hold.wait_held(1, Duration::from_secs(10));
    proxy.clear();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("answered after clear")
        .unwrap()
        .expect("the PUT forwarded by clear succeeds");
    assert_eq!(secret_value(&direct, "x-oauth-grant").await, "cleared");
    assert_eq!(proxy.count("PUT", "/secrets/x-oauth-grant"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_answers_a_kubernetes_status() {
    let ns = unique_namespace("proxy-fail");
    let proxy = ApiProxy::start();
    let via_proxy: Api<Secret> = Api::namespaced(proxy.client().await, &ns);
    via_proxy
        .create(&PostParams::default(), &secret("y", "v1"))
        .await
        .unwrap();

    let rule = proxy.fail(Match::suffix("PUT", "/secrets/y"), 409, Some(1));
    let mut s = via_proxy.get("y").await.unwrap();
    s.data = None;
    s.string_data = Some([("refresh_token".to_owned(), "v2".to_owned())].into());
    match via_proxy.replace("y", &PostParams::default(), &s).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 409);
            assert_eq!(status.reason, "Conflict");
            assert!(
                status.message.contains("the object has been modified"),
                "{status:?}"
            );
        }
        other => panic!("expected a 409 Api error, got {other:?}"),
    }
    assert_eq!(rule.hits(), 1);
    // times = 1: the next one is forwarded.
    via_proxy
        .replace("y", &PostParams::default(), &s)
        .await
        .expect("the second PUT is forwarded");

    // kube-rs retries 429, 503 and 504 by itself (Config::default_retry: up to 15 times, backoff
    // from 5 ms doubling): two 503s in a row stay invisible to the caller.
    let rule = proxy.fail(Match::suffix("GET", "/secrets/y"), 503, Some(2));
    via_proxy
        .get("y")
        .await
        .expect("kube-rs retried past two 503s");
    assert_eq!(rule.hits(), 2);

    // Without that retry, every code comes back as it was answered.
    let mut config = kube::Config::new(proxy.url().parse().unwrap());
    config.auth_info.token = Some(support::control_plane::ADMIN_TOKEN.to_owned().into());
    config.default_retry = false;
    let no_retry: Api<Secret> = Api::namespaced(kube::Client::try_from(config).unwrap(), &ns);
    for (code, reason) in [
        (500, "InternalError"),
        (503, "ServiceUnavailable"),
        (403, "Forbidden"),
        (422, "Invalid"),
        (429, "TooManyRequests"),
    ] {
        let rule = proxy.fail_with_message(
            Match::contains("GET", "/secrets/y"),
            code,
            None,
            Some("made up"),
        );
        for _ in 0..2 {
            match no_retry.get("y").await {
                Err(kube::Error::Api(status)) => {
                    assert_eq!(
                        (status.code, status.reason.as_str(), status.message.as_str()),
                        (code, reason, "made up")
                    );
                }
                other => panic!("expected a {code} Api error, got {other:?}"),
            }
        }
        assert_eq!(rule.hits(), 2, "times = None: every match");
        rule.remove();
    }
    via_proxy.get("y").await.expect("forwarded after remove()");

    // First match wins; clear() removes every rule.
    proxy.fail(Match::any(), 500, None);
    proxy.fail(Match::suffix("GET", "/secrets/y"), 404, None);
    match via_proxy.get("y").await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 500),
        other => panic!("expected 500, got {other:?}"),
    }
    proxy.clear();
    via_proxy.get("y").await.expect("forwarded after clear()");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_cuts_a_running_watch_and_heal_lets_a_new_one_work() {
    let ns = unique_namespace("proxy-partition");
    let proxy = ApiProxy::start();
    let cms: Api<ConfigMap> = Api::namespaced(proxy.client().await, &ns);
    let direct: Api<ConfigMap> = Api::namespaced(control_plane().client().await, &ns);

    let rv = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut watch = cms
        .watch(&WatchParams::default().timeout(120), &rv)
        .await
        .unwrap()
        .boxed();
    direct
        .create(&PostParams::default(), &config_map("a", "1"))
        .await
        .unwrap();
    next_event_for(&mut watch, "a", Duration::from_secs(10)).await;

    proxy.partition();
    assert!(proxy.is_partitioned());
    let cut = tokio::time::timeout(Duration::from_secs(5), watch.try_next())
        .await
        .expect("the partition cuts the running watch within 5 s");
    match cut {
        Ok(None) | Err(_) => {}
        Ok(Some(ev)) => panic!("an event after the partition: {ev:?}"),
    }
    let refused = tokio::time::timeout(Duration::from_secs(5), cms.list(&ListParams::default()))
        .await
        .expect("a request during the partition fails at once");
    assert!(
        matches!(refused, Err(ref e) if !matches!(e, kube::Error::Api(_))),
        "a request during the partition has no answer: {refused:?}"
    );

    proxy.heal();
    let list = cms.list(&ListParams::default()).await.unwrap();
    let mut watch = cms
        .watch(
            &WatchParams::default().timeout(60),
            &list.metadata.resource_version.unwrap(),
        )
        .await
        .unwrap()
        .boxed();
    direct
        .create(&PostParams::default(), &config_map("b", "2"))
        .await
        .unwrap();
    next_event_for(&mut watch, "b", Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_token_presentations_are_counted_and_reuse_is_seen() {
    let server = oauth::shared();
    let proxy = FaultProxy::start(&server.base_url);
    let grant = server.obtain_grant("alice").await;
    let rt1 = grant.refresh_token().to_owned();
    assert_eq!(
        proxy.refresh_requests(),
        0,
        "the sign-in went around the proxy"
    );

    let second = server
        .refresh_at(&proxy.token_url(), &rt1)
        .await
        .into_grant();
    let rt2 = second.refresh_token().to_owned();
    assert_ne!(rt1, rt2, "the shared server rotates refresh tokens");
    assert_eq!(proxy.refresh_requests(), 1);
    assert_eq!(proxy.presentations(), [(digest(&rt1), 1)].into());
    assert!(proxy.reused_refresh_tokens().is_empty());

    // rt2 presented twice: the second time is a reuse (and oidc-provider refuses it).
    let third = server
        .refresh_at(&proxy.token_url(), &rt2)
        .await
        .into_grant();
    let again = server.refresh_at(&proxy.token_url(), &rt2).await;
    assert_eq!(again.status, 400, "{again:?}");
    assert_eq!(again.error(), Some("invalid_grant"));
    assert_ne!(third.refresh_token(), rt2);
    assert_eq!(proxy.refresh_requests(), 3);
    assert_eq!(proxy.reused_refresh_tokens(), vec![digest(&rt2)]);
    assert_eq!(proxy.reused_at_upstream(), vec![digest(&rt2)]);
    assert_eq!(proxy.presentations()[&digest(&rt2)], 2);
    let statuses: Vec<Option<u16>> = proxy
        .presentation_log()
        .iter()
        .map(|p| p.upstream_status)
        .collect();
    assert_eq!(statuses, [Some(200), Some(200), Some(400)]);
    assert!(digest(&rt1).len() == 64 && !digest(&rt1).contains(&rt1));

    // A faulted request is a presentation too, but did not reach the provider.
    proxy.set_fault_times(support::fault_proxy::Fault::InternalServerError, 1);
    let faulted = server.refresh_at(&proxy.token_url(), "not-a-token").await;
    assert_eq!(faulted.status, 500);
    let last = proxy.presentation_log().pop().unwrap();
    assert_eq!(
        (last.digest, last.forwarded, last.upstream_status),
        (digest("not-a-token"), false, None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_token_answers_come_after_the_provider_rotated() {
    let server = oauth::shared();
    let proxy = FaultProxy::start(&server.base_url);
    let rt1 = server.obtain_grant("bob").await.refresh_token().to_owned();

    // Held, then released: the provider answered at once, the client gets it on release.
    proxy.hold_token_responses(1);
    let url = proxy.token_url();
    let rt = rt1.clone();
    let task = tokio::spawn(async move { server.refresh_at(&url, &rt).await });
    proxy.wait_held_token_responses(1, Duration::from_secs(10));
    assert!(
        !server.introspect(&rt1).await,
        "the provider has consumed (rotated) the refresh token while the answer is held"
    );
    assert!(!task.is_finished());
    proxy.release_token_responses();
    let grant = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("answered after release")
        .unwrap()
        .into_grant();
    let rt2 = grant.refresh_token().to_owned();
    assert!(server.introspect(&rt2).await);
    assert_eq!(proxy.held_token_responses(), 0);

    // Held, then dropped: the provider rotated, the client never hears of rt3.
    proxy.hold_token_responses(1);
    let url = proxy.token_url();
    let rt = rt2.clone();
    let task = tokio::spawn(async move {
        oauth::post_form_with_timeout(
            &url,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &rt),
                ("client_id", server.client_id()),
                ("client_secret", server.client_secret()),
            ],
            Duration::from_secs(20),
        )
        .await
    });
    proxy.wait_held_token_responses(1, Duration::from_secs(10));
    proxy.drop_token_responses();
    let result = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the dropped answer ends the request")
        .unwrap();
    assert!(
        result.is_err(),
        "the connection is closed without an answer: {result:?}"
    );
    assert_eq!(proxy.held_token_responses(), 0);
    assert!(
        !server.introspect(&rt2).await,
        "rt2 was consumed by the dropped refresh"
    );
    let log = proxy.presentation_log();
    assert_eq!(log.len(), 2);
    assert!(
        log.iter()
            .all(|p| p.forwarded && p.upstream_status == Some(200))
    );

    // The budget was used: the next refresh is answered at once (rt2 is dead: invalid_grant).
    let late = server.refresh_at(&proxy.token_url(), &rt2).await;
    assert_eq!(late.error(), Some("invalid_grant"), "{late:?}");
    assert_eq!(proxy.reused_at_upstream(), vec![digest(&rt2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedicated_apiserver_stops_and_restarts_with_its_data() {
    let cp = ControlPlane::start_dedicated();
    assert_ne!(cp.server, control_plane().server);
    let ns = cp.unique_namespace("restart");
    let proxy = ApiProxy::start_for(&cp);
    let via_proxy: Api<ConfigMap> = Api::namespaced(proxy.client().await, &ns);
    let direct: Api<ConfigMap> = Api::namespaced(cp.client().await, &ns);
    direct
        .create(&PostParams::default(), &config_map("kept", "1"))
        .await
        .unwrap();

    let stopped = Instant::now();
    cp.stop_apiserver();
    let stop_time = stopped.elapsed();
    let out = cp.kubectl_output(&["get", "configmap", "kept", "-n", &ns]);
    assert!(!out.status.success(), "kubectl works without an apiserver?");
    match direct.get("kept").await {
        Err(kube::Error::Api(s)) => panic!("an answer from a stopped apiserver: {s:?}"),
        Err(_) => {}
        Ok(_) => panic!("a GET succeeded with the apiserver stopped"),
    }
    assert!(
        via_proxy.get("kept").await.is_err(),
        "through the proxy too"
    );
    assert!(proxy.upstream_errors() >= 1);

    let started = Instant::now();
    cp.start_apiserver();
    let start_time = started.elapsed();
    eprintln!("kube-apiserver stopped in {stop_time:?}, ready again in {start_time:?}");
    let kept = direct
        .get("kept")
        .await
        .expect("the object outlived the restart");
    assert_eq!(kept.data.unwrap()["value"], "1");
    via_proxy
        .get("kept")
        .await
        .expect("the proxy forwards to the restarted apiserver");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_process_runs_through_both_proxies() {
    let env = Env::new("through-proxies", oauth::shared()).await;
    let api = ApiProxy::start();
    let kubeconfig = env.log_dir.path().join("proxy-kubeconfig");
    api.kubeconfig(&kubeconfig);
    let op = env.operator_with_kubeconfig("operator", &kubeconfig, &[]);
    let rt = env.ready_integration(&op, "inbox").await;

    let ns = &env.ns;
    let log = api.requests_log_text();
    assert!(
        log.contains(&format!("/namespaces/{ns}/mailintegrations?")) && log.contains("watch=true"),
        "the operator watches through the ApiProxy:\n{log}"
    );
    // The token Secret is created without a read: a POST to the namespace's Secrets (the name is
    // in the body; the only Secret the operator creates here), or a write to its own path.
    let token_writes = api
        .counts()
        .iter()
        .filter(|((m, p), _)| {
            (m == "POST" && *p == format!("/api/v1/namespaces/{ns}/secrets"))
                || (m != "GET" && p.ends_with(&format!("/namespaces/{ns}/secrets/inbox-token")))
        })
        .map(|(_, n)| n)
        .sum::<u64>();
    assert!(
        token_writes >= 1 && env.token_secret("inbox").await.is_some(),
        "the token Secret was written through the ApiProxy:\n{log}"
    );
    assert!(
        api.count(
            "*",
            &format!("/namespaces/{ns}/mailintegrations/inbox/status")
        ) >= 1,
        "the status was written through the ApiProxy:\n{log}"
    );
    assert_eq!(
        env.proxy.presentations().get(&digest(&rt)),
        Some(&1),
        "the operator presented the brought refresh token once"
    );
    assert!(env.proxy.reused_refresh_tokens().is_empty());
}
