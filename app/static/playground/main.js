// The playground page: choose or drop an image, pick a task, run it, see the result drawn.
// `document.body.dataset.state` tells where the page is: loading, empty, ready, running, streaming (text is
// arriving), done, error. While a run streams, `#text` shows the output as it is generated and counts the
// pieces received in its `data-deltas`; the final result then replaces it with the typed text.

import { ApiError, buildRequest, curlCommand, models, run } from "./api.js";
import { Stage } from "./draw.js";

const KEY_STORAGE = "paligemma.apiKey";
const $ = (id) => document.getElementById(id);
const stage = new Stage($("stage"));
let chosen = null; // the File to send

function setState(state, message = "") {
  document.body.dataset.state = state;
  $("status").textContent = message;
}

function values() {
  return {
    objects: $("objects").value,
    question: $("question").value,
    prompt: $("prompt").value,
    language: $("language").value,
    long: $("long").checked,
    max_new_tokens: $("max-new-tokens").value,
    temperature: $("temperature").value,
    top_p: $("top-p").value,
    top_k: $("top-k").value,
    seed: $("seed").value,
    adapter: $("adapter").value,
    stream: $("stream").checked,
  };
}

function apiKey() {
  return $("api-key").value.trim();
}

function showFields() {
  const task = $("task").value;
  for (const element of document.querySelectorAll("[data-tasks]")) {
    element.hidden = !element.dataset.tasks.split(" ").includes(task);
  }
  updateCurl();
}

function updateCurl() {
  const request = buildRequest($("task").value, values(), chosen ?? { name: "photo.jpg" });
  $("curl").textContent = curlCommand(request, document.baseURI, apiKey() !== "");
}

function clearResult() {
  stage.clearOverlays();
  $("output").hidden = true;
  $("error").hidden = true;
  $("error").textContent = "";
  for (const id of ["text", "objects-list", "stats", "json"]) $(id).textContent = "";
  delete $("text").dataset.deltas;
}

function showDelta(text) {
  if (document.body.dataset.state !== "streaming") {
    setState("streaming", "Generating…");
    $("output").hidden = false;
  }
  $("text").append(text);
  $("text").dataset.deltas = String(Number($("text").dataset.deltas ?? 0) + 1);
}

async function choose(file) {
  if (!file) return;
  chosen = file;
  clearResult();
  try {
    const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    stage.showImage(bitmap);
    $("drop-hint").textContent = `${file.name} (${bitmap.width} x ${bitmap.height})`;
  } catch {
    stage.clear();
    $("drop-hint").textContent = `${file.name}: this browser cannot show it; the server will say what it makes of it`;
  }
  $("run").disabled = false;
  updateCurl();
  setState("ready");
}

function describe(object) {
  const b = object.box;
  const box = [b.x_min, b.y_min, b.x_max, b.y_max].map((v) => Math.round(v)).join(", ");
  let text = `${object.label || "?"}: box [${box}] px`;
  if (object.mask) text += `, mask of ${object.mask_area} px`;
  else if (object.mask_error) text += `, no mask (${object.mask_error})`;
  return text;
}

function showResult({ result, elapsedMs, streamed }) {
  const objects = [...(result.detections ?? []), ...(result.segments ?? [])];
  const locates = ["detect", "segment"].includes($("task").value) || objects.length > 0;
  $("text").textContent = result.text ?? result.answer ?? result.raw_text;
  const list = $("objects-list");
  for (const object of objects) {
    const item = document.createElement("li");
    item.textContent = describe(object);
    list.append(item);
  }
  if (locates && objects.length === 0) {
    const item = document.createElement("li");
    item.textContent = "No objects found.";
    list.append(item);
  }
  stage.drawObjects(objects, result.image);
  const t = result.timings;
  const first = streamed?.firstDeltaMs != null ? `, first text after ${Math.round(streamed.firstDeltaMs)} ms` : "";
  $("stats").textContent =
    `${Math.round(elapsedMs)} ms round trip${first} (server: ${t.total_ms} ms, model ${t.queue_and_inference_ms} ms) · ` +
    `${result.usage.prompt_tokens} prompt tokens, ${result.usage.completion_tokens} generated · ` +
    `finish: ${result.finish_reason} · ${result.image.width} x ${result.image.height} px`;
  $("json").textContent = JSON.stringify(result, null, 2);
  $("output").hidden = false;
  showWarning(result.warning);
}

function showError(error) {
  const box = $("error");
  if (error instanceof ApiError) {
    let where = error.status ? `${error.status} ${error.type}` : error.type;
    if (error.inStream) where = `${error.type} (after the stream began)`;
    let text = `${where}: ${error.message}`;
    if (error.status === 401) text += "\nEnter the server's API key above.";
    if (error.requestId) text += `\nrequest id: ${error.requestId}`;
    box.textContent = text;
  } else {
    box.textContent = `The page failed: ${error.message}`;
  }
  box.hidden = false;
}

function showWarning(text) {
  $("warning").textContent = text ?? "";
  $("warning").hidden = !text;
}

async function submit(event) {
  event.preventDefault();
  if (!chosen) {
    setState("empty", "Choose or drop an image first.");
    return;
  }
  const request = buildRequest($("task").value, values(), chosen);
  clearResult();
  setState("running", "Running…");
  $("run").disabled = true;
  try {
    await run(request, { apiKey: apiKey(), onDelta: showDelta, onResult: showResult });
    setState("done");
  } catch (error) {
    showError(error);
    setState("error");
  } finally {
    $("run").disabled = false;
  }
}

// The generated scenes shipped with the server (app/demo/scenes.py): one click loads the image and sets up
// the task that shows what the built-in demo model does with it.
const SCENES = "static/playground/scenes/";

async function pickScene(scene) {
  const response = await fetch(SCENES + scene.file);
  const blob = await response.blob();
  await choose(new File([blob], scene.file, { type: blob.type || "image/png" }));
  $("task").value = scene.task;
  if (scene.objects) $("objects").value = scene.objects;
  if (scene.question) $("question").value = scene.question;
  showFields();
}

async function loadScenes() {
  try {
    const response = await fetch(SCENES + "scenes.json");
    if (!response.ok) return;
    const scenes = await response.json();
    const buttons = $("scene-buttons");
    for (const scene of scenes) {
      const button = document.createElement("button");
      button.type = "button";
      button.title = `${scene.task}: ${scene.caption}`;
      button.dataset.scene = scene.file;
      const image = document.createElement("img");
      image.src = SCENES + scene.file;
      image.alt = scene.caption;
      button.append(image);
      button.addEventListener("click", () => pickScene(scene));
      buttons.append(button);
    }
    $("scenes").hidden = scenes.length === 0;
  } catch {
    // No scenes: the page works as before.
  }
}

// The adapter selector lists the server's adapters (shown only when it has some), keeping the choice.
function showAdapters(names) {
  const select = $("adapter");
  const chosenName = select.value;
  select.replaceChildren(select.options[0]);
  for (const name of names) select.append(new Option(name, name, false, name === chosenName));
  $("adapter-field").hidden = names.length === 0;
  updateCurl();
}

async function loadModel() {
  try {
    const { card, adapters } = await models(apiKey());
    $("model").textContent = `${card.id} · ${card.device} · masks ${card.masks ? "on" : "off"}`;
    showWarning(card.warning);
    $("about").textContent = card.about ?? "";
    $("about").hidden = !card.about;
    showAdapters(adapters);
  } catch (error) {
    $("model").textContent = error.status === 401 ? "model: enter the API key" : "";
  }
}

function saveKey() {
  const key = apiKey();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  updateCurl();
}

function setUp() {
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) ?? "";
  $("file").addEventListener("change", () => choose($("file").files[0]));
  const drop = $("drop");
  for (const target of [drop, $("stage")]) {
    target.addEventListener("dragover", (event) => {
      event.preventDefault();
      drop.classList.add("dragging");
    });
    target.addEventListener("dragleave", () => drop.classList.remove("dragging"));
    target.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("dragging");
      choose(event.dataTransfer.files[0]);
    });
  }
  $("task").addEventListener("change", showFields);
  $("form").addEventListener("input", updateCurl);
  $("api-key").addEventListener("input", saveKey);
  $("api-key").addEventListener("change", loadModel);
  $("form").addEventListener("submit", submit);
  showFields();
  setState("empty", "Choose or drop an image first.");
  loadModel();
  loadScenes();
}

setUp();
