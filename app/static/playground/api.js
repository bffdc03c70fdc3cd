// Talking to the task endpoints: what each task sends, the same request as a curl command, and running it.
//
// `run` is the one place that reads a response. Once the server streams tokens (`stream=true`, server-sent
// events), it sends that field, reads the events here, calls `onDelta(text)` for each token and
// `onResult` with the final typed result; nothing else in the page changes.

// Every task's endpoint (relative to the page, so a path prefix in front of the server works) and the
// text fields it takes, in the order they are sent.
export const TASKS = {
  caption: { path: "v1/caption", fields: ["language", "long", "max_new_tokens"] },
  vqa: { path: "v1/vqa", fields: ["question", "language", "max_new_tokens"] },
  ocr: { path: "v1/ocr", fields: ["max_new_tokens"] },
  detect: { path: "v1/detect", fields: ["objects", "max_new_tokens"] },
  segment: { path: "v1/segment", fields: ["objects", "max_new_tokens"] },
  generate: { path: "v1/generate", fields: ["prompt", "max_new_tokens"] },
};

export class ApiError extends Error {
  constructor(status, error, requestId) {
    super(error.message);
    this.status = status; // 0: the server could not be reached
    this.type = error.type;
    this.param = error.param ?? null;
    this.requestId = error.request_id ?? requestId ?? null;
  }
}

/**
 * The request for `task`: {task, path, fields: [[name, value]...], file}. Optional fields left empty
 * are not sent (the server's defaults apply); required ones are sent even when empty, so that the
 * server says what is missing.
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
    const optional = name === "language" || name === "max_new_tokens";
    if (optional && text.trim() === "") continue;
    fields.push([name, text]);
  }
  return { task, path: spec.path, fields, file };
}

function shellQuote(text) {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

/**
 * The curl command that sends the same request. Text fields use --form-string, so that `;` and `,` (as in
 * "car ; person") reach the server literally; plain -F would read them as curl's own separators. The API
 * key is not printed: the command reads it from $PALIGEMMA_API_KEY.
 */
export function curlCommand(request, pageUrl, withKey) {
  const name = request.file?.name || "photo.jpg";
  // curl reads `;` and `,` after `@` as its own syntax too, unless the file name is in double quotes.
  const file = /[;,"\\]/.test(name) ? `"${name.replaceAll("\\", "\\\\").replaceAll('"', '\\"')}"` : name;
  const parts = ["curl -s"];
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
 * Send `request`; resolve to {result, elapsedMs, requestId} (and call onResult with it), or throw an
 * ApiError carrying the server's error envelope.
 */
export async function run(request, { apiKey = "", onResult = () => {}, signal } = {}) {
  const headers = { Accept: "application/json" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const started = performance.now();
  let response;
  try {
    response = await fetch(request.path, { method: "POST", body: formData(request), headers, signal });
  } catch (error) {
    throw new ApiError(0, { type: "network_error", message: `the server could not be reached (${error.message})` });
  }
  const requestId = response.headers.get("x-request-id");
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's error page, say): reported below by status.
  }
  const elapsedMs = performance.now() - started;
  if (!response.ok || body === null) {
    const error = body?.error ?? { type: "http_error", message: `${response.status} ${response.statusText}` };
    throw new ApiError(response.status, error, requestId);
  }
  const outcome = { result: body, elapsedMs, requestId };
  onResult(outcome);
  return outcome;
}

/** The loaded model's card from /v1/models, or an ApiError. */
export async function modelCard(apiKey) {
  const headers = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
  const response = await fetch("v1/models", { headers });
  const body = await response.json().catch(() => null);
  if (!response.ok || body === null) {
    throw new ApiError(response.status, body?.error ?? { type: "http_error", message: response.statusText });
  }
  return body.data[0];
}
