/**
 * jupyter-spot in JupyterLab and Notebook 7: the interruption warning, the restore banner
 * (or, for a notebook running on another server, a note saying so) and the snapshot status
 * item, all fed by the server extension's REST API and events.
 */
import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, Notification } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookActions, NotebookPanel } from '@jupyterlab/notebook';
import { Event, Kernel } from '@jupyterlab/services';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Signal } from '@lumino/signaling';

import { FLUSH_SCHEMA, IFlush, INotice, NOTICE_SCHEMA, SpotApi } from './api';
import { LiveElsewhereBanner } from './elsewhere';
import { NoticeBanner } from './notice';
import { RestoreBanner } from './restore';
import { UnverifiedBanner } from './unverified';
import { SnapshotStatus, SnapshotsPanel, sessionName } from './status';

const PLUGIN_ID = 'jupyter-spot:plugin';
/** After a kernel is lost, ask the server this many times, this often, whether it offers the state back. */
const LOSS_POLLS = 60;
const LOSS_POLL_MS = 1000;
/** Notebook 7's menu bar: just before its kernel status (rank 10 010) and Trusted indicator (11 000). */
const NOTEBOOK7_STATUS_RANK = 10_005;

namespace CommandIDs {
  export const openSnapshots = 'jupyter-spot:open-snapshots';
  export const restoreLatest = 'jupyter-spot:restore-latest';
}

interface ISpotSettings {
  autoRestore: boolean;
  showRestoreBanner: boolean;
  showStatusBar: boolean;
  saveOnNotice: boolean;
  refreshInterval: number;
}

const DEFAULTS: ISpotSettings = {
  autoRestore: false,
  showRestoreBanner: true,
  showStatusBar: true,
  saveOnNotice: true,
  refreshInterval: 10
};

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Interruption warning, restore banner and snapshot status for spot instances.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ISettingRegistry, IStatusBar, ICommandPalette, ILabShell],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    registry: ISettingRegistry | null,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null,
    labShell: ILabShell | null
  ) => {
    const api = new SpotApi(app.serviceManager.serverSettings);
    const settings: ISpotSettings = { ...DEFAULTS };
    const settingsChanged = new Signal<object, void>(plugin);

    // The side panel and the status item.
    const panel = new SnapshotsPanel(api, tracker);
    const openSnapshots = (): void => {
      if (!panel.isAttached) {
        app.shell.add(panel, 'right', { rank: 900 });
      }
      app.shell.activateById(panel.id);
    };
    const status = new SnapshotStatus(api, tracker, openSnapshots);

    // The warning: saving is on by default because a notice is the last chance to; off, the banner says to save.
    const notice = new NoticeBanner(() =>
      settings.saveOnNotice ? app.commands.execute('docmanager:save-all') : null
    );
    notice.id = 'jp-spot-notice';
    if (labShell) {
      app.shell.add(notice, 'header', { rank: 10 });
    } else {
      // Notebook 7 has no Lab header area: the same warning as a notification, updated every second.
      let toast: string | null = null;
      notice.textChanged.connect((_, text) => {
        const options = { autoClose: false as const, data: { spot: 'notice' } };
        if (toast === null) {
          toast = Notification.warning(text, options);
        } else if (!Notification.update({ id: toast, message: text, type: 'warning', ...options })) {
          toast = Notification.warning(text, options); // the user closed it; a new notice shows again
        }
      });
    }
    app.serviceManager.events.stream.connect((_, event: Event.Emission) => {
      if (event.schema_id === NOTICE_SCHEMA) {
        notice.showNotice(event as unknown as INotice);
      } else if (event.schema_id === FLUSH_SCHEMA) {
        notice.showFlush(event as unknown as IFlush);
        status.showFlush(event as unknown as IFlush);
      }
    });

    NotebookActions.executed.connect((_, { notebook }) => {
      if (notebook === tracker.currentWidget?.content) {
        status.cellExecuted();
      }
    });
    status.changed.connect(() => {
      if (panel.isVisible) {
        void panel.refresh();
      }
    });
    const statusShown = (): boolean => settings.showStatusBar && tracker.currentWidget !== null;
    if (labShell && statusBar) {
      statusBar.registerStatusItem(PLUGIN_ID + ':status', {
        item: status,
        align: 'left',
        rank: 5,
        isActive: statusShown,
        activeStateChanged: settingsChanged
      });
    } else if (!labShell) {
      // Notebook 7 has no status bar: its menu bar, next to the kernel status, on notebook pages.
      status.addClass('jp-spot-mod-menu');
      app.shell.add(status, 'menu', { rank: NOTEBOOK7_STATUS_RANK });
      settingsChanged.connect(() => status.setHidden(!statusShown()));
      status.setHidden(!statusShown());
    }
    tracker.currentChanged.connect(() => settingsChanged.emit());

    // On open, a notebook whose session is interrupted is offered a restore (once); one
    // whose kernel runs on another server sharing the store gets a note saying so.
    const banners = new Map<NotebookPanel, RestoreBanner>();
    const checkSession = async (nb: NotebookPanel): Promise<void> => {
      await nb.context.ready;
      let session, unverifiable;
      try {
        ({ session, unverifiable } = await api.sessionState(sessionName(nb)));
      } catch (error) {
        console.warn('jupyter-spot: cannot ask the server about this notebook', error);
        return;
      }
      if (unverifiable && !session && !nb.isDisposed) {
        nb.contentHeader.addWidget(new UnverifiedBanner(unverifiable));
        return;
      }
      if (!session || nb.isDisposed) {
        return;
      }
      if (session.live_elsewhere) {
        nb.contentHeader.addWidget(new LiveElsewhereBanner(session.live_elsewhere));
        return;
      }
      if (!session.interrupted || banners.has(nb) || (!settings.showRestoreBanner && !settings.autoRestore)) {
        return;
      }
      const banner = new RestoreBanner(api, nb, session);
      banners.set(nb, banner);
      banner.disposed.connect(() => banners.delete(nb));
      nb.contentHeader.addWidget(banner);
      if (settings.autoRestore) {
        await banner.restore();
      }
      status.lookAgain();
    };
    tracker.widgetAdded.connect((_, nb) => void checkSession(nb));

    // A kernel lost while the notebook is open (OOM kill, crash): jupyter_server restarts it
    // empty under the same id. The server decides whether the state is offered back (a restart
    // the user asked for is not), so ask it until it has recorded the loss, then show the banner.
    const watchForLoss = async (nb: NotebookPanel): Promise<void> => {
      const shown = banners.get(nb);
      if (shown && ['restored', 'discarded'].includes(shown.node.dataset.state ?? '')) {
        shown.dispose(); // a banner about an earlier loss, already settled
      }
      for (let attempt = 0; attempt < LOSS_POLLS && !nb.isDisposed && !banners.has(nb); attempt++) {
        try {
          const { session } = await api.sessionState(sessionName(nb));
          if (session?.interrupted) {
            await checkSession(nb);
            return;
          }
        } catch (error) {
          console.warn('jupyter-spot: cannot ask the server about this notebook', error);
        }
        await new Promise(resolve => setTimeout(resolve, LOSS_POLL_MS));
      }
    };
    tracker.widgetAdded.connect((_, nb) => {
      nb.sessionContext.statusChanged.connect((_, kernelStatus: Kernel.Status) => {
        if (kernelStatus === 'autorestarting' || kernelStatus === 'dead') {
          void watchForLoss(nb);
        }
      });
    });

    app.commands.addCommand(CommandIDs.openSnapshots, {
      label: 'Show Snapshots of This Notebook',
      caption: 'List the jupyter-spot snapshots of the current notebook',
      execute: openSnapshots
    });
    app.commands.addCommand(CommandIDs.restoreLatest, {
      label: 'Restore Latest Snapshot Into This Kernel',
      isEnabled: () => tracker.currentWidget !== null,
      execute: async () => {
        const nb = tracker.currentWidget;
        if (!nb) {
          return;
        }
        const session = await api.session(sessionName(nb));
        if (session) {
          const banner = banners.get(nb) ?? new RestoreBanner(api, nb, session);
          if (!banner.isAttached) {
            banners.set(nb, banner);
            banner.disposed.connect(() => banners.delete(nb));
            nb.contentHeader.addWidget(banner);
          }
          await banner.restore();
        }
      }
    });
    palette?.addItem({ command: CommandIDs.openSnapshots, category: 'Spot' });
    palette?.addItem({ command: CommandIDs.restoreLatest, category: 'Spot' });

    const apply = (loaded: ISettingRegistry.ISettings): void => {
      Object.assign(settings, DEFAULTS, loaded.composite as unknown as Partial<ISpotSettings>);
      status.refreshInterval = settings.refreshInterval;
      settingsChanged.emit();
    };
    status.refreshInterval = settings.refreshInterval;
    if (registry) {
      void registry
        .load(PLUGIN_ID)
        .then(loaded => {
          apply(loaded);
          loaded.changed.connect(apply);
        })
        .catch(reason => console.error('jupyter-spot: settings failed to load', reason));
    }

    // After the shell is restored (never awaited here: Lab would hang), catch up on a
    // notice that fired before this page loaded, and on the state of the current notebook.
    void app.restored.then(async () => {
      try {
        const server = await api.status();
        const deadline = server.last_notice?.deadline;
        if (server.last_notice && (!deadline || Date.parse(deadline) > Date.now())) {
          notice.showNotice(server.last_notice);
        }
      } catch (error) {
        console.warn('jupyter-spot: the server extension did not answer', error);
      }
      await status.refresh();
    });
  }
};

export default plugin;
