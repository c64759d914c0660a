//! The gateway's TLS towards mail servers (`src/gateway/upstream/tls_configs.rs`): one client
//! configuration per CA bundle, kept, so that later connections to the same server resume their
//! TLS session (the IMAP login rate through the gateway, benches/README.md "Gateway"), and only
//! under exactly the same trust set.

use std::sync::Arc;

use mail_integration_operator::{
    api::TlsMode,
    gateway::{
        config::UpstreamServer,
        upstream::{self, Stream},
    },
    mailbox::allowed::AllowedHosts,
};
use rustls::HandshakeKind;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::dovecot::TestCa;

/// A TLS server on loopback with rustls' defaults (a session cache, TLS 1.3 tickets after each
/// handshake) that greets and then waits for the client to close. Its port and its CA's PEM.
async fn tls_server(dir: &std::path::Path) -> (u16, String) {
    let ca = TestCa::generate(dir, "upstream-ca");
    let (cert, key) = ca.issue_server_cert(dir, "upstream");
    let certs = CertificateDer::pem_file_iter(&cert)
        .expect("cert file")
        .collect::<Result<Vec<_>, _>>()
        .expect("cert PEM");
    let key = PrivateKeyDer::from_pem_file(&key).expect("key PEM");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("certificate and key");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"* OK hi\r\n").await;
                    let mut rest = Vec::new();
                    let _ = tls.read_to_end(&mut rest).await;
                }
            });
        }
    });
    let pem = String::from_utf8(ca.cert_pem.clone()).expect("CA PEM");
    (port, pem)
}

/// How each of `n` connections' handshakes went, one after the other, each reading the greeting
/// (which also takes in the server's session tickets).
async fn handshakes(port: u16, ca_pem: &str, n: usize) -> Vec<Option<HandshakeKind>> {
    let server = UpstreamServer {
        host: "127.0.0.1".into(),
        port,
        tls: TlsMode::Implicit,
    };
    let allowed = AllowedHosts::new(["127.0.0.1"]);
    let mut kinds = Vec::new();
    for _ in 0..n {
        let (stream, _) = upstream::open_stream(&server, Some(ca_pem), &allowed)
            .await
            .expect("TLS connection to the test server");
        let Stream::Tls(mut tls) = stream else {
            panic!("implicit TLS gave a plain stream");
        };
        let mut greeting = [0u8; 9];
        tls.read_exact(&mut greeting).await.expect("greeting");
        assert_eq!(&greeting, b"* OK hi\r\n");
        kinds.push(tls.get_ref().1.handshake_kind());
    }
    kinds
}

#[tokio::test]
async fn later_upstream_connections_resume_their_tls_session_only_under_the_same_cas() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (port, ca_pem) = tls_server(dir.path()).await;
    let full = Some(HandshakeKind::Full);
    let resumed = Some(HandshakeKind::Resumed);
    // A configuration per connection (as before the cache) gave Full every time.
    assert_eq!(handshakes(port, &ca_pem, 3).await, [full, resumed, resumed]);
    // The same CAs written otherwise (here: twice) are another trust set, with sessions of its
    // own: what one bundle's connections established is never resumed under another's.
    let twice = format!("{ca_pem}\n{ca_pem}");
    assert_eq!(handshakes(port, &twice, 2).await, [full, resumed]);
    assert_eq!(handshakes(port, &ca_pem, 1).await, [resumed]);
}
