/**
 * Restore: the banner a notebook shows when its last kernel died with the machine,
 * and the one restore routine the banner and the snapshots panel share.
 */
import { NotebookPanel } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import { IRestoreResult, ISession, SpotApi } from './api';
import { describeSkipped, describeSnapshot, fitToContent, formatAge, formatBytes, formatTime, h } from './format';

/**
 * Load a snapshot into the notebook's own kernel (the server starts one when the
 * notebook has none, and the notebook is then switched to it).
 */
export async function restoreInto(
  api: SpotApi,
  panel: NotebookPanel,
  session: string,
  snapshot: string
): Promise<IRestoreResult> {
  await panel.sessionContext.ready;
  const kernelId = panel.sessionContext.session?.kernel?.id;
  const result = await api.restore(session, snapshot, kernelId);
  if (result.kernel_id !== kernelId) {
    await panel.sessionContext.changeKernel({ id: result.kernel_id });
  }
  return result;
}

/** What came back and what did not, with the cell that recreates each missing object. */
export function renderReport(result: IRestoreResult): HTMLElement {
  const { report } = result;
  const restored = report.restored.length;
  const summary = h(
    'div',
    { className: 'jp-spot-report' },
    h('div', {
      className: 'jp-spot-report-summary',
      text:
        `Restored ${restored} variable${restored === 1 ? '' : 's'} from the snapshot of ` +
        `${formatTime(report.snapshot.created)} (execution count ${report.snapshot.execution_count}).`
    })
  );
  if (restored) {
    summary.append(h('div', { className: 'jp-spot-report-restored', text: report.restored.join(', ') }));
  }
  if (report.not_restored.length) {
    summary.append(
      h('div', { text: 'Not restored (re-run the cell that made each):' }),
      h('ul', {}, ...report.not_restored.map(item => h('li', { text: describeSkipped(item) })))
    );
  }
  for (const note of report.notes) {
    summary.append(h('div', { className: 'jp-spot-report-note', text: note }));
  }
  return summary;
}

/**
 * The banner at the top of a notebook whose session was interrupted. It stays until
 * Restore or Discard (running cells does not end an interruption: the server keeps
 * offering the line); Dismiss only hides it in this view.
 */
export class RestoreBanner extends Widget {
  constructor(
    private readonly _api: SpotApi,
    private readonly _panel: NotebookPanel,
    private readonly _session: ISession
  ) {
    super();
    this.addClass('jp-spot-restore');
    this.node.setAttribute('role', 'region');
    this.node.setAttribute('aria-label', 'Restore interrupted session');
    const snapshot = _session.latest;
    const why = _session.reason ? ` (${_session.reason})` : '';
    const what = _session.cause && _session.reason ? `was lost: ${_session.reason}` : `was interrupted${why}`;
    this._message = h('div', {
      className: 'jp-spot-restore-message',
      text:
        `This notebook's kernel ${what}. Its last snapshot, taken ` +
        `${formatAge(snapshot.created)} (${formatTime(snapshot.created)}), holds ${describeSnapshot(snapshot)}.`
    });
    if (_session.cause) {
      this.node.dataset.cause = _session.cause;
    }
    const largest = _session.largest_variables ?? [];
    this._largest = h('div', {
      className: 'jp-spot-restore-largest',
      text:
        `Largest variables: ${largest.map(v => `${v.name} (${formatBytes(v.size)})`).join(', ')} — ` +
        'free them or run `%spot exclude NAME` before restoring into the same memory.'
    });
    this._largest.hidden = !largest.length;
    this._skipped = h('div', {
      className: 'jp-spot-restore-skipped',
      text: `Not in the snapshot: ${snapshot.skipped.map(item => `${item.name} (${item.type})`).join(', ')} — see Details.`
    });
    this._skipped.hidden = !snapshot.skipped.length;
    this._restoreButton = h('button', {
      className: 'jp-spot-restore-button jp-mod-styled jp-mod-accept',
      text: 'Restore'
    });
    this._discardButton = h('button', {
      className: 'jp-spot-discard-button jp-mod-styled jp-mod-warn',
      text: 'Discard',
      title: 'Stop offering this snapshot; its state is not loaded (garbage collection removes it later)'
    });
    const dismiss = h('button', { className: 'jp-spot-dismiss-button jp-mod-styled', text: 'Dismiss' });
    const details = h('button', { className: 'jp-spot-details-button jp-mod-styled', text: 'Details' });
    this._details = this._renderDetails();
    this._details.hidden = true;
    this._restoreButton.addEventListener('click', () => void this.restore());
    this._discardButton.addEventListener('click', () => void this.discard());
    dismiss.addEventListener('click', () => this.dispose());
    details.addEventListener('click', () => {
      this._details.hidden = !this._details.hidden;
    });
    this._buttons = h(
      'div',
      { className: 'jp-spot-restore-buttons' },
      this._restoreButton,
      this._discardButton,
      dismiss,
      details
    );
    this._status = h('div', { className: 'jp-spot-restore-status' });
    const body = h(
      'div',
      { className: 'jp-spot-restore-body' },
      this._message,
      this._largest,
      this._skipped,
      this._buttons,
      this._status,
      this._details
    );
    this.node.append(body);
    this._observer = fitToContent(this.node, body, () => this.parent?.fit());
  }

  dispose(): void {
    this._observer.disconnect();
    super.dispose();
  }

  /** Stop offering the interrupted line: the session is no longer interrupted, nothing is loaded. */
  async discard(): Promise<void> {
    this._restoreButton.disabled = true;
    this._discardButton.disabled = true;
    this.node.dataset.state = 'discarding';
    try {
      const result = await this._api.discard(this._session.id, this._session.latest.id);
      this.node.dataset.state = 'discarded';
      this._message.textContent =
        `Discarded the snapshot of ${formatTime(result.snapshot.created)}: it is no longer offered ` +
        '(its snapshots stay until garbage collection removes them).';
      this._skipped.hidden = true;
      this._largest.hidden = true;
      this._details.hidden = true;
      this._status.replaceChildren();
      this._closeOnly();
    } catch (error) {
      this.node.dataset.state = 'failed';
      this._restoreButton.disabled = false;
      this._discardButton.disabled = false;
      this._status.textContent = `Discard failed: ${(error as Error).message}`;
    }
  }

  /** Restore the latest snapshot into this notebook's kernel, showing progress then the report. */
  async restore(): Promise<void> {
    this._restoreButton.disabled = true;
    this._discardButton.disabled = true;
    this.node.dataset.state = 'restoring';
    this._status.replaceChildren(
      h('progress', { className: 'jp-spot-progress' }),
      ` Restoring ${this._session.latest.variable_count} variables (${formatBytes(this._session.latest.size)})…`
    );
    try {
      const result = await restoreInto(this._api, this._panel, this._session.id, 'latest');
      this.node.dataset.state = 'restored';
      this._message.textContent = 'Session restored.';
      this._skipped.hidden = true; // the report below says what is missing
      this._largest.hidden = true;
      this._details.hidden = true;
      this._closeOnly();
      this._status.replaceChildren(renderReport(result));
    } catch (error) {
      this.node.dataset.state = 'failed';
      this._restoreButton.disabled = false;
      this._discardButton.disabled = false;
      this._status.textContent = `Restore failed: ${(error as Error).message}`;
    }
  }

  private _closeOnly(): void {
    const close = h('button', { className: 'jp-spot-dismiss-button jp-mod-styled', text: 'Close' });
    close.addEventListener('click', () => this.dispose());
    this._buttons.replaceChildren(close);
  }

  private _renderDetails(): HTMLElement {
    const snapshot = this._session.latest;
    const rows: [string, string][] = [
      ['Session', this._session.id],
      ['Snapshot', snapshot.id],
      ['Taken', `${formatTime(snapshot.created)} (${snapshot.kind})`],
      ['Execution count', String(snapshot.execution_count)],
      ['Size', formatBytes(snapshot.size)],
      ['Variables', String(snapshot.variable_count)]
    ];
    if (snapshot.during_cell !== null && snapshot.during_cell !== undefined) {
      rows.push(['Taken while running', `cell [${snapshot.during_cell}]`]);
    }
    const details = h(
      'div',
      { className: 'jp-spot-restore-details' },
      h('table', {}, ...rows.map(([key, value]) => h('tr', {}, h('th', { text: key }), h('td', { text: value }))))
    );
    if (snapshot.skipped.length) {
      details.append(
        h('div', { text: 'Skipped (not in the snapshot):' }),
        h('ul', {}, ...snapshot.skipped.map(item => h('li', { text: describeSkipped(item) })))
      );
    }
    return details;
  }

  private readonly _message: HTMLElement;
  private readonly _skipped: HTMLElement;
  private readonly _largest: HTMLElement;
  private readonly _buttons: HTMLElement;
  private readonly _restoreButton: HTMLButtonElement;
  private readonly _discardButton: HTMLButtonElement;
  private readonly _status: HTMLElement;
  private readonly _details: HTMLElement;
  private readonly _observer: ResizeObserver;
}
