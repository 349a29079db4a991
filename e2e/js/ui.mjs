// Walks the admin web UI in Chromium as a new admin would, with no API call of its own:
// set-up of the owner, a site created, its install one-liner read off the page and run by the
// test (on a host behind NAT), the site turning online with no reload, a resource created and
// its hostname opened. Along the way: screenshots at 1280 and 375 px, axe-core on every page
// in light and dark themes, console errors, CSRF, CSP and escaping.
//
// usage: node ui.mjs '<json>' where json is
//   { "control": control's URL for the browser, "admin_key", "email", "password",
//     "app_host": the hostname to publish, "app_url": that hostname's URL at the gateway,
//     "target": the private app's host:port, "dir": a folder for screenshots and hand-offs,
//     "chromium_args": [...] }
// Hand-off: writes <dir>/install-command, waits for <dir>/installed (the test ran it).
// Prints one JSON line: { steps: [...], online_at, reloaded, console_errors, axe: [...],
//   csrf_status, csp_blocked, pwned, escaped_title, app_text, pages: [...] }
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
      out.console_errors.push(`${p.url()}: ${m.text()}`);
    });
    p.on('pageerror', (e) => out.console_errors.push(`${p.url()}: ${e}`));
  };
  watch(page);
  const shot = async (name) => {
    out.steps.push(name);
    for (const width of [1280, 375]) {
      await page.setViewportSize({ width, height: 900 });
      await page.screenshot({ path: `${args.dir}/${out.steps.length.toString().padStart(2, '0')}-${name}-${width}.png`, fullPage: true });
    }
    await page.setViewportSize({ width: 1280, height: 900 });
  };
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

  // Every page a navigation link reaches answers 200 without a console error, and passes axe.
  await page.goto(args.control + '/ui');
  const links = await page.$$eval('nav a', (as) => as.map((a) => a.href));
  const more = [out.site_url, out.resource_url, args.control + '/ui/resources/new'];
  for (const url of [...new Set([...links, ...more])]) {
    const r = await page.goto(url);
    out.pages.push({ url, status: r.status() });
    await audit(url);
  }
  await axeContext.close();
  return out;
});
