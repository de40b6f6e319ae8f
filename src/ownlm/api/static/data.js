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
}

export async function showData() {
  const { conversations, totals } = await api("/api/personalization/conversations?limit=200");
  document.getElementById("data-totals").textContent =
    `Stored for you: ${totals.conversations} conversations, ${totals.messages} messages, ${totals.feedback} feedback entries.`;
  const items = conversations.map((c) =>
    el("li", {},
      el("span", { class: "grow" }, el("strong", {}, c.title || "(untitled)"), ` — ${c.messages} messages, ${c.source}, ${when(c.updated_at)}`),
      el("button", { type: "button", class: "secondary", "aria-label": `Delete conversation ${c.title || c.id}`,
        onclick: () => remove({ conversation_id: c.id }, `the conversation "${c.title || c.id}"`) }, "Delete…")));
  if (!items.length) items.push(el("li", { class: "muted" }, "No conversations stored."));
  document.getElementById("conversations").replaceChildren(...items);
  document.getElementById("delete-all").disabled = totals.conversations === 0;
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
