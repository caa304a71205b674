// CacheKit frontend: a sidebar tab with the cache hit rates of recent runs (live while
// sampling) and a badge with the last hit rate on every CacheKit node.
// Data: "cachekit.progress" / "cachekit.run" events from the server (nodes/history.py) and
// GET /cachekit/runs for runs that finished before this page opened.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const MAX_RUNS = 32;
const runs = new Map(); // run id -> record, insertion order = oldest first
let panel = null; // the sidebar tab's element while it is rendered

function remember(record) {
  runs.set(record.id, record);
  while (runs.size > MAX_RUNS) runs.delete(runs.keys().next().value);
  updateBadge(record);
  if (panel && panel.isConnected) render(panel);
}

const pct = (v) => (v === null || v === undefined ? "-" : `${Math.round(v * 100)}%`);
const times = (v) => (v ? `${v.toFixed(2)}x` : "-");
// As core/telemetry.py format_bytes: 1.5 KiB, 12.3 MiB, 2.0 GiB.
const fmtBytes = (v) => (v >= 2 ** 30 ? `${(v / 2 ** 30).toFixed(1)} GiB`
  : v >= 2 ** 20 ? `${(v / 2 ** 20).toFixed(1)} MiB` : `${(v / 2 ** 10).toFixed(1)} KiB`);

// -- node badges -------------------------------------------------------------------------
// A duck-typed badge (LiteGraph draws anything with height, getWidth(ctx) and draw(ctx, x, y)).
class HitRateBadge {
  constructor(node) { this.node = node; this.height = 20; this.padding = 6; }
  get text() { return this.node.cachekitBadgeText || ""; }
  getWidth(ctx) {
    if (!this.text) return 0;
    const font = ctx.font;
    ctx.font = "12px sans-serif";
    const width = ctx.measureText(this.text).width + this.padding * 2;
    ctx.font = font;
    return width;
  }
  draw(ctx, x, y) {
    if (!this.text) return;
    const { font, fillStyle, textBaseline, textAlign } = ctx;
    const width = this.getWidth(ctx);
    ctx.font = "12px sans-serif";
    ctx.fillStyle = this.node.cachekitLive ? "#8a6d1a" : "#1f6f43";
    ctx.beginPath();
    if (ctx.roundRect) ctx.roundRect(x, y, width, this.height, 5); else ctx.rect(x, y, width, this.height);
    ctx.fill();
    ctx.fillStyle = "#ffffff";
    ctx.textBaseline = "middle";
    ctx.textAlign = "left";
    ctx.fillText(this.text, x + this.padding, y + this.height / 2 + 1);
    Object.assign(ctx, { font, fillStyle, textBaseline, textAlign });
  }
}

function updateBadge(record) {
  if (!record.node_id || !app.graph) return;
  const node = app.graph.getNodeById(record.node_id);
  if (!node || !node.cachekitBadge) return;
  node.cachekitLive = !record.finished;
  node.cachekitBadgeText = `hit ${pct(record.telemetry.hit_rate)}`;
  app.graph.setDirtyCanvas(true, false);
}

// -- sidebar tab -------------------------------------------------------------------------
function heatmapCanvas(t) {
  // Columns = steps, rows = blocks (the units of a block averaged); bright = reused.
  const groups = [...new Set(t.groups)];
  const cell = Math.max(3, Math.min(10, Math.floor(300 / Math.max(1, t.num_steps))));
  const canvas = document.createElement("canvas");
  canvas.width = t.num_steps * cell;
  canvas.height = groups.length * cell;
  canvas.className = "cachekit-heatmap";
  const ctx = canvas.getContext("2d");
  t.heatmap.forEach((row, step) => {
    groups.forEach((g, j) => {
      const values = row.filter((v, u) => t.groups[u] === g && v !== null);
      if (!values.length) ctx.fillStyle = "#808080";
      else {
        const share = values.reduce((a, b) => a + b, 0) / values.length;
        const mix = (a, b) => Math.round(a * (1 - share) + b * share);
        ctx.fillStyle = `rgb(${mix(40, 80)},${mix(44, 220)},${mix(60, 140)})`;
      }
      ctx.fillRect(step * cell, j * cell, cell, cell);
    });
  });
  return canvas;
}

function stepBars(t) {
  const canvas = document.createElement("canvas");
  const bar = Math.max(3, Math.min(10, Math.floor(300 / Math.max(1, t.num_steps))));
  canvas.width = t.num_steps * bar;
  canvas.height = 40;
  canvas.className = "cachekit-steps";
  const ctx = canvas.getContext("2d");
  t.step_hit_rates.forEach((v, step) => {
    const skipped = (t.skipped_steps || []).includes(step);
    ctx.fillStyle = skipped ? "#e0a030" : "#50c88c";
    const h = skipped ? 40 : Math.round((v || 0) * 40);
    ctx.fillRect(step * bar, 40 - h, bar - 1, h);
  });
  return canvas;
}

// Online methods: the value each step's decision compared with its threshold, as bars
// (green = reused, grey = computed) and as text a user can copy when tuning the threshold.
function probeChart(t) {
  const values = t.probe_values || [];
  if (!values.some((v) => v !== null && v !== undefined)) return null;
  const box = document.createElement("div");
  box.className = "cachekit-probes";
  const canvas = document.createElement("canvas");
  const bar = Math.max(3, Math.min(10, Math.floor(300 / Math.max(1, t.num_steps))));
  canvas.width = t.num_steps * bar;
  canvas.height = 40;
  const ctx = canvas.getContext("2d");
  const top = Math.max(...values.filter((v) => v !== null && isFinite(v)), 1e-9);
  values.forEach((v, step) => {
    if (v === null || v === undefined) return;
    const reused = (t.step_hit_rates[step] || 0) > 0 || (t.skipped_steps || []).includes(step);
    ctx.fillStyle = reused ? "#50c88c" : "#8a8a8a";
    const h = Math.max(1, Math.round(Math.min(1, v / top) * 40));
    ctx.fillRect(step * bar, 40 - h, bar - 1, h);
  });
  const text = document.createElement("div");
  text.className = "cachekit-probe-values";
  text.style.cssText = "font-size:10px;font-family:monospace;word-break:break-all;opacity:.8";
  text.textContent = values.map((v, step) => `${step}:${v === null || v === undefined ? "-" : v.toPrecision(3)}`).join(" ");
  box.append(canvas, text);
  return box;
}

function runCard(record) {
  const t = record.telemetry;
  const card = document.createElement("div");
  card.className = "cachekit-run";
  card.dataset.runId = record.id;
  card.dataset.nodeId = record.node_id ?? "";
  card.style.cssText = "border:1px solid var(--border-color,#444);border-radius:6px;padding:8px;margin:8px 0";
  const title = document.createElement("div");
  title.style.fontWeight = "bold";
  const node = record.node_id && app.graph ? app.graph.getNodeById(record.node_id) : null;
  const where = node ? node.title : t.family;
  // A run that samples part of a schedule (Wan 2.2's two experts): its steps in the whole one.
  const [first, end] = t.run_steps || [0, t.num_steps];
  title.textContent = (where.startsWith(t.method) ? where : `${t.method} · ${where}`)
    + (record.node_id ? ` #${record.node_id}` : "")
    + (first !== 0 || end !== t.num_steps ? ` · steps ${first}–${end - 1} of ${t.num_steps}` : "")
    + (record.finished ? "" : " · sampling…");
  const stats = document.createElement("div");
  stats.className = "cachekit-stats";
  stats.innerHTML =
    `hit rate <b class="cachekit-hit-rate">${pct(t.hit_rate)}</b> · speedup ` +
    `<b>${times(t.measured_speedup)}</b> measured, <b>${times(t.ideal_speedup)}</b> estimated` +
    (t.skipped_steps && t.skipped_steps.length ? ` · skipped steps ${t.skipped_steps.join(", ")}` : "") +
    // Memory the run's cache held (peak; at the end of the run when it differs), freed when the run ends.
    (t.cache_bytes ? ` · cache <b class="cachekit-cache-bytes">${fmtBytes(t.cache_bytes)}</b>` +
      (t.cache_bytes_end && t.cache_bytes_end !== t.cache_bytes ? ` (${fmtBytes(t.cache_bytes_end)} at end)` : "") : "");
  const label = (text) => { const d = document.createElement("div"); d.style.cssText = "font-size:11px;opacity:.7;margin-top:6px"; d.textContent = text; return d; };
  // Guard notes (few steps, a noise-injecting sampler): what CacheKit did differently and why.
  const notes = (t.notes || []).map((text) => {
    const note = document.createElement("div");
    note.className = "cachekit-note";
    note.style.cssText = "margin-top:6px;padding:4px 6px;border-left:3px solid #e0a030;font-size:11px;background:rgba(224,160,48,.12)";
    note.textContent = text;
    return note;
  });
  card.append(title, stats, ...notes, label("per step (orange = whole step skipped)"), stepBars(t),
              label("step × block (bright = reused)"), heatmapCanvas(t));
  const probes = probeChart(t);
  if (probes) card.append(label(`decision value per step: ${t.probe_label || "probe"} (green = reused)`), probes);
  return card;
}

function render(el) {
  panel = el;
  el.replaceChildren();
  const root = document.createElement("div");
  root.id = "cachekit-sidebar";
  root.style.cssText = "padding:10px;overflow-y:auto;height:100%";
  const head = document.createElement("h3");
  head.textContent = "CacheKit hit rates";
  root.append(head);
  if (!runs.size) {
    const empty = document.createElement("p");
    empty.textContent = "No CacheKit run yet: add a CacheKit node before your KSampler and queue a prompt.";
    root.append(empty);
  }
  [...runs.values()].reverse().forEach((record) => root.append(runCard(record)));
  el.append(root);
}

async function refreshRuns(limit) {
  try {
    const response = await api.fetchApi(limit ? `/cachekit/runs?limit=${limit}` : "/cachekit/runs");
    if (response.ok) (await response.json()).runs.forEach(remember);
  } catch (error) {
    console.warn("CacheKit: could not load recent runs", error);
  }
}

app.registerExtension({
  name: "CacheKit.HitRates",
  async setup() {
    api.addEventListener("cachekit.progress", (e) => remember(e.detail));
    api.addEventListener("cachekit.run", (e) => {
      remember(e.detail);
      // The FLOP estimate of a model's first run is measured after the run, on request
      // (never inside the sampling): ask for it once the run has ended.
      if (e.detail.telemetry && e.detail.telemetry.ideal_speedup == null) refreshRuns(4);
    });
    app.extensionManager.registerSidebarTab({
      id: "cachekit",
      icon: "pi pi-bolt",
      title: "CacheKit",
      tooltip: "CacheKit: cache hit rates",
      type: "custom",
      render: (el) => render(el),
    });
    await refreshRuns();
  },
  nodeCreated(node) {
    if (!(node.comfyClass || "").startsWith("CacheKit")) return;
    node.cachekitBadge = new HitRateBadge(node);
    node.badges.push(() => node.cachekitBadge);
  },
});
