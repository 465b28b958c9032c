// The slim bar above the terminal: connection state, notices, viewers,
// read-only badge, terminal size and the buttons.

const NOTICE_MS = 30_000;

export class StatusBar {
  constructor(doc) {
    const get = (id) => doc.getElementById(id);
    this.bar = get('bar');
    this.status = get('status');
    this.notice = get('notice');
    this.viewers = get('viewers');
    this.readOnly = get('readonly');
    this.size = get('size');
    this.sttyButton = get('stty');
    this.downloadButton = get('download');
    this.state = { phase: 'connecting', retryAt: null, closedReason: null };
    this.lastStatus = '';
    this.lastNotice = '';
    this.ticker = null;
    this.noticeTimer = null;
    this.render();
  }

  /** Connection state from ConsoleConnection. */
  setState(state) {
    this.state = state;
    clearInterval(this.ticker);
    this.ticker = null;
    if (state.retryAt !== null && state.phase !== 'connected' && state.phase !== 'connecting') {
      this.ticker = setInterval(() => this.render(), 250);
    }
    this.render();
  }

  render() {
    const { phase, retryAt, closedReason } = this.state;
    const countdown = retryAt === null ? '' : `${Math.max(0, Math.ceil((retryAt - Date.now()) / 1000))} s`;
    let text;
    if (phase === 'connected') text = 'connected';
    else if (phase === 'connecting') text = closedReason === null ? 'connecting…' : `console closed: ${closedReason} · connecting…`;
    else if (phase === 'closed') text = `console closed: ${closedReason}${countdown ? ` · retrying in ${countdown}` : ''}`;
    else text = `reconnecting in ${countdown}`;
    this.bar.dataset.phase = phase === 'connecting' && closedReason !== null ? 'closed' : phase;
    if (text !== this.lastStatus) {
      this.status.textContent = text;
      this.status.title = text;
      this.lastStatus = text;
    }
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

  setClients(count) {
    this.viewers.textContent = `${count} watching`;
    this.viewers.title = `${count} browser${count === 1 ? '' : 's'} connected to this console`;
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
