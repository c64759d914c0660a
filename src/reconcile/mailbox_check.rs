//! When and how a reconcile checks the mailbox, and what the result does to the status.
//!
//! The check runs after every token change and at least every `spec.mailbox.checkInterval`. Results
//! are kept in memory per integration (with the token they were made with), so a storm of
//! reconciles does not become a storm of logins, and a check that did not change its result writes
//! nothing. Checks run with bounded concurrency and a timeout each, off the refresh path
//! ([`MailboxChecker::state_in_background`]): a reconcile never waits for a mail server; it reports
//! the last finished check, and a finished check brings a reconcile of its own.

use crate::sync::LockExt as _;
use crate::{
    api::{
        DEFAULT_CA_KEY, GrantType, MailIntegration, MailIntegrationSpec, MailIntegrationStatus,
        ProviderKind, SaslMechanismName, condition,
    },
    mailbox::{self, CheckProtocol, CheckTarget, MailboxError, SaslMechanism},
    metrics::{Metrics, RefreshLabels},
    secret::SecretValue,
};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use sha2::Digest;
use std::{collections::HashMap, sync::Mutex, time::Duration};

/// The outcome of checking all of an integration's servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MailboxState {
    /// No mail server is known (OIDC without spec.mailbox.server): nothing to check.
    NotConfigured,
    /// Every server accepted the token; the message says which.
    Connected(String),
    /// A server refused; `reason` is MailboxAuthFailed, MailboxUnreachable, TLSError or ProtocolError.
    Failed { reason: String, message: String },
}

#[derive(Clone)]
struct Cached {
    token: String,
    at: Timestamp,
    state: MailboxState,
}

impl Cached {
    /// Whether this result still answers: made with this token and spec, less than an interval ago.
    fn answers(&self, fingerprint: &str, mi: &MailIntegration, now: Timestamp) -> bool {
        self.token == fingerprint
            && now.duration_since(self.at)
                < SignedDuration::try_from(mi.spec.check_interval()).unwrap_or(SignedDuration::MAX)
    }
}

/// A check to make (see [`MailboxChecker::start`]).
struct Check<'t> {
    targets: Vec<CheckTarget>,
    token: &'t SecretValue,
    key: String,
    fingerprint: String,
}

/// Checks mailboxes with bounded concurrency and remembers the results.
pub struct MailboxChecker {
    /// The checks that run at once, of which one namespace holds at most its share (see
    /// [`super::share::NamespaceQueue`]).
    permits: std::sync::Arc<super::share::NamespaceQueue>,
    cache: Mutex<HashMap<String, Cached>>,
    /// UIDs whose check runs in the background now (one at a time per integration).
    running: Mutex<std::collections::HashSet<String>>,
    timeout: Duration,
    metrics: std::sync::Arc<Metrics>,
    allowed: std::sync::Arc<crate::mailbox::allowed::AllowedHosts>,
}

impl MailboxChecker {
    pub fn new(concurrency: usize, timeout: Duration, metrics: std::sync::Arc<Metrics>) -> Self {
        Self {
            permits: super::share::NamespaceQueue::new(
                concurrency,
                super::share::share_of(concurrency, super::share::DEFAULT_MAX_NAMESPACE_SHARE),
            ),
            cache: Mutex::default(),
            running: Mutex::default(),
            timeout,
            metrics,
            allowed: Default::default(),
        }
    }

    /// Let one namespace run at most `percent` % of the checks that run at once (at least one).
    pub fn with_namespace_share(mut self, concurrency: usize, percent: u8) -> Self {
        self.permits = super::share::NamespaceQueue::new(
            concurrency,
            super::share::share_of(concurrency.max(1), percent),
        );
        self
    }

    /// Connect only to these mail hosts (see [`crate::mailbox::allowed`]).
    pub fn with_allowed_hosts(mut self, allowed: crate::mailbox::allowed::AllowedHosts) -> Self {
        self.allowed = std::sync::Arc::new(allowed);
        self
    }

    /// Why the check must not send this integration's token anywhere, if so: a server outside the
    /// allowed hosts, or a grant of another account than the mailbox (after an edit of the spec).
    pub fn refusal(&self, mi: &MailIntegration, targets: &[CheckTarget]) -> Option<MailboxState> {
        if let Some(t) = targets.iter().find(|t| !self.allowed.allows(&t.host)) {
            return Some(MailboxState::Failed {
                reason: crate::reason::Reason::MailboxHostNotAllowed.as_str().into(),
                message: format!(
                    "the mail server {} is not one the operator may connect to (allowed: {}): use the provider's own mail host, or ask the operator's admin to add it to --mailbox-allowed-hosts",
                    crate::reason::clean(&t.host),
                    self.allowed.describe()
                ),
            });
        }
        // The account that must have signed in: the mailbox's own, or its delegate's for a shared
        // mailbox (spec.oauth.signInAccount).
        let expected = mi.spec.sign_in_account();
        if let Some(account) = mi
            .status
            .as_ref()
            .and_then(|s| s.account.as_deref())
            .filter(|a| !a.eq_ignore_ascii_case(expected))
        {
            let of = if expected.eq_ignore_ascii_case(mi.spec.mailbox.address.trim()) {
                format!("the mailbox {expected}")
            } else {
                format!("{expected} (spec.oauth.signInAccount)")
            };
            return Some(MailboxState::Failed {
                reason: crate::reason::Reason::AccountMismatch.as_str().into(),
                message: format!(
                    "the grant is of {account}, not of {of}: its token is not sent to the mail server; sign in again as {expected} (status.signIn.url)"
                ),
            });
        }
        None
    }

    /// What every check starts with: the servers to check with which token, or (`Err`) what to
    /// report without a check (nothing to check, a refusal, no valid token).
    fn start<'t>(
        &self,
        mi: &MailIntegration,
        token: Option<(&'t SecretValue, Timestamp)>,
        now: Timestamp,
    ) -> Result<Check<'t>, Option<MailboxState>> {
        let targets = targets(mi);
        if targets.is_empty() {
            return Err(Some(MailboxState::NotConfigured));
        }
        if let Some(refused) = self.refusal(mi, &targets) {
            return Err(Some(refused));
        }
        let Some((token, _)) = token.filter(|(_, expires_at)| *expires_at > now) else {
            return Err(None);
        };
        // A new token or a new spec (servers, mechanism, address) means a new check.
        let fingerprint = format!(
            "{}/{}",
            Self::fingerprint(token),
            mi.metadata.generation.unwrap_or(0)
        );
        Ok(Check {
            targets,
            token,
            key: mi.uid().unwrap_or_default(),
            fingerprint,
        })
    }

    /// A short fingerprint of the token, so the cache can tell a new token without keeping it.
    fn fingerprint(token: &SecretValue) -> String {
        let digest = sha2::Sha256::digest(token.expose().as_bytes());
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// The state to report: a fresh check when the token changed or the last check is older than
    /// the interval, the cached result otherwise. `None` when there is no valid token to check with.
    pub async fn state(
        &self,
        mi: &MailIntegration,
        token: Option<(&SecretValue, Timestamp)>,
        extra_ca_pem: Option<Vec<u8>>,
        now: Timestamp,
    ) -> Option<MailboxState> {
        let Check {
            targets,
            token,
            key,
            fingerprint,
        } = match self.start(mi, token, now) {
            Ok(check) => check,
            Err(report) => return report,
        };
        if let Some(c) = self.cache.locked().get(&key)
            && c.answers(&fingerprint, mi, now)
        {
            return Some(c.state.clone());
        }
        let state = {
            let _permit = self
                .permits
                .acquire(&mi.namespace().unwrap_or_default())
                .await?;
            let state = self.check_all(&targets, token, extra_ca_pem).await;
            explain_app_only(&mi.spec, state)
        };
        self.count(&state);
        self.cache.locked().insert(
            key,
            Cached {
                token: fingerprint,
                at: now,
                state: state.clone(),
            },
        );
        Some(state)
    }

    /// Like [`Self::state`], but a check that is needed runs in the background (bounded by the
    /// same permits) and calls `done` when its result is in the cache; meanwhile the last finished
    /// result is returned, or what the status says (`MailboxConnected` as last reported), so that a
    /// refresh is never held by a mail server and its status write does not flap Ready.
    pub fn state_in_background(
        self: &std::sync::Arc<Self>,
        mi: &MailIntegration,
        token: Option<(&SecretValue, Timestamp)>,
        extra_ca_pem: Option<Vec<u8>>,
        now: Timestamp,
        done: impl FnOnce() + Send + 'static,
    ) -> Option<MailboxState> {
        let Check {
            targets,
            token,
            key,
            fingerprint,
        } = match self.start(mi, token, now) {
            Ok(check) => check,
            Err(report) => return report,
        };
        let reported = reported_state(mi.status.as_ref());
        let last = {
            let mut cache = self.cache.locked();
            if !cache.contains_key(&key)
                && let Some(state) = reported.clone()
                && let Some(at) = resumed_check_time(mi, now)
            {
                // First look at this integration since the process started: the status says when
                // it was last checked and with what result, so the check is due from then.
                cache.insert(
                    key.clone(),
                    Cached {
                        token: fingerprint.clone(),
                        at,
                        state,
                    },
                );
            }
            cache.get(&key).cloned()
        };
        if let Some(c) = &last
            && c.answers(&fingerprint, mi, now)
        {
            return Some(c.state.clone());
        }
        if self.running.locked().insert(key.clone()) {
            let this = self.clone();
            let token = token.clone();
            let spec = mi.spec.clone();
            let namespace = mi.namespace().unwrap_or_default();
            tokio::spawn(async move {
                if let Some(_permit) = this.permits.acquire(&namespace).await {
                    let state = this.check_all(&targets, &token, extra_ca_pem).await;
                    let state = explain_app_only(&spec, state);
                    this.count(&state);
                    this.cache.locked().insert(
                        key.clone(),
                        Cached {
                            token: fingerprint,
                            at: Timestamp::now(),
                            state,
                        },
                    );
                }
                this.running.locked().remove(&key);
                done();
            });
        }
        last.map(|c| c.state).or(reported)
    }

    fn count(&self, state: &MailboxState) {
        let (result, reason) = match state {
            MailboxState::Failed { reason, .. } => ("failure", reason.clone()),
            _ => ("success", "Connected".to_owned()),
        };
        self.metrics
            .mailbox_checks
            .get_or_create(&RefreshLabels {
                result: result.into(),
                reason,
            })
            .inc();
    }

    /// When the last finished check of this integration ran, if one did in this process (or was
    /// taken over from the status at start).
    pub fn checked_at(&self, mi: &MailIntegration) -> Option<Timestamp> {
        self.cache
            .locked()
            .get(&mi.uid().unwrap_or_default())
            .map(|c| c.at)
    }

    /// When the cached result expires (the next periodic check), if there is one.
    pub fn next_check_at(&self, mi: &MailIntegration) -> Option<Timestamp> {
        let interval = mi.spec.check_interval();
        self.cache
            .locked()
            .get(&mi.uid().unwrap_or_default())
            .map(|c| crate::time::after(c.at, interval))
    }

    pub fn forget(&self, uid: &str) {
        self.cache.locked().remove(uid);
    }

    /// Checks running in the background now.
    pub fn running(&self) -> usize {
        self.running.locked().len()
    }

    async fn check_all(
        &self,
        targets: &[CheckTarget],
        token: &SecretValue,
        ca: Option<Vec<u8>>,
    ) -> MailboxState {
        let mut connected = Vec::new();
        for t in targets {
            // The host is on the list (see `refusal`); the addresses it resolves to are checked
            // when connecting.
            let mut target = t
                .clone()
                .with_timeout(self.timeout)
                .with_allowed(self.allowed.clone());
            if let Some(pem) = &ca {
                target = target.with_extra_ca_pem(pem.clone());
            }
            match mailbox::check(&target, token).await {
                Ok(ok) => connected.push(format!(
                    "{} {}:{}: {ok}",
                    protocol_name(t.protocol),
                    t.host,
                    t.port
                )),
                Err(e) => return failed(t, &e),
            }
        }
        MailboxState::Connected(connected.join("; "))
    }
}

fn protocol_name(p: CheckProtocol) -> &'static str {
    match p {
        CheckProtocol::Imap => "IMAP",
        CheckProtocol::Pop3 => "POP3",
        CheckProtocol::Smtp => "SMTP",
    }
}

fn failed(t: &CheckTarget, e: &MailboxError) -> MailboxState {
    if t.protocol == CheckProtocol::Smtp
        && matches!(e, MailboxError::AuthFailed { .. })
        && crate::mailbox::is_smtp_auth_disabled(e.detail())
    {
        // Not the token: Exchange Online has SMTP AUTH switched off for the mailbox or tenant.
        let reason = crate::reason::Reason::SmtpClientAuthenticationDisabled;
        return MailboxState::Failed {
            reason: reason.as_str().to_owned(),
            message: format!(
                "SMTP {}:{}: {}. {}",
                t.host,
                t.port,
                e.detail(),
                reason
                    .hint()
                    .replace("<mailbox>", &crate::reason::outside_text(&t.username, 254))
            ),
        };
    }
    let hint = match e.reason() {
        "MailboxAuthFailed" => {
            " The mail server refused the access token (it cannot say why: see Authorized for the grant). If the grant is fine, check the granted scopes and that the account may use this protocol (IMAP, POP or SMTP AUTH can be disabled per account)."
        }
        "MailboxUnreachable" => {
            " Check spec.mailbox host and port, and that the operator may reach the server."
        }
        "TLSError" => {
            " Check the server's certificate, or put the CA that signed it into spec.mailbox.caSecretRef."
        }
        _ => "",
    };
    MailboxState::Failed {
        reason: e.reason().to_owned(),
        message: format!(
            "{} {}:{}: {}.{hint}",
            protocol_name(t.protocol),
            t.host,
            t.port,
            e.detail()
        ),
    }
}

/// A mail server that refuses an app-only token the provider has just issued (the token is valid:
/// the token endpoint gave it out for this client) is not refusing the token but the app: for
/// Exchange Online, the app's service principal is not registered in Exchange, or has no
/// permission on the mailbox. Say which commands are likely missing.
pub fn explain_app_only(spec: &MailIntegrationSpec, state: MailboxState) -> MailboxState {
    let MailboxState::Failed { reason, message } = state else {
        return state;
    };
    use crate::reason::Reason;
    if reason != Reason::MailboxAuthFailed.as_str()
        || spec.grant_type() != GrantType::ClientCredentials
    {
        return MailboxState::Failed { reason, message };
    }
    // The mail server's own words come first; the generic hint about scopes does not apply.
    let said = message
        .split(". The mail server refused the access token")
        .next()
        .unwrap_or_default();
    let mailbox = spec.mailbox.address.trim();
    let secret = &spec.oauth.client_secret_ref.name;
    let fix = match spec.provider {
        ProviderKind::Microsoft => format!(
            "the app is likely not registered in Exchange Online or has no access to this mailbox. In Exchange Online PowerShell run New-ServicePrincipal -AppId <client ID in Secret {secret:?}> -ObjectId <object ID of the Enterprise Application> (Entra ID → Enterprise applications; not the App registration's object ID), then Add-MailboxPermission -Identity {mailbox} -User <the service principal's ID> -AccessRights FullAccess (or assign an RBAC for Applications role scoped to the mailbox). Changes can take up to an hour to apply."
        ),
        ProviderKind::Google | ProviderKind::Oidc => format!(
            "the mail server does not let this app open {mailbox}: give the app (client ID in Secret {secret:?}) access to the mailbox at the mail server."
        ),
    };
    MailboxState::Failed {
        reason: Reason::AppMailboxAccessMissing.as_str().to_owned(),
        message: format!(
            "{said}. The provider issued a valid app-only token, but the mail server refused it for {mailbox}: {fix}"
        ),
    }
}

/// The servers to check: the read protocol's server and, when set, SMTP submission.
pub fn targets(mi: &MailIntegration) -> Vec<CheckTarget> {
    let spec = &mi.spec;
    let user = spec.mailbox.address.clone();
    let mechanism = match spec.mailbox.mechanism.unwrap_or_default() {
        SaslMechanismName::XOAuth2 => SaslMechanism::XOAuth2,
        SaslMechanismName::OAuthBearer => SaslMechanism::OAuthBearer,
    };
    let mut out = Vec::new();
    if let Some(server) = crate::provider::mail_server(spec)
        && let Ok(t) =
            CheckTarget::for_server(&server, CheckProtocol::from(spec.protocol()), user.clone())
    {
        out.push(t.with_mechanism(mechanism));
    }
    if let Some(smtp) = &spec.mailbox.smtp
        && let Ok(t) = CheckTarget::for_server(smtp, CheckProtocol::Smtp, user)
    {
        out.push(t.with_mechanism(mechanism));
    }
    out
}

/// The mailbox state as the status last reported it (its MailboxConnected condition).
pub fn reported_state(status: Option<&MailIntegrationStatus>) -> Option<MailboxState> {
    let c = status?
        .conditions
        .iter()
        .find(|c| c.type_ == condition::MAILBOX_CONNECTED)?;
    Some(match c.status.as_str() {
        "True" => MailboxState::Connected(c.message.clone()),
        _ => MailboxState::Failed {
            reason: c.reason.clone(),
            message: c.message.clone(),
        },
    })
}

/// When to count the last check as made, for an integration this process has not checked yet: the
/// status's `mailboxCheckedAt` when it describes the current spec (MailboxConnected of this
/// generation) and is less than an interval old. One older than that (or after the status was
/// written by an operator that did not record it) is due, but not all at once: a restart with
/// thousands of overdue integrations spreads their checks over one interval, as they would run
/// anyway, instead of queueing them all behind each other. `None`: check now.
pub fn resumed_check_time(mi: &MailIntegration, now: Timestamp) -> Option<Timestamp> {
    let status = mi.status.as_ref()?;
    status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::MAILBOX_CONNECTED)
        .filter(|c| {
            c.observed_generation.is_some() && c.observed_generation == mi.metadata.generation
        })?;
    let checked = status.mailbox_checked_at.as_ref()?.0;
    let interval = mi.spec.check_interval();
    // A time in the future (a clock step, or a hand edit) counts as now.
    let checked = checked.min(now);
    if crate::time::after(checked, interval) > now {
        return Some(checked);
    }
    let spread = interval.mul_f64(rand::random_range(0.0..1.0));
    Some(crate::time::after(
        crate::time::before(now, interval),
        spread,
    ))
}

/// Key of the CA bundle in the CA Secret.
pub fn ca_key(mi: &MailIntegration) -> Option<(&str, &str)> {
    mi.spec
        .mailbox
        .ca_secret_ref
        .as_ref()
        .map(|r| (r.name.as_str(), r.key.as_deref().unwrap_or(DEFAULT_CA_KEY)))
}

/// Put the mailbox state into the status: the MailboxConnected condition, and Ready, which is only
/// True when the mailbox accepts the token too. `None` (no check possible now) keeps what was there.
pub fn apply(
    status: &mut MailIntegrationStatus,
    state: Option<&MailboxState>,
    generation: Option<i64>,
    now: Timestamp,
) {
    let Some(state) = state else { return };
    let (ok, reason, message) = match state {
        MailboxState::NotConfigured => {
            status
                .conditions
                .retain(|c| c.type_ != condition::MAILBOX_CONNECTED);
            return;
        }
        MailboxState::Connected(m) => (true, "Connected", m.clone()),
        MailboxState::Failed { reason, message } => (false, reason.as_str(), message.clone()),
    };
    let transition = match status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::MAILBOX_CONNECTED)
    {
        Some(p) if p.status == if ok { "True" } else { "False" } => p.last_transition_time.clone(),
        _ => Time(now),
    };
    let new = Condition {
        type_: condition::MAILBOX_CONNECTED.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: crate::reason::outside_text(&message, crate::reason::MAX_MESSAGE),
        observed_generation: generation,
        last_transition_time: transition,
    };
    match status
        .conditions
        .iter_mut()
        .find(|c| c.type_ == condition::MAILBOX_CONNECTED)
    {
        Some(c) => *c = new,
        None => {
            let at = status
                .conditions
                .iter()
                .position(|c| c.type_ == condition::RECONCILING)
                .unwrap_or(status.conditions.len());
            status.conditions.insert(at, new);
        }
    }
    if !ok
        && let Some(ready) = status
            .conditions
            .iter_mut()
            .find(|c| c.type_ == condition::READY && c.status == "True")
    {
        ready.status = "False".into();
        ready.reason = reason.into();
        ready.message =
            format!("the token is valid, but the mailbox refuses the connection: {message}");
        ready.last_transition_time = Time(now);
    }
}

#[cfg(test)]
mod tests;
