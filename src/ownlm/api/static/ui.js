// Small DOM helpers shared by the views: element builder, messages, formatting, the confirmation dialog.

import { token } from "./api.js";

/** Bytes as the person reads them: KB with one decimal (deltas are small). */
export function kb(bytes) {
  return `${(bytes / 1024).toFixed(1)} KB`;
}

/** A unix time (seconds) as a local date and time. */
export function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "—";
}

/** Create an element with text and attributes; keeps the DOM code free of innerHTML (no injection). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

/** A short message at the top of the page (announced to screen readers through role=status). */
export function flash(message, kind = "info") {
  // Signed out by a 401, the user is already told why; the failed request's own error would replace that.
  if (kind === "error" && !token.get()) return;
  const box = document.getElementById("flash");
  box.textContent = message;
  box.className = `flash ${kind}`;
  box.hidden = !message;
}

/**
 * Ask before something that cannot be undone. Resolves true on Confirm. A real <dialog>: focus moves into
 * it, Escape cancels, and focus returns to the button that opened it.
 */
export function confirmDialog(title, text, okLabel = "Confirm") {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-h").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  const opener = document.activeElement;
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (opener) opener.focus();
      resolve(dialog.returnValue === "ok");
    }, { once: true });
  });
}
