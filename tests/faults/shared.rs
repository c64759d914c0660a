//! What the fault test binaries (`faults`, `faults_leader`) share: the protocol scale of their
//! operators, the counting at the token endpoint, and the steps of their scenarios. Each binary
//! declares it with `mod shared; use shared::*;`, so its tests and their modules see these as their
//! own.
#![allow(dead_code)]

use super::support;
#[allow(unused_imports)]
pub use k8s_openapi::api::core::v1::Secret;
#[allow(unused_imports)]
pub use kube::api::{Patch, PatchParams, PostParams};
#[allow(unused_imports)]
pub use mail_integration_operator::api::MailIntegration;
#[allow(unused_imports)]
pub use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};
#[allow(unused_imports)]
pub use support::{
    fault_proxy::Fault,
    oauth::OAuthServer,
    operator::Operator,
    world::{Env, condition, condition_message, is_ready, tail},
};

/// Access tokens that live 10 minutes: refreshes happen when a test asks for one.
pub fn long_lived_server() -> &'static OAuthServer {
    support::oauth::with_token_ttl(600)
}

/// Access tokens that live 8 s: a refresh every few seconds.
pub fn short_lived_server() -> &'static OAuthServer {
    support::oauth::with_token_ttl(8)
}

pub const IN_FLIGHT: &str = "mailintegration.dev/refresh-in-flight";

/// The test-only protocol scale every operator of this binary runs with
/// (`MIO_TEST_PROTOCOL_SCALE`, docs/operations.md "Settings for tests only"): the refresh
/// protocol's windows are divided by it (the write-ahead mark's window 75 s -> 38 s, the holder
/// grace 20 s -> 10 s, the mark-write budget 10 s -> 5 s, the provider timeout 30 s -> 15 s, the
/// store deadline 20 s -> 10 s). The outages, delays, Lease durations and drain limits of the tests
/// are divided alike ([`scaled`]), so each keeps its place among the windows: a fault shorter than
/// a window stays shorter, a longer one stays longer.
pub const SCALE: u32 = 2;

/// `d` at the protocol scale of this binary.
pub fn scaled(d: Duration) -> Duration {
    d / SCALE
}

/// The write-ahead mark's in-flight window at [`SCALE`]: 74 s divided, plus the mark's 1 s resolution.
pub fn in_flight_window() -> Duration {
    scaled(Duration::from_secs(74)) + Duration::from_secs(1)
}

/// [`Env::new`] whose operators run at the protocol scale [`SCALE`].
pub async fn faults_env(prefix: &str, server: &'static OAuthServer) -> Env {
    scale(Env::new(prefix, server).await)
}

pub fn scale(mut env: Env) -> Env {
    env.operator_env
        .push(("MIO_TEST_PROTOCOL_SCALE", SCALE.to_string()));
    env
}

pub async fn force_refresh(env: &Env, name: &str) {
    let value = format!("{:?}", std::time::SystemTime::now());
    support::world::annotate_refresh(env, name, &value).await;
}

/// No refresh token was presented twice at the token endpoint; returns how many refreshes the
/// provider saw.
pub fn assert_no_reuse(env: &Env, what: &str) -> u64 {
    let reused = env.proxy.reused_refresh_tokens();
    assert!(
        reused.is_empty(),
        "{what}: refresh tokens presented more than once (digests): {reused:?}"
    );
    env.proxy.refresh_requests()
}

pub async fn grant_secret(env: &Env, name: &str) -> Secret {
    env.secrets()
        .get(&format!("{name}-oauth-grant"))
        .await
        .unwrap()
}

pub fn mark(s: &Secret) -> Option<String> {
    s.metadata.annotations.as_ref()?.get(IN_FLIGHT).cloned()
}

/// Wait until the token endpoint has received `n` refresh requests in all.
pub async fn wait_refresh_requests(env: &Env, n: u64, timeout: Duration, op: &Operator) {
    let deadline = Instant::now() + timeout;
    while env.proxy.refresh_requests() < n {
        assert!(
            Instant::now() < deadline,
            "only {} refresh requests within {timeout:?}, expected {n}:\n{}",
            env.proxy.refresh_requests(),
            tail(&op.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until the supervised operator process has ended.
pub fn wait_exit(op: &mut Operator, timeout: Duration) -> Duration {
    let started = Instant::now();
    while op.process.is_running() {
        // A deadline, not a timing claim: callers pass more than the exit they wait for may take
        // (the drain limit after SIGTERM or a lost lease, or nothing after SIGKILL) with seconds to spare.
        assert!(
            started.elapsed() < timeout,
            "the operator did not exit within {timeout:?}:\n{}",
            tail(&op.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

pub fn signal(op: &Operator, sig: &str) {
    let pid = op.process.child_pid().expect("the operator runs");
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}
/// Nothing in progress or failing: Reconciling=False.
pub fn settled(mi: &MailIntegration) -> bool {
    condition(mi, "Reconciling").is_some_and(|c| c.0 == "False")
}
/// Access tokens that live 20 s: refreshes every dozen seconds, with quiet time between them.
pub fn twenty_second_server() -> &'static OAuthServer {
    support::oauth::with_token_ttl(20)
}

/// Hold the provider's answer to the next token request back from the operator (the provider
/// has answered: the refresh token is rotated), run `trigger` (what makes the operator refresh, if
/// anything) and, once an answer is held, `then` (an API fault); then let the answer through.
pub fn after_the_provider_answers(env: &Env, trigger: impl FnOnce(), then: impl FnOnce()) {
    env.proxy.hold_token_responses(1);
    trigger();
    env.proxy
        .wait_held_token_responses(1, Duration::from_secs(30));
    then();
    env.proxy.release_token_responses();
}

/// Ask for one refresh now, from blocking code.
pub fn force_refresh_blocking(env: &Env, name: &str) {
    let value = format!("{:?}", std::time::SystemTime::now());
    let patch = serde_json::json!({"metadata": {"annotations": {"mailintegration.dev/refresh-requested-at": value}}});
    env.cp.kubectl(&[
        "patch",
        "mailintegration",
        name,
        "-n",
        &env.ns,
        "--type=merge",
        "-p",
        &patch.to_string(),
    ]);
}

/// The chart's flags that the test binaries scale: the Lease duration (15 s) and the drain limit
/// (`shutdownTimeout`, 70 s), replaced by these values.
const SCALED_CHART_FLAGS: [&str; 2] = ["--leader-election-lease-seconds", "--shutdown-timeout"];

/// The operator as the chart deploys it with two replicas (leader election on): a release of the
/// chart in a namespace of its own watching the world's namespace, each replica a process with the
/// Deployment's own args (the Lease in the release's namespace, as the chart names it), its
/// downward-API env (a POD_NAME of its own) and the chart's ServiceAccount: every API call of a
/// replica is checked against the chart's RBAC. The Lease duration and the drain limit are the
/// chart's at the binary's [`SCALE`] (15 s -> 8 s, 70 s -> 35 s) unless a test says otherwise.
pub struct ChartReplicas {
    pub release: support::helm::ChartRelease<'static>,
    /// Through the test's API proxy, or straight to the API server.
    kubeconfig: std::path::PathBuf,
    /// Straight to the API server.
    direct: std::path::PathBuf,
    args: Vec<String>,
}

impl ChartReplicas {
    /// Install the chart (`replicaCount=2`); the replicas talk to the API server through `api`
    /// when given (with the ServiceAccount's token), else straight.
    pub fn install(env: &Env, api: Option<&support::api_proxy::ApiProxy>) -> Self {
        Self::install_with_lease(env, api, 15u64.div_ceil(u64::from(SCALE)))
    }

    /// [`Self::install`] with a Lease of `lease_seconds`.
    pub fn install_with_lease(
        env: &Env,
        api: Option<&support::api_proxy::ApiProxy>,
        lease_seconds: u64,
    ) -> Self {
        let op_ns = env.cp.unique_namespace("rel");
        let watch = format!("watchNamespaces={{{}}}", env.ns);
        let release = support::helm::ChartRelease::install(
            env.cp,
            &op_ns,
            &op_ns,
            &[watch.as_str(), "replicaCount=2"],
            &["--skip-crds"],
        );
        let direct = release.service_account_kubeconfig();
        let kubeconfig = match api {
            Some(api) => {
                let path = env.log_dir.path().join(format!("{op_ns}-sa.kubeconfig"));
                api.kubeconfig_with_token(&path, &release.service_account_token());
                path
            }
            None => direct.clone(),
        };
        let mut args: Vec<String> = release
            .operator_args()
            .into_iter()
            .filter(|a| !SCALED_CHART_FLAGS.iter().any(|f| a.starts_with(f)))
            .collect();
        assert!(
            args.iter().any(|a| a == "--leader-election"),
            "the chart with two replicas elects a leader: {args:?}"
        );
        args.push(format!("--leader-election-lease-seconds={lease_seconds}"));
        args.push(format!(
            "--shutdown-timeout={}ms",
            scaled(Duration::from_secs(70)).as_millis()
        ));
        ChartReplicas {
            release,
            kubeconfig,
            direct,
            args,
        }
    }

    /// Start replica `name` (its POD_NAME, so the Lease's holder) with `env_extra` besides the
    /// world's and the downward API's environment.
    pub fn replica(&self, env: &Env, name: &str, env_extra: &[(&'static str, String)]) -> Operator {
        self.start(env, name, env_extra, &self.kubeconfig)
    }

    /// [`Self::replica`] straight to the API server, whatever the others go through.
    pub fn replica_direct(&self, env: &Env, name: &str) -> Operator {
        self.start(env, name, &[], &self.direct)
    }

    fn start(
        &self,
        env: &Env,
        name: &str,
        env_extra: &[(&'static str, String)],
        kubeconfig: &std::path::Path,
    ) -> Operator {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut vars: Vec<(&'static str, String)> = self
            .release
            .operator_env()
            .into_iter()
            .filter(|(k, _)| *k != "POD_NAME")
            .collect();
        vars.push(("POD_NAME", name.to_owned()));
        vars.extend(env.operator_env.iter().cloned());
        vars.extend(env_extra.iter().cloned());
        Operator::start_with_env(name, kubeconfig, &args, &vars, env.log_dir.path())
    }

    /// The holder of the chart's Lease now, if any.
    pub fn lease_holder(&self, env: &Env) -> Option<String> {
        let out = env.cp.kubectl(&[
            "get",
            "lease",
            "-n",
            &self.release.namespace,
            "-o",
            "jsonpath={.items[*].spec.holderIdentity}",
        ]);
        let h = out.trim();
        (!h.is_empty()).then(|| h.to_owned())
    }
}

/// How a scenario runs the operator (each binary builds one of the two).
#[allow(dead_code)]
#[derive(Clone, Copy, Debug)]
pub enum Deploy {
    /// One process without leader election.
    Single,
    /// The chart's two replicas ([`ChartReplicas`]): the first leads, the standby takes over.
    Chart,
}

/// The operators of one scenario.
pub struct Operators {
    /// The chart's release (with [`Deploy::Chart`]).
    chart: Option<ChartReplicas>,
    /// The kubeconfig of the test's API proxy, if the first operator goes through one.
    proxied: Option<std::path::PathBuf>,
    standby: Option<Operator>,
}

impl Deploy {
    /// Set the scenario's operators up: with `api`, the first one talks to the API server through
    /// that proxy (whose admin kubeconfig is given; with the chart, the ServiceAccount's token goes
    /// through it instead).
    pub fn operators(
        self,
        env: &Env,
        api: Option<(&support::api_proxy::ApiProxy, &std::path::Path)>,
    ) -> Operators {
        Operators {
            chart: matches!(self, Deploy::Chart)
                .then(|| ChartReplicas::install(env, api.map(|(api, _)| api))),
            proxied: api.map(|(_, kubeconfig)| kubeconfig.to_owned()),
            standby: None,
        }
    }
}

impl Operators {
    /// The first operator (the leader, with the chart).
    pub fn first(&mut self, env: &Env) -> Operator {
        match (&self.chart, &self.proxied) {
            (Some(chart), _) => chart.replica(env, "operator-a", &[]),
            (None, Some(kubeconfig)) => env.operator_with_kubeconfig("operator", kubeconfig, &[]),
            (None, None) => env.operator("operator"),
        }
    }

    /// With the chart, start the standby (straight to the API server) once the leader leads.
    pub fn start_standby(&mut self, env: &Env) {
        if let Some(chart) = &self.chart {
            self.standby = Some(chart.replica_direct(env, "operator-b"));
        }
    }

    /// The operator that carries on once the first one stopped: the standby, or without leader
    /// election a new process `name` (straight to the API server).
    pub fn next(&mut self, env: &Env, name: &str) -> Operator {
        match self.standby.take() {
            Some(standby) => standby,
            None => env.operator(name),
        }
    }
}
