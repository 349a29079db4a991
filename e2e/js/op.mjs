// A real OpenID Provider on loopback for the SSO tests: npm oidc-provider with its development
// login and consent pages (any password; the login names one of the accounts below).
//
// usage: node op.mjs <port> <client_id> <client_secret> <redirect_uri> [<host>]
// (host: the address to listen on and name in the issuer; 127.0.0.1 when left out)
// Prints "ready <issuer>" once it listens.
import Provider from 'oidc-provider';

const [port, clientId, clientSecret, redirectUri, host = '127.0.0.1'] = process.argv.slice(2);
if (!redirectUri) {
  console.error('usage: node op.mjs <port> <client_id> <client_secret> <redirect_uri>');
  process.exit(2);
}

const accounts = {
  alice: { email: 'alice@example.com', email_verified: true, name: 'Alice Liddell', groups: ['engineers'] },
  bob: { email: 'bob@example.com', email_verified: true, name: 'Bob Builder', groups: ['sales'] },
  mallory: { email: 'mallory@example.com', email_verified: false, name: 'Mallory', groups: ['engineers'] },
};

const issuer = `http://${host}:${port}`;
const provider = new Provider(issuer, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    redirect_uris: [redirectUri],
    response_types: ['code'],
    grant_types: ['authorization_code'],
  }],
  scopes: ['openid', 'email', 'profile', 'groups'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name'],
    groups: ['groups'],
  },
  cookies: { keys: ['kakuremichi-test-op'] },
  features: { devInteractions: { enabled: true } },
  async findAccount(ctx, id) {
    const a = accounts[id];
    if (!a) return undefined;
    return { accountId: id, async claims() { return { sub: id, ...a }; } };
  },
});
provider.on('server_error', (ctx, err) => console.error('op server_error', err));
provider.listen(Number(port), host, () => console.log(`ready ${issuer}`));
