// The official MCP TypeScript SDK client against an MCP server published through kakuremichi:
// it discovers the protected-resource metadata and control's authorization server metadata,
// registers itself (RFC 7591), and completes the OAuth flow with PKCE without a person: the
// authorization URL is opened with an already signed-in user's control cookie and the consent
// form is allowed by this script. Then it lists and calls the server's tools.
//
// With "cimd": {"cert": PEM file, "key": PEM file}, it registers nothing: it publishes its
// client ID metadata document on an https server of its own on 127.0.0.1 and uses that URL as
// its client_id.
//
// usage: node mcp-client.mjs '{"url": MCP URL, "other": another MCP resource's URL,
//                               "cookie": "kakuremichi_control=...", "cimd": {cert, key}?}'
// Prints one JSON line: { tools, whoami, authUrl, client_id, other_status, other_challenge,
// query_status, token } (token: the access token, for the test's own checks).
import dns from 'node:dns';
import fs from 'node:fs';
import https from 'node:https';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { UnauthorizedError } from '@modelcontextprotocol/sdk/client/auth.js';

// *.localhost is loopback (as in browsers); Node's resolver does not know it.
const lookup = dns.lookup;
dns.lookup = (host, opts, cb) => {
  if (typeof opts === 'function') { cb = opts; opts = {}; }
  return lookup(host.endsWith('.localhost') ? '127.0.0.1' : host, opts, cb);
};

const REDIRECT = 'http://127.0.0.1:33418/callback';

class Provider {
  constructor(metadataUrl) {
    this.client = undefined; this.saved = undefined; this.verifier = undefined; this.authUrl = null;
    this.metadataUrl = metadataUrl;
  }
  get redirectUrl() { return REDIRECT; }
  get clientMetadataUrl() { return this.metadataUrl; }
  get clientMetadata() {
    return { client_name: 'kakuremichi e2e MCP client', redirect_uris: [REDIRECT],
      grant_types: ['authorization_code', 'refresh_token'], response_types: ['code'],
      token_endpoint_auth_method: 'none', application_type: 'native' };
  }
  state() { return 'e2e-state'; }
  clientInformation() { return this.client; }
  saveClientInformation(c) { this.client = c; }
  tokens() { return this.saved; }
  saveTokens(t) { this.saved = t; }
  saveCodeVerifier(v) { this.verifier = v; }
  codeVerifier() { return this.verifier; }
  redirectToAuthorization(url) { this.authUrl = url; }
}

function cookiesOf(resp) {
  return resp.headers.getSetCookie().map((c) => c.split(';')[0]);
}

// The person's part, done by the script: open the authorization URL signed in, allow.
async function consent(authUrl, cookie) {
  const page = await fetch(authUrl, { headers: { cookie }, redirect: 'manual' });
  const html = await page.text();
  if (page.status !== 200) throw new Error(`authorization page ${page.status}: ${html}`);
  const jar = [cookie, ...cookiesOf(page)].join('; ');
  const form = new URLSearchParams();
  for (const m of html.matchAll(/<input type="hidden" name="([^"]+)" value="([^"]*)">/g)) {
    form.append(m[1], m[2].replaceAll('&amp;', '&').replaceAll('&quot;', '"').replaceAll('&#39;', "'"));
  }
  form.append('decision', 'allow');
  const done = await fetch(new URL('/oauth/authorize', authUrl), {
    method: 'POST', body: form, headers: { cookie: jar }, redirect: 'manual',
  });
  const back = new URL(done.headers.get('location'));
  if (back.searchParams.get('state') !== 'e2e-state') throw new Error(`state: ${back}`);
  if (!back.searchParams.get('iss')) throw new Error(`no iss: ${back}`);
  return back.searchParams.get('code');
}

// Publishes this client's metadata document over https; resolves to [server, its URL, hits].
async function publish(cimd) {
  const hits = { n: 0 };
  let url;
  const server = https.createServer(
    { cert: fs.readFileSync(cimd.cert), key: fs.readFileSync(cimd.key) },
    (req, res) => {
      hits.n += 1;
      if (req.url !== '/mcp-client.json') { res.writeHead(404).end(); return; }
      res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'max-age=600' });
      res.end(JSON.stringify({ client_id: url, client_name: 'kakuremichi e2e MCP client (CIMD)',
        redirect_uris: [REDIRECT], grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'], token_endpoint_auth_method: 'none' }));
    });
  await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
  url = `https://127.0.0.1:${server.address().port}/mcp-client.json`;
  return [server, url, hits];
}

const args = JSON.parse(process.argv[2]);
let out;
let published = null;
try {
  if (args.cimd) published = await publish(args.cimd);
  const provider = new Provider(published ? published[1] : undefined);
  const url = new URL(args.url);
  let transport = new StreamableHTTPClientTransport(url, { authProvider: provider });
  try {
    await new Client({ name: 'e2e', version: '1.0.0' }).connect(transport);
    throw new Error('connected without authorization');
  } catch (e) {
    if (!(e instanceof UnauthorizedError)) throw e;
  }
  const code = await consent(provider.authUrl, args.cookie);
  await transport.finishAuth(code);
  transport = new StreamableHTTPClientTransport(url, { authProvider: provider });
  const client = new Client({ name: 'e2e', version: '1.0.0' });
  await client.connect(transport);
  const tools = (await client.listTools()).tools.map((t) => t.name);
  const whoami = JSON.parse((await client.callTool({ name: 'whoami', arguments: {} })).content[0].text);
  await client.close();
  // The same token on another MCP resource: refused.
  const token = provider.tokens().access_token;
  const init = { jsonrpc: '2.0', id: 1, method: 'tools/list' };
  const other = await fetch(args.other, {
    method: 'POST', body: JSON.stringify(init),
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json', accept: 'application/json, text/event-stream' },
  });
  // The token in the query string: refused.
  const query = await fetch(`${args.url}?access_token=${token}`, {
    method: 'POST', body: JSON.stringify(init),
    headers: { 'content-type': 'application/json', accept: 'application/json, text/event-stream' },
  });
  out = { tools, whoami, authUrl: provider.authUrl.toString(), client_id: provider.client.client_id,
    other_status: other.status, other_challenge: other.headers.get('www-authenticate'),
    query_status: query.status, token, document_fetches: published ? published[2].n : null };
} catch (e) {
  out = { error: String(e && e.stack || e) };
}
if (published) published[0].close();
console.log(JSON.stringify(out));
