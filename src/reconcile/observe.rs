//! Reconcile, step 1 (observe): the integration as it is now and its Secrets, from the watch caches
//! (read from the API server only where a cache cannot answer), turned into an [`Observed`] for the
//! decision. `observed.rs` parses; this module reads.

use super::{
    cache::{self, Caches, Freshness, Kind, Written},
    cached_secret::Held,
    context::Context,
    error::Stop,
    mailbox_check::{self, MailboxState},
    observed::{self, Observed},
};
use crate::api::MailIntegration;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Resource, ResourceExt, runtime::controller::Action};
use std::time::Duration;

/// Where one reconcile reads from: its namespace's Secrets, through the caches.
pub(super) struct Reader<'a> {
    pub ctx: &'a Context,
    pub caches: &'a Caches,
    pub secrets: Api<Secret>,
    pub ns: String,
    pub uid: String,
}

/// The Secrets a reconcile read, beside the [`Observed`] made of them.
pub(super) struct Read {
    /// The client Secret as read (its expiry annotation is reported).
    pub client_secret: Option<Held>,
    /// The grant Secret, when it is this integration's.
    pub grant_secret: Option<Secret>,
    /// The token Secret, when it is this integration's.
    pub token_secret: Option<Secret>,
}

/// The end of a reconcile whose cache has not caught up with this process's own write: deciding on
/// the previous state would repeat a refresh that was just done (or retry a permanent failure).
/// That write's watch event is on its way and brings the next reconcile; the requeue is only the
/// fallback.
pub(super) fn lagging(what: &str) -> Stop {
    tracing::debug!(
        object = what,
        "the watch cache has not caught up with this process's write yet"
    );
    Stop::Done(Action::requeue(Duration::from_secs(1)))
}

/// The integration to decide on: the cached one, unless the cache has not caught up with this
/// process's own last write (`Lagging`) or it is being deleted or its freshness is unknown (read
/// now: `Some`). A deletion is handled on the object as it is now.
pub(super) async fn integration(
    cached: &MailIntegration,
    api: &Api<MailIntegration>,
    written: &Written,
    reader: &Reader<'_>,
) -> Result<Option<MailIntegration>, Stop> {
    let ctx = reader.ctx;
    match cache::freshness(
        cached.resource_version().as_deref(),
        written.integration.as_deref(),
        written.recent(),
    ) {
        Freshness::Lagging => Err(lagging("integration")),
        Freshness::Fresh if cached.meta().deletion_timestamp.is_none() => Ok(None),
        Freshness::Fresh | Freshness::Unknown => {
            ctx.metrics.count_read("integration");
            let Some(got) = api.get_opt(&cached.name_any()).await? else {
                ctx.forget(cached);
                return Err(Stop::Done(Action::await_change()));
            };
            ctx.written
                .read(&reader.uid, Kind::Integration, got.resource_version());
            Ok(Some(got))
        }
    }
}

/// Read `mi`'s Secrets and observe them.
pub(super) async fn observe<'a>(
    mi: &'a MailIntegration,
    written: Written,
    reader: &Reader<'_>,
) -> Result<(Read, Observed<'a>), Stop> {
    // The user's client Secret: a marked one from the metadata cache, its data read once per
    // version (see `super::marked`); one that is not there is read, so that the condition says
    // whether it is missing or only not marked. A marked Secret over the bound is not used.
    let client_name = &mi.spec.oauth.client_secret_ref.name;
    let client_secret = reader.marked_or_read(client_name, "client_secret").await?;
    // A certificate credential's kubernetes.io/tls Secret, read the same way.
    let certificate = match &mi.spec.oauth.client_certificate_ref {
        None => None,
        Some(r) => reader.marked_or_read(&r.name, "client_secret").await?,
    };
    let recent = written.recent();
    let grant_secret = reader
        .owned(
            mi.grant_secret_name(),
            Kind::Grant,
            written.grant,
            recent,
            true,
        )
        .await
        .map_err(|e| e.unwrap_or_else(|| lagging("grant Secret")))?;
    // A token Secret the cache does not hold is not read: it is created without a read, and a
    // Secret someone else made under its name fails that create (409), is read then and reported
    // (TokenSecretConflict); from then on, while the status says so, it is read each time, to see
    // whether it went.
    let token_secret = reader
        .owned(
            mi.spec.token_secret.name.clone(),
            Kind::Token,
            written.token,
            recent,
            reports_token_conflict(mi),
        )
        .await
        .map_err(|e| e.unwrap_or_else(|| lagging("token Secret")))?;

    let now = Timestamp::now();
    // A grant or token Secret over the bound is neither used nor written: said by name.
    let too_large = [&grant_secret, &token_secret]
        .into_iter()
        .flatten()
        .find_map(observed::too_large);
    let grant_secret = grant_secret.and_then(Held::into_secret);
    let token_secret = token_secret.and_then(Held::into_secret);
    let conflict =
        too_large.or_else(|| observed::conflicts(mi, grant_secret.as_ref(), token_secret.as_ref()));
    // A grant or token Secret that is not this integration's is neither used nor written.
    let grant_secret = grant_secret.filter(|s| observed::grant_belongs_to(s, mi));
    let token_secret = token_secret.filter(|s| observed::owned_by(s, mi));
    let observed = Observed {
        integration: mi,
        client: observed::client_held(&mi.spec, client_secret.as_ref(), certificate.as_ref()),
        // A permanent failure waits for either Secret to change.
        client_version: [client_secret.as_ref(), certificate.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|s| s.resource_version().map(str::to_owned))
            .reduce(|a, b| format!("{a}/{b}")),
        grant: observed::grant(grant_secret.as_ref()),
        token: observed::published_token(token_secret.as_ref(), now),
        conflict,
        now,
    };
    let read = Read {
        client_secret,
        grant_secret,
        token_secret,
    };
    Ok((read, observed))
}

/// The status reports that a Secret not this integration's holds its token Secret's name.
fn reports_token_conflict(mi: &MailIntegration) -> bool {
    mi.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == crate::api::condition::READY
                && c.reason == crate::reason::Reason::TokenSecretConflict.as_str()
        })
    })
}

impl Reader<'_> {
    /// A grant or token Secret from the cache of the operator's own; one that is not there is
    /// read, because a Secret without the operator's label may hold the name (a conflict to
    /// report, and never to overwrite). `Err(None)`: the cache has not caught up with `version`,
    /// this process's last write.
    pub(super) async fn owned(
        &self,
        name: String,
        kind: Kind,
        version: Option<String>,
        recent: bool,
        read_if_absent: bool,
    ) -> Result<Option<Held>, Option<Stop>> {
        let cached = self.caches.owned_secret(&self.ns, &name);
        match cache::freshness(
            cached.as_ref().and_then(Held::resource_version),
            version.as_deref(),
            recent,
        ) {
            Freshness::Lagging => Err(None),
            Freshness::Fresh if cached.is_some() => Ok(cached),
            _ if cached.is_none() && !read_if_absent => Ok(None),
            Freshness::Fresh | Freshness::Unknown => {
                self.ctx.metrics.count_read(match kind {
                    Kind::Grant => "grant_secret",
                    _ => "token_secret",
                });
                let read = self
                    .secrets
                    .get_opt(&name)
                    .await
                    .map_err(|e| Some(e.into()))?;
                self.ctx.written.read(
                    &self.uid,
                    kind,
                    read.as_ref()
                        .and_then(|s| s.metadata.resource_version.clone()),
                );
                // Bounded as the cache is, when labelled as the operator's; an unlabelled
                // Secret under the name is a conflict, whatever its size.
                Ok(read.map(|s| {
                    let labelled = observed::is_operator_managed(&s);
                    Held::of_read(s, labelled)
                }))
            }
        }
    }

    /// A Secret the spec names as a client Secret, certificate or CA bundle: from the marked
    /// Secrets' cache (its data read once per version, over the bound a marker), else read (`what`
    /// counts the read) so that the condition can say whether it is missing or only not marked.
    pub(super) async fn marked_or_read(
        &self,
        name: &str,
        what: &'static str,
    ) -> Result<Option<Held>, kube::Error> {
        let read = || async {
            self.ctx.metrics.count_read(what);
            self.secrets.get_opt(name).await
        };
        if let Some(held) = self.caches.marked_secret(&self.ns, name, read).await? {
            return Ok(Some(held));
        }
        self.ctx.metrics.count_read(what);
        Ok(self.secrets.get_opt(name).await?.map(|s| {
            // Marked but not in the cache yet: the same bound.
            let marked = observed::is_marked_for_operator(&s);
            Held::of_read(s, marked)
        }))
    }

    /// The extra CA bundle named by spec.mailbox.caSecretRef; a missing Secret or key is a TLS
    /// problem of the check, reported as such.
    pub(super) async fn ca(&self, mi: &MailIntegration) -> Result<Option<Vec<u8>>, MailboxState> {
        let Some((name, key)) = mailbox_check::ca_key(mi) else {
            return Ok(None);
        };
        let got = self.marked_or_read(name, "ca_secret").await;
        let missing = |what: String| MailboxState::Failed {
            reason: "TLSError".into(),
            message: format!(
                "{what} (named by spec.mailbox.caSecretRef): create it with the PEM CA certificates of the mail server"
            ),
        };
        match got {
            Ok(Some(Held::TooLarge { bytes, .. })) => Err(MailboxState::Failed {
                reason: crate::reason::Reason::ClientSecretTooLarge.as_str().into(),
                message: observed::too_large_message(name, "spec.mailbox.caSecretRef", bytes),
            }),
            Ok(Some(Held::Secret(s))) if !observed::is_marked_for_operator(&s) => {
                Err(MailboxState::Failed {
                    reason: crate::reason::Reason::ClientSecretNotMarked.as_str().into(),
                    message: format!(
                        "Secret {name:?} (named by spec.mailbox.caSecretRef) is not marked for the operator, which reads only Secrets labelled {label}=true: run kubectl label secret {name} -n {ns} {label}=true",
                        label = crate::api::OAUTH_CLIENT_LABEL,
                        ns = self.ns,
                    ),
                })
            }
            Ok(Some(Held::Secret(s))) => {
                match s.data.and_then(|d| d.get(key).map(|b| b.0.clone())) {
                    Some(pem) if !pem.is_empty() => Ok(Some(pem)),
                    _ => Err(missing(format!("Secret {name:?} has no key {key:?}"))),
                }
            }
            Ok(None) => Err(missing(format!("Secret {name:?} does not exist"))),
            Err(e) => Err(MailboxState::Failed {
                reason: "TLSError".into(),
                message: format!("could not read Secret {name:?}: {e}"),
            }),
        }
    }
}
