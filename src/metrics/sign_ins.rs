//! Sign-in counters: the sign-in server's [`Backend`] wrapped so that every outcome it reports on an
//! integration is counted by result and reason, before the backend's own rate limit of writes.

use super::{Metrics, RefreshLabels};
use crate::api::MailIntegration;
use crate::secret::SecretValue;
use crate::web::signin::backend::{Backend, Report};
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
        let labels = match &report {
            Report::Failed { reason, .. } => RefreshLabels {
                result: "failure".into(),
                reason: reason.as_str().into(),
            },
            Report::SignedIn { .. } => RefreshLabels {
                result: "success".into(),
                reason: crate::reason::Reason::SignedIn.as_str().into(),
            },
        };
        self.metrics.sign_ins.get_or_create(&labels).inc();
        self.inner.report(mi, report)
    }
}
