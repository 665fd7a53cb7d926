// anomalens inspection page: plain JavaScript, no dependencies, nothing loaded from the internet.
"use strict";

// Each card is keyed by a unique id (never by file name: two files may share one) and remembers the detector
// generation that scored it; after a refit, older cards are marked stale and can be re-scored.
const state = { results: [], threshold: null, generation: 0, limits: null, nextId: 1 };
const $ = (id) => document.getElementById(id);

function message(text) {
  const line = document.createElement("p");
  line.textContent = text;
  $("messages").appendChild(line);
}

function clearMessages() { $("messages").replaceChildren(); }

async function describeDetector() {
  const response = await fetch("/v1/detector");
  const detector = await response.json();
  if (!response.ok) throw new Error(detector.error || `HTTP ${response.status}`);
  const threshold = detector.threshold == null ? "none yet" : Number(detector.threshold).toPrecision(4);
  $("detector").textContent = `${detector.method} · ${detector.fitted ? "fitted" : "not fitted"} · threshold ${threshold}` +
    (detector.threshold_source && detector.threshold_source !== "none" ? ` (${detector.threshold_source})` : "");
  state.limits = detector.limits;
  state.generation = detector.generation;
  if (detector.threshold != null) setThreshold(detector.threshold);
  return detector;
}

async function post(url, fields) {
  const form = new FormData();
  for (const [name, value] of fields) {
    if (value instanceof File) form.append(name, value, value.name); else form.append(name, value);
  }
  const response = await fetch(url, { method: "POST", body: form });
  let body;
  try { body = await response.json(); } catch { body = { error: `HTTP ${response.status}` }; }
  return { response, body };
}

// Split files into requests that respect the server's limits on files and bytes per request.
function batches(files) {
  const maxFiles = Math.min(state.limits ? state.limits.max_files : 16, 16);
  const maxBytes = state.limits ? state.limits.max_request_bytes * 0.9 : 64 * 2 ** 20;
  const groups = [];
  let group = [], bytes = 0;
  for (const file of files) {
    if (group.length && (group.length >= maxFiles || bytes + file.size > maxBytes)) { groups.push(group); group = []; bytes = 0; }
    group.push(file);
    bytes += file.size;
  }
  if (group.length) groups.push(group);
  return groups;
}

async function sendReferences(files) {
  clearMessages();
  const status = $("reference-status");
  status.textContent = `fitting on ${files.length} image(s)…`;
  try {
    const { response, body } = await post("/v1/references", [...files].map((file) => ["files", file]));
    for (const item of body.rejected || []) message(`Reference ${item.name} not used: ${item.error}`);
    if (!response.ok && response.status !== 202) throw new Error(body.error || `HTTP ${response.status}`);
    let job = body.job;
    while (job.status === "queued" || job.status === "running") {
      status.textContent = `fitting: step ${job.done} of ${job.total || "?"}…`;
      await new Promise((resolve) => setTimeout(resolve, 500));
      const polled = await fetch(`/v1/jobs/${job.id}`);
      job = await polled.json();
    }
    if (job.status !== "succeeded") throw new Error(`refit ${job.status}: ${job.error}`);
    status.textContent = `fitted on ${job.references} reference image(s)`;
    await describeDetector();
    markStale();
  } catch (error) {
    status.textContent = "";
    message(`References not used: ${error.message}`);
  }
}

function markStale() {
  const stale = state.results.filter((result) => result.generation < state.generation);
  $("rescore").hidden = stale.length === 0;
  if (stale.length) message(`${stale.length} result(s) were scored before the refit and are marked stale; press "Re-score stale" to update them.`);
  render();
}

async function scoreFiles(files, replacing) {
  const groups = batches(files);
  let done = 0, scored = 0;
  for (const group of groups) {
    $("test-status").textContent = `scoring ${done + 1}–${done + group.length} of ${files.length}…`;
    const { response, body } = await post("/v1/predict", [...group.map((file) => ["files", file]), ["include_maps", "true"]]);
    for (const item of body.rejected || []) message(`Not scored: ${item.name}: ${item.error}`);
    if (!response.ok) { message(`Batch of ${group.length} not scored: ${body.error || response.status}`); done += group.length; continue; }
    for (const result of body.results) {
      const file = group[result.index];
      const previous = replacing ? replacing.get(file) : null;
      const entry = { ...result, id: previous ? previous.id : state.nextId++, file, generation: body.generation,
        image: previous ? previous.image : URL.createObjectURL(file) };
      if (previous) state.results[state.results.indexOf(previous)] = entry; else state.results.push(entry);
      scored += 1;
    }
    done += group.length;
  }
  return scored;
}

async function sendTests(files) {
  clearMessages();
  try {
    await scoreFiles([...files], null);
    $("test-status").textContent = `${state.results.length} image(s) scored`;
    if (state.threshold == null && state.results.length) {
      const labelled = state.results.find((result) => result.threshold != null);
      state.threshold = labelled ? labelled.threshold : median(state.results.map((r) => r.score));
    }
    updateSlider();
    render();
  } catch (error) {
    $("test-status").textContent = "";
    message(`Not scored: ${error.message}`);
  }
}

async function rescoreStale() {
  const stale = state.results.filter((result) => result.generation < state.generation);
  const replacing = new Map(stale.map((result) => [result.file, result]));
  await scoreFiles(stale.map((result) => result.file), replacing);
  $("rescore").hidden = !state.results.some((result) => result.generation < state.generation);
  $("test-status").textContent = `${state.results.length} image(s) scored`;
  updateSlider();
  render();
}

async function downloadRawMap(result) {
  const { response, body } = await post("/v1/predict", [["files", result.file], ["include_maps", "false"], ["include_raw_map", "true"]]);
  if (!response.ok || !body.results.length) { message(`Raw map of ${result.name} not available: ${body.error || response.status}`); return; }
  const scored = body.results[0];
  const link = document.createElement("a");
  link.href = `data:image/png;base64,${scored.map_png}`;
  link.download = `${result.name.replace(/\.[^.]*$/, "")}-map-x${scored.map_scale_max.toPrecision(6)}.png`;
  document.body.appendChild(link);
  link.click();
  link.remove();
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted.length ? sorted[Math.floor(sorted.length / 2)] : 0.5;
}

function setThreshold(value) {
  state.threshold = Number(value);
  updateSlider();
}

// The slider spans every score and the threshold, with a margin, so it can label all or none.
function updateSlider() {
  if (state.threshold == null) return;
  const slider = $("threshold");
  const values = state.results.map((result) => result.score).concat([state.threshold]);
  const low = Math.min(...values), high = Math.max(...values);
  const margin = (high - low) * 0.05 || Math.abs(high) * 0.05 || 0.05;
  slider.min = String(low - margin);
  slider.max = String(high + margin);
  slider.step = String((high - low + 2 * margin) / 500);
  slider.value = String(state.threshold);
  slider.disabled = false;
  $("threshold-value").textContent = state.threshold.toPrecision(4);
}

function label(result) { return result.score > state.threshold ? "anomalous" : "normal"; }

function render() {
  const list = $("results");
  const sorted = [...state.results].sort((a, b) => b.score - a.score);
  list.replaceChildren(...sorted.map((result) => card(result)));
  const current = state.results.filter((result) => result.generation >= state.generation);
  const flagged = current.filter((result) => label(result) === "anomalous").length;
  const stale = state.results.length - current.length;
  $("counts").textContent = `${flagged} of ${current.length} flagged` + (stale ? `, ${stale} stale` : "");
  $("download").disabled = state.results.length === 0;
}

function card(result) {
  const item = document.createElement("li");
  const stale = result.generation < state.generation;
  const verdict = stale ? "stale" : label(result);
  item.className = `card ${verdict}`;
  item.dataset.id = String(result.id);
  item.tabIndex = 0;
  item.setAttribute("aria-label", `${result.name}: score ${result.score.toPrecision(4)}, ${verdict}`);
  const pair = document.createElement("div");
  pair.className = "pair";
  const image = document.createElement("img");
  image.src = result.image;
  image.alt = `${result.name}`;
  const heatmap = document.createElement("img");
  heatmap.src = `data:image/jpeg;base64,${result.heatmap_jpeg}`;
  heatmap.alt = `heatmap of ${result.name}`;
  heatmap.className = "heatmap";
  pair.append(image, heatmap);
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.innerHTML = `<span class="name"></span><span class="score"></span><span class="badge ${verdict}">${verdict}</span>`;
  meta.querySelector(".name").textContent = result.name;
  meta.querySelector(".score").textContent = result.score.toPrecision(4);
  item.append(pair, meta);
  item.addEventListener("click", () => openViewer(result));
  item.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") { event.preventDefault(); openViewer(result); } });
  return item;
}

function openViewer(result) {
  const verdict = result.generation < state.generation ? "stale (scored before the refit)" : label(result);
  $("viewer-title").textContent = `${result.name} · score ${result.score.toPrecision(4)} · ${verdict}`;
  state.viewing = result;
  $("viewer-image").src = result.image || "";
  $("viewer-image").alt = result.name;
  $("viewer-heatmap").src = `data:image/jpeg;base64,${result.heatmap_jpeg}`;
  $("viewer-heatmap").alt = `heatmap of ${result.name}`;
  $("viewer").showModal();
  $("viewer-close").focus();
}

function csvField(value) {
  const text = value == null ? "" : String(value);
  return /[",\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

function downloadCsv() {
  const rows = [["name", "score", "label", "threshold"]];
  for (const result of [...state.results].sort((a, b) => b.score - a.score)) {
    rows.push([result.name, result.score, result.generation < state.generation ? "stale" : label(result), state.threshold]);
  }
  const blob = new Blob([rows.map((row) => row.map(csvField).join(",")).join("\n") + "\n"], { type: "text/csv" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "anomalens-results.csv";
  document.body.appendChild(link);
  link.click();
  link.remove();
}

function wireDrop(zoneId, inputId, handler) {
  const zone = $(zoneId), input = $(inputId);
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); } });
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer.files.length) handler(event.dataTransfer.files);
  });
  input.addEventListener("change", () => { if (input.files.length) handler(input.files); input.value = ""; });
}

wireDrop("reference-drop", "reference-input", sendReferences);
wireDrop("test-drop", "test-input", sendTests);
function onSlider(event) {
  state.threshold = Number(event.target.value);
  $("threshold-value").textContent = state.threshold.toPrecision(4);
  render();
}
$("threshold").addEventListener("input", onSlider); // while dragging
$("threshold").addEventListener("change", onSlider); // keyboard (Home, End, arrows) in every browser
$("download").addEventListener("click", downloadCsv);
$("viewer-close").addEventListener("click", () => $("viewer").close());
$("viewer-raw").addEventListener("click", () => downloadRawMap(state.viewing));
$("rescore").addEventListener("click", rescoreStale);
describeDetector().catch((error) => message(`Cannot reach the server: ${error.message}`));
