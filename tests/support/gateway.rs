//! The gateway process (`mail-integration-operator gateway`), run from the built binary against the
//! test control plane, with a certificate of a test CA, on reserved loopback ports.

use super::dovecot::TestCa;
use super::operator::{operator_binary, strip_ansi};
use super::process::{Supervised, reserve_ports};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Gateway {
    pub process: Supervised,
    pub health_port: u16,
    pub imaps_port: u16,
    pub imap_port: u16,
    pub pop3s_port: u16,
    pub pop3_port: u16,
    pub submission_port: u16,
    pub submissions_port: u16,
    /// The CA that signed the gateway's certificate (for `localhost` and 127.0.0.1), PEM file.
    pub ca_path: PathBuf,
    pub log_path: PathBuf,
}

/// A certificate for the gateway, made once per directory: (CA file, cert file, key file).
pub fn certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_dir = dir.join("gateway-ca");
    std::fs::create_dir_all(&ca_dir).unwrap();
    let ca = TestCa::generate(&ca_dir, "gateway-ca");
    let (cert, key) = ca.issue_server_cert(&ca_dir, "gateway");
    let ca_path = dir.join("gateway-ca.pem");
    std::fs::write(&ca_path, &ca.cert_pem).unwrap();
    (ca_path, cert, key)
}

impl Gateway {
    /// Start the gateway watching `namespace` with `kubeconfig`, the certificate of
    /// [`certificate`], and `extra` flags; waits for /readyz (its first list of the Secrets).
    pub fn start(
        name: &str,
        kubeconfig: &Path,
        namespace: &str,
        (ca_path, cert, key): &(PathBuf, PathBuf, PathBuf),
        extra: &[&str],
        log_dir: &Path,
    ) -> Self {
        let ports = reserve_ports(6);
        let mut args: Vec<String> = vec![
            "gateway".into(),
            format!("--namespace={namespace}"),
            format!("--tls-cert={}", cert.display()),
            format!("--tls-key={}", key.display()),
            "--listen=127.0.0.1".into(),
            "--health-addr=127.0.0.1:0".into(),
            format!("--imaps-port={}", ports[0]),
            format!("--imap-port={}", ports[1]),
            format!("--pop3s-port={}", ports[2]),
            format!("--pop3-port={}", ports[3]),
            format!("--submission-port={}", ports[4]),
            format!("--submissions-port={}", ports[5]),
            "--allow-loopback".into(),
            "--hostname=gateway.test".into(),
        ];
        // Reuse of upstream IMAP sessions is off unless a test asks for it: the tests of other
        // points count Dovecot's logins per app login (tests/gateway/reuse.rs turns it on).
        if !extra.iter().any(|a| a.starts_with("--imap-reuse-idle")) {
            args.push("--imap-reuse-idle=0".into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log_path = log_dir.join(format!("{name}.log"));
        let process = Supervised::spawn(
            name,
            &operator_binary(),
            &args,
            &[
                ("KUBECONFIG", kubeconfig.display().to_string()),
                ("RUST_LOG", "info,mail_integration_operator=debug".into()),
            ],
            log_path.clone(),
        );
        let mut gw = Self {
            process,
            health_port: 0,
            imaps_port: ports[0],
            imap_port: ports[1],
            pop3s_port: ports[2],
            pop3_port: ports[3],
            submission_port: ports[4],
            submissions_port: ports[5],
            ca_path: ca_path.clone(),
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if gw.health_port == 0
                && let Some(port) = logged_port(&gw.log(), "serving /healthz")
            {
                gw.health_port = port;
            }
            if gw.health_port != 0 && gw.get("/readyz").is_ok_and(|b| b == "ready") {
                return gw;
            }
            assert!(
                gw.process.is_running(),
                "the gateway exited:\n{}",
                gw.process.log_tail(40)
            );
            assert!(
                Instant::now() < deadline,
                "the gateway did not become ready within 30 s:\n{}",
                gw.process.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(
            &std::fs::read(&self.log_path).unwrap_or_default(),
        ))
    }

    /// GET a path on the health port.
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

    /// The value of one metric sample (0 when absent), e.g.
    /// `mailintegration_gateway_logins_total{protocol="IMAP",result="success"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        let body = self.get("/metrics").unwrap_or_default();
        body.lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }
}

/// The port of the `addr` field on the log line containing `message`.
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
