/**
 * The note a notebook shows when its snapshots were signed with a key this server does
 * not have (a fresh machine): nothing is offered for restore, and the server's text says
 * exactly what to set so they verify.
 */
import { Widget } from '@lumino/widgets';

import { IUnverifiable } from './api';
import { fitToContent, h } from './format';

export class UnverifiedBanner extends Widget {
  constructor(problem: IUnverifiable) {
    super();
    this.addClass('jp-spot-unverified');
    this.node.setAttribute('role', 'alert');
    this.node.setAttribute('aria-label', 'Snapshots signed with another key');
    const message = h('div', { className: 'jp-spot-unverified-message', text: problem.message });
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
