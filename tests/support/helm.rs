//! The Helm chart (`charts/mail-integration-operator`) against the test control plane: `helm` runs,
//! releases that install, upgrade and uninstall, and a kubeconfig that acts as the chart's
//! ServiceAccount — with exactly the RBAC the chart grants, e.g. to run the operator process with:
//!
//! ```ignore
//! let cp = support::ensure_crd();
//! let watched = support::unique_namespace("watched");
//! let release = ChartRelease::install_in_new_namespace(cp, "op", &[&format!("watchNamespaces={{{watched}}}")]);
//! let kubeconfig = release.service_account_kubeconfig();
//! // Run the operator as the chart's ServiceAccount, with the chart's own flags (sign-in addresses
//! // replaced by loopback ports), and the downward-API env the Deployment gives it:
//! let op = Operator::start("op", &kubeconfig, &[&format!("--namespace={watched}")], cp.dir.path());
//! // (`release.operator_env()` lists POD_NAME / POD_NAMESPACE as the pod would have them.)
//! ```

use super::control_plane::{ControlPlane, bin_dir, unique_namespace};
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

/// The chart's directory in the repository.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/mail-integration-operator")
}

/// `helm` from the control plane's bin directory, with its config, cache and data directories in a
/// temp dir of this test binary (nothing read from or written to ~).
fn helm_command(kubeconfig: &Path) -> Command {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    let home = HOME
        .get_or_init(|| {
            tempfile::Builder::new()
                .prefix("mio-helm-home-")
                .tempdir()
                .expect("temp dir")
        })
        .path();
    let bin = bin_dir().join("helm");
    assert!(
        bin.is_file(),
        "{} is missing: run tools/control-plane.sh (it builds helm)",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    cmd.env("KUBECONFIG", kubeconfig)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env("HELM_NO_PLUGINS", "1");
    cmd
}

fn run(mut cmd: Command, args: &[&str]) -> Output {
    cmd.args(args).output().expect("run helm")
}

fn stdout_or_panic(out: Output, args: &[&str]) -> String {
    assert!(
        out.status.success(),
        "helm {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run helm against the test control plane (admin kubeconfig).
pub fn helm_output(cp: &ControlPlane, args: &[&str]) -> Output {
    run(helm_command(&cp.kubeconfig), args)
}

/// Run helm against the test control plane; panic with its output when it fails; return stdout.
pub fn helm(cp: &ControlPlane, args: &[&str]) -> String {
    stdout_or_panic(helm_output(cp, args), args)
}

/// Run helm without any cluster (lint, template, package, install --dry-run=client): no API server
/// is started for it, and a kubeconfig that does not exist makes sure none is used.
pub fn helm_offline_output(args: &[&str]) -> Output {
    run(helm_command(Path::new("/nonexistent/kubeconfig")), args)
}

/// [`helm_offline_output`]; panic with its output when it fails; return stdout.
pub fn helm_offline(args: &[&str]) -> String {
    stdout_or_panic(helm_offline_output(args), args)
}

/// `helm template RELEASE <chart> -n NAMESPACE --set ...` (offline).
pub fn template(release: &str, namespace: &str, set: &[&str]) -> String {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        release,
        chart.to_str().unwrap(),
        "--namespace",
        namespace,
    ];
    for s in set {
        args.extend(["--set", s]);
    }
    helm_offline(&args)
}

/// One installed release of the chart.
pub struct ChartRelease<'a> {
    pub cp: &'a ControlPlane,
    pub release: String,
    pub namespace: String,
    /// The object name prefix (`<release>-mail-integration-operator` unless the release name holds it).
    pub fullname: String,
    pub service_account: String,
}

impl<'a> ChartRelease<'a> {
    /// `helm install RELEASE <chart> -n NAMESPACE --set ...` (no --wait: there is no kubelet, the
    /// Deployment is stored but never runs). With `crds.enabled=false` unless `set` says otherwise:
    /// the test control planes get the CRD from `kubectl apply` (`ensure_crd`), and Helm refuses to
    /// take over an object another tool created.
    pub fn install(
        cp: &'a ControlPlane,
        release: &str,
        namespace: &str,
        set: &[&str],
        extra: &[&str],
    ) -> Self {
        let chart = chart_dir();
        let mut args = vec![
            "install",
            release,
            chart.to_str().unwrap(),
            "--namespace",
            namespace,
        ];
        if !set.iter().any(|s| s.starts_with("crds.")) {
            args.extend(["--set", "crds.enabled=false"]);
        }
        for s in set {
            args.extend(["--set", s]);
        }
        args.extend(extra);
        helm(cp, &args);
        let fullname = if release.contains("mail-integration-operator") {
            release.to_owned()
        } else {
            format!("{release}-mail-integration-operator")
        };
        Self {
            cp,
            release: release.to_owned(),
            namespace: namespace.to_owned(),
            service_account: fullname.clone(),
            fullname,
        }
    }

    /// Install into a namespace of its own (made with `unique_namespace`); the release is named
    /// after the namespace so that its cluster-scoped objects do not collide with other tests'.
    pub fn install_in_new_namespace(cp: &'a ControlPlane, prefix: &str, set: &[&str]) -> Self {
        let ns = unique_namespace(prefix);
        Self::install(cp, &ns, &ns, set, &[])
    }

    /// `helm upgrade` with these values (instead of the previous ones: not --reuse-values).
    pub fn upgrade(&self, set: &[&str]) -> String {
        let chart = chart_dir();
        let mut args = vec![
            "upgrade",
            &self.release,
            chart.to_str().unwrap(),
            "--namespace",
            &self.namespace,
        ];
        if !set.iter().any(|s| s.starts_with("crds.")) {
            args.extend(["--set", "crds.enabled=false"]);
        }
        for s in set {
            args.extend(["--set", s]);
        }
        helm(self.cp, &args)
    }

    pub fn uninstall(&self) -> String {
        helm(
            self.cp,
            &["uninstall", &self.release, "--namespace", &self.namespace],
        )
    }

    /// A token of the chart's ServiceAccount (TokenRequest, 2 h).
    pub fn service_account_token(&self) -> String {
        self.cp
            .kubectl(&[
                "create",
                "token",
                &self.service_account,
                "-n",
                &self.namespace,
                "--duration=2h",
            ])
            .trim()
            .to_owned()
    }

    /// A kubeconfig (in the control plane's temp dir) that acts as the chart's ServiceAccount.
    pub fn service_account_kubeconfig(&self) -> PathBuf {
        let path = self
            .cp
            .dir
            .path()
            .join(format!("kubeconfig-sa-{}-{}", self.namespace, self.release));
        self.cp
            .kubeconfig_with_token(&path, &self.service_account_token());
        path
    }

    /// The environment the Deployment gives the operator through the downward API.
    pub fn operator_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("POD_NAME", format!("{}-0", self.fullname)),
            ("POD_NAMESPACE", self.namespace.clone()),
        ]
    }

    /// The container args of the installed Deployment (as stored by the API server).
    pub fn deployment_args(&self) -> Vec<String> {
        let json = self.cp.kubectl(&[
            "get",
            "deployment",
            &self.fullname,
            "-n",
            &self.namespace,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].args}",
        ]);
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("args {json:?}: {e}"))
    }

    /// The Deployment's args for running the operator here as the chart runs it: without the
    /// `run` subcommand and the listen addresses and public URL, which a test chooses itself.
    pub fn operator_args(&self) -> Vec<String> {
        self.deployment_args()
            .into_iter()
            .filter(|a| {
                a != "run"
                    && !["--health-addr", "--sign-in-addr", "--public-url"]
                        .iter()
                        .any(|f| a.starts_with(f))
            })
            .collect()
    }
}

/// `kubectl --kubeconfig KUBECONFIG ARGS` (e.g. acting as a ServiceAccount).
pub fn kubectl_as(cp: &ControlPlane, kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new(cp.bin_dir.join("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl")
}

/// A kube client for a kubeconfig file (e.g. a ServiceAccount's), for the calling test's runtime.
pub async fn client_for(kubeconfig: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kubeconfig to config");
    kube::Client::try_from(config).expect("kube client")
}
