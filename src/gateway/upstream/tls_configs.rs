//! The gateway's TLS client configurations towards mail servers, one per trust set (the public
//! roots plus an integration's `caPem`), kept for the process's life.
//!
//! Why: building a `rustls::ClientConfig` per upstream connection re-parses the CA PEM and copies
//! the root store for every login, and, worse, gives each connection an empty session cache, so
//! every login paid a full TLS handshake with the mail server (certificate chain verified again,
//! the server signing again). A cached configuration keeps rustls' in-memory session cache (its
//! default: 256 server names, a few TLS 1.3 tickets each), so later logins to the same server
//! resume.
//!
//! Keyed by the SHA-256 of the trimmed `caPem` (no CA: the empty string), so a session established
//! under one trust set is only ever resumed by connections that trust exactly the same CAs: an
//! integration's private CA cannot vouch for a server another integration talks to. Bounded: at
//! most [`CAPACITY`] trust sets; past it the least recently used one is dropped (its sessions with
//! it; connections holding it keep their `Arc`). A `caPem` that does not parse is not cached: the
//! error comes back at each login, as before.

use std::sync::{Arc, LazyLock, Mutex};

use rustls::ClientConfig;
use sha2::{Digest, Sha256};

use super::UpstreamError;
use crate::mailbox::tls;

/// Distinct CA bundles whose configuration is kept (integrations with the same `caPem`, or with
/// none, share one).
pub const CAPACITY: usize = 64;

/// The process's cache (one gateway process serves every integration it watches).
static CONFIGS: LazyLock<ConfigCache> = LazyLock::new(|| ConfigCache::new(CAPACITY));

/// The client configuration for an integration's `caPem` (trimmed; `None` or blank: public roots
/// only), from the process's cache.
pub fn client_config(ca_pem: Option<&str>) -> Result<Arc<ClientConfig>, UpstreamError> {
    CONFIGS.get(ca_pem)
}

type Key = [u8; 32];

struct Slot {
    key: Key,
    config: Arc<ClientConfig>,
    /// The cache's clock at the last use.
    used: u64,
}

/// Client configurations by CA bundle, at most `capacity`, least recently used dropped first.
pub struct ConfigCache {
    capacity: usize,
    slots: Mutex<(u64, Vec<Slot>)>,
}

impl ConfigCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            slots: Mutex::new((0, Vec::new())),
        }
    }

    fn key(pem: &str) -> Key {
        Sha256::digest(pem.as_bytes()).into()
    }

    /// The cached configuration for `ca_pem`, or a new one (built outside the lock) put in.
    pub fn get(&self, ca_pem: Option<&str>) -> Result<Arc<ClientConfig>, UpstreamError> {
        let pem = ca_pem.map(str::trim).unwrap_or_default();
        let key = Self::key(pem);
        if let Some(config) = self.lookup(&key) {
            return Ok(config);
        }
        let extra_cas = if pem.is_empty() {
            Vec::new()
        } else {
            tls::parse_ca_pem(pem.as_bytes())?
        };
        // TLS_AES_128_GCM_SHA256 offered first (src/gateway/crypto.rs).
        let built = tls::client_config_with(crate::gateway::crypto::provider(), &extra_cas)?;
        Ok(self.insert(key, built))
    }

    fn lookup(&self, key: &Key) -> Option<Arc<ClientConfig>> {
        let mut guard = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let (clock, slots) = &mut *guard;
        *clock = clock.wrapping_add(1);
        let slot = slots.iter_mut().find(|s| &s.key == key)?;
        slot.used = *clock;
        Some(slot.config.clone())
    }

    /// Put `built` in, unless another login put one in for the same key meanwhile (then that one
    /// is used, so that both share its sessions).
    fn insert(&self, key: Key, built: Arc<ClientConfig>) -> Arc<ClientConfig> {
        let mut guard = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let (clock, slots) = &mut *guard;
        *clock = clock.wrapping_add(1);
        let now = *clock;
        if let Some(slot) = slots.iter_mut().find(|s| s.key == key) {
            slot.used = now;
            return slot.config.clone();
        }
        if slots.len() >= self.capacity
            && let Some(oldest) = slots
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.used)
                .map(|(i, _)| i)
        {
            slots.swap_remove(oldest);
        }
        slots.push(Slot {
            key,
            config: built.clone(),
            used: now,
        });
        built
    }

    /// How many configurations are kept.
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).1.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed CA certificate (openssl, P-256, valid to 2126; its key was thrown away: only its
    /// parsing into a trust anchor matters here).
    const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBjDCCATGgAwIBAgIUcH7P3M5taggiBQGbU/36COD3GFwwCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPZ2F0ZXdheS10ZXN0LWNhMCAXDTI2MTIwNjIzNTI0MVoYDzIx
MjYxMTEyMjM1MjQxWjAaMRgwFgYDVQQDDA9nYXRld2F5LXRlc3QtY2EwWTATBgcq
hkjOPQIBBggqhkjOPQMBBwNCAARu7D0oFIAcBAHE/pBloD5iRxi1sDp3Rz6DNTNr
vDREyGasDw4i0UIlbufJDcvKBQ9RRW0eO0Q1rX91fcqM2v8po1MwUTAdBgNVHQ4E
FgQUYtgs03eKKz30BmLvxM8UGKpVlaswHwYDVR0jBBgwFoAUYtgs03eKKz30BmLv
xM8UGKpVlaswDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNJADBGAiEA1yZh
gTY7peYfL1b3pWAw5tGCjOrJJw94Re1G/HIhNJcCIQCWBOQsCg/aUF5GlOwcmXP5
Z5W56Fa3nKsmYJESaLNL2w==
-----END CERTIFICATE-----";

    #[test]
    fn one_configuration_per_ca_bundle_shared_and_bounded() {
        let cache = ConfigCache::new(2);
        let public = cache.get(None).unwrap();
        assert!(Arc::ptr_eq(&public, &cache.get(Some("  \n")).unwrap()));
        assert!(Arc::ptr_eq(&public, &cache.get(None).unwrap()));
        assert_eq!(cache.len(), 1);
        let private = cache.get(Some(CA)).unwrap();
        assert!(!Arc::ptr_eq(&public, &private));
        assert!(Arc::ptr_eq(
            &private,
            &cache.get(Some(&format!("\n{CA}\n"))).unwrap()
        ));
        assert_eq!(cache.len(), 2);
        // Public used last: a third bundle drops the private one.
        cache.get(None).unwrap();
        let other = format!("{CA}\n{CA}");
        cache.get(Some(&other)).unwrap();
        assert_eq!(cache.len(), 2);
        assert!(Arc::ptr_eq(&public, &cache.get(None).unwrap()));
        assert!(!Arc::ptr_eq(&private, &cache.get(Some(CA)).unwrap()));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_bad_ca_is_an_error_each_time_and_not_kept() {
        let cache = ConfigCache::new(4);
        for _ in 0..2 {
            let e = cache.get(Some("not a PEM")).unwrap_err();
            assert_eq!(e.reason(), "tls", "{e}");
        }
        assert!(cache.is_empty());
    }
}
