// The operator page: pick or drop images, see each one's overlay, score and decision, say when it is wrong
// (feedback stored in the model's folder, with where the defect is painted over the heatmap), and see how the recent scores
// drift. No external code.
"use strict";
const $ = (id) => document.getElementById(id);
let models = [];
const formatRate = (rate) => (rate >= 0.001 ? `${(100 * rate).toPrecision(2)} %` : `1 in ${Math.round(1 / Math.max(rate, 1e-12)).toLocaleString()}`);

function showModel() {
  const chosen = models.find((m) => m.name === $("model").value);
  if (!chosen) return;
  const metrics = chosen.metrics && chosen.metrics.image_auroc != null ? `, image AUROC ${chosen.metrics.image_auroc}` : "";
  const parent = chosen.parent ? `, updated from ${chosen.parent}` : "";
  const rate = chosen.false_alarm_rate;
  const expected = rate ? `, expected false-alarm rate ${formatRate(rate.expected)}` : "";
  $("model-line").textContent = `${chosen.name} (version ${chosen.version}${parent}): ${chosen.detector} on ${chosen.backbone}, threshold ${chosen.threshold.toPrecision(4)}${expected}${metrics}`;
  const d = chosen.drift;
  const share = d.alarm_share == null ? "no image scored yet" : `${(100 * d.alarm_share).toFixed(1)} % above the threshold`;
  const ks = d.drift == null ? "drift: not enough scores yet" : `drift (KS) ${d.drift.toFixed(3)}${d.drift > d.drift_bound ? " — over the bound: check the line" : ""}`;
  $("drift-line").textContent = `Last ${d.window} images: ${share}; ${ks}.`;
}

// The API key, when the server asks for one (every route but the page and /health).
const keyHeaders = () => ($("api-key").value ? { "X-API-Key": $("api-key").value } : {});

async function fetchModels() {
  const answer = await fetch("/models", { headers: keyHeaders() });
  const body = await answer.json();
  if (!answer.ok) throw new Error(answer.status === 401 ? "enter the API key above" : body.error || answer.statusText);
  return body;
}

async function refreshModels() {
  models = await fetchModels();
  showModel();
}

async function loadModels() {
  models = await fetchModels();
  $("model").replaceChildren();
  for (const m of models) {
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = m.name;
    $("model").append(option);
  }
  $("model").disabled = models.length < 2;
  showModel();
}

function resultItem(file) {
  const item = document.createElement("li");
  item.innerHTML = '<p><strong class="name"></strong> <span class="decision">…</span></p><p class="score"></p>';
  item.querySelector(".name").textContent = file.name;
  $("results").prepend(item);
  return item;
}

async function inspect(file) {
  const item = resultItem(file);
  const form = new FormData();
  form.append("file", file);
  form.append("model", $("model").value);
  const headers = keyHeaders();
  try {
    const answer = await fetch("/predict?images=base64", { method: "POST", body: form, headers });
    const body = await answer.json();
    if (!answer.ok) throw new Error(body.error || answer.statusText);
    const result = body.results[0];
    const decision = item.querySelector(".decision");
    decision.textContent = result.decision;
    decision.classList.add(result.decision);
    item.dataset.decision = result.decision;
    item.querySelector(".score").textContent =
      `calibrated ${result.normalized_score.toFixed(2)} (0.50 = threshold): ${formatRate(result.false_alarm_rate)} of good parts score higher; ` +
      `raw score ${result.score.toPrecision(4)} (threshold ${body.threshold.toPrecision(4)})`;
    const overlay = document.createElement("img");
    overlay.alt = `Heatmap of ${file.name}: red where it looks defective`;
    overlay.src = `data:image/png;base64,${result.overlay}`;
    item.append(overlay);
    paintable(overlay);
    item.append(feedbackControl(result.id, file.name, overlay));
    refreshModels().catch(() => {});
  } catch (problem) {
    item.dataset.decision = "error";
    item.querySelector(".decision").textContent = "error";
    item.querySelector(".score").textContent = problem.message;
    item.querySelector(".score").classList.add("error");
  }
}

function feedbackControl(id, name, overlay) {
  const control = document.createElement("p");
  control.className = "feedback";
  control.innerHTML = '<button type="button" data-verdict="good">Good part (false alarm)</button> '
    + '<button type="button" data-verdict="defect">Defect</button> '
    + '<input class="note" type="text" maxlength="2000" placeholder="Note (optional)"> '
    + '<button type="button" data-verdict="none" class="undo" hidden>Undo</button> '
    + '<span class="saved" role="status"></span>';
  control.querySelector(".note").setAttribute("aria-label", `Note on ${name}`);
  for (const button of control.querySelectorAll("button")) {
    button.setAttribute("aria-label", `${button.textContent}: ${name}`);
    button.addEventListener("click", () => sendFeedback(id, button.dataset.verdict, control, overlay));
  }
  return control;
}

// Where the defect is: the operator paints over the heatmap (optional); sent as a binary mask of the image's size.
function paintable(overlay) {
  const frame = document.createElement("div");
  frame.className = "paint";
  const canvas = document.createElement("canvas");
  canvas.setAttribute("aria-label", "Paint where the defect is (optional), then press Defect");
  overlay.replaceWith(frame);
  frame.append(overlay, canvas);
  const size = () => { canvas.width = overlay.naturalWidth; canvas.height = overlay.naturalHeight; };
  if (overlay.complete) size(); else overlay.addEventListener("load", size);
  let painting = false;
  const paint = (event) => {
    if (!painting) return;
    const scale = canvas.width / canvas.clientWidth;
    const context = canvas.getContext("2d");
    context.fillStyle = "rgba(255, 255, 255, 0.9)";
    context.beginPath();
    context.arc(event.offsetX * scale, event.offsetY * scale, Math.max(3, canvas.width / 40), 0, 2 * Math.PI);
    context.fill();
    canvas.dataset.painted = "true";
  };
  canvas.addEventListener("pointerdown", (event) => { painting = true; paint(event); });
  canvas.addEventListener("pointermove", paint);
  for (const end of ["pointerup", "pointerleave"]) canvas.addEventListener(end, () => { painting = false; });
  return overlay;
}

function paintedMask(overlay) {
  const canvas = overlay.parentElement.querySelector("canvas");
  if (!canvas || !canvas.dataset.painted) return Promise.resolve(null);
  const painted = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  const mask = new ImageData(canvas.width, canvas.height);
  for (let i = 0; i < painted.data.length; i += 4) {
    const value = painted.data[i + 3] > 0 ? 255 : 0;  // binary: painted or not, whatever the brush's soft edge
    mask.data.set([value, value, value, 255], i);
  }
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  out.getContext("2d").putImageData(mask, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

// The operator's verdict: once saved, the buttons are disabled, the badge shows it, and Undo takes it back.
async function sendFeedback(id, verdict, control, overlay) {
  const form = new FormData();
  form.append("id", id);
  form.append("verdict", verdict);
  const note = control.querySelector(".note").value.trim();
  if (note && verdict !== "none") form.append("note", note);
  const mask = verdict === "defect" ? await paintedMask(overlay) : null;
  if (mask) form.append("mask", mask, "mask.png");
  const headers = keyHeaders();
  const saved = control.querySelector(".saved");
  const buttons = control.querySelectorAll("button");
  for (const button of buttons) button.disabled = true;
  try {
    const answer = await fetch("/feedback", { method: "POST", body: form, headers });
    const body = await answer.json();
    if (!answer.ok) throw new Error(body.error || answer.statusText);
    showVerdict(control, verdict);
    loadShift();
    saved.textContent = verdict === "none" ? "Verdict taken back."
      : `Saved: ${verdict === "good" ? "good part" : mask ? "defect, with where it is" : "defect"}.`;
  } catch (problem) {
    saved.textContent = `Not saved: ${problem.message}`;
    showVerdict(control, control.dataset.saved || "none");
  }
}

function showVerdict(control, verdict) {
  const decision = control.parentElement.querySelector(".decision");
  decision.dataset.model ??= decision.textContent;
  decision.classList.remove("good", "defective", "operator");
  if (verdict === "none") {
    delete control.dataset.saved;
    decision.textContent = decision.dataset.model;
    decision.classList.add(decision.dataset.model);
  } else {
    control.dataset.saved = verdict;
    decision.textContent = verdict === "good" ? "good (operator)" : "defective (operator)";
    decision.classList.add(verdict === "good" ? "good" : "defective", "operator");
  }
  for (const button of control.querySelectorAll("button")) {
    const undo = button.dataset.verdict === "none";
    button.hidden = undo ? verdict === "none" : false;
    button.disabled = undo ? false : verdict !== "none";
  }
  control.querySelector(".note").disabled = verdict !== "none";
}

async function inspectAll(files) {
  $("status").textContent = `Inspecting ${files.length} image(s)…`;
  for (const file of files) await inspect(file);
  $("status").textContent = `Inspected ${files.length} image(s).`;
  loadShift();
}

// The shift, from the inspections store: what survives a reload of the page (or of the server).
function shiftStart() {
  if (!$("shift-start").value) {
    const midnight = new Date();
    midnight.setHours(0, 0, 0, 0);
    $("shift-start").value = new Date(midnight - midnight.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
  }
  return new Date($("shift-start").value).toISOString();
}

async function loadShift() {
  const model = encodeURIComponent($("model").value);
  const since = encodeURIComponent(shiftStart());
  try {
    const [tally, rows] = await Promise.all(
      [`/tally?model=${model}&since=${since}`, `/inspections?model=${model}&since=${since}&limit=20`].map(async (url) => {
        const answer = await fetch(url, { headers: keyHeaders() });
        if (!answer.ok) throw new Error((await answer.json()).error || answer.statusText);
        return answer.json();
      }),
    );
    $("tally").textContent = `${tally.inspected} inspected: ${tally.good} good, ${tally.defect} defective` +
      (tally.failed ? `, ${tally.failed} unreadable` : "") +
      `; the operator confirmed ${tally.confirmed} and overturned ${tally.overturned}.`;
    $("history").replaceChildren(...rows.map((row) => {
      const item = document.createElement("li");
      const operator = row.operator_verdict ? ` (operator: ${row.operator_verdict})` : "";
      const score = row.normalized == null ? "" : `, score ${row.normalized.toFixed(3)}`;
      item.textContent = `${new Date(row.time).toLocaleTimeString()} ${row.file_name}: ${row.verdict}${score}${operator}`;
      item.className = row.verdict;
      return item;
    }));
  } catch (problem) {
    $("tally").textContent = `Cannot read the shift: ${problem.message}`;
  }
}

$("file").addEventListener("change", (event) => inspectAll([...event.target.files]));
$("model").addEventListener("change", () => { showModel(); loadShift(); });
$("shift-start").addEventListener("change", loadShift);
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  inspectAll([...event.dataTransfer.files]);
});
const startUp = () => loadModels().then(loadShift).catch((problem) => { $("model-line").textContent = `Cannot load the models: ${problem.message}`; });
$("api-key").addEventListener("change", startUp);
startUp();
