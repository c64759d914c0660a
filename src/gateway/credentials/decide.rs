//! The pure decisions of the gateway credentials: which password each app has, which verifiers the
//! gateway keeps, what a rotation request asks for, and what the gateway Secret's `gateway.json`
//! holds. No I/O: randomness comes in through [`Entropy`], the current Secrets as parsed values.

use super::GatewaySettings;
use crate::{
    api::{
        GatewayApp, GatewayProtocol, GatewaySpec, MailIntegration, MailProtocol, SaslMechanismName,
        TlsMode,
    },
    gateway::config::{
        GatewayAppConfig, GatewayConfig, UpstreamMechanism, UpstreamServer, Verifier, username,
    },
    secret::SecretValue,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jiff::Timestamp;
use kube::ResourceExt;
use std::collections::{BTreeMap, BTreeSet};

/// Bytes of a password: 256 random bits, 43 characters of base64url without padding.
pub const PASSWORD_BYTES: usize = 32;
/// Characters of a password as written into the app Secret.
pub const PASSWORD_CHARS: usize = 43;
/// Bytes of a verifier's salt.
pub const SALT_BYTES: usize = 16;
/// Rotated-out verifiers kept per app at most (the newest): rotations in quick succession with a
/// long grace period do not grow `gateway.json` without bound.
pub const MAX_RETIRING: usize = 4;

/// Where the random bytes of passwords and salts come from (the OS RNG in the operator).
pub trait Entropy {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), String>;
}

/// A fresh password: 32 random bytes, base64url without padding (43 characters from
/// `A-Z a-z 0-9 - _`, none of which needs quoting in IMAP, a URL or a shell).
pub fn new_password(rng: &mut dyn Entropy) -> Result<SecretValue, String> {
    let mut bytes = [0u8; PASSWORD_BYTES];
    rng.fill(&mut bytes)?;
    Ok(SecretValue::new(URL_SAFE_NO_PAD.encode(bytes)))
}

/// The verifier of `password` with a fresh salt. A salted SHA-256, not a password hash, on purpose
/// (see [`Verifier`]): the password is 256 random bits, and a slow hash would cost every gateway
/// login tens of milliseconds of CPU.
pub fn new_verifier(rng: &mut dyn Entropy, password: &SecretValue) -> Result<Verifier, String> {
    let mut salt = [0u8; SALT_BYTES];
    rng.fill(&mut salt)?;
    Ok(Verifier::new(&salt, password))
}

/// Whether `value` has the shape of a password the operator issued (anything else in an app
/// Secret was put there by someone else, and is replaced).
pub fn well_formed_password(value: &str) -> bool {
    value.len() == PASSWORD_CHARS
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// What the rotate-gateway-credentials annotation asks for, against what was handled already.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rotation {
    /// No annotation, or its value was handled.
    None,
    /// New passwords for every app.
    All(String),
    /// A new password for one app.
    App(String, String),
    /// A value that is not `<RFC 3339 time>` or `<RFC 3339 time>/<app of spec.gateway.apps>`:
    /// nothing is rotated, the condition says why.
    Invalid(String, String),
}

impl Rotation {
    /// The annotation's value, when one is to be recorded as handled.
    pub fn value(&self) -> Option<&str> {
        match self {
            Rotation::None | Rotation::Invalid(..) => None,
            Rotation::All(v) | Rotation::App(v, _) => Some(v),
        }
    }

    fn covers(&self, app: &str) -> bool {
        match self {
            Rotation::All(_) => true,
            Rotation::App(_, a) => a == app,
            _ => false,
        }
    }
}

/// Longest annotation value read (a time and an app name fit in far less).
const MAX_ROTATION_VALUE: usize = 128;

/// The rotation `annotation` asks for, given the value last handled and the spec's apps.
pub fn rotation(annotation: Option<&str>, handled: Option<&str>, spec: &GatewaySpec) -> Rotation {
    let Some(value) = annotation.map(str::trim).filter(|v| !v.is_empty()) else {
        return Rotation::None;
    };
    if Some(value) == handled {
        return Rotation::None;
    }
    let shown: String = value.chars().take(MAX_ROTATION_VALUE).collect();
    if value.len() > MAX_ROTATION_VALUE {
        return Rotation::Invalid(
            shown,
            format!("the value is longer than {MAX_ROTATION_VALUE} characters"),
        );
    }
    let (time, app) = match value.split_once('/') {
        Some((t, a)) => (t, Some(a)),
        None => (value, None),
    };
    if time.parse::<Timestamp>().is_err() {
        return Rotation::Invalid(
            shown,
            format!("{time:?} is not an RFC 3339 time such as 2026-12-06T21:00:00Z"),
        );
    }
    match app {
        None => Rotation::All(value.to_owned()),
        Some(a) if spec.apps.iter().any(|x| x.name == a) => {
            Rotation::App(value.to_owned(), a.to_owned())
        }
        Some(a) => Rotation::Invalid(shown, format!("spec.gateway.apps has no app {a:?}")),
    }
}

/// What an app's Secret holds, as far as the decision needs it.
#[derive(Clone, Debug)]
pub enum AppSecret {
    /// No Secret of that name.
    Missing,
    /// This integration's own app Secret, with its password when it has a well-formed one.
    Ours(Option<SecretValue>),
    /// A Secret of that name that the operator did not create for this app: never written.
    Foreign,
}

/// The decision of one reconcile.
#[derive(Debug)]
pub struct Plan {
    /// The gateway Secret's `gateway.json`.
    pub config: GatewayConfig,
    /// Apps whose Secret gets a new password (and the password): written after the gateway
    /// Secret, so that the verifier is live before any app holds the password.
    pub new_passwords: BTreeMap<String, SecretValue>,
    /// The apps whose Secret name is taken by a Secret the operator does not own.
    pub conflicts: Vec<String>,
    /// The earliest time a rotated-out verifier retires (the reconcile comes back then).
    pub next_retirement: Option<Timestamp>,
}

/// Inputs of [`plan`] besides the integration.
pub struct Inputs<'a> {
    /// The gateway Secret's current `gateway.json`, when it is ours and parses.
    pub current: Option<&'a GatewayConfig>,
    /// Each app's Secret, by app name (an app missing here counts as [`AppSecret::Missing`]).
    pub app_secrets: &'a BTreeMap<String, AppSecret>,
    pub rotation: &'a Rotation,
    /// The PEM of spec.mailbox.caSecretRef, when set and readable.
    pub ca_pem: Option<String>,
    pub now: Timestamp,
}

/// The gateway configuration and the passwords to issue for `mi`, whose spec.gateway is `gateway`.
///
/// An app keeps its password while its Secret holds one its current verifier matches: a restart
/// or another reconcile never changes it. Its Secret is the source of truth: a verifier lost with
/// the gateway Secret is made again from it. A missing Secret, or one whose password no longer
/// matches (edited by hand), gets a new password, and the old verifier goes at once. A rotation
/// gives a new password and keeps the old verifier until now + the grace period.
pub fn plan(
    mi: &MailIntegration,
    gateway: &GatewaySpec,
    inputs: Inputs<'_>,
    rng: &mut dyn Entropy,
) -> Result<Plan, String> {
    let ns = mi.namespace().unwrap_or_default();
    let name = mi.name_any();
    let grace = gateway.rotation_grace_period();
    let retires_at = crate::time::after(inputs.now, grace);
    let mut apps = Vec::with_capacity(gateway.apps.len());
    let mut new_passwords = BTreeMap::new();
    let mut conflicts = Vec::new();
    let mut seen = BTreeSet::new();
    for app in &gateway.apps {
        // The API server keeps the names unique; an object stored otherwise gets one entry.
        if !seen.insert(app.name.as_str()) {
            continue;
        }
        let secret = inputs
            .app_secrets
            .get(&app.name)
            .cloned()
            .unwrap_or(AppSecret::Missing);
        let password = match secret {
            AppSecret::Foreign => {
                conflicts.push(app.name.clone());
                continue;
            }
            AppSecret::Missing => None,
            AppSecret::Ours(p) => p,
        };
        let previous: &[Verifier] = inputs
            .current
            .and_then(|c| c.apps.iter().find(|a| a.name == app.name))
            .map_or(&[], |a| a.verifiers.as_slice());
        let (verifiers, issued) = app_verifiers(
            previous,
            password.as_ref(),
            inputs.rotation.covers(&app.name),
            inputs.now,
            retires_at,
            rng,
        )?;
        if let Some(p) = issued {
            new_passwords.insert(app.name.clone(), p);
        }
        apps.push(app_config(&ns, &name, app, verifiers));
    }
    let next_retirement = apps
        .iter()
        .flat_map(|a| a.verifiers.iter())
        .filter_map(|v| v.retires_at)
        .min();
    Ok(Plan {
        config: gateway_config(mi, gateway, apps, inputs.ca_pem),
        new_passwords,
        conflicts,
        next_retirement,
    })
}

/// One app's verifiers, and the password to issue when it gets a new one.
fn app_verifiers(
    previous: &[Verifier],
    password: Option<&SecretValue>,
    rotate: bool,
    now: Timestamp,
    retires_at: Timestamp,
    rng: &mut dyn Entropy,
) -> Result<(Vec<Verifier>, Option<SecretValue>), String> {
    // Rotated-out verifiers still in their grace period; retired ones are dropped.
    let mut retiring: Vec<Verifier> = previous
        .iter()
        .filter(|v| v.retires_at.is_some_and(|at| at > now))
        .cloned()
        .collect();
    let live = previous.iter().find(|v| v.retires_at.is_none());
    let current = match (password, live) {
        (Some(p), Some(v)) if v.matches(p, now) => Some(v.clone()),
        // A verifier lost with the gateway Secret: the app Secret's password stays.
        (Some(p), None) => Some(new_verifier(rng, p)?),
        // No password, or one the live verifier does not match (the Secret was edited or
        // replaced): a new password, and the old verifier goes now.
        _ => None,
    };
    let (live, issued) = match current {
        Some(v) if !rotate => (v, None),
        kept => {
            if let Some(mut old) = kept
                && retires_at > now
            {
                old.retires_at = Some(retires_at);
                retiring.push(old);
            }
            let p = new_password(rng)?;
            (new_verifier(rng, &p)?, Some(p))
        }
    };
    // The newest rotated-out verifiers, at most MAX_RETIRING.
    retiring.sort_by_key(|v| std::cmp::Reverse(v.retires_at));
    retiring.truncate(MAX_RETIRING);
    let mut verifiers = vec![live];
    verifiers.extend(retiring);
    Ok((verifiers, issued))
}

fn app_config(
    ns: &str,
    integration: &str,
    app: &GatewayApp,
    verifiers: Vec<Verifier>,
) -> GatewayAppConfig {
    let mut protocols: Vec<GatewayProtocol> = app.protocols.clone();
    protocols.sort();
    protocols.dedup();
    GatewayAppConfig {
        name: app.name.clone(),
        username: username(ns, integration, &app.name),
        protocols,
        send_as: app.send_as.clone(),
        verifiers,
    }
}

/// The upstream servers: the mailbox check's (spec.mailbox.server, or the provider's default for
/// spec.mailbox.protocol), the other read protocol's provider default when spec.mailbox.server is
/// not set, and SMTP from spec.mailbox.smtp or the provider's submission server.
pub fn upstream_servers(
    mi: &MailIntegration,
) -> (
    Option<UpstreamServer>,
    Option<UpstreamServer>,
    Option<UpstreamServer>,
) {
    let spec = &mi.spec;
    let convert = |s: crate::api::MailServer| {
        Some(UpstreamServer {
            host: s.host,
            port: u16::try_from(s.port).ok().filter(|p| *p != 0)?,
            tls: s.tls.unwrap_or(TlsMode::Implicit),
        })
    };
    let read = |protocol: MailProtocol| {
        if spec.protocol() == protocol {
            crate::provider::mail_server(spec).and_then(convert)
        } else if spec.mailbox.server.is_none() {
            crate::provider::default_mail_server(spec.provider, protocol).and_then(convert)
        } else {
            None
        }
    };
    let smtp = spec
        .mailbox
        .smtp
        .clone()
        .or_else(|| crate::provider::default_smtp_server(spec.provider))
        .and_then(convert);
    (read(MailProtocol::Imap), read(MailProtocol::Pop3), smtp)
}

/// The whole `gateway.json` of `mi` with these apps.
pub fn gateway_config(
    mi: &MailIntegration,
    gateway: &GatewaySpec,
    apps: Vec<GatewayAppConfig>,
    ca_pem: Option<String>,
) -> GatewayConfig {
    let (imap, pop3, smtp) = upstream_servers(mi);
    GatewayConfig {
        namespace: mi.namespace().unwrap_or_default(),
        integration: mi.name_any(),
        uid: mi.uid().unwrap_or_default(),
        mailbox: mi.spec.mailbox.address.trim().to_owned(),
        mechanism: match mi.spec.mailbox.mechanism.unwrap_or_default() {
            SaslMechanismName::XOAuth2 => UpstreamMechanism::XOAuth2,
            SaslMechanismName::OAuthBearer => UpstreamMechanism::OAuthBearer,
        },
        imap,
        pop3,
        smtp,
        ca_pem,
        max_message_bytes: gateway.max_message_bytes(mi.spec.provider),
        apps,
    }
}

/// The keys of an app's Secret (what the app mounts): username, password, the gateway's host and
/// ports, and URL snippets for the app's protocols (user and password percent-encoded).
pub fn app_secret_data(
    ns: &str,
    integration: &str,
    app: &GatewayApp,
    password: &SecretValue,
    settings: &GatewaySettings,
) -> BTreeMap<String, SecretValue> {
    let user = username(ns, integration, &app.name);
    let host = settings.host.as_str();
    let p = &settings.ports;
    // A port of 0 is a service the gateway does not serve (the chart's `gateway.ports.X: 0`): no
    // key and no URL for it.
    let mut data: BTreeMap<String, SecretValue> =
        [("username", user.clone()), ("host", host.to_owned())]
            .into_iter()
            .chain(
                [
                    ("imap-port", p.imap),
                    ("imaps-port", p.imaps),
                    ("pop3s-port", p.pop3s),
                    ("smtp-port", p.smtp),
                    ("smtps-port", p.smtps),
                ]
                .into_iter()
                .filter(|(_, port)| *port != 0)
                .map(|(k, port)| (k, port.to_string())),
            )
            .map(|(k, v)| (k.to_owned(), SecretValue::new(v)))
            .collect();
    data.insert("password".into(), password.clone());
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let url = |scheme: &str, port: u16| {
        SecretValue::new(format!(
            "{scheme}://{}:{}@{host}:{port}",
            enc(&user),
            enc(password.expose())
        ))
    };
    for protocol in &app.protocols {
        let urls: &[(&str, &str, u16)] = match protocol {
            GatewayProtocol::Smtp => &[
                ("smtp-url", "smtp", p.smtp),
                ("smtps-url", "smtps", p.smtps),
            ],
            GatewayProtocol::Imap => &[("imaps-url", "imaps", p.imaps)],
            GatewayProtocol::Pop3 => &[("pop3s-url", "pop3s", p.pop3s)],
        };
        for (key, scheme, port) in urls.iter().filter(|(_, _, port)| *port != 0) {
            data.insert((*key).into(), url(scheme, *port));
        }
    }
    data
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
