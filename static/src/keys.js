// The "keys" menu (Magic SysRq, BREAK, reset, power button: the console's actions)
// and the key bar for touch keyboards (Esc, Tab, a sticky Ctrl, arrows, | ~ / -).

/** SysRq keys and what Linux does on each; c crashes the kernel and asks twice. */
export const SYSRQ_KEYS = [
  ['h', 'print the SysRq help'],
  ['t', 'show every task and its state'],
  ['w', 'show blocked (uninterruptible) tasks'],
  ['m', 'show memory usage'],
  ['l', 'backtrace of every active CPU'],
  ['p', 'show registers and flags'],
  ['s', 'sync every filesystem'],
  ['u', 'remount every filesystem read-only'],
  ['e', 'SIGTERM to every process but init'],
  ['i', 'SIGKILL to every process but init'],
  ['f', 'call the OOM killer'],
  ['j', 'thaw frozen filesystems'],
  ['b', 'reboot at once, no sync'],
  ['o', 'power off'],
  ['c', 'crash the kernel (kdump)'],
  ['9', 'console log level 9 (all messages)'],
];

const ACTION_LABELS = { sysrq: 'SysRq', break: 'BREAK', reset: 'reset', 'power-button': 'power button' };

/** The console's name from the page's URL (…/c/NAME/), or null (one console). */
export function consoleName(path) {
  const match = /\/c\/([^/]+)\/[^/]*$/.exec(path);
  return match ? decodeURIComponent(match[1]) : null;
}

export class KeysMenu {
  /**
   * @param doc the document
   * @param status the StatusBar (outcomes go to its notice)
   * @param ask { confirm(text) -> bool, prompt(text) -> string|null } (the window's)
   */
  constructor(doc, status, ask) {
    this.doc = doc;
    this.status = status;
    this.ask = ask;
    this.button = doc.getElementById('keys');
    this.menu = doc.getElementById('keymenu');
    this.pathName = consoleName(doc.location.pathname);
    this.actions = [];
    this.button.addEventListener('click', () => this.toggle());
    doc.addEventListener('keydown', (event) => {
      if (event.key === 'Escape' && !this.menu.hidden) this.close();
    });
  }

  /** The console's name; the one console of a single-console server has none: its title. */
  get name() {
    return this.pathName ?? this.doc.title;
  }

  /** Ask the server which actions this credential may use here; show the menu if any. */
  async load() {
    try {
      // Under the console's own path: a signed link's cookie is scoped to it.
      const response = await fetch('actions/', { cache: 'no-store' });
      if (!response.ok) return;
      const body = await response.json();
      this.setActions(Array.isArray(body.actions) ? body.actions : []);
    } catch {
      // No list (an older server, a proxy in the way): no menu.
    }
  }

  setActions(actions) {
    this.actions = actions.filter((a) => a in ACTION_LABELS);
    this.button.hidden = this.actions.length === 0;
    const items = [];
    if (this.actions.includes('sysrq')) {
      items.push(this.heading('Magic SysRq'));
      for (const [key, meaning] of SYSRQ_KEYS) {
        items.push(this.item(`${key}`, meaning, () => this.sysrq(key, meaning), `sysrq-${key}`));
      }
    }
    const others = this.actions.filter((a) => a !== 'sysrq');
    if (others.length) items.push(this.heading('the VM'));
    for (const action of others) {
      const hint = action === 'break' ? 'serial BREAK (then a key: SysRq on the serial console)'
        : action === 'reset' ? 'hard reset, like the reset button' : 'ACPI power button (clean shutdown)';
      items.push(this.item(ACTION_LABELS[action], hint, () => this.power(action), action));
    }
    this.menu.replaceChildren(...items);
  }

  heading(text) {
    const div = this.doc.createElement('div');
    div.className = 'menu-heading';
    div.textContent = text;
    return div;
  }

  item(label, hint, run, id) {
    const button = this.doc.createElement('button');
    button.type = 'button';
    button.className = 'menu-item';
    button.dataset.action = id;
    const key = this.doc.createElement('b');
    key.textContent = label;
    const text = this.doc.createElement('span');
    text.textContent = hint;
    button.append(key, text);
    button.addEventListener('click', () => {
      this.close();
      run();
    });
    return button;
  }

  toggle() {
    if (this.menu.hidden) {
      this.menu.hidden = false;
      this.button.setAttribute('aria-expanded', 'true');
    } else this.close();
  }

  close() {
    this.menu.hidden = true;
    this.button.setAttribute('aria-expanded', 'false');
  }

  sysrq(key, meaning) {
    if (key === 'c') {
      if (!this.ask.confirm('SysRq c crashes the guest\'s kernel. Crash it?')) return;
      if (!this.ask.confirm(`Really crash ${this.name}'s kernel now?`)) return;
    }
    this.post('sysrq', { key }, `SysRq ${key} (${meaning})`);
  }

  power(action) {
    if (action !== 'break') {
      const typed = this.ask.prompt(`Type the console's name (${this.name}) to send it ${ACTION_LABELS[action]}:`);
      if (typed === null) return;
      if (typed.trim() !== this.name) {
        this.status.setNotice(`${ACTION_LABELS[action]} not sent: the name typed was not ${this.name}`);
        return;
      }
    }
    this.post(action, {}, ACTION_LABELS[action]);
  }

  async post(action, body, what) {
    this.status.setNotice(`sending ${what}…`);
    try {
      const response = await fetch(`actions/${action}`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
        cache: 'no-store',
      });
      let answer = {};
      try { answer = await response.json(); } catch { /* not JSON: the status says it */ }
      this.lastOutcome = { action, status: response.status, ...answer };
      if (response.ok) this.status.setNotice(`${what}: done`);
      else this.status.setNotice(`${what} not sent: ${answer.error || `HTTP ${response.status}`}`);
    } catch (error) {
      this.lastOutcome = { action, status: 0, error: error.message };
      this.status.setNotice(`${what} not sent: ${error.message}`);
    }
  }
}

/** What a key bar button sends (arrows follow the terminal's cursor-key mode). */
function keySequence(key, term) {
  const app = term.modes?.applicationCursorKeysMode;
  const arrows = { up: 'A', down: 'B', right: 'C', left: 'D' };
  if (key in arrows) return (app ? '\x1bO' : '\x1b[') + arrows[key];
  if (key === 'esc') return '\x1b';
  if (key === 'tab') return '\t';
  return key;
}

/**
 * The key bar: what a touch keyboard lacks. Buttons keep the focus in the terminal
 * (so the phone's keyboard stays up); Ctrl is sticky: it applies to the next key typed.
 */
export class KeyBar {
  constructor(doc, term, send) {
    this.term = term;
    this.send = send;
    this.bar = doc.getElementById('keybar');
    this.ctrlButton = doc.getElementById('key-ctrl');
    this.ctrl = false;
    for (const button of this.bar.querySelectorAll('button')) {
      // Not a focus change: the terminal keeps it, and with it the touch keyboard.
      button.addEventListener('pointerdown', (event) => event.preventDefault());
      button.addEventListener('mousedown', (event) => event.preventDefault());
      button.addEventListener('click', () => this.press(button.dataset.key));
    }
  }

  press(key) {
    if (key === 'ctrl') {
      this.setCtrl(!this.ctrl);
    } else {
      this.send(this.apply(keySequence(key, this.term)));
    }
    this.term.focus();
  }

  setCtrl(on) {
    this.ctrl = on;
    this.ctrlButton.setAttribute('aria-pressed', String(on));
  }

  /** Typed data, with the sticky Ctrl applied to a single key (c -> 0x03). */
  apply(data) {
    if (!this.ctrl) return data;
    this.setCtrl(false);
    if (data.length !== 1) return data;
    const code = data.toUpperCase().charCodeAt(0);
    if (code >= 0x40 && code <= 0x5f) return String.fromCharCode(code & 0x1f);
    if (data === ' ') return '\x00';
    if (data === '?') return '\x7f';
    return data;
  }
}
