use super::*;
use jsonwebtoken::{DecodingKey, Validation, decode, decode_header};
use std::process::Command;

/// A fresh RSA key and self-signed certificate from the openssl CLI (as the tests' Dovecot CA):
/// (cert PEM, key PEM, public key PEM, SHA-1 fingerprint as openssl prints it).
pub(crate) fn keypair() -> (Vec<u8>, Vec<u8>, Vec<u8>, String) {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("openssl is needed (apt-get install openssl)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "k.pem",
        "-out",
        "c.pem",
        "-days",
        "2",
        "-subj",
        "/CN=mio-app",
    ]);
    run(&["x509", "-in", "c.pem", "-pubkey", "-noout", "-out", "p.pem"]);
    let fp = String::from_utf8(run(&[
        "x509",
        "-in",
        "c.pem",
        "-noout",
        "-fingerprint",
        "-sha1",
    ]))
    .unwrap();
    let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
    let fp = fp.trim().rsplit('=').next().unwrap().replace(':', "");
    (read("c.pem"), read("k.pem"), read("p.pem"), fp)
}

fn now() -> Timestamp {
    Timestamp::now()
}

#[test]
fn a_client_assertion_verifies_with_the_certificates_public_key() {
    let (cert, key, public, fingerprint) = keypair();
    for alg in [AssertionAlgorithm::RS256, AssertionAlgorithm::PS256] {
        let c = CertificateKey::from_pem(&cert, &key, alg).unwrap();
        assert_eq!(
            c.thumbprint_hex(),
            fingerprint,
            "x5t is the certificate's SHA-1 thumbprint"
        );
        let jwt = c
            .client_assertion("app-1", "https://login.example/token", now())
            .unwrap();
        let header = decode_header(jwt.expose()).unwrap();
        assert_eq!(header.alg, alg.jwt());
        assert!(header.x5t_s256.is_some());
        let mut v = Validation::new(alg.jwt());
        v.set_audience(&["https://login.example/token"]);
        v.set_issuer(&["app-1"]);
        let data = decode::<serde_json::Value>(
            jwt.expose(),
            &DecodingKey::from_rsa_pem(&public).unwrap(),
            &v,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "app-1");
        let lifetime = data.claims["exp"].as_i64().unwrap() - data.claims["iat"].as_i64().unwrap();
        assert_eq!(lifetime, 300);
        assert!(data.claims["jti"].as_str().is_some_and(|j| j.len() >= 16));
    }
}

#[test]
fn a_service_account_assertion_has_googles_claims() {
    let (_, key, public, _) = keypair();
    let json = serde_json::json!({
        "type": "service_account",
        "client_email": "mailer@project.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "private_key_id": "abc",
        "private_key": String::from_utf8(key).unwrap(),
        "token_uri": "https://oauth2.googleapis.com/token",
    });
    let sa = ServiceAccountKey::from_json(json.to_string().as_bytes()).unwrap();
    assert_eq!(sa.client_id, "1234567890");
    let scopes = vec!["https://mail.google.com/".to_owned()];
    let jwt = sa
        .grant_assertion(
            "support@example.com",
            &scopes,
            "https://oauth2.googleapis.com/token",
            now(),
        )
        .unwrap();
    assert_eq!(
        decode_header(jwt.expose()).unwrap().kid.as_deref(),
        Some("abc")
    );
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&["https://oauth2.googleapis.com/token"]);
    let c = decode::<serde_json::Value>(
        jwt.expose(),
        &DecodingKey::from_rsa_pem(&public).unwrap(),
        &v,
    )
    .unwrap()
    .claims;
    assert_eq!(c["iss"], "mailer@project.iam.gserviceaccount.com");
    assert_eq!(c["sub"], "support@example.com");
    assert_eq!(c["scope"], "https://mail.google.com/");
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3600
    );
}

#[test]
fn unusable_keys_are_refused_without_their_content() {
    let (cert, key, _, _) = keypair();
    let key_text = String::from_utf8(key.clone()).unwrap();
    let body: String = key_text.lines().nth(1).unwrap().to_owned();
    // A damaged key (a line dropped): refused when read, the message quotes nothing of it.
    let damaged: String = key_text
        .lines()
        .filter(|l| *l != body)
        .collect::<Vec<_>>()
        .join("\n");
    let err = CertificateKey::from_pem(&cert, damaged.as_bytes(), AssertionAlgorithm::RS256)
        .err()
        .unwrap();
    assert!(matches!(err, KeyProblem::BadPrivateKey(_)), "{err}");
    assert!(!err.to_string().contains(&body[..20]));
    assert_eq!(
        CertificateKey::from_pem(b"not a cert", &key, AssertionAlgorithm::RS256).err(),
        Some(KeyProblem::NoCertificate)
    );
    // A key file whose JSON is broken right after the private key: serde's message is not kept.
    let broken = format!(
        "{{\"type\":\"service_account\",\"private_key\":{:?} oops}}",
        key_text
    );
    let err = ServiceAccountKey::from_json(broken.as_bytes())
        .err()
        .unwrap();
    assert!(!err.to_string().contains("PRIVATE KEY"), "{err}");
    let no_email =
        serde_json::json!({"type": "service_account", "client_id": "1", "private_key": key_text});
    assert_eq!(
        ServiceAccountKey::from_json(no_email.to_string().as_bytes()).err(),
        Some(KeyProblem::ServiceAccountFieldMissing("client_email"))
    );
    // The address is quoted in conditions: a forged line in it is refused, not quoted.
    let forged = serde_json::json!({"type": "service_account", "client_email": "a@p.iam.gserviceaccount.com\nReady: True", "client_id": "1", "private_key": key_text});
    assert_eq!(
        ServiceAccountKey::from_json(forged.to_string().as_bytes()).err(),
        Some(KeyProblem::ServiceAccountFieldInvalid("client_email"))
    );
    let oauth_client = serde_json::json!({"web": {"client_id": "x"}});
    assert!(matches!(
        ServiceAccountKey::from_json(oauth_client.to_string().as_bytes()),
        Err(KeyProblem::NotServiceAccountJson(_))
    ));
    assert_eq!(
        ServiceAccountKey::from_json(&vec![b' '; MAX_KEY_BYTES + 1]).err(),
        Some(KeyProblem::TooLarge)
    );
}

#[test]
fn debug_names_the_key_but_never_shows_it() {
    let (cert, key, _, fingerprint) = keypair();
    let c = SigningKey::Certificate(
        CertificateKey::from_pem(&cert, &key, AssertionAlgorithm::RS256).unwrap(),
    );
    let shown = format!("{c:?}");
    assert!(
        shown.contains(&fingerprint) && shown.contains("[redacted]"),
        "{shown}"
    );
    let body = String::from_utf8(key).unwrap();
    for line in body.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!shown.contains(line));
    }
    assert_eq!(c, c.clone());
}
