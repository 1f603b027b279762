// The dinodet page: uploads images to POST /v1/detect (all detections, threshold 0) and shows those above
// the slider's threshold, so moving the slider needs no new request.  No external resources (see the CSP).
"use strict";

const state = { key: "", results: [] };  // results: {article, image, answer, started, elapsed}
const $ = (id) => document.getElementById(id);
const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46a0a0", "#f032e6", "#8a9a1b",
                 "#c05a5a", "#008080", "#9a6324", "#800000", "#2f4f4f", "#000075", "#b8860b", "#6a5acd"];

function colour(categoryId) { return PALETTE[((categoryId % PALETTE.length) + PALETTE.length) % PALETTE.length]; }
function threshold() { return Number($("threshold").value); }
function headers() { return state.key ? { "Authorization": "Bearer " + state.key } : {}; }

function say(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error || response.statusText;
  } catch (e) {
    return response.statusText || String(response.status);
  }
}

async function loadModel() {
  const response = await fetch("/v1/model", { headers: headers() });
  if (response.status === 401) {
    $("key-row").hidden = false;
    $("model-info").textContent = "this service needs an API key";
    return false;
  }
  if (!response.ok) {
    $("model-info").textContent = "model description unavailable: " + await errorText(response);
    return false;
  }
  const info = await response.json();
  $("model-info").textContent = `model: ${info.preset} (${info.backend}, ${info.device}, ${info.mode}), ` +
    `${info.classes.length} classes, resize ${info.input.resize.size}/${info.input.resize.max_size}, ` +
    `uploads up to ${info.input.max_image_mb} MB`;
  return true;
}

function loadImage(file) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the browser cannot show this file as an image"));
    image.src = URL.createObjectURL(file);
  });
}

async function detect(file) {
  const article = $("result-template").content.firstElementChild.cloneNode(true);
  article.querySelector(".name").textContent = file.name;
  $("results").prepend(article);
  const entry = { article, image: null, answer: null, elapsed: 0 };
  state.results.push(entry);
  const form = new FormData();
  form.append("image", file, file.name);
  const started = performance.now();
  try {
    const response = await fetch("/v1/detect?threshold=0", { method: "POST", body: form, headers: headers() });
    if (!response.ok) {
      if (response.status === 401) $("key-row").hidden = false;
      throw new Error(`${response.status}: ${await errorText(response)}`);
    }
    entry.answer = await response.json();
    entry.elapsed = performance.now() - started;
    try {
      entry.image = await loadImage(file);
    } catch (e) {
      entry.image = null;  // the server decoded it (e.g. a TIFF): the table still shows the detections
    }
    render(entry);
    article.dataset.state = "done";
  } catch (e) {
    article.classList.add("failed");
    article.querySelector(".timing").textContent = "failed: " + e.message;
    article.dataset.state = "failed";
    say(`${file.name}: ${e.message}`, true);
  }
}

function render(entry) {
  const { article, image, answer } = entry;
  const t = threshold();
  const shown = answer.detections.filter((d) => d.score > t);  // the server's rule: score > threshold
  const [h, w] = answer.image_size;
  const canvas = article.querySelector("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  if (image) ctx.drawImage(image, 0, 0, w, h);
  const line = Math.max(2, Math.round(Math.max(w, h) / 320));
  ctx.lineWidth = line;
  ctx.font = `${Math.max(12, Math.round(Math.max(w, h) / 45))}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  for (const d of shown) {
    const [x0, y0, x1, y1] = d.bbox;
    ctx.strokeStyle = colour(d.category_id);
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    const label = `${d.class_name} ${d.score.toFixed(2)}`;
    const pad = 3;
    const tw = ctx.measureText(label).width + 2 * pad;
    const th = parseInt(ctx.font, 10) + 2 * pad;
    const ty = y0 - th >= 0 ? y0 - th : y0;
    ctx.fillStyle = colour(d.category_id);
    ctx.fillRect(x0, ty, tw, th);
    ctx.fillStyle = "#fff";
    ctx.fillText(label, x0 + pad, ty + pad);
  }
  canvas.setAttribute("aria-label", `${article.querySelector(".name").textContent}: ${shown.length} boxes drawn`);
  const body = article.querySelector("tbody");
  body.replaceChildren(...shown.map((d, i) => {
    const row = document.createElement("tr");
    row.dataset.score = String(d.score);
    row.dataset.bbox = JSON.stringify(d.bbox);
    row.dataset.categoryId = String(d.category_id);
    const cells = [String(i + 1), d.class_name, d.score.toFixed(3), d.bbox.map((v) => v.toFixed(1)).join(", ")];
    for (const [k, text] of cells.entries()) {
      const cell = document.createElement("td");
      if (k === 1) {
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = colour(d.category_id);
        cell.append(swatch);
      }
      cell.append(text);
      row.append(cell);
    }
    return row;
  }));
  article.querySelector(".summary").textContent =
    `${shown.length} detection(s) with score > ${t.toFixed(2)} (of ${answer.detections.length}); image ${w}x${h}`;
  const ms = answer.timing_ms;
  article.querySelector(".timing").textContent =
    `server ${ms.total.toFixed(1)} ms (decode ${ms.decode.toFixed(1)}, queue ${ms.queue.toFixed(1)}, ` +
    `model ${ms.inference.toFixed(1)} in a batch of ${answer.batch_size}); round trip ${entry.elapsed.toFixed(0)} ms`;
}

async function handleFiles(files) {
  const images = Array.from(files).filter((f) => !f.type || f.type.startsWith("image/"));
  if (!images.length) {
    say("no image among the files", true);
    return;
  }
  say(`detecting objects in ${images.length} image(s)…`);
  await Promise.all(images.map(detect));
  const failed = state.results.filter((r) => r.article.dataset.state === "failed").length;
  if (!failed) say(`done: ${images.length} image(s)`);
}

function setUp() {
  const slider = $("threshold");
  slider.addEventListener("input", () => {
    $("threshold-value").textContent = threshold().toFixed(2);
    for (const entry of state.results) if (entry.answer) render(entry);
  });
  $("file-input").addEventListener("change", (event) => {
    handleFiles(event.target.files);
    event.target.value = "";  // choosing the same file again is a new request
  });
  const zone = $("drop-zone");
  for (const kind of ["dragenter", "dragover"]) {
    zone.addEventListener(kind, (event) => { event.preventDefault(); zone.classList.add("over"); });
  }
  for (const kind of ["dragleave", "drop"]) {
    zone.addEventListener(kind, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    handleFiles(event.dataTransfer.files);
  });
  $("retry").addEventListener("click", () => {
    state.key = $("api-key").value.trim();
    loadModel().then((ok) => { if (ok) { $("key-row").hidden = true; say("key accepted"); } });
  });
  $("api-key").addEventListener("keydown", (event) => { if (event.key === "Enter") $("retry").click(); });
  loadModel().catch((e) => say("cannot reach the service: " + e.message, true));
}

document.addEventListener("DOMContentLoaded", setUp);
