// anomalens inspection page: plain JavaScript, no dependencies, nothing loaded from the internet.
"use strict";

const state = { results: [], threshold: null };
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
  const threshold = detector.threshold == null ? "none yet" : Number(detector.threshold).toPrecision(4);
  $("detector").textContent = `${detector.method} · ${detector.fitted ? "fitted" : "not fitted"} · threshold ${threshold}` +
    (detector.threshold_source && detector.threshold_source !== "none" ? ` (${detector.threshold_source})` : "");
  if (detector.threshold != null) setThreshold(detector.threshold);
  return detector;
}

async function upload(url, files) {
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  const response = await fetch(url, { method: "POST", body: form });
  let body;
  try { body = await response.json(); } catch { body = { error: `HTTP ${response.status}` }; }
  for (const item of body.rejected || []) message(`Rejected ${item.name}: ${item.error}`);
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

async function sendReferences(files) {
  clearMessages();
  $("reference-status").textContent = `fitting on ${files.length} image(s)…`;
  try {
    const body = await upload("/v1/references", files);
    $("reference-status").textContent = `fitted on ${body.references} reference image(s)`;
    await describeDetector();
  } catch (error) {
    $("reference-status").textContent = "";
    message(`References not used: ${error.message}`);
  }
}

async function sendTests(files) {
  clearMessages();
  $("test-status").textContent = `scoring ${files.length} image(s)…`;
  const originals = new Map([...files].map((file) => [file.name, URL.createObjectURL(file)]));
  try {
    const body = await upload("/v1/predict", files);
    for (const result of body.results) {
      result.image = originals.get(result.name);
      state.results.push(result);
    }
    $("test-status").textContent = `${state.results.length} image(s) scored`;
    if (state.threshold == null) {
      const labelled = body.results.find((result) => result.threshold != null);
      state.threshold = labelled ? labelled.threshold : median(state.results.map((r) => r.score));
    }
    updateSlider();
    render();
  } catch (error) {
    $("test-status").textContent = "";
    message(`Not scored: ${error.message}`);
  }
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
  const flagged = state.results.filter((result) => label(result) === "anomalous").length;
  $("counts").textContent = `${flagged} of ${state.results.length} flagged`;
  $("download").disabled = state.results.length === 0;
}

function card(result) {
  const item = document.createElement("li");
  const verdict = label(result);
  item.className = `card ${verdict}`;
  item.tabIndex = 0;
  item.setAttribute("aria-label", `${result.name}: score ${result.score.toPrecision(4)}, ${verdict}`);
  const pair = document.createElement("div");
  pair.className = "pair";
  const image = document.createElement("img");
  image.src = result.image || `data:image/png;base64,${result.heatmap_png}`;
  image.alt = `${result.name}`;
  const heatmap = document.createElement("img");
  heatmap.src = `data:image/png;base64,${result.heatmap_png}`;
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
  $("viewer-title").textContent = `${result.name} · score ${result.score.toPrecision(4)} · ${label(result)}`;
  $("viewer-image").src = result.image || "";
  $("viewer-image").alt = result.name;
  $("viewer-heatmap").src = `data:image/png;base64,${result.heatmap_png}`;
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
    rows.push([result.name, result.score, label(result), state.threshold]);
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
describeDetector().catch((error) => message(`Cannot reach the server: ${error.message}`));
