//! The refreshed grants a stopping process still holds in memory (the provider rotated the refresh
//! token, the grant Secret could not be written yet: see [`super::refresh::PendingGrant`]). No exit
//! path the operator chooses drops one: after the drain, each is stored before the process exits,
//! retried every second, until it is stored or a bound has passed (SIGTERM: what is left of
//! `--shutdown-timeout`; a lost Lease: [`HELD_GRANT_BOUND`]). The fence refuses new provider calls
//! meanwhile; the store of a token already received is never fenced (its write is conditional on
//! the write-ahead mark's resourceVersion, not on the Lease). docs/operations.md has the rule.

use super::{context::Context, decide::Outcome, refresh::store_pending};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{error, info, warn};

/// How long a process that lost its Lease keeps trying to store the grants it holds before it
/// exits anyway: longer than any API server outage it is meant to outlast (the fault suite proves
/// 90 s). Nothing else bounds it: no kubelet waits to kill a process that was not told to stop.
pub const HELD_GRANT_BOUND: Duration = Duration::from_secs(600);

/// One store attempt at most: an attempt hanging on a dead connection is given up and retried on a
/// new one, so that a grant is stored within seconds of the API server's return.
const ATTEMPT: Duration = Duration::from_secs(5);

/// Between attempts.
const RETRY: Duration = Duration::from_secs(1);

/// Store every grant held in memory, retrying, until none is left or `deadline`. Returns how many
/// are still held (and lost with the process).
pub async fn store_held(ctx: &Context, deadline: Instant) -> usize {
    let mut logged = false;
    loop {
        let held = ctx.held_grants();
        if held.is_empty() {
            return 0;
        }
        if !logged {
            info!(
                held = held.len(),
                "storing the refreshed grants held in memory before exiting"
            );
            logged = true;
        }
        for (uid, pending) in held {
            let mi = &pending.integration;
            let ns = mi.namespace().unwrap_or_default();
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            let attempt = async {
                let lock = ctx.grant_locks.get(&uid);
                let _guard = lock.lock().await;
                let current = api
                    .get_opt(&mi.grant_secret_name())
                    .await
                    .map_err(|e| e.to_string())?;
                store_pending(mi, &pending, current.as_ref(), &api, Timestamp::now(), ctx)
                    .await
                    .map_err(|o| match o {
                        Outcome::GrantNotStored { message, .. }
                        | Outcome::PermanentFailure { message, .. } => message,
                        Outcome::SignInRequired => {
                            "the grant Secret was deleted: the held token is dropped".to_owned()
                        }
                        other => format!("{other:?}"),
                    })
            };
            let until = Instant::now()
                .checked_add(super::inflight::scaled(ATTEMPT))
                .unwrap_or(deadline)
                .min(deadline);
            match tokio::time::timeout_at(until, attempt).await {
                Ok(Ok(())) => {
                    info!(integration = %format!("{ns}/{}", mi.name_any()), "stored a held grant before exiting");
                }
                // `store_pending` dropped it only when it can never be stored (GiveUp), and said so.
                Ok(Err(e)) => {
                    warn!(integration = %format!("{ns}/{}", mi.name_any()), error = %e, "a held grant is not stored yet; retrying")
                }
                Err(_) => {
                    warn!(integration = %format!("{ns}/{}", mi.name_any()), "storing a held grant did not finish in time; retrying")
                }
            }
        }
        let left = ctx.held_grants().len();
        if left == 0 {
            return 0;
        }
        let next = Instant::now().checked_add(RETRY).unwrap_or(deadline);
        if next >= deadline {
            error!(
                held = left,
                "exiting with refreshed grants not stored: the API server could not be reached in time"
            );
            return left;
        }
        tokio::time::sleep_until(next).await;
    }
}
