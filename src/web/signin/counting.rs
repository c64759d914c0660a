//! The sign-in server's [`Backend`] wrapped so that every outcome it reports on an integration is
//! counted ([`Metrics::count_sign_in`]), before the backend's own rate limit of writes.

use super::backend::{Backend, Report};
use crate::api::MailIntegration;
use crate::metrics::Metrics;
use crate::reason::Reason;
use crate::secret::SecretValue;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use std::sync::Arc;

/// A [`Backend`] that counts `mailintegration_sign_ins_total{result,reason}`.
pub struct CountingBackend<B> {
    inner: B,
    metrics: Arc<Metrics>,
}

impl<B: Backend> CountingBackend<B> {
    pub fn new(inner: B, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

impl<B: Backend> Backend for CountingBackend<B> {
    fn integration<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<MailIntegration>, String>> {
        self.inner.integration(ns, name)
    }

    fn secret<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Secret>, String>> {
        self.inner.secret(ns, name)
    }

    fn store_grant<'a>(
        &'a self,
        mi: &'a MailIntegration,
        refresh_token: &'a SecretValue,
        extra: Vec<(&'static str, String)>,
    ) -> BoxFuture<'a, Result<(), String>> {
        self.inner.store_grant(mi, refresh_token, extra)
    }

    fn report<'a>(&'a self, mi: &'a MailIntegration, report: Report) -> BoxFuture<'a, ()> {
        self.metrics.count_sign_in(match &report {
            Report::Failed { reason, .. } => *reason,
            Report::SignedIn { .. } => Reason::SignedIn,
        });
        self.inner.report(mi, report)
    }
}
