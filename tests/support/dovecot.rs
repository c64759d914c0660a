//! Debian's Dovecot as the tests' mail server: IMAP (implicit TLS and plain/STARTTLS), POP3 (both),
//! and SMTP submission (both), on free 127.0.0.1 ports, authenticating XOAUTH2 and OAUTHBEARER
//! through its `oauth2` passdb, which asks an OAuth introspection endpoint (RFC 7662) about every token.
//!
//! It runs as the test's own process (`dovecot -F -c <conf>`, under [`Supervised`]), with base_dir,
//! state and mail in a temp dir, so it neither needs nor touches a system instance. TLS uses a test CA
//! and a server certificate for `localhost` / `127.0.0.1` made with the openssl CLI.
//!
//! Needs Debian 12's packages (and the openssl CLI). Installed in CI with a `policy-rc.d` that forbids
//! starting services, so that the package does not start a system instance on the standard ports
//! (the tests do not depend on one either way):
//!
//! ```sh
//! [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; }
//! apt-get update
//! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
//!     dovecot-core dovecot-imapd dovecot-pop3d dovecot-submissiond
//! ```
//!
//! As root, Dovecot's own processes run as Debian's `dovecot`/`dovenull` users and mail as `nobody`;
//! as another user, everything runs as that user.

use super::process::{Supervised, reserve_ports};
use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

pub const INSTALL_HINT: &str = "Dovecot is not installed. Install it with:\n  \
    apt-get install -y --no-install-recommends dovecot-core dovecot-imapd dovecot-pop3d dovecot-submissiond\n\
    (or set MIO_DOVECOT to the dovecot binary)";

/// How to configure the `oauth2` passdb.
#[derive(Clone, Debug)]
pub struct DovecotConfig {
    /// The introspection endpoint, with the introspecting client's credentials as userinfo:
    /// `http://<client>:<secret>@127.0.0.1:<port>/<path>`.
    pub introspection_url: String,
    /// Which introspection field names the mailbox user (`sub` or `email`).
    pub username_attribute: String,
    /// A second `oauth2` passdb, tried when the token is not the login user's own: it accepts a
    /// token whose introspection field of this name is the login user, i.e. a delegate's token for
    /// the shared mailbox it may open (see [`super::oauth::OAuthServerConfig::full_access`]).
    pub delegation_attribute: Option<String>,
    /// Deliver what the submission service accepts: Dovecot relays it to `msmtpd` (Debian's
    /// `msmtp-mta`), which pipes each message to Dovecot's own LDA (`dovecot-lda -d <recipient>`),
    /// so a message sent through submission lands in the recipient's INBOX. Without it, the relay
    /// is a stand-in that refuses every transaction (the mailbox checks never send mail).
    pub deliver: bool,
    /// Appended to the generated dovecot.conf as it is (e.g. benches/gateway.rs's settings for
    /// 10,000 sessions).
    pub extra_conf: String,
}

impl DovecotConfig {
    pub fn new(introspection_url: impl Into<String>) -> Self {
        Self {
            introspection_url: introspection_url.into(),
            username_attribute: "sub".into(),
            delegation_attribute: None,
            deliver: false,
            extra_conf: String::new(),
        }
    }
}

/// A CA made for one test run, and what it signs.
pub struct TestCa {
    pub cert_pem: Vec<u8>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is needed to make the test certificates (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn serial() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("0x{:x}{:x}", nanos, std::process::id())
}

impl TestCa {
    /// A new self-signed CA (EC P-256, valid two days) in `dir`, files named after `name`.
    pub fn generate(dir: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir).expect("create CA dir");
        let cert = format!("{name}.pem");
        let key = format!("{name}.key");
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &cert,
                "-days",
                "2",
                "-subj",
                &format!("/CN={name} test CA"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            dir,
        );
        let cert_path = dir.join(cert);
        Self {
            cert_pem: std::fs::read(&cert_path).expect("read CA cert"),
            cert_path,
            key_path: dir.join(key),
        }
    }

    /// A server certificate for `localhost` and `127.0.0.1`; returns (cert path, key path).
    pub fn issue_server_cert(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let cert = format!("{name}.pem");
        let ext = format!("{name}.ext");
        std::fs::write(
            dir.join(&ext),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                "/CN=localhost",
            ],
            dir,
        );
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                self.cert_path.to_str().unwrap(),
                "-CAkey",
                self.key_path.to_str().unwrap(),
                "-set_serial",
                &serial(),
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
            dir,
        );
        (dir.join(cert), dir.join(key))
    }
}

/// A running (or stopped) Dovecot of one test.
pub struct Dovecot {
    pub dir: tempfile::TempDir,
    /// IMAP with implicit TLS.
    pub imaps_port: u16,
    /// IMAP in plain text, offering STARTTLS.
    pub imap_port: u16,
    pub pop3s_port: u16,
    pub pop3_port: u16,
    /// Submission with implicit TLS (like 465).
    pub submissions_port: u16,
    /// Submission offering STARTTLS (like 587).
    pub submission_port: u16,
    /// The PEM of the CA that signed Dovecot's certificate.
    pub ca_pem: Vec<u8>,
    conf_path: PathBuf,
    binary: PathBuf,
    mail_owner: Option<String>,
    process: Option<Supervised>,
    /// `msmtpd`, when [`DovecotConfig::deliver`] is set (stopped with Dovecot's drop).
    _relay: Option<Supervised>,
}

/// The dovecot binary, or a panic that says how to install it.
fn dovecot_binary() -> PathBuf {
    let binary = std::env::var_os("MIO_DOVECOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/dovecot"));
    assert!(
        binary.is_file(),
        "{} not found. {INSTALL_HINT}",
        binary.display()
    );
    // The protocol packages install these; without them dovecot starts but refuses the protocol.
    for (program, package) in [
        ("imap", "dovecot-imapd"),
        ("pop3", "dovecot-pop3d"),
        ("submission", "dovecot-submissiond"),
    ] {
        let path = Path::new("/usr/lib/dovecot").join(program);
        assert!(
            path.is_file() || std::env::var_os("MIO_DOVECOT").is_some(),
            "{} not found: {package} is missing. {INSTALL_HINT}",
            path.display()
        );
    }
    binary
}

fn is_root() -> bool {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc/self")) == 0
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("run id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl Dovecot {
    /// Generate certificates and configuration, start Dovecot, and wait until every listener answers.
    pub fn start(config: DovecotConfig) -> Self {
        let binary = dovecot_binary();
        let dir = tempfile::Builder::new()
            .prefix("mio-dovecot-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path();
        // Dovecot's unprivileged processes (and the mail user) must reach files under it.
        std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();

        let ca = TestCa::generate(&root.join("ca"), "dovecot-ca");
        let (cert, key) = ca.issue_server_cert(&root.join("ca"), "server");

        let (relay_port, relay) = if config.deliver {
            let (port, process) = start_msmtpd(root);
            (port, Some(process))
        } else {
            (start_relay_stand_in(), None)
        };
        let ports: Vec<u16> = reserve_ports(6);
        let (imaps_port, imap_port, pop3s_port, pop3_port, submissions_port, submission_port) =
            (ports[0], ports[1], ports[2], ports[3], ports[4], ports[5]);

        // As root: Debian's `dovecot` and `dovenull` users for Dovecot's own processes, `nobody` for
        // mail. Otherwise everything runs as the current user.
        let (internal_user, login_user, mail_user, mail_group) = if is_root() {
            (
                "dovecot".to_owned(),
                "dovenull".to_owned(),
                "nobody".to_owned(),
                "nogroup".to_owned(),
            )
        } else {
            let me = current_user();
            (me.clone(), me.clone(), me.clone(), me)
        };
        let home = root.join("home");
        std::fs::create_dir_all(&home).unwrap();
        let mail_owner = is_root().then(|| format!("{mail_user}:{mail_group}"));
        if let Some(owner) = &mail_owner {
            chown(owner, &home);
        }

        let oauth2_file = |name: &str, attr: &str| {
            let path = root.join(name);
            std::fs::write(
                &path,
                format!(
                    "introspection_mode = post\n\
                     introspection_url = {url}\n\
                     username_attribute = {attr}\n\
                     active_attribute = active\n\
                     active_value = true\n\
                     force_introspection = yes\n",
                    url = config.introspection_url,
                ),
            )
            .unwrap();
            path
        };
        let oauth2_args = oauth2_file("dovecot-oauth2.conf.ext", &config.username_attribute);
        // Dovecot tries the next passdb when one refuses (result_failure = continue by default).
        let delegation_passdb = match &config.delegation_attribute {
            None => String::new(),
            Some(attr) => format!(
                "passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {}\n}}\n",
                oauth2_file("dovecot-oauth2-delegation.conf.ext", attr).display()
            ),
        };

        let r = root.display();
        let conf = format!(
            r#"# Written by tests/support/dovecot.rs
base_dir = {r}/run
state_dir = {r}/state
instance_name = mio-dovecot-{imaps_port}
listen = 127.0.0.1
protocols = imap pop3 submission
log_path = /dev/stderr
info_log_path = /dev/stderr
auth_verbose = yes
auth_failure_delay = 0
auth_mechanisms = xoauth2 oauthbearer
default_internal_user = {internal_user}
default_login_user = {login_user}
first_valid_uid = 1
first_valid_gid = 1
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
mail_location = maildir:~/Maildir
hostname = localhost
submission_relay_host = 127.0.0.1
submission_relay_port = {relay_port}

passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {oauth2_args}
}}
{delegation_passdb}userdb {{
  driver = static
  args = uid={mail_user} gid={mail_group} home={r}/home/%u{allow_all_users}
}}

service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  # Also on 127.0.0.2, a loopback address that the certificate does not name.
  inet_listener imaps {{
    address = 127.0.0.1, 127.0.0.2
    port = {imaps_port}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {pop3s_port}
    ssl = yes
  }}
}}
service submission-login {{
  inet_listener submission {{
    address = 127.0.0.1
    port = {submission_port}
  }}
  inet_listener submissions {{
    address = 127.0.0.1
    port = {submissions_port}
    ssl = yes
  }}
}}
# No growing delay after failed logins from 127.0.0.1: the tests fail logins on purpose.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
{extra_conf}
"#,
            extra_conf = config.extra_conf,
            cert = cert.display(),
            key = key.display(),
            oauth2_args = oauth2_args.display(),
            // The LDA looks users up in the userdb alone (the oauth2 passdb cannot list users).
            allow_all_users = if config.deliver {
                " allow_all_users=yes"
            } else {
                ""
            },
        );
        let conf_path = root.join("dovecot.conf");
        std::fs::write(&conf_path, conf).unwrap();

        let mut dovecot = Dovecot {
            imaps_port,
            imap_port,
            pop3s_port,
            pop3_port,
            submissions_port,
            submission_port,
            ca_pem: ca.cert_pem.clone(),
            conf_path,
            binary,
            mail_owner,
            process: None,
            _relay: relay,
            dir,
        };
        dovecot.start_again();
        dovecot
    }

    fn ports(&self) -> [u16; 6] {
        [
            self.imaps_port,
            self.imap_port,
            self.pop3s_port,
            self.pop3_port,
            self.submissions_port,
            self.submission_port,
        ]
    }

    /// Start the stopped Dovecot again, on the same ports, and wait until it answers.
    pub fn start_again(&mut self) {
        assert!(self.process.is_none(), "Dovecot is already running");
        let log = self.dir.path().join("dovecot.log");
        let process = Supervised::spawn(
            "dovecot",
            &self.binary,
            &[
                "-F".into(),
                "-c".into(),
                self.conf_path.display().to_string(),
            ],
            &[],
            log,
        );
        self.process = Some(process);
        self.wait_until(true);
    }

    /// Stop Dovecot and wait until its ports refuse connections.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
        self.wait_until(false);
    }

    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| p.is_running())
    }

    /// How many logins of `user` Dovecot has logged (its `Login: user=<...>` lines, IMAP, POP3 and
    /// submission alike): the mail server's own count of the operator's mailbox checks.
    pub fn logins(&self, user: &str) -> usize {
        let text = std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default();
        let needle = format!("Login: user=<{user}>");
        text.lines().filter(|l| l.contains(&needle)).count()
    }

    /// [`Self::logins`] once it has reached `at_least`, or after 10 s: the count then, for the
    /// caller to assert. Dovecot's log process writes a login's line a moment after the login
    /// was answered (a loaded machine saw the count one short right after a login).
    pub async fn logins_reaching(&self, user: &str, at_least: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.logins(user);
            if n >= at_least || Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The messages `msmtpd` has delivered ([`DovecotConfig::deliver`]): one `<from> <recipients>`
    /// line each, in order. What the mail server really accepted, counted where it was delivered.
    pub fn deliveries(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("deliveries.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The relay's (`msmtpd`'s) log: its sessions and what it piped, for failure messages.
    pub fn relay_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("msmtpd.log")).unwrap_or_default()
    }

    /// The messages in `user`'s INBOX on disk (new/ and cur/), as delivered.
    pub fn inbox_files(&self, user: &str) -> Vec<String> {
        let maildir = self.dir.path().join("home").join(user).join("Maildir");
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(entries) = std::fs::read_dir(maildir.join(sub)) {
                for entry in entries.flatten() {
                    out.push(std::fs::read_to_string(entry.path()).unwrap_or_default());
                }
            }
        }
        out
    }

    /// The last lines of Dovecot's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn wait_until(&mut self, listening: bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let answering = self
                .ports()
                .iter()
                .filter(|port| {
                    TcpStream::connect_timeout(
                        &([127, 0, 0, 1], **port).into(),
                        Duration::from_millis(200),
                    )
                    .is_ok()
                })
                .count();
            if (listening && answering == 6) || (!listening && answering == 0) {
                return;
            }
            if listening && !self.is_running() {
                panic!(
                    "dovecot exited while starting. Its log:\n{}",
                    self.log_tail(30)
                );
            }
            assert!(
                Instant::now() < deadline,
                "dovecot did not {} within 15 s ({answering} of 6 ports answering). Its log:\n{}",
                if listening { "start" } else { "stop" },
                self.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Put a message into `user`'s INBOX (new/), as delivery would.
    pub fn deliver(&self, user: &str, message: &str) {
        let maildir = self.dir.path().join("home").join(user).join("Maildir");
        for sub in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(maildir.join(sub)).unwrap();
        }
        let name = format!("{}.mio{}.localhost", serial(), std::process::id());
        let mut file = std::fs::File::create(maildir.join("new").join(name)).unwrap();
        file.write_all(message.replace('\n', "\r\n").as_bytes())
            .unwrap();
        if let Some(owner) = &self.mail_owner {
            chown(owner, &self.dir.path().join("home").join(user));
        }
    }
}

fn chown(owner: &str, path: &Path) {
    let status = Command::new("chown")
        .arg("-R")
        .arg(owner)
        .arg(path)
        .status()
        .expect("run chown");
    assert!(
        status.success(),
        "chown -R {owner} {} failed",
        path.display()
    );
}

/// `msmtpd` on a reserved port, piping every message to `deliver.sh` (written beside Dovecot's
/// configuration): Dovecot's LDA once per recipient, then one line in `deliveries.log`. An LDA
/// failure is a temporary failure (exit 75), which msmtpd reports to Dovecot as such.
fn start_msmtpd(root: &Path) -> (u16, Supervised) {
    let msmtpd = PathBuf::from("/usr/bin/msmtpd");
    assert!(
        msmtpd.is_file(),
        "/usr/bin/msmtpd not found: install Debian's msmtp-mta (apt-get install -y --no-install-recommends msmtp msmtp-mta)"
    );
    let lda = Path::new("/usr/lib/dovecot/dovecot-lda");
    assert!(lda.is_file(), "{} not found. {INSTALL_HINT}", lda.display());
    let r = root.display();
    let script = root.join("deliver.sh");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
# Written by tests/support/dovecot.rs: msmtpd runs `deliver.sh <envelope-from> -- <recipient>...`.
from="$1"; shift; [ "$1" = "--" ] && shift
tmp=$(mktemp {r}/tmp-mail.XXXXXX) || exit 75
cat > "$tmp" || exit 75
for rcpt in "$@"; do
  {lda} -c {r}/dovecot.conf -f "$from" -d "$rcpt" < "$tmp" || {{ rm -f "$tmp"; exit 75; }}
done
rm -f "$tmp"
echo "$from $*" >> {r}/deliveries.log
"#,
            lda = lda.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let port = reserve_ports(1)[0];
    let process = Supervised::spawn(
        "msmtpd",
        &msmtpd,
        &[
            "--interface=127.0.0.1".into(),
            format!("--port={port}"),
            format!("--command={} %F --", script.display()),
            format!("--log={r}/msmtpd.log"),
        ],
        &[],
        root.join("msmtpd.out"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "msmtpd did not listen on {port} within 10 s: {}",
            std::fs::read_to_string(root.join("msmtpd.out")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (port, process)
}

/// Dovecot's submission service connects to its relay right after a successful AUTH and answers 421
/// when it cannot. This stand-in greets, answers EHLO, NOOP, RSET and QUIT, and refuses every
/// transaction: the tests never send mail. It runs on a thread and ends with the test binary.
fn start_relay_stand_in() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay stand-in");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || relay_session(stream));
        }
    });
    port
}

fn relay_session(stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let _ = writer.write_all(b"220 relay.test ESMTP stand-in that accepts no mail\r\n");
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let verb = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-relay.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n",
            "HELO" => b"250 relay.test\r\n",
            "NOOP" | "RSET" => b"250 2.0.0 OK\r\n",
            "QUIT" => {
                let _ = writer.write_all(b"221 2.0.0 Bye\r\n");
                return;
            }
            "MAIL" | "RCPT" | "DATA" | "BDAT" => {
                b"554 5.7.1 this relay stand-in accepts no mail\r\n"
            }
            _ => b"500 5.5.2 unknown command\r\n",
        };
        if writer.write_all(reply).is_err() {
            return;
        }
    }
}
