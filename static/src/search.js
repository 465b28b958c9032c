// The search box: xterm.js's search add-on over what the page holds (the
// head, the "not kept" line, the tail and what came since), every match
// highlighted, next and previous, the count, case and regex toggles. Opened
// with Ctrl+Shift+F or the button; closed with Escape. While it is closed the
// terminal keeps its keys (Ctrl+F goes to the guest).

import { SearchAddon } from '@xterm/addon-search';

const DECORATIONS = {
  matchBackground: '#5c4a12',
  matchBorder: '#e0b959',
  matchOverviewRuler: '#e0b959',
  activeMatchBackground: '#b5651d',
  activeMatchBorder: '#ffd27e',
  activeMatchColorOverviewRuler: '#ff8a3d',
};

export class SearchBox {
  constructor(doc, term) {
    const get = (id) => doc.getElementById(id);
    this.term = term;
    this.box = get('searchbox');
    this.input = get('search-input');
    this.caseToggle = get('search-case');
    this.regexToggle = get('search-regex');
    this.count = get('search-count');
    this.addon = new SearchAddon({ highlightLimit: 1000 });
    term.loadAddon(this.addon);
    this.results = { resultIndex: -1, resultCount: 0 };
    this.addon.onDidChangeResults((results) => {
      this.results = results;
      this.showCount();
    });
    get('search').addEventListener('click', () => this.open());
    get('search-next').addEventListener('click', () => this.find(true));
    get('search-prev').addEventListener('click', () => this.find(false));
    get('search-close').addEventListener('click', () => this.close());
    this.input.addEventListener('input', () => this.find(true, true));
    for (const toggle of [this.caseToggle, this.regexToggle]) {
      toggle.addEventListener('change', () => this.find(true, true));
    }
    this.input.addEventListener('keydown', (event) => {
      if (event.key === 'Enter') {
        this.find(!event.shiftKey);
        event.preventDefault();
      } else if (event.key === 'Escape') {
        this.close();
        event.preventDefault();
      }
    });
  }

  get isOpen() {
    return !this.box.hidden;
  }

  open() {
    this.box.hidden = false;
    this.input.focus();
    this.input.select();
    if (this.input.value) this.find(true, true);
  }

  close() {
    this.box.hidden = true;
    this.addon.clearDecorations();
    this.term.clearSelection();
    this.count.textContent = '';
    this.term.focus();
  }

  /** The next (or previous) match; `incremental` keeps the current one while typing. */
  find(forward, incremental = false) {
    const text = this.input.value;
    if (!text) {
      this.addon.clearDecorations();
      this.results = { resultIndex: -1, resultCount: 0 };
      this.count.textContent = '';
      return;
    }
    if (this.regexToggle.checked) {
      try {
        new RegExp(text);
      } catch {
        this.count.textContent = 'bad regex';
        return;
      }
    }
    const options = {
      caseSensitive: this.caseToggle.checked,
      regex: this.regexToggle.checked,
      incremental,
      decorations: DECORATIONS,
    };
    const found = forward ? this.addon.findNext(text, options) : this.addon.findPrevious(text, options);
    if (!found) {
      this.results = { resultIndex: -1, resultCount: 0 };
      this.showCount();
    }
  }

  showCount() {
    const { resultIndex, resultCount } = this.results;
    if (!this.input.value) this.count.textContent = '';
    else if (resultCount === 0) this.count.textContent = 'no matches';
    else if (resultIndex < 0) this.count.textContent = `${resultCount}+ matches`;
    else this.count.textContent = `${resultIndex + 1} of ${resultCount}`;
  }
}
