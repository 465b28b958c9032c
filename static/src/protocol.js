// The cloud-console.v1 wire format, as pure functions (no DOM, no sockets).

/** Subprotocol the page asks for; the server must select it. */
export const SUBPROTOCOL = 'cloud-console.v1';

/** Acknowledge after this many rendered bytes (or when the write queue drains). */
export const ACK_EVERY = 64 * 1024;

/** Longest wait between reconnection attempts, in milliseconds. */
export const MAX_BACKOFF_MS = 10_000;

/**
 * After a reconnect with the VM's console down, how long to keep showing it down
 * when nothing follows hello (the server repeats 'down' right after hello).
 */
export const CONSOLE_CONFIRM_MS = 2000;

/** Close codes the server uses. */
export const CLOSE_LAGGING = 4000;
export const CLOSE_CONSOLE_CLOSED = 4001;
export const CLOSE_GOING_AWAY = 1001;

/**
 * WebSocket URL for the console, relative to the page so that the page works
 * under a reverse-proxy sub-path ("/some/prefix/" connects to "/some/prefix/ws").
 * @param {string} pageHref location.href of the page
 * @param {number|null} from offset to resume from; null on a first connection
 * @param {string|null} session the server run that offset belongs to, if known
 */
export function socketUrl(pageHref, from = null, session = null) {
  const url = new URL('ws', pageHref);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  url.hash = '';
  url.search = '';
  if (from !== null) {
    url.searchParams.set('from', String(from));
    if (session) url.searchParams.set('session', session);
  }
  return url.href;
}

/**
 * Split a binary server message into the absolute offset of its first
 * payload byte (8 bytes, big-endian) and the payload itself.
 * @param {ArrayBuffer} buffer
 * @returns {{offset: number, bytes: Uint8Array} | null} null if too short
 */
export function decodeOutput(buffer) {
  if (buffer.byteLength < 8) return null;
  const offset = Number(new DataView(buffer).getBigUint64(0, false));
  return { offset, bytes: new Uint8Array(buffer, 8) };
}

/** Text message telling the server that every byte before offset is rendered. */
export function ackMessage(offset) {
  return JSON.stringify({ type: 'ack', offset });
}

/**
 * Delay before reconnection attempt number attempt (0-based): exponential,
 * capped at MAX_BACKOFF_MS, with jitter so that many pages reconnecting after a
 * server restart do not arrive in step.
 * @param {number} attempt
 * @param {number} floor smallest delay before jitter, in milliseconds
 * @param {() => number} random
 */
export function backoffDelay(attempt, floor = 0, random = Math.random) {
  const base = Math.max(floor, Math.min(MAX_BACKOFF_MS, 500 * 2 ** attempt));
  return Math.round(base * (0.5 + 0.5 * random()));
}

const NUMBER = new Intl.NumberFormat('en-US');

/** 1234567 -> "1,234,567" (the same in every locale). */
export function formatCount(count) {
  return NUMBER.format(count);
}

/** "1 byte", "1,024 bytes". */
export function formatBytes(count) {
  return `${formatCount(count)} byte${count === 1 ? '' : 's'}`;
}

/**
 * The line printed where the server left out the middle of a boot's output: on
 * a line of its own, dim, attributes reset after. CAN first ends any escape
 * sequence the head was cut in the middle of.
 */
export function skipLine(count) {
  return `\x18\r\n\x1b[0;2m[... ${formatBytes(count)} not kept ...]\x1b[0m\r\n`;
}
