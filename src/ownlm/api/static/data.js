// The data view: what is stored, importing an export (with the importer's summary), deleting for good.

import { api } from "./api.js";
import { confirmDialog, el, flash, when } from "./ui.js";

export function initData() {
  document.getElementById("import-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = document.getElementById("import-file");
    if (!input.files.length) return;
    const body = new FormData();
    body.append("file", input.files[0]);
    const button = ev.submitter || ev.target.querySelector("button");
    button.disabled = true;
    try {
      showSummary(await api("/api/personalization/import", { method: "POST", body }));
      ev.target.reset();
    } catch (err) {
      showSummary(null, err.text);
    } finally {
      button.disabled = false;
    }
    showData();
  });
  document.getElementById("delete-all").addEventListener("click", () => remove({}, "all your conversations"));
  document.getElementById("conv-newer").addEventListener("click", () => page(-1));
  document.getElementById("conv-older").addEventListener("click", () => page(+1));
}

const PAGE = 20; // conversations per page: a history of thousands stays one screen or two, even on a phone
let offset = 0;

export async function showData() {
  let { conversations, totals } = await api(`/api/personalization/conversations?limit=${PAGE}&offset=${offset}`);
  if (!conversations.length && offset > 0) { // the last page emptied (a delete): show the one before
    offset = Math.max(0, Math.floor((totals.conversations - 1) / PAGE) * PAGE);
    ({ conversations, totals } = await api(`/api/personalization/conversations?limit=${PAGE}&offset=${offset}`));
  }
  document.getElementById("data-totals").textContent =
    `Stored for you: ${totals.conversations} conversations, ${totals.messages} messages, ${totals.feedback} feedback entries.`;
  const items = conversations.map(conversationItem);
  if (!items.length) items.push(el("li", { class: "muted" }, "No conversations stored."));
  document.getElementById("conversations").replaceChildren(...items);
  document.getElementById("delete-all").disabled = totals.conversations === 0;
  const total = totals.conversations;
  document.getElementById("conv-pager").hidden = total <= PAGE;
  document.getElementById("conv-range").textContent =
    `${offset + 1}–${Math.min(offset + PAGE, total)} of ${total}`;
  document.getElementById("conv-newer").disabled = offset === 0;
  document.getElementById("conv-older").disabled = offset + PAGE >= total;
}

function page(step) {
  offset = Math.max(0, offset + step * PAGE);
  showData().catch((err) => flash(err.text || err.message, "error"));
}

/** One row: the conversation's name (its title, else the node's preview of its first question), opening
 * its messages in place; what it holds; and its delete button. */
function conversationItem(c) {
  const name = c.title || c.preview || "(no question in this conversation)";
  const panel = el("div", { class: "conv-messages", id: `conv-${c.id}`, hidden: true });
  const open = el("button", {
    type: "button", class: "link conv-open", "aria-expanded": "false", "aria-controls": panel.id,
    onclick: () => toggle(c.id, open, panel),
  }, name);
  return el("li", {},
    el("div", { class: "conv-head" },
      el("span", { class: "grow" }, open,
        el("span", { class: "muted" }, ` ${c.messages} messages, ${c.source}, ${when(c.updated_at)}`)),
      el("button", { type: "button", class: "secondary", "aria-label": `Delete conversation ${name}`,
        onclick: () => remove({ conversation_id: c.id }, `the conversation "${name}"`) }, "Delete…")),
    panel);
}

/** Who wrote a message, as the person reads it; a reply names the model that wrote it. */
function speaker(m) {
  if (m.role === "user") return "You";
  if (m.role === "assistant") return m.model ? `Model (${m.model})` : "Model";
  return "System prompt";
}

async function toggle(id, button, panel) {
  if (button.getAttribute("aria-expanded") === "true") {
    button.setAttribute("aria-expanded", "false");
    panel.hidden = true;
    return;
  }
  try {
    const { messages } = await api(`/api/personalization/conversations/${encodeURIComponent(id)}`);
    panel.replaceChildren(...messages.map((m) =>
      el("div", { class: `msg msg-${m.role}` }, el("span", { class: "msg-role" }, speaker(m)), el("p", {}, m.content))));
    if (!messages.length) panel.replaceChildren(el("p", { class: "muted" }, "No messages."));
  } catch (err) {
    return flash(err.text || err.message, "error");
  }
  button.setAttribute("aria-expanded", "true");
  panel.hidden = false;
}

/** The importer's summary: what was new, what was already stored, what was skipped and why. */
function showSummary(s, error) {
  const box = document.getElementById("import-summary");
  box.hidden = false;
  if (!s) {
    box.replaceChildren(el("p", { class: "error" }, `Not imported: ${error}`));
    return;
  }
  const rows = [
    ["Format", s.format],
    ["Conversations", `${s.conversations_new} new, ${s.conversations_known} already stored`],
    ["Messages", `${s.messages_new} new, ${s.messages_duplicate} duplicates`],
    ...Object.entries(s.skipped).map(([reason, n]) => ["Skipped", `${n} × ${reason}`]),
    ...s.bad.map((b) => ["Not imported", `#${b.index} ${b.external_id || ""}: ${b.reason}`]),
  ];
  box.replaceChildren(
    el("h4", {}, `Imported ${s.file}`),
    el("dl", {}, rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])));
}

/** Delete after a confirmation that shows what will go (counted by the node, nothing removed yet). */
async function remove(params, label) {
  const query = new URLSearchParams(params).toString();
  try {
    const { would_delete: n } = await api(`/api/personalization/delete-preview?${query}`);
    const models = n.models.length ? ` The ${n.models.length} personal model(s) trained on it go too.` : "";
    const ok = await confirmDialog("Delete for good?",
      `This deletes ${label}: ${n.conversations} conversations, ${n.messages} messages and ` +
      `${n.feedback} feedback entries.${models} It cannot be undone.`, "Delete");
    if (!ok) return flash("Nothing deleted.");
    const { deleted } = await api(`/api/personalization/data?${query}`, { method: "DELETE" });
    await showData();
    const removed = deleted.models_removed.length ? ` Removed the models ${deleted.models_removed.join(", ")}.` : "";
    flash(`Deleted ${deleted.messages} messages in ${deleted.conversations} conversations.${removed}`);
  } catch (err) {
    flash(err.text, "error");
  }
}
