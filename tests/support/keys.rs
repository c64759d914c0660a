//! RSA keys and self-signed certificates for certificate credentials and service accounts, made
//! with the openssl CLI (as the tests' Dovecot CA is) in a temp dir for each call.

use std::process::Command;

pub struct TestKey {
    /// A self-signed certificate (what an admin uploads to the app registration).
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM (as `kubectl create secret tls` and Google's key files hold it).
    pub key_pem: String,
    /// The public key, SPKI PEM.
    pub public_pem: String,
}

impl TestKey {
    pub fn new(cn: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl is needed to make test keys (apt-get install openssl)");
            assert!(
                out.status.success(),
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let subject = format!("/CN={cn}");
        run(&[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out",
            "cert.pem", "-days", "30", "-subj", &subject,
        ]);
        run(&[
            "x509", "-in", "cert.pem", "-pubkey", "-noout", "-out", "pub.pem",
        ]);
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        Self {
            cert_pem: read("cert.pem"),
            key_pem: read("key.pem"),
            public_pem: read("pub.pem"),
        }
    }

    /// This key as an OAuth client's certificate credential at the test OAuth server.
    pub fn client_certificate(&self) -> super::oauth::ClientCertificate {
        super::oauth::ClientCertificate {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            public_pem: self.public_pem.clone(),
        }
    }

    /// A Google service-account key file with this key.
    pub fn service_account_json(&self, client_email: &str, client_id: &str) -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": "mio-test",
            "private_key_id": "0123456789abcdef",
            "private_key": self.key_pem,
            "client_email": client_email,
            "client_id": client_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string()
    }
}
