//! What an operator asked the API server, as the API server recorded it: its audit log
//! (`--audit-log-path`, JSON lines, Metadata level, one event per completed request), filtered to
//! one API user — an operator user of its own ([`ControlPlane::operator_user`]) or the chart's
//! ServiceAccount. Unlike the operator's own counters this sees every request it made: the
//! sign-in server's writes, finalizer patches, events, watches and lists.
//!
//! Why not `apiserver_request_total` from `/metrics`: it has no user label, and the tests of one
//! binary share one API server, so its counts mix every test's and the harness's own requests.
//!
//! A read is only trusted after a barrier: a request the test makes with the user's own token,
//! which must show up in the log (else the read panics: a missing or unreadable log is never
//! "zero requests"). Requests completed before the barrier was sent are then in the log.

use super::control_plane::{ApiUser, bin_dir};
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

/// One request the API server completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiRequest {
    pub verb: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub code: u16,
    pub user_agent: String,
    pub uri: String,
    /// When the API server received it (RFC 3339, microseconds).
    pub received: String,
}

impl ApiRequest {
    /// create, update, patch, delete, deletecollection.
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }

    /// `resource` or `resource/subresource`.
    pub fn kind(&self) -> String {
        match &self.subresource {
            Some(s) => format!("{}/{s}", self.resource),
            None => self.resource.clone(),
        }
    }
}

impl std::fmt::Display for ApiRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} -> {}",
            self.verb,
            self.kind(),
            self.uri,
            self.code
        )
    }
}

const BARRIER_PREFIX: &str = "mio-audit-barrier-";

/// Every request of `user` that the API server completed so far, in order. Panics when the
/// barrier (sent with the user's own kubeconfig) does not appear in the audit log within 20 s.
pub fn requests_of(user: &ApiUser) -> Vec<ApiRequest> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let barrier = format!(
        "{BARRIER_PREFIX}{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    // A 404 is fine: it is audited like any other request.
    let _ = Command::new(bin_dir().join("kubectl"))
        .arg("--kubeconfig")
        .arg(&user.kubeconfig)
        .args([
            "get",
            "configmap",
            &barrier,
            "-n",
            "default",
            "--ignore-not-found",
        ])
        .output()
        .expect("run kubectl");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (requests, seen) = read(&user.audit_log, &user.name, &barrier);
        if seen {
            return requests;
        }
        assert!(
            Instant::now() < deadline,
            "the audit barrier {barrier} of user {} is not in the API server's audit log {} after 20 s: \
             nothing could be counted ({} requests of that user seen)",
            user.name,
            user.audit_log.display(),
            requests.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The requests of `user` but the barriers, and whether `barrier` was seen.
fn read(path: &Path, user: &str, barrier: &str) -> (Vec<ApiRequest>, bool) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("the audit log {} cannot be read: {e}", path.display()));
    let mut out = Vec::new();
    let mut seen = false;
    for line in text.lines() {
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(line) else {
            // The last line may be half written.
            continue;
        };
        if ev["user"]["username"].as_str() != Some(user) {
            continue;
        }
        let obj = &ev["objectRef"];
        let s = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        let name = s(&obj["name"]);
        if name
            .as_deref()
            .is_some_and(|n| n.starts_with(BARRIER_PREFIX))
        {
            seen |= name.as_deref() == Some(barrier);
            continue;
        }
        out.push(ApiRequest {
            verb: s(&ev["verb"]).unwrap_or_default(),
            resource: s(&obj["resource"]).unwrap_or_default(),
            subresource: s(&obj["subresource"]),
            namespace: s(&obj["namespace"]),
            name,
            code: ev["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
            user_agent: s(&ev["userAgent"]).unwrap_or_default(),
            uri: s(&ev["requestURI"]).unwrap_or_default(),
            received: s(&ev["requestReceivedTimestamp"]).unwrap_or_default(),
        });
    }
    (out, seen)
}

/// The requests in `after` that are not in `before` (a prefix of it).
pub fn since(before: &[ApiRequest], after: &[ApiRequest]) -> Vec<ApiRequest> {
    assert!(
        after.len() >= before.len() && after[..before.len()] == *before,
        "the audit log was rewritten between two reads"
    );
    after[before.len()..].to_vec()
}

/// One line per request, for messages.
pub fn describe(requests: &[ApiRequest]) -> String {
    requests
        .iter()
        .map(ApiRequest::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
