//! TLS towards mail servers: rustls with the `ring` provider, always verifying the certificate.
//!
//! Trust anchors are the Mozilla root program as shipped by `webpki-roots`, plus the CA certificates
//! given for the integration. `webpki-roots` rather than `rustls-native-certs`: the operator runs from
//! a minimal (distroless) image that has no system CA bundle to load, the roots are then the same on
//! every node and in every test, and the HTTP client (reqwest with `rustls-tls`) trusts the same set
//! — so the OAuth calls and the mailbox check never disagree about a certificate. Servers with a
//! private CA are configured with explicit CA certificates instead of through the image.
//! There is deliberately no way to skip verification.

use std::{error::Error as StdError, io, sync::Arc};

use rustls::{CertificateError, ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{MailboxError, bounded, sasl};

/// Parse the extra CA certificates (PEM, one or more `CERTIFICATE` blocks).
pub(crate) fn parse_ca_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, MailboxError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| MailboxError::Tls {
            detail: format!("the CA certificates are not valid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(MailboxError::Tls {
            detail: "the CA certificates contain no PEM CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// A client configuration trusting the webpki roots plus `extra_cas`.
pub(crate) fn client_config(
    extra_cas: &[CertificateDer<'static>],
) -> Result<Arc<ClientConfig>, MailboxError> {
    client_config_with(
        Arc::new(rustls::crypto::ring::default_provider()),
        extra_cas,
    )
}

/// [`client_config`] with the cipher suites of `provider` (the gateway's order).
pub(crate) fn client_config_with(
    provider: Arc<rustls::crypto::CryptoProvider>,
    extra_cas: &[CertificateDer<'static>],
) -> Result<Arc<ClientConfig>, MailboxError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in extra_cas {
        roots.add(cert.clone()).map_err(|e| MailboxError::Tls {
            detail: format!("a configured CA certificate cannot be used as a trust anchor: {e}"),
        })?;
    }
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MailboxError::Tls {
            detail: format!("TLS configuration: {e}"),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Run the TLS handshake over `stream`, verifying the certificate for `host` (`port` is for messages).
pub(crate) async fn handshake<S>(
    config: Arc<ClientConfig>,
    host: &str,
    port: u16,
    stream: S,
) -> Result<TlsStream<S>, MailboxError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(host.to_owned()).map_err(|_| MailboxError::Tls {
        detail: format!("{host:?} is not a valid TLS server name"),
    })?;
    TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| classify_io(&e, &format!("{host}:{port}"), "during the TLS handshake"))
}

/// Open the TCP connection: resolve `host` once, check every address it resolved to against
/// `allowed` (all or nothing: a name that also leads somewhere forbidden is not used), and connect
/// to those addresses (no second resolution, which could answer otherwise).
pub(crate) async fn connect(
    host: &str,
    port: u16,
    allowed: Option<&super::allowed::AllowedHosts>,
) -> Result<TcpStream, MailboxError> {
    let unreachable = |e: &dyn std::fmt::Display| MailboxError::Unreachable {
        detail: format!("cannot connect to {host}:{port}: {e}"),
    };
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| unreachable(&e))?
        .collect();
    if let Some(allowed) = allowed
        && let Some(bad) = addrs.iter().find(|a| !allowed.allows_address(a.ip()))
    {
        return Err(MailboxError::AddressNotAllowed {
            detail: format!(
                "the mail server {host} resolves to {}, an address the operator does not connect to (loopback, link-local, private or otherwise special): ask the operator's admin to add that address or its network to --mailbox-allowed-hosts",
                bad.ip()
            ),
        });
    }
    if addrs.is_empty() {
        return Err(unreachable(&"the name resolves to no address"));
    }
    let tcp = TcpStream::connect(addrs.as_slice())
        .await
        .map_err(|e| unreachable(&e))?;
    // Commands go out as soon as they are written. async-imap writes a command in four pieces
    // (tag, space, command, line end); with Nagle's algorithm the later pieces wait for the
    // server's delayed ACK of the first (40 ms on Linux), for each command: a check against a
    // loopback server that answers at once took 91 ms instead of 1.7.
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// The rustls error somewhere in an error's chain (an `io::Error` hides it behind `get_ref`).
pub(crate) fn find_rustls_error<'a>(
    err: &'a (dyn StdError + 'static),
) -> Option<&'a rustls::Error> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = e.downcast_ref::<io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(tls) = find_rustls_error(inner)
        {
            return Some(tls);
        }
        current = e.source();
    }
    None
}

/// An I/O error on the connection: a TLS problem, a lost connection, or something else the server did.
pub(crate) fn classify_io(err: &io::Error, host: &str, when: &str) -> MailboxError {
    if let Some(overrun) = bounded::find(err) {
        return overrun.error(host, when);
    }
    if let Some(tls) = find_rustls_error(err) {
        return MailboxError::Tls {
            detail: describe_tls_error(tls, host),
        };
    }
    use io::ErrorKind::*;
    match err.kind() {
        ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | BrokenPipe
        | TimedOut | UnexpectedEof | HostUnreachable | NetworkUnreachable | NetworkDown
        | AddrNotAvailable => MailboxError::Unreachable {
            detail: format!("connection to {host} failed {when}: {err}"),
        },
        // Bounded and stripped of control characters: async-imap's parse errors quote the whole
        // buffer, which the server filled.
        _ => MailboxError::Protocol {
            detail: sasl::printable(&format!("I/O error {when}: {err}")),
        },
    }
}

/// A rustls error stated for a person: what is wrong with the certificate, in rustls' own terms in
/// parentheses so that it can be searched for.
pub(crate) fn describe_tls_error(err: &rustls::Error, host: &str) -> String {
    match err {
        rustls::Error::InvalidCertificate(cert) => {
            let (what, name) = match cert {
                CertificateError::UnknownIssuer => (
                    "certificate not trusted: it was not issued by a public CA or by one of the configured CA certificates",
                    "UnknownIssuer",
                ),
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    ("certificate is for another host name", "NotValidForName")
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    ("certificate has expired", "Expired")
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    ("certificate is not valid yet", "NotValidYet")
                }
                CertificateError::Revoked => ("certificate has been revoked", "Revoked"),
                CertificateError::BadSignature => {
                    ("certificate signature is invalid", "BadSignature")
                }
                CertificateError::BadEncoding => ("certificate cannot be parsed", "BadEncoding"),
                CertificateError::InvalidPurpose
                | CertificateError::InvalidPurposeContext { .. } => {
                    ("certificate is not for TLS servers", "InvalidPurpose")
                }
                _ => ("certificate rejected", "Other"),
            };
            let name = if name == "Other" {
                format!("{cert:?}")
            } else {
                name.to_owned()
            };
            format!("{host}: {what} ({name})")
        }
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => format!(
            "{host}: TLS handshake failed ({err}); is this a plain-text port? Use tls: StartTLS for it, or the implicit-TLS port"
        ),
        rustls::Error::AlertReceived(alert) => {
            format!("{host}: the server aborted the TLS handshake (alert {alert:?})")
        }
        other => format!("{host}: TLS handshake failed ({other})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_issuer_is_stated_clearly() {
        let e = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = io::Error::new(io::ErrorKind::InvalidData, e);
        match classify_io(&io, "imap.example.com", "during the TLS handshake") {
            MailboxError::Tls { detail } => {
                assert!(detail.contains("certificate not trusted"), "{detail}");
                assert!(detail.contains("(UnknownIssuer)"), "{detail}");
            }
            other => panic!("expected Tls, got {other:?}"),
        }
    }

    #[test]
    fn refused_is_unreachable_and_other_io_is_protocol() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(matches!(
            classify_io(&refused, "h", "x"),
            MailboxError::Unreachable { .. }
        ));
        let other = io::Error::other("weird");
        assert!(matches!(
            classify_io(&other, "h", "x"),
            MailboxError::Protocol { .. }
        ));
    }

    #[test]
    fn ca_pem_must_hold_a_certificate() {
        assert!(matches!(
            parse_ca_pem(b"not pem"),
            Err(MailboxError::Tls { .. })
        ));
    }

    /// The connection to a mail server sends each write at once (no Nagle): async-imap writes a
    /// command in four pieces, and with Nagle each command waited 40 ms for the server's delayed
    /// ACK (a check against a loopback server: 91 ms instead of 1.7).
    #[tokio::test]
    async fn the_connection_to_a_mail_server_does_not_wait_to_coalesce_writes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let allowed = super::super::allowed::AllowedHosts::with_defaults([]).with_loopback();
        let tcp = connect("127.0.0.1", port, Some(&allowed)).await.unwrap();
        assert!(tcp.nodelay().unwrap(), "TCP_NODELAY is not set");
    }
}
