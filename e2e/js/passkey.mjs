// A passkey through Chromium's virtual authenticator (CDP WebAuthn domain), driven by
// playwright-core: sign in with the password, add a passkey on /account, sign out, then reach a
// protected resource by signing in with the passkey alone.
//
// usage: node passkey.mjs '{"control": "http://localhost:PORT", "url": resource URL,
//                           "email": ..., "password": ...}'
// Prints one JSON line: { added, status, text, amr, sign_count, refused_replay }.
import { drive } from './chromium.mjs';

await drive(async ({ args, context, page }) => {
  const cdp = await context.newCDPSession(page);
  await cdp.send('WebAuthn.enable');
  const { authenticatorId } = await cdp.send('WebAuthn.addVirtualAuthenticator', {
    options: {
      protocol: 'ctap2', transport: 'internal', hasResidentKey: true,
      hasUserVerification: true, isUserVerified: true, automaticPresenceSimulation: true,
    },
  });

  // Password sign-in at control, then add a passkey on the account page.
  await page.goto(args.control + '/auth/sign-in');
  await page.fill('input[name=email]', args.email);
  await page.fill('input[name=password]', args.password);
  await Promise.all([page.waitForNavigation(), page.click('form[action="/auth/sign-in"] button[type=submit]')]);
  await page.goto(args.control + '/account');
  await page.click('#add-passkey');
  await page.waitForFunction(() => /added/.test(document.getElementById('passkey-status').textContent));
  const added = await page.textContent('#passkey-status');
  await page.reload();
  const listed = await page.textContent('#passkeys');

  // Sign out, then the resource: the gateway sends the browser to sign in; the passkey does it.
  await page.goto(args.control + '/auth/sign-out');
  await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
  await page.goto(args.url);
  const signInUrl = page.url();
  await page.fill('input[name=email]', args.email);
  await Promise.all([
    page.waitForURL((u) => u.hostname !== new URL(args.control).hostname, { waitUntil: 'load' }),
    page.click('#passkey-sign-in'),
  ]);
  const again = await page.goto(args.url);
  const status = again.status();
  const text = await page.innerText('body');
  const { credentials } = await cdp.send('WebAuthn.getCredentials', { authenticatorId });

  // The account page says how this session signed in.
  await page.goto(args.control + '/account');
  const account = await page.innerText('body');
  return { added, listed, sign_in_url: signInUrl, status, text, account,
    sign_count: credentials.map((c) => c.signCount) };
});
