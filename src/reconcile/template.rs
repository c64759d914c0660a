//! `spec.tokenSecret.template`: extra labels, annotations and keys of the token Secret, rendered
//! with MiniJinja (Jinja2) from the token's fields. A template is the tenant's input: rendering is
//! bounded (fuel, size), undefined names are errors, and an error message never carries a rendered
//! value — templates are checked against placeholder values first, where a detailed message is
//! safe, and a failure with the real values is reported by kind and line only.

use crate::{api::TokenSecretTemplate, secret::SecretValue};
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;
use std::collections::BTreeMap;

/// How much a template may compute (MiniJinja fuel: roughly one unit per instruction).
const FUEL: u64 = 100_000;
/// The largest rendered value.
pub const MAX_RENDERED: usize = 64 * 1024;

/// The values a template sees.
#[derive(Serialize)]
pub struct TokenFields<'a> {
    pub access_token: &'a str,
    pub token_type: &'a str,
    pub expiry: &'a str,
    pub username: &'a str,
    pub xoauth2: &'a str,
    pub oauthbearer: &'a str,
    pub mail_server: &'a str,
    pub mail_port: u16,
}

impl TokenFields<'static> {
    /// Stand-ins of the right shape, for [`check`].
    fn placeholders() -> Self {
        TokenFields {
            access_token: "ya29.placeholder-access-token",
            token_type: "Bearer",
            expiry: "2026-01-01T00:00:00Z",
            username: "mailbox@example.com",
            xoauth2: "dXNlcj1tYWlsYm94QGV4YW1wbGUuY29tAWF1dGg9QmVhcmVyIHBsYWNlaG9sZGVyAQE=",
            oauthbearer: "bixhPW1haWxib3hAZXhhbXBsZS5jb20sAWF1dGg9QmVhcmVyIHBsYWNlaG9sZGVyAQE=",
            mail_server: "imap.example.com",
            mail_port: 993,
        }
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(16);
    // A config file keeps its last newline.
    env.set_keep_trailing_newline(true);
    env
}

/// Whether `t` renders (with placeholder values): `Err` says which key or label and why.
pub fn check(t: &TokenSecretTemplate) -> Result<(), String> {
    render_with(t, &TokenFields::placeholders(), true).map(|_| ())
}

/// The rendered keys of the token Secret.
pub fn render(
    t: &TokenSecretTemplate,
    fields: &TokenFields<'_>,
) -> Result<BTreeMap<String, SecretValue>, String> {
    render_with(t, fields, false)
}

fn render_with(
    t: &TokenSecretTemplate,
    fields: &TokenFields<'_>,
    detailed: bool,
) -> Result<BTreeMap<String, SecretValue>, String> {
    let env = environment();
    let mut out = BTreeMap::new();
    for (key, source) in &t.data {
        let rendered = env.render_str(source, fields).map_err(|e| {
            let line = e.line().map(|l| format!(" (line {l})")).unwrap_or_default();
            if detailed {
                format!("spec.tokenSecret.template.data[{key:?}]{line}: {e}")
            } else {
                format!(
                    "spec.tokenSecret.template.data[{key:?}]{line}: {}",
                    e.kind()
                )
            }
        })?;
        if rendered.len() > MAX_RENDERED {
            return Err(format!(
                "spec.tokenSecret.template.data[{key:?}] renders to more than {MAX_RENDERED} bytes"
            ));
        }
        out.insert(key.clone(), SecretValue::new(rendered));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(pairs: &[(&str, &str)]) -> TokenSecretTemplate {
        TokenSecretTemplate {
            data: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }
    }

    fn fields<'a>(token: &'a str) -> TokenFields<'a> {
        TokenFields {
            access_token: token,
            token_type: "Bearer",
            expiry: "2026-12-01T10:00:00Z",
            username: "support@example.com",
            xoauth2: "eA==",
            oauthbearer: "",
            mail_server: "imap.gmail.com",
            mail_port: 993,
        }
    }

    #[test]
    fn renders_the_token_fields() {
        let t = template(&[(
            "app.ini",
            "[mail]\nuser = {{ username }}\npassword = {{ access_token }}\nhost = {{ mail_server }}:{{ mail_port }}\n",
        )]);
        check(&t).unwrap();
        let out = render(&t, &fields("tok-123")).unwrap();
        assert_eq!(
            out["app.ini"].expose(),
            "[mail]\nuser = support@example.com\npassword = tok-123\nhost = imap.gmail.com:993\n"
        );
    }

    #[test]
    fn hostile_or_broken_templates_fail_with_a_message_and_never_the_token() {
        for (bad, says) in [
            ("{{ refresh_token }}", "undefined"),
            ("{{ access_token", "syntax"),
            (
                "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                "fuel",
            ),
            ("{{ access_token | int }}", "data[\"k\"]"),
        ] {
            let t = template(&[("k", bad)]);
            let e = check(&t).expect_err(bad);
            assert!(e.to_lowercase().contains(says), "{bad}: {e}");
            let e = render(&t, &fields("SECRET-TOKEN-VALUE")).expect_err(bad);
            assert!(!e.contains("SECRET-TOKEN-VALUE"), "{bad}: {e}");
        }
        let huge = template(&[(
            "k",
            "{% for i in range(70) %}{{ xoauth2 * 1000 }}{% endfor %}",
        )]);
        assert!(render(&huge, &fields("t")).is_err());
    }
}
