//! The decision of a reconcile, as pure functions of what was observed and the clock:
//! [`decide`] says what to do, [`status_after`] says what the status must then be.

use super::observed::{ClientSecretProblem, Conflict, Observed};
use crate::api::{
    MailIntegration, MailIntegrationStatus, REFRESH_REQUESTED_ANNOTATION, SignInStatus, condition,
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use std::time::Duration;

/// Condition reasons the decision itself produces (provider and mailbox reasons come from their
/// modules as strings).
pub mod reasons {
    pub const READY: &str = "Ready";
    pub const AUTHORIZED: &str = "Authorized";
    pub const TOKEN_VALID: &str = "TokenValid";
    pub const TOKEN_EXPIRED: &str = "TokenExpired";
    pub const NO_TOKEN: &str = "NoToken";
    pub const SIGN_IN_REQUIRED: &str = "SignInRequired";
    pub const SUSPENDED: &str = "Suspended";
    pub const REFRESHING: &str = "Refreshing";
    pub const IDLE: &str = "Idle";
    pub const NOT_STALLED: &str = "AsExpected";
}

pub use super::schedule::{
    DEFAULT_MIN_REFRESH_INTERVAL, Pace, Window, jitter, lifetime_too_short, refresh_due_at,
    refresh_window,
};

/// Transient-failure memory kept by the operator between reconciles, and in the status
/// (`status.providerBackoff`, see [`super::remembered`]): a restart waits it out too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    pub failures: u32,
    /// No provider call before this instant.
    pub not_before: Option<Timestamp>,
}

/// Why a refresh is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshCause {
    /// No usable access token is published yet (or it was lost).
    NoToken,
    /// The published token reached the refresh time its status announced.
    Due,
    /// A new value of the refresh-requested-at annotation.
    Requested,
    /// The previous permanent failure's inputs changed: try again.
    InputsChanged,
    /// A transient failure's backoff is over: try again.
    Retry,
}

/// What a reconcile must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Call the provider's token endpoint.
    Refresh(RefreshCause),
    /// No provider call: the status says why (`Outcome`), come back after `requeue` if any.
    Hold(Outcome),
}

/// What happened, as far as the status is concerned.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The client Secret is missing, incomplete or not marked for the operator.
    ClientSecret(ClientSecretProblem),
    /// A grant or token Secret under the integration's names is not its own: not used, not written.
    Conflict(Conflict),
    /// There is no grant: somebody must sign in.
    SignInRequired,
    /// Refreshing is suspended by spec.suspend.
    Suspended,
    /// The published token is valid and not due yet.
    Idle,
    /// The last permanent failure still stands: its inputs did not change.
    StillFailed,
    /// Waiting out a transient failure's backoff.
    BackingOff,
    /// The token endpoint answered with a new access token.
    Refreshed {
        expires_at: Timestamp,
        /// The second the next refresh is announced for (see [`super::slots`]).
        next_refresh_at: Timestamp,
        account: Option<String>,
        scopes: Vec<String>,
    },
    /// A failure that only a human can fix (invalid_grant, invalid_client, ...).
    PermanentFailure { reason: String, message: String },
    /// A failure that retrying may fix (5xx, timeouts, 429, ...); retry after `retry_in`.
    TransientFailure {
        reason: String,
        message: String,
        retry_in: Duration,
    },
    /// The provider rotated the refresh token and the new one could not be stored: it is held in
    /// memory only. Not Ready, whatever the published token's validity, until it is stored.
    GrantNotStored { message: String, retry_in: Duration },
    /// Nothing to report yet: the grant changed under the refresh (or another process holds it);
    /// come back after this long and decide again. The status stays as it is.
    Requeue(Duration),
}

/// The fingerprint of what a permanent failure waits to change.
pub fn inputs_fingerprint(o: &Observed<'_>) -> String {
    format!(
        "generation={};client={};grant={}",
        o.integration.metadata.generation.unwrap_or(0),
        o.client_version.as_deref().unwrap_or("-"),
        o.grant
            .as_ref()
            .and_then(|g| g.resource_version.as_deref())
            .unwrap_or("-")
    )
}

fn requested_refresh(mi: &MailIntegration) -> Option<&str> {
    mi.annotations()
        .get(REFRESH_REQUESTED_ANNOTATION)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// Decide what this reconcile must do, with the default [`Pace`] and no provider call known but
/// the last refresh the status records.
pub fn decide(o: &Observed<'_>, backoff: Backoff) -> Action {
    decide_paced(o, backoff, None, Pace::default())
}

/// Decide what this reconcile must do. `last_call`: when this process last called the token
/// endpoint for the integration (whatever the answer). A refresh that the pace does not allow yet
/// (a refresh request, a lost token Secret, changed inputs: anything but the retry after a
/// transient failure, which its backoff paces) is deferred, not dropped: [`Outcome::Requeue`] until
/// the interval since the last call (or the last refresh in the status) is over, the status left
/// as it is, so that a request stays pending and is honoured then.
pub fn decide_paced(
    o: &Observed<'_>,
    backoff: Backoff,
    last_call: Option<Timestamp>,
    pace: Pace,
) -> Action {
    let action = decide_unpaced(o, backoff, pace);
    let Action::Refresh(cause) = action else {
        return action;
    };
    if cause == RefreshCause::Retry {
        return action;
    }
    let last_refresh = o
        .integration
        .status
        .as_ref()
        .and_then(|s| s.last_refresh_time.as_ref())
        .map(|t| t.0);
    let last = match (last_call, last_refresh) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    match pace.next_call_at(last).filter(|at| o.now < *at) {
        // Never longer than the interval: a last refresh time in the future (a clock gone wrong,
        // an edited status) does not park the integration.
        Some(at) => Action::Hold(Outcome::Requeue(
            crate::time::until(o.now, at)
                .min(pace.min_refresh_interval)
                .max(Duration::from_secs(1)),
        )),
        None => action,
    }
}

fn decide_unpaced(o: &Observed<'_>, backoff: Backoff, pace: Pace) -> Action {
    let mi = o.integration;
    let status = mi.status.clone().unwrap_or_default();
    if let Some(outcome) = name_too_long(mi) {
        return Action::Hold(outcome);
    }
    if let Err(problem) = &o.client {
        return Action::Hold(Outcome::ClientSecret(problem.clone()));
    }
    if let Some(conflict) = &o.conflict {
        return Action::Hold(Outcome::Conflict(conflict.clone()));
    }
    // App-only grants (client credentials) have no grant Secret: the client alone gets tokens.
    if o.grant.is_none() && mi.spec.interactive() {
        return Action::Hold(Outcome::SignInRequired);
    }
    if mi.spec.suspended() {
        return Action::Hold(Outcome::Suspended);
    }
    let requested =
        requested_refresh(mi).is_some_and(|v| status.last_refresh_request.as_deref() != Some(v));
    // A grant lost with a cut-off refresh is spent: presenting it again, even on request, would
    // be a second use of a rotated-out refresh token. Only a new grant moves it.
    let spent = find_condition(&status, condition::STALLED).is_some_and(|c| {
        c.status == "True" && c.reason == crate::reason::Reason::GrantLostInFlight.as_str()
    });
    if let Some(failed) = &status.failed_inputs
        && *failed == inputs_fingerprint(o)
        && (!requested || spent)
    {
        return Action::Hold(Outcome::StillFailed);
    }
    // A refresh request waits out a transient failure's backoff (and the provider's Retry-After)
    // like everything else: it stays pending and is honoured once the backoff is over.
    if backoff.not_before.is_some_and(|t| o.now < t) {
        return Action::Hold(Outcome::BackingOff);
    }
    if requested {
        return Action::Refresh(RefreshCause::Requested);
    }
    if status.failed_inputs.is_some() {
        return Action::Refresh(RefreshCause::InputsChanged);
    }
    if backoff.failures > 0 {
        return Action::Refresh(RefreshCause::Retry);
    }
    match &o.token {
        None => Action::Refresh(RefreshCause::NoToken),
        Some(t) if o.now >= refresh_due_at(mi, t.expires_at, pace) => {
            Action::Refresh(RefreshCause::Due)
        }
        Some(_) => Action::Hold(Outcome::Idle),
    }
}

/// The longest name a MailIntegration may have: its Secrets carry it as a label value.
pub const MAX_NAME: usize = 63;

/// A MailIntegration stored before the CRD refused names longer than [`MAX_NAME`]: none of its
/// Secrets could be labelled, so nothing is done for it.
fn name_too_long(mi: &MailIntegration) -> Option<Outcome> {
    let name = mi.metadata.name.as_deref().unwrap_or_default();
    (name.len() > MAX_NAME).then(|| Outcome::PermanentFailure {
        reason: crate::reason::Reason::NameTooLong.as_str().into(),
        message: format!(
            "the name is {} characters long, and the operator labels its Secrets with it (mailintegration.dev/integration), where at most {MAX_NAME} fit: recreate the MailIntegration under a shorter name",
            name.len()
        ),
    })
}

/// How often a Secret conflict is looked at again (it is also re-checked on every spec change).
pub const CONFLICT_RECHECK: Duration = Duration::from_secs(5 * 60);

/// A sign-in link is renewed this long before it expires.
const LINK_RENEWAL: Duration = Duration::from_secs(5 * 60);

/// When to reconcile again after `outcome` (on top of watch events). `None`: wait for a change.
pub fn requeue_after(
    o: &Observed<'_>,
    status: &MailIntegrationStatus,
    outcome: &Outcome,
    backoff: Backoff,
) -> Option<Duration> {
    let until = |t: Timestamp| {
        Some(
            Duration::try_from(t.duration_since(o.now))
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_secs(1)),
        )
    };
    match outcome {
        Outcome::Idle | Outcome::Refreshed { .. } => {
            status.next_refresh_time.as_ref().and_then(|t| until(t.0))
        }
        Outcome::BackingOff => backoff.not_before.and_then(until),
        Outcome::TransientFailure { retry_in, .. } | Outcome::GrantNotStored { retry_in, .. } => {
            Some((*retry_in).max(Duration::from_secs(1)))
        }
        Outcome::Requeue(d) => Some((*d).max(Duration::from_secs(1))),
        // Sign-in links expire: renew the link shortly before.
        Outcome::SignInRequired => status
            .sign_in
            .as_ref()
            .and_then(|s| until(crate::time::before(s.expires_at.0, LINK_RENEWAL))),
        // The conflicting Secret is not watched (it is not the operator's): look again now and then.
        Outcome::Conflict(_) => Some(CONFLICT_RECHECK),
        Outcome::ClientSecret(_)
        | Outcome::Suspended
        | Outcome::StillFailed
        | Outcome::PermanentFailure { .. } => {
            // The published token still expires: say so on time; an offered sign-in link is renewed.
            let expiry = o
                .token
                .as_ref()
                .filter(|t| t.expires_at > o.now)
                .and_then(|t| until(t.expires_at));
            let link = status
                .sign_in
                .as_ref()
                .and_then(|s| until(crate::time::before(s.expires_at.0, LINK_RENEWAL)));
            match (expiry, link) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
    }
}

fn cond(type_: &str, ok: bool, reason: &str, message: impl Into<String>) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        // Every condition message passes here: whatever outside text it quotes, it stays bounded.
        message: crate::reason::outside_text(&message.into(), crate::reason::MAX_MESSAGE),
        observed_generation: None,
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

/// Ready as the published token's validity says: True (reason Ready) while it is valid, else
/// False with `otherwise`.
fn ready_while_valid(token_valid: bool, otherwise: &str, message: impl Into<String>) -> Condition {
    let reason = if token_valid {
        reasons::READY
    } else {
        otherwise
    };
    cond(condition::READY, token_valid, reason, message)
}

fn fmt_time(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The status after `outcome`. Fields the outcome does not speak of keep their previous values, and
/// a condition whose status did not change keeps its lastTransitionTime, so that an idle reconcile
/// yields exactly the stored status (and no write). With the default [`Pace`].
pub fn status_after(
    o: &Observed<'_>,
    outcome: &Outcome,
    sign_in: Option<SignInStatus>,
) -> MailIntegrationStatus {
    status_after_paced(o, outcome, sign_in, Pace::default())
}

/// [`status_after`] with the operator's [`Pace`]: the refresh time it announces respects it, and a
/// token that lives shorter than it is reported ([`Reason::TokenLifetimeTooShort`]).
///
/// [`Reason::TokenLifetimeTooShort`]: crate::reason::Reason::TokenLifetimeTooShort
pub fn status_after_paced(
    o: &Observed<'_>,
    outcome: &Outcome,
    sign_in: Option<SignInStatus>,
    pace: Pace,
) -> MailIntegrationStatus {
    let mi = o.integration;
    let prev = mi.status.clone().unwrap_or_default();
    let mut s = prev.clone();
    s.observed_generation = mi.metadata.generation;
    s.sign_in = None;
    // A sign-in failure of an older spec (e.g. before spec.mailbox.address was fixed) is stale.
    if s.last_sign_in_failure.as_ref().is_some_and(|f| {
        f.observed_generation.is_some() && f.observed_generation != mi.metadata.generation
    }) {
        s.last_sign_in_failure = None;
    }
    if let Some(v) = requested_refresh(mi)
        && matches!(
            outcome,
            Outcome::Refreshed { .. }
                | Outcome::PermanentFailure { .. }
                | Outcome::TransientFailure { .. }
        )
    {
        s.last_refresh_request = Some(v.to_owned());
    }

    let token_expiry = match outcome {
        Outcome::Refreshed { expires_at, .. } => Some(*expires_at),
        _ => o.token.as_ref().map(|t| t.expires_at),
    };
    let token_valid = token_expiry.is_some_and(|e| e > o.now);
    let token_cond = match token_expiry {
        Some(e) if e > o.now => cond(
            condition::TOKEN_VALID,
            true,
            reasons::TOKEN_VALID,
            format!("access token valid until {}", fmt_time(e)),
        ),
        Some(e) => cond(
            condition::TOKEN_VALID,
            false,
            reasons::TOKEN_EXPIRED,
            format!("access token expired at {}", fmt_time(e)),
        ),
        None => cond(
            condition::TOKEN_VALID,
            false,
            reasons::NO_TOKEN,
            "no access token has been issued yet",
        ),
    };
    s.access_token_expires_at = token_expiry.map(Time);
    s.next_refresh_time = match outcome {
        Outcome::Suspended => None,
        Outcome::Refreshed {
            next_refresh_at, ..
        } => Some(Time(*next_refresh_at)),
        _ => token_expiry.map(|e| Time(refresh_due_at(mi, e, pace))),
    };

    let link = sign_in.clone();
    let mut conditions = vec![token_cond];
    let mut stalled = cond(condition::STALLED, false, reasons::NOT_STALLED, "");
    let mut reconciling = cond(condition::RECONCILING, false, reasons::IDLE, "");
    let prev_authorized = prev
        .conditions
        .iter()
        .find(|c| c.type_ == condition::AUTHORIZED)
        .cloned();
    let authorized_ok = |account: &Option<String>| {
        let msg = match account {
            Some(a) => format!("grant of {a} is usable"),
            None => "grant is usable".to_owned(),
        };
        cond(condition::AUTHORIZED, true, reasons::AUTHORIZED, msg)
    };
    let (authorized, ready) = match outcome {
        Outcome::Conflict(c) => {
            let reason = c.reason.as_str();
            stalled = cond(condition::STALLED, true, reason, c.message.clone());
            let a = prev_authorized
                .unwrap_or_else(|| cond(condition::AUTHORIZED, false, reason, c.message.clone()));
            (a, cond(condition::READY, false, reason, c.message.clone()))
        }
        Outcome::ClientSecret(problem) => {
            let reason = problem.reason().as_str();
            stalled = cond(condition::STALLED, true, reason, problem.to_string());
            let a = cond(condition::AUTHORIZED, false, reason, problem.to_string());
            let r = cond(condition::READY, false, reason, problem.to_string());
            (a, r)
        }
        Outcome::SignInRequired => {
            s.sign_in = sign_in;
            if let Some(f) = s.last_sign_in_failure.as_ref() {
                // The sign-in server recorded why the last attempt failed: say that, and where to
                // retry.
                sign_in_failure_conditions(f, s.sign_in.as_ref())
            } else {
                // An account in the status: there was a grant, and its Secret is gone.
                let no_grant = match &s.account {
                    Some(_) => format!(
                        "the grant Secret {:?} is gone (deleted); the operator does not create a grant from memory",
                        mi.grant_secret_name()
                    ),
                    None => "no grant yet".to_owned(),
                };
                let msg = match &s.sign_in {
                    Some(link) => format!(
                        "{no_grant}: open status.signIn.url to sign in as {} (link valid until {})",
                        mi.spec.sign_in_account(),
                        fmt_time(link.expires_at.0)
                    ),
                    None => format!(
                        "{no_grant}: sign in as {} through the operator's sign-in page, or put a refresh_token into Secret {:?}",
                        mi.spec.sign_in_account(),
                        mi.grant_secret_name()
                    ),
                };
                (
                    cond(
                        condition::AUTHORIZED,
                        false,
                        reasons::SIGN_IN_REQUIRED,
                        &msg,
                    ),
                    cond(condition::READY, false, reasons::SIGN_IN_REQUIRED, &msg),
                )
            }
        }
        Outcome::Suspended => {
            let a = prev_authorized.unwrap_or_else(|| authorized_ok(&s.account));
            let msg = if token_valid {
                "refreshing is suspended (spec.suspend); the published token is still valid"
            } else {
                "refreshing is suspended (spec.suspend) and no valid token is published"
            };
            (
                a,
                cond(condition::READY, token_valid, reasons::SUSPENDED, msg),
            )
        }
        Outcome::Idle | Outcome::Refreshed { .. } => {
            if let Outcome::Refreshed {
                account, scopes, ..
            } = outcome
            {
                s.last_refresh_time = Some(Time(o.now));
                if account.is_some() {
                    s.account.clone_from(account);
                }
                if !scopes.is_empty() {
                    s.scopes.clone_from(scopes);
                }
                s.failed_inputs = None;
            }
            // A usable grant: an earlier failed sign-in no longer matters.
            s.last_sign_in_failure = None;
            let a = authorized_ok(&s.account);
            if let Some(ready) = too_short_condition(&s, token_expiry, pace) {
                (a, ready)
            } else {
                let msg = match (token_expiry, &s.next_refresh_time) {
                    (Some(e), Some(n)) => format!(
                        "access token valid until {}; next refresh at {}",
                        fmt_time(e),
                        fmt_time(n.0)
                    ),
                    _ => "access token published".to_owned(),
                };
                (
                    a,
                    ready_while_valid(token_valid, reasons::TOKEN_EXPIRED, msg),
                )
            }
        }
        Outcome::StillFailed => {
            // Keep what the failure said; only token validity moves with the clock.
            let keep = |t: &str| prev.conditions.iter().find(|c| c.type_ == t).cloned();
            stalled = keep(condition::STALLED).unwrap_or(stalled);
            let a = keep(condition::AUTHORIZED)
                .unwrap_or_else(|| cond(condition::AUTHORIZED, false, "Unknown", ""));
            let r = keep(condition::READY)
                .unwrap_or_else(|| cond(condition::READY, false, "Unknown", ""));
            (a, r)
        }
        Outcome::PermanentFailure { reason, message } => {
            s.failed_inputs = Some(inputs_fingerprint(o));
            stalled = cond(condition::STALLED, true, reason, message.clone());
            (
                cond(condition::AUTHORIZED, false, reason, message.clone()),
                cond(condition::READY, false, reason, message.clone()),
            )
        }
        Outcome::TransientFailure {
            reason,
            message,
            retry_in,
        } => {
            let msg = format!("{message}; retrying in {}s", retry_in.as_secs().max(1));
            reconciling = cond(condition::RECONCILING, true, reason, msg.clone());
            let a = prev_authorized
                .unwrap_or_else(|| cond(condition::AUTHORIZED, false, reason, msg.clone()));
            let ready_msg = match token_expiry.filter(|_| token_valid) {
                Some(e) => format!(
                    "the published token stays valid until {}, but refreshing fails: {msg}",
                    fmt_time(e)
                ),
                None => msg.clone(),
            };
            (
                a,
                ready_while_valid(token_valid, reason.as_str(), ready_msg),
            )
        }
        Outcome::GrantNotStored { message, retry_in } => {
            let reason = crate::reason::Reason::GrantNotStored.as_str();
            let msg = format!(
                "{message}; the provider's new refresh token is held only in this operator's memory, retrying in {}s",
                retry_in.as_secs().max(1)
            );
            reconciling = cond(condition::RECONCILING, true, reason, msg.clone());
            let a = prev_authorized
                .unwrap_or_else(|| cond(condition::AUTHORIZED, false, reason, msg.clone()));
            (a, cond(condition::READY, false, reason, msg))
        }
        Outcome::BackingOff | Outcome::Requeue(_) => {
            let keep = |t: &str| prev.conditions.iter().find(|c| c.type_ == t).cloned();
            reconciling = keep(condition::RECONCILING).unwrap_or(reconciling);
            let a = keep(condition::AUTHORIZED)
                .unwrap_or_else(|| cond(condition::AUTHORIZED, false, "Unknown", ""));
            let mut r = keep(condition::READY)
                .unwrap_or_else(|| cond(condition::READY, false, "Unknown", ""));
            if !token_valid && r.status == "True" {
                r = cond(
                    condition::READY,
                    false,
                    reasons::TOKEN_EXPIRED,
                    "the access token expired while refreshing fails",
                );
            }
            (a, r)
        }
    };
    // A grant that only a new sign-in can fix (revoked, expired, another account...): offer the link,
    // and report a failed attempt at that sign-in like above.
    let (authorized, ready) = match (outcome, &link) {
        (Outcome::PermanentFailure { .. } | Outcome::StillFailed, Some(_)) => {
            s.sign_in = link;
            match &s.last_sign_in_failure {
                Some(f) => sign_in_failure_conditions(f, s.sign_in.as_ref()),
                None => (authorized, ready),
            }
        }
        _ => (authorized, ready),
    };
    conditions.extend([ready, authorized, reconciling, stalled]);
    // Conditions this decision does not own (MailboxConnected) are carried over.
    for c in &prev.conditions {
        if !conditions.iter().any(|n| n.type_ == c.type_) {
            conditions.push(c.clone());
        }
    }
    for c in &mut conditions {
        c.observed_generation = mi.metadata.generation;
        c.last_transition_time = match prev.conditions.iter().find(|p| p.type_ == c.type_) {
            Some(p) if p.status == c.status => p.last_transition_time.clone(),
            _ => Time(o.now),
        };
    }
    conditions.sort_by_key(|c| condition_order(&c.type_));
    s.conditions = conditions;
    s
}

/// Ready for a token that the provider issued for less than the pace's interval (see
/// [`lifetime_too_short`]): not Ready, though published, and the same message all the interval
/// long (made of the status's own times), so that idle reconciles write nothing.
fn too_short_condition(
    s: &MailIntegrationStatus,
    token_expiry: Option<Timestamp>,
    pace: Pace,
) -> Option<Condition> {
    let issued = s.last_refresh_time.as_ref()?.0;
    let expiry = token_expiry?;
    if !lifetime_too_short(issued, expiry, pace) {
        return None;
    }
    let lifetime = crate::time::until(issued, expiry).as_secs();
    let interval = pace.min_refresh_interval.as_secs();
    Some(cond(
        condition::READY,
        false,
        crate::reason::Reason::TokenLifetimeTooShort.as_str(),
        format!(
            "the provider issued an access token valid for {lifetime}s, not longer than the operator's lowest refresh interval ({interval}s): the token is published and refreshed every {interval}s, and is expired in between; configure longer access tokens at the provider (or ask the operator's admin about --min-refresh-interval)"
        ),
    ))
}

/// Authorized and Ready after a failed sign-in (`status.lastSignInFailure`).
fn sign_in_failure_conditions(
    f: &crate::api::SignInFailure,
    link: Option<&SignInStatus>,
) -> (Condition, Condition) {
    let retry = match link {
        Some(link) => format!(
            "; open status.signIn.url to try again (link valid until {})",
            fmt_time(link.expires_at.0)
        ),
        None => String::new(),
    };
    let msg = format!(
        "sign-in at {} failed: {}{retry}",
        fmt_time(f.time.0),
        f.message.trim_end_matches('.')
    );
    (
        cond(condition::AUTHORIZED, false, &f.reason, &msg),
        cond(condition::READY, false, &f.reason, &msg),
    )
}

/// Permanent failures that only a new sign-in fixes.
pub fn sign_in_fixes(reason: &str) -> bool {
    use crate::reason::Reason as R;
    [
        R::GrantRevoked,
        R::GrantExpiredInactive,
        R::TestingAppGrantExpired,
        R::ReauthRequired,
        R::ScopeMissing,
        R::UnauthorizedClient,
        R::AccountMismatch,
        R::GrantBoundElsewhere,
        R::GrantLostInFlight,
        R::GrantSecretImmutable,
    ]
    .iter()
    .any(|r| r.as_str() == reason)
}

/// Whether the resource needs a sign-in after `outcome`: no grant yet, or a grant that only a new
/// sign-in fixes (then `status.signIn.url` is offered too).
pub fn needs_sign_in(outcome: &Outcome, prev: Option<&MailIntegrationStatus>) -> bool {
    match outcome {
        Outcome::SignInRequired => true,
        Outcome::PermanentFailure { reason, .. } => sign_in_fixes(reason),
        Outcome::StillFailed => prev
            .and_then(|s| find_condition(s, condition::STALLED))
            .is_some_and(|c| c.status == "True" && sign_in_fixes(&c.reason)),
        _ => false,
    }
}

fn condition_order(t: &str) -> usize {
    [
        condition::READY,
        condition::AUTHORIZED,
        condition::TOKEN_VALID,
        condition::MAILBOX_CONNECTED,
        condition::RECONCILING,
        condition::STALLED,
    ]
    .iter()
    .position(|x| *x == t)
    .unwrap_or(usize::MAX)
}

/// The condition of `type_` in `status`, if any.
pub fn find_condition<'a>(status: &'a MailIntegrationStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
