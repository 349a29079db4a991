// Drives Debian's Chromium with playwright-core through a single sign-on at an OpenID Provider.
//
// usage: node browser.mjs '<json>' where json is
//   { "url": resource URL, "op": the OP's issuer, "login": account at the OP,
//     "tamper": "nonce" | "state" | null }
// Goes to the resource, follows the sign-in page's "Sign in with" link, signs in at the OP,
// consents, and loads the resource again. Prints one JSON line:
//   { "landed": { url, status, text } where the sign-in ended,
//     "status", "url", "text": the resource loaded again, "cookies": [...] }
import { drive } from './chromium.mjs';

await drive(async ({ args, context, page }) => {
  let lastNav = null;
  page.on('response', (r) => {
    if (r.request().isNavigationRequest() && r.frame() === page.mainFrame()) lastNav = r;
  });
  if (args.tamper) {
    // Change what control sends to the OP (its redirect from /auth/sso/<name>), as an attacker
    // splicing another sign-in's answer in would. (A redirect's target cannot be routed, so the
    // redirect itself is fetched and rewritten.)
    await page.route((u) => /^\/auth\/sso\/[^/]+$/.test(u.pathname), async (route) => {
      const resp = await route.fetch({ maxRedirects: 0 });
      const headers = resp.headers();
      const u = new URL(headers.location);
      u.searchParams.set(args.tamper, 'tampered-' + args.tamper);
      headers.location = u.toString();
      await route.fulfill({ response: resp, headers });
    });
  }
  await page.goto(args.url);
  await page.click('a.sso');
  await page.waitForSelector('input[name=login]');
  await page.fill('input[name=login]', args.login);
  await page.fill('input[name=password]', 'any password');
  await page.click('button[type=submit]');
  // Consent, then back through control and the gateway's callback to the resource (or to a
  // page that refuses the sign-in).
  await page.waitForSelector('input[name=prompt][value=consent]', { state: 'attached' });
  await Promise.all([
    page.waitForURL((u) => !u.href.startsWith(args.op), { waitUntil: 'load' }),
    page.click('button[type=submit]'),
  ]);
  const landed = { url: page.url(), status: lastNav ? lastNav.status() : null, text: await page.innerText('body') };
  // The resource again, now with the session cookie (the tests' main check).
  const again = await page.goto(args.url);
  return { landed, status: again.status(), url: page.url(), text: await page.innerText('body'),
    cookies: (await context.cookies()).map((c) => ({ name: c.name, domain: c.domain, httpOnly: c.httpOnly, sameSite: c.sameSite })) };
});
