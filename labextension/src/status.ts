/**
 * How safe is this notebook right now: a status item with the age and size of its last
 * snapshot (Lab's status bar; Notebook 7's menu bar, next to the kernel status), and a
 * side panel listing every snapshot with restore actions.
 */
import { Dialog, showDialog } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ISignal, Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { IFlush, ISnapshot, IStatus, SpotApi, SpotApiError } from './api';
import { describeSnapshot, formatAge, formatBytes, formatTime, h } from './format';
import { renderReport, restoreInto } from './restore';

/** The notebook's path as the server names its session (relative to the server root). */
export function sessionName(panel: NotebookPanel): string {
  return panel.context.localPath;
}

/**
 * What the item says, also its `data-state`: `none` (no snapshot yet), `saved`, `pending`
 * (a cell ran, its snapshot is not in the store yet), `flushing` / `failed` (a notice's
 * final flush of this notebook's kernel), `read-only` (the store cannot be written), `error`.
 */
export type SnapshotState = 'none' | 'saved' | 'pending' | 'flushing' | 'failed' | 'read-only' | 'error';

/** How long after a cell its snapshot counts as pending (the item looks again meanwhile). */
const PENDING_MS = 10_000;

/** The status item; it follows the current notebook. */
export class SnapshotStatus extends Widget {
  constructor(
    private readonly _api: SpotApi,
    private readonly _tracker: INotebookTracker,
    onClick: () => void
  ) {
    super();
    this.addClass('jp-spot-status');
    this._text = h('span', { className: 'jp-StatusBar-TextItem' });
    this.node.append(this._text);
    this.node.title = 'jupyter-spot: last snapshot of this notebook (click for all snapshots)';
    this.node.addEventListener('click', onClick);
    this._tracker.currentChanged.connect(() => {
      this._flush = null; // another notebook's flush
      void this.refresh();
    }, this);
    this._ticker = window.setInterval(() => this._render(), 1000);
  }

  /** Emits whenever a refresh found a different latest snapshot. */
  get changed(): ISignal<this, ISnapshot | null> {
    return this._changed;
  }

  /** Re-read the server's view every this many seconds (0 stops polling). */
  set refreshInterval(seconds: number) {
    if (this._poller !== null) {
      window.clearInterval(this._poller);
      this._poller = null;
    }
    if (seconds > 0) {
      this._poller = window.setInterval(() => void this.refresh(), seconds * 1000);
    }
  }

  /**
   * A cell just ran: its snapshot is written right after it (in the background for
   * large data), so look again a few times until the new one shows up.
   */
  cellExecuted(): void {
    this._pendingUntil = Date.now() + PENDING_MS;
    this._render();
    this.lookAgain();
  }

  /** Refresh a few times over the next seconds, until the snapshot changes (after a cell, a restore). */
  lookAgain(): void {
    const before = this._snapshot?.id;
    for (const delay of [300, 1000, 2500, 5000, PENDING_MS]) {
      window.setTimeout(() => {
        if (this._snapshot?.id === before) {
          void this.refresh();
        }
      }, delay);
    }
  }

  async refresh(): Promise<void> {
    const panel = this._tracker.currentWidget;
    try {
      if (this._status === null || this._statusAge++ > 5) {
        this._status = await this._api.status();
        this._statusAge = 0;
      }
      const session = panel ? await this._api.session(sessionName(panel)) : null;
      const snapshot = session?.newest ?? session?.latest ?? null;
      this._error = null;
      if (snapshot?.id !== this._snapshot?.id) {
        this._snapshot = snapshot;
        this._pendingUntil = 0;
        this._changed.emit(snapshot);
      }
    } catch (error) {
      this._error = (error as Error).message;
    }
    this._render();
  }

  /** A notice's final flush of a kernel: shown while it runs, and kept when it failed for this notebook. */
  showFlush(flush: IFlush): void {
    const panel = this._tracker.currentWidget;
    if (!panel || flush.session !== sessionName(panel)) {
      return;
    }
    this._flush = flush;
    if (flush.status === 'done') {
      void this.refresh();
    }
    this._render();
  }

  dispose(): void {
    window.clearInterval(this._ticker);
    this.refreshInterval = 0;
    super.dispose();
  }

  private _render(): void {
    const store = this._status?.store;
    const kind = store ? (store.writable ? store.kind : `${store.kind} (read-only!)`) : '…';
    const snapshot = this._snapshot;
    const last = snapshot ? `snapshot ${formatAge(snapshot.created)} · ${formatBytes(snapshot.size)}` : 'no snapshot yet';
    let text: string;
    let state: SnapshotState;
    this.node.title = snapshot
      ? `jupyter-spot: snapshot ${snapshot.id} of ${formatTime(snapshot.created)}, ` +
        `${describeSnapshot(snapshot)}, store ${store?.url ?? ''} (click for all snapshots)`
      : `jupyter-spot: no snapshot of this notebook yet, store ${store?.url ?? ''} (click for all snapshots)`;
    if (this._error) {
      [state, text] = ['error', 'snapshot status unavailable'];
      this.node.title = `jupyter-spot: ${this._error}`;
    } else if (this._flush?.status === 'failed') {
      [state, text] = ['failed', `kernel state NOT saved · ${last} · ${kind}`];
      this.node.title = `jupyter-spot: the final flush failed: ${this._flush.message ?? 'unknown error'}`;
    } else if (this._flush?.status === 'started') {
      [state, text] = ['flushing', `saving kernel state… · ${last} · ${kind}`];
    } else if (store?.writable === false) {
      [state, text] = ['read-only', `${last} · ${kind}`];
      this.node.title = `jupyter-spot: snapshots cannot be written: ${store.error ?? store.url}`;
    } else if (this._pendingUntil > Date.now()) {
      [state, text] = ['pending', `snapshot pending… · ${kind}`];
    } else {
      [state, text] = [snapshot ? 'saved' : 'none', `${last} · ${kind}`];
    }
    this._text.textContent = text;
    this.node.dataset.snapshotId = snapshot?.id ?? '';
    this.node.dataset.state = state;
    this.node.classList.toggle('jp-spot-mod-warn', ['error', 'failed', 'read-only'].includes(state));
  }

  private readonly _text: HTMLElement;
  private _snapshot: ISnapshot | null = null;
  private _status: IStatus | null = null;
  private _statusAge = 0;
  private _pendingUntil = 0;
  private _flush: IFlush | null = null;
  private _error: string | null = null;
  private _poller: number | null = null;
  private readonly _ticker: number;
  private readonly _changed = new Signal<this, ISnapshot | null>(this);
}

/** The side panel: every snapshot of the current notebook, newest first, with restore and delete. */
export class SnapshotsPanel extends Widget {
  constructor(
    private readonly _api: SpotApi,
    private readonly _tracker: INotebookTracker
  ) {
    super();
    this.id = 'jp-spot-snapshots';
    this.addClass('jp-spot-snapshots');
    this.title.caption = 'Snapshots of this notebook (jupyter-spot)';
    this.title.label = 'Snapshots';
    const reload = h('button', { className: 'jp-mod-styled', text: 'Refresh' });
    reload.addEventListener('click', () => void this.refresh());
    this._heading = h('div', { className: 'jp-spot-snapshots-heading' });
    this._result = h('div', { className: 'jp-spot-snapshots-result' });
    this._list = h('ul', { className: 'jp-spot-snapshots-list' });
    this.node.append(h('div', { className: 'jp-spot-snapshots-head' }, this._heading, reload), this._result, this._list);
    this._tracker.currentChanged.connect(() => {
      if (this.isVisible) {
        void this.refresh();
      }
    }, this);
  }

  async refresh(): Promise<void> {
    const panel = this._tracker.currentWidget;
    this._result.replaceChildren();
    if (!panel) {
      this._heading.textContent = 'Open a notebook to see its snapshots.';
      this._list.replaceChildren();
      return;
    }
    const session = sessionName(panel);
    this._heading.textContent = session;
    try {
      const snapshots = await this._api.snapshots(session);
      this._list.replaceChildren(...snapshots.map(s => this._row(panel, session, s)));
      if (!snapshots.length) {
        this._list.append(h('li', { text: 'No snapshots yet: run a cell.' }));
      }
    } catch (error) {
      const missing = error instanceof SpotApiError && error.status === 404;
      this._list.replaceChildren(h('li', { text: missing ? 'No snapshots yet: run a cell.' : (error as Error).message }));
    }
  }

  protected onAfterShow(): void {
    void this.refresh();
  }

  private _row(panel: NotebookPanel, session: string, snapshot: ISnapshot): HTMLElement {
    const restore = h('button', { className: 'jp-mod-styled jp-mod-accept', text: 'Restore' });
    const remove = h('button', { className: 'jp-mod-styled jp-mod-warn', text: 'Delete' });
    restore.addEventListener('click', async () => {
      restore.disabled = true;
      this._result.replaceChildren(h('progress'), ` Restoring ${snapshot.id}…`);
      try {
        this._result.replaceChildren(renderReport(await restoreInto(this._api, panel, session, snapshot.id)));
      } catch (error) {
        this._result.textContent = `Restore failed: ${(error as Error).message}`;
      }
      restore.disabled = false;
    });
    remove.addEventListener('click', async () => {
      const answer = await showDialog({
        title: 'Delete snapshot?',
        body: `${snapshot.id} of ${formatTime(snapshot.created)} (${describeSnapshot(snapshot)})`,
        buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })]
      });
      if (answer.button.accept) {
        try {
          await this._api.deleteSnapshot(session, snapshot.id);
        } catch (error) {
          this._result.textContent = `Delete failed: ${(error as Error).message}`;
        }
        await this.refresh();
      }
    });
    const during = snapshot.during_cell === null || snapshot.during_cell === undefined ? '' : `, during cell [${snapshot.during_cell}]`;
    return h(
      'li',
      { className: 'jp-spot-snapshot', attrs: { 'data-snapshot-id': snapshot.id } },
      h('div', { className: 'jp-spot-snapshot-when', text: `${formatTime(snapshot.created)} · ${formatAge(snapshot.created)}` }),
      h('div', {
        className: 'jp-spot-snapshot-what',
        text: `${snapshot.kind} after [${snapshot.execution_count}]${during} · ${describeSnapshot(snapshot)}`
      }),
      h('div', { className: 'jp-spot-snapshot-actions' }, restore, remove)
    );
  }

  private readonly _heading: HTMLElement;
  private readonly _result: HTMLElement;
  private readonly _list: HTMLElement;
}
