/**
 * The interruption warning: a banner across the top of Lab with a live countdown,
 * the save of every unsaved document (or, with saving on a notice switched off, a
 * request to save now), and one line per kernel flush.
 *
 * The notice is the last chance to save; the banner exists so the user stops
 * starting new work and sees that their state made it to the store.
 */
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { IFlush, INotice } from './api';
import { fitToContent, formatCountdown, h } from './format';

const VERBS: Record<INotice['action'], string> = {
  terminate: 'reclaimed',
  preempt: 'reclaimed',
  stop: 'stopped',
  hibernate: 'hibernated'
};

/** Where the notice's save of the open documents is: what the banner may claim about them. */
type DocumentsState = 'pending' | 'saved' | 'off' | 'failed';

// The headline's saving phrase, by the kernels' flushes (none running, under way, some failed, all
// done) and the documents' save: never "notebooks saved" unless they were.
const NO_KERNEL: Record<DocumentsState, string> = {
  pending: 'saving notebooks (no kernel is running)…',
  saved: 'notebooks saved; no kernel was running, so there is no kernel state to save.',
  off: 'no kernel is running; your notebooks are not saved automatically: save them now.',
  failed: 'notebooks could NOT be saved: save them now; no kernel was running.'
};
const FLUSHING: Record<DocumentsState, string> = {
  pending: 'saving notebooks and kernel state…',
  saved: 'notebooks saved, saving kernel state…',
  off: 'saving kernel state… (save your notebooks yourself)',
  failed: 'notebooks could NOT be saved: save them now; saving kernel state…'
};
const FLUSH_FAILED: Record<DocumentsState, string> = {
  pending: 'saving notebooks; some kernel state could NOT be saved',
  saved: 'notebooks saved; some kernel state could NOT be saved',
  off: 'some kernel state could NOT be saved; your notebooks were not saved automatically: save them now',
  failed: 'notebooks and some kernel state could NOT be saved'
};
const FLUSHED: Record<DocumentsState, string> = {
  pending: 'kernel state saved, saving notebooks…',
  saved: 'notebooks and kernel state saved. Restore them on a new machine.',
  off: 'kernel state saved; your notebooks were not saved automatically: save them now.',
  failed: 'kernel state saved; notebooks could NOT be saved: save them now.'
};

export class NoticeBanner extends Widget {
  /** `_saveAll` saves every open document, or answers null when saving on a notice is switched off. */
  constructor(private readonly _saveAll: () => Promise<unknown> | null) {
    super();
    this.addClass('jp-spot-notice');
    this.node.setAttribute('role', 'alert');
    this._message = h('span', { className: 'jp-spot-notice-message' });
    this._documents = h('div', { className: 'jp-spot-notice-documents' });
    this._kernels = h('ul', { className: 'jp-spot-notice-kernels' });
    const close = h('button', {
      className: 'jp-spot-notice-dismiss jp-mod-styled',
      text: '×',
      title: 'Hide this warning (saving continues)'
    });
    close.addEventListener('click', () => this.hide());
    const body = h(
      'div',
      { className: 'jp-spot-notice-body' },
      h('div', { className: 'jp-spot-notice-head' }, h('strong', { text: 'Spot interruption' }), this._message, close),
      this._documents,
      this._kernels
    );
    this.node.append(body);
    this._observer = fitToContent(this.node, body, () => this.parent?.fit());
    this.hide();
  }

  /** The warning's one-line text, each time it changes (Notebook 7 shows it as a notification). */
  get textChanged(): ISignal<this, string> {
    return this._textChanged;
  }

  /** The notice this banner shows, or null before any. */
  get notice(): INotice | null {
    return this._notice;
  }

  /** Show a notice, start its countdown and save every unsaved document once per deadline. */
  showNotice(notice: INotice, receivedAt: number = Date.now()): void {
    const deadline = notice.deadline
      ? Date.parse(notice.deadline)
      : notice.seconds_left !== null && notice.seconds_left !== undefined
        ? receivedAt + notice.seconds_left * 1000
        : null;
    const known = this._notice !== null && this._deadline === deadline;
    this._notice = notice;
    this._deadline = deadline;
    if (!known) {
      void this._save(); // first: a save switched off is known at once, so no text ever says "saving notebooks"
    }
    this.show();
    this._tick();
    if (this._timer === null) {
      this._timer = window.setInterval(() => this._tick(), 1000);
    }
  }

  /** Show one kernel's flush as it starts, completes or fails. */
  showFlush(flush: IFlush): void {
    let row = this._rows.get(flush.kernel_id);
    if (!row) {
      row = h('li', { className: 'jp-spot-notice-kernel', attrs: { 'data-kernel-id': flush.kernel_id } });
      this._rows.set(flush.kernel_id, row);
      this._kernels.append(row);
    }
    const name = flush.session || flush.kernel_id;
    row.dataset.status = flush.status;
    if (flush.status === 'started') {
      row.textContent = `${name}: saving kernel state…`;
    } else if (flush.status === 'done') {
      const took = flush.seconds === null ? '' : ` in ${flush.seconds.toFixed(1)} s`;
      row.textContent = `${name}: kernel state saved${took}`;
    } else {
      row.textContent = `${name}: kernel state NOT saved — ${flush.message ?? 'unknown error'}`;
    }
    this._tick();
  }

  dispose(): void {
    this._observer.disconnect();
    if (this._timer !== null) {
      window.clearInterval(this._timer);
      this._timer = null;
    }
    super.dispose();
  }

  private _tick(): void {
    const notice = this._notice;
    if (!notice) {
      return;
    }
    const verb = VERBS[notice.action] ?? 'reclaimed';
    const rows = [...this._rows.values()];
    const noKernels = notice.kernels === 0 && rows.length === 0;
    const flushed = rows.length > 0 && rows.every(row => row.dataset.status !== 'started');
    const failed = rows.some(row => row.dataset.status === 'failed');
    const saving = noKernels
      ? NO_KERNEL[this._documentsState]
      : !flushed
        ? FLUSHING[this._documentsState]
        : failed
          ? FLUSH_FAILED[this._documentsState]
          : FLUSHED[this._documentsState];
    let text: string;
    if (notice.kind === 'rebalance') {
      text = `The cloud asks to move off this machine soon (rebalance hint) — ${saving}`;
    } else if (this._deadline === null) {
      text = `This machine will be ${verb} shortly — ${saving}`;
    } else {
      const left = this._deadline - Date.now();
      text =
        left > 0
          ? `This machine will be ${verb} in ${formatCountdown(left)} — ${saving}`
          : `This machine is being ${verb} now — ${saving}`;
    }
    this._message.textContent = ' ' + text + (failed ? ' (see below).' : '');
    this.node.dataset.kind = notice.kind;
    // The one-line form (Notebook 7's notification, which cuts long text): what failed is in its status item.
    const line = `Spot interruption: ${text}` + (failed ? ' (see the snapshot status).' : '');
    if (line !== this._text) {
      this._text = line;
      this._textChanged.emit(line);
    }
  }

  private async _save(): Promise<void> {
    const saving = this._saveAll();
    if (saving === null) {
      this._documentsState = 'off';
      this._documents.textContent = 'Saving notebooks on a notice is off: save your notebooks now.';
      return;
    }
    this._documentsState = 'pending';
    this._documents.textContent = 'Saving unsaved notebooks and files…';
    try {
      await saving;
      this._documentsState = 'saved';
      this._documents.textContent = 'All open notebooks and files are saved.';
    } catch (error) {
      this._documentsState = 'failed';
      this._documents.textContent = `Saving documents failed: ${(error as Error).message ?? error}`;
    }
    this._tick();
  }

  private _notice: INotice | null = null;
  private _text = '';
  private readonly _textChanged = new Signal<this, string>(this);
  private _deadline: number | null = null;
  private _timer: number | null = null;
  private _documentsState: DocumentsState = 'pending';
  private readonly _message: HTMLElement;
  private readonly _documents: HTMLElement;
  private readonly _kernels: HTMLElement;
  private readonly _rows = new Map<string, HTMLElement>();
  private readonly _observer: ResizeObserver;
}
