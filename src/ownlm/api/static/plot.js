// The learning view: small line charts drawn as inline SVG (no chart library, nothing fetched).

import { api } from "./api.js";
import { el } from "./ui.js";

const NS = "http://www.w3.org/2000/svg";
const W = 560, H = 240, PAD = { left: 48, right: 16, top: 16, bottom: 36 };

export async function showLearning() {
  const [{ models }, status] = await Promise.all([api("/api/personalization/models"), api("/api/personalization/status")]);
  const versions = [...models].sort((a, b) => a.version - b.version);
  const xs = versions.map((m) => `v${m.version}`);
  drawInto("plot-versions", "Held-out loss per version", xs, [
    { name: "base", cls: "s-base", ys: versions.map((m) => (m.training || {}).heldout_loss_base) },
    { name: "personal", cls: "s-personal", ys: versions.map((m) => (m.training || {}).heldout_loss_personal) },
  ], "No model versions yet.");
  const curve = lossCurve(status.history || []);
  drawInto("plot-curve", "Training loss of the last round", curve.map((_, i) => String(i + 1)),
    [{ name: "train loss", cls: "s-train", ys: curve }], "The last round recorded no loss curve.");
}

/** The newest job result's loss curve: a list of numbers or of [step, loss] pairs, if the trainer kept one. */
function lossCurve(history) {
  for (const job of history) {
    const r = job.result || {};
    const c = r.loss_curve || r.train_losses;
    if (Array.isArray(c) && c.length) return c.map((p) => (Array.isArray(p) ? p[1] : p));
  }
  return [];
}

function drawInto(id, title, xs, series, empty) {
  const box = document.getElementById(id);
  const points = series.flatMap((s) => s.ys).filter((y) => typeof y === "number");
  if (!xs.length || !points.length) {
    box.replaceChildren(el("p", { class: "muted" }, empty));
    return;
  }
  box.replaceChildren(chart(title, xs, series, points), legend(series));
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A line chart: y from the data's range (padded), x evenly spaced; one path and dots per series. */
function chart(title, xs, series, points) {
  let lo = Math.min(...points), hi = Math.max(...points);
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const pad = (hi - lo) * 0.1;
  lo -= pad; hi += pad;
  const x = (i) => PAD.left + (xs.length === 1 ? (W - PAD.left - PAD.right) / 2 : (i * (W - PAD.left - PAD.right)) / (xs.length - 1));
  const y = (v) => PAD.top + ((hi - v) * (H - PAD.top - PAD.bottom)) / (hi - lo);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, class: "chart" });
  root.append(svg("title", {}, title));
  for (let k = 0; k <= 4; k++) { // horizontal grid with loss labels
    const v = lo + ((hi - lo) * k) / 4;
    root.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v), class: "grid" }));
    root.append(svg("text", { x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" }, v.toFixed(2)));
  }
  const every = Math.ceil(xs.length / 10); // at most ~10 x labels, so long curves stay readable
  xs.forEach((label, i) => {
    if (i % every === 0) root.append(svg("text", { x: x(i), y: H - PAD.bottom + 18, "text-anchor": "middle", class: "tick" }, label));
  });
  for (const s of series) {
    const pts = s.ys.map((v, i) => (typeof v === "number" ? [x(i), y(v)] : null)).filter(Boolean);
    if (!pts.length) continue;
    root.append(svg("polyline", { points: pts.map((p) => p.join(",")).join(" "), class: `line ${s.cls}` }));
    if (pts.length <= 40) for (const [px, py] of pts) root.append(svg("circle", { cx: px, cy: py, r: 4, class: `dot ${s.cls}` }));
  }
  return root;
}

function legend(series) {
  return el("ul", { class: "legend" }, series.map((s) => el("li", {}, el("span", { class: `swatch ${s.cls}`, "aria-hidden": "true" }), s.name)));
}
