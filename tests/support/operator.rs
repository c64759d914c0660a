//! The operator binary, run as a process against the test control plane, as users run it.

use super::api_audit::{self, ApiRequest};
use super::control_plane::ApiUser;
use super::process::{Supervised, reserve_port};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Operator {
    pub process: Supervised,
    pub health_port: u16,
    /// Port of the sign-in pages (`--sign-in-addr`), on 127.0.0.1.
    pub sign_in_port: u16,
    /// Its API user of its own, when it has one ([`super::world::Env::operator`]): then
    /// [`Self::api_requests`] reads what it asked the API server from the audit log.
    pub api_user: Option<ApiUser>,
}

impl Operator {
    /// Start `mail-integration-operator run` with `kubeconfig` and extra args; waits for /readyz.
    /// The sign-in server listens on a reserved port of 127.0.0.1 (its public URL is that address),
    /// unless `extra_args` pass `--sign-in-addr=127.0.0.1:PORT` (and `--public-url`) themselves.
    pub fn start(name: &str, kubeconfig: &Path, extra_args: &[&str], log_dir: &Path) -> Self {
        Self::start_with_env(name, kubeconfig, extra_args, &[], log_dir)
    }

    /// [`Self::start`] with extra environment variables (e.g. the downward API's POD_NAMESPACE).
    ///
    /// The health server binds 127.0.0.1:0 and the test reads the port the operator logged (no
    /// probe-then-bind race). The sign-in port cannot be chosen that way (the public URL, a flag,
    /// must name it), so it is reserved (`process::reserve_port`); should something outside the
    /// tests take it meanwhile, the operator fails to bind and is started again on another port.
    pub fn start_with_env(
        name: &str,
        kubeconfig: &Path,
        extra_args: &[&str],
        env: &[(&str, String)],
        log_dir: &Path,
    ) -> Self {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::try_start(name, kubeconfig, extra_args, env, log_dir) {
                Ok(op) => return op,
                Err(log) if attempt < 3 => {
                    eprintln!(
                        "{name}: the reserved sign-in port was taken; starting again:\n{log}"
                    );
                }
                Err(log) => panic!("{name}: the sign-in port was taken three times:\n{log}"),
            }
        }
    }

    /// `Err(log)` only when the operator exited because the sign-in port it was given is taken.
    fn try_start(
        name: &str,
        kubeconfig: &Path,
        extra_args: &[&str],
        env: &[(&str, String)],
        log_dir: &Path,
    ) -> Result<Self, String> {
        let mut args = vec!["run".to_owned(), "--health-addr=127.0.0.1:0".to_owned()];
        let given = extra_args
            .iter()
            .find_map(|a| a.strip_prefix("--sign-in-addr="))
            .map(|addr| {
                addr.rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .expect("--sign-in-addr=HOST:PORT")
            });
        let sign_in_port = match given {
            Some(p) => p,
            None => {
                let p = reserve_port();
                args.push(format!("--sign-in-addr=127.0.0.1:{p}"));
                if !extra_args.iter().any(|a| a.starts_with("--public-url")) {
                    args.push(format!("--public-url=http://127.0.0.1:{p}"));
                }
                p
            }
        };
        args.extend(extra_args.iter().map(|s| s.to_string()));
        // The tests' tokens live seconds (8 s, 20 s), shorter than the production floor of
        // `--min-refresh-interval` (30 s): a test that means that floor passes it itself.
        if !extra_args
            .iter()
            .any(|a| a.starts_with("--min-refresh-interval"))
        {
            args.push("--min-refresh-interval=1s".to_owned());
        }
        let log_path: PathBuf = log_dir.join(format!("{name}.log"));
        // The log is appended to across restarts under one name: read only this start's part.
        let offset = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let process = Supervised::spawn(
            name,
            &operator_binary(),
            &args,
            &[
                ("KUBECONFIG", kubeconfig.display().to_string()),
                ("RUST_LOG", "info,mail_integration_operator=debug".into()),
                // The tests' providers and mail servers run on loopback: --allow-loopback, the
                // flag meant for development and tests. A test of its refusal passes
                // ("MIO_ALLOW_LOOPBACK", "false") in `env`, which comes after.
                ("MIO_ALLOW_LOOPBACK", "true".into()),
            ]
            .into_iter()
            .chain(env.iter().cloned())
            .collect::<Vec<_>>(),
            log_path.clone(),
        );
        let mut op = Self {
            process,
            health_port: 0,
            sign_in_port,
            api_user: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = log_since(&log_path, offset);
            if op.health_port == 0
                && let Some(port) = logged_port(&log, "serving /healthz")
            {
                op.health_port = port;
            }
            if op.health_port != 0
                && let Ok(body) = op.get("/readyz")
                && body == "ready"
            {
                return Ok(op);
            }
            if !op.process.is_running() {
                let log = log_since(&log_path, offset);
                if given.is_none() && log.contains("binding the sign-in address") {
                    return Err(super::world::tail(&log, 10));
                }
                panic!("the operator exited:\n{}", op.process.log_tail(40));
            }
            assert!(
                Instant::now() < deadline,
                "the operator did not become ready within 30 s (health port {}):\n{}",
                op.health_port,
                op.process.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET a path on the health port (blocking; plain HTTP/1.0 so no client runtime is needed).
    pub fn get(&self, path: &str) -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.health_port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default())
    }

    /// The sum of every sample whose line starts with `prefix` (a family with all its labels,
    /// e.g. `mailintegration_mailbox_checks_total{`); 0 when there is none or no answer.
    pub fn metric_sum(&self, prefix: &str) -> f64 {
        self.get("/metrics")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The value of one metric sample, e.g. `mailintegration_refreshes_total{result="success",reason="TokenRefreshed"}`.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let body = self.get("/metrics").ok()?;
        body.lines().find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.trim().parse().ok())
        })
    }

    /// The sign-in server's base URL, `http://127.0.0.1:PORT`.
    pub fn sign_in_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.sign_in_port)
    }

    /// Writes to the Kubernetes API so far, of every kind the operator counts (status, Secrets,
    /// events, finalizers).
    pub fn api_writes(&self) -> f64 {
        [
            "status",
            "token_secret",
            "grant_secret",
            "event",
            "finalizer",
        ]
        .iter()
        .map(|k| {
            self.metric(&format!(
                "mailintegration_api_writes_total{{object=\"{k}\"}}"
            ))
            .unwrap_or(0.0)
        })
        .sum()
    }

    /// Every request this operator made that the API server completed, from the API server's
    /// audit log (see [`api_audit`]); panics when it has no user of its own or the log cannot
    /// be read.
    pub fn api_requests(&self) -> Vec<ApiRequest> {
        let user = self
            .api_user
            .as_ref()
            .expect("this operator runs without an API user of its own (use Env::operator)");
        api_audit::requests_of(user)
    }

    /// The writes among [`Self::api_requests`].
    pub fn api_write_requests(&self) -> Vec<ApiRequest> {
        self.api_requests()
            .into_iter()
            .filter(ApiRequest::is_write)
            .collect()
    }

    /// The operator's whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.process.log_path).unwrap_or_default()
    }
}

/// The operator binary ($MIO_OPERATOR_BINARY if set): Cargo names it for tests and benches; examples (the sandbox) find it next to
/// their own directory (`target/<profile>/examples/x` → `target/<profile>/mail-integration-operator`).
pub fn operator_binary() -> PathBuf {
    // A wrapper instead (e.g. a script running the binary under heaptrack, see benches/README.md).
    if let Some(p) = std::env::var_os("MIO_OPERATOR_BINARY") {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_mail-integration-operator") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("mail-integration-operator");
    assert!(
        p.is_file(),
        "{} is missing: build it first (cargo build --bins)",
        p.display()
    );
    p
}

/// The part of a log file after `offset`, without ANSI colour codes.
fn log_since(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(bytes.get(offset as usize..).unwrap_or_default());
    strip_ansi(&text)
}

/// Text without ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The port of the `addr` field on the log line containing `message`, text (`addr=H:P`) or JSON
/// (`"addr":"H:P"`) format.
fn logged_port(log: &str, message: &str) -> Option<u16> {
    let line = log.lines().find(|l| l.contains(message))?;
    let rest = line
        .split_once("addr=")
        .or_else(|| line.split_once("\"addr\":\""))?
        .1;
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    addr.rsplit_once(':')?.1.parse().ok()
}
