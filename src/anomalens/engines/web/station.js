// The station's review page: pick a product, work through the review queue with the keyboard, browse the
// history, and see the score histogram and the false-alarm rate measured by review. Plain DOM, no network
// access beyond this server; text from the server is only ever set as textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { product: null, alpha: null, mode: "queue", items: [], index: 0, current: null };

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) { window.location.href = "/login"; throw new Error("API key needed"); }
  if (!response.ok) { throw new Error(body.error || `HTTP ${response.status}`); }
  return body;
}

function say(message) {
  const box = $("messages");
  box.textContent = "";
  if (message) { const line = document.createElement("p"); line.textContent = message; box.appendChild(line); }
}

function when(iso) { return iso ? `${iso.replace("T", " ").slice(0, 19)} UTC` : "–"; }

function number(value, digits = 4) { return value === null || value === undefined ? "–" : Number(value).toPrecision(digits); }

// ------------------------------------------------------------------------------------------------ products
async function loadProducts() {
  const { detectors } = await api("/v1/detectors");
  const select = $("product");
  select.textContent = "";
  for (const item of detectors) {
    const option = document.createElement("option");
    option.value = item.name;
    option.textContent = `${item.name} (v${item.version})`;
    option.dataset.alpha = item.alpha;
    option.dataset.info = `${item.method}, threshold ${number(item.threshold)} (${item.threshold_source}), α ${number(item.alpha, 3)}`;
    select.appendChild(option);
  }
  const saved = localStorage.getItem("anomalens-product");
  if (saved && detectors.some((item) => item.name === saved)) { select.value = saved; }
  if (!detectors.length) { say("No products in the models directory: add one with anomalens models add."); return; }
  await chooseProduct();
}

async function chooseProduct() {
  const option = $("product").selectedOptions[0];
  state.product = option.value;
  state.alpha = Number(option.dataset.alpha);
  $("product-info").textContent = option.dataset.info;
  localStorage.setItem("anomalens-product", state.product);
  await showTab(state.mode);
}

// ------------------------------------------------------------------------------------------------ tabs
const TABS = { queue: "tab-queue", list: "tab-list", stats: "tab-stats" };

async function showTab(mode) {
  state.mode = mode;
  for (const [name, id] of Object.entries(TABS)) {
    const selected = name === mode;
    $(id).setAttribute("aria-selected", String(selected));
    $(id).tabIndex = selected ? 0 : -1;
    $(`view-${name}`).hidden = !selected;
  }
  $("viewer").hidden = true;
  say("");
  try {
    if (mode === "queue") { await loadQueue(); }
    if (mode === "list") { await loadList(); }
    if (mode === "stats") { await loadStats(); }
  } catch (error) { say(error.message); }
}

// ------------------------------------------------------------------------------------------------ the queue
async function loadQueue() {
  const body = await api(`/v1/detectors/${encodeURIComponent(state.product)}/queue?limit=200`);
  state.items = body.queue;
  state.index = 0;
  const band = body.band.map((value) => number(value, 3)).join("–");
  $("queue-status").textContent = state.items.length
    ? `${state.items.length} to review: p-values in the uncertain band ${band} and the random audit sample.`
    : "Nothing to review: the queue is empty.";
  showCurrent();
}

function showCurrent() {
  const item = state.items[state.index];
  if (!item) { $("viewer").hidden = true; return; }
  show(item);
}

function show(item) {
  state.current = item;
  const viewer = $("viewer");
  viewer.hidden = false;
  viewer.className = item.label || "";
  const position = state.mode === "queue" ? ` (${state.index + 1} of ${state.items.length})` : "";
  $("viewer-title").textContent = `#${item.id} ${item.image_name || ""}${position}`;
  const parts = [`detector: ${item.label || "no threshold"} (score ${number(item.score)} vs ` +
    `${number(item.threshold)}, p ${number(item.p_value, 3)})`, `version ${item.version}`, when(item.created_at),
    item.source];
  if (state.mode === "queue") { parts.push(item.audit ? "audit sample" : "uncertain band"); }
  if (item.review_verdict) { parts.push(`reviewed ${item.review_verdict} by ${item.reviewer} ${when(item.reviewed_at)}`); }
  $("viewer-meta").textContent = parts.join("; ");
  $("viewer-image").src = item.image_kept ? `/v1/inspections/${item.id}/image` : "";
  $("viewer-overlay").src = item.overlay_kept ? `/v1/inspections/${item.id}/overlay` : "";
  const regions = $("viewer-regions");
  regions.textContent = "";
  for (const region of item.regions || []) {
    const entry = document.createElement("li");
    entry.textContent = `box ${region.box.join(", ")}: ${region.area} px, peak ${number(region.peak)}`;
    regions.appendChild(entry);
  }
  $("accept").disabled = $("overrule").disabled = !item.label;
  $("note").value = item.review_note || "";
}

async function review(verdict) {
  const item = state.current;
  const reviewer = $("reviewer").value.trim();
  if (!item) { return; }
  if (!reviewer) { say("Type your name as the reviewer first."); $("reviewer").focus(); return; }
  localStorage.setItem("anomalens-reviewer", reviewer);
  const form = new FormData();
  form.append("verdict", verdict);
  form.append("reviewer", reviewer);
  if ($("note").value.trim()) { form.append("note", $("note").value.trim()); }
  try {
    const updated = await api(`/v1/inspections/${item.id}/review`, { method: "POST", body: form });
    say("");
    $("queue-status").textContent = `#${item.id} reviewed ${verdict}.`;
    if (state.mode === "queue") {
      state.items.splice(state.index, 1);
      if (state.index >= state.items.length) { state.index = Math.max(0, state.items.length - 1); }
      showCurrent();
      if (!state.items.length) { $("queue-status").textContent = `#${item.id} reviewed ${verdict}. The queue is empty.`; }
    } else {
      show({ ...item, ...updated });
      await loadList(false);
    }
  } catch (error) { say(error.message); }
}

const opposite = (label) => (label === "anomalous" ? "normal" : "anomalous");

function step(delta) {
  if (state.mode !== "queue" || !state.items.length) { return; }
  state.index = (state.index + delta + state.items.length) % state.items.length;
  showCurrent();
}

// ------------------------------------------------------------------------------------------------ the history
async function loadList(resetViewer = true) {
  const query = new URLSearchParams({ product: state.product, limit: "200" });
  for (const [key, id] of [["label", "filter-label"], ["reviewed", "filter-reviewed"], ["verdict", "filter-verdict"]]) {
    if ($(id).value) { query.set(key, $(id).value); }
  }
  if ($("filter-since").value) { query.set("since", new Date($("filter-since").value).toISOString()); }
  const { inspections } = await api(`/v1/inspections?${query}`);
  const body = $("list-body");
  body.textContent = "";
  for (const item of inspections) {
    const row = document.createElement("tr");
    row.tabIndex = 0;
    for (const value of [item.id, when(item.created_at), number(item.score),
      item.label || "–", number(item.p_value, 3), item.review_verdict ? `${item.review_verdict} (${item.reviewer})` : "–",
      item.image_name || ""]) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.appendChild(cell);
    }
    const open = () => show(item);
    row.addEventListener("click", open);
    row.addEventListener("keydown", (event) => { if (event.key === "Enter") { event.stopPropagation(); open(); } });
    body.appendChild(row);
  }
  $("list-caption").textContent = `${inspections.length} inspection(s), newest first; Enter or a click opens one.`;
  if (resetViewer) { $("viewer").hidden = true; }
}

// ------------------------------------------------------------------------------------------------ statistics
async function loadStats() {
  const stats = await api(`/v1/detectors/${encodeURIComponent(state.product)}/stats`);
  drawHistogram(stats.histogram, stats.threshold);
  const alarms = stats.false_alarms;
  $("false-alarms").textContent = alarms.normal
    ? `${alarms.flagged} of ${alarms.normal} reviewed audit-sample parts confirmed good were flagged: ` +
      `${(100 * alarms.rate).toFixed(1)}% (95% interval ${(100 * alarms.low).toFixed(1)}–${(100 * alarms.high).toFixed(1)}%), ` +
      `against the promised ${(100 * alarms.alpha).toFixed(1)}%.`
    : `No reviewed audit-sample part confirmed good yet (promised rate ${(100 * alarms.alpha).toFixed(1)}%).`;
  const drift = await api(`/v1/detectors/${encodeURIComponent(state.product)}/drift`);
  drawDrift(drift);
  const names = { passing: "passing parts", all: "all parts" };
  const lines = Object.entries(drift.streams).map(([name, stream]) => {
    const alarm = stream.alarm_record;
    return alarm
      ? `DRIFT ALARM (${names[name]}): the martingale reached ${number(alarm.martingale)} ≥ ${number(stream.bound)} ` +
        `after ${alarm.observations} parts (inspection #${alarm.inspection_id}, ${when(alarm.raised_at)}).`
      : `${names[name]}: martingale ${number(stream.martingale)} after ${stream.observations} parts, alarm at ` +
        `${number(stream.bound)}.`;
  });
  lines.push(drift.alarm
    ? `Version ${drift.version} has drifted. Without drift this happens with probability at most δ = ${drift.delta}.`
    : `No drift alarm on version ${drift.version} (on a line that does not drift, one is ever raised with ` +
      `probability at most δ = ${drift.delta}).`);
  $("drift-status").textContent = lines.join(" ");
  $("drift-status").classList.toggle("alarm", drift.alarm);
}

const STREAM_COLOURS = { passing: "#2e86c1", all: "#8e44ad" };

function drawDrift(drift) {
  const svg = $("drift");
  for (const child of [...svg.children]) { if (child.tagName !== "title") { child.remove(); } }
  const streams = Object.entries(drift.streams);
  const logs = streams.map(([, stream]) => stream.martingale_series.map((value) => Math.log10(Math.max(value, 1e-12))));
  const bound = Math.log10(streams[0][1].bound);
  const width = 640, height = 140, top = Math.max(bound + 0.5, ...logs.flat());
  const bottom = Math.min(-1, ...logs.flat());
  const y = (value) => height - ((value - bottom) / (top - bottom)) * height;
  const make = (tag, attributes) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attributes)) { node.setAttribute(key, value); }
    svg.appendChild(node);
    return node;
  };
  make("line", { x1: 0, x2: width, y1: y(bound), y2: y(bound), stroke: "#c0392b", "stroke-dasharray": "6 4" });
  make("text", { x: width, y: y(bound) - 4, fill: "#c0392b", "text-anchor": "end" }).textContent =
    `alarm: 2/δ = ${number(streams[0][1].bound, 3)}`;
  make("text", { x: 0, y: 156, fill: "#5d6d7e" }).textContent = "parts →  (blue: passing parts; purple: all parts)";
  streams.forEach(([name], index) => {
    const values = logs[index];
    if (values.length < 2) { return; }
    const x = (position) => (position / (values.length - 1)) * width;
    make("polyline", { points: values.map((value, position) => `${x(position)},${y(value)}`).join(" "), fill: "none",
      stroke: STREAM_COLOURS[name], "stroke-width": 2, "data-stream": name, "data-points": String(values.length) });
  });
}

function drawHistogram(histogram, threshold) {
  const svg = $("histogram");
  for (const child of [...svg.children]) { if (child.tagName !== "title") { child.remove(); } }
  const { edges, counts } = histogram;
  if (!counts.length) { return; }
  const width = 640, height = 200, left = edges[0], right = edges[edges.length - 1];
  const x = (value) => ((value - left) / (right - left || 1)) * width;
  const tallest = Math.max(...counts, 1);
  const make = (tag, attributes) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attributes)) { node.setAttribute(key, value); }
    svg.appendChild(node);
    return node;
  };
  counts.forEach((count, index) => {
    const bar = make("rect", { x: x(edges[index]), width: Math.max(1, x(edges[index + 1]) - x(edges[index]) - 1),
      y: height - (count / tallest) * height, height: (count / tallest) * height, fill: "#5d6d7e" });
    const tip = document.createElementNS("http://www.w3.org/2000/svg", "title");
    tip.textContent = `${count} score(s) in [${number(edges[index])}, ${number(edges[index + 1])})`;
    bar.appendChild(tip);
  });
  make("text", { x: 0, y: 216, fill: "#5d6d7e" }).textContent = number(left);
  make("text", { x: width, y: 216, fill: "#5d6d7e", "text-anchor": "end" }).textContent = number(right);
  if (threshold !== null && threshold !== undefined) {
    make("line", { x1: x(threshold), x2: x(threshold), y1: 0, y2: height, stroke: "#c0392b", "stroke-width": 2 });
    make("text", { x: Math.min(x(threshold) + 4, width - 120), y: 14, fill: "#c0392b" }).textContent =
      `threshold ${number(threshold)}`;
  }
}

// ------------------------------------------------------------------------------------------------ wiring
function typing(event) {
  const tag = event.target.tagName;
  return tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA";
}

document.addEventListener("keydown", (event) => {
  if (typing(event) || event.ctrlKey || event.metaKey || event.altKey) { return; }
  const item = state.current;
  const key = event.key.toLowerCase();
  if (key === "enter" && event.target.closest("button, a, tr, [role=tab]")) { return; }  // its own click acts
  if (!$("viewer").hidden && item) {
    if ((key === "a" || key === "enter") && item.label) { event.preventDefault(); review(item.label); return; }
    if (key === "o" && item.label) { event.preventDefault(); review(opposite(item.label)); return; }
    if (key === "g") { event.preventDefault(); review("normal"); return; }
    if (key === "d") { event.preventDefault(); review("anomalous"); return; }
  }
  if (key === "s" || event.key === "ArrowRight") { event.preventDefault(); step(1); }
  if (event.key === "ArrowLeft") { event.preventDefault(); step(-1); }
});

for (const [name, id] of Object.entries(TABS)) {
  $(id).addEventListener("click", () => showTab(name));
  $(id).addEventListener("keydown", (event) => {
    const names = Object.keys(TABS);
    const delta = event.key === "ArrowRight" ? 1 : event.key === "ArrowLeft" ? -1 : 0;
    if (delta) {
      event.preventDefault();
      event.stopPropagation();
      const next = names[(names.indexOf(name) + delta + names.length) % names.length];
      $(TABS[next]).focus();
      showTab(next);
    }
  });
}
$("product").addEventListener("change", chooseProduct);
$("accept").addEventListener("click", () => state.current && review(state.current.label));
$("overrule").addEventListener("click", () => state.current && review(opposite(state.current.label)));
$("mark-good").addEventListener("click", () => review("normal"));
$("mark-bad").addEventListener("click", () => review("anomalous"));
$("skip").addEventListener("click", () => step(1));
$("filters").addEventListener("submit", (event) => { event.preventDefault(); loadList().catch((error) => say(error.message)); });
$("reviewer").value = localStorage.getItem("anomalens-reviewer") || "";
loadProducts().catch((error) => say(error.message));
