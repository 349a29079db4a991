// What every browser script shares: Debian's Chromium driven by playwright-core, the JSON
// argument, and one JSON line out.
//
// drive(fn) parses process.argv[2] as JSON (its chromium_args go to Chromium), opens a context
// and a page (20 s timeouts), runs fn({ args, browser, context, page }), prints what it returns
// as one JSON line ({ error } if it threw), and always closes the browser.
import { chromium } from 'playwright-core';

export async function drive(fn) {
  const args = JSON.parse(process.argv[2]);
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--disable-gpu', '--disable-quic', '--no-first-run',
      ...(args.chromium_args || [])],
  });
  let out;
  try {
    const context = await browser.newContext();
    const page = await context.newPage();
    page.setDefaultTimeout(20000);
    out = await fn({ args, browser, context, page });
  } catch (e) {
    out = { error: String(e && e.stack || e) };
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
}
