/** Short human text for sizes, ages and countdowns, shared by every widget. */
import { ISkipped, ISnapshot } from './api';

export function formatBytes(bytes: number): string {
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

/** "12 s ago", "3 min ago", "2 h ago", "4 d ago": compact enough for the status bar. */
export function formatAge(iso: string, now: number = Date.now()): string {
  const seconds = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (seconds < 60) {
    return `${seconds} s ago`;
  }
  if (seconds < 3600) {
    return `${Math.floor(seconds / 60)} min ago`;
  }
  if (seconds < 86400) {
    return `${Math.floor(seconds / 3600)} h ago`;
  }
  return `${Math.floor(seconds / 86400)} d ago`;
}

/** "1:52" for a countdown; never negative. */
export function formatCountdown(milliseconds: number): string {
  const total = Math.max(0, Math.ceil(milliseconds / 1000));
  const minutes = Math.floor(total / 60);
  const seconds = total % 60;
  return `${minutes}:${seconds.toString().padStart(2, '0')}`;
}

export function formatTime(iso: string): string {
  return new Date(iso).toLocaleString();
}

export function describeSkipped(item: ISkipped): string {
  const cell = item.cell === null || item.cell === undefined ? '' : ` — made in cell [${item.cell}]`;
  return `${item.name} (${item.type}): ${item.reason}${cell}`;
}

export function describeSnapshot(snapshot: ISnapshot): string {
  const skipped = snapshot.skipped.length ? `, ${snapshot.skipped.length} skipped` : '';
  return (
    `${formatBytes(snapshot.size)}, ${snapshot.variable_count} ` +
    `variable${snapshot.variable_count === 1 ? '' : 's'}${skipped}`
  );
}

/** A small element helper: the widgets here are plain DOM, no framework needed. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: { className?: string; text?: string; title?: string; attrs?: Record<string, string> } = {},
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  if (props.className) {
    element.className = props.className;
  }
  if (props.text !== undefined) {
    element.textContent = props.text;
  }
  if (props.title) {
    element.title = props.title;
  }
  for (const [key, value] of Object.entries(props.attrs ?? {})) {
    element.setAttribute(key, value);
  }
  element.append(...children);
  return element;
}

/**
 * Lumino box layouts size a child by its CSS min-height, not by its content: keep a
 * banner's min-height equal to its body's height, so it shows whole whatever it says.
 */
export function fitToContent(node: HTMLElement, body: HTMLElement, fit: () => void): ResizeObserver {
  const observer = new ResizeObserver(() => {
    const height = `${Math.ceil(body.getBoundingClientRect().height)}px`;
    if (node.style.minHeight !== height) {
      node.style.minHeight = height;
      fit();
    }
  });
  observer.observe(body);
  return observer;
}
