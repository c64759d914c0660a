//! Each reason's two texts: what happened and what to do. `docs/reasons.md` and
//! `kubectl mailint explain` print them; condition messages end with the hint.

use super::Reason;

impl Reason {
    /// What happened, in one or two sentences (the docs' and `kubectl mailint explain`'s first part).
    pub const fn what_happened(self) -> &'static str {
        match self {
            Reason::AdminConsentRequired => {
                "No admin consent for the app's application permissions (Microsoft AADSTS65001 on an app-only token request)."
            }
            Reason::ClientSecretExpired => {
                "The client secret has expired (Microsoft AADSTS7000222)."
            }
            Reason::ClientCertificateRejected => {
                "The provider refused the certificate's client assertion (Microsoft AADSTS700027: the certificate is not uploaded to the app, or the assertion's signature does not verify)."
            }
            Reason::ClientKeyInvalid => {
                "The key in the client Secret or the certificate Secret cannot be used: not a PEM certificate and RSA private key, or not a service-account key file."
            }
            Reason::DomainWideDelegationMissing => {
                "Google refused the service account's token request (`unauthorized_client`): domain-wide delegation is not configured for its client ID and the scope https://mail.google.com/."
            }
            Reason::DelegatedUserUnknown => {
                "Google does not know the mailbox the service account asked a token for (`invalid_grant` \"Invalid email or User ID\")."
            }
            Reason::DelegationNotAllowed => {
                "The service account's key Secret does not allow tokens for this mailbox: its annotation mailintegration.dev/delegated-mailboxes does not list spec.mailbox.address. Nothing was asked of Google."
            }
            Reason::ClientSecretKeyNotDeclared => {
                "`spec.oauth.clientSecretRef` names a key that the client Secret does not declare (annotations mailintegration.dev/client-id-key, client-secret-key, service-account-key), or the client ID would be read from a key of secret material."
            }
            Reason::OAuthServerNotAllowed => {
                "A client credential or grant would be sent to a server that its owner did not name: the client Secret's annotation mailintegration.dev/oauth-servers (required for provider OIDC) does not list it. Nothing was sent."
            }
            Reason::ServiceAccountKeyRejected => {
                "Google refused the service account's signed assertion (`invalid_grant` \"Invalid JWT Signature.\"): the key was deleted or disabled, or belongs to another service account."
            }
            Reason::AppMailboxAccessMissing => {
                "The mail server refused a valid app-only token: Exchange Online does not know the app's service principal, or it has no permission on the mailbox."
            }
            Reason::ClientSecretExpiringSoon => {
                "The client Secret's annotation mailintegration.dev/client-secret-expires says the client secret expires within 30 days (condition `ClientSecretExpiringSoon=True`, a warning: the integration still works)."
            }
            Reason::ClientSecretNotExpiring => {
                "The client secret is not due to expire within 30 days, or no expiry date is annotated (condition `ClientSecretExpiringSoon=False`)."
            }
            Reason::ClientSecretExpiryInvalid => {
                "The client Secret's annotation mailintegration.dev/client-secret-expires is not a date (YYYY-MM-DD) or an RFC 3339 time, so no warning can be given (condition `ClientSecretExpiringSoon=Unknown`)."
            }
            Reason::Authorized => {
                "The grant works: the account signed in and a token was obtained."
            }
            Reason::TokenRefreshed => "The access token was refreshed.",
            Reason::TokenValid => "The access token is valid and not yet due for refresh.",
            Reason::MailboxConnected => "The mailbox accepted the access token.",
            Reason::Suspended => "Refreshing is suspended by `spec.suspend`.",
            Reason::Ready => {
                "Everything works: the grant is authorized, the access token is valid and published, and the mailbox (when a mail server is known) accepts it."
            }
            Reason::Connected => {
                "Every configured mail server accepted the access token (condition `MailboxConnected=True`)."
            }
            Reason::Refreshing => {
                "The operator is refreshing the access token, or retrying after a transient failure (condition `Reconciling=True`)."
            }
            Reason::Idle => "No work is in flight (condition `Reconciling=False`).",
            Reason::AsExpected => "Nothing needs a human (condition `Stalled=False`).",
            Reason::SignedIn => {
                "Someone signed in on the operator's sign-in page and the grant was stored (Normal event)."
            }
            Reason::Recovered => "A failure the operator was retrying is over (Normal event).",
            Reason::SignInRequired => "No grant yet: someone must sign in at `status.signIn.url`.",
            Reason::ClientSecretNotFound => {
                "The client Secret named in `spec.oauth.clientSecretRef` does not exist."
            }
            Reason::ClientSecretKeyMissing => {
                "The client Secret exists but lacks the client ID or secret key (or it is empty)."
            }
            Reason::InvalidClient => {
                "The provider rejected the client credentials (wrong or expired secret, deleted client)."
            }
            Reason::UnauthorizedClient => {
                "The client is not allowed to use this grant (token of another client, grant type disabled)."
            }
            Reason::GrantRevoked => {
                "The grant was revoked (by the user, an admin, a password change) or otherwise became invalid. The same reason names the Normal event of a deletion with `spec.revokeOnDelete` that revoked the grant at the provider."
            }
            Reason::GrantExpiredInactive => {
                "The grant expired because it was not used for too long."
            }
            Reason::TestingAppGrantExpired => {
                "A Google app in \"Testing\" publishing status: its grants expire after 7 days."
            }
            Reason::ReauthRequired => {
                "The provider requires the user to sign in again (Google `invalid_rapt`, MFA)."
            }
            Reason::AccountMismatch => {
                "Someone other than `spec.oauth.signInAccount` (default: `spec.mailbox.address`) signed in."
            }
            Reason::ScopeMissing => "The provider did not grant a scope the mailbox needs.",
            Reason::InvalidEndpoint => "An endpoint URL (override or discovered) is unusable.",
            Reason::ProviderError => {
                "The provider refused the request for a reason that none of the other reasons covers; the message holds the provider's error."
            }
            Reason::ClientSecretNotMarked => {
                "The client Secret (or CA bundle Secret) is not marked for the operator, or is one the operator manages."
            }
            Reason::TokenSecretConflict => {
                "`spec.tokenSecret.name` names a Secret that the operator did not create for this integration."
            }
            Reason::GrantSecretConflict => {
                "The grant Secret `<name>-oauth-grant` exists but belongs to something else."
            }
            Reason::ClientSecretTooLarge => {
                "A client Secret, certificate or CA bundle marked for the operator is larger than the operator keeps of a Secret (64 KiB of labels, annotations and data): nothing of it is used."
            }
            Reason::SecretTooLarge => {
                "The grant or token Secret (labelled `mailintegration.dev/integration`) is larger than the operator keeps of a Secret (64 KiB of labels, annotations and data), or the token Secret would be with the provider's access token: it is neither used nor written."
            }
            Reason::GrantBoundElsewhere => {
                "The stored grant was issued for another provider, token endpoint, client or account than the spec now names."
            }
            Reason::EndpointOverrideNotAllowed => {
                "`spec.oauth.endpoints` overrides a Google or Microsoft endpoint, which this operator does not allow."
            }
            Reason::MailboxHostNotAllowed => {
                "The mail server named in `spec.mailbox` is not in the operator's allowed mail hosts."
            }
            Reason::GrantLostInFlight => {
                "A refresh of a provider that rotates refresh tokens was cut off (the process was killed or lost its Lease, or no OAuth answer came back: a timeout, a gateway's page) after the provider may have issued a new refresh token, and the provider now refuses the stored one with an OAuth error."
            }
            Reason::GrantNotStored => {
                "The provider issued a new refresh token that the operator cannot write into the grant Secret: it is held only in the operator's memory while the write is retried."
            }
            Reason::GrantSecretImmutable => {
                "The grant Secret is immutable (`immutable: true`), so a refreshed grant cannot be stored in it; the operator does not present its refresh token."
            }
            Reason::NamespaceTerminating => {
                "The namespace is being deleted, so the operator cannot write the grant Secret any more."
            }
            Reason::RefreshInFlightElsewhere => {
                "Another operator process marked this grant as being refreshed within the last 75 seconds; this one waits instead of presenting the same refresh token."
            }
            Reason::TokenLifetimeTooShort => {
                "The provider issued an access token that expires no later than the operator's lowest refresh interval (`--min-refresh-interval`, 30 s by default) after it was issued (e.g. `expires_in: 0`). The token is published and refreshed once per interval, not sooner, so it is expired part of the time."
            }
            Reason::TokenTemplateInvalid => {
                "`spec.tokenSecret.template` is refused or does not render (a syntax error, an unknown name, a label or annotation asking a Secret-mirroring controller for a copy, or it computes, allocates or produces too much), so no token is published."
            }
            Reason::NameTooLong => {
                "The MailIntegration's name is longer than 63 characters: the operator labels the Secrets it writes with the name (`mailintegration.dev/integration`), and a label value may be at most 63 characters, so it does nothing for this integration. The CRD refuses such names; this one was stored before that rule."
            }
            Reason::TokenExpired => {
                "The published access token has expired and no new one was obtained (condition `TokenValid=False`, and `Ready` while refreshing does not succeed): workloads using it fail to log in."
            }
            Reason::NoToken => {
                "No access token has been published yet (condition `TokenValid=False`): no sign-in or refresh has succeeded since the integration was created."
            }
            Reason::SignInDenied => {
                "The user (or an admin policy) refused the consent at the provider (`access_denied`)."
            }
            Reason::LoginRequired => {
                "Prompt \"No prompt\" was chosen but nobody is signed in at the provider (`login_required`)."
            }
            Reason::ConsentRequired => {
                "Prompt \"No prompt\" was chosen but the account has not consented yet (`consent_required`)."
            }
            Reason::InteractionRequired => {
                "Prompt \"No prompt\" was chosen but the provider needs to show a page (`interaction_required`, `account_selection_required`)."
            }
            Reason::NoRefreshToken => {
                "The sign-in worked but the provider returned no refresh token."
            }
            Reason::RedirectURIMismatch => {
                "The provider does not accept the operator's callback URL (`redirect_uri_mismatch`)."
            }
            Reason::IssuerMismatch => {
                "The authorization response or ID token came from another issuer than the configured provider (OAuth mix-up defence, RFC 9207)."
            }
            Reason::AuthorizationCodeMissing => {
                "The provider sent the browser back without an authorization code or an error."
            }
            Reason::AccountUnknown => {
                "The provider did not say which account signed in (no email in the ID token or userinfo)."
            }
            Reason::SignInLinkExpired => "The sign-in link (its ticket) has expired.",
            Reason::SignInLinkInvalid => {
                "The sign-in link was not made for this MailIntegration (damaged, or made for a deleted resource of the same name)."
            }
            Reason::SignInStateExpired => {
                "The sign-in took longer than the operator waits for the provider's answer."
            }
            Reason::SignInStateReused => {
                "The provider's answer was used already (page reloaded, or replayed)."
            }
            Reason::SignInStateInvalid => {
                "The provider's answer carried a state the operator did not issue or that was altered."
            }
            Reason::SignInBrowserMismatch => {
                "The sign-in was finished in another browser (or with cookies blocked) than the one that started it."
            }
            Reason::SignInFailed => {
                "The sign-in failed for a reason that none of the other sign-in reasons covers; the message holds the provider's error."
            }
            Reason::GrantWriteFailed => {
                "The operator could not write the grant Secret: after a sign-in (the sign-in worked, the grant is not stored), or to mark a refresh before it starts (nothing was sent to the provider)."
            }
            Reason::ProviderUnavailable => {
                "The provider did not answer properly (5xx, timeout, connection error)."
            }
            Reason::NotAnOAuthAnswer => {
                "The token endpoint's answer was not an OAuth answer (an HTML or other non-JSON page, or a 404, 405, 407 or other 4xx without an OAuth error body): an ingress, proxy or firewall answered instead of the OAuth server. Only an OAuth error body ends retrying; this is retried with backoff, keeping the current access token."
            }
            Reason::GrantMarkConflict => {
                "The grant Secret changed twice in a row while the operator marked it before a refresh (409 Conflict on the write-ahead mark, the Secret read again in between). Nothing was sent to the provider; the operator retries with backoff."
            }
            Reason::RateLimited => {
                "The provider asked us to slow down (429, Google's 403 page under load, AADSTS50196/90055)."
            }
            Reason::DiscoveryFailed => {
                "The OIDC discovery document could not be fetched or is inconsistent."
            }
            Reason::TokenSecretWriteFailed => {
                "A new access token was obtained, but writing the token Secret failed; the operator retries with backoff."
            }
            Reason::MailboxAuthFailed => "The mail server rejected the access token.",
            Reason::GatewayCredentialsIssued => {
                "Every app of spec.gateway has its gateway credential: a Secret <name>-gateway-<app> with its username and password, and the password's verifier in the gateway Secret <name>-gateway."
            }
            Reason::GatewaySecretConflict => {
                "A Secret named like one of this integration's gateway Secrets exists and the operator did not create it for this integration; the operator writes only Secrets it owns, so that credential was not issued."
            }
            Reason::GatewayRotationInvalid => {
                "The annotation mailintegration.dev/rotate-gateway-credentials is not an RFC 3339 time, or names an app that spec.gateway.apps does not list; nothing was rotated."
            }
            Reason::SmtpClientAuthenticationDisabled => {
                "Microsoft 365 refused SMTP AUTH for the mailbox (535 5.7.139 SmtpClientAuthentication is disabled): the SMTP mailbox check fails (condition MailboxConnected) and the gateway cannot send mail for it (status.gateway.apps[].lastError, Warning event); the token itself is fine."
            }
            Reason::MailboxUnreachable => "The mail server could not be reached.",
            Reason::TLSError => {
                "The TLS handshake with the mail server failed (certificate, protocol)."
            }
            Reason::ProtocolError => {
                "The mail server answered in a way the check did not expect (not IMAP, POP3 or SMTP on that port, or an unexpected reply)."
            }
            Reason::RevocationNotSupported => {
                "The integration was deleted with `spec.revokeOnDelete`, but the provider has no revocation endpoint, so the grant still lives there (Warning event)."
            }
            Reason::RevocationFailed => {
                "The integration was deleted with `spec.revokeOnDelete`, but revoking the grant failed for as long as `--revoke-timeout` allows; the resource was let go anyway (Warning event)."
            }
            Reason::NothingToRevoke => {
                "The integration was deleted with `spec.revokeOnDelete`, but no grant was stored, so there was nothing to revoke (Normal event)."
            }
        }
    }

    /// What to do about it, in one or two sentences (for condition messages, events and docs).
    pub const fn hint(self) -> &'static str {
        match self {
            Reason::AdminConsentRequired => {
                "A tenant admin opens Entra ID → App registrations → the app → API permissions and clicks \"Grant admin consent\" for IMAP.AccessAsApp, POP.AccessAsApp and SMTP.SendAsApp (Office 365 Exchange Online, Application permissions)."
            }
            Reason::ClientSecretExpired => {
                "Create a new secret in Entra ID → App registrations → the app → Certificates & secrets, put its Value into the client Secret, and set the annotation mailintegration.dev/client-secret-expires to its expiry date to be warned next time."
            }
            Reason::ClientCertificateRejected => {
                "Upload the certificate in spec.oauth.clientCertificateRef's Secret (tls.crt, public part only) to Entra ID → App registrations → the app → Certificates & secrets → Certificates, and check that tls.key is its private key; the condition message names the thumbprint sent."
            }
            Reason::ClientKeyInvalid => {
                "Put a PEM certificate and its RSA private key (kubectl create secret tls) into the certificate Secret, or the service account's JSON key file into the client Secret; the message says which part is wrong."
            }
            Reason::DomainWideDelegationMissing => {
                "A Workspace super admin opens the Admin console → Security → Access and data control → API controls → Domain-wide delegation → Add new, and enters the service account's client ID (the message names it) with the scope https://mail.google.com/. It can take minutes to some hours to apply."
            }
            Reason::DelegatedUserUnknown => {
                "Set spec.mailbox.address to an existing user of the Workspace domain whose admin configured the delegation (not a group or alias, and not a consumer Gmail address)."
            }
            Reason::ClientSecretKeyNotDeclared => {
                "The meaning of a client Secret's keys is set by whoever may write the Secret: the defaults client_id, client_secret and service-account.json need nothing; other keys are declared on the Secret, e.g. kubectl annotate secret NAME mailintegration.dev/client-id-key=id mailintegration.dev/client-secret-key=secret. The client ID is never read from the client secret's key or from a key a Secret type reserves for secret material (tls.key, password, token, ...)."
            }
            Reason::OAuthServerNotAllowed => {
                "The message names the server and the exact command. Whoever may write the client Secret lists the servers its credentials may go to, comma-separated URLs (an OIDC issuer URL also allows the endpoints its discovery document names): kubectl annotate secret NAME mailintegration.dev/oauth-servers=https://id.example.com. Google's and Microsoft's credentials go to their own endpoints without it."
            }
            Reason::DelegationNotAllowed => {
                "Domain-wide delegation lets the key act as any user of the domain, so whoever may create MailIntegrations could otherwise read any mailbox with it. The owner of the key Secret lists the mailboxes it may be used for, comma-separated, as addresses or *@domain: kubectl annotate secret NAME mailintegration.dev/delegated-mailboxes='support@example.com,*@tickets.example.com'."
            }
            Reason::ServiceAccountKeyRejected => {
                "Create a new key for the service account (Google Cloud console → IAM & Admin → Service accounts → Keys → Add key → JSON) and put the file into the client Secret."
            }
            Reason::AppMailboxAccessMissing => {
                "In Exchange Online PowerShell run New-ServicePrincipal -AppId <client ID> -ObjectId <object ID> with the object ID of the Enterprise Application (Entra ID → Enterprise applications), not the App registration's, then Add-MailboxPermission -Identity <mailbox> -User <service principal ID> -AccessRights FullAccess (or an RBAC for Applications role assignment scoped to the mailbox). Changes can take up to an hour."
            }
            Reason::ClientSecretExpiringSoon => {
                "Create a new client secret at the provider before the date, put it into the client Secret and update the annotation; the alert MailIntegrationClientSecretExpiringSoon fires from the same date."
            }
            Reason::ClientSecretNotExpiring => "Nothing to do.",
            Reason::ClientSecretExpiryInvalid => {
                "Write the expiry date as 2027-01-15 or 2027-01-15T00:00:00Z."
            }
            Reason::Authorized => "The grant works; nothing to do.",
            Reason::TokenRefreshed => "The access token was refreshed; nothing to do.",
            Reason::TokenValid => "The access token is valid; nothing to do.",
            Reason::MailboxConnected => "The mailbox accepts the access token; nothing to do.",
            Reason::Suspended => "Set spec.suspend to false to resume refreshing.",
            Reason::SignInRequired => {
                "Open the link in status.signIn.url and sign in as the mailbox account."
            }
            Reason::ClientSecretNotFound => {
                "Create the Secret named in spec.oauth.clientSecretRef.name in the same namespace, with the OAuth client ID and secret."
            }
            Reason::ClientSecretKeyMissing => {
                "Add the client ID and client secret under the keys named in spec.oauth.clientSecretRef (default client_id and client_secret)."
            }
            Reason::InvalidClient => {
                "Check the client ID and secret in the client Secret against the provider's console; the secret may be wrong, expired or the client deleted."
            }
            Reason::UnauthorizedClient => {
                "The grant belongs to another OAuth client, or the client may not use this grant type; sign in again with this client."
            }
            Reason::GrantRevoked => {
                "The grant is no longer valid (revoked, password changed, or expired); sign in again."
            }
            Reason::GrantExpiredInactive => {
                "The grant expired after a long time without use; sign in again."
            }
            Reason::TestingAppGrantExpired => {
                "Google apps in \"Testing\" publishing status get grants that expire after 7 days; publish the app (OAuth consent screen: Publish app) or sign in again weekly."
            }
            Reason::ReauthRequired => {
                "The provider requires the user to sign in again (re-authentication or MFA policy); sign in again."
            }
            Reason::AccountMismatch => {
                "Sign in as the account in spec.oauth.signInAccount (default: spec.mailbox.address); for a shared mailbox, set spec.oauth.signInAccount to the delegate who has FullAccess."
            }
            Reason::ScopeMissing => {
                "Sign in again with prompt Consent and keep every requested permission ticked; check spec.oauth.scopes."
            }
            Reason::InvalidEndpoint => {
                "Fix the endpoint URLs in spec.oauth.endpoints (or spec.oauth.issuerURL / tenant): https is required, and loopback (http or https) is used only by an operator started with --allow-loopback, for development and tests."
            }
            Reason::ProviderError => {
                "The provider refused the request; see the message for the provider's explanation."
            }
            Reason::SignInDenied => {
                "Open status.signIn.url again and accept the requested permissions; if an admin policy blocks the app, ask the provider's admin to allow it."
            }
            Reason::LoginRequired => {
                "Open status.signIn.url again and choose Consent or Select account, so the provider may show its sign-in page."
            }
            Reason::ConsentRequired => {
                "Open status.signIn.url again and choose Consent, so the provider may ask for the permissions."
            }
            Reason::InteractionRequired => {
                "Open status.signIn.url again and choose Consent or Select account."
            }
            Reason::NoRefreshToken => {
                "Sign in again with prompt Consent (Google returns a refresh token only on consent); for OIDC providers, allow the offline_access scope and the refresh_token grant for the client."
            }
            Reason::RedirectURIMismatch => {
                "Register the exact redirect URL shown on the sign-in page as an authorized redirect URI of the OAuth client (or set spec.oauth.redirectURL to the one that is registered)."
            }
            Reason::IssuerMismatch => {
                "Check spec.provider, spec.oauth.issuerURL and spec.oauth.endpoints; then open status.signIn.url again."
            }
            Reason::AuthorizationCodeMissing => {
                "Open status.signIn.url again; if it repeats, check the provider's logs and spec.oauth.endpoints.authorization."
            }
            Reason::AccountUnknown => {
                "Make sure the client may request the openid and email scopes (and, for OIDC, that the provider releases the email claim); then sign in again."
            }
            Reason::SignInLinkExpired => {
                "Open the current link: kubectl get mailint NAME -o jsonpath='{.status.signIn.url}'."
            }
            Reason::SignInLinkInvalid => {
                "Open the current link: kubectl get mailint NAME -o jsonpath='{.status.signIn.url}'."
            }
            Reason::SignInStateExpired => {
                "Open status.signIn.url again and finish the sign-in within a few minutes."
            }
            Reason::SignInStateReused => {
                "Open status.signIn.url again to start a new sign-in; do not reload the result page."
            }
            Reason::SignInStateInvalid => {
                "Open status.signIn.url again and start the sign-in from the operator's page."
            }
            Reason::SignInBrowserMismatch => {
                "Open status.signIn.url again and finish the sign-in in the same browser, with cookies allowed for the operator's address."
            }
            Reason::SignInFailed => {
                "See the message for the provider's explanation; then open status.signIn.url again."
            }
            Reason::GrantWriteFailed => {
                "Check the operator's RBAC (create/update Secrets in the integration's namespace) and its log; then sign in again."
            }
            Reason::ClientSecretNotMarked => {
                "Label the Secret that holds the OAuth client: kubectl label secret NAME -n NAMESPACE mailintegration.dev/oauth-client=true (the operator reads no other Secret of yours)."
            }
            Reason::TokenSecretConflict => {
                "Choose another spec.tokenSecret.name, or delete that Secret if it is left over; the operator never writes into a Secret it does not own."
            }
            Reason::GrantSecretConflict => {
                "Delete or rename that Secret; to bring your own refresh token, create it with the label mailintegration.dev/integration=<integration name>."
            }
            Reason::ClientSecretTooLarge => {
                "Keep only what the integration needs in the Secret the message names (a client ID and secret, a certificate and key, a CA bundle), or move the rest to another Secret; the operator reads it again when it changes."
            }
            Reason::SecretTooLarge => {
                "Delete the Secret the message names (the operator recreates its own), or bring a grant with only its refresh token; make spec.tokenSecret.template smaller if it fills the token Secret; when the message names the provider's access token, configure smaller access tokens at the provider (fewer roles, groups or claims) and request a refresh (kubectl mailint refresh)."
            }
            Reason::GrantBoundElsewhere => {
                "Sign in again at status.signIn.url: a grant is only ever sent back to where it was issued."
            }
            Reason::EndpointOverrideNotAllowed => {
                "Remove spec.oauth.endpoints, use provider OIDC for another server, or start the operator with --allow-endpoint-overrides."
            }
            Reason::MailboxHostNotAllowed => {
                "Use the provider's own mail host, or ask the operator's admin to add the host to --mailbox-allowed-hosts (Helm value mailboxAllowedHosts)."
            }
            Reason::GrantLostInFlight => {
                "A refresh was cut off after the provider may have rotated the refresh token, and the provider now refuses the stored one: sign in again (status.signIn.url). See docs/operations.md for why this happens and how the termination grace period prevents it."
            }
            Reason::GrantNotStored => {
                "The new refresh token is held only in memory: fix what the message says stops the write of the grant Secret (API server reachable, RBAC, a webhook or quota refusing Secrets); do not restart the operator until the condition clears."
            }
            Reason::GrantSecretImmutable => {
                "Remove `immutable: true` from the grant Secret (delete it and sign in again: an immutable Secret cannot be changed back), then sign in again."
            }
            Reason::NamespaceTerminating => {
                "The namespace is being deleted; recreate the MailIntegration in a namespace that stays, and sign in there."
            }
            Reason::RefreshInFlightElsewhere => {
                "Another operator process is refreshing this grant; nothing to do unless it repeats, then check that only one operator (the Lease holder) runs: kubectl get lease -A | grep mail-integration-operator."
            }
            Reason::TokenLifetimeTooShort => {
                "Configure longer access tokens at the provider (at least a few minutes; the message says how long the last one lived). The operator's admin can lower --min-refresh-interval, at the cost of more API writes for such integrations."
            }
            Reason::TokenTemplateInvalid => {
                "Fix the template named in the message: the names it may use are access_token, token_type, expiry, username, xoauth2, oauthbearer, mail_server and mail_port (docs/consuming-tokens.md); what a template may use (memory, time, size) and which keys are refused is in docs/security.md."
            }
            Reason::NameTooLong => {
                "Recreate the MailIntegration under a name of at most 63 characters (kubectl get mailint NAME -o yaml, edit metadata.name, apply, then delete the old one), and sign in again."
            }
            Reason::ProviderUnavailable => {
                "The provider did not answer properly; the operator retries with backoff and keeps the current token."
            }
            Reason::NotAnOAuthAnswer => {
                "Nothing, if it passes (the OAuth server restarting behind its ingress). If it persists, the message says what answered: check the endpoint URL (spec.oauth.endpoints, issuerURL), the operator's HTTPS_PROXY/NO_PROXY and the proxies or firewalls in between. After an hour the message says InvalidEndpoint; the operator keeps retrying at most every 5 minutes."
            }
            Reason::GrantMarkConflict => {
                "Look for another writer of the grant Secret (kubectl get secret NAME -o yaml --show-managed-fields): a controller or policy that rewrites it on every change. The operator retries by itself."
            }
            Reason::RateLimited => {
                "The provider asked to slow down; the operator waits and retries, keeping the current token."
            }
            Reason::DiscoveryFailed => {
                "Check spec.oauth.issuerURL: its /.well-known/openid-configuration must be reachable and name the same issuer."
            }
            Reason::MailboxAuthFailed => {
                "The mail server rejected the token: check that IMAP/POP/SMTP access is enabled for the mailbox and that the scopes cover it."
            }
            Reason::GatewayCredentialsIssued => {
                "Nothing to do: give each app its Secret (docs/gateway.md)."
            }
            Reason::GatewaySecretConflict => {
                "Delete or rename that Secret if it is left over, or rename the app in spec.gateway.apps; the operator never writes into a Secret it does not own."
            }
            Reason::GatewayRotationInvalid => {
                "Set the annotation with kubectl mailint rotate-gateway NAME [--app APP], which writes the current time (and the app)."
            }
            Reason::SmtpClientAuthenticationDisabled => {
                "An Exchange admin enables SMTP AUTH for the mailbox: Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false (Exchange Online PowerShell), or in the Microsoft 365 admin center under Users → the user → Mail → Manage email apps → Authenticated SMTP; if the tenant switches it off for all (Set-TransportConfig -SmtpClientAuthenticationDisabled $true), the mailbox setting must say $false explicitly."
            }
            Reason::MailboxUnreachable => {
                "Check the mail server host and port, and network policies between the operator and the server."
            }
            Reason::TLSError => {
                "Check the mail server's certificate and TLS mode (Implicit or StartTLS) in spec.mailbox."
            }
            Reason::Ready => "Nothing to do.",
            Reason::Connected => "Nothing to do.",
            Reason::Refreshing => {
                "Nothing to do; if it lasts, the Ready condition's reason says what the provider answered."
            }
            Reason::Idle => "Nothing to do.",
            Reason::AsExpected => "Nothing to do.",
            Reason::SignedIn => "Nothing to do; the token Secret follows within seconds.",
            Reason::Recovered => "Nothing to do.",
            Reason::TokenExpired => {
                "Look at the Authorized condition and the recent events for why refreshing fails (kubectl mailint status NAME); force a new attempt with kubectl mailint refresh NAME."
            }
            Reason::NoToken => {
                "See the Authorized and Ready conditions for the cause (kubectl mailint status NAME); the token Secret is written as soon as a sign-in or refresh succeeds."
            }
            Reason::TokenSecretWriteFailed => {
                "Check the operator's RBAC (update Secrets in the integration's namespace), quotas and admission policies on Secrets, and the operator's log."
            }
            Reason::ProtocolError => {
                "Check the host, port and TLS mode in spec.mailbox.server and spec.mailbox.smtp, and spec.mailbox.protocol; the message holds the server's reply."
            }
            Reason::RevocationNotSupported => {
                "Remove the app's access for the account at the provider by hand (Google: myaccount.google.com/permissions; Microsoft: myapps.microsoft.com)."
            }
            Reason::RevocationFailed => {
                "Revoke the app's access for the account at the provider by hand; the event says what the provider answered."
            }
            Reason::NothingToRevoke => "Nothing to do.",
        }
    }
}
