//! `kubectl mailint status NAME`: what is known about one MailIntegration, as one value (printed as
//! JSON or YAML) and as one screen of text. Built from the resource, the metadata of its Secrets and
//! its events: pure functions, tested without a server.

use crate::api::{GRANT_SECRET_SUFFIX, MailIntegration, OAUTH_CLIENT_LABEL, condition};
use crate::reason::Reason;
use jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

/// One integration's status report.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub namespace: String,
    pub name: String,
    pub provider: String,
    pub mailbox: String,
    pub suspended: bool,
    /// The spec generation the status describes is not the current one: the operator has not caught up.
    pub status_outdated: bool,
    pub conditions: Vec<ConditionReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token_expires_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mailbox_check: Option<MailboxCheckReport>,
    pub secrets: Vec<SecretReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sign_in: Option<SignInReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_sign_in_failure: Option<ConditionReport>,
    /// The apps' gateway credentials (spec.gateway).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gateway: Vec<super::gateway::GatewayCredentialReport>,
    pub events: Vec<EventReport>,
}

/// A condition, with the reason's "what to do" when the reason is one of the operator's.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionReport {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub what_to_do: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
}

/// The MailboxConnected condition, in short.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MailboxCheckReport {
    pub connected: bool,
    pub reason: String,
    pub message: String,
    /// Since when the result is what it is (the condition's lastTransitionTime).
    pub since: Timestamp,
}

/// A Secret the integration involves: metadata only, never its data.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretReport {
    /// client | grant | token | ca | gateway | app
    pub role: String,
    pub name: String,
    pub exists: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<Timestamp>,
    /// What is wrong with it, if something visible from its metadata is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The metadata of a Secret as the CLI reads it (`None` when it does not exist).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SecretMeta {
    pub labels: std::collections::BTreeMap<String, String>,
    pub created: Option<Timestamp>,
    /// The UIDs of its owners.
    pub owners: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SignInReport {
    pub url: String,
    pub expires_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventReport {
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub message: String,
    pub count: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Timestamp>,
}

/// The Secrets an integration involves, in the order the report lists them: (role, name).
pub fn involved_secrets(mi: &MailIntegration) -> Vec<(&'static str, String)> {
    let mut v = vec![
        ("client", mi.spec.oauth.client_secret_ref.name.clone()),
        ("grant", format!("{}{GRANT_SECRET_SUFFIX}", mi.name_any())),
        ("token", mi.spec.token_secret.name.clone()),
    ];
    if let Some(ca) = &mi.spec.mailbox.ca_secret_ref {
        v.push(("ca", ca.name.clone()));
    }
    if let Some(gateway) = &mi.spec.gateway {
        let name = mi.name_any();
        v.push((
            "gateway",
            crate::gateway::credentials::secrets::gateway_secret_name(&name),
        ));
        for app in &gateway.apps {
            v.push((
                "app",
                crate::gateway::credentials::secrets::app_secret_name(&name, &app.name),
            ));
        }
    }
    v
}

fn secret_report(
    mi: &MailIntegration,
    role: &str,
    name: String,
    meta: Option<&SecretMeta>,
) -> SecretReport {
    let uid = mi.uid().unwrap_or_default();
    let problem = match (role, meta) {
        ("client", None) => Some(format!(
            "missing: create it with the OAuth client's ID and secret ({})",
            Reason::ClientSecretNotFound
        )),
        ("ca", None) => {
            Some("missing: create it with the mail server's CA certificates (PEM)".into())
        }
        ("grant", None) => Some("none yet: sign in, or bring a refresh token".into()),
        ("token", None) => Some("not written yet: no access token so far".into()),
        ("gateway" | "app", None) => Some("not written yet".into()),
        ("gateway" | "app", Some(m)) if !m.owners.contains(&uid) => Some(format!(
            "not created by the operator for this integration ({})",
            Reason::GatewaySecretConflict
        )),
        ("client" | "ca", Some(m))
            if m.labels.get(OAUTH_CLIENT_LABEL).map(String::as_str) != Some("true") =>
        {
            Some(format!(
                "not marked for the operator: kubectl label secret {name} -n {} {OAUTH_CLIENT_LABEL}=true",
                mi.namespace().unwrap_or_default()
            ))
        }
        ("token", Some(m)) if !m.owners.contains(&uid) => Some(format!(
            "not created by the operator for this integration ({})",
            Reason::TokenSecretConflict
        )),
        ("grant", Some(m))
            if !m.owners.contains(&uid)
                && m.labels.get(crate::api::INTEGRATION_LABEL) != Some(&mi.name_any()) =>
        {
            Some(format!(
                "belongs to something else ({})",
                Reason::GrantSecretConflict
            ))
        }
        _ => None,
    };
    SecretReport {
        role: role.into(),
        name,
        exists: meta.is_some(),
        created: meta.and_then(|m| m.created),
        problem,
    }
}

/// Conditions in the order a human reads them.
const CONDITION_ORDER: &[&str] = &[
    condition::READY,
    condition::AUTHORIZED,
    condition::TOKEN_VALID,
    condition::MAILBOX_CONNECTED,
    condition::RECONCILING,
    condition::STALLED,
];

fn condition_rank(t: &str) -> usize {
    CONDITION_ORDER
        .iter()
        .position(|c| *c == t)
        .unwrap_or(CONDITION_ORDER.len())
}

/// "What to do" for a reason, left out when there is nothing to do.
fn what_to_do(reason: &str, status: &str, type_: &str) -> Option<String> {
    let healthy = match type_ {
        condition::RECONCILING | condition::STALLED => status == "False",
        _ => status == "True",
    };
    if healthy {
        return None;
    }
    Reason::parse(reason).map(|r| r.hint().to_owned())
}

impl StatusReport {
    /// The report of `mi`, given the metadata of the Secrets of [`involved_secrets`] (same order)
    /// and its events (any order; the newest ten are kept).
    pub fn build(
        mi: &MailIntegration,
        secrets: &[Option<SecretMeta>],
        events: Vec<EventReport>,
    ) -> Self {
        let status = mi.status.clone().unwrap_or_default();
        let mut conditions: Vec<ConditionReport> = status
            .conditions
            .iter()
            .map(|c| ConditionReport {
                type_: c.type_.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                what_to_do: what_to_do(&c.reason, &c.status, &c.type_),
                since: Some(c.last_transition_time.0),
            })
            .collect();
        conditions.sort_by_key(|c| condition_rank(&c.type_));
        let mailbox_check = status
            .conditions
            .iter()
            .find(|c| c.type_ == condition::MAILBOX_CONNECTED)
            .map(|c| MailboxCheckReport {
                connected: c.status == "True",
                reason: c.reason.clone(),
                message: c.message.clone(),
                since: c.last_transition_time.0,
            });
        let secrets = involved_secrets(mi)
            .into_iter()
            .enumerate()
            .map(|(i, (role, name))| {
                secret_report(mi, role, name, secrets.get(i).and_then(Option::as_ref))
            })
            .collect();
        let mut events = events;
        events.sort_by_key(|e| std::cmp::Reverse(e.last_seen));
        events.truncate(10);
        StatusReport {
            namespace: mi.namespace().unwrap_or_default(),
            name: mi.name_any(),
            provider: serde_json::to_value(mi.spec.provider)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            mailbox: mi.spec.mailbox.address.clone(),
            suspended: mi.spec.suspend.unwrap_or(false),
            status_outdated: status.observed_generation != mi.metadata.generation,
            conditions,
            account: status.account.clone(),
            scopes: status.scopes.clone(),
            access_token_expires_at: status.access_token_expires_at.as_ref().map(|t| t.0),
            last_refresh_time: status.last_refresh_time.as_ref().map(|t| t.0),
            next_refresh_time: status.next_refresh_time.as_ref().map(|t| t.0),
            mailbox_check,
            secrets,
            sign_in: status.sign_in.as_ref().map(|s| SignInReport {
                url: s.url.clone(),
                expires_at: s.expires_at.0,
            }),
            last_sign_in_failure: status
                .last_sign_in_failure
                .as_ref()
                .map(|f| ConditionReport {
                    type_: "SignIn".into(),
                    status: "False".into(),
                    reason: f.reason.clone(),
                    message: f.message.clone(),
                    what_to_do: Reason::parse(&f.reason).map(|r| r.hint().to_owned()),
                    since: Some(f.time.0),
                }),
            gateway: super::gateway::credentials(mi),
            events,
        }
    }

    /// The Ready condition's (status, reason), or ("Unknown", "") before the operator reported.
    pub fn ready(&self) -> (&str, &str) {
        self.conditions
            .iter()
            .find(|c| c.type_ == condition::READY)
            .map(|c| (c.status.as_str(), c.reason.as_str()))
            .unwrap_or(("Unknown", ""))
    }
}

/// ANSI colours, or nothing when the output is not a terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Style {
    pub colour: bool,
}

impl Style {
    fn paint(self, code: &str, text: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
    pub fn bold(self, t: &str) -> String {
        self.paint("1", t)
    }
    pub fn good(self, t: &str) -> String {
        self.paint("32", t)
    }
    pub fn bad(self, t: &str) -> String {
        self.paint("31", t)
    }
    pub fn warn(self, t: &str) -> String {
        self.paint("33", t)
    }
    pub fn dim(self, t: &str) -> String {
        self.paint("2", t)
    }
    /// A condition status in its colour (healthy green, unhealthy red, unknown yellow).
    pub fn status(self, type_: &str, status: &str) -> String {
        let healthy = match type_ {
            condition::RECONCILING | condition::STALLED => status == "False",
            _ => status == "True",
        };
        match status {
            "Unknown" => self.warn(status),
            _ if healthy => self.good(status),
            _ => self.bad(status),
        }
    }
}

/// "in 52m", "3m ago", "now": a duration in its largest two units.
pub fn relative(t: Timestamp, now: Timestamp) -> String {
    let d = t.duration_since(now);
    let text = short_duration(d.unsigned_abs());
    if d.as_secs() == 0 {
        "now".into()
    } else if d.is_negative() {
        format!("{text} ago")
    } else {
        format!("in {text}")
    }
}

/// 1d2h, 3h5m, 4m10s, 9s.
pub fn short_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86_400, (s / 3600) % 24, (s / 60) % 60, s % 60);
    if days > 0 {
        format!("{days}d{hours}h")
    } else if hours > 0 {
        format!("{hours}h{mins}m")
    } else if mins > 0 {
        format!("{mins}m{secs}s")
    } else {
        format!("{secs}s")
    }
}

fn at(t: Timestamp, now: Timestamp) -> String {
    format!(
        "{} ({})",
        t.strftime("%Y-%m-%dT%H:%M:%SZ"),
        relative(t, now)
    )
}

/// The one-screen text of a report.
pub fn render(r: &StatusReport, now: Timestamp, style: Style) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    let (ready, reason) = r.ready();
    let headline = match ready {
        "True" => style.good("Ready"),
        "False" => style.bad(&format!("Not ready: {reason}")),
        _ => style.warn("Not reported yet"),
    };
    line(format!(
        "{} {}/{}: {headline}",
        style.bold("MailIntegration"),
        r.namespace,
        r.name
    ));
    line(format!(
        "Provider:   {}   Mailbox: {}",
        r.provider, r.mailbox
    ));
    if r.suspended {
        line(style.warn(
            "Suspended:  spec.suspend is true: no refresh, no mailbox check (kubectl mailint resume NAME)",
        ));
    }
    if r.status_outdated {
        line(style.warn(
            "Note:       the status describes an older generation of the spec; the operator has not caught up yet",
        ));
    }
    line(format!(
        "Account:    {}",
        r.account.as_deref().unwrap_or("(nobody signed in yet)")
    ));
    if !r.scopes.is_empty() {
        line(format!("Scopes:     {}", r.scopes.join(" ")));
    }
    line(String::new());
    line(style.bold("Conditions:"));
    if r.conditions.is_empty() {
        line("  (none: the operator has not reconciled this resource yet; is it running and watching this namespace?)".into());
    }
    for c in &r.conditions {
        let since = c
            .since
            .map(|t| style.dim(&format!(" (since {})", relative(t, now))))
            .unwrap_or_default();
        line(format!(
            "  {:<17} {:<7} {}{since}",
            c.type_,
            style.status(&c.type_, &c.status),
            c.reason
        ));
        if !c.message.is_empty() {
            line(format!("      {}", c.message));
        }
        if let Some(todo) = &c.what_to_do {
            line(format!("      {} {todo}", style.bold("What to do:")));
        }
    }
    line(String::new());
    line(style.bold("Access token:"));
    match r.access_token_expires_at {
        Some(t) if t > now => line(format!("  Expires:       {}", at(t, now))),
        Some(t) => line(format!(
            "  Expires:       {}",
            style.bad(&format!("EXPIRED {}", at(t, now)))
        )),
        None => line("  Expires:       (no access token yet)".into()),
    }
    if let Some(t) = r.last_refresh_time {
        line(format!("  Last refresh:  {}", at(t, now)));
    }
    match r.next_refresh_time {
        Some(t) if !r.suspended => line(format!("  Next refresh:  {}", at(t, now))),
        _ => {}
    }
    line(String::new());
    line(style.bold("Mailbox check:"));
    match &r.mailbox_check {
        Some(m) => {
            let result = if m.connected {
                style.good("Connected")
            } else {
                style.bad(&format!("Failing: {}", m.reason))
            };
            line(format!("  {result}, since {}", at(m.since, now)));
            if !m.message.is_empty() {
                line(format!("  {}", m.message));
            }
        }
        None => line("  (not checked: no mail server known, or no valid token yet)".into()),
    }
    line(String::new());
    line(style.bold("Secrets:"));
    for s in &r.secrets {
        let state = match (s.exists, &s.problem) {
            (true, None) => style.good("exists"),
            (true, Some(p)) => style.bad(&format!("exists, {p}")),
            (false, Some(p)) => style.warn(p),
            (false, None) => style.warn("missing"),
        };
        let created = s
            .created
            .map(|t| style.dim(&format!(" (created {})", relative(t, now))))
            .unwrap_or_default();
        line(format!("  {:<6} {:<32} {state}{created}", s.role, s.name));
    }
    for l in super::gateway::render(&r.gateway, now, style, relative) {
        line(l);
    }
    if let Some(f) = &r.last_sign_in_failure {
        line(String::new());
        line(style.bold("Last failed sign-in:"));
        let when = f
            .since
            .map(|t| format!(" ({})", relative(t, now)))
            .unwrap_or_default();
        line(format!("  {}{when}: {}", style.bad(&f.reason), f.message));
        if let Some(todo) = &f.what_to_do {
            line(format!("      {} {todo}", style.bold("What to do:")));
        }
    }
    if let Some(s) = &r.sign_in {
        line(String::new());
        line(style.bold("Sign in:"));
        line(format!(
            "  Open this link and sign in as {} (valid until {}):",
            r.mailbox,
            at(s.expires_at, now)
        ));
        line(format!("  {}", s.url));
    }
    line(String::new());
    line(style.bold("Events:"));
    if r.events.is_empty() {
        line("  (none)".into());
    }
    for e in &r.events {
        let when = e.last_seen.map(|t| relative(t, now)).unwrap_or_default();
        let count = if e.count > 1 {
            format!(" (x{})", e.count)
        } else {
            String::new()
        };
        let kind = if e.type_ == "Warning" {
            style.bad(&e.type_)
        } else {
            e.type_.clone()
        };
        line(format!(
            "  {when:<9} {kind:<7} {}{count}: {}",
            e.reason, e.message
        ));
    }
    out
}

/// One line per integration, for `kubectl mailint status` without a name.
pub fn render_table(
    reports: &[StatusReport],
    now: Timestamp,
    style: Style,
    namespaces: bool,
) -> String {
    let mut rows: Vec<[String; 6]> = vec![[
        "NAMESPACE".into(),
        "NAME".into(),
        "READY".into(),
        "REASON".into(),
        "EXPIRES".into(),
        "MAILBOX".into(),
    ]];
    for r in reports {
        let (ready, reason) = r.ready();
        rows.push([
            r.namespace.clone(),
            r.name.clone(),
            ready.to_owned(),
            reason.to_owned(),
            r.access_token_expires_at
                .map(|t| relative(t, now))
                .unwrap_or_else(|| "-".into()),
            r.mailbox_check
                .as_ref()
                .map(|m| m.reason.clone())
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    let skip = usize::from(!namespaces);
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(widths.iter())
            .enumerate()
            .skip(skip)
            .map(|(col, (cell, w))| {
                let padded = format!("{cell:<w$}");
                if i > 0 && col == 2 {
                    style
                        .status(condition::READY, cell)
                        .replace(cell.as_str(), &padded)
                } else {
                    padded
                }
            })
            .collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// The text of `kubectl mailint explain REASON`.
pub fn explain(r: Reason, style: Style) -> String {
    format!(
        "{} ({})\n\n{}\n  {}\n\n{}\n  {}\n\nMore: docs/reasons.md#{}\n",
        style.bold(r.as_str()),
        r.category().title(),
        style.bold("What happened:"),
        r.what_happened(),
        style.bold("What to do:"),
        r.hint(),
        r.anchor()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn integration(status: serde_json::Value) -> MailIntegration {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "mailintegration.dev/v1alpha1",
            "kind": "MailIntegration",
            "metadata": {"name": "inbox", "namespace": "mail", "uid": "u1", "generation": 2},
            "spec": {
                "provider": "Google",
                "mailbox": {"address": "support@example.com"},
                "oauth": {"clientSecretRef": {"name": "gmail-client"}},
                "tokenSecret": {"name": "inbox-token"},
            },
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_failing_integration_says_what_to_do_and_lists_its_secrets() {
        let now: Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        let mi = integration(serde_json::json!({
            "observedGeneration": 2,
            "conditions": [
                {"type": "Stalled", "status": "True", "reason": "GrantRevoked", "message": "revoked", "lastTransitionTime": "2026-12-01T11:00:00Z"},
                {"type": "Ready", "status": "False", "reason": "GrantRevoked", "message": "Token has been expired or revoked.", "lastTransitionTime": "2026-12-01T11:00:00Z"},
            ],
            "accessTokenExpiresAt": "2026-12-01T11:30:00Z",
            "signIn": {"url": "https://op.example.com/sign-in?t=abc", "expiresAt": "2026-12-01T13:00:00Z"},
        }));
        let client = SecretMeta {
            labels: [(OAUTH_CLIENT_LABEL.to_owned(), "true".to_owned())].into(),
            ..Default::default()
        };
        let r = StatusReport::build(&mi, &[Some(client), None, None], vec![]);
        assert_eq!(r.ready(), ("False", "GrantRevoked"));
        assert_eq!(r.conditions[0].type_, "Ready", "Ready comes first");
        assert_eq!(r.secrets.len(), 3);
        assert!(r.secrets[0].exists && r.secrets[0].problem.is_none());
        assert!(!r.secrets[1].exists);
        let text = render(&r, now, Style { colour: false });
        assert!(
            text.contains("MailIntegration mail/inbox: Not ready: GrantRevoked"),
            "{text}"
        );
        assert!(
            text.contains(&format!("What to do: {}", Reason::GrantRevoked.hint())),
            "{text}"
        );
        assert!(
            text.contains("EXPIRED 2026-12-01T11:30:00Z (30m0s ago)"),
            "{text}"
        );
        assert!(
            text.contains("https://op.example.com/sign-in?t=abc"),
            "{text}"
        );
        assert!(!text.contains('\x1b'), "no colour unless asked");
        let coloured = render(&r, now, Style { colour: true });
        assert!(coloured.contains("\x1b[31m"));
    }

    #[test]
    fn an_unmarked_client_secret_is_named() {
        let mi = integration(serde_json::json!({}));
        let r = StatusReport::build(&mi, &[Some(SecretMeta::default()), None, None], vec![]);
        let p = r.secrets[0].problem.as_deref().unwrap();
        assert!(
            p.contains("kubectl label secret gmail-client -n mail"),
            "{p}"
        );
        assert_eq!(r.ready(), ("Unknown", ""));
    }

    #[test]
    fn durations_read_like_kubectl() {
        let now: Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        assert_eq!(
            relative("2026-12-01T12:52:00Z".parse().unwrap(), now),
            "in 52m0s"
        );
        assert_eq!(
            relative("2026-11-29T10:00:00Z".parse().unwrap(), now),
            "2d2h ago"
        );
        assert_eq!(relative(now, now), "now");
    }
}
