// One console session carried over a succession of WebSockets.

import {
  ACK_EVERY, CLOSE_CONSOLE_CLOSED, CLOSE_LAGGING, CONSOLE_CONFIRM_MS, SUBPROTOCOL,
  ackMessage, backoffDelay, decodeOutput, socketUrl,
} from './protocol.js';

/**
 * Connects, resumes from the next offset after any drop (so nothing is shown
 * twice or skipped), and acknowledges what the screen has rendered: the server
 * stops sending while too much is unacknowledged.
 *
 * The screen is the sink: sink.write(bytes, done) queues bytes and calls done
 * once they are rendered; sink.reset() queues a full reset behind them.
 *
 * The screen may also be handed sink.skip(count, done): a line saying that
 * `count` bytes (between the head the server keeps and its tail) are not shown.
 *
 * The listener hears: state({phase, retryAt, closedReason}) with phase one of
 * 'connecting', 'connected', 'waiting', 'closed'; hello(message);
 * gap({reason, from, to, lost}); skip({from, to, bytes}); clients(count);
 * inputDiscarded({bytes, reason}); console(now, before), each {state, reason,
 * since} with state 'up' or 'down' (the VM's console, behind a connected socket).
 */
export class ConsoleConnection {
  constructor(pageHref, sink, listener) {
    this.pageHref = pageHref;
    this.sink = sink;
    this.listener = listener;
    this.socket = null;
    this.generation = 0;     // bumped per socket; stale callbacks check it
    this.connected = false;  // hello received on the current socket
    this.session = null;     // the server run our offsets belong to
    this.next = null;        // offset of the next byte to show
    this.rendered = null;    // every byte before this is on screen
    this.acked = 0;          // last offset acknowledged on the current socket
    this.pending = 0;        // writes queued in the terminal
    this.freshReset = false; // a reset is queued and no byte came since
    this.connects = 0;       // hellos received, over all sockets
    this.gaps = 0;
    this.lastGap = null;
    this.attempt = 0;
    this.retryTimer = null;
    this.retryAt = null;
    this.closedReason = null;
    this.readOnly = false;
    this.skips = 0;          // skip lines printed
    this.marks = [];         // [offset, seconds]: when output from offset on arrived
    this.lastSkip = null;
    this.lastDiscard = null; // last input-discarded: {bytes, reason}
    // The VM's console as the server last said; 'up' until told otherwise (older
    // servers never say). Across a reconnect a 'down' is kept until the new socket
    // shows otherwise: the server repeats it right after hello if still true.
    this.console = { state: 'up', reason: null, since: null };
    this.consoleUnconfirmed = false;
    this.consoleTimer = null;
  }

  /** Open a socket now, resuming after the last byte received. */
  connect() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.retryAt = null;
    if (this.socket) {
      this.socket.onclose = null;
      this.socket.close();
    }
    const generation = ++this.generation;
    const current = () => generation === this.generation;
    const ws = new WebSocket(socketUrl(this.pageHref, this.next, this.session), SUBPROTOCOL);
    ws.binaryType = 'arraybuffer';
    ws.onmessage = (event) => {
      if (!current()) return;
      if (typeof event.data === 'string') this.onText(event.data);
      else this.onOutput(event.data);
    };
    ws.onclose = (event) => {
      if (current()) this.onClose(event.code, event.reason);
    };
    ws.onerror = () => {}; // the close event that follows says what matters
    this.socket = ws;
    this.connected = false;
    this.emitState('connecting');
  }

  /** Reconnect at once if waiting (the network came back, the user asked). */
  retryNow() {
    if (this.retryTimer !== null) this.connect();
  }

  /**
   * Send input bytes to the guest.
   * @returns {boolean} false if not connected (the bytes are dropped: replaying
   *   stale keystrokes later would surprise more than losing them)
   */
  send(bytes) {
    if (!this.connected || this.socket.readyState !== WebSocket.OPEN) return false;
    this.socket.send(bytes);
    return true;
  }

  onText(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    switch (message.type) {
      case 'hello': this.onHello(message); break;
      case 'console': this.onConsole(message); break;
      case 'gap':
        this.confirmConsoleUp();
        this.discontinuity(message.reason, message.from, message.to, message.lost);
        break;
      case 'skip':
        this.confirmConsoleUp();
        this.onSkip(message);
        break;
      case 'clients':
        // who: the named viewers and the anonymous count, told to a credential only.
        this.listener.clients(message.count, Array.isArray(message.watchers)
          ? { watchers: message.watchers, anonymous: message.anonymous ?? 0 } : null);
        break;
      case 'times': this.onTimes(message); break;
      case 'action': this.listener.action?.(message); break;
      case 'closed':
        this.closedReason = bareReason(message.reason);
        this.emitState('closed');
        break;
      case 'input-discarded':
        this.lastDiscard = {
          bytes: Number.isSafeInteger(message.bytes) ? message.bytes : null,
          // Servers from before the reason existed discarded input only when read-only.
          reason: typeof message.reason === 'string' && message.reason ? message.reason : 'read-only',
        };
        this.listener.inputDiscarded(this.lastDiscard);
        break;
      default: break; // newer servers may say more
    }
  }

  /**
   * When output arrived: marks [offset, seconds], each standing until the next,
   * sent before the output they cover (a resume may repeat some).
   */
  onTimes(message) {
    if (!Array.isArray(message.marks)) return;
    let sorted = true;
    for (const mark of message.marks) {
      if (!Array.isArray(mark) || !Number.isSafeInteger(mark[0]) || typeof mark[1] !== 'number') continue;
      const last = this.marks[this.marks.length - 1];
      if (last && mark[0] <= last[0]) sorted = false;
      this.marks.push([mark[0], mark[1]]);
    }
    if (!sorted) this.marks.sort((a, b) => a[0] - b[0]);
  }

  /** `bytes` starting at `start`, cut where their arrival time changes: [{bytes, time}]. */
  timedPieces(start, bytes) {
    const marks = this.marks;
    while (marks.length > 1 && marks[1][0] <= start) marks.shift();
    const end = start + bytes.length;
    let index = 0;
    let time = null;
    if (marks.length && marks[0][0] <= start) {
      time = marks[0][1];
      index = 1;
    }
    const pieces = [];
    let at = 0;
    for (; index < marks.length && marks[index][0] < end; index += 1) {
      const cut = marks[index][0] - start;
      if (cut > at) {
        pieces.push({ bytes: bytes.subarray(at, cut), time });
        at = cut;
      }
      time = marks[index][1];
    }
    pieces.push({ bytes: at ? bytes.subarray(at) : bytes, time });
    return pieces;
  }

  /** The VM's console went down (the server retries it) or came back. */
  onConsole(message) {
    if (message.state !== 'up' && message.state !== 'down') return;
    this.setConsole({
      state: message.state,
      reason: typeof message.reason === 'string' ? message.reason : null,
      since: typeof message.since === 'string' ? message.since : null,
    });
  }

  setConsole(now) {
    clearTimeout(this.consoleTimer);
    this.consoleTimer = null;
    this.consoleUnconfirmed = false;
    const before = this.console;
    this.console = now;
    this.listener.console(now, before);
  }

  /**
   * After a reconnect with the console down, the first message that is not a
   * console one says it is up again (the server sends 'down' right after hello).
   */
  confirmConsoleUp() {
    if (this.consoleUnconfirmed) this.setConsole({ state: 'up', reason: null, since: null });
  }

  /**
   * Bytes [from, to) are not kept by the server (between this boot's head and
   * tail): one line on screen says so, and the stream goes on at `to`. A resume
   * may repeat a skip already passed: shown once.
   */
  onSkip(message) {
    const { from, to } = message;
    if (!Number.isSafeInteger(to)) return;
    if (this.next === null) this.next = Number.isSafeInteger(from) ? from : to;
    if (to <= this.next) return;
    const count = to - this.next;
    const skip = {
      from: Number.isSafeInteger(from) ? from : null,
      to,
      bytes: Number.isSafeInteger(message.bytes) ? message.bytes : count,
    };
    this.skips += 1;
    this.lastSkip = skip;
    this.next = to;
    this.freshReset = false;
    this.pending += 1;
    const generation = this.generation;
    // Acknowledged like output: the server owes nothing before `to` any more.
    this.sink.skip(count, () => this.onRendered(to, generation));
    this.listener.skip(skip);
  }

  onHello(message) {
    this.connected = true;
    this.connects += 1;
    this.attempt = 0;
    this.closedReason = null;
    this.readOnly = Boolean(message.readOnly);
    this.acked = message.offset;
    if (this.console.state === 'down') {
      // Still down unless the next message says otherwise (or none comes soon).
      this.consoleUnconfirmed = true;
      clearTimeout(this.consoleTimer);
      const generation = this.generation;
      this.consoleTimer = setTimeout(() => {
        if (generation === this.generation && this.connected) this.confirmConsoleUp();
      }, CONSOLE_CONFIRM_MS);
    }
    if (this.next === null) {
      this.next = message.offset;
    } else if (message.offset < this.next) {
      // The server does not have what we showed: it restarted.
      this.discontinuity('restart', this.next, message.offset, null);
    }
    if (message.session !== undefined) this.session = message.session;
    this.listener.hello(message);
    this.emitState('connected');
  }

  /** Bytes [from, to) will never come: clear the screen, carry on from `to`. */
  discontinuity(reason, from, to, lost) {
    const gap = { reason, from, to, lost };
    if (this.freshReset && to === this.next) {
      // The same break, announced twice (hello, then gap): reset once.
      this.lastGap = gap;
      this.listener.gap(gap);
      return;
    }
    this.gaps += 1;
    this.lastGap = gap;
    this.freshReset = true;
    this.next = to;
    this.sink.reset();
    this.listener.gap(gap);
  }

  onOutput(buffer) {
    const output = decodeOutput(buffer);
    if (output === null) return;
    this.confirmConsoleUp();
    let { offset, bytes } = output;
    const end = offset + bytes.length;
    if (this.next === null) this.next = offset;
    if (offset > this.next) {
      this.discontinuity('unannounced', this.next, offset, offset - this.next);
    } else if (offset < this.next) {
      if (end <= this.next) return; // all shown already
      bytes = bytes.subarray(this.next - offset);
    }
    if (bytes.length === 0) return;
    this.next = end;
    this.freshReset = false;
    const generation = this.generation;
    let pieceEnd = end - bytes.length;
    for (const piece of this.timedPieces(pieceEnd, bytes)) {
      pieceEnd += piece.bytes.length;
      const rendered = pieceEnd;
      this.pending += 1;
      this.sink.write(piece.bytes, () => this.onRendered(rendered, generation), piece.time);
    }
  }

  onRendered(end, generation) {
    this.pending -= 1;
    this.rendered = end;
    if (generation !== this.generation || !this.connected) return;
    if (end - this.acked >= ACK_EVERY || this.pending === 0) {
      if (this.socket.readyState === WebSocket.OPEN) {
        this.socket.send(ackMessage(end));
        this.acked = end;
      }
    }
  }

  onClose(code, reason) {
    this.socket = null;
    this.connected = false;
    clearTimeout(this.consoleTimer);
    this.consoleTimer = null;
    let floor = 0;
    if (code === CLOSE_CONSOLE_CLOSED) {
      // The VM has gone; it may come back, but no need to knock often.
      if (this.closedReason === null) this.closedReason = bareReason(reason);
      floor = 5000;
    } else if (code === CLOSE_LAGGING) {
      this.attempt = 0; // we were too slow, not the server unwell: come back soon
    }
    const delay = backoffDelay(this.attempt, floor);
    this.attempt += 1;
    this.retryAt = Date.now() + delay;
    this.retryTimer = setTimeout(() => this.connect(), delay);
    this.emitState(this.closedReason === null ? 'waiting' : 'closed');
  }

  emitState(phase) {
    this.listener.state({ phase, retryAt: this.retryAt, closedReason: this.closedReason });
  }
}

/** "console closed: pty EOF" and "pty EOF" both say "pty EOF". */
function bareReason(reason) {
  return String(reason ?? '').replace(/^console closed:\s*/, '') || 'no reason given';
}
