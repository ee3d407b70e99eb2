// The browser side of tests/browser.rs: one headless Chromium (Debian's /usr/bin/chromium,
// driven by playwright-core) shared by every test of the binary, plus two small page servers
// that give the tests two origins other than nginx's ("app", allowed by the nodes' CORS list,
// and "other", not allowed).
//
// Protocol: one JSON command per line on stdin, `{"id": n, "op": "...", ...}`; one JSON answer
// per command on stdout, `{"id": n, "ok": true, "result": ...}` or `{"id": n, "ok": false,
// "error": "..."}`, in any order (commands run concurrently). The first stdout line is
// `{"ready": true, "app": "<origin>", "other": "<origin>", "chromium": "<version>"}`.
// When stdin ends (the test binary exited, however it exited) the browser is closed and the
// process exits, so no Chromium outlives the tests.
//
// Environment: SSE_NODE_MODULES (where playwright-core is installed; scripts/test installs it),
// SSE_CHROMIUM (default /usr/bin/chromium).
'use strict';

const http = require('node:http');
const path = require('node:path');
const readline = require('node:readline');

const modules = process.env.SSE_NODE_MODULES;
if (!modules) {
  console.error('SSE_NODE_MODULES is not set');
  process.exit(2);
}
const { chromium } = require(path.join(modules, 'playwright-core'));

// The page every test starts from: helpers that open EventSources and record all they see.
const HARNESS = `<!doctype html>
<html><head><meta charset="utf-8"><title>sse-fanout browser test</title></head>
<body><pre id="out"></pre><script>
window.sources = [];
// Opens an EventSource and records every event it dispatches: the default "message", the
// node's own events, and the names asked for (addEventListener, as a page does).
window.openSource = function (url, options) {
  options = options || {};
  const es = new EventSource(url, { withCredentials: !!options.withCredentials });
  const rec = { es: es, events: [], opens: 0, errors: [] };
  const push = (e) => rec.events.push({ type: e.type, data: e.data, lastEventId: e.lastEventId, origin: e.origin });
  es.onmessage = push;
  const names = ['connected', 'disconnected', 'reset'].concat(options.names || []);
  for (const name of new Set(names)) es.addEventListener(name, push);
  es.onopen = () => { rec.opens += 1; };
  es.onerror = () => { rec.errors.push(es.readyState); };
  window.sources.push(rec);
  return window.sources.length - 1;
};
window.seen = function (i) {
  const r = window.sources[i];
  return { events: r.events, opens: r.opens, errors: r.errors, readyState: r.es.readyState };
};
window.seenAll = function () { return window.sources.map((_, i) => window.seen(i)); };
window.closeSource = function (i) { window.sources[i].es.close(); };
</script></body></html>`;

// Requests per path on the page servers, for the status-code checks (how often EventSource asked).
const hits = new Map();

// Answers the harness page, and a few fixed answers EventSource is tested against:
// /status/<code> (that status, JSON body), /wrong-type (200 text/plain), /drop (the connection
// is cut before any answer: a network error), /ends (a 200 stream that ends at once after
// `retry: 200`).
function serve(req, res) {
  const url = new URL(req.url, 'http://x');
  hits.set(url.pathname, (hits.get(url.pathname) || 0) + 1);
  const status = /^\/status\/(\d{3})$/.exec(url.pathname);
  if (url.pathname === '/') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(HARNESS);
  } else if (status) {
    res.writeHead(Number(status[1]), { 'content-type': 'application/json' });
    res.end(Number(status[1]) === 204 ? undefined : '{"error":"test"}');
  } else if (url.pathname === '/wrong-type') {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end('data: not an event stream\n\n');
  } else if (url.pathname === '/drop') {
    req.socket.destroy();
  } else if (url.pathname === '/ends') {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    res.end('retry: 200\ndata: once\n\n');
  } else {
    res.writeHead(404);
    res.end();
  }
}

function listen() {
  return new Promise((resolve, reject) => {
    const server = http.createServer(serve);
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(`http://127.0.0.1:${server.address().port}`));
  });
}

const contexts = new Map();
const pages = new Map();
let nextHandle = 1;

// Page methods a test may call by name (everything else goes through `eval`).
const PAGE_METHODS = new Set(['goto', 'fill', 'click', 'selectOption', 'screenshot', 'textContent', 'waitForSelector']);

async function run(browser, cmd) {
  switch (cmd.op) {
    case 'newContext': {
      const context = await browser.newContext({ ignoreHTTPSErrors: !!cmd.ignoreHTTPSErrors });
      if (cmd.cookies && cmd.cookies.length) await context.addCookies(cmd.cookies);
      const handle = nextHandle++;
      contexts.set(handle, context);
      return handle;
    }
    case 'closeContext': {
      const context = contexts.get(cmd.context);
      contexts.delete(cmd.context);
      if (context) await context.close();
      return null;
    }
    case 'newPage': {
      const context = contexts.get(cmd.context);
      if (!context) throw new Error(`no context ${cmd.context}`);
      const page = await context.newPage();
      await page.goto(cmd.url, { waitUntil: 'load' });
      const handle = nextHandle++;
      pages.set(handle, page);
      page.on('close', () => pages.delete(handle));
      return handle;
    }
    case 'eval': {
      // `fn` is the source of a function expression; it runs in the page with `arg`.
      const page = pages.get(cmd.page);
      if (!page) throw new Error(`no page ${cmd.page}`);
      return await page.evaluate(`(${cmd.fn})(${JSON.stringify(cmd.arg === undefined ? null : cmd.arg)})`);
    }
    case 'call': {
      const page = pages.get(cmd.page);
      if (!page) throw new Error(`no page ${cmd.page}`);
      if (!PAGE_METHODS.has(cmd.method)) throw new Error(`page.${cmd.method} is not allowed`);
      const result = await page[cmd.method](...(cmd.args || []));
      return Buffer.isBuffer(result) || result === undefined ? null : result;
    }
    case 'hits':
      return hits.get(cmd.path) || 0;
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.SSE_CHROMIUM || '/usr/bin/chromium',
    // Two cores for everything: no GPU process, no sandbox helper (root in CI).
    args: ['--disable-gpu', '--no-sandbox', '--disable-dev-shm-usage'],
  });
  const [app, other] = await Promise.all([listen(), listen()]);
  const write = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
  write({ ready: true, app, other, chromium: browser.version() });

  const lines = readline.createInterface({ input: process.stdin });
  lines.on('line', (line) => {
    let cmd;
    try {
      cmd = JSON.parse(line);
    } catch (e) {
      console.error(`not JSON: ${line}`);
      return;
    }
    run(browser, cmd).then(
      (result) => write({ id: cmd.id, ok: true, result: result === undefined ? null : result }),
      (e) => write({ id: cmd.id, ok: false, error: String(e && e.stack ? e.stack : e) }),
    );
  });
  lines.on('close', async () => {
    await browser.close().catch(() => {});
    process.exit(0);
  });
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
