//! Faults in the middle of a refresh with leader election on, as the chart deploys the operator
//! (two replicas, the chart's flags and RBAC), against the real kube-apiserver and the real
//! oidc-provider with refresh-token rotation on: the same counting at the token endpoint as
//! `tests/faults.rs` (0 presentations of a rotated-out token, 0 grants lost, Ready again), in a
//! binary of its own (its own control plane) so that tools/run-test-binaries.sh runs it beside
//! `faults`.
//!
//! docs/operations.md ("What happens on each failure") names each test.

mod support;

#[path = "faults/shared.rs"]
mod shared;
#[allow(unused_imports)]
use shared::*;

#[path = "faults/grant.rs"]
mod grant;

#[path = "faults/not_oauth.rs"]
mod not_oauth;

#[path = "faults/leader.rs"]
mod leader;

#[path = "faults/lease.rs"]
mod lease;

/// Fault 2: SIGTERM while a refresh waits for the provider: drained, the rotated token stored, the next
/// operator refreshes with it. (`faults/grant.rs`, as the chart deploys the operator.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_refresh_drains_it_and_stores_the_rotated_token_with_leader_election() {
    grant::sigterm_during_a_refresh_drains_it_and_stores_the_rotated_token(Deploy::Chart).await;
}

/// Fault 6: Another writer keeps changing the grant Secret while refreshes run: nothing overwritten, lost
/// or reused. (`faults/grant.rs`, as the chart deploys the operator.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_conflicting_writes_on_the_grant_loses_nothing_with_leader_election() {
    grant::a_storm_of_conflicting_writes_on_the_grant_loses_nothing(Deploy::Chart).await;
}

/// Fault 6: Secrets that cannot be written: refused before the provider is called, or given up with a
/// reason. (`faults/grant.rs`, as the chart deploys the operator.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immutable_grant_and_a_terminating_namespace_give_up_with_a_reason_with_leader_election()
{
    grant::an_immutable_grant_and_a_terminating_namespace_give_up_with_a_reason(Deploy::Chart)
        .await;
}

/// Fault 1: kill -9 between the provider's answer and the grant write: GrantLostInFlight after one try,
/// never retried. (`faults/grant.rs`, as the chart deploys the operator.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_the_providers_answer_and_the_grant_write_is_reported_not_retried_with_leader_election()
 {
    grant::kill_9_between_the_providers_answer_and_the_grant_write_is_reported_not_retried(
        Deploy::Chart,
    )
    .await;
}

/// Persist or say so: GrantNotStored while the rotated token is only in memory, stored once a write
/// works. (`faults/grant.rs`, as the chart deploys the operator.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_write_that_keeps_failing_says_so_and_lands_later_with_leader_election() {
    grant::a_grant_write_that_keeps_failing_says_so_and_lands_later(Deploy::Chart).await;
}

/// The scenarios of `faults/not_oauth.rs`, as the chart deploys the operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_that_are_not_oauth_answers_are_retried_and_lose_no_grant_with_leader_election() {
    not_oauth::pages_that_are_not_oauth_answers_are_retried_and_lose_no_grant(Deploy::Chart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_storm_on_the_mark_write_shows_and_recovers_with_leader_election() {
    not_oauth::a_conflict_storm_on_the_mark_write_shows_and_recovers(Deploy::Chart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_write_slower_than_its_budget_presents_nothing_with_leader_election() {
    not_oauth::a_mark_write_slower_than_its_budget_presents_nothing(Deploy::Chart).await;
}
