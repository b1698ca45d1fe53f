/**
 * Typed client of the server extension's REST API (docs/server.md is the contract).
 *
 * Every call goes through ServerConnection.makeRequest so Jupyter's token and
 * XSRF header come for free.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export const NOTICE_SCHEMA = 'https://events.jupyter.org/jupyter_spot/notice/v1';
export const FLUSH_SCHEMA = 'https://events.jupyter.org/jupyter_spot/flush/v1';

export interface INotice {
  kind: 'interruption' | 'rebalance' | 'maintenance';
  action: 'terminate' | 'stop' | 'hibernate' | 'preempt';
  deadline: string | null;
  source: string;
  seconds_left: number | null;
  /** How many kernels the server tells to flush (0: no kernel state to save); absent from older servers. */
  kernels?: number | null;
}

export interface IFlush {
  kernel_id: string;
  session: string;
  status: 'started' | 'done' | 'failed';
  snapshot_id: string | null;
  seconds: number | null;
  message: string | null;
}

export interface ISkipped {
  name: string;
  type: string;
  reason: string;
  cell: number | null;
}

export interface ISnapshot {
  id: string;
  session: string;
  created: string;
  kind: 'auto' | 'explicit' | 'notice' | 'mid-cell';
  during_cell: number | null;
  execution_count: number;
  size: number;
  variable_count: number;
  skipped: ISkipped[];
}

/** Another server sharing the store runs the session's kernel right now. */
export interface ILiveElsewhere {
  host: string;
  server: string;
  kernel_id: string;
  heartbeat: string;
}

export interface ISession {
  id: string;
  interrupted: boolean;
  live_kernel: string | null;
  live_elsewhere: ILiveElsewhere | null;
  reason: string | null;
  /** How the server lost the interrupted line's kernel ("oom", "crash", "culled", …), or null. */
  cause?: string | null;
  /** After an OOM: the snapshot's largest variables, largest first. */
  largest_variables?: { name: string; type: string | null; size: number }[];
  /** What a restore of "latest" loads: the interrupted line's newest snapshot while there is one. */
  latest: ISnapshot;
  /** The line of descent `latest` belongs to. */
  line: string;
  /** The session's newest snapshot (the new kernel's own, when the user ran cells before restoring). */
  newest: ISnapshot;
}

export interface IDiscardResult {
  line: string;
  snapshot: ISnapshot;
}

/** A notebook whose snapshots were signed with a key this server lacks: nothing to restore, but a fix. */
export interface IUnverifiable {
  id: string;
  snapshots: number;
  key_id: string;
  fix: string;
  message: string;
}

export interface IStatus {
  version: string;
  store: {
    url: string;
    kind: 'local' | 's3' | 'tiered';
    writable: boolean;
    error: string | null;
  };
  watcher: { running: boolean; provider: string | null; sources: string[] };
  last_notice: INotice | null;
}

export interface IRestoreReport {
  snapshot: ISnapshot;
  restored: string[];
  not_restored: ISkipped[];
  notes: string[];
}

export interface IRestoreResult {
  kernel_id: string;
  report: IRestoreReport;
}

/** An error the server answered with, carrying its `{"message": …}`. */
export class SpotApiError extends Error {
  constructor(
    readonly status: number,
    message: string
  ) {
    super(message);
  }
}

/** Talks to `{base_url}jupyter-spot/api/`. */
export class SpotApi {
  constructor(
    private readonly _settings: ServerConnection.ISettings = ServerConnection.makeSettings()
  ) {}

  status(): Promise<IStatus> {
    return this._request<IStatus>('status');
  }

  /** The session of one notebook, or null when nothing was ever snapshotted for it. */
  async session(path: string): Promise<ISession | null> {
    return (await this.sessionState(path)).session;
  }

  /** The notebook's session, or why its snapshots cannot be verified on this server. */
  async sessionState(path: string): Promise<{ session: ISession | null; unverifiable: IUnverifiable | null }> {
    const reply = await this._request<{ sessions: ISession[]; unverifiable?: IUnverifiable[] }>(
      'sessions' + URLExt.objectToQueryString({ path })
    );
    return {
      session: reply.sessions.find(s => s.id === path) ?? null,
      unverifiable: reply.unverifiable?.find(u => u.id === path) ?? null
    };
  }

  /** Snapshots of a session, newest first. */
  async snapshots(session: string): Promise<ISnapshot[]> {
    const reply = await this._request<{ snapshots: ISnapshot[] }>(
      `sessions/${encodeURIComponent(session)}/snapshots`
    );
    return reply.snapshots;
  }

  restore(
    session: string,
    snapshot: string,
    kernelId: string | undefined
  ): Promise<IRestoreResult> {
    const body: { snapshot: string; kernel_id?: string } = { snapshot };
    if (kernelId) {
      body.kernel_id = kernelId;
    }
    return this._request<IRestoreResult>(
      `sessions/${encodeURIComponent(session)}/restore`,
      { method: 'POST', body: JSON.stringify(body) }
    );
  }

  /** Stop offering the line of `snapshot` (default: the interrupted line); nothing is deleted. */
  discard(session: string, snapshot?: string): Promise<IDiscardResult> {
    return this._request<IDiscardResult>(`sessions/${encodeURIComponent(session)}/discard`, {
      method: 'POST',
      body: JSON.stringify(snapshot ? { snapshot } : {})
    });
  }

  async deleteSnapshot(session: string, snapshot: string): Promise<void> {
    await this._request<null>(
      `sessions/${encodeURIComponent(session)}/snapshots/${encodeURIComponent(snapshot)}`,
      { method: 'DELETE' }
    );
  }

  private async _request<T>(path: string, init: RequestInit = {}): Promise<T> {
    const url = URLExt.join(this._settings.baseUrl, 'jupyter-spot/api', path);
    const response = await ServerConnection.makeRequest(url, init, this._settings);
    const text = await response.text();
    let data: any = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = { message: text };
      }
    }
    if (!response.ok) {
      throw new SpotApiError(
        response.status,
        data?.message ?? `${response.status} ${response.statusText}`
      );
    }
    return data as T;
  }
}
