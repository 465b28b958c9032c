// cloud-console page: wires the terminal, the status bar and the connection.

import './app.css';
import { ConsoleConnection } from './connection.js';
import { StatusBar } from './statusbar.js';
import { createTerminal, fontReady, terminalSink } from './terminal.js';
import { formatBytes } from './protocol.js';

const encoder = new TextEncoder();

function describeGap({ reason, lost }) {
  if (reason === 'restart') return 'server restarted: its history is shown';
  return lost === null || lost === undefined ? `gap (${reason})` : `gap of ${lost} bytes (${reason})`;
}

/** Fetch the server's history and save it as a file. */
async function downloadLog(status) {
  try {
    const response = await fetch('history', { cache: 'no-store' });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const blob = await response.blob();
    const name = (document.title || 'console').replace(/[^\w.-]+/g, '_');
    const stamp = new Date().toISOString().replace(/[:.]/g, '-');
    const link = document.createElement('a');
    link.href = URL.createObjectURL(blob);
    link.download = `${name}-${stamp}.log`;
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
  const term = createTerminal(document.getElementById('terminal'), (cols, rows) => status.setSize(cols, rows));

  const connection = new ConsoleConnection(location.href, terminalSink(term), {
    state: (state) => status.setState(state),
    hello: (hello) => {
      if (hello.title) document.title = hello.title;
      clients = hello.clients;
      status.setClients(clients);
      status.setReadOnly(Boolean(hello.readOnly));
    },
    gap: (gap) => status.setNotice(describeGap(gap)),
    clients: (count) => {
      clients = count;
      status.setClients(count);
    },
    skip: () => {}, // the line on screen says it
    console: (now, before) => {
      status.setConsole(now);
      if (now.state === 'up' && before.state === 'down') {
        status.setNotice(now.reason ? `console back: ${now.reason}` : 'console back');
      }
    },
    // bytes: the total refused on this connection so far.
    inputDiscarded: ({ bytes, reason }) => status.setNotice(
      `input not sent (${reason})${bytes === null ? '' : `: ${formatBytes(bytes)}`}`,
    ),
  });

  const send = (bytes) => {
    if (connection.readOnly) status.setNotice('read-only: input is not sent');
    else if (!connection.send(bytes)) status.setNotice('not connected: input dropped');
  };
  term.onData((data) => send(encoder.encode(data)));
  term.onBinary((data) => send(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff)));

  status.onStty(() => {
    send(encoder.encode(`stty rows ${term.rows} cols ${term.cols}\r`));
    term.focus();
  });
  status.onDownload(() => downloadLog(status));
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
      readOnly: connection.readOnly,
      session: connection.session,
    }),
  });

  connection.connect();
}

main();
