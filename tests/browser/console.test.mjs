// Drives the Apex console in headless Chromium, as a person would. Started by the Rust test
// tests/console/main.rs, which owns the running stack and plays the agent runtime.
//
//   node tests/browser/console.test.mjs <base_url> <user_token> <screenshot> <admin_token> [admin_screenshot]
//
// Protocol on stdout, one JSON object a line:
//   {"event":"run_created","instance_id":"…"}  the page started a run: drive its steps now
//   {"event":"done", …}                        what the page showed; exit code 0
// Anything else goes to stderr; any failure exits 1 (after a screenshot of the failing page).
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { chromium } from 'playwright-core';

const CHROMIUM = '/usr/bin/chromium';
const STEPS = ['agent_started', 'agent_thinking', 'tool_executing', 'tool_completed', 'agent_thinking', 'agent_completed'];
const TIMEOUT_MS = 30_000;

const [baseUrl, userToken, screenshot, adminToken, adminScreenshot] = process.argv.slice(2);
if (!baseUrl || !userToken || !screenshot || !adminToken) {
  console.error('usage: console.test.mjs <base_url> <user_token> <screenshot> <admin_token> [admin_screenshot]');
  process.exit(2);
}

const send = (message) => process.stdout.write(`${JSON.stringify(message)}\n`);
const problems = []; // uncaught page errors and CSP violations

function watch(page, name) {
  page.on('pageerror', (e) => problems.push(`${name}: uncaught ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && /Content Security Policy|Refused to/i.test(m.text())) {
      problems.push(`${name}: ${m.text()}`);
    }
  });
}

async function logIn(page, token) {
  const response = await page.goto(`${baseUrl}/console`);
  if (!response.ok()) throw new Error(`GET /console answered ${response.status()}`);
  const csp = response.headers()['content-security-policy'] || '';
  if (!csp.includes("default-src 'none'")) throw new Error(`weak or missing CSP: ${csp}`);
  await page.fill('#token', token);
  await page.click('#login-form button[type=submit]');
}

/** As alice: see the catalogue, get a visible API error, start a run, watch its steps live. */
async function userJourney(page) {
  await logIn(page, userToken);
  await page.waitForSelector('#ws-status[data-state=open]');
  await page.waitForSelector('#run-agent option[value=spend-analyst]', { state: 'attached' });
  const agents = await page.$$eval('#agents li', (items) => items.map((li) => li.dataset.agent));

  // An API error is shown, code and message: start a run of an agent that does not exist.
  await page.$eval('#run-agent', (select) => {
    const option = document.createElement('option');
    option.value = 'no-such-agent';
    option.textContent = 'no-such-agent';
    select.append(option);
    select.value = 'no-such-agent';
  });
  await page.click('#run-start');
  await page.waitForSelector('#error:not([hidden])');
  const errorText = await page.textContent('#error-text');
  await page.$eval('#run-agent option[value=no-such-agent]', (option) => option.remove());

  await page.selectOption('#run-agent', 'spend-analyst');
  await page.fill('#run-input', 'Why did my AI bill double last month?');
  await page.click('#run-start');
  const card = await page.waitForSelector('.run[data-instance-id]');
  const instanceId = await card.getAttribute('data-instance-id');
  send({ event: 'run_created', instance_id: instanceId });

  const run = `.run[data-instance-id="${instanceId}"]`;
  await page.waitForSelector(`${run} .events li[data-type=agent_completed]`);
  await page.waitForSelector(`${run} .status[data-status=completed]`);
  const steps = await page.$$eval(`${run} .events li`, (items) =>
    items.map((li) => ({ type: li.dataset.type, sequence: Number(li.dataset.sequence), text: li.querySelector('.text').textContent })));
  const errorVisible = await page.isVisible('#error');
  mkdirSync(dirname(screenshot), { recursive: true });
  await page.screenshot({ path: screenshot, fullPage: true });
  return { agents, error_text: errorText, error_visible_after_run: errorVisible, instance_id: instanceId, steps, page_text: await page.innerText('body') };
}

/** As an admin: agents with statistics, running instances and projector lag, refreshing. */
async function adminJourney(page) {
  await logIn(page, adminToken);
  await page.waitForSelector('#admin-agents tr[data-agent=spend-analyst]');
  await page.waitForFunction(() => document.querySelector('#admin-agents tr[data-agent=spend-analyst] td[data-col=runs]')?.textContent === '2');
  await page.waitForSelector('#admin-running tr[data-instance-id]');
  await page.waitForSelector('#admin-projectors tr[data-projector]');
  await page.waitForFunction(() => Number(document.querySelector('#admin-updated').dataset.refreshes) >= 2);
  const running = await page.$$eval('#admin-running tr[data-instance-id]', (rows) => rows.map((r) => r.dataset.instanceId));
  const projectors = await page.$$eval('#admin-projectors tr[data-projector]', (rows) => rows.map((r) => r.dataset.projector));
  if (adminScreenshot) {
    mkdirSync(dirname(adminScreenshot), { recursive: true });
    await page.screenshot({ path: adminScreenshot, fullPage: true });
  }
  return { running, projectors, refreshes: Number(await page.getAttribute('#admin-updated', 'data-refreshes')) };
}

const profile = mkdtempSync(join(tmpdir(), 'apex-console-chromium-'));
let context;
let current;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1280, height: 860 },
    locale: 'en-GB',
    timezoneId: 'UTC',
  });
  context.setDefaultTimeout(TIMEOUT_MS);
  current = context.pages()[0] || (await context.newPage());
  watch(current, 'user page');
  const user = await userJourney(current);
  current = await context.newPage();
  watch(current, 'admin page');
  const admin = await adminJourney(current);
  if (problems.length) throw new Error(`the page reported problems:\n${problems.join('\n')}`);
  send({ event: 'done', screenshot, user, admin });
  process.exitCode = 0;
} catch (e) {
  console.error(`console browser test failed: ${e.stack || e}`);
  if (current) {
    const failure = join(dirname(screenshot), 'console-failure.png');
    await current.screenshot({ path: failure, fullPage: true }).catch(() => {});
    console.error(`screenshot of the failing page: ${failure}`);
  }
  process.exitCode = 1;
} finally {
  await context?.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
