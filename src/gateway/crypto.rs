//! The gateway's TLS cipher suite preference, for its server (towards apps) and its client
//! (towards mail servers): ring's suites with `TLS_AES_128_GCM_SHA256` first.
//!
//! Why: every login through the gateway runs two TLS 1.3 handshakes (the app's, and the resumed
//! one with the mail server), and ring's default order puts `TLS_AES_256_GCM_SHA384` first, whose
//! key schedule is SHA-384: in software on x86 CPUs with SHA extensions (`sha_ni`), which speed up
//! SHA-256 only (a profile of the gateway, benches/README.md "Gateway": SHA-384 6 % of its CPU).
//! AES-128-GCM is TLS 1.3's mandatory suite (RFC 8446 9.1) and what browsers prefer; the other
//! suites stay offered, in ring's order. The server picks by its own order
//! (`ignore_client_order`), the client offers this order to the mail server, which by default
//! picks by the client's.

use std::sync::{Arc, LazyLock};

use rustls::{
    CipherSuite,
    crypto::{CryptoProvider, ring},
};

/// ring's provider with the suites reordered (module doc), shared by every configuration.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> =
        LazyLock::new(|| Arc::new(prefer_aes_128(ring::default_provider())));
    PROVIDER.clone()
}

/// `provider` with `TLS13_AES_128_GCM_SHA256` first, the others in their order.
pub fn prefer_aes_128(mut provider: CryptoProvider) -> CryptoProvider {
    // A stable sort: only the preferred suite moves.
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_comes_first_and_nothing_is_dropped() {
        let default: Vec<CipherSuite> = ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let ours: Vec<CipherSuite> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(ours.first(), Some(&CipherSuite::TLS13_AES_128_GCM_SHA256));
        assert_eq!(ours.len(), default.len());
        let rest: Vec<_> = default
            .iter()
            .filter(|s| **s != CipherSuite::TLS13_AES_128_GCM_SHA256)
            .collect();
        assert_eq!(ours.iter().skip(1).collect::<Vec<_>>(), rest);
    }
}
