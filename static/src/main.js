// cloud-console page: wires the terminal, the status bar and the connection.

import './app.css';
import { ConsoleConnection } from './connection.js';
import { StatusBar } from './statusbar.js';
import { createTerminal, fontReady, terminalSink } from './terminal.js';
import { formatBytes } from './protocol.js';
import { SearchBox } from './search.js';
import { KeyBar, KeysMenu } from './keys.js';
import { LineTimes, localStamp, parseMoment, shortStamp, utcStamp } from './times.js';

const EXTENSIONS = { raw: 'log', asciicast: 'cast', text: 'txt' };

const encoder = new TextEncoder();

function describeGap({ reason, lost }) {
  if (reason === 'restart') return 'server restarted: its history is shown';
  return lost === null || lost === undefined ? `gap (${reason})` : `gap of ${lost} bytes (${reason})`;
}

/** Fetch the server's history (raw, asciicast or text) and save it as a file. */
async function downloadLog(status, format, term) {
  try {
    const query = format === 'raw' ? ''
      : `?format=${format}` + (format === 'asciicast' ? `&width=${term.cols}&height=${term.rows}` : '');
    const response = await fetch(`history${query}`, { cache: 'no-store' });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const blob = await response.blob();
    const name = (document.title || 'console').replace(/[^\w.-]+/g, '_');
    const stamp = new Date().toISOString().replace(/[:.]/g, '-');
    const link = document.createElement('a');
    link.href = URL.createObjectURL(blob);
    link.download = `${name}-${stamp}.${EXTENSIONS[format] ?? 'log'}`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
  } catch (error) {
    status.setNotice(`download failed: ${error.message}`);
  }
}

async function main() {
  await fontReady();
  const status = new StatusBar(document);
  let clients = null;
  let search = null;
  let lastAction = null;
  const container = document.getElementById('terminal');
  const term = createTerminal(container, (cols, rows) => status.setSize(cols, rows), {
    search: () => search?.open(),
  });
  search = new SearchBox(document, term);
  const lineTimes = new LineTimes(term);
  const times = new TimesView(document, term, container, lineTimes, status);

  const connection = new ConsoleConnection(location.href, terminalSink(term, lineTimes), {
    state: (state) => status.setState(state),
    hello: (hello) => {
      if (hello.title) document.title = hello.title;
      clients = hello.clients;
      status.setClients(clients);
      status.setReadOnly(Boolean(hello.readOnly));
    },
    gap: (gap) => status.setNotice(describeGap(gap)),
    clients: (count, who) => {
      clients = count;
      status.setClients(count, who);
    },
    skip: () => {}, // the line on screen says it
    console: (now, before) => {
      status.setConsole(now);
      if (now.state === 'up' && before.state === 'down') {
        status.setNotice(now.reason ? `console back: ${now.reason}` : 'console back');
      }
    },
    // bytes: the total refused on this connection so far.
    // Someone used an action (SysRq, reset...): "alice sent SysRq t at 02:13:05".
    action: ({ who, action, at }) => {
      const when = new Date(at);
      const time = Number.isNaN(when.getTime()) ? at : when.toLocaleTimeString('en-GB', { hour12: false });
      lastAction = `${who} sent ${action} at ${time}`;
      status.setNotice(lastAction);
    },
    inputDiscarded: ({ bytes, reason }) => status.setNotice(
      `input not sent (${reason})${bytes === null ? '' : `: ${formatBytes(bytes)}`}`,
    ),
  });

  const send = (bytes) => {
    if (connection.readOnly) status.setNotice('read-only: input is not sent');
    else if (!connection.send(bytes)) status.setNotice('not connected: input dropped');
  };
  const keyBar = new KeyBar(document, term, (data) => send(encoder.encode(data)));
  term.onData((data) => send(encoder.encode(keyBar.apply(data))));
  const keys = new KeysMenu(document, status, {
    confirm: (text) => window.confirm(text),
    prompt: (text) => window.prompt(text),
  });
  keys.load();
  term.onBinary((data) => send(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff)));

  status.onStty(() => {
    send(encoder.encode(`stty rows ${term.rows} cols ${term.cols}\r`));
    term.focus();
  });
  const format = document.getElementById('download-format');
  status.onDownload(() => downloadLog(status, format.value, term));
  window.addEventListener('online', () => connection.retryNow());

  // Read-only hook for tests and the curious.
  window.cloudConsole = Object.freeze({
    term,
    state: () => ({
      connected: connection.connected,
      connects: connection.connects,
      next: connection.next,
      rendered: connection.rendered,
      pending: connection.pending,
      gaps: connection.gaps,
      lastGap: connection.lastGap,
      skips: connection.skips,
      lastSkip: connection.lastSkip,
      console: { ...connection.console },
      lastDiscard: connection.lastDiscard,
      lastStatus: status.lastStatus,
      lastNotice: status.lastNotice,
      closedReason: connection.closedReason,
      clients,
      who: status.whoIs,
      readOnly: connection.readOnly,
      session: connection.session,
      search: { open: search.isOpen, ...search.results, text: search.count.textContent },
      actions: keys.actions,
      lastOutcome: keys.lastOutcome ?? null,
      lastAction,
      ctrl: keyBar.ctrl,
    }),
    // Buffer line -> arrival time (seconds since the epoch), or null.
    lineTime: (line) => lineTimes.timeOf(line),
    lineTimeShown: () => times.tooltip.hidden ? null : times.tooltip.textContent,
    gotoLine: () => times.gotoLine ?? null,
  });

  connection.connect();
}

/**
 * The times of lines: a tooltip where the pointer rests (or a tap lands), a
 * gutter beside the terminal (toggled), and "go to time".
 */
class TimesView {
  constructor(doc, term, container, lineTimes, status) {
    this.term = term;
    this.container = container;
    this.lineTimes = lineTimes;
    this.status = status;
    this.tooltip = doc.getElementById('linetime');
    this.gutter = doc.getElementById('gutter');
    this.toggle = doc.getElementById('times');
    this.gotoForm = doc.getElementById('goto');
    this.gotoInput = doc.getElementById('goto-time');
    container.addEventListener('mousemove', (event) => this.show(event));
    container.addEventListener('click', (event) => this.show(event));
    container.addEventListener('mouseleave', () => { this.tooltip.hidden = true; });
    this.toggle.addEventListener('click', () => this.setGutter(this.gutter.hidden));
    term.onRender(() => this.renderGutter());
    term.onScroll(() => this.renderGutter());
    this.gotoForm.addEventListener('submit', (event) => {
      event.preventDefault();
      this.goTo(this.gotoInput.value);
    });
  }

  /** The buffer line under a pointer event, or null. */
  lineAt(event) {
    const screen = this.container.querySelector('.xterm-screen');
    if (!screen) return null;
    const box = screen.getBoundingClientRect();
    const row = Math.floor((event.clientY - box.top) / (box.height / this.term.rows));
    if (row < 0 || row >= this.term.rows) return null;
    return this.term.buffer.active.viewportY + row;
  }

  show(event) {
    const line = this.lineAt(event);
    const time = line === null ? null : this.lineTimes.timeOf(line);
    if (time === null) {
      this.tooltip.hidden = true;
      return;
    }
    this.tooltip.textContent = `${localStamp(time)} local\n${utcStamp(time)}`;
    this.tooltip.style.left = `${Math.min(event.clientX + 14, window.innerWidth - 260)}px`;
    this.tooltip.style.top = `${event.clientY + 16}px`;
    this.tooltip.hidden = false;
  }

  setGutter(on) {
    this.gutter.hidden = !on;
    this.toggle.setAttribute('aria-pressed', String(on));
    this.renderGutter();
    this.term.focus();
  }

  renderGutter() {
    if (this.gutter.hidden) return;
    const screen = this.container.querySelector('.xterm-screen');
    const height = screen ? screen.getBoundingClientRect().height / this.term.rows : 17;
    const top = this.term.buffer.active.viewportY;
    const rows = [];
    for (let row = 0; row < this.term.rows; row += 1) {
      const line = top + row;
      const time = this.lineTimes.startsAt(line) || row === 0 ? this.lineTimes.timeOf(line) : null;
      const div = document.createElement('div');
      div.style.height = `${height}px`;
      div.style.lineHeight = `${height}px`;
      div.textContent = time === null ? '' : shortStamp(time);
      if (time !== null) div.title = `${localStamp(time)} local, ${utcStamp(time)}`;
      rows.push(div);
    }
    this.gutter.replaceChildren(...rows);
  }

  /** Scroll to the first line that arrived at or after the time given. */
  goTo(text) {
    const seconds = parseMoment(text);
    if (seconds === null) {
      this.status.setNotice(`not a time: ${text}`);
      return;
    }
    const line = this.lineTimes.firstLineAtOrAfter(seconds);
    if (line === null) {
      this.status.setNotice(`nothing arrived at or after ${utcStamp(seconds)} on this page`);
      return;
    }
    this.term.scrollToLine(line);
    this.term.selectLines(line, line);
    this.gotoLine = line;
  }
}

main();
