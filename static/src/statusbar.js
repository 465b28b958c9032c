// The slim bar above the terminal: connection state (and the VM's console
// behind it), notices, viewers, read-only badge, terminal size and the buttons.

const NOTICE_MS = 30_000;

export class StatusBar {
  constructor(doc) {
    const get = (id) => doc.getElementById(id);
    this.bar = get('bar');
    this.status = get('status');
    this.since = get('since');
    this.notice = get('notice');
    this.viewers = get('viewers');
    this.who = get('who');
    this.whoList = get('who-list');
    this.whoNote = get('who-note');
    this.clients = null;
    this.whoIs = null; // {watchers, anonymous}, or null when the server does not say
    this.viewers.addEventListener('click', () => this.toggleWho());
    doc.addEventListener('keydown', (event) => {
      if (event.key === 'Escape' && !this.who.hidden) this.toggleWho(false);
    });
    this.readOnly = get('readonly');
    this.size = get('size');
    this.sttyButton = get('stty');
    this.downloadButton = get('download');
    this.state = { phase: 'connecting', retryAt: null, closedReason: null };
    this.console = { state: 'up', reason: null, since: null };
    this.consoleDownAt = null; // ms since the epoch, for "down for 12 s"
    this.lastStatus = '';
    this.lastNotice = '';
    this.ticker = null;
    this.noticeTimer = null;
    this.render();
  }

  /** Connection state from ConsoleConnection. */
  setState(state) {
    this.state = state;
    this.tick();
  }

  /** The VM's console from ConsoleConnection: {state: 'up'|'down', reason, since}. */
  setConsole(now) {
    this.console = now;
    if (now.state === 'down') {
      const since = Date.parse(now.since ?? '');
      // The server's clock may run ahead of ours: never "down for -3 s".
      this.consoleDownAt = Number.isFinite(since) ? Math.min(since, Date.now()) : Date.now();
    } else {
      this.consoleDownAt = null;
    }
    this.tick();
  }

  /** Render now, and keep rendering while something on the bar counts. */
  tick() {
    const { phase, retryAt } = this.state;
    const counting = (retryAt !== null && phase !== 'connected' && phase !== 'connecting')
      || this.consoleDown();
    if (counting && this.ticker === null) this.ticker = setInterval(() => this.render(), 250);
    if (!counting && this.ticker !== null) {
      clearInterval(this.ticker);
      this.ticker = null;
    }
    this.render();
  }

  /** The socket is up but the console behind it is not. */
  consoleDown() {
    return this.state.phase === 'connected' && this.console.state === 'down';
  }

  render() {
    const { phase, retryAt, closedReason } = this.state;
    const countdown = retryAt === null ? '' : `${Math.max(0, Math.ceil((retryAt - Date.now()) / 1000))} s`;
    const down = this.consoleDown();
    let text;
    let title = null;
    if (down) {
      const reason = this.console.reason || 'no reason given';
      text = `console down: ${reason} · waiting for it to come back`;
      title = `The VM's console went away (${reason})${this.console.since ? ` at ${this.console.since}` : ''}; `
        + 'the server is retrying it and the output goes on here when it is back';
    } else if (phase === 'connected') text = 'connected';
    else if (phase === 'connecting') text = closedReason === null ? 'connecting…' : `console closed: ${closedReason} · connecting…`;
    else if (phase === 'closed') text = `console closed: ${closedReason}${countdown ? ` · retrying in ${countdown}` : ''}`;
    else text = `reconnecting in ${countdown}`;
    let shown = phase === 'connecting' && closedReason !== null ? 'closed' : phase;
    if (down) shown = 'console-down';
    if (this.bar.dataset.phase !== shown) this.bar.dataset.phase = shown;
    if (text !== this.lastStatus) {
      this.status.textContent = text;
      this.status.title = title ?? text;
      this.lastStatus = text;
    }
    const elapsed = down && this.consoleDownAt !== null ? `for ${formatDuration(Date.now() - this.consoleDownAt)}` : '';
    if (this.since.textContent !== elapsed) this.since.textContent = elapsed;
    this.since.hidden = !elapsed;
  }

  /** A passing event worth reading (gaps, dropped input); fades after a while. */
  setNotice(text) {
    this.lastNotice = text;
    this.notice.textContent = text;
    this.notice.title = text;
    this.notice.hidden = false;
    clearTimeout(this.noticeTimer);
    this.noticeTimer = setTimeout(() => { this.notice.hidden = true; }, NOTICE_MS);
  }

  /** How many are on; who: {watchers, anonymous} (told to a credential), or null. */
  setClients(count, who = null) {
    this.clients = count;
    if (who !== null) this.whoIs = who;
    this.viewers.textContent = `${count} watching`;
    this.viewers.title = `${count} viewer${count === 1 ? '' : 's'} (pages and SSH sessions) on this console: click for who`;
    if (!this.who.hidden) this.renderWho();
  }

  /** Open or close (or flip) the list of who is on this console. */
  toggleWho(open = this.who.hidden) {
    this.who.hidden = !open;
    this.viewers.setAttribute('aria-expanded', String(open));
    if (open) this.renderWho();
  }

  renderWho() {
    const who = this.whoIs;
    this.whoList.replaceChildren();
    if (who === null) {
      this.whoNote.textContent = `${this.clients ?? 0} watching; who they are is shown to a signed-in viewer`;
      return;
    }
    for (const w of who.watchers) {
      const row = document.createElement('li');
      const name = document.createElement('span');
      name.className = 'who-name';
      name.textContent = w.identity;
      const detail = document.createElement('span');
      detail.className = 'who-detail';
      const since = new Date(w.since);
      const at = Number.isNaN(since.getTime()) ? w.since : since.toLocaleTimeString();
      detail.textContent = ` · ${w.front} · ${w.address} · ${w.readOnly ? 'read-only' : 'read-write'} · since ${at}`;
      detail.title = `since ${w.since}`;
      row.append(name, detail);
      this.whoList.append(row);
    }
    const anonymous = who.anonymous ?? 0;
    this.whoNote.textContent = anonymous ? `and ${anonymous} without a name` : '';
  }

  setReadOnly(readOnly) {
    this.readOnly.hidden = !readOnly;
  }

  setSize(cols, rows) {
    this.size.textContent = `${cols}×${rows}`;
    this.sttyButton.title = `Type "stty rows ${rows} cols ${cols}" into the guest, so that its programs use this window's size`;
  }

  onStty(handler) {
    this.sttyButton.addEventListener('click', handler);
  }

  onDownload(handler) {
    this.downloadButton.addEventListener('click', handler);
  }
}

/** 12_000 -> "12 s", 150_000 -> "2 min", 3_900_000 -> "1 h 5 min", 3 days -> "3 d". */
export function formatDuration(ms) {
  const seconds = Math.max(0, Math.floor(ms / 1000));
  if (seconds < 60) return `${seconds} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return minutes % 60 ? `${hours} h ${minutes % 60} min` : `${hours} h`;
  return `${Math.floor(hours / 24)} d`;
}
