/**
 * The note a notebook shows when another server sharing the store runs its kernel:
 * nothing to restore, but two kernels now write the same session's snapshots.
 */
import { Widget } from '@lumino/widgets';

import { ILiveElsewhere } from './api';
import { fitToContent, formatAge, formatTime, h } from './format';

export class LiveElsewhereBanner extends Widget {
  constructor(elsewhere: ILiveElsewhere) {
    super();
    this.addClass('jp-spot-elsewhere');
    this.node.setAttribute('role', 'status');
    this.node.setAttribute('aria-label', 'Notebook also running on another server');
    const message = h('div', {
      className: 'jp-spot-elsewhere-message',
      title: `Kernel ${elsewhere.kernel_id}, last heartbeat ${formatTime(elsewhere.heartbeat)}`,
      text:
        `This notebook is also open on ${elsewhere.host} (${elsewhere.server}), where its kernel ` +
        `last checked in ${formatAge(elsewhere.heartbeat)}. Snapshots from both kernels go to ` +
        'the same session: the newest one wins.'
    });
    const dismiss = h('button', { className: 'jp-spot-dismiss-button jp-mod-styled', text: 'Dismiss' });
    dismiss.addEventListener('click', () => this.dispose());
    const body = h('div', { className: 'jp-spot-elsewhere-body' }, message, dismiss);
    this.node.append(body);
    this._observer = fitToContent(this.node, body, () => this.parent?.fit());
  }

  dispose(): void {
    this._observer.disconnect();
    super.dispose();
  }

  private readonly _observer: ResizeObserver;
}
