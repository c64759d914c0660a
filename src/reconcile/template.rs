//! `spec.tokenSecret.template`: extra labels, annotations and keys of the token Secret, rendered
//! with MiniJinja (Jinja2) from the token's fields. A template is the tenant's input:
//!
//! - it is rendered in a child process with a memory limit and a deadline ([`sandbox`]), never in
//!   the operator's own process: fuel counts instructions, not bytes, and one filter call
//!   (`indent`, `*`, `~`, `replace`, `format`, ...) can allocate without bound;
//! - it is rendered only when something it depends on changed ([`digest`]): the template, the
//!   token's fields, or the keys it wrote;
//! - undefined names are errors, and an error message never carries a rendered value: templates
//!   are checked against placeholder values first, where a detailed message is safe, and a
//!   failure with the real values is reported by kind and line only;
//! - labels and annotations that ask a Secret-mirroring controller to copy the token Secret
//!   elsewhere are refused ([`keys`]).

pub mod digest;
pub mod keys;
pub mod sandbox;

pub use sandbox::Renderer;

use crate::secret::SecretValue;
use minijinja::{Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, fmt};

/// How much a template may compute (MiniJinja fuel: roughly one unit per instruction).
const FUEL: u64 = 100_000;
/// The largest rendered value.
pub const MAX_RENDERED: usize = 64 * 1024;
/// The most all rendered values of one template may add up to (a Secret holds at most 1 MiB).
pub const MAX_RENDERED_TOTAL: usize = 512 * 1024;

/// The rendered keys of the token Secret.
pub type Rendered = BTreeMap<String, SecretValue>;

/// The values a template sees. Its `Debug` shows none of them.
#[derive(Serialize, Deserialize, Clone, PartialEq, Default)]
pub struct TokenFields {
    pub access_token: String,
    pub token_type: String,
    pub expiry: String,
    pub username: String,
    pub xoauth2: String,
    pub oauthbearer: String,
    pub mail_server: String,
    pub mail_port: u16,
}

impl fmt::Debug for TokenFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenFields([redacted])")
    }
}

impl TokenFields {
    /// Stand-ins of the right shape, for the check whose messages may be detailed.
    pub fn placeholders() -> Self {
        TokenFields {
            access_token: "ya29.placeholder-access-token".into(),
            token_type: "Bearer".into(),
            expiry: "2026-01-01T00:00:00Z".into(),
            username: "mailbox@example.com".into(),
            xoauth2: "dXNlcj1tYWlsYm94QGV4YW1wbGUuY29tAWF1dGg9QmVhcmVyIHBsYWNlaG9sZGVyAQE=".into(),
            oauthbearer: "bixhPW1haWxib3hAZXhhbXBsZS5jb20sAWF1dGg9QmVhcmVyIHBsYWNlaG9sZGVyAQE="
                .into(),
            mail_server: "imap.example.com".into(),
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

/// Render `data` (key → template) with `fields` in this process. Only the sandbox's child calls
/// this for a tenant's template (see [`sandbox`]): `progress` hears each key before it is
/// rendered, so that a child killed at its limit can say which key it was. `detailed`: the error
/// may quote MiniJinja's message (placeholder values only).
pub fn render_in_process(
    data: &BTreeMap<String, String>,
    fields: &TokenFields,
    detailed: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Rendered, String> {
    let env = environment();
    let mut out = BTreeMap::new();
    let mut total = 0usize;
    for (key, source) in data {
        progress(key);
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
        total = total.saturating_add(rendered.len());
        if total > MAX_RENDERED_TOTAL {
            return Err(format!(
                "spec.tokenSecret.template.data renders to more than {MAX_RENDERED_TOTAL} bytes in all"
            ));
        }
        out.insert(key.clone(), SecretValue::new(rendered));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn fields(token: &str) -> TokenFields {
        TokenFields {
            access_token: token.into(),
            token_type: "Bearer".into(),
            expiry: "2026-12-01T10:00:00Z".into(),
            username: "support@example.com".into(),
            xoauth2: "eA==".into(),
            oauthbearer: String::new(),
            mail_server: "imap.gmail.com".into(),
            mail_port: 993,
        }
    }

    fn check(t: &BTreeMap<String, String>) -> Result<Rendered, String> {
        render_in_process(t, &TokenFields::placeholders(), true, &mut |_| {})
    }

    fn render(t: &BTreeMap<String, String>, f: &TokenFields) -> Result<Rendered, String> {
        render_in_process(t, f, false, &mut |_| {})
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

    #[test]
    fn the_keys_together_are_bounded_too() {
        let each = "{{ 'x' * 60000 }}";
        let t: BTreeMap<String, String> = (0..10).map(|i| (format!("k{i}"), each.into())).collect();
        let e = render(&t, &fields("t")).unwrap_err();
        assert!(e.contains("in all"), "{e}");
    }

    #[test]
    fn progress_names_each_key_before_rendering_it() {
        let t = template(&[("a", "1"), ("b", "{{ nope }}")]);
        let mut seen = Vec::new();
        let _ = render_in_process(&t, &fields("t"), false, &mut |k| seen.push(k.to_owned()));
        assert_eq!(seen, ["a", "b"]);
    }

    #[test]
    fn fields_debug_shows_no_value() {
        assert!(!format!("{:?}", fields("SECRET-TOKEN-VALUE")).contains("SECRET"));
    }
}
