// A resource's password or PIN through Chromium, driven by playwright-core.
//
// usage: node passcode.mjs '{"visits": [{"url": resource URL, "values": ["...", ...]}, ...]}'
// Each visit is a fresh browser context: it opens the resource (the gateway sends it to the
// sign-in page), types each value into the site's password/PIN form in turn, and records what
// each submission ended on. Prints one JSON line:
//   { "visits": [ { "form": label of the form, "steps": [ { status, url, text } ] } ] }
// A step that reached the resource has its text (the app's JSON); a refused one has the page's.
import { drive } from './chromium.mjs';

await drive(async ({ args, context: first }) => {
  const visits = [];
  for (const visit of args.visits) {
    const context = await first.browser().newContext();
    const page = await context.newPage();
    page.setDefaultTimeout(20000);
    let lastNav = null;
    page.on('response', (r) => {
      if (r.request().isNavigationRequest() && r.frame() === page.mainFrame()) lastNav = r;
    });
    await page.goto(visit.url);
    const form = await page.textContent('#passcode label');
    const steps = [];
    for (const value of visit.values) {
      await page.fill('#passcode input[name=passcode]', value);
      await Promise.all([
        page.waitForNavigation({ waitUntil: 'load' }),
        page.click('#passcode button[type=submit]'),
      ]);
      steps.push({ status: lastNav ? lastNav.status() : null, url: page.url(), text: await page.innerText('body') });
      if (!(await page.$('#passcode input[name=passcode]'))) break;
    }
    visits.push({ form, steps });
    await context.close();
  }
  return { visits };
});
