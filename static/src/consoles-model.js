// The index page's data, as pure functions (no DOM, no fetch): reading the
// api/consoles answer, ordering, filtering and the words shown for each value.

import { formatDuration } from './statusbar.js';

/** How often the list is fetched while the tab is visible, in milliseconds. */
export const POLL_MS = 2000;

/** Longest wait between attempts while the server does not answer. */
export const MAX_RETRY_MS = 30_000;

/** A poll that has not answered after this long shows the server as not answering. */
export const FETCH_TIMEOUT_MS = 10_000;

/**
 * ... and is given up after this long. Not sooner: a 401 with a Basic challenge
 * makes the browser ask for a password while the poll waits, and giving up the
 * poll would take that dialog away from under the operator.
 */
export const FETCH_ABORT_MS = 120_000;

/** ISO 8601 text to milliseconds since the epoch; null when absent or unreadable. */
export function parseTime(text) {
  if (typeof text !== 'string' || text === '') return null;
  const ms = Date.parse(text);
  return Number.isFinite(ms) ? ms : null;
}

function count(value) {
  return Number.isFinite(value) && value >= 0 ? Math.floor(value) : 0;
}

/**
 * The server's answer as a list of rows, or an Error when it is not the
 * expected shape. Unknown fields are ignored; missing optional ones get defaults.
 */
export function readConsoles(payload) {
  if (!payload || !Array.isArray(payload.consoles)) {
    throw new Error('the server answered without a list of consoles');
  }
  const rows = [];
  const seen = new Set();
  for (const item of payload.consoles) {
    if (!item || typeof item.name !== 'string' || item.name === '' || seen.has(item.name)) continue;
    seen.add(item.name);
    rows.push({
      name: item.name,
      title: typeof item.title === 'string' && item.title !== '' ? item.title : item.name,
      up: item.state === 'up',
      reason: typeof item.reason === 'string' ? item.reason : '',
      since: parseTime(item.since),
      sinceIso: typeof item.since === 'string' ? item.since : null,
      viewers: count(item.viewers),
      // Who is on it (identities), told to a credential only; null when not told.
      watchers: Array.isArray(item.watchers) ? item.watchers.filter((w) => typeof w === 'string') : null,
      bytesOut: count(item.bytesOut),
      lastOutput: parseTime(item.lastOutput),
      lastOutputIso: typeof item.lastOutput === 'string' ? item.lastOutput : null,
      url: typeof item.url === 'string' ? item.url : null,
    });
  }
  return rows;
}

/** Counts for the summary, from the rows themselves (what this visitor may see). */
export function totals(rows) {
  const down = rows.filter((row) => !row.up).length;
  return {
    consoles: rows.length,
    up: rows.length - down,
    down,
    viewers: rows.reduce((sum, row) => sum + row.viewers, 0),
  };
}

/**
 * Down consoles first (an operator opens the index to find what is broken),
 * then by name; names are unique, so the order is total and stable across polls.
 */
export function compareConsoles(a, b) {
  if (a.up !== b.up) return a.up ? 1 : -1;
  return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
}

/** Case-insensitive substring of the name or the title; an empty query matches all. */
export function matches(row, query) {
  const needle = query.trim().toLowerCase();
  if (needle === '') return true;
  return row.name.toLowerCase().includes(needle) || row.title.toLowerCase().includes(needle);
}

/** "1 console", "12 consoles, 1 down". */
export function summaryText({ consoles, down }) {
  const base = `${consoles} console${consoles === 1 ? '' : 's'}`;
  return down ? `${base}, ${down} down` : base;
}

/** The document title: "cloud-console — 12 consoles". */
export function documentTitle({ consoles }) {
  return `cloud-console — ${consoles} console${consoles === 1 ? '' : 's'}`;
}

const UNITS = ['KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

/** 512 -> "512 B", 12345 -> "12.1 KiB", 3 << 20 -> "3.0 MiB". */
export function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  let value = bytes;
  let unit = -1;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value >= 100 ? Math.round(value) : value.toFixed(1)} ${UNITS[unit]}`;
}

/** Time elapsed from then to now, never negative: "12 s", "3 min". */
export function elapsed(then, now) {
  return formatDuration(Math.max(0, now - then));
}

/** The state cell's text: "up", "down 3 min: pty /dev/pts/4 hung up". */
export function stateText(row, now) {
  if (row.up) return 'up';
  const since = row.since === null ? '' : ` ${elapsed(row.since, now)}`;
  return `down${since}${row.reason ? `: ${row.reason}` : ''}`;
}

/** The last-output cell: "12 s ago", or "never". */
export function lastOutputText(row, now) {
  return row.lastOutput === null ? 'never' : `${elapsed(row.lastOutput, now)} ago`;
}

/**
 * The link to a console: the server's relative url when it is one on this
 * server, else the URL the server uses for it (c/NAME/).
 */
export function consoleHref(row, base) {
  const fallback = new URL(`c/${encodeURIComponent(row.name)}/`, base);
  if (row.url === null) return fallback.href;
  try {
    const url = new URL(row.url, base);
    const here = new URL(base);
    if (url.origin === here.origin && (url.protocol === 'http:' || url.protocol === 'https:')) return url.href;
  } catch {
    // not a URL: fall through
  }
  return fallback.href;
}

/**
 * Wait before retry number attempt (1-based) after failed polls: 2, 4, 8, 16,
 * then 30 s, each shortened by up to a quarter so that many open pages do not
 * come back in step after a server restart.
 */
export function retryDelay(attempt, random = Math.random) {
  const base = Math.min(MAX_RETRY_MS, POLL_MS * 2 ** Math.max(0, attempt - 1));
  return Math.round(base * (1 - 0.25 * random()));
}

/**
 * The offset of the server's clock from ours, from the Date header of an
 * answer (whole seconds) and the local times the request was sent and
 * answered; 0 when the header is missing or off by less than its resolution.
 */
export function clockOffset(dateHeader, sentAt, receivedAt) {
  const server = parseTime(dateHeader ?? '');
  if (server === null) return 0;
  // The header is truncated to the second: its true value is in [server, server + 1000).
  const offset = server + 500 - (sentAt + receivedAt) / 2;
  const slack = 500 + (receivedAt - sentAt) / 2;
  return Math.abs(offset) <= slack ? 0 : offset;
}
