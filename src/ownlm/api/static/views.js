// Status, Models and Privacy views: each `show*` fetches fresh data from the node and redraws its view.

import { api } from "./api.js";
import { confirmDialog, el, flash, kb, when } from "./ui.js";

// ---- Status -------------------------------------------------------------------------------------------

let statusTimer = null;

export function initStatus() {
  document.getElementById("train-now").addEventListener("click", async () => {
    let message, kind;
    try {
      const res = await api("/api/personalization/train", { method: "POST" });
      message = `Learning round ${res.job_id} queued.`;
    } catch (err) {
      [message, kind] = [err.text, "error"]; // 409 when a round is already open: the message says so
    }
    await showStatus();
    flash(message, kind);
  });
}

export async function showStatus() {
  clearTimeout(statusTimer);
  const s = await api("/api/personalization/status");
  const have = s.samples_since_last_model, need = s.min_samples;
  document.getElementById("st-samples").textContent = `${have} of ${need} samples since the last model`;
  const bar = document.getElementById("st-samples-bar");
  bar.max = Math.max(need, 1);
  bar.value = Math.min(have, bar.max);
  document.getElementById("st-next").textContent = nextRun(s);
  renderJob(s.job);
  document.getElementById("st-last").textContent = lastResult(s.last_result);
  // poll while the view is open: fast during a round, slowly otherwise
  if (location.hash === "#status") statusTimer = setTimeout(() => showStatus().catch(() => {}), s.job ? 2000 : 15000);
}

export function stopStatus() {
  clearTimeout(statusTimer);
}

function nextRun(s) {
  if (!s.enabled) return "Scheduled learning is off on this node; use Train now.";
  if (!s.next_run_at) return "At the next check of the scheduler.";
  const minutes = Math.max(0, Math.round((s.next_run_at - s.now) / 60));
  return `${when(s.next_run_at)} (in ${minutes} min)`;
}

function renderJob(job) {
  const text = document.getElementById("st-job");
  const bar = document.getElementById("st-job-bar");
  bar.hidden = !job;
  if (!job) {
    text.textContent = "No round running.";
    return;
  }
  const stage = job.stage ? `stage ${job.stage}` : "waiting to start";
  text.textContent = `Round ${job.id}: ${job.state}, ${stage} (${Math.round((job.progress || 0) * 100)}%)`;
  bar.value = job.progress || 0;
}

function lastResult(job) {
  if (!job) return "No round has finished yet.";
  const at = when(job.finished_at);
  if (job.state === "deployed") return `Deployed on ${at}: ${job.reason}.`;
  if (job.state === "refused") return `Not deployed (${at}): the quality gate refused — ${job.reason}.`;
  return `${job.state} on ${at}: ${job.reason || "no reason recorded"}.`;
}

// ---- Models -------------------------------------------------------------------------------------------

export function initModels() {
  document.getElementById("use-base").addEventListener("click", () => rollback("base", "the base model"));
}

export async function showModels() {
  const { models, active } = await api("/api/personalization/models");
  document.getElementById("models-active").textContent = active
    ? `Answering with version ${models.find((m) => m.active).version}.`
    : "Answering with the base model (no personal model active).";
  const rows = models.map(modelRow);
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 9 }, "No personal model yet: it appears after the first deployed round.")));
  document.querySelector("#models-table tbody").replaceChildren(...rows);
  document.getElementById("use-base").disabled = !active;
}

function modelRow(m) {
  const t = m.training || {};
  const loss = (x) => (typeof x === "number" ? x.toFixed(3) : "—");
  const action = m.active
    ? el("span", { class: "muted" }, "in use")
    : el("button", { type: "button", class: "secondary", onclick: () => rollback(String(m.version), `version ${m.version}`) },
        `Roll back to v${m.version}`);
  return el("tr", { class: m.active ? "active" : "", "data-version": m.version },
    el("th", { scope: "row" }, `v${m.version}`),
    el("td", {}, when(m.installed_at)),
    el("td", { class: "nowrap" }, kb(m.size_bytes)),
    el("td", {}, t.samples ?? "—"),
    el("td", {}, `${loss(t.heldout_loss_base)} → ${loss(t.heldout_loss_personal)}`),
    dpCell(t.dp),
    el("td", { class: "nowrap" }, m.signature_verified ? "✔ verified" : "✘ not verified"),
    el("td", { class: "nowrap" }, m.active ? el("strong", {}, "● active") : ""),
    el("td", {}, action));
}

// The privacy budget a DP-trained version spent (manifest training.dp, learn/dp.py); "off" without DP.
function dpCell(b) {
  if (!b) return el("td", { class: "muted dp" }, "off");
  const eps = typeof b.epsilon === "number" ? b.epsilon.toFixed(2) : "∞";
  const detail = `noise ×${Number(b.noise_multiplier).toFixed(2)}, clip ${b.max_grad_norm}, ${b.steps} steps, ` +
    `q=${Number(b.sample_rate).toFixed(3)} per ${b.unit}, ${String(b.accountant).toUpperCase()} accountant`;
  return el("td", { class: "nowrap dp", title: detail }, `ε = ${eps}, δ = ${Number(b.delta).toExponential(0)}`);
}

async function rollback(target, label) {
  let message, kind;
  try {
    await api("/api/personalization/rollback", { method: "POST", body: { target } });
    message = `Now answering with ${label}.`;
  } catch (err) {
    [message, kind] = [err.text, "error"];
  }
  await showModels();
  flash(message, kind);
}

// ---- Privacy ------------------------------------------------------------------------------------------

// Plain words for each tier; the node's own one-line description is shown under it.
const TIER_NAMES = { 0: "Cloud", 1: "This machine only", 2: "Trusted hardware (TEE)", 3: "Homomorphic" };
let currentTier = null;

export function initPrivacy() {
  document.getElementById("privacy-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const picked = document.querySelector("input[name=tier]:checked");
    if (!picked) return;
    const tier = Number(picked.value);
    if (tier === currentTier) return flash("That is already your tier.");
    let confirm = false;
    if (tier < currentTier) {
      // lowering lets data go where it could not before: the node refuses without an explicit confirmation
      confirm = await confirmDialog("Lower your privacy tier?",
        `From "${TIER_NAMES[currentTier]}" to "${TIER_NAMES[tier]}": your conversations may then leave this machine ` +
        "as that tier allows. You can raise it again at any time.", "Lower the tier");
      if (!confirm) return flash("Privacy tier unchanged.");
    }
    // redraw before telling the user, so what the message says is what the form shows
    let message, kind;
    try {
      const res = await api("/api/personalization/privacy", { method: "POST", body: { tier, confirm } });
      message = `Privacy tier is now ${res.tier}: ${TIER_NAMES[res.tier]}.`;
    } catch (err) {
      [message, kind] = [err.text, "error"];
    }
    await showPrivacy();
    flash(message, kind);
  });
}

export async function showPrivacy() {
  const { tier, tiers } = await api("/api/personalization/privacy");
  currentTier = tier;
  const options = Object.entries(tiers).map(([value, meaning]) => {
    const id = `tier-${value}`;
    return el("div", { class: "tier" },
      el("input", { type: "radio", name: "tier", id, value, checked: Number(value) === tier, "aria-describedby": `${id}-d` }),
      el("label", { for: id }, `${value} — ${TIER_NAMES[value] || ""}`, Number(value) === tier ? " (current)" : ""),
      el("p", { id: `${id}-d`, class: "muted" }, meaning));
  });
  document.getElementById("tiers").replaceChildren(...options);
}
