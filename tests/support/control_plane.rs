//! A real Kubernetes control plane (etcd, kube-apiserver and kube-controller-manager built by
//! `tools/control-plane.sh`) on free 127.0.0.1 ports, shared by all tests of one test binary and
//! stopped when the binary ends. kube-controller-manager runs the controllers the operator's
//! behaviour depends on: the garbage collector (ownerReferences), namespace deletion, ServiceAccounts
//! and their token Secrets, and the aggregation of ClusterRoles into `view`/`edit`/`admin`.
//!
//! [`ControlPlane::start_dedicated`] starts another one, private to whoever holds it (e.g. a test that
//! stops and restarts its kube-apiserver with [`ControlPlane::stop_apiserver`] and
//! [`ControlPlane::start_apiserver`]: same port, certificates and etcd data).

use super::process::{Supervised, reserve_port, reserve_ports};
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

/// The token of the `system:masters` user the tests act as.
pub const ADMIN_TOKEN: &str = "mio-test-admin-token";

/// How many operator users the token file holds (see [`ControlPlane::operator_user`]).
const OPERATOR_USERS: u32 = 400;
/// The group of the operator users, besides system:masters: what the audit policy records.
pub const OPERATOR_GROUP: &str = "mio:operators";
/// The API server's audit log, in the control plane's directory.
pub const AUDIT_LOG: &str = "audit.log";

fn operator_token(i: u32) -> String {
    format!("mio-operator-token-{i}-5e1f")
}

fn operator_user_name(i: u32) -> String {
    format!("mio-operator-{i}")
}

/// An API user of its own for one operator process, so that the API server's audit log tells its
/// requests from the test's and from other tests' ([`super::api_audit`]). Admin rights
/// (system:masters): RBAC is tested with the chart's ServiceAccount instead.
#[derive(Clone, Debug)]
pub struct ApiUser {
    pub name: String,
    pub token: String,
    pub kubeconfig: PathBuf,
    /// The audit log of the API server this user belongs to.
    pub audit_log: PathBuf,
}

pub struct ControlPlane {
    pub bin_dir: PathBuf,
    pub dir: tempfile::TempDir,
    pub server: String,
    pub kubeconfig: PathBuf,
    _etcd: Supervised,
    /// `None` while stopped by [`Self::stop_apiserver`].
    apiserver: Mutex<Option<Supervised>>,
    apiserver_bin: PathBuf,
    apiserver_args: Vec<String>,
    controller_manager: Mutex<Option<Supervised>>,
}

/// The controllers of kube-controller-manager the tests run (its other controllers need kubelets,
/// nodes or cloud providers, which these control planes do not have).
const CONTROLLERS: &str =
    "garbagecollector,namespace,serviceaccount,serviceaccount-token,clusterrole-aggregation";

static CONTROL_PLANE: OnceLock<ControlPlane> = OnceLock::new();

/// The control plane of this test binary, started on first use.
pub fn control_plane() -> &'static ControlPlane {
    CONTROL_PLANE.get_or_init(|| ControlPlane::start(&[]))
}

/// The directory holding kube-apiserver, etcd, kubectl and helm: `$MIO_CONTROL_PLANE_BIN`, as
/// `tools/test.sh` sets it from `tools/control-plane.sh`. Without it the tests fail at once rather
/// than start a Go build of Kubernetes in the middle of a test run.
pub fn bin_dir() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var("MIO_CONTROL_PLANE_BIN") {
        Ok(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => panic!(
            "MIO_CONTROL_PLANE_BIN is not set: build (or find in the cache) the control plane first with\n  \
             export MIO_CONTROL_PLANE_BIN=\"$(tools/control-plane.sh | tail -n 1)\"\n\
             then run cargo test again (tools/test.sh does both)"
        ),
    })
    .clone()
}

fn require(bin: &Path, name: &str) -> PathBuf {
    let p = bin.join(name);
    assert!(
        p.is_file(),
        "{} is missing: run tools/control-plane.sh (or set MIO_CONTROL_PLANE_BIN to the directory holding it)",
        p.display()
    );
    p
}

impl ControlPlane {
    /// A control plane of its own (not the shared [`control_plane()`]): its own etcd, apiserver,
    /// ports and directory, stopped when the value is dropped (or the test binary ends). Takes a few
    /// seconds, like the shared one. `ensure_crd` and `unique_namespace` work on the shared one; use
    /// [`Self::install_crd`] and [`Self::unique_namespace`] here.
    pub fn start_dedicated() -> Self {
        Self::start(&[])
    }

    /// [`Self::start_dedicated`] with more kube-apiserver flags (`--feature-gates=…`, say).
    pub fn start_dedicated_with(apiserver_flags: &[&str]) -> Self {
        Self::start(apiserver_flags)
    }

    fn start(extra_apiserver_flags: &[&str]) -> Self {
        let bin_dir = bin_dir();
        let etcd_bin = require(&bin_dir, "etcd");
        let apiserver_bin = require(&bin_dir, "kube-apiserver");
        require(&bin_dir, "kube-controller-manager");
        require(&bin_dir, "kubectl");
        sweep_stale_dirs();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .expect("temp dir");
        let root = dir.path();
        // A control plane shared by a test binary lives in a static, which is never dropped: the
        // next test process removes the directory once this one is gone (see `sweep_stale_dirs`).
        std::fs::write(root.join(OWNER_FILE), std::process::id().to_string())
            .expect("write the owner file");

        let [client_port, peer_port] = reserve_ports(2)[..] else {
            unreachable!()
        };
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = Supervised::spawn(
            "etcd",
            &etcd_bin,
            &[
                "--name=test".into(),
                format!("--data-dir={}", root.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=test={peer_url}"),
                "--unsafe-no-fsync".into(),
                // 8 GiB, not the default 2: a scale bench of 100,000 integrations (400,000
                // objects and their history between compactions) outgrows 2 GiB, and etcd then
                // refuses every write. A limit, not an allocation.
                "--quota-backend-bytes=8589934592".into(),
                "--log-level=warn".into(),
            ],
            &[],
            root.join("etcd.log"),
        );

        let sa_key = root.join("sa.key");
        let status = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&sa_key)
            .arg("2048")
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl is needed to make the service-account signing key (apt-get install openssl)");
        assert!(status.success(), "openssl genrsa failed");
        let tokens = root.join("tokens.csv");
        let mut token_lines = format!("{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n");
        for i in 0..OPERATOR_USERS {
            token_lines.push_str(&format!(
                "{},{},{}-uid,\"system:masters,{OPERATOR_GROUP}\"\n",
                operator_token(i),
                operator_user_name(i),
                operator_user_name(i)
            ));
        }
        std::fs::write(&tokens, token_lines).unwrap();
        // The API server's own record of what operators asked it (see super::api_audit): every
        // request of an operator user or a ServiceAccount, at Metadata level, once complete.
        let audit_policy = root.join("audit-policy.yaml");
        std::fs::write(
            &audit_policy,
            format!(
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived, ResponseStarted]\nrules:\n- level: Metadata\n  userGroups: [\"{OPERATOR_GROUP}\", \"system:serviceaccounts\"]\n- level: None\n"
            ),
        )
        .unwrap();

        let port = reserve_port();
        let cert_dir = root.join("certs");
        let mut apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", cert_dir.display()),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--authorization-mode=RBAC".into(),
            "--allow-privileged=true".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            "--service-account-issuer=https://127.0.0.1".into(),
            format!("--service-account-key-file={}", sa_key.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            format!("--token-auth-file={}", tokens.display()),
            format!("--audit-policy-file={}", audit_policy.display()),
            format!("--audit-log-path={}", root.join(AUDIT_LOG).display()),
            "--audit-log-format=json".into(),
            "--audit-log-mode=blocking".into(),
            // Never rotated (unset, the log rotates at 100 MB, which a scale bench of 10,000
            // integrations passes: its counts from the log would lose the older requests).
            "--audit-log-maxsize=100000".into(),
            "--v=0".into(),
        ];
        apiserver_args.extend(extra_apiserver_flags.iter().map(|f| f.to_string()));

        let server = format!("https://127.0.0.1:{port}");
        let kubeconfig = root.join("kubeconfig");
        let cp = ControlPlane {
            bin_dir,
            server,
            kubeconfig,
            _etcd: etcd,
            apiserver: Mutex::new(None),
            apiserver_bin,
            apiserver_args,
            controller_manager: Mutex::new(None),
            dir,
        };
        cp.start_apiserver();
        cp.start_controller_manager(&sa_key);
        cp
    }

    /// Start kube-controller-manager against this API server (as the admin, without leader
    /// election or a serving port). It stays up while the API server is stopped and restarted.
    fn start_controller_manager(&self, sa_key: &Path) {
        let kubeconfig = self.dir.path().join("controller-manager.kubeconfig");
        write_kubeconfig(&kubeconfig, &self.server, &self.ca_path(), ADMIN_TOKEN);
        let process = Supervised::spawn(
            "kube-controller-manager",
            &self.bin_dir.join("kube-controller-manager"),
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--controllers={CONTROLLERS}"),
                format!("--service-account-private-key-file={}", sa_key.display()),
                format!("--root-ca-file={}", self.ca_path().display()),
                "--use-service-account-credentials=false".into(),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
                "--v=0".into(),
            ],
            &[],
            self.dir.path().join("kube-controller-manager.log"),
        );
        *self.controller_manager.lock().unwrap() = Some(process);
    }

    /// The last `n` lines of kube-controller-manager's log, for failure messages.
    pub fn controller_manager_log_tail(&self, n: usize) -> String {
        let log = self.dir.path().join("kube-controller-manager.log");
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Wait (at most 60 s) until kube-controller-manager's controllers work: the ServiceAccount
    /// controller has made `default` in the namespace `default`. Panics with its log otherwise.
    pub fn wait_controllers(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let running = self
                .controller_manager
                .lock()
                .unwrap()
                .as_mut()
                .is_some_and(Supervised::is_running);
            assert!(
                running,
                "kube-controller-manager exited.\n--- its log ---\n{}",
                self.controller_manager_log_tail(40)
            );
            let out = self.kubectl_output(&["get", "serviceaccount", "default", "-n", "default"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kube-controller-manager made no ServiceAccount within 60 s.\n--- its log ---\n{}",
                self.controller_manager_log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Stop the kube-apiserver (TERM, KILL after 3 s) and wait until it is gone; etcd keeps running.
    /// Requests then fail with "connection refused". Panics if it is not running.
    pub fn stop_apiserver(&self) {
        let apiserver = self
            .apiserver
            .lock()
            .unwrap()
            .take()
            .expect("stop_apiserver: the kube-apiserver is not running");
        drop(apiserver); // Supervised::drop stops it and waits.
        let port = self.port();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "the kube-apiserver still accepts connections on port {port} 10 s after it was stopped"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start the kube-apiserver (again) with the same flags: same port, certificates (kept in the
    /// cert dir), tokens and etcd, and wait until /readyz answers. Panics if it already runs.
    pub fn start_apiserver(&self) {
        {
            let mut apiserver = self.apiserver.lock().unwrap();
            assert!(
                apiserver.is_none(),
                "start_apiserver: the kube-apiserver already runs"
            );
            *apiserver = Some(Supervised::spawn(
                "kube-apiserver",
                &self.apiserver_bin,
                &self.apiserver_args,
                &[],
                self.dir.path().join("kube-apiserver.log"),
            ));
        }
        self.wait_ready();
    }

    /// Whether the kube-apiserver process runs (it may not be ready yet).
    pub fn apiserver_running(&self) -> bool {
        self.apiserver
            .lock()
            .unwrap()
            .as_mut()
            .is_some_and(Supervised::is_running)
    }

    /// The apiserver's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.server
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("server is https://127.0.0.1:PORT")
    }

    /// The apiserver's self-signed serving certificate (the CA of its kubeconfigs).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("certs/apiserver.crt")
    }

    fn apiserver_log_tail(&self, n: usize) -> String {
        let log = self.dir.path().join("kube-apiserver.log");
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        let ca = self.ca_path();
        loop {
            assert!(
                self.apiserver_running(),
                "kube-apiserver exited.\n--- kube-apiserver log ---\n{}",
                self.apiserver_log_tail(40)
            );
            if ca.is_file() {
                write_kubeconfig(&self.kubeconfig, &self.server, &ca, ADMIN_TOKEN);
                let out = self.kubectl_output(&["get", "--raw", "/readyz"]);
                if out.status.success() {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver did not become ready within 90 s.\n--- kube-apiserver log ---\n{}\n--- etcd log ---\n{}",
                self.apiserver_log_tail(40),
                self._etcd.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        // Say which server the tests run against, past the test harness's output capture.
        let version = self.kubectl_output(&["get", "--raw", "/version"]);
        let _ = writeln!(
            std::io::stderr(),
            "control plane: kube-apiserver at {} /version: {}",
            self.server,
            String::from_utf8_lossy(&version.stdout)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        );
    }

    /// Run the cached kubectl against this server, as an admin.
    pub fn kubectl_output(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.bin_dir.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("run kubectl")
    }

    /// Run kubectl; panic with its output when it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args);
        assert!(
            out.status.success(),
            "kubectl {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A kube client for the calling test's runtime (clients are not shared across runtimes).
    pub async fn client(&self) -> kube::Client {
        let kubeconfig =
            kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("read kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("kubeconfig to config");
        kube::Client::try_from(config).expect("kube client")
    }

    /// A kubeconfig for the same server holding another bearer token (e.g. a ServiceAccount's).
    /// A fresh operator user (one of those in the token file) with a kubeconfig of its own.
    pub fn operator_user(&self) -> ApiUser {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let i = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            i < OPERATOR_USERS,
            "more than {OPERATOR_USERS} operator users in one test binary: raise OPERATOR_USERS"
        );
        let name = operator_user_name(i);
        let token = operator_token(i);
        let kubeconfig = self.dir.path().join(format!("kubeconfig-{name}"));
        self.kubeconfig_with_token(&kubeconfig, &token);
        ApiUser {
            name,
            token,
            kubeconfig,
            audit_log: self.audit_log_path(),
        }
    }

    /// The API server's audit log (JSON lines).
    pub fn audit_log_path(&self) -> PathBuf {
        self.dir.path().join(AUDIT_LOG)
    }

    pub fn kubeconfig_with_token(&self, path: &Path, token: &str) {
        write_kubeconfig(path, &self.server, &self.ca_path(), token);
    }
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) {
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: test\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\n",
        ca = ca.display()
    );
    std::fs::write(path, yaml).expect("write kubeconfig");
}

/// A namespace of its own for one test.
pub fn unique_namespace(prefix: &str) -> String {
    control_plane().unique_namespace(prefix)
}

const DIR_PREFIX: &str = "mio-control-plane-";
/// The PID of the test process that owns a control plane's directory.
const OWNER_FILE: &str = "owner.pid";

/// Remove the directories (etcd data, certificates, logs: ~125 MB each) of control planes whose
/// test process has exited. Directories without an owner file are left alone.
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(DIR_PREFIX));
        let owner = std::fs::read_to_string(path.join(OWNER_FILE))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        if let (true, Some(pid)) = (is_ours, owner)
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Install the checked-in CRD once per test binary and wait until it is Established.
pub fn ensure_crd() -> &'static ControlPlane {
    static DONE: OnceLock<()> = OnceLock::new();
    let cp = control_plane();
    DONE.get_or_init(|| cp.install_crd());
    cp
}

impl ControlPlane {
    /// Install the checked-in CRD on this control plane and wait until it is Established.
    pub fn install_crd(&self) {
        let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
        self.kubectl(&["apply", "--server-side", "-f", crds.to_str().unwrap()]);
        // `kubectl wait` fails at once, instead of waiting, while the new CRD has no
        // status.conditions yet (".status.conditions accessor error: <nil> is of the type <nil>"):
        // ask again until it is Established, within one deadline.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.kubectl_output(&[
                "wait",
                "--for=condition=Established",
                "--timeout=30s",
                "crd/mailintegrations.mailintegration.dev",
            ]);
            if out.status.success() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the CRD was not Established within 60 s:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A namespace of its own for one test, on this control plane.
    pub fn unique_namespace(&self, prefix: &str) -> String {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let ns = format!("{prefix}-{}-{n}", std::process::id());
        self.kubectl(&["create", "namespace", &ns]);
        ns
    }

    /// `kubectl ARGS` with `stdin` piped in (e.g. `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> std::process::Output {
        use std::process::Stdio;
        let mut child = Command::new(self.bin_dir.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().expect("kubectl output")
    }
}
