//! The errors that fail a reconcile.

/// Errors that fail a reconcile (and are retried by the error policy). Provider failures are not
/// errors here: they are outcomes reported on the resource.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the resource has no namespace")]
    NoNamespace,
    /// A bug met by this resource's data: the reconcile is abandoned (and retried with backoff),
    /// the other resources go on.
    #[error("internal error while reconciling: {0}")]
    Panicked(String),
}

impl Error {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::NoNamespace => "no_namespace",
            Error::Panicked(_) => "panic",
        }
    }
}

/// How a step of the reconcile ends it early: with the controller's next action (`Done`: a requeue
/// or waiting for a change), or with an error.
pub(super) enum Stop {
    Done(kube::runtime::controller::Action),
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

impl From<kube::Error> for Stop {
    fn from(e: kube::Error) -> Self {
        Stop::Failed(e.into())
    }
}
