"use strict";
// elmd's chat page. It talks to the daemon that served it (same origin) through the
// OpenAI-compatible API, streaming each reply. Model output only ever enters the page as
// text (textContent, text nodes): a reply that contains <script> or <img onerror> shows
// those characters and never becomes live HTML.

const KEY_STORAGE = "elmd-api-key"; // sessionStorage: gone when the tab closes
const FENCE = /```([^\n`]*)\n?([\s\S]*?)(?:```|$)/g; // a code block; an unclosed one runs to the end
const INLINE = /`([^`\n]+)`|\*\*([^*\n]+)\*\*/g; // `code` or **bold**
const LIST_ITEM = /^\s*(?:[-*]|(\d+)[.)])\s+(.*)$/;
const HEADING = /^(#{1,4})\s+(.*)$/;

const $ = (id) => document.getElementById(id);
const conversation = []; // {role, content} of the turns so far
let streaming = null; // the AbortController of the reply being streamed
let chat = 0; // which conversation this is: "New chat" starts another

class KeyRequired extends Error {}

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: apiHeaders() });
  if (response.status === 401) throw new KeyRequired(await errorMessage(response));
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

// ---- the API key ---------------------------------------------------------------------

function askForKey(message) {
  $("composer").hidden = true;
  $("key-form").hidden = false;
  $("key-error").textContent = sessionStorage.getItem(KEY_STORAGE) ? message : "";
  $("key").focus();
}

async function useKey(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("key").value.trim());
  $("key").value = "";
  await loadModels();
}

// ---- models --------------------------------------------------------------------------

async function loadModels() {
  let models;
  try {
    models = (await (await api("/v1/models")).json()).data;
  } catch (error) {
    if (error instanceof KeyRequired) return askForKey(error.message);
    $("status").textContent = `Could not list the models: ${error.message}`;
    return;
  }
  $("key-form").hidden = true;
  $("composer").hidden = false;
  $("status").textContent = models.length ? "" : "No models are installed (see `elmd pull`).";
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...models.map((model) => {
    const option = document.createElement("option");
    option.value = option.textContent = model.id;
    return option;
  }));
  const loaded = models.find((model) => model.loaded);
  if (models.some((model) => model.id === previous)) select.value = previous;
  else if (loaded) select.value = loaded.id;
  $("prompt").focus();
}

// ---- rendering (text only) -----------------------------------------------------------

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function copyButton(getText) {
  const button = element("button", "copy", "Copy");
  button.type = "button";
  button.addEventListener("click", async () => {
    await navigator.clipboard.writeText(getText());
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  return button;
}

// Text with inline `code` and **bold**, into `parent`.
function inline(parent, text) {
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    parent.append(document.createTextNode(text.slice(last, match.index)));
    parent.append(match[1] !== undefined ? element("code", "", match[1]) : element("strong", "", match[2]));
    last = match.index + match[0].length;
  }
  parent.append(document.createTextNode(text.slice(last)));
  return parent;
}

// Paragraphs, headings and lists (- * or 1.) of the text between code blocks.
function prose(text) {
  const block = element("div", "text");
  let list = null;
  let paragraph = [];
  const endParagraph = () => {
    if (paragraph.length) block.append(inline(element("p"), paragraph.join("\n")));
    paragraph = [];
  };
  for (const line of text.split("\n")) {
    const item = LIST_ITEM.exec(line);
    const heading = HEADING.exec(line);
    if (item) {
      endParagraph();
      const tag = item[1] === undefined ? "ul" : "ol";
      if (!list || list.tagName.toLowerCase() !== tag) {
        list = block.appendChild(element(tag));
        if (item[1] !== undefined) list.start = Number(item[1]);
      }
      list.append(inline(element("li"), item[2]));
      continue;
    }
    list = null;
    if (heading) {
      endParagraph();
      block.append(inline(element(`h${heading[1].length + 2}`), heading[2]));
    } else if (line.trim()) {
      paragraph.push(line);
    } else {
      endParagraph();
    }
  }
  endParagraph();
  return block;
}

function codeBlock(code, language) {
  const block = element("div", "code");
  const pre = element("pre");
  const codeNode = element("code", "", code.replace(/\n$/, ""));
  if (language.trim()) codeNode.dataset.language = language.trim();
  pre.append(codeNode);
  block.append(pre, copyButton(() => codeNode.textContent));
  return block;
}

// A small, safe Markdown subset: fenced code blocks, paragraphs, headings, lists, `inline
// code` and **bold**; every piece of it built as elements holding text.
function render(container, text) {
  const nodes = [];
  const addProse = (part) => {
    const trimmed = part.replace(/^\n+|\n+$/g, "");
    if (trimmed) nodes.push(prose(trimmed));
  };
  let last = 0;
  for (const match of text.matchAll(FENCE)) {
    addProse(text.slice(last, match.index));
    nodes.push(codeBlock(match[2], match[1]));
    last = match.index + match[0].length;
  }
  addProse(text.slice(last));
  container.replaceChildren(...nodes);
}

function addMessage(role, text) {
  const message = element("article", `message ${role}`);
  const body = element("div", "body");
  const meta = element("div", "meta");
  const stats = element("span", "stats");
  message.append(element("div", "role", role), body, meta);
  meta.append(stats);
  render(body, text);
  $("log").append(message);
  message.scrollIntoView({ block: "end" });
  return { message, body, meta, stats };
}

// ---- streaming a reply ---------------------------------------------------------------

// The server-sent events of an OpenAI stream, parsed: each `data:` JSON until [DONE].
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      buffer = buffer.slice(end + 2);
      if (!data) continue; // a keep-alive comment
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function statsLine(model, tokens, started, first, ended, stopped) {
  const parts = [model];
  if (tokens) parts.push(`${tokens} tokens`);
  if (first !== null && tokens > 1 && ended > first) {
    parts.push(`${((tokens - 1) / ((ended - first) / 1000)).toFixed(1)} tokens/s`);
  }
  if (first !== null) parts.push(`TTFT ${Math.round(first - started)} ms`);
  if (stopped) parts.push("stopped");
  return parts.join(" · ");
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("model").disabled = busy;
}

async function send(text) {
  const model = $("model").value;
  const thisChat = chat;
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  const system = $("system").value.trim();
  const body = {
    model,
    messages: [...(system ? [{ role: "system", content: system }] : []), ...conversation],
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
  streaming = new AbortController();
  setBusy(true);
  const started = performance.now();
  let first = null;
  let content = "";
  let pieces = 0;
  let usage = null;
  let stopped = false;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", body: JSON.stringify(body), signal: streaming.signal,
    });
    for await (const event of events(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (!piece) continue;
        if (first === null) first = performance.now();
        content += piece;
        pieces += 1;
        render(reply.body, content);
      }
    }
  } catch (error) {
    if (error.name === "AbortError") stopped = true;
    else if (error instanceof KeyRequired) askForKey(error.message);
    else reply.meta.append(element("span", "error", error.message));
  } finally {
    streaming = null;
    setBusy(false);
  }
  const ended = performance.now();
  if (thisChat === chat) conversation.push({ role: "assistant", content }); // a stopped reply stays too
  const tokens = usage ? usage.completion_tokens : pieces; // a stopped stream has no usage: count pieces
  reply.stats.textContent = statsLine(model, tokens, started, first, ended, stopped);
  reply.meta.append(copyButton(() => content));
  reply.message.dataset.done = stopped ? "stopped" : "finished";
}

// ---- wiring --------------------------------------------------------------------------

function submit(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || streaming) return;
  $("prompt").value = "";
  send(text);
}

function newChat() {
  if (streaming) streaming.abort();
  chat += 1;
  conversation.length = 0;
  $("log").replaceChildren();
  $("prompt").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", submit);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => streaming && streaming.abort());
  $("new-chat").addEventListener("click", newChat);
  $("key-form").addEventListener("submit", useKey);
  loadModels();
});
