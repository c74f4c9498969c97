// The page: every button is one call to the server's /api (maisi2.web.app -> maisi2.web.workspace).
import { Viewer } from "./viewer.js";

const $ = (selector, root = document) => root.querySelector(selector);
const state = { options: null, mask: null, showing: null, jobs: new Map(), opened: new Set() };

// -- talking to the server ----------------------------------------------------------------------

async function api(path, { method = "GET", json, body, raw = false } = {}) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (json !== undefined) { init.body = JSON.stringify(json); init.headers["Content-Type"] = "application/json"; }
  if (body !== undefined) { init.body = body; init.headers["Content-Type"] = "application/octet-stream"; }
  const response = await fetch(`/api${path}`, init);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return raw ? response : response.json();
}

function showError(error) {
  $("#error-text").textContent = error.message || String(error);
  $("#error").hidden = false;
}

// Run an action from a button: errors go to the banner, the page says it is working meanwhile.
async function act(fn) {
  $("#error").hidden = true;
  $("#busy").hidden = false;
  try { return await fn(); } catch (error) { showError(error); } finally { $("#busy").hidden = true; }
}

async function fetchSlice(layer, axis, index) {
  const { kind, id } = state.showing;
  const response = await api(`/view/${kind}/${id}/slice?layer=${layer}&axis=${axis}&index=${index}`, { raw: true });
  const shape = response.headers.get("X-Shape").split(",").map(Number);
  const buffer = await response.arrayBuffer();
  const data = response.headers.get("X-Dtype") === "int16" ? new Int16Array(buffer) : new Uint8Array(buffer);
  return { data, shape };
}

// -- viewer -------------------------------------------------------------------------------------

const canvases = Object.fromEntries([...document.querySelectorAll("canvas[data-view]")].map((c) => [c.dataset.view, c]));
const viewer = new Viewer(canvases, {
  fetchSlice,
  onCursor: (voxel, values) => {
    const hu = values.hu === null || values.hu === undefined ? "–" : `${values.hu} HU`;
    $("#readout").textContent = `voxel (${voxel.join(", ")})   ${hu}   ${values.name}`;
    for (const fig of document.querySelectorAll("figure")) {
      const canvas = $("canvas", fig);
      $(".index", fig).textContent = canvas.dataset.index ? `slice ${canvas.dataset.index}` : "";
    }
  },
  onPick: null,
});
window.maisi2Viewer = viewer; // for the browser test and the console

async function show(kind, id, title) {
  state.showing = { kind, id };
  const info = await api(`/view/${kind}/${id}`);
  await viewer.open(info);
  $("#viewing").textContent = `${kind === "mask" ? "Mask" : "Result"}: ${title}`;
  renderLegend(info.legend);
  renderTumors(kind === "mask" ? info.tumors : []);
  document.querySelectorAll(".items li.selected").forEach((li) => li.classList.remove("selected"));
  document.querySelector(`li[data-${kind}="${id}"]`)?.classList.add("selected");
  document.body.dataset.showing = `${kind}:${id}`;
}

function renderLegend(legend) {
  $("#legend").replaceChildren(...legend.map((entry) => {
    const item = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${entry.colour.join(",")})`;
    item.append(swatch, `${entry.id} ${entry.name}`);
    item.title = `${entry.voxels} voxels`;
    return item;
  }));
}

// Tumours of the mask shown: each one removed or resized alone (`maisi2 masks edit --remove-at
// --scale-at` at the voxel the list gives), or every tumour of its kind (`--remove KIND --scale KIND=F`).
function renderTumors(tumors) {
  const rows = tumors.map((t) => {
    const tr = document.createElement("tr");
    tr.dataset.kind = t.kind;
    tr.dataset.at = t.at.join(",");
    tr.innerHTML = `<td>${t.name}</td><td>${t.volume_ml} mL</td><td>at (${t.at.join(", ")})</td>
      <td><button data-act="goto">show</button> <button data-act="remove-one" title="remove this tumour">remove</button>
      <input type="number" value="0.8" step="0.1" min="0.1" max="4" class="factor"> <button data-act="scale-one"
      title="resize this tumour (length ratio)">resize</button>
      <button data-act="remove" title="remove every ${t.kind} tumour">remove all ${t.kind}</button>
      <button data-act="scale" title="resize every ${t.kind} tumour by the factor">resize all ${t.kind}</button></td>`;
    const factor = () => number(tr.querySelector(".factor"));
    tr.querySelector('[data-act="goto"]').onclick = () => viewer.moveTo(t.at);
    tr.querySelector('[data-act="remove-one"]').onclick = () => edit({ op: "remove", at: t.at });
    tr.querySelector('[data-act="scale-one"]').onclick = () => edit({ op: "scale", at: t.at, factor: factor() });
    tr.querySelector('[data-act="remove"]').onclick = () => edit({ op: "remove", kind: t.kind });
    tr.querySelector('[data-act="scale"]').onclick = () => edit({ op: "scale", kind: t.kind, factor: factor() });
    return tr;
  });
  $("#tumors tbody").replaceChildren(...rows);
  if (!tumors.length) $("#tumors tbody").innerHTML = '<tr><td class="note">none</td></tr>';
}

// -- masks --------------------------------------------------------------------------------------

async function refreshMasks() {
  const masks = await api("/masks");
  $("#mask-list").replaceChildren(...masks.map((m) => {
    const li = document.createElement("li");
    li.dataset.mask = m.id;
    li.innerHTML = `<span class="name"></span><span class="meta">${m.source}${m.parent ? " of " + m.parent : ""}</span>
      <button>view</button> <a href="/api/masks/${m.id}/download" download>download</a>`;
    $(".name", li).textContent = m.name;
    $("button", li).onclick = () => act(() => selectMask(m));
    return li;
  }));
  if (state.showing?.kind === "mask") document.querySelector(`li[data-mask="${state.showing.id}"]`)?.classList.add("selected");
}

async function selectMask(mask) {
  state.mask = mask;
  await show("mask", mask.id, mask.name);
}

async function addedMask(mask) {
  await refreshMasks();
  await selectMask(mask);
}

async function edit(change) {
  await act(async () => addedMask(await api(`/masks/${state.mask.id}/edit`, { method: "POST", json: change })));
}

async function upload(file) {
  const { upload } = await api(`/uploads?name=${encodeURIComponent(file.name)}`, { method: "POST", body: file });
  return upload;
}

// A number field's value as typed; an empty (or unreadable) field is sent as null, so the server's
// refusal says "got nothing" instead of taking it for 0.
function number(input) { return input.value === "" ? null : Number(input.value); }
function numbers(form, names) { return names.map((n) => number(form.elements[n])); }
// Three fields that may all be left empty (null: the CLI's default), e.g. an output spacing.
function optionalNumbers(form, names, what) {
  const given = names.map((n) => form.elements[n].value !== "");
  if (!given.some(Boolean)) return null;
  if (!given.every(Boolean)) throw new Error(`give all three ${what}`);
  return numbers(form, names);
}

$("#phantom-form").onsubmit = (e) => {
  e.preventDefault();
  const f = e.target;
  const tumors = f.elements.tumors.value.split(/[\s,]+/).filter(Boolean);
  act(async () => addedMask(await api("/masks/phantom", { method: "POST",
    json: { shape: numbers(f, ["sx", "sy", "sz"]), spacing: numbers(f, ["px", "py", "pz"]), seed: number(f.elements.seed), tumors } })));
};

$("#upload-form").onsubmit = (e) => {
  e.preventDefault();
  const file = $("#upload-file").files[0];
  if (!file) return showError(new Error("choose a label map file (.nii.gz) first"));
  act(async () => addedMask(await api("/masks/import", { method: "POST", json: { label_map: await upload(file) } })));
};

$("#totalseg-form").onsubmit = (e) => {
  e.preventDefault();
  const seg = $("#totalseg-file").files[0], ct = $("#totalseg-ct").files[0];
  if (!seg) return showError(new Error("choose the TotalSegmentator label map first"));
  act(async () => {
    const json = { totalseg: await upload(seg) };
    if (ct) json.ct = await upload(ct);
    if ($("#totalseg-version").value) json.version = $("#totalseg-version").value;
    await addedMask(await api("/masks/import", { method: "POST", json }));
  });
};

$("#request-form").onsubmit = (e) => {
  e.preventDefault();
  const f = e.target;
  act(async () => addedMask(await api("/masks/request", { method: "POST", json: {
    region: f.elements.region.value || null, anatomy: f.elements.anatomy.value.split(",").map((s) => s.trim()).filter(Boolean),
    size: optionalNumbers(f, ["sx", "sy", "sz"], "sizes (voxels), or none for the selected mask's"),
    spacing: optionalNumbers(f, ["px", "py", "pz"], "spacings (mm), or none for the selected mask's"),
    seed: number(f.elements.seed) } })));
};

async function refreshLibrary() {
  $("#library-state").textContent = `Library: ${state.options.library === "bundled" ? "the bundled masks" : state.options.library}`;
  const entries = await api("/library");
  $("#library-list").replaceChildren(...entries.map((entry) => {
    const li = document.createElement("li");
    li.dataset.library = entry.file;
    li.innerHTML = `<span class="name"></span><span class="meta"></span><button>use</button>`;
    $(".name", li).textContent = entry.file;
    $(".meta", li).textContent = entry.summary;
    $("button", li).onclick = () => act(async () => addedMask(await api("/masks/library", { method: "POST", json: { file: entry.file } })));
    return li;
  }));
}

// Tool: navigate (clicks move the crosshair), add a tumour where the user clicks, or remove / resize
// the one tumour clicked on (or the nearest within 10 mm of the click: the server picks it).
const TOOLS = {
  add: (voxel) => ({ op: "add", at: voxel, kind: $("#tumor-kind").value, radius_mm: number($("#tumor-radius")) }),
  remove: (voxel) => ({ op: "remove", at: voxel }),
  scale: (voxel) => ({ op: "scale", at: voxel, factor: number($("#tumor-factor")) }),
};
for (const radio of document.querySelectorAll('input[name="tool"]')) {
  radio.onchange = () => {
    if (!radio.checked) return;
    const request = TOOLS[radio.value];
    viewer.onPick = request ? (voxel) => {
      if (state.showing?.kind !== "mask") return showError(new Error("tumours are edited on a mask: view a mask first"));
      edit(request(voxel));
    } : null;
    Object.values(canvases).forEach((c) => c.classList.toggle("adding", Boolean(request)));
  };
}

// -- generation ---------------------------------------------------------------------------------

$("#generate-form").onsubmit = (e) => {
  e.preventDefault();
  const f = e.target;
  if (!state.mask) return showError(new Error("make, upload or pick a mask first"));
  act(async () => {
    const spacing = optionalNumbers(f, ["px", "py", "pz"], "spacings (mm), or none to keep the mask's");
    const job = await api("/jobs", { method: "POST", json: {
      mask: state.mask.id, steps: number(f.elements.steps), seed: number(f.elements.seed),
      spacing, precision: f.elements.precision.value, model: f.elements.model.value,
      qc_retries: number(f.elements.qc_retries), fit_to_model: f.elements.fit_to_model.checked,
      force: f.elements.force.checked } });
    state.jobs.set(job.id, job.state);
    await refreshJobs();
  });
};

function describeProgress(job) {
  const p = job.progress || {};
  if (job.state === "queued") return job.position ? `queued, ${job.position} ahead` : "queued";
  if (job.state !== "running") return "";
  if (job.cancelling) return "cancelling (at its next step, tile or network)";
  const attempt = p.attempt > 1 ? ` (attempt ${p.attempt})` : "";
  if (p.phase === "sampling") return `sampling: step ${p.step} of ${p.steps}${attempt}`;
  if (p.phase === "decoding" && p.total) return decodingProgress(p) + attempt;
  if (p.phase === "retrying") return p.message;
  // generate's loading events: the weights read, then each network built
  if (p.phase === "loading" && p.total) return `loading the model: ${p.done === 1 ? "weights read" : `network ${p.done - 1} of ${p.total - 1} built`}`;
  return { loading: "loading the model", decoding: "decoding the latent to HU", checking: "quality check",
    writing: "writing the files" }[p.phase] || p.phase || "starting";
}

// generate's decoding events: tile decodes of a tiled plan (each tile once per group-norm statistics
// pass, then once more), else thousandths of a whole-volume decode.
function decodingProgress(p) {
  if (!p.tiles) return `decoding: ${Math.floor(100 * p.done / p.total)}%`;
  const passes = p.total > p.tiles ? `, ${p.total / p.tiles} passes over ${p.tiles} tiles` : "";
  return `decoding: tile ${p.done} of ${p.total}${passes}`;
}

async function refreshJobs() {
  const jobs = await api("/jobs");
  $("#job-list").replaceChildren(...jobs.map((job) => {
    const li = document.createElement("li");
    li.dataset.job = job.id;
    li.className = `state-${job.state}`;
    const p = job.progress || {};
    const fraction = job.state === "done" ? 1 : p.phase === "sampling" ? 0.8 * p.step / p.steps
      : p.phase === "decoding" && p.total ? 0.8 + 0.15 * p.done / p.total
      : { decoding: 0.8, checking: 0.95, writing: 0.98 }[p.phase] || 0;
    li.innerHTML = `<span class="name"></span><span class="state">${job.state}</span> <span class="meta">${describeProgress(job)}</span>
      <progress max="1" value="${fraction}"></progress>`;
    $(".name", li).textContent = job.label;
    if (job.error) { const err = document.createElement("span"); err.className = "job-error"; err.textContent = job.error; li.append(err); }
    if (job.state === "queued" || (job.state === "running" && !job.cancelling)) {
      const cancel = document.createElement("button");
      cancel.textContent = "cancel";
      cancel.onclick = () => act(async () => { await api(`/jobs/${job.id}/cancel`, { method: "POST" }); await refreshJobs(); });
      li.append(cancel);
    }
    return li;
  }));
  for (const job of jobs) {
    const before = state.jobs.get(job.id);
    state.jobs.set(job.id, job.state);
    if (before && before !== job.state && job.state === "failed") showError(new Error(`generation failed: ${job.error}`));
    if (before && before !== "done" && job.state === "done" && !state.opened.has(job.id)) {
      state.opened.add(job.id);
      await refreshResults();
      const result = await api(`/results/${job.result}`);
      await show("result", result.id, resultTitle(result));
    }
  }
  return jobs;
}

// -- results ------------------------------------------------------------------------------------

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function resultTitle(r) { return `${r.mask.name} · ${r.settings.steps} steps, seed ${r.seed}`; }

async function refreshResults() {
  const results = await api("/results");
  $("#result-list").replaceChildren(...results.map((r) => {
    const li = document.createElement("li");
    li.dataset.result = r.id;
    const qc = r.quality.passed ? '<span class="qc qc-pass">quality check passed</span>'
      : `<span class="qc qc-fail">quality check FAILED: ${r.quality.failed.join(", ")}</span>`;
    // A forced request outside the model's domain, and what fitting to the model changed, are shown
    // with the result (the report's "domain" block), as the quality check is.
    const domain = (r.out_of_domain || []).length
      ? `<span class="qc qc-fail out-of-domain">OUT OF DOMAIN (forced): ${escapeHtml(r.out_of_domain.join("; "))}</span>` : "";
    const fitted = (r.fitted || []).length ? `<span class="meta fitted">fitted to the model: ${escapeHtml(r.fitted.join("; "))}</span>` : "";
    const links = r.files.map((kind) => `<a href="/api/results/${r.id}/files/${kind}" download data-file="${kind}">${
      { ct: "CT", label: "label map", report: "report", preview: "preview" }[kind]}</a>`).join("");
    li.innerHTML = `<span class="name"></span>${qc}${domain}${fitted}<span class="meta">${r.shape.join("×")} @ ${r.spacing.map((s) => +s.toFixed(2)).join("×")} mm,
      ${r.timings_s.total.toFixed(0)} s</span><div>${links}</div><button>view</button>`;
    $(".name", li).textContent = resultTitle(r);
    $("button", li).onclick = () => act(() => show("result", r.id, resultTitle(r)));
    return li;
  }));
  if (state.showing?.kind === "result") document.querySelector(`li[data-result="${state.showing.id}"]`)?.classList.add("selected");
}

// -- start --------------------------------------------------------------------------------------

async function start() {
  state.options = await api("/options");
  const o = state.options;
  $("#windows").replaceChildren(...Object.entries(o.windows).map(([name, [width, level]], i) => {
    const button = document.createElement("button");
    button.textContent = name;
    button.dataset.window = name;
    button.onclick = () => {
      viewer.setWindow(width, level);
      document.querySelectorAll("#windows button").forEach((b) => b.classList.toggle("active", b === button));
    };
    if (i === 0) button.classList.add("active");
    return button;
  }));
  $("#overlay").oninput = (e) => viewer.setOverlay(Number(e.target.value) / 100);
  $("#tumor-kind").replaceChildren(...o.tumor_kinds.map((k) => new Option(k, k)));
  const f = $("#generate-form");
  f.elements.precision.replaceChildren(...o.precisions.map((p) => new Option(p, p)));
  f.elements.model.replaceChildren(...o.models.map((m) => new Option(m, m)));
  f.elements.steps.value = o.defaults.steps;
  $("#error-close").onclick = () => { $("#error").hidden = true; };
  await Promise.all([refreshMasks(), refreshResults(), refreshLibrary()]);
  for (const job of await refreshJobs()) { state.jobs.set(job.id, job.state); state.opened.add(job.id); }
  setInterval(() => refreshJobs().catch(showError), 1000);
  document.body.dataset.ready = "1";
}

act(start);
