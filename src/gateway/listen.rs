//! The gateway's listeners: TLS from the `--tls-cert`/`--tls-key` files (reloaded when they change,
//! as cert-manager renews them), implicit-TLS ports and STARTTLS ports, and whether a login may
//! happen without TLS (only with `--allow-plaintext`, and only from `--plaintext-networks`).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use ipnet::IpNet;
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::stream::MaybeTls;

/// How often the certificate files are read again.
pub const CERT_RELOAD_PERIOD: Duration = Duration::from_secs(60);

/// The private ranges a cluster's pods and nodes use, and loopback: the default of
/// `--plaintext-networks`.
pub const DEFAULT_PLAINTEXT_NETWORKS: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "fc00::/7",
    "::1/128",
];

/// A connection from an app: plain TCP (before STARTTLS) or TLS.
pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

impl ClientStream {
    /// The TLS handshake on a plain stream (implicit TLS, or after STARTTLS). The caller makes sure
    /// that nothing the app sent before is still buffered (it would be taken as sent under TLS).
    pub async fn start_tls(self, acceptor: &TlsAcceptor) -> io::Result<Self> {
        match self {
            Self::Plain(tcp) => Ok(Self::Tls(Box::new(acceptor.accept(tcp).await?))),
            Self::Tls(_) => Err(io::Error::other("TLS is active already")),
        }
    }
}

/// What a protocol handler knows about its connection's transport security.
#[derive(Clone)]
pub struct TlsState {
    /// Whether the stream is TLS now.
    pub tls: bool,
    /// The acceptor for STARTTLS/STLS, on a port that starts plain; `None` once TLS is active.
    pub starttls: Option<TlsAcceptor>,
    /// Whether a login may happen without TLS (`--allow-plaintext` and the source is in
    /// `--plaintext-networks`).
    pub plaintext_login: bool,
    /// The greeting went out with the TLS handshake ([`early_greeting`]): not to be sent again.
    pub greeted: bool,
}

impl TlsState {
    /// Whether the app may log in now.
    pub fn login_allowed(&self) -> bool {
        self.tls || self.plaintext_login
    }

    /// The state after a successful STARTTLS.
    pub fn after_starttls(&self) -> Self {
        Self {
            tls: true,
            starttls: None,
            plaintext_login: self.plaintext_login,
            greeted: false,
        }
    }
}

/// The greeting of an implicit-TLS port (IMAP and POP3; SMTP's side sends its own), to be written
/// into the TLS connection before its handshake (`TlsAcceptor::accept_with`): with
/// `send_half_rtt_data` rustls sends it as TLS 1.3 "0.5-RTT" data right after the server's
/// `Finished`, in the same flight, so the app has it when its handshake completes instead of one
/// more half round trip (and a wake-up of the gateway) later; the same bytes either way (with TLS
/// 1.2 they go out after the handshake). It is sent before the app's `Finished` is checked, which
/// is why only this is: the fixed greeting (capabilities and host name, what any client may see),
/// never anything that depends on the app. The gateway asks for no client certificate (rustls
/// sends no 0.5-RTT data to a client it is authenticating).
pub fn early_greeting(
    protocol: super::session::Protocol,
    tls: &TlsState,
    hostname: &str,
) -> Option<String> {
    use super::session::Protocol;
    match protocol {
        Protocol::Imap => Some(super::imap::greeting(tls, hostname)),
        Protocol::Pop3 => Some(super::pop3::greeting(hostname)),
        Protocol::Smtp => None,
    }
}

/// Whether plaintext logins are allowed from `source`.
pub fn plaintext_allowed(allow: bool, networks: &[IpNet], source: IpAddr) -> bool {
    let source = source.to_canonical();
    allow && networks.iter().any(|n| n.contains(&source))
}

/// Parse `--plaintext-networks` entries (a bare address is a /32 or /128).
pub fn parse_networks(entries: &[String]) -> Result<Vec<IpNet>, String> {
    entries
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.parse::<IpNet>()
                .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{e:?} is not a network (10.0.0.0/8) or an address"))
        })
        .collect()
}

/// The TLS server configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("reading {}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let mut config = ServerConfig::builder_with_provider(super::crypto::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the TLS certificate and key do not fit: {e}"))?;
    config.alpn_protocols = vec![];
    // The gateway's order (TLS_AES_128_GCM_SHA256 first, src/gateway/crypto.rs), not the app's.
    config.ignore_client_order = true;
    // The greeting of an implicit-TLS port goes out with the handshake's last flight
    // ([`early_greeting`]).
    config.send_half_rtt_data = true;
    Ok(Arc::new(config))
}

/// The current TLS acceptor, read again from its files every [`CERT_RELOAD_PERIOD`] (a renewed
/// certificate is used for new connections; a broken file keeps the last good one).
pub struct Certificates {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Vec<u8>, TlsAcceptor)>,
}

impl Certificates {
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<Self, String> {
        let config = server_config(&cert, &key)?;
        let stamp = Self::stamp(&cert, &key);
        Ok(Self {
            cert,
            key,
            current: RwLock::new((stamp, TlsAcceptor::from(config))),
        })
    }

    fn stamp(cert: &Path, key: &Path) -> Vec<u8> {
        let mut s = std::fs::read(cert).unwrap_or_default();
        s.extend(std::fs::read(key).unwrap_or_default());
        s
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// Read the files again; use them if they changed and are good.
    pub fn reload(&self) {
        let stamp = Self::stamp(&self.cert, &self.key);
        if self.current.read().unwrap_or_else(|e| e.into_inner()).0 == stamp {
            return;
        }
        match server_config(&self.cert, &self.key) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) =
                    (stamp, TlsAcceptor::from(config));
                tracing::info!(cert = %self.cert.display(), "loaded the renewed TLS certificate");
            }
            Err(e) => {
                tracing::warn!(error = %e, "the changed TLS files do not load; keeping the last good certificate")
            }
        }
    }
}

/// One listening port of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Port {
    pub protocol: super::session::Protocol,
    pub port: u16,
    /// TLS from the first byte (993, 995, 465); else plain with STARTTLS (143, 110, 587).
    pub implicit_tls: bool,
}

/// The source address of an accepted connection, for logs and throttling.
pub fn source(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_only_with_the_flag_and_from_the_networks() {
        let nets = parse_networks(
            &DEFAULT_PLAINTEXT_NETWORKS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(plaintext_allowed(true, &nets, ip("10.1.2.3")));
        assert!(plaintext_allowed(true, &nets, ip("::ffff:10.1.2.3")));
        assert!(!plaintext_allowed(false, &nets, ip("10.1.2.3")));
        assert!(!plaintext_allowed(true, &nets, ip("203.0.113.9")));
        assert!(parse_networks(&["nonsense".into()]).is_err());
        assert_eq!(parse_networks(&["192.0.2.1".into()]).unwrap().len(), 1);
    }
}
