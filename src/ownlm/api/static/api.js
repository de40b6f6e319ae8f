// Talking to the node: every request carries the user's token, so the server decides what is theirs.

const TOKEN_KEY = "ownlm.token";

// sessionStorage, not localStorage: the token dies with the tab instead of lingering on a shared machine.
export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (t) => sessionStorage.setItem(TOKEN_KEY, t),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

/** An error from the node, with its hint (the API answers {"error": {type, message, hint}}). */
export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `request failed (HTTP ${status})`);
    this.status = status;
    this.hint = e.hint || null;
    this.type = e.type || null;
  }
  get text() {
    return this.hint ? `${this.message} — ${this.hint}` : this.message;
  }
}

/** fetch() a JSON endpoint. `body` may be an object (sent as JSON) or FormData (sent as multipart). */
export async function api(path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${token.get()}` };
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const res = await fetch(path, { method, headers, body: payload });
  const data = await res.json().catch(() => null);
  if (!res.ok) {
    if (res.status === 401) window.dispatchEvent(new Event("ownlm:unauthorized"));
    throw new ApiError(res.status, data);
  }
  return data;
}

/**
 * One WebSocket for the chat. The server answers one turn at a time and its events carry no request id,
 * so turns are queued here: each `ask` waits for the previous turn's "done" or "error".
 */
export class ChatSocket {
  constructor() {
    this.ws = null;
    this.queue = Promise.resolve();
    this.current = null; // {onEvent, resolve, reject} of the turn in flight
  }

  connect() {
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) return this.opened;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    // browsers cannot set headers on a WebSocket, so the token goes in the query string
    this.ws = new WebSocket(`${scheme}://${location.host}/ws/chat?token=${encodeURIComponent(token.get())}`);
    this.opened = new Promise((resolve, reject) => {
      this.ws.onopen = resolve;
      this.ws.onerror = () => {
        reject(new Error("could not connect to the node's chat"));
        // a socket that never opened says nothing about why: ask over HTTP, where a 401 signs the user out
        api("/v1/models").catch(() => {});
      };
    });
    this.ws.onmessage = (ev) => this.dispatch(JSON.parse(ev.data));
    this.ws.onclose = (ev) => {
      // the node accepts, then closes with 4401 when the token is bad or was revoked
      const unauthorized = ev.code === 4401;
      if (this.current) this.current.reject(new Error(unauthorized ? "the token is not valid" : "the connection closed"));
      this.current = null;
      this.ws = null;
      if (unauthorized) window.dispatchEvent(new Event("ownlm:unauthorized"));
    };
    return this.opened;
  }

  dispatch(event) {
    const turn = this.current;
    if (!turn) return;
    if (event.type === "error") {
      this.current = null;
      turn.reject(new ApiError(400, event));
      return;
    }
    turn.onEvent(event);
    if (event.type === "done") {
      this.current = null;
      turn.resolve(event);
    }
  }

  /** Send one turn; `onEvent` sees start and token events; resolves with the "done" event. */
  ask(message, onEvent) {
    const run = async () => {
      await this.connect();
      return new Promise((resolve, reject) => {
        this.current = { onEvent, resolve, reject };
        this.ws.send(JSON.stringify(message));
      });
    };
    const result = this.queue.then(run, run);
    this.queue = result.catch(() => {});
    return result;
  }

  close() {
    if (this.ws) this.ws.close();
  }
}
