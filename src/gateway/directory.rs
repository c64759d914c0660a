//! What the gateway knows: the gateway Secrets (label `mailintegration.dev/gateway=true`) of the
//! watched namespaces, parsed into [`Entry`]s and indexed by credential username. No other Secret
//! is ever listed or read (the watch is label-selected), and the raw Secrets are not kept: each is
//! parsed as it arrives and only the entry stays.
//!
//! A Secret speaks only for its own namespace and integration: its `gateway.json` must name the
//! Secret's namespace and the integration whose `<integration>-gateway` it is, and each app's
//! username must be `<namespace>/<integration>/<app>`; a Secret in one namespace can therefore
//! never define or shadow a credential of another. A Secret over [`MAX_SECRET_BYTES`], or one that
//! does not parse, is ignored with a log line (and its integration then has no entry: fail closed).
//!
//! Sessions hold a [`CancellationToken`] per (username, password verifier, protocol); whenever the
//! Secrets change, and every [`SWEEP_PERIOD`] for passwords whose `retiresAt` passed, the tokens
//! of credentials that no longer hold are cancelled and their sessions end.
//!
//! kube-runtime's `watcher` (with the reflector's event model: `Init`/`InitApply`/`InitDone`
//! relists, `Apply`/`Delete`) rather than a `reflector::Store`: a store keeps the raw Secrets;
//! here only the parsed entries are kept.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio_util::sync::CancellationToken;

use super::{
    config::{
        self, ACCESS_TOKEN_KEY, CONFIG_KEY, EXPIRY_KEY, GATEWAY_LABEL, GATEWAY_SECRET_SUFFIX,
        GatewayConfig,
    },
    metrics::{GatewayMetrics, KindLabels},
    session::{Entry, Protocol},
};
use crate::reconcile::watches::{scoped_api, watch_backoff};
use crate::secret::SecretValue;

/// The largest gateway Secret read (keys and values together); larger ones are ignored.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;
/// How often retired passwords are looked for (their sessions end within this of `retiresAt`).
pub const SWEEP_PERIOD: Duration = Duration::from_secs(15);

/// Why a gateway Secret was ignored (the metric's `kind` and the log line).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    #[error("the Secret holds {0} bytes, more than the gateway reads ({MAX_SECRET_BYTES})")]
    TooLarge(usize),
    #[error("the Secret has no {CONFIG_KEY} key")]
    NoConfig,
    #[error("{CONFIG_KEY} does not parse: {0}")]
    Malformed(String),
    #[error("{CONFIG_KEY} names {0}, not this Secret's namespace and integration")]
    Foreign(String),
}

impl Ignored {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "too_large",
            Self::NoConfig => "no_config",
            Self::Malformed(_) => "malformed",
            Self::Foreign(_) => "foreign",
        }
    }
}

/// Parse one gateway Secret into an entry (pure). Apps whose username is not theirs are dropped.
pub fn parse_secret(namespace: &str, name: &str, secret: &Secret) -> Result<Entry, Ignored> {
    let empty = std::collections::BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let size = data.iter().fold(0usize, |n, (k, v)| {
        n.saturating_add(k.len()).saturating_add(v.0.len())
    });
    if size > MAX_SECRET_BYTES {
        return Err(Ignored::TooLarge(size));
    }
    let raw = data.get(CONFIG_KEY).ok_or(Ignored::NoConfig)?;
    let mut config: GatewayConfig = serde_json::from_slice(&raw.0)
        .map_err(|e| Ignored::Malformed(crate::reason::outside_text(&e.to_string(), 200)))?;
    let expected_name = format!("{}{GATEWAY_SECRET_SUFFIX}", config.integration);
    if config.namespace != namespace || expected_name != name {
        return Err(Ignored::Foreign(crate::reason::outside_text(
            &format!("{}/{}", config.namespace, config.integration),
            300,
        )));
    }
    let (ns, mi) = (config.namespace.clone(), config.integration.clone());
    config
        .apps
        .retain(|app| app.username == config::username(&ns, &mi, &app.name));
    let access_token = data
        .get(ACCESS_TOKEN_KEY)
        .and_then(|v| SecretValue::from_bytes(&v.0))
        .unwrap_or_default();
    let expiry = data
        .get(EXPIRY_KEY)
        .and_then(|v| std::str::from_utf8(&v.0).ok())
        .and_then(|s| s.trim().parse::<Timestamp>().ok());
    Ok(Entry {
        config: Arc::new(config),
        access_token,
        expiry,
    })
}

/// A session's hold: which credential it logged in with.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseKey {
    pub username: String,
    /// The `sha256` of the verifier the password matched.
    pub verifier: String,
    pub protocol: Protocol,
}

#[derive(Default)]
struct Inner {
    /// (namespace, Secret name) -> entry.
    secrets: HashMap<(String, String), Arc<Entry>>,
    /// username -> entry.
    users: HashMap<String, Arc<Entry>>,
    leases: HashMap<LeaseKey, CancellationToken>,
}

impl Inner {
    fn insert(&mut self, key: (String, String), entry: Arc<Entry>) {
        self.remove(&key);
        for app in &entry.config.apps {
            self.users.insert(app.username.clone(), entry.clone());
        }
        self.secrets.insert(key, entry);
    }

    fn remove(&mut self, key: &(String, String)) {
        if let Some(old) = self.secrets.remove(key) {
            for app in &old.config.apps {
                if self
                    .users
                    .get(&app.username)
                    .is_some_and(|e| Arc::ptr_eq(e, &old))
                {
                    self.users.remove(&app.username);
                }
            }
        }
    }

    /// Whether the credential of `key` still holds at `now`.
    fn holds(&self, key: &LeaseKey, now: Timestamp) -> bool {
        self.users
            .get(&key.username)
            .and_then(|e| e.config.app(&key.username))
            .is_some_and(|app| {
                app.protocols.contains(&key.protocol)
                    && app
                        .verifiers
                        .iter()
                        .any(|v| v.sha256 == key.verifier && v.retires_at.is_none_or(|at| at > now))
            })
    }

    /// Cancel the leases of credentials that vanished; how many.
    fn revoke_vanished(&mut self, now: Timestamp) -> usize {
        let gone: Vec<LeaseKey> = self
            .leases
            .keys()
            .filter(|k| !self.holds(k, now))
            .cloned()
            .collect();
        for key in &gone {
            if let Some(token) = self.leases.remove(key) {
                token.cancel();
            }
        }
        gone.len()
    }
}

/// A Secret's (namespace, name) and its entry (`None`: ignored).
type ParsedSecret = ((String, String), Option<Arc<Entry>>);

/// The gateway's directory of credentials.
pub struct Directory {
    inner: RwLock<Inner>,
    ready: AtomicBool,
    metrics: Arc<GatewayMetrics>,
    /// Bumped at every change of the entries (parked sessions look again at their token).
    changes: tokio::sync::watch::Sender<u64>,
}

impl Directory {
    pub fn new(metrics: Arc<GatewayMetrics>) -> Self {
        Self {
            inner: RwLock::default(),
            ready: AtomicBool::new(false),
            metrics,
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Told of every change of the entries (a Secret applied, deleted or relisted, a sweep).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether every watch has listed once.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The entry holding `username`.
    pub fn lookup(&self, username: &str) -> Option<Arc<Entry>> {
        self.read().users.get(username).cloned()
    }

    /// The token a session of `key` watches; cancelled at once if the credential no longer holds.
    pub fn lease(&self, key: LeaseKey) -> CancellationToken {
        let mut inner = self.write();
        let holds = inner.holds(&key, Timestamp::now());
        let token = inner.leases.entry(key).or_default().clone();
        if !holds {
            token.cancel();
        }
        token
    }

    /// Integrations known.
    pub fn len(&self) -> usize {
        self.read().secrets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn parse(&self, secret: &Secret) -> Option<ParsedSecret> {
        let ns = secret.metadata.namespace.clone()?;
        let name = secret.metadata.name.clone()?;
        let entry = match parse_secret(&ns, &name, secret) {
            Ok(entry) => Some(Arc::new(entry)),
            Err(e) => {
                tracing::warn!(namespace = %ns, secret = %name, reason = e.kind(), error = %e,
                    "ignoring a gateway Secret");
                self.metrics
                    .secrets_ignored
                    .get_or_create(&KindLabels {
                        kind: e.kind().into(),
                    })
                    .inc();
                None
            }
        };
        Some(((ns, name), entry))
    }

    /// A Secret was added or changed.
    pub fn apply(&self, secret: &Secret) {
        let Some((key, entry)) = self.parse(secret) else {
            return;
        };
        tracing::debug!(namespace = %key.0, secret = %key.1, usable = entry.is_some(),
            "gateway Secret changed");
        let mut inner = self.write();
        match entry {
            Some(entry) => inner.insert(key, entry),
            None => inner.remove(&key),
        }
        self.changed(&mut inner);
    }

    /// A Secret was deleted.
    pub fn delete(&self, secret: &Secret) {
        let (Some(ns), Some(name)) = (&secret.metadata.namespace, &secret.metadata.name) else {
            return;
        };
        let mut inner = self.write();
        inner.remove(&(ns.clone(), name.clone()));
        self.changed(&mut inner);
    }

    /// A watch listed `listed` (already parsed) in `scope` (a namespace, or all): what it did not
    /// list is gone.
    fn replace(&self, scope: Option<&str>, listed: Vec<ParsedSecret>) {
        let mut inner = self.write();
        let keep: HashSet<(String, String)> = listed
            .iter()
            .filter(|(_, e)| e.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        let stale: Vec<(String, String)> = inner
            .secrets
            .keys()
            .filter(|(ns, _)| scope.is_none_or(|s| s == ns))
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for key in &stale {
            inner.remove(key);
        }
        for (key, entry) in listed {
            if let Some(entry) = entry {
                inner.insert(key, entry);
            }
        }
        self.changed(&mut inner);
    }

    fn changed(&self, inner: &mut Inner) {
        self.metrics
            .integrations
            .set(i64::try_from(inner.secrets.len()).unwrap_or(i64::MAX));
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        let n = inner.revoke_vanished(Timestamp::now());
        if n > 0 {
            tracing::info!(
                credentials = n,
                "ending the sessions of credentials that vanished"
            );
        }
    }

    /// End the sessions of passwords whose `retiresAt` passed.
    pub fn sweep(&self) {
        let mut inner = self.write();
        self.changed(&mut inner);
    }

    /// Watch the gateway Secrets of `namespaces` (all when empty) until the process ends.
    pub async fn run(self: Arc<Self>, client: Client, namespaces: Vec<String>) {
        let mut scopes: Vec<Option<String>> = namespaces.into_iter().map(Some).collect();
        scopes.sort();
        scopes.dedup();
        if scopes.is_empty() {
            scopes.push(None);
        }
        let selector = format!("{GATEWAY_LABEL}=true");
        let streams = scopes.iter().map(|scope| {
            let api: Api<Secret> = scoped_api(client.clone(), scope.as_deref());
            let scope = scope.clone();
            watcher(api, watcher::Config::default().labels(&selector))
                .backoff(watch_backoff())
                .map(move |event| (scope.clone(), event))
                .boxed()
        });
        let mut events = futures::stream::select_all(streams);
        let mut pending: HashMap<Option<String>, Vec<_>> = HashMap::new();
        let mut listed: HashSet<Option<String>> = HashSet::new();
        let sweep = {
            let me = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_PERIOD);
                loop {
                    tick.tick().await;
                    me.sweep();
                }
            })
        };
        while let Some((scope, event)) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => {
                    pending.insert(scope, Vec::new());
                }
                Ok(watcher::Event::InitApply(secret)) => {
                    if let Some(parsed) = self.parse(&secret) {
                        pending.entry(scope).or_default().push(parsed);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    let list = pending.remove(&scope).unwrap_or_default();
                    tracing::info!(
                        namespace = scope.as_deref().unwrap_or("(all)"),
                        secrets = list.len(),
                        "listed the gateway Secrets"
                    );
                    self.replace(scope.as_deref(), list);
                    listed.insert(scope);
                    if listed.len() == scopes.len() {
                        self.ready.store(true, Ordering::Relaxed);
                    }
                }
                Ok(watcher::Event::Apply(secret)) => self.apply(&secret),
                Ok(watcher::Event::Delete(secret)) => self.delete(&secret),
                Err(e) => {
                    tracing::warn!(error = %e, "watching the gateway Secrets failed; retrying")
                }
            }
        }
        sweep.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::TlsMode,
        gateway::config::{GatewayAppConfig, UpstreamServer, Verifier},
    };
    use k8s_openapi::ByteString;

    pub(crate) fn config(ns: &str, mi: &str, password: &str) -> GatewayConfig {
        GatewayConfig {
            namespace: ns.into(),
            integration: mi.into(),
            uid: "uid".into(),
            mailbox: "box@example.com".into(),
            mechanism: Default::default(),
            imap: Some(UpstreamServer {
                host: "127.0.0.1".into(),
                port: 993,
                tls: TlsMode::Implicit,
            }),
            pop3: None,
            smtp: None,
            ca_pem: None,
            max_message_bytes: 1000,
            apps: vec![GatewayAppConfig {
                name: "app".into(),
                username: config::username(ns, mi, "app"),
                protocols: vec![Protocol::Imap],
                send_as: vec![],
                verifiers: vec![Verifier::new(b"salt", &SecretValue::new(password))],
            }],
        }
    }

    fn secret(ns: &str, name: &str, config: &GatewayConfig) -> Secret {
        let mut s = Secret::default();
        s.metadata.namespace = Some(ns.into());
        s.metadata.name = Some(name.into());
        s.data = Some(
            [
                (
                    CONFIG_KEY.to_owned(),
                    ByteString(serde_json::to_vec(config).unwrap()),
                ),
                (ACCESS_TOKEN_KEY.to_owned(), ByteString(b"tok".to_vec())),
                (
                    EXPIRY_KEY.to_owned(),
                    ByteString(b"2999-01-01T00:00:00Z".to_vec()),
                ),
            ]
            .into(),
        );
        s
    }

    #[test]
    fn a_secret_speaks_only_for_its_own_namespace_and_integration() {
        let c = config("team", "inbox", "pw");
        assert!(
            parse_secret(
                "team",
                "inbox-gateway",
                &secret("team", "inbox-gateway", &c)
            )
            .is_ok()
        );
        let e = parse_secret(
            "other",
            "inbox-gateway",
            &secret("other", "inbox-gateway", &c),
        )
        .unwrap_err();
        assert_eq!(e.kind(), "foreign");
        let e = parse_secret("team", "x-gateway", &secret("team", "x-gateway", &c)).unwrap_err();
        assert_eq!(e.kind(), "foreign");
        // An app claiming another integration's username is dropped.
        let mut c2 = c.clone();
        c2.apps[0].username = "team/other/app".into();
        let entry = parse_secret(
            "team",
            "inbox-gateway",
            &secret("team", "inbox-gateway", &c2),
        )
        .unwrap();
        assert!(entry.config.apps.is_empty());
    }

    #[test]
    fn oversized_and_malformed_secrets_are_ignored() {
        let mut s = secret("team", "inbox-gateway", &config("team", "inbox", "pw"));
        s.data
            .as_mut()
            .unwrap()
            .insert("junk".into(), ByteString(vec![b'x'; MAX_SECRET_BYTES]));
        assert_eq!(
            parse_secret("team", "inbox-gateway", &s)
                .unwrap_err()
                .kind(),
            "too_large"
        );
        s.data = Some([(CONFIG_KEY.to_owned(), ByteString(b"{".to_vec()))].into());
        assert_eq!(
            parse_secret("team", "inbox-gateway", &s)
                .unwrap_err()
                .kind(),
            "malformed"
        );
    }

    #[test]
    fn sessions_of_a_vanished_credential_are_revoked() {
        let d = Directory::new(Arc::default());
        let c = config("team", "inbox", "pw");
        d.apply(&secret("team", "inbox-gateway", &c));
        assert!(d.lookup("team/inbox/app").is_some());
        let key = LeaseKey {
            username: "team/inbox/app".into(),
            verifier: c.apps[0].verifiers[0].sha256.clone(),
            protocol: Protocol::Imap,
        };
        let token = d.lease(key.clone());
        assert!(!token.is_cancelled());
        // A token refresh (same credentials) keeps the session.
        d.apply(&secret("team", "inbox-gateway", &c));
        assert!(!token.is_cancelled());
        // The protocol taken away ends it.
        let mut c2 = c.clone();
        c2.apps[0].protocols = vec![Protocol::Smtp];
        d.apply(&secret("team", "inbox-gateway", &c2));
        assert!(token.is_cancelled());
        // A lease of a credential that does not hold is born cancelled; deletion revokes.
        d.apply(&secret("team", "inbox-gateway", &c));
        let token = d.lease(key.clone());
        assert!(!token.is_cancelled());
        d.delete(&secret("team", "inbox-gateway", &c));
        assert!(token.is_cancelled());
        assert!(d.lookup("team/inbox/app").is_none());
        // A relist without the Secret removes it too.
        d.apply(&secret("team", "inbox-gateway", &c));
        let token = d.lease(key);
        d.replace(Some("team"), vec![]);
        assert!(token.is_cancelled());
    }
}
