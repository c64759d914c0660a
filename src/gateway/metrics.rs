//! The gateway's Prometheus metrics (`mailintegration_gateway_*`), served on its health port.
//!
//! No label holds a password, a token or anything the app typed: `app` is a credential the
//! directory knows (`ns/mi/app`), set only after a successful login, and every `reason`/`result`
//! is one of this crate's fixed words.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use super::session::Protocol;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    pub protocol: String,
    pub app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoginLabels {
    pub protocol: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub protocol: String,
    /// `to_upstream` (what apps sent) or `to_app`.
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub protocol: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WhyLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// Every metric of the gateway, registered once.
pub struct GatewayMetrics {
    pub registry: Registry,
    /// Relayed sessions open now, by protocol and app.
    pub sessions: Family<SessionLabels, Gauge>,
    /// Relayed sessions ever opened, by protocol and app.
    pub sessions_total: Family<SessionLabels, Counter>,
    /// Logins by protocol and result (`success` or a [`super::session::LoginRefused::reason`]).
    pub logins: Family<LoginLabels, Counter>,
    /// What the throttle did to a failed login: `delay` or `refusal`.
    pub throttle: Family<KindLabels, Counter>,
    /// Bytes relayed, by protocol and direction.
    pub bytes: Family<BytesLabels, Counter>,
    /// Failed upstream sessions by protocol and [`super::upstream::UpstreamError::reason`].
    pub upstream_errors: Family<ReasonLabels, Counter>,
    /// Connections closed before a login, by reason (`max_connections`, `pre_login_limit`,
    /// `idle`, `tls`).
    pub connections_closed: Family<ReasonLabels, Counter>,
    /// How long relayed sessions lasted.
    pub session_duration: Family<ProtocolLabels, Histogram>,
    /// Integrations the directory holds (gateway Secrets parsed).
    pub integrations: Gauge,
    /// Gateway Secrets ignored (too large, malformed, or naming another namespace).
    pub secrets_ignored: Family<KindLabels, Counter>,
    /// The Kubernetes client's limit, 429s and retries (`mailintegration_gateway_kube_api_*`: the
    /// operator's client layer, [`crate::kube_client`]).
    pub kube_api: crate::kube_client::ApiMetrics,
    /// Writes of status.gateway.apps[].lastUsedTime, by result.
    pub usage_writes: Family<KindLabels, Counter>,
    /// IMAP upstream sessions parked after the app's LOGOUT ([`super::parked`]).
    pub upstream_parked: Counter,
    /// IMAP logins that got a parked upstream session.
    pub upstream_reused: Counter,
    /// Parked upstream sessions now.
    pub upstream_parked_now: Gauge,
    /// Parked upstream sessions ended (logged out upstream), by reason.
    pub upstream_park_dropped: Family<WhyLabels, Counter>,
    /// IMAP upstream sessions logged out after the gateway answered the app's LOGOUT instead of
    /// being parked, by reason ([`super::reuse::decide`]).
    pub upstream_not_parked: Family<WhyLabels, Counter>,
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0,
    ])
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mailintegration_gateway");
        let sessions = Family::<SessionLabels, Gauge>::default();
        registry.register(
            "sessions",
            "Relayed sessions open now, by protocol and app",
            sessions.clone(),
        );
        let sessions_total = Family::<SessionLabels, Counter>::default();
        registry.register(
            "sessions_opened",
            "Relayed sessions opened, by protocol and app",
            sessions_total.clone(),
        );
        let logins = Family::<LoginLabels, Counter>::default();
        registry.register("logins", "Logins by protocol and result", logins.clone());
        let throttle = Family::<KindLabels, Counter>::default();
        registry.register(
            "login_throttle",
            "Failed logins the throttle delayed or refused",
            throttle.clone(),
        );
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "relayed_bytes",
            "Bytes relayed between apps and mail servers, by protocol and direction",
            bytes.clone(),
        );
        let upstream_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstream sessions that failed, by protocol and reason",
            upstream_errors.clone(),
        );
        let connections_closed = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connections_closed",
            "Connections the gateway closed before a login, by protocol and reason",
            connections_closed.clone(),
        );
        let session_duration = Family::<ProtocolLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "session_duration_seconds",
            "How long relayed sessions lasted",
            session_duration.clone(),
        );
        let integrations = Gauge::default();
        registry.register(
            "integrations",
            "Integrations the gateway knows (gateway Secrets read)",
            integrations.clone(),
        );
        let secrets_ignored = Family::<KindLabels, Counter>::default();
        registry.register(
            "secrets_ignored",
            "Gateway Secrets ignored, by why",
            secrets_ignored.clone(),
        );
        let usage_writes = Family::<KindLabels, Counter>::default();
        registry.register(
            "usage_writes",
            "Writes of status.gateway.apps[].lastUsedTime, by result",
            usage_writes.clone(),
        );
        let upstream_parked = Counter::default();
        registry.register(
            "imap_upstream_parked",
            "IMAP upstream sessions parked for the same credential's next login",
            upstream_parked.clone(),
        );
        let upstream_reused = Counter::default();
        registry.register(
            "imap_upstream_reused",
            "IMAP logins that got a parked upstream session instead of a new one",
            upstream_reused.clone(),
        );
        let upstream_parked_now = Gauge::default();
        registry.register(
            "imap_upstream_parked_now",
            "IMAP upstream sessions parked now",
            upstream_parked_now.clone(),
        );
        let upstream_park_dropped = Family::<WhyLabels, Counter>::default();
        registry.register(
            "imap_upstream_park_dropped",
            "Parked IMAP upstream sessions logged out, by reason",
            upstream_park_dropped.clone(),
        );
        let upstream_not_parked = Family::<WhyLabels, Counter>::default();
        registry.register(
            "imap_upstream_not_parked",
            "IMAP upstream sessions logged out at the app's LOGOUT instead of parked, by reason",
            upstream_not_parked.clone(),
        );
        let kube_api = crate::kube_client::ApiMetrics::default();
        kube_api.register(&mut registry);
        for protocol in [Protocol::Imap, Protocol::Pop3, Protocol::Smtp] {
            for result in ["success", "bad_credential", "throttled"] {
                let _ = logins.get_or_create(&LoginLabels {
                    protocol: protocol.name().into(),
                    result: result.into(),
                });
            }
        }
        Self {
            registry,
            sessions,
            sessions_total,
            logins,
            throttle,
            bytes,
            upstream_errors,
            connections_closed,
            session_duration,
            integrations,
            secrets_ignored,
            kube_api,
            usage_writes,
            upstream_parked,
            upstream_reused,
            upstream_parked_now,
            upstream_park_dropped,
            upstream_not_parked,
        }
    }
}

impl GatewayMetrics {
    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an error would only leave the text short.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn login(&self, protocol: Protocol, result: &str) {
        self.logins
            .get_or_create(&LoginLabels {
                protocol: protocol.name().into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn upstream_error(&self, protocol: Protocol, reason: &str) {
        self.upstream_errors
            .get_or_create(&ReasonLabels {
                protocol: protocol.name().into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn closed(&self, protocol: Protocol, reason: &str) {
        self.connections_closed
            .get_or_create(&ReasonLabels {
                protocol: protocol.name().into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn throttled(&self, kind: &str) {
        self.throttle
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    /// A parked IMAP upstream session ended, and why.
    pub fn park_dropped(&self, reason: &str) {
        self.upstream_park_dropped
            .get_or_create(&WhyLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// An IMAP upstream session was logged out at the app's LOGOUT instead of parked, and why.
    pub fn not_parked(&self, reason: &str) {
        self.upstream_not_parked
            .get_or_create(&WhyLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// The byte counter of one direction, to count into while relaying.
    pub fn bytes_counter(&self, protocol: Protocol, direction: &str) -> Counter {
        self.bytes
            .get_or_create(&BytesLabels {
                protocol: protocol.name().into(),
                direction: direction.into(),
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_families_are_served_from_the_start() {
        let m = GatewayMetrics::default();
        m.login(Protocol::Imap, "success");
        let text = m.encode();
        assert!(
            text.contains(
                r#"mailintegration_gateway_logins_total{protocol="IMAP",result="success"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"result="throttled"} 0"#), "{text}");
    }
}
