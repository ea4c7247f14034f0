// The page at `/`: a client of the server's A1111 API (/sdapi/v1/...), nothing else. Plain script,
// no build step and nothing fetched from outside, so it works on an offline machine.
"use strict";

const API = "/sdapi/v1";
const $ = (id) => document.getElementById(id);
const state = { running: false, interrupted: false, lastSeed: null, maskStrokes: 0 };

// ------------------------------------------------------------------ the API
function errorText(data, status) {
  // A1111's error shape is {error, detail, body, errors}; FastAPI's 422 puts a list in detail.
  if (!data || typeof data !== "object") return `HTTP ${status}`;
  const detail = Array.isArray(data.detail)
    ? data.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ")
    : data.detail;
  const text = [data.error, data.errors || detail].filter(Boolean).join(": ");
  return text || `HTTP ${status}`;
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(API + path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (!response.ok) throw new Error(errorText(data, response.status));
  return data;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function setStatus(text) { $("status").textContent = text; }

// Base64 without the data: prefix (A1111 accepts both; raw is the common form).
const rawBase64 = (dataUrl) => dataUrl.slice(dataUrl.indexOf(",") + 1);

// ------------------------------------------------------------------ choices from the server
function fillSelect(select, items, keep) {
  for (const { value, label } of items) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = label;
    select.appendChild(option);
  }
  if (keep !== undefined && [...select.options].some((o) => o.value === keep)) select.value = keep;
}

async function loadSamplers() {
  const samplers = await api("/samplers");
  fillSelect($("sampler"), samplers.map((s) => ({ value: s.name, label: s.name })), "DPM++ 2M");
  const schedules = await api("/schedulers");
  const labels = schedules.map((s) => s.label).filter((l) => l !== "Automatic");
  fillSelect($("scheduler"), labels.map((l) => ({ value: l, label: l })));
}

async function loadModels() {
  const [models, options] = await Promise.all([api("/sd-models"), api("/options")]);
  const select = $("model");
  select.textContent = "";
  fillSelect(select, models.map((m) => ({ value: m.title, label: m.model_name || m.title })));
  const current = options && options.sd_model_checkpoint;
  if (current && ![...select.options].some((o) => o.value === current)) {
    fillSelect(select, [{ value: current, label: current }]);
  }
  if (current) select.value = current;
  select.dataset.current = select.value;
}

async function loadLoras() {
  const loras = await api("/loras");
  fillSelect($("lora"), loras.map((l) => ({ value: l.name, label: l.alias || l.name })));
}

async function switchModel() {
  const select = $("model");
  const title = select.value;
  select.disabled = $("generate").disabled = true;
  $("model_status").textContent = "loading…";
  try {
    await api("/options", { sd_model_checkpoint: title });
    select.dataset.current = title;
    $("model_status").textContent = "";
    showError("");
  } catch (e) {
    select.value = select.dataset.current || "";
    $("model_status").textContent = "";
    showError(`model ${title}: ${e.message}`);
  } finally {
    select.disabled = false;
    $("generate").disabled = state.running;
  }
}

function insertLora() {
  const select = $("lora");
  if (!select.value) return;
  const prompt = $("prompt");
  const tag = `<lora:${select.value}:1>`;
  prompt.value = prompt.value.trim() ? `${prompt.value.trimEnd()} ${tag}` : tag;
  select.value = "";
  prompt.focus();
}

// ------------------------------------------------------------------ the form
const mode = () => ($("mode_img2img").checked ? "img2img" : "txt2img");
const int = (id) => parseInt($(id).value, 10);
const num = (id) => parseFloat($(id).value);

function showMode() { $("img2img_panel").hidden = mode() !== "img2img"; }

function payload() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler").value,
    scheduler: $("scheduler").value,
    steps: int("steps"),
    cfg_scale: num("cfg_scale"),
    seed: Number.isFinite(int("seed")) ? int("seed") : -1,
    batch_size: int("batch_size") || 1,
    n_iter: 1,
  };
  if ($("width").value) body.width = int("width");
  if ($("height").value) body.height = int("height");
  if (mode() === "img2img") {
    const image = $("image_canvas");
    if ($("paint").classList.contains("empty")) throw new Error("choose an image for img2img first");
    body.init_images = [rawBase64(image.toDataURL("image/png"))];
    body.denoising_strength = num("denoising_strength");
    // without a size, the image's own (rounded down to the autoencoder's multiple of 8)
    body.width = body.width || Math.max(8, image.width - (image.width % 8));
    body.height = body.height || Math.max(8, image.height - (image.height % 8));
    const mask = maskDataUrl();
    if (mask) {
      Object.assign(body, {
        mask: rawBase64(mask),
        mask_blur: int("mask_blur") || 0,
        inpainting_fill: int("inpainting_fill"),
        inpaint_full_res: $("inpaint_full_res").value === "1",
        inpaint_full_res_padding: int("inpaint_full_res_padding") || 0,
        inpainting_mask_invert: 0,
      });
    }
  }
  return body;
}

// ------------------------------------------------------------------ generating
async function generate() {
  if (state.running) return;
  let body;
  try { body = payload(); } catch (e) { showError(e.message); return; }
  showError("");
  state.running = true;
  state.interrupted = false;
  $("generate").disabled = true;
  $("interrupt").disabled = $("skip").disabled = false;
  setProgress(0);
  setStatus("queued…");
  const started = performance.now();
  const polling = pollProgress();
  try {
    const result = await api(`/${mode()}`, body);
    const info = typeof result.info === "string" ? JSON.parse(result.info || "{}") : result.info || {};
    const shown = addResults(result.images || [], info);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(state.interrupted
      ? `interrupted: ${shown} image${shown === 1 ? "" : "s"} in ${seconds} s`
      : `done: ${shown} image${shown === 1 ? "" : "s"} in ${seconds} s`);
    setProgress(state.interrupted ? null : 1);
  } catch (e) {
    showError(e.message);
    setStatus(state.interrupted ? "interrupted" : "failed");
    setProgress(null);
  } finally {
    state.running = false;
    await polling;
    $("generate").disabled = $("model").disabled;
    $("interrupt").disabled = $("skip").disabled = true;
    $("preview").hidden = true;
  }
}

function setProgress(fraction) {
  const bar = $("progress_bar");
  bar.style.width = `${Math.round(100 * (fraction || 0))}%`;
  bar.dataset.progress = fraction == null ? "" : String(fraction);
}

async function pollProgress() {
  // One request at a time, every 0.4 s, until the generation answers.
  while (state.running) {
    try {
      const p = await api("/progress?skip_current_image=false");
      if (!state.running) break;
      const s = p.state || {};
      setProgress(p.progress);
      if (s.sampling_steps) {
        const eta = p.eta_relative > 0 ? ` · ${p.eta_relative.toFixed(1)} s left` : "";
        const job = s.job_count > 1 ? ` · image batch ${(s.job_no || 0) + 1}/${s.job_count}` : "";
        setStatus(`step ${s.sampling_step}/${s.sampling_steps}${job}${eta}`);
        $("progress").dataset.step = String(s.sampling_step);
      }
      if (p.current_image) {
        $("preview").src = `data:image/png;base64,${p.current_image}`;
        $("preview").hidden = false;
      }
    } catch (e) { /* a missed poll is not an error worth showing */ }
    await new Promise((resolve) => setTimeout(resolve, 400));
  }
}

async function interrupt() {
  state.interrupted = true;
  setStatus("interrupting…");
  try { await api("/interrupt", {}); } catch (e) { showError(e.message); }
}

async function skip() {
  try { await api("/skip", {}); } catch (e) { showError(e.message); }
}

function addResults(images, info) {
  const texts = info.infotexts || [];
  const seeds = info.all_seeds || [];
  // A1111 puts a grid first when a batch has several images; its infotexts cover the images only.
  const offset = Math.max(0, images.length - texts.length);
  const gallery = $("gallery");
  const items = images.slice(offset).map((b64, i) => {
    const seed = seeds[i] !== undefined ? seeds[i] : info.seed;
    return resultItem(`data:image/png;base64,${b64}`, texts[i] || "", seed);
  });
  for (const item of items.reverse()) gallery.prepend(item); // newest first, batch in order
  if (seeds.length) state.lastSeed = seeds[0];
  else if (info.seed !== undefined) state.lastSeed = info.seed;
  return items.length;
}

function resultItem(src, infotext, seed) {
  const figure = document.createElement("figure");
  figure.className = "result";
  if (seed !== undefined && seed !== null) figure.dataset.seed = String(seed);
  const img = document.createElement("img");
  img.className = "result-image";
  img.src = src;
  img.alt = infotext.split("\n")[0];
  const caption = document.createElement("figcaption");
  const pre = document.createElement("pre");
  pre.className = "result-info";
  pre.textContent = infotext;
  const use = button("Use parameters", "use-params", () => fillForm(parseInfotext(infotext)));
  const send = button("Send to img2img", "to-img2img", () => {
    $("mode_img2img").checked = true;
    showMode();
    loadInitImage(src);
  });
  const save = document.createElement("a");
  save.href = src;
  save.download = `${seed !== undefined ? seed : "image"}.png`;
  save.textContent = "Save";
  caption.append(pre, use, send, save);
  figure.append(img, caption);
  return figure;
}

function button(text, className, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = text;
  b.addEventListener("click", onClick);
  return b;
}

// ------------------------------------------------------------------ image and mask
function loadInitImage(src) {
  const img = new Image();
  img.onload = () => {
    const w = img.naturalWidth, h = img.naturalHeight;
    const scale = Math.min(8, 512 / Math.max(w, h)); // small images shown enlarged, large shrunk
    for (const canvas of [$("image_canvas"), $("mask_canvas")]) {
      canvas.width = w;
      canvas.height = h;
      canvas.style.width = `${Math.round(w * scale)}px`; // height follows the aspect ratio
    }
    $("image_canvas").getContext("2d").drawImage(img, 0, 0);
    clearMask();
    $("paint").classList.remove("empty");
    $("paint").dataset.size = `${w}x${h}`;
  };
  img.onerror = () => showError("that file is not an image the browser can read");
  img.src = src;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function clearMask() {
  const canvas = $("mask_canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  state.maskStrokes = 0;
  $("mask_canvas").dataset.painted = "0";
}

function setupPainting() {
  const canvas = $("mask_canvas");
  const ctx = canvas.getContext("2d");
  let last = null;
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  };
  const stroke = (from, to) => {
    const r = canvas.getBoundingClientRect();
    // the brush is sized in screen pixels, so it feels the same at any image size
    ctx.lineWidth = Math.max(1, num("brush_size") * canvas.width / r.width);
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.strokeStyle = "#fff";
    ctx.globalCompositeOperation = $("brush_erase").checked ? "destination-out" : "source-over";
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...to);
    ctx.stroke();
  };
  canvas.addEventListener("pointerdown", (e) => {
    if ($("paint").classList.contains("empty")) return;
    canvas.setPointerCapture(e.pointerId);
    last = at(e);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    const now = at(e);
    stroke(last, now);
    last = now;
  });
  const end = () => {
    if (last) canvas.dataset.painted = String(++state.maskStrokes);
    last = null;
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

// The mask the API wants: white = repaint on black, the image's size; null when nothing is painted.
function maskDataUrl() {
  const paint = $("mask_canvas");
  const alpha = paint.getContext("2d").getImageData(0, 0, paint.width, paint.height).data;
  let any = false;
  for (let i = 3; i < alpha.length && !any; i += 4) any = alpha[i] > 0;
  if (!any) return null;
  const out = document.createElement("canvas");
  out.width = paint.width;
  out.height = paint.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(paint, 0, 0);
  return out.toDataURL("image/png");
}

// ------------------------------------------------------------------ parameters read back
// A1111's infotext: prompt lines, an optional "Negative prompt:" line, then "Key: value, ..."
function parseInfotext(text) {
  const lines = (text || "").replace(/\r/g, "").trim().split("\n");
  const fields = {};
  const pair = /\s*([\w ][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)/g;
  const last = lines[lines.length - 1] || "";
  const pairs = [...last.matchAll(pair)].filter((m) => m[0].trim());
  if (pairs.length >= 3) {
    lines.pop();
    for (const [, key, value] of pairs) {
      fields[key.trim()] = value.startsWith('"') ? JSON.parse(value) : value.trim();
    }
  }
  const negAt = lines.findIndex((l) => l.startsWith("Negative prompt:"));
  const promptLines = negAt < 0 ? lines : lines.slice(0, negAt);
  fields.Prompt = promptLines.join("\n").trim();
  fields["Negative prompt"] = negAt < 0 ? "" :
    [lines[negAt].slice("Negative prompt:".length), ...lines.slice(negAt + 1)].join("\n").trim();
  return fields;
}

function selectIfKnown(select, value) {
  if ([...select.options].some((o) => o.value === value)) { select.value = value; return true; }
  return false;
}

function fillForm(f) {
  $("prompt").value = f.Prompt || "";
  $("negative_prompt").value = f["Negative prompt"] || "";
  const set = (id, key) => { if (f[key] !== undefined && f[key] !== "") $(id).value = f[key]; };
  set("steps", "Steps");
  set("cfg_scale", "CFG scale");
  set("seed", "Seed");
  set("denoising_strength", "Denoising strength");
  set("mask_blur", "Mask blur");
  if (f.Size) {
    const [w, h] = f.Size.split("x");
    $("width").value = w;
    $("height").value = h;
  }
  $("scheduler").value = "Automatic";
  if (f.Sampler && !selectIfKnown($("sampler"), f.Sampler)) {
    // an older combined name, e.g. "DPM++ 2M Karras": sampler + schedule type
    const names = [...$("sampler").options].map((o) => o.value).sort((a, b) => b.length - a.length);
    const name = names.find((n) => f.Sampler.startsWith(`${n} `));
    if (name) {
      $("sampler").value = name;
      selectIfKnown($("scheduler"), f.Sampler.slice(name.length + 1));
    }
  }
  if (f["Schedule type"]) selectIfKnown($("scheduler"), f["Schedule type"]);
}

async function readPng(file) {
  if (!file) return;
  showError("");
  try {
    const dataUrl = await readFile(file);
    const result = await api("/png-info", { image: rawBase64(dataUrl) });
    const text = (result && result.info) || "";
    $("png_info").textContent = text || `${file.name}: no generation parameters in this file`;
    $("png_info").hidden = false;
    if (text) fillForm(parseInfotext(text));
  } catch (e) {
    showError(`${file.name}: ${e.message}`);
  }
}

// ------------------------------------------------------------------ wiring
function setupDrop() {
  // A file dropped anywhere else must not make the browser leave the page to show it: an image
  // dropped on the img2img panel becomes the init image, anywhere else it is read for parameters.
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (!file) return;
    if ($("img2img_panel").contains(e.target)) readFile(file).then(loadInitImage);
    else if (!$("png_drop").contains(e.target)) readPng(file);
  });
  const zone = $("png_drop");
  for (const kind of ["dragenter", "dragover"]) {
    zone.addEventListener(kind, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    readPng(e.dataTransfer && e.dataTransfer.files[0]);
  });
  $("png_file").addEventListener("change", (e) => readPng(e.target.files[0]));
}

function init() {
  $("generate").addEventListener("click", generate);
  $("interrupt").addEventListener("click", interrupt);
  $("skip").addEventListener("click", skip);
  $("model").addEventListener("change", switchModel);
  $("lora").addEventListener("change", insertLora);
  $("seed_random").addEventListener("click", () => { $("seed").value = -1; });
  $("seed_reuse").addEventListener("click", () => {
    if (state.lastSeed !== null) $("seed").value = state.lastSeed;
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate();
  });
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.addEventListener("change", showMode);
  }
  $("init_image").addEventListener("change", async (e) => {
    if (e.target.files[0]) loadInitImage(await readFile(e.target.files[0]));
  });
  $("mask_clear").addEventListener("click", clearMask);
  setupPainting();
  setupDrop();
  showMode();
  const loads = [loadSamplers(), loadModels(), loadLoras()].map((p) =>
    p.catch((e) => showError(`could not read the server's choices: ${e.message}`)));
  Promise.all(loads).then(() => { document.body.dataset.ready = "1"; });
}

init();
