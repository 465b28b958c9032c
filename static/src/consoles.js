// cloud-console index page: the consoles this visitor may see, kept up to date
// by polling api/consoles (relative, so that it works under a proxy's prefix).

import './consoles.css';
import {
  FETCH_ABORT_MS, FETCH_TIMEOUT_MS, POLL_MS, clockOffset, compareConsoles, consoleHref, documentTitle,
  formatSize, lastOutputText, matches, readConsoles, retryDelay, stateText, summaryText, totals,
} from './consoles-model.js';
import { formatBytes } from './protocol.js';

const get = (id) => document.getElementById(id);
const bar = get('bar');
const statusText = get('status');
const retryIn = get('retryin');
const retryButton = get('retry');
const summary = get('summary');
const filter = get('filter');
const countText = get('count');
const problem = get('problem');
const table = get('consoles');
const tbody = get('rows');
const empty = get('empty');
const announcer = get('announce');

const page = {
  rows: [], // sorted, every console the server listed
  shown: [], // the rows that pass the filter, in order
  elements: new Map(), // name -> the row's elements, kept across polls
  highlighted: null, // a console's name
  query: '',
  lastFetch: null, // ms since the epoch (our clock) of the last good answer
  fetches: 0, // good answers so far
  error: null, // null | 'unreachable' | 'http' | 'invalid' | 'auth'
  message: '',
  failures: 0, // failed polls in a row
  retryAt: null, // when the next attempt is due, while failing
  offset: 0, // the server's clock minus ours, in ms
  timer: null,
  inFlight: null, // AbortController of the poll under way
  announced: null,
  nextId: 0,
};

const now = () => Date.now() + page.offset;

// ---- rows -----------------------------------------------------------------

function cell(className) {
  const td = document.createElement('td');
  td.className = className;
  return td;
}

function createRow(name) {
  const tr = document.createElement('tr');
  tr.id = `console-row-${page.nextId++}`;
  tr.className = 'row';
  tr.dataset.name = name;
  tr.setAttribute('aria-selected', 'false');
  const state = cell('c-state');
  const dot = document.createElement('span');
  dot.className = 'dot';
  dot.setAttribute('aria-hidden', 'true');
  const stateLabel = document.createElement('span');
  stateLabel.className = 'state-text';
  state.append(dot, stateLabel);
  const nameCell = cell('c-name');
  const link = document.createElement('a');
  link.className = 'link';
  nameCell.append(link);
  const title = cell('c-title');
  const viewers = cell('c-num viewers');
  const written = cell('c-num written');
  const last = cell('c-last');
  tr.append(state, nameCell, title, viewers, written, last);
  return { tr, state, stateLabel, link, title, viewers, written, last };
}

function setText(element, text) {
  if (element.textContent !== text) element.textContent = text;
}

function setTitle(element, text) {
  if (element.title !== text) element.title = text;
}

/** The parts of a row that change with the clock alone. */
function renderTimes(row, parts, at) {
  const state = stateText(row, at);
  setText(parts.stateLabel, state);
  const when = row.sinceIso ? ` since ${row.sinceIso}` : '';
  setTitle(parts.state, row.up
    ? `up${when}${row.reason ? ` (${row.reason})` : ''}`
    : `down${when}${row.reason ? `: ${row.reason}` : ''}`);
  setText(parts.last, lastOutputText(row, at));
  setTitle(parts.last, row.lastOutputIso ? `last output at ${row.lastOutputIso}` : 'no output yet');
}

function renderRow(row, parts, at) {
  const state = row.up ? 'up' : 'down';
  if (parts.tr.dataset.state !== state) parts.tr.dataset.state = state;
  const href = consoleHref(row, document.baseURI);
  if (parts.link.href !== href) parts.link.href = href;
  setText(parts.link, row.name);
  // The title is the operator's text: always text, never markup.
  setText(parts.title, row.title === row.name ? '' : row.title);
  setTitle(parts.title, row.title);
  setText(parts.viewers, String(row.viewers));
  parts.viewers.classList.toggle('zero', row.viewers === 0);
  if (row.watchers !== null) {
    const anonymous = row.viewers - row.watchers.length;
    const names = row.watchers.join(', ') + (anonymous > 0 ? ` and ${anonymous} without a name` : '');
    setTitle(parts.viewers, row.viewers ? `on it: ${names}` : 'nobody on it');
  }
  setText(parts.written, formatSize(row.bytesOut));
  setTitle(parts.written, `${formatBytes(row.bytesOut)} written by the guest`);
  renderTimes(row, parts, at);
}

/** Make the table show page.shown, in order, moving as few nodes as possible. */
function renderTable() {
  const at = now();
  const names = new Set(page.rows.map((row) => row.name));
  for (const [name, parts] of page.elements) {
    if (!names.has(name)) {
      parts.tr.remove();
      page.elements.delete(name);
    }
  }
  const focused = tbody.contains(document.activeElement) ? document.activeElement : null;
  const wanted = [];
  for (const row of page.shown) {
    let parts = page.elements.get(row.name);
    if (!parts) {
      parts = createRow(row.name);
      page.elements.set(row.name, parts);
    }
    renderRow(row, parts, at);
    wanted.push(parts.tr);
  }
  const keep = new Set(wanted);
  for (const tr of [...tbody.children]) if (!keep.has(tr)) tr.remove();
  wanted.forEach((tr, index) => {
    if (tbody.children[index] !== tr) tbody.insertBefore(tr, tbody.children[index] ?? null);
  });
  // Moving a node takes the focus from it: give it back.
  if (focused && document.activeElement !== focused) {
    if (focused.isConnected) focused.focus({ preventScroll: true });
    else filter.focus();
  }
  renderHighlight();
  renderCounts();
}

function renderTimesOnly() {
  const at = now();
  for (const row of page.shown) {
    const parts = page.elements.get(row.name);
    if (parts) renderTimes(row, parts, at);
  }
}

// ---- filter, highlight, counts -----------------------------------------------

function applyFilter() {
  page.shown = page.rows.filter((row) => matches(row, page.query));
  const visible = page.shown.some((row) => row.name === page.highlighted);
  if (!visible) page.highlighted = page.query.trim() && page.shown.length ? page.shown[0].name : null;
}

function renderHighlight() {
  for (const [name, parts] of page.elements) {
    const on = name === page.highlighted;
    if (parts.tr.classList.contains('highlighted') !== on) {
      parts.tr.classList.toggle('highlighted', on);
      parts.tr.setAttribute('aria-selected', String(on));
    }
  }
  const parts = page.highlighted === null ? null : page.elements.get(page.highlighted);
  if (parts) filter.setAttribute('aria-activedescendant', parts.tr.id);
  else filter.removeAttribute('aria-activedescendant');
}

function renderCounts() {
  const all = totals(page.rows);
  const loaded = page.lastFetch !== null;
  setText(summary, loaded ? summaryText(all) : '');
  summary.classList.toggle('has-down', all.down > 0);
  setText(countText, loaded ? `${page.shown.length} of ${all.consoles} shown` : '');
  if (loaded) document.title = documentTitle(all);
  table.hidden = loaded && page.shown.length === 0;
  let message = '';
  if (loaded && all.consoles === 0) {
    message = 'No consoles to show: none is configured, or none is open to your credential.';
  } else if (loaded && page.shown.length === 0) {
    message = `No console matches “${page.query.trim()}”.`;
  }
  setText(empty, message);
  empty.hidden = message === '';
}

/** Say the counts aloud when they change (not on every poll). */
function announceCounts() {
  const text = summaryText(totals(page.rows));
  if (text !== page.announced) {
    page.announced = text;
    announce(text);
  }
}

let filterAnnounceTimer = null;

function announceFilter() {
  clearTimeout(filterAnnounceTimer);
  filterAnnounceTimer = setTimeout(() => {
    announce(page.query.trim() ? `${page.shown.length} of ${page.rows.length} consoles shown` : summaryText(totals(page.rows)));
  }, 500);
}

function announce(text) {
  // Setting the same text again is not announced: clear it first.
  announcer.textContent = '';
  setTimeout(() => { announcer.textContent = text; }, 50);
}

function moveHighlight(step) {
  if (page.shown.length === 0) return;
  const index = page.shown.findIndex((row) => row.name === page.highlighted);
  let next;
  if (index === -1) next = step > 0 ? 0 : page.shown.length - 1;
  else next = Math.min(page.shown.length - 1, Math.max(0, index + step));
  page.highlighted = page.shown[next].name;
  renderHighlight();
  page.elements.get(page.highlighted)?.tr.scrollIntoView({ block: 'nearest' });
}

function open(name, newTab) {
  const parts = page.elements.get(name);
  if (!parts) return;
  if (newTab) window.open(parts.link.href, '_blank', 'noopener');
  else window.location.assign(parts.link.href);
}

filter.addEventListener('input', () => {
  const before = page.query;
  page.query = filter.value;
  if (page.query.trim() !== before.trim()) {
    page.highlighted = null; // the first match is highlighted, so that Enter opens it
    applyFilter();
    renderTable();
    announceFilter();
  }
});

filter.addEventListener('keydown', (event) => {
  if (event.altKey) return;
  if (event.key === 'ArrowDown' || event.key === 'ArrowUp') {
    event.preventDefault();
    moveHighlight(event.key === 'ArrowDown' ? 1 : -1);
  } else if (event.key === 'Enter') {
    event.preventDefault();
    const name = page.highlighted ?? (page.shown.length === 1 ? page.shown[0].name : null);
    if (name !== null) open(name, event.ctrlKey || event.metaKey);
  } else if (event.key === 'Escape') {
    event.preventDefault();
    if (filter.value) {
      filter.value = '';
      filter.dispatchEvent(new Event('input'));
    } else {
      page.highlighted = null;
      renderHighlight();
    }
  }
});

// Tabbing through the links moves the highlight with the focus; the arrows work there too.
tbody.addEventListener('focusin', (event) => {
  const tr = event.target.closest('tr');
  if (tr && tr.dataset.name !== page.highlighted) {
    page.highlighted = tr.dataset.name;
    renderHighlight();
  }
});

tbody.addEventListener('keydown', (event) => {
  if (event.altKey || event.ctrlKey || event.metaKey) return;
  if (event.key === 'ArrowDown' || event.key === 'ArrowUp') {
    event.preventDefault();
    const index = page.shown.findIndex((row) => row.name === page.highlighted);
    if (event.key === 'ArrowUp' && index <= 0) {
      filter.focus();
      return;
    }
    moveHighlight(event.key === 'ArrowDown' ? 1 : -1);
    page.elements.get(page.highlighted)?.link.focus();
  } else if (event.key.length === 1 && event.key !== ' ') {
    filter.focus(); // the key goes on into the filter box
  }
});

document.addEventListener('keydown', (event) => {
  if (event.key !== '/' || event.ctrlKey || event.metaKey || event.altKey) return;
  const target = event.target;
  if (target === filter || target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement) return;
  event.preventDefault();
  filter.focus();
  filter.select();
});

// ---- the poll ---------------------------------------------------------------

function setPhase(phase, text) {
  if (bar.dataset.phase !== phase) bar.dataset.phase = phase;
  setText(statusText, text);
}

function renderStatus() {
  const failing = page.error !== null && page.error !== 'auth';
  if (page.error === null) {
    setPhase('live', 'live');
  } else if (page.error === 'auth') {
    setPhase('auth', 'signed out');
  } else {
    setPhase('failing', page.error === 'unreachable' ? 'server unreachable' : page.message);
  }
  let retry = '';
  if (failing && page.inFlight !== null && page.retryAt === null) {
    retry = 'waiting for an answer';
  } else if (failing && page.retryAt !== null) {
    const seconds = Math.max(0, Math.ceil((page.retryAt - Date.now()) / 1000));
    retry = document.hidden ? 'paused while the tab is hidden' : `retrying in ${seconds} s`;
    if (page.lastFetch !== null) retry += ` · list as of ${Math.round((Date.now() - page.lastFetch) / 1000)} s ago`;
  }
  setText(retryIn, retry);
  retryIn.hidden = retry === '';
  retryButton.hidden = !(failing || page.error === 'auth');
  setText(retryButton, page.error === 'auth' ? 'reload' : 'retry now');
  table.classList.toggle('stale', page.error !== null);
  const alert = page.error === 'auth'
    ? 'The server refused the credential (HTTP 401): it has expired or been revoked, so the list '
      + 'is no longer updated. Reload the page to sign in again (with a token: open the link with '
      + '?token= again).'
    : '';
  setText(problem, alert);
  problem.hidden = alert === '';
}

function schedule(delay) {
  clearTimeout(page.timer);
  page.timer = null;
  if (document.hidden) return; // visibilitychange starts it again
  page.timer = setTimeout(poll, delay);
}

function fail(kind, message) {
  page.error = kind;
  page.message = message;
  page.failures += 1;
  const delay = retryDelay(page.failures);
  page.retryAt = Date.now() + delay;
  renderStatus();
  return delay;
}

async function poll() {
  clearTimeout(page.timer);
  page.timer = null;
  if (page.inFlight) return;
  const controller = new AbortController();
  page.inFlight = controller;
  page.retryAt = null;
  const slow = setTimeout(() => {
    page.error = 'unreachable';
    page.message = 'no answer yet';
    page.retryAt = null;
    renderStatus();
  }, FETCH_TIMEOUT_MS);
  const timeout = setTimeout(() => controller.abort(), FETCH_ABORT_MS);
  const sentAt = Date.now();
  let delay = POLL_MS;
  try {
    const response = await fetch('api/consoles', {
      cache: 'no-store',
      credentials: 'same-origin',
      headers: { Accept: 'application/json' },
      signal: controller.signal,
    });
    const receivedAt = Date.now();
    if (response.status === 401) {
      // Polling on would only be refused again (or, with passwords, have the
      // browser ask for one every few seconds): wait for the operator to reload.
      fail('auth', 'the credential was refused');
      delay = null;
    } else if (!response.ok) {
      delay = fail('http', `server error: HTTP ${response.status}`);
    } else {
      let rows;
      try {
        rows = readConsoles(await response.json());
      } catch (error) {
        rows = null;
        delay = fail('invalid', `bad answer from the server: ${error.message}`);
      }
      if (rows !== null) {
        page.offset = clockOffset(response.headers.get('date'), sentAt, receivedAt);
        page.rows = rows.sort(compareConsoles);
        page.lastFetch = Date.now();
        page.fetches += 1;
        page.error = null;
        page.message = '';
        page.failures = 0;
        page.retryAt = null;
        applyFilter();
        renderTable();
        renderStatus();
        announceCounts();
      }
    }
  } catch (error) {
    delay = fail('unreachable', error.name === 'AbortError' ? 'no answer in time' : String(error.message || error));
  } finally {
    clearTimeout(slow);
    clearTimeout(timeout);
    page.inFlight = null;
  }
  if (delay !== null) schedule(delay);
  else renderStatus();
}

// One ticker for the clock-driven text (ages, the retry countdown), while visible.
let ticker = null;

function startTicker() {
  if (ticker === null) {
    ticker = setInterval(() => {
      renderTimesOnly();
      renderStatus();
    }, 1000);
  }
}

function stopTicker() {
  clearInterval(ticker);
  ticker = null;
}

document.addEventListener('visibilitychange', () => {
  if (document.hidden) {
    clearTimeout(page.timer);
    page.timer = null;
    stopTicker();
    renderStatus();
  } else {
    startTicker();
    renderTimesOnly();
    if (page.error !== 'auth') poll(); // at once: what is shown may be minutes old
  }
});

retryButton.addEventListener('click', () => {
  if (page.error === 'auth') window.location.reload();
  else poll();
});

window.cloudConsoleIndex = Object.freeze({
  state: () => ({
    rows: page.shown.map((row) => row.name),
    highlighted: page.highlighted,
    lastFetch: page.lastFetch,
    error: page.error,
    message: page.message,
    total: page.rows.length,
    query: page.query,
    fetches: page.fetches,
    failures: page.failures,
    polling: page.timer !== null || page.inFlight !== null,
  }),
  refresh: () => poll(),
});

filter.focus();
renderCounts();
if (!document.hidden) {
  startTicker();
  poll();
}
