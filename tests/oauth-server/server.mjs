// The OAuth 2.0 / OpenID Connect server of the integration tests: the certified `oidc-provider` from npm,
// configured from a JSON file, listening on 127.0.0.1 only.
//
//   node server.mjs CONFIG.json        (or MIO_OAUTH_SERVER_CONFIG=CONFIG.json node server.mjs)
//
// CONFIG.json (every key but `clients` and `accounts` is optional):
//   {
//     "port": 0,                                  // 0: any free port (see the "listening" line)
//     "issuer": "http://127.0.0.1:PORT",          // default: derived from the port
//     "clients": [{"client_id": "…", "client_secret": "…", "redirect_uris": ["http://127.0.0.1:…/cb"]}],
//                                                 // or "public_key_pem" instead of the secret: private_key_jwt
//     "introspection_client": {"client_id": "…", "client_secret": "…"},   // client_secret_basic
//     "accounts": [{"sub": "alice", "email": "alice@example.test"}],
//     "scopes": ["mail"],                         // on top of openid email offline_access
//     "access_token_ttl": 60,                     // seconds
//     "refresh_token_ttl": 1209600,               // seconds
//     "rotate_refresh_token": true,
//     "select_account_prompt": false,             // accept prompt=select_account (see below)
//     "refresh_token_without_consent": false,     // refresh tokens whatever the prompt (see below)
//     "client_credentials": false,                // every client may also use the client-credentials grant
//     "microsoft_tenant": "GUID",                 // ID tokens as Entra ID issues them, with `tid`/`oid` (see below)
//     "app_mailbox": "helpdesk@example.test",     // the `email` claim of every client-credentials token
//     "full_access": {"alice": "helpdesk@example.test"}  // the `full_access` claim of an account's tokens
//                                                 // (default: its own email), see extraTokenClaims
//   }
//
// When ready it prints exactly one line `oauth-server listening on http://127.0.0.1:PORT`. Every request
// to the token, revocation and introspection endpoints is logged with its outcome, never with a token,
// code or secret. The sign-in pages are oidc-provider's devInteractions: a login form whose `login` is
// the account's `sub` (any password), then a consent form. Storage is in memory, unbounded, per process.

import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { createHash, createPublicKey, generateKeyPairSync, randomBytes } from 'node:crypto';

import Provider, { interactionPolicy } from 'oidc-provider';

const configPath = process.argv[2] ?? process.env.MIO_OAUTH_SERVER_CONFIG;
if (!configPath) {
  console.error('usage: node server.mjs CONFIG.json (or set MIO_OAUTH_SERVER_CONFIG)');
  process.exit(2);
}
const config = JSON.parse(readFileSync(configPath, 'utf8'));

const accounts = new Map((config.accounts ?? []).map((a) => [a.sub, a]));
if (!Array.isArray(config.clients) || config.clients.length === 0) {
  console.error('config: at least one entry in "clients" is needed');
  process.exit(2);
}

const accessTokenTtl = config.access_token_ttl ?? 60;
const refreshTokenTtl = config.refresh_token_ttl ?? 14 * 24 * 60 * 60;
const rotateRefreshToken = config.rotate_refresh_token ?? true;
const extraScopes = config.scopes ?? ['mail'];

// An in-memory store without eviction (oidc-provider's own MemoryAdapter is an LRU of about 1000 entries,
// which a long test run could overflow, silently dropping live grants).
const store = new Map(); // key -> { value, expiresAt }
const now = () => Date.now();
function get(key) {
  const e = store.get(key);
  if (!e) return undefined;
  if (e.expiresAt <= now()) {
    store.delete(key);
    return undefined;
  }
  return e.value;
}
function set(key, value, expiresIn) {
  const expiresAt = typeof expiresIn === 'number' ? now() + expiresIn * 1000 : Infinity;
  store.set(key, { value, expiresAt });
}
const grantable = new Set(['AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode',
  'BackchannelAuthenticationRequest', 'PreAuthorizedCode']);

class Adapter {
  constructor(model) { this.model = model; }

  key(id) { return `${this.model}:${id}`; }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    set(key, payload, expiresIn);
    if (this.model === 'Session' && payload.uid) set(`sessionUid:${payload.uid}`, id, expiresIn);
    if (payload.userCode) set(`userCode:${payload.userCode}`, id, expiresIn);
    if (grantable.has(this.model) && payload.grantId) {
      const gk = `grant:${payload.grantId}`;
      const members = get(gk) ?? new Set();
      members.add(key);
      set(gk, members); // tokens expire on their own; the member list just lives on
    }
  }

  async find(id) { return get(this.key(id)); }

  async findByUid(uid) {
    const id = get(`sessionUid:${uid}`);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = get(`userCode:${userCode}`);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const payload = get(this.key(id));
    if (payload) payload.consumed = Math.floor(now() / 1000);
  }

  async destroy(id) { store.delete(this.key(id)); }

  async revokeByGrantId(grantId) {
    const gk = `grant:${grantId}`;
    for (const key of get(gk) ?? []) store.delete(key);
    store.delete(gk);
  }
}

const signingKey = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });

// prompt=select_account (the operator's "Select account" choice). oidc-provider's devInteractions have
// no account chooser, so the prompt is accepted and answered with the login form, where the login
// picks the account; afterwards consent follows as usual.
const policy = interactionPolicy.base();
if (config.select_account_prompt) {
  const selectAccount = new interactionPolicy.Prompt({ name: 'select_account', requestable: true });
  selectAccount.checks.clear();
  policy.add(selectAccount);
  policy.get('login').checks.add(new interactionPolicy.Check(
    'select_account_requested',
    'the account must be selected',
    'account_selection_required',
    (ctx) => ctx.oidc.prompts.has('select_account') && !ctx.oidc.result?.login,
  ));
}

// oidc-provider follows OpenID Connect Core §11 to the letter: offline_access (a refresh token) only
// with prompt=consent. Microsoft issues refresh tokens for offline_access whatever the prompt;
// refresh_token_without_consent does the same, so that "No prompt" and "Select account" sign-ins of
// an account that consented before also yield a grant.
const refreshTokenWithoutConsent = config.refresh_token_without_consent ?? false;

// App-only tokens (RFC 6749 §4.4), as Microsoft issues them for Exchange Online app-only access.
const clientCredentials = config.client_credentials ?? false;

// A client with `public_key_pem` authenticates with RFC 7523 client assertions (as Microsoft Entra
// checks certificate credentials): signed by the key whose public half is its JWKS.
const clients = config.clients.map((c) => ({
  client_id: c.client_id,
  redirect_uris: c.redirect_uris,
  response_types: c.redirect_uris.length ? ['code'] : [],
  grant_types: [
    ...(c.redirect_uris.length ? ['authorization_code', 'refresh_token'] : []),
    ...(clientCredentials ? ['client_credentials'] : []),
  ],
  ...(c.public_key_pem
    ? {
        token_endpoint_auth_method: 'private_key_jwt',
        jwks: { keys: [{ ...createPublicKey(c.public_key_pem).export({ format: 'jwk' }), use: 'sig' }] },
      }
    : { client_secret: c.client_secret, token_endpoint_auth_method: 'client_secret_post' }),
}));
const appMailbox = config.app_mailbox ?? null;
const fullAccess = config.full_access ?? {};
if (config.introspection_client) {
  clients.push({
    client_id: config.introspection_client.client_id,
    client_secret: config.introspection_client.client_secret,
    redirect_uris: [],
    response_types: [],
    grant_types: [],
    // Dovecot sends HTTP Basic credentials (introspection_url = http://id:secret@host/...).
    token_endpoint_auth_method: 'client_secret_basic',
  });
}

// ID tokens as Microsoft Entra ID issues them: the directory's ID in `tid`, the account's immutable
// object ID in `oid`, the sign-in name in `preferred_username`, and no `email` claim (Entra adds it
// only as an optional claim). Accounts are told apart by `sub` (the login): two of them may have the
// same address, as a directory may give a departed user's address to another account.
const microsoftTenant = config.microsoft_tenant;
const idTokenClaims = microsoftTenant
  ? { openid: ['sub', 'tid', 'oid'], email: ['preferred_username'] }
  : { openid: ['sub'], email: ['email', 'email_verified'] };
// A stable GUID-shaped object ID per account: the first 16 bytes of SHA-256 of its `sub`.
function objectId(sub) {
  const h = createHash('sha256').update(`oid:${sub}`).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}
function accountClaims(account) {
  return microsoftTenant
    ? { sub: account.sub, tid: microsoftTenant, oid: objectId(account.sub), preferred_username: account.email }
    : { sub: account.sub, email: account.email, email_verified: true };
}

const configuration = {
  adapter: Adapter,
  clients,
  responseTypes: ['code'],
  jwks: { keys: [{ ...signingKey, use: 'sig', alg: 'RS256', kid: 'test-key' }] },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  scopes: ['openid', 'email', 'offline_access', ...extraScopes],
  claims: idTokenClaims,
  // Like Google: the ID token carries the email claim even when an access token is issued too.
  conformIdTokenClaims: false,
  async findAccount(_ctx, id) {
    const account = accounts.get(id);
    if (!account) return undefined;
    return {
      accountId: account.sub,
      async claims() {
        return accountClaims(account);
      },
    };
  },
  // Put the mailbox address into access tokens, so introspection answers carry `email` as well as `sub`,
  // and the shared mailbox the account may open (`full_access`, as an Exchange admin grants FullAccess;
  // its own address when none), for a mail server that opens delegated mailboxes.
  async extraTokenClaims(_ctx, token) {
    // App-only tokens name the one mailbox the app was given access to (app_mailbox).
    if (token.kind === 'ClientCredentials') return appMailbox ? { email: appMailbox } : undefined;
    const account = token.accountId ? accounts.get(token.accountId) : undefined;
    return account ? { email: account.email, full_access: fullAccess[account.sub] ?? account.email } : undefined;
  },
  features: {
    devInteractions: { enabled: true },
    clientCredentials: { enabled: clientCredentials },
    introspection: { enabled: true, allowedPolicy: async () => true },
    // A client may revoke only its own tokens (oidc-provider's default rule, without its notice).
    revocation: { enabled: true, allowedPolicy: async (_ctx, client, token) => token.clientId === client.clientId },
  },
  pkce: { required: () => true },
  rotateRefreshToken,
  async issueRefreshToken(_ctx, client, code) {
    return client.grantTypeAllowed('refresh_token')
      && (code.scopes.has('offline_access') || refreshTokenWithoutConsent);
  },
  interactions: { policy },
  clientBasedCORS: () => false,
  ttl: {
    AccessToken: accessTokenTtl,
    ClientCredentials: accessTokenTtl,
    AuthorizationCode: 60,
    IdToken: 3600,
    Interaction: 600,
    Session: 24 * 60 * 60,
    Grant: refreshTokenTtl,
    RefreshToken: refreshTokenTtl,
  },
};

const requestedPort = config.port ?? 0;
const server = createServer();
server.listen(requestedPort, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = config.issuer ?? `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, configuration);
  // Entra ID does not send RFC 9207's `iss` with the authorization response; oidc-provider always
  // does. The event carries the response parameters before they are sent.
  if (microsoftTenant) {
    provider.on('authorization.success', (_ctx, out) => { delete out.iss; });
  }

  // One log line per token, revocation and introspection request, after it was answered.
  const logged = { '/token': 'token', '/token/revocation': 'revocation', '/token/introspection': 'introspection' };
  provider.use(async (ctx, next) => {
    await next();
    const endpoint = logged[ctx.path];
    if (!endpoint || ctx.method !== 'POST') return;
    const body = ctx.body && typeof ctx.body === 'object' ? ctx.body : {};
    const params = ctx.oidc?.params ?? {};
    const client = ctx.oidc?.client?.clientId ?? '-';
    let line = `${endpoint} status=${ctx.status} client=${client}`;
    if (endpoint === 'token') {
      line += ` grant_type=${params.grant_type ?? '-'}`;
      if (ctx.status === 200) {
        line += ` result=ok refresh_token_issued=${'refresh_token' in body} expires_in=${body.expires_in} scope="${body.scope ?? ''}"`;
      }
    } else if (endpoint === 'introspection' && ctx.status === 200) {
      line += ` result=ok active=${body.active}`;
    } else if (ctx.status === 200) {
      line += ' result=ok';
    }
    if (body.error) {
      line += ` result=${body.error} description="${body.error_description ?? ''}"`;
      if (ctx.state.errorDetail) line += ` detail="${ctx.state.errorDetail}"`;
    }
    console.log(line);
  });
  // oidc-provider keeps the precise reason (e.g. "refresh token already used") out of the answer.
  for (const event of ['grant.error', 'revocation.error', 'introspection.error']) {
    provider.on(event, (ctx, err) => { ctx.state.errorDetail = err?.error_detail; });
  }
  provider.on('grant.revoked', (_ctx, grantId) => console.log(`grant revoked grant=${grantId}`));
  provider.on('server_error', (_ctx, err) => console.log(`server_error ${err?.stack ?? err}`));

  server.on('request', provider.callback());
  console.log(`oauth-server issuer ${issuer}`);
  console.log(`oauth-server listening on http://127.0.0.1:${port}`);
});
server.on('error', (err) => {
  console.error(`oauth-server cannot listen on 127.0.0.1:${requestedPort}: ${err.message}`);
  process.exit(1);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close();
    process.exit(0);
  });
}
