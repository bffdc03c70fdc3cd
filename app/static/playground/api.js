// Talking to the task endpoints: what each task sends, the same request as a curl command, and running it.
//
// `run` is the one place that reads a response: JSON, or with `stream=true` server-sent events, read as
// they arrive: `delta` events (the output text as it is generated) go to `onDelta`, the final `result`
// event (exactly the JSON the endpoint answers without streaming) to `onResult`.

// Fields every task takes after its own, all optional: generation length, sampling, the LoRA adapter.
const GENERATION = ["max_new_tokens", "temperature", "top_p", "top_k", "seed", "adapter"];
const OPTIONAL = new Set(["language", ...GENERATION]);

// Every task's endpoint (relative to the page, so a path prefix in front of the server works) and the
// text fields it takes, in the order they are sent.
export const TASKS = {
  caption: { path: "v1/caption", fields: ["language", "long", ...GENERATION] },
  vqa: { path: "v1/vqa", fields: ["question", "language", ...GENERATION] },
  ocr: { path: "v1/ocr", fields: [...GENERATION] },
  detect: { path: "v1/detect", fields: ["objects", ...GENERATION] },
  segment: { path: "v1/segment", fields: ["objects", ...GENERATION] },
  generate: { path: "v1/generate", fields: ["prompt", ...GENERATION] },
};

export class ApiError extends Error {
  constructor(status, error, requestId, inStream = false) {
    super(error.message);
    this.status = status; // 0: the server could not be reached
    this.type = error.type;
    this.param = error.param ?? null;
    this.requestId = error.request_id ?? requestId ?? null;
    this.inStream = inStream; // reported by an `error` event, after the stream had begun
  }
}

/**
 * The request for `task`: {task, path, fields: [[name, value]...], file, stream}. Optional fields left
 * empty are not sent (the server's defaults apply); required ones are sent even when empty, so that the
 * server says what is missing. `values.stream` asks for server-sent events.
 */
export function buildRequest(task, values, file) {
  const spec = TASKS[task];
  if (!spec) throw new Error(`unknown task ${task}`);
  const fields = [];
  for (const name of spec.fields) {
    const value = values[name];
    if (name === "long") {
      if (value) fields.push(["long", "true"]);
      continue;
    }
    const text = value === undefined || value === null ? "" : String(value);
    if (OPTIONAL.has(name) && text.trim() === "") continue;
    fields.push([name, text]);
  }
  const stream = Boolean(values.stream);
  if (stream) fields.push(["stream", "true"]);
  return { task, path: spec.path, fields, file, stream };
}

function shellQuote(text) {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

/**
 * The curl command that sends the same request. Text fields use --form-string, so that `;` and `,` (as in
 * "car ; person") reach the server literally; plain -F would read them as curl's own separators. A
 * streamed request adds -N, so that curl prints each event as it comes. The API key is not printed: the
 * command reads it from $PALIGEMMA_API_KEY.
 */
export function curlCommand(request, pageUrl, withKey) {
  const name = request.file?.name || "photo.jpg";
  // curl reads `;` and `,` after `@` as its own syntax too, unless the file name is in double quotes.
  const file = /[;,"\\]/.test(name) ? `"${name.replaceAll("\\", "\\\\").replaceAll('"', '\\"')}"` : name;
  const parts = [request.stream ? "curl -s -N" : "curl -s"];
  if (withKey) parts.push(`-H "Authorization: Bearer $PALIGEMMA_API_KEY"`);
  parts.push(`-F ${shellQuote(`image=@${file}`)}`);
  for (const [field, value] of request.fields) parts.push(`--form-string ${shellQuote(`${field}=${value}`)}`);
  parts.push(shellQuote(new URL(request.path, pageUrl).href));
  return parts.join(" \\\n  ");
}

function formData(request) {
  const form = new FormData();
  form.append("image", request.file, request.file.name || "image");
  for (const [name, value] of request.fields) form.append(name, value);
  return form;
}

/**
 * Server-sent events from text as it arrives: `feed(chunk)` returns the events the chunk completes, each
 * {event, data}, read as the HTML standard says (fields up to a blank line, comments skipped, several
 * `data:` lines joined with newlines).
 */
export class EventParser {
  constructor() {
    this.pending = "";
    this.event = "";
    this.data = [];
  }

  feed(chunk) {
    const lines = (this.pending + chunk).split("\n");
    this.pending = lines.pop();
    const events = [];
    for (const raw of lines) {
      const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
      if (line === "") {
        if (this.data.length) events.push({ event: this.event || "message", data: this.data.join("\n") });
        this.event = "";
        this.data = [];
        continue;
      }
      const colon = line.indexOf(":");
      const name = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (name === "event") this.event = value;
      else if (name === "data") this.data.push(value);
    }
    return events;
  }
}

/**
 * Read a streamed response: call onDelta(text, streamedSoFar) for each delta; resolve to
 * {result, streamed: {text, deltas, firstDeltaMs}}, or throw the stream's error as an ApiError.
 */
async function readStream(response, requestId, started, onDelta) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new EventParser();
  const streamed = { text: "", deltas: 0, firstDeltaMs: null };
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (error) {
      throw new ApiError(0, { type: "network_error", message: `the stream broke off (${error.message})` },
        requestId, true);
    }
    if (chunk.done) break;
    for (const { event, data } of parser.feed(chunk.value)) {
      if (event === "delta") {
        const { text } = JSON.parse(data);
        streamed.text += text;
        streamed.deltas += 1;
        streamed.firstDeltaMs ??= performance.now() - started;
        onDelta(text, streamed.text);
      } else if (event === "result") {
        reader.cancel();
        return { result: JSON.parse(data), streamed };
      } else if (event === "error") {
        reader.cancel();
        throw new ApiError(response.status, JSON.parse(data).error, requestId, true);
      }
    }
  }
  throw new ApiError(0, { type: "network_error", message: "the stream ended before its result" }, requestId, true);
}

/**
 * Send `request`; resolve to {result, elapsedMs, requestId, streamed} (and call onResult with it), or
 * throw an ApiError carrying the server's error envelope. A streamed request (`request.stream`) calls
 * onDelta(text, streamedSoFar) for each piece of text as it is generated; `streamed` is then
 * {text, deltas, firstDeltaMs}, else null. Refusals before a stream begins come as JSON with their status.
 */
export async function run(request, { apiKey = "", onDelta = () => {}, onResult = () => {}, signal } = {}) {
  const headers = { Accept: request.stream ? "text/event-stream" : "application/json" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const started = performance.now();
  let response;
  try {
    response = await fetch(request.path, { method: "POST", body: formData(request), headers, signal });
  } catch (error) {
    throw new ApiError(0, { type: "network_error", message: `the server could not be reached (${error.message})` });
  }
  const requestId = response.headers.get("x-request-id");
  const eventStream = (response.headers.get("content-type") ?? "").startsWith("text/event-stream");
  let body = null;
  let streamed = null;
  if (response.ok && eventStream) {
    ({ result: body, streamed } = await readStream(response, requestId, started, onDelta));
  } else {
    try {
      body = await response.json();
    } catch {
      // Not JSON (a proxy's error page, say): reported below by status.
    }
  }
  const elapsedMs = performance.now() - started;
  if (!response.ok || body === null) {
    const error = body?.error ?? { type: "http_error", message: `${response.status} ${response.statusText}` };
    throw new ApiError(response.status, error, requestId);
  }
  const outcome = { result: body, elapsedMs, requestId, streamed };
  onResult(outcome);
  return outcome;
}

/**
 * From /v1/models: {card, adapters}, the loaded model's card and the names of the LoRA adapters served
 * beside it (the entries whose `parent` is the model), or an ApiError.
 */
export async function models(apiKey) {
  const headers = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
  const response = await fetch("v1/models", { headers });
  const body = await response.json().catch(() => null);
  if (!response.ok || body === null) {
    throw new ApiError(response.status, body?.error ?? { type: "http_error", message: response.statusText });
  }
  const [card, ...rest] = body.data;
  return { card, adapters: rest.filter((entry) => entry.parent === card.id).map((entry) => entry.id) };
}
