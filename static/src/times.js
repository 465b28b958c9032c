// When each line of the terminal arrived: the server's `times` marks, tied to
// the lines they were written on with xterm.js markers (which follow the lines
// as the scrollback moves and go when it drops them). Pure of the DOM but for
// the terminal it is given.

/**
 * Line arrival times: one entry per written piece that began a new line, with
 * the time its bytes arrived; a line takes the time of the entry at or above it.
 */
export class LineTimes {
  constructor(term) {
    this.term = term;
    this.entries = []; // {marker, time}, by line
    this.coveredEnd = null; // marker on the last line that has a time
  }

  /** Every line written since the last call (and not yet timed) arrived at `time`. */
  record(time) {
    const buffer = this.term.buffer.active;
    if (buffer.type !== 'normal' || time === null || time === undefined) return;
    const cursorLine = buffer.baseY + buffer.cursorY;
    // The cursor's line has content only if the cursor has moved along it.
    const last = buffer.cursorX > 0 ? cursorLine : cursorLine - 1;
    const from = this.coveredEnd && !this.coveredEnd.isDisposed ? this.coveredEnd.line + 1 : 0;
    if (last < from) return;
    const marker = this.term.registerMarker(from - cursorLine);
    if (!marker) return;
    this.entries.push({ marker, time });
    this.coveredEnd?.dispose();
    this.coveredEnd = this.term.registerMarker(last - cursorLine);
    if (this.entries.length > 64 && this.entries[0].marker.isDisposed) {
      this.entries = this.entries.filter((entry) => !entry.marker.isDisposed);
    }
  }

  /** The screen was reset: no line has a time any more. */
  reset() {
    for (const entry of this.entries) entry.marker.dispose();
    this.entries = [];
    this.coveredEnd?.dispose();
    this.coveredEnd = null;
  }

  /** The entry covering buffer line `line`, or null. */
  entryOf(line) {
    if (!this.coveredEnd || this.coveredEnd.isDisposed || line > this.coveredEnd.line) return null;
    let low = 0;
    let high = this.entries.length - 1;
    let found = null;
    while (low <= high) {
      const middle = (low + high) >> 1;
      const at = this.entries[middle].marker.line;
      if (at <= line) {
        if (at >= 0) found = this.entries[middle];
        low = middle + 1;
      } else {
        high = middle - 1;
      }
    }
    return found;
  }

  /** When buffer line `line` arrived (seconds since the epoch), or null. */
  timeOf(line) {
    return this.entryOf(line)?.time ?? null;
  }

  /** Whether `line` is the first line of its time (where the gutter shows it). */
  startsAt(line) {
    const entry = this.entryOf(line);
    return entry !== null && entry.marker.line === line;
  }

  /** The first line that arrived at or after `seconds`, or null. */
  firstLineAtOrAfter(seconds) {
    for (const { marker, time } of this.entries) {
      if (!marker.isDisposed && marker.line >= 0 && time >= seconds) return marker.line;
    }
    return null;
  }
}

const pad = (n, width = 2) => String(n).padStart(width, '0');

/** "2026-12-04 03:00:00.250" in local time. */
export function localStamp(seconds) {
  const d = new Date(seconds * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} `
    + `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

/** "2026-12-04T02:00:00.250Z". */
export function utcStamp(seconds) {
  return new Date(seconds * 1000).toISOString();
}

/** "03:00:00" in local time, for the gutter. */
export function shortStamp(seconds) {
  const d = new Date(seconds * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/**
 * What "go to time" was given, as seconds since the epoch, or null: HH:MM or
 * HH:MM:SS (local time, today, or yesterday if that is still to come), or any
 * date and time Date.parse reads (ISO 8601: "2026-12-04T02:00:00Z").
 * @param {string} text
 * @param {number} now milliseconds since the epoch
 */
export function parseMoment(text, now = Date.now()) {
  const value = text.trim();
  const clock = /^(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,3}))?)?$/.exec(value);
  if (clock) {
    const [, h, m, s = '0', ms = '0'] = clock;
    const d = new Date(now);
    d.setHours(Number(h), Number(m), Number(s), Number(ms.padEnd(3, '0')));
    if (d.getTime() > now) d.setDate(d.getDate() - 1);
    return d.getTime() / 1000;
  }
  const parsed = Date.parse(value);
  return Number.isFinite(parsed) ? parsed / 1000 : null;
}
