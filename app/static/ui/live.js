// Live updates by polling: one short conditional GET every few seconds (a 304 while nothing changed), paused
// while the tab is hidden and stopped when the view changes. No request is held open, so an open tab never
// costs a gunicorn thread for longer than one answer.
export class ViewScope {
  constructor() {
    this.alive = true;
    this.timers = new Set();
  }

  // Run `task` now and then every `ms` until it returns false or the view goes away. The first run's error
  // reaches the caller (the view shows it); later ones are logged and the next tick tries again.
  async every(ms, task) {
    const schedule = () => {
      if (!this.alive) return;
      const timer = setTimeout(async () => {
        this.timers.delete(timer);
        if (!this.alive) return;
        let again = true;
        if (document.visibilityState !== "hidden") {
          try {
            again = (await task()) !== false;
          } catch (error) {
            console.warn("live update failed", error);
            if (error.status === 401) again = false; // the key prompt is up; the view reloads after it
          }
        }
        if (again) schedule();
      }, ms);
      this.timers.add(timer);
    };
    if ((await task()) !== false) schedule();
  }

  stop() {
    this.alive = false;
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
  }
}

export const POLL_MS = 2000;
