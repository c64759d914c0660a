//! The pages: plain server-rendered HTML with one inline style sheet (allowed by its hash in the
//! Content-Security-Policy), no scripts, fonts or images; readable on a phone.

use super::failure::Failure;
use crate::api::Prompt;
use base64::Engine as _;
use sha2::Digest as _;
use std::fmt::Write as _;
use std::sync::LazyLock;

/// Escape text for HTML element content and double-quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "\
*{box-sizing:border-box}\
body{margin:0;font:16px/1.5 system-ui,-apple-system,\"Segoe UI\",Roboto,sans-serif;color:#1b1f24;background:#f4f5f7}\
main{max-width:34rem;margin:0 auto;padding:1.25rem}\
.card{background:#fff;border:1px solid #d8dce1;border-radius:.5rem;padding:1.25rem}\
h1{font-size:1.35rem;line-height:1.3;margin:0 0 1rem}\
dl{display:grid;grid-template-columns:auto 1fr;gap:.25rem .75rem;margin:0 0 1rem}\
dt{color:#57606a}dd{margin:0;overflow-wrap:anywhere}\
fieldset{border:1px solid #d8dce1;border-radius:.5rem;margin:0 0 1rem;padding:.5rem .75rem}\
legend{font-weight:600;padding:0 .25rem}\
.choice{display:flex;gap:.6rem;align-items:flex-start;padding:.5rem 0}\
.choice input{margin-top:.35rem;width:1.1rem;height:1.1rem;flex:none}\
.choice label{display:block;font-weight:600}.choice small{display:block;color:#57606a}\
button{display:block;width:100%;font:inherit;font-weight:600;color:#fff;background:#0b57d0;border:0;border-radius:.5rem;padding:.8rem 1rem;cursor:pointer}\
button:focus{outline:3px solid #f0b400;outline-offset:2px}\
code{font:.9em ui-monospace,SFMono-Regular,Menlo,monospace;background:#eef1f4;padding:.1rem .3rem;border-radius:.25rem;overflow-wrap:anywhere}\
.ok{border-left:.35rem solid #1a7f37}.err{border-left:.35rem solid #cf222e}\
.muted{color:#57606a;font-size:.9rem}\
h2{font-size:1rem;margin:1rem 0 .25rem}p{margin:.25rem 0 .75rem}";

/// The CSP source of the inline style sheet.
pub static STYLE_HASH: LazyLock<String> = LazyLock::new(|| {
    let digest = sha2::Sha256::digest(STYLE.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
});

/// The Content-Security-Policy of a page; `form_action` lists origins forms may go to (besides
/// none at all when empty).
pub fn csp(form_action: &[&str]) -> String {
    let form_action = if form_action.is_empty() {
        "'none'".to_owned()
    } else {
        form_action.join(" ")
    };
    format!(
        "default-src 'none'; style-src {}; img-src 'none'; base-uri 'none'; form-action {form_action}; frame-ancestors 'none'",
        *STYLE_HASH
    )
}

/// Every page's referrer policy: `same-origin`, so that the sign-in form is posted with the
/// operator's origin (under `no-referrer` browsers send `Origin: null`, which `/oauth2/start`
/// refuses) while nothing is sent to another site.
fn document(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
<meta name=\"referrer\" content=\"same-origin\">\n<title>{} · Mail Integration</title>\n\
<style>{STYLE}</style>\n</head>\n<body>\n<main>\n{body}</main>\n</body>\n</html>\n",
        escape(title)
    )
}

/// The label of a prompt choice and its explanation.
pub fn prompt_label(p: Prompt) -> (&'static str, &'static str) {
    match p {
        Prompt::None => (
            "No prompt",
            "Do not show any page at the provider: works only if you are signed in there and have consented before.",
        ),
        Prompt::Consent => (
            "Consent",
            "Always show the consent page. Use it the first time and whenever the provider gave no refresh token.",
        ),
        Prompt::SelectAccount => (
            "Select account",
            "Let me choose the account first (when several are signed in in this browser).",
        ),
    }
}

/// The form value of a prompt choice.
pub fn prompt_value(p: Prompt) -> &'static str {
    match p {
        Prompt::None => "None",
        Prompt::Consent => "Consent",
        Prompt::SelectAccount => "SelectAccount",
    }
}

/// Parse a prompt form value.
pub fn parse_prompt(s: &str) -> Option<Prompt> {
    match s {
        "None" => Some(Prompt::None),
        "Consent" => Some(Prompt::Consent),
        "SelectAccount" => Some(Prompt::SelectAccount),
        _ => None,
    }
}

/// What the sign-in page shows.
#[derive(Clone, Debug)]
pub struct SignInView<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub provider: &'a str,
    pub mailbox: &'a str,
    pub prompt: Prompt,
    pub ticket: &'a str,
    /// Path of the start endpoint (the form's action).
    pub action: &'a str,
    pub redirect_url: &'a str,
    pub link_expires: &'a str,
}

/// The sign-in page.
pub fn sign_in_page(v: &SignInView<'_>) -> String {
    let mut choices = String::new();
    for p in [Prompt::None, Prompt::Consent, Prompt::SelectAccount] {
        let (label, help) = prompt_label(p);
        let value = prompt_value(p);
        let id = format!("prompt-{}", value.to_ascii_lowercase());
        let checked = if p == v.prompt { " checked" } else { "" };
        let _ = writeln!(
            choices,
            "<div class=\"choice\"><input type=\"radio\" name=\"prompt\" id=\"{id}\" value=\"{value}\" aria-describedby=\"{id}-help\"{checked}>\
<div><label for=\"{id}\">{label}</label><small id=\"{id}-help\">{help}</small></div></div>"
        );
    }
    let provider = escape(v.provider);
    let mailbox = escape(v.mailbox);
    let body = format!(
        "<div class=\"card\">\n<h1>Connect the mailbox {mailbox}</h1>\n\
<dl>\n<dt>Integration</dt><dd>{ns}/{name}</dd>\n<dt>Provider</dt><dd>{provider}</dd>\n<dt>Mailbox</dt><dd>{mailbox}</dd>\n</dl>\n\
<form method=\"post\" action=\"{action}\">\n<input type=\"hidden\" name=\"ticket\" value=\"{ticket}\">\n\
<fieldset>\n<legend>How should {provider} ask?</legend>\n{choices}</fieldset>\n\
<p>Sign in as <strong>{mailbox}</strong>. The operator then keeps this mailbox connected: it stores the grant and refreshes the access token.</p>\n\
<button type=\"submit\">Sign in with {provider}</button>\n</form>\n\
<h2>For the administrator</h2>\n<p class=\"muted\">The OAuth client must list this authorized redirect URI: <code>{redirect}</code></p>\n\
<p class=\"muted\">This link works until {expires}.</p>\n</div>\n",
        ns = escape(v.namespace),
        name = escape(v.name),
        action = escape(v.action),
        ticket = escape(v.ticket),
        redirect = escape(v.redirect_url),
        expires = escape(v.link_expires),
    );
    document("Sign in", &body)
}

/// The page after a successful sign-in.
pub fn connected_page(namespace: &str, name: &str, account: &str, grant_secret: &str) -> String {
    let body = format!(
        "<div class=\"card ok\">\n<h1>Your Mail Integration is connected to the mailbox</h1>\n\
<dl>\n<dt>Account</dt><dd id=\"account\">{account}</dd>\n<dt>Integration</dt><dd>{ns}/{name}</dd>\n</dl>\n\
<p>The grant is stored in the Secret <code>{secret}</code>. The operator now refreshes the access token before it expires; \
<code>kubectl get mailint {name} -n {ns}</code> shows when it is Ready.</p>\n\
<p class=\"muted\">You can close this page. Do not reload it: the answer from the provider can be used only once.</p>\n</div>\n",
        account = escape(account),
        ns = escape(namespace),
        name = escape(name),
        secret = escape(grant_secret),
    );
    document("Connected", &body)
}

/// The page of a sign-in whose grant is still being stored when the request's time ran out (the
/// API server is slow): the operator goes on storing it, the resource shows the outcome.
pub fn storing_page(namespace: &str, name: &str, grant_secret: &str) -> String {
    let body = format!(
        "<div class=\"card\">\n<h1>Your sign-in is still being stored</h1>\n\
<dl>\n<dt>Integration</dt><dd>{ns}/{name}</dd>\n</dl>\n\
<p>The provider issued the grant; the operator is still writing it into the Secret <code>{secret}</code> (the Kubernetes API is slow to answer) and goes on doing so. \
<code>kubectl get mailint {name} -n {ns}</code> shows when it is Ready; <code>kubectl describe mailint {name} -n {ns}</code> shows a failure.</p>\n\
<p class=\"muted\">You can close this page. Do not reload it: the answer from the provider can be used only once.</p>\n</div>\n",
        ns = escape(namespace),
        name = escape(name),
        secret = escape(grant_secret),
    );
    document("Still storing", &body)
}

/// The page of a failure.
pub fn failure_page(f: &Failure) -> String {
    let mut body = format!(
        "<div class=\"card err\">\n<h1>{}</h1>\n<h2>What happened</h2>\n<p id=\"what\">{}</p>\n<h2>What to do</h2>\n<p id=\"todo\">{}</p>\n",
        escape(&f.title),
        escape(&f.what),
        escape(&f.todo)
    );
    if let Some((label, value)) = &f.copy {
        let _ = writeln!(
            body,
            "<p>{}: <code id=\"copy\">{}</code></p>",
            escape(label),
            escape(value)
        );
    }
    if let Some(s) = &f.subject {
        let _ = writeln!(
            body,
            "<p class=\"muted\">Integration {}/{}; this is also reported on the resource: <code>kubectl describe mailint {} -n {}</code></p>",
            escape(&s.ns),
            escape(&s.name),
            escape(&s.name),
            escape(&s.ns)
        );
    }
    let _ = write!(
        body,
        "<p class=\"muted\">Reason: <code id=\"reason\">{}</code></p>\n</div>\n",
        f.reason.as_str()
    );
    document(&f.title, &body)
}
