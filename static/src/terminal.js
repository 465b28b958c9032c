// The xterm.js terminal: look, size, clipboard, and the byte sink the
// connection writes into.

import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import { skipLine } from './protocol.js';

export const FONT_FAMILY = '"JetBrains Mono Variable", "DejaVu Sans Mono", monospace';
const FONT_SIZE = 14;

const THEME = {
  background: '#0f1216',
  foreground: '#d5dae0',
  cursor: '#e8eaed',
  cursorAccent: '#0f1216',
  selectionBackground: '#3b4d63',
  black: '#3d4450',
  red: '#e5646a',
  green: '#8fc572',
  yellow: '#e0b959',
  blue: '#5ea5e8',
  magenta: '#c58be0',
  cyan: '#4fc2c7',
  white: '#c8ced6',
  brightBlack: '#5c6672',
  brightRed: '#ff8a8f',
  brightGreen: '#acdf90',
  brightYellow: '#f5d27e',
  brightBlue: '#86bdf5',
  brightMagenta: '#dba9f2',
  brightCyan: '#7fdde0',
  brightWhite: '#f3f5f7',
};

const NOTHING = new Uint8Array(0);

/**
 * Wait (briefly) for the terminal font: xterm.js measures the cell size once,
 * and a font that arrives later would leave gaps between characters.
 */
export async function fontReady() {
  if (!document.fonts) return;
  const timeout = new Promise((resolve) => setTimeout(resolve, 3000));
  const loads = Promise.all([
    document.fonts.load(`${FONT_SIZE}px ${FONT_FAMILY}`),
    document.fonts.load(`bold ${FONT_SIZE}px ${FONT_FAMILY}`),
  ]);
  await Promise.race([loads.catch(() => {}), timeout]);
}

/**
 * Open a terminal that fills `container` and follows its size.
 * @param {HTMLElement} container
 * @param {(cols: number, rows: number) => void} onSize
 */
export function createTerminal(container, onSize, keys = {}) {
  const term = new Terminal({
    scrollback: 2000,
    fontFamily: FONT_FAMILY,
    fontSize: FONT_SIZE,
    theme: THEME,
    cursorBlink: true,
    // The search add-on highlights every match with decorations, a proposed API.
    allowProposedApi: true,
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.onResize(({ cols, rows }) => onSize(cols, rows));
  term.open(container);
  fit.fit();
  onSize(term.cols, term.rows);

  let frame = 0;
  new ResizeObserver(() => {
    cancelAnimationFrame(frame);
    frame = requestAnimationFrame(() => fit.fit());
  }).observe(container);

  enableClipboard(term, container, keys);
  term.focus();
  return term;
}

/**
 * Selecting copies (as in most terminals); Ctrl+Shift+C copies too. Pasting is
 * the browser's: Ctrl+Shift+V, Shift+Insert or right-click > Paste reach
 * xterm.js as a paste event. Ctrl+C and Ctrl+V stay keys for the guest.
 */
function enableClipboard(term, container, keys) {
  let selecting = false;
  container.addEventListener('mousedown', () => { selecting = true; });
  document.addEventListener('mouseup', () => {
    if (!selecting) return;
    selecting = false;
    // xterm.js finishes the selection in its own mouseup handler: after this one.
    setTimeout(() => copySelection(term), 0);
  });
  term.attachCustomKeyEventHandler((event) => {
    if (event.type === 'keydown' && event.ctrlKey && event.shiftKey && event.code === 'KeyC') {
      copySelection(term);
      event.preventDefault();
      return false;
    }
    // Ctrl+Shift+F opens the search; Ctrl+F (no Shift) stays the guest's.
    if (event.type === 'keydown' && event.ctrlKey && event.shiftKey && event.code === 'KeyF' && keys.search) {
      keys.search();
      event.preventDefault();
      return false;
    }
    return true;
  });
}

function copySelection(term) {
  const text = term.getSelection();
  if (!text) return;
  if (window.isSecureContext && navigator.clipboard) {
    navigator.clipboard.writeText(text).catch(() => {});
    return;
  }
  // Plain http off localhost has no clipboard API; xterm.js answers the copy
  // command with its selection.
  try {
    document.execCommand('copy');
  } catch {
    // nothing more to try
  }
}

/**
 * The connection's view of the screen: ordered writes, skip lines and resets;
 * each write's arrival time (if known) goes to `lineTimes` once it is on screen.
 */
export function terminalSink(term, lineTimes) {
  return {
    write(bytes, done, time = null) {
      term.write(bytes, () => {
        lineTimes?.record(time);
        done();
      });
    },
    skip(count, done) {
      // In the same queue as the output around it; the screen is kept.
      term.write(skipLine(count), done);
    },
    reset() {
      // Queued behind earlier output, so the old bytes never land on the new screen.
      term.write(NOTHING, () => {
        term.reset();
        lineTimes?.reset();
      });
    },
  };
}
