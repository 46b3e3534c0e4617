// Shared by the dashboards (/, /business, /partner): the API call with the bearer token, escaping,
// number formats, the status line, uPlot line charts, top-N bar lists and calendar months (UTC).
"use strict";
const COLORS = ["#2e6bd9", "#d9452e", "#1f9d55", "#9b51e0", "#e0a526", "#17a2b8", "#6c757d", "#e83e8c"];
const $ = (id) => document.getElementById(id);

// The bearer token the pages send: the #token field (remembered in this browser).
function initToken(storageKey, onChange) {
  const el = $("token");
  if (!el) return;
  el.value = localStorage.getItem(storageKey) || "";
  el.addEventListener("change", () => { localStorage.setItem(storageKey, el.value); onChange(); });
}

async function api(path) {
  const headers = {};
  const t = $("token") ? $("token").value.trim() : "";
  if (t) headers["Authorization"] = "Bearer " + t;
  const r = await fetch(path, { headers });
  let body = null;
  try { body = await r.json(); } catch (_) { /* not JSON: reported below */ }
  if (!r.ok) throw new Error((body && body.error && body.error.message) || `${r.status} ${r.statusText}`);
  return body;
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function fmt(n, digits) { return n == null || Number.isNaN(n) ? "–" : Number(n).toFixed(digits); }

function fmtInt(n) { return n == null ? "–" : Number(n).toLocaleString("en-US"); }

// Money as the API gives it (an exact decimal string), shown to the cent with its currency.
function fmtMoney(s, currency) {
  if (s == null) return "–";
  const n = Number(s);
  const digits = Math.abs(n) >= 100 ? 0 : Math.abs(n) >= 1 ? 2 : 4;
  return n.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits }) + (currency ? " " + currency : "");
}

function setStatus(error) {
  const el = $("status");
  el.className = error ? "err" : "";
  el.textContent = error ? "error: " + error.message : "updated " + new Date().toLocaleTimeString();
}

// A message in place of a panel's content: nothing to show, or the API's error.
function showEmpty(id, text) { $(id).innerHTML = `<div class="empty">${escapeHtml(text)}</div>`; }
function showError(id, e) { $(id).innerHTML = `<div class="error">${escapeHtml(e.message)}</div>`; }

// A uPlot line chart in element `id`, redrawn in place when its series stay the same.
// `data` is [xs, ys...] (xs in unix seconds when `time`), `labels` one per y series.
const charts = {};
function lineChart(id, labels, data, unit, { time = true, height = 220, xValues } = {}) {
  const el = $(id);
  const key = labels.join("|");
  if (charts[id] && charts[id]._key === key) { charts[id].setData(data); return; }
  charts[id]?.destroy();
  el.innerHTML = "";
  const x = xValues ? { values: xValues } : {};
  const opts = {
    width: el.clientWidth || 560, height,
    scales: { x: { time } },
    axes: [x, { size: 80, values: (u, vals) => vals.map((v) => v == null ? "" : v + unit) }],
    series: [{}].concat(labels.map((l, i) => ({ label: l, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false }))),
  };
  charts[id] = new uPlot(opts, data, el);
  charts[id]._key = key;
}
function dropChart(id) { charts[id]?.destroy(); delete charts[id]; }

// The top `limit` items as horizontal bars, largest first, with how many were left out:
// items are {name, value, text}; a long list stays readable (10,000 consumers: the top ones).
function barList(id, items, limit = 10) {
  const sorted = items.slice().sort((a, b) => b.value - a.value || String(a.name).localeCompare(String(b.name)));
  const shown = sorted.slice(0, limit);
  const max = Math.max(...shown.map((i) => i.value), 0) || 1;
  $(id).innerHTML = '<div class="bars">' + shown.map((i) =>
    `<div class="row" data-name="${escapeHtml(i.name)}"><span class="name" title="${escapeHtml(i.name)}">${escapeHtml(i.name)}</span>` +
    `<span class="track"><span class="fill" style="display:block;width:${(100 * Math.max(i.value, 0) / max).toFixed(1)}%"></span></span>` +
    `<span class="val">${escapeHtml(i.text)}</span></div>`).join("") +
    (sorted.length > limit ? `<div class="more">and ${sorted.length - limit} more</div>` : "") + "</div>";
}

// Calendar month `offset` months from the current one (UTC): {from, to} in ms and its name.
function month(offset) {
  const now = new Date();
  const from = Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + offset, 1);
  const to = Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + offset + 1, 1);
  return { from, to, name: new Date(from).toISOString().slice(0, 7) };
}
