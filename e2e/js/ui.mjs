// Walks the admin web UI in Chromium as a new admin would, with no API call of its own:
// set-up of the owner, a site created, its install one-liner read off the page and run by the
// test (on a host behind NAT), the site turning online with no reload, a resource created and
// its hostname opened, then protected with single sign-on (a provider added, the resource's
// access set), an end user signing in at the provider in a browser of her own and reaching the
// app, and the admin disabling her. Along the way: screenshots at 1280 and 375 px, axe-core on every page
// in light and dark themes, console errors, CSRF, CSP and escaping.
//
// usage: node ui.mjs '<json>' where json is
//   { "control": control's URL for the browser, "admin_key", "email", "password",
//     "app_host": the hostname to publish, "app_url": that hostname's URL at the gateway,
//     "target": the private app's host:port, "dir": a folder for screenshots and hand-offs,
//     "chromium_args": [...], "op": the OpenID Provider's issuer, "op_client_id",
//     "op_client_secret", "sso_user": the account at the provider, "sso_email": its e-mail }
// Hand-off: writes <dir>/install-command, waits for <dir>/installed (the test ran it).
// Prints one JSON line: { steps: [...], online_at, reloaded, console_errors, axe: [...],
//   csrf_status, csp_blocked, pwned, escaped_title, app_text, dashboard: { health, requests },
//   sso_signed_in_at, sso_app_text,
//   before_revoke_status, refused_status, revoke_lag_ms, policy_rule, pages: [...] }
import { readFileSync, writeFileSync, existsSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { drive } from './chromium.mjs';

const require = createRequire(import.meta.url);
const AXE = readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

await drive(async ({ args, browser, page }) => {
  const out = { steps: [], console_errors: [], axe: [], pages: [] };
  mkdirSync(args.dir, { recursive: true });
  let injecting = false; // the CSP check below makes its own (expected) error
  const watch = (p) => {
    p.on('console', (m) => {
      if (m.type() !== 'error') return;
      if (injecting && m.text().includes('Content Security Policy')) return;
      out.console_errors.push(`${p.url()}: ${m.text()} (${m.location().url})`);
    });
    p.on('pageerror', (e) => out.console_errors.push(`${p.url()}: ${e}`));
  };
  watch(page);
  const shot = async (name, p = page) => {
    out.steps.push(name);
    for (const width of [1280, 375]) {
      await p.setViewportSize({ width, height: 900 });
      await p.screenshot({ path: `${args.dir}/${out.steps.length.toString().padStart(2, '0')}-${name}-${width}.png`, fullPage: true });
    }
    await p.setViewportSize({ width: 1280, height: 900 });
  };
  // The answer to a form posted to a URL ending in `suffix`.
  const posted = (suffix) => page.waitForResponse((r) => r.request().method() === 'POST' && new URL(r.url()).pathname.endsWith(suffix));
  // axe-core in a context of its own that may inject the script (the UI's CSP would refuse it).
  const axeContext = await browser.newContext({ bypassCSP: true });
  const axePage = await axeContext.newPage();
  const audit = async (url) => {
    for (const scheme of ['light', 'dark']) {
      await axePage.emulateMedia({ colorScheme: scheme });
      await axePage.goto(url);
      await axePage.evaluate(AXE);
      const r = await axePage.evaluate(() => window.axe.run(document, { resultTypes: ['violations'] }));
      for (const v of r.violations) {
        if (v.impact === 'serious' || v.impact === 'critical') {
          out.axe.push({ url, scheme, id: v.id, impact: v.impact, nodes: v.nodes.slice(0, 3).map((n) => n.html) });
        }
      }
    }
  };

  // 1. The first visit: control has no user yet, so the set-up of the owner.
  await page.goto(args.control + '/');
  await page.waitForSelector('input[name=admin_key]');
  await shot('setup');
  await page.fill('input[name=admin_key]', args.admin_key);
  await page.fill('input[name=email]', args.email);
  await page.fill('input[name=name]', 'Owner');
  await page.fill('input[name=password]', args.password);
  await Promise.all([page.waitForURL((u) => u.pathname === '/ui'), page.click('button[type=submit]')]);
  await page.waitForSelector('h1');
  await shot('dashboard-empty');
  // The session cookie is the browser's; the axe context signs in with the same cookies.
  await axeContext.addCookies(await page.context().cookies());

  // 2. A site, from the navigation.
  await page.click('nav >> text=Sites');
  await page.fill('#site-name', 'home-lab');
  await Promise.all([page.waitForLoadState('load'), page.click('text=Create site')]);
  await page.waitForSelector('#install-command');
  await shot('site-created');
  const command = (await page.textContent('#install-command')).trim();
  out.site_url = args.control + '/ui/sites/' + await page.getAttribute('[data-node].status', 'data-node');
  out.install_command = command;
  // The test runs it on the fresh host; this page stays open, not reloaded.
  await page.evaluate(() => { window.__notReloaded = true; });
  writeFileSync(`${args.dir}/install-command`, command);
  while (!existsSync(`${args.dir}/installed`)) await sleep(50);
  const status = page.locator('[data-node].status').first();
  await status.filter({ hasText: 'online' }).waitFor({ timeout: 30000 });
  out.online_at = Date.now();
  out.reloaded = !(await page.evaluate(() => window.__notReloaded === true));
  await shot('site-online');

  // 3. A resource on it.
  await page.click('nav >> text=Resources');
  await page.click('text=New resource');
  await page.fill('#r-hostname', args.app_host);
  await page.selectOption('#r-site', { label: 'home-lab' });
  await page.fill('#r-target', args.target);
  await Promise.all([page.waitForURL(/\/ui\/resources\/[0-9a-f-]+$/), page.click('text=Create resource')]);
  await shot('resource-created');
  out.resource_url = page.url();

  // 4. Its hostname, in a new tab: the private app through the gateway.
  const app = await page.context().newPage();
  let text = '';
  for (let i = 0; i < 100; i++) {
    const r = await app.goto(args.app_url).catch(() => null);
    if (r && r.status() === 200) { text = await app.innerText('body'); break; }
    await sleep(100);
  }
  out.app_text = text;
  await app.close();

  // The dashboard: the resource healthy and its requests counted (gateways report every 5 s).
  const dash = { health: null, requests: 0 };
  for (let i = 0; i < 60 && !(dash.health === 'healthy' && dash.requests > 0); i++) {
    if (i > 0) await sleep(500);
    await page.goto(args.control + '/ui');
    const row = page.locator('tr', { hasText: args.app_host });
    if (await row.count()) {
      dash.health = (await row.locator('.health').textContent()).trim();
      dash.requests = parseInt(await row.locator('svg.spark').getAttribute('aria-label'), 10);
    }
  }
  out.dashboard = dash;
  await shot('dashboard-traffic');

  // 5. Single sign-on: the company's OpenID Provider, its "engineers" group made members.
  await page.click('nav >> text=Single sign-on');
  await page.check('input[name=kind][value=oidc]');
  await page.fill('#p-name', 'op');
  await page.fill('#p-display', 'Test OP');
  await page.fill('#p-issuer', args.op);
  await page.fill('#p-client', args.op_client_id);
  await page.fill('#p-secret', args.op_client_secret);
  await page.fill('#p-scopes', 'openid email profile groups');
  await page.fill('#p-claim', 'groups');
  await page.fill('#p-map', 'engineers = member');
  await page.check('input[name=auto_provision]');
  await Promise.all([page.waitForLoadState('load'), page.click('text=Add provider')]);
  await page.waitForSelector('td >> text=Test OP');
  await shot('sso-provider');
  // 6. The resource: only members who sign in.
  await page.goto(out.resource_url);
  await page.check('input[name=mode][value=sign-in]');
  await page.check('input[name=role][value=member]');
  await Promise.all([posted('/access'), page.click('text=Save access')]);
  await page.waitForLoadState('load');
  await shot('resource-protected');

  // 7. The end user, in a browser of her own: the app's address sends her to sign in.
  const userContext = await browser.newContext();
  const user = await userContext.newPage();
  // (The gateways have the change within moments: until then the app is still public.)
  for (let i = 0; i < 100; i++) {
    await user.goto(args.app_url);
    if (await user.$('a.sso')) break;
    await sleep(100);
  }
  out.sso_signed_in_at = user.url();
  await shot('sign-in', user);
  await user.click('a.sso');
  await user.waitForSelector('input[name=login]');
  await user.fill('input[name=login]', args.sso_user);
  await user.fill('input[name=password]', 'any password');
  await user.click('button[type=submit]');
  await user.waitForSelector('input[name=prompt][value=consent]', { state: 'attached' });
  await Promise.all([
    user.waitForURL((u) => !u.href.startsWith(args.op), { waitUntil: 'load' }),
    user.click('button[type=submit]'),
  ]);
  out.sso_app_text = await user.innerText('body');
  await shot('signed-in-app', user);
  // Her requests from the app's page (the browser's resolver and cookies; a redirect to sign in
  // counts as refused).
  const appStatus = () => user.evaluate((url) => fetch(url, { redirect: 'manual', cache: 'no-store' })
    .then((r) => (r.type === 'opaqueredirect' ? 302 : r.status)), args.app_url);
  out.before_revoke_status = await appStatus();

  // 8. The admin disables her; her next requests are refused.
  await page.click('nav >> text=Users');
  await Promise.all([posted('/state'), page.click(`text=Disable ${args.sso_email}`)]);
  const revoked = Date.now();
  let refused = null;
  while (Date.now() - revoked < 10000) {
    const code = await appStatus();
    if (code !== 200) { refused = code; break; }
    await sleep(20);
  }
  out.revoke_lag_ms = Date.now() - revoked;
  out.refused_status = refused;
  await page.waitForLoadState('load');
  await shot('user-disabled');
  await userContext.close();

  // A form without its CSRF token is refused (the browser's cookies, no token).
  const csrf = await page.request.post(args.control + '/ui/sites', { form: { name: 'no-token' }, maxRedirects: 0 });
  out.csrf_status = csrf.status();
  // A name that is markup is shown as text.
  await page.goto(args.control + '/ui/sites');
  await page.fill('#site-name', '<script>window.__pwned = 1</script>');
  await Promise.all([page.waitForLoadState('load'), page.click('text=Create site')]);
  await page.waitForSelector('#install-command');
  out.escaped_title = await page.textContent('h1');
  // The page's CSP blocks a script injected inline.
  injecting = true;
  out.csp_blocked = await page.evaluate(() => new Promise((resolve) => {
    document.addEventListener('securitypolicyviolation', () => resolve(true), { once: true });
    const s = document.createElement('script');
    s.textContent = 'window.__pwned = 2';
    document.body.appendChild(s);
    setTimeout(() => resolve(false), 1000);
  }));
  out.pwned = await page.evaluate(() => window.__pwned ?? null);
  injecting = false;

  // An access policy with a rule, from the editor.
  await page.click('nav >> text=Access policies');
  await page.fill('#p-name', 'staff');
  await Promise.all([page.waitForURL(/\/ui\/policies\/[0-9a-f-]+$/), page.click('text=Create policy')]);
  out.policy_url = page.url();
  await Promise.all([page.waitForResponse((r) => r.request().method() === 'POST'), page.click('text=Add a rule')]);
  await page.waitForSelector('#rule-1-paths');
  await page.fill('#rule-1-paths', '/hooks/*');
  await page.selectOption('#rule-1-action', 'allow');
  await Promise.all([page.waitForURL(out.policy_url), page.click('button:has-text("Save policy") >> nth=0')]);
  out.policy_rule = await page.inputValue('#rule-1-paths');
  await shot('policy-rule');

  // Every page a navigation link reaches answers 200 without a console error, and passes axe
  // (with the pages of one object of each kind and the confirmations).
  await page.goto(args.control + '/ui/gateways');
  const gatewayPage = await page.$eval('td a[href^="/ui/gateways/"]', (a) => a.href);
  await page.goto(args.control + '/ui');
  const links = await page.$$eval('nav a', (as) => as.map((a) => a.href));
  const more = [out.site_url, out.resource_url, args.control + '/ui/resources/new', gatewayPage,
    out.policy_url, args.control + '/ui/roles/owner', out.site_url + '/delete', out.resource_url + '/delete',
    args.control + '/ui/account'];
  for (const url of [...new Set([...links, ...more])]) {
    const r = await page.goto(url);
    out.pages.push({ url, status: r.status() });
    await audit(url);
  }
  await axeContext.close();
  return out;
});
