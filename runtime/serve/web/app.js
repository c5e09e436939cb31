// The chat page: conversations in the browser (store.js), replies streamed from the server's
// OpenAI route (stream.js) and rendered as Markdown (markdown.js). The page talks only to the
// server that served it.

import { renderMarkdown } from "./markdown.js";
import { ConversationStore, requestMessages, titleFrom } from "./store.js";
import { chatChunks, tokensPerSecond } from "./stream.js";

const $ = (id) => document.getElementById(id);
const store = new ConversationStore(localStorage);
const KEY_ITEM = "slim.api-key"; // sessionStorage: forgotten when the tab closes
const THEME_ITEM = "slim.theme";
const THEMES = ["auto", "light", "dark"];

const state = {
  conversation: store.list()[0] ?? store.create(),
  models: [],
  contextLength: {}, // model id -> tokens per sequence, for the loaded ones
  running: null, // the AbortController of the reply that streams, if one does
};

// ---- talking to the server -------------------------------------------------------------------

async function api(path, options = {}) {
  for (;;) {
    const headers = { ...(options.headers ?? {}) };
    const key = sessionStorage.getItem(KEY_ITEM);
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    sessionStorage.removeItem(KEY_ITEM);
    sessionStorage.setItem(KEY_ITEM, await askForKey());
  }
}

function askForKey() {
  const dialog = $("key-dialog");
  return new Promise((resolve) => {
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      const key = $("key").value.trim();
      if (!key) return;
      dialog.close();
      resolve(key);
    };
    if (!dialog.open) dialog.showModal();
    $("key").focus();
  });
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    return body.error?.message ?? body.error ?? text;
  } catch {
    return text || `the server answered ${response.status}`;
  }
}

async function loadModels() {
  try {
    const [models, health] = await Promise.all([api("/v1/models"), fetch("/health")]);
    if (!models.ok) throw new Error(await errorMessage(models));
    state.models = (await models.json()).data;
    if (health.ok) {
      for (const [id, info] of Object.entries((await health.json()).models ?? {})) {
        if (info.context_length) state.contextLength[id] = info.context_length;
      }
    }
  } catch (error) {
    notice(`Cannot list the models: ${error.message}`);
    return;
  }
  renderModels();
}

// ---- rendering ---------------------------------------------------------------------------------

function notice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

function renderModels() {
  const select = $("model");
  const chosen = state.conversation.model ?? select.value;
  select.replaceChildren(...state.models.map((model) => {
    const option = new Option(`${model.id}${model.state === "loaded" ? "" : ` (${model.state})`}`, model.id);
    option.dataset.state = model.state;
    return option;
  }));
  if (state.models.some((m) => m.id === chosen)) select.value = chosen;
  else if (state.models.length) select.value = (state.models.find((m) => m.state === "loaded") ?? state.models[0]).id;
  const model = state.models.find((m) => m.id === select.value);
  $("model-state").textContent = !model ? "" : model.state === "loaded" ? "loaded" : "loads on first use";
}

function renderSidebar() {
  const list = $("conversations");
  const found = store.search($("search").value);
  list.replaceChildren(...found.map((conversation) => {
    const item = document.createElement("li");
    item.dataset.id = conversation.id;
    item.classList.toggle("current", conversation.id === state.conversation.id);
    const title = document.createElement("button");
    title.type = "button";
    title.className = "title";
    title.textContent = conversation.title;
    title.title = conversation.title;
    title.onclick = () => openConversation(conversation.id);
    const rename = smallButton("✎", "Rename", () => startRename(item, conversation));
    const remove = smallButton("×", "Delete", () => {
      if (!confirm(`Delete “${conversation.title}”?`)) return;
      store.remove(conversation.id);
      if (conversation.id === state.conversation.id) state.conversation = store.list()[0] ?? store.create();
      renderAll();
    });
    item.append(title, rename, remove);
    return item;
  }));
}

function smallButton(text, label, onclick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "small " + label.toLowerCase();
  button.textContent = text;
  button.title = label;
  button.setAttribute("aria-label", label);
  button.onclick = onclick;
  return button;
}

function startRename(item, conversation) {
  const input = document.createElement("input");
  input.value = conversation.title;
  input.setAttribute("aria-label", "New title");
  const title = item.querySelector(".title");
  title.replaceChildren(input);
  input.focus();
  input.select();
  const finish = (save) => {
    if (save) {
      store.rename(conversation.id, input.value);
      if (conversation.id === state.conversation.id) state.conversation.title = input.value.trim() || conversation.title;
    }
    renderSidebar();
  };
  input.onkeydown = (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") finish(false);
    event.stopPropagation();
  };
  input.onblur = () => finish(true);
  input.onclick = (event) => event.stopPropagation();
}

function renderMessages() {
  const box = $("messages");
  const { messages } = state.conversation;
  box.replaceChildren(...messages.map((message, index) => messageElement(message, index === messages.length - 1)));
  if (!messages.length) {
    const empty = document.createElement("p");
    empty.id = "empty";
    empty.className = "muted";
    empty.textContent = "Ask anything. Everything stays on this machine.";
    box.append(empty);
  }
  box.scrollTop = box.scrollHeight;
}

function messageElement(message, last) {
  const element = document.createElement("div");
  element.className = `message ${message.role}${message.error ? " error" : ""}`;
  if (message.thinking) {
    const details = document.createElement("details");
    details.className = "thinking";
    details.innerHTML = "<summary>Thought</summary>";
    const thought = document.createElement("div");
    thought.className = "thought";
    thought.textContent = message.thinking;
    details.append(thought);
    element.append(details);
  }
  const content = document.createElement("div");
  content.className = "content";
  if (message.role === "assistant" && !message.error) content.innerHTML = renderMarkdown(message.content);
  else content.textContent = message.content;
  element.append(content);
  const stats = document.createElement("div");
  stats.className = "stats";
  stats.textContent = statsText(message);
  element.append(stats);
  const running = state.running !== null;
  const actions = document.createElement("div");
  actions.className = "actions";
  if (last && !running && message.role === "assistant") actions.append(textButton("Regenerate", regenerate));
  const lastUser = state.conversation.messages.findLastIndex((m) => m.role === "user");
  if (!running && message.role === "user" && state.conversation.messages[lastUser] === message) {
    actions.append(textButton("Edit", editLast));
    if (last) actions.append(textButton("Retry", generate)); // its reply failed or was never asked for
  }
  element.append(actions);
  return element;
}

function textButton(text, onclick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = text.toLowerCase();
  button.textContent = text;
  button.onclick = onclick;
  return button;
}

function statsText(message) {
  const s = message.stats;
  if (!s) return message.stopped ? "stopped" : "";
  const parts = [`${s.completionTokens} tokens`];
  if (s.tokensPerSecond) parts.push(`${s.tokensPerSecond.toFixed(1)} tokens/s`);
  if (s.contextUsed) parts.push(`context ${s.contextUsed}${s.contextLength ? ` of ${s.contextLength}` : ""}`);
  if (message.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function renderSettings() {
  const c = state.conversation;
  $("system").value = c.system;
  $("temperature").value = c.temperature;
  $("max-tokens").value = c.maxTokens ?? "";
}

function renderComposer() {
  const running = state.running !== null;
  $("send").hidden = running;
  $("stop").hidden = !running;
}

function renderAll() {
  renderSidebar();
  renderMessages();
  renderSettings();
  renderModels();
  renderComposer();
}

// The streaming reply's element is redrawn at most once a frame, not once a token.
let redrawQueued = false;
function redrawReply() {
  if (redrawQueued) return;
  redrawQueued = true;
  requestAnimationFrame(() => {
    redrawQueued = false;
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const last = box.lastElementChild;
    const { messages } = state.conversation;
    if (last && messages.length) last.replaceWith(messageElement(messages[messages.length - 1], true));
    if (atBottom) box.scrollTop = box.scrollHeight;
  });
}

// ---- conversations -----------------------------------------------------------------------------

function saveConversation() {
  try {
    store.save(state.conversation);
  } catch (error) {
    notice(`This browser's storage is full, so the conversation was not saved: delete or export some (${error.name})`);
  }
}

function openConversation(id) {
  if (state.running) stop();
  const conversation = store.get(id);
  if (!conversation) return;
  state.conversation = conversation;
  document.body.classList.remove("sidebar-open");
  notice("");
  renderAll();
}

function newConversation() {
  if (state.running) stop();
  const c = state.conversation;
  state.conversation = store.create({ model: $("model").value || null, system: c.system, temperature: c.temperature, maxTokens: c.maxTokens });
  notice("");
  renderAll();
  $("prompt").focus();
}

function readSettings() {
  const c = state.conversation;
  c.system = $("system").value;
  const temperature = Number($("temperature").value);
  c.temperature = Number.isFinite(temperature) && temperature >= 0 ? temperature : 0.8;
  const maxTokens = Math.floor(Number($("max-tokens").value));
  c.maxTokens = $("max-tokens").value.trim() && maxTokens >= 1 ? maxTokens : null;
  c.model = $("model").value || c.model;
}

// ---- generation --------------------------------------------------------------------------------

async function send() {
  const text = $("prompt").value;
  if (!text.trim() || state.running) return;
  readSettings();
  const c = state.conversation;
  if (!c.messages.length) c.title = titleFrom(text);
  c.messages.push({ role: "user", content: text });
  $("prompt").value = "";
  saveConversation();
  await generate();
}

async function generate() {
  const c = state.conversation;
  const history = requestMessages(c);
  const reply = { role: "assistant", content: "", thinking: "" };
  const controller = new AbortController();
  state.running = controller;
  c.messages.push(reply);
  notice("");
  renderAll();
  const body = {
    model: c.model, messages: history, stream: true, stream_options: { include_usage: true },
    temperature: c.temperature, ...(c.maxTokens ? { max_tokens: c.maxTokens } : {}),
  };
  let firstAt = null;
  let lastAt = null;
  let pieces = 0;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of chatChunks(response)) {
      const delta = chunk.choices?.[0]?.delta ?? {};
      if (delta.reasoning_content || delta.content) {
        lastAt = performance.now();
        firstAt ??= lastAt;
        pieces++;
      }
      if (delta.reasoning_content) reply.thinking += delta.reasoning_content;
      if (delta.content) reply.content += delta.content;
      if (chunk.usage) {
        const tokens = chunk.usage.completion_tokens;
        reply.stats = {
          completionTokens: tokens,
          tokensPerSecond: tokensPerSecond(tokens, firstAt, lastAt),
          contextUsed: chunk.usage.total_tokens,
          contextLength: state.contextLength[c.model] ?? null,
        };
      }
      redrawReply();
    }
  } catch (error) {
    if (error.name === "AbortError") {
      reply.stopped = true;
      if (!reply.stats && pieces) reply.stats = { completionTokens: pieces, tokensPerSecond: tokensPerSecond(pieces, firstAt, lastAt) };
    } else if (!reply.content) {
      reply.content = error.message;
      reply.error = true;
    } else {
      notice(`The reply broke off: ${error.message}`);
    }
  } finally {
    state.running = null;
    if (reply.error) c.messages.pop();
    saveConversation();
    if (reply.error) notice(reply.content);
    renderAll();
    // the model may have loaded for this reply: its state, and the context the reply had
    loadModels().then(() => {
      if (reply.stats && !reply.stats.contextLength && state.contextLength[c.model]) {
        reply.stats.contextLength = state.contextLength[c.model];
        saveConversation();
        renderMessages();
      }
    });
  }
}

function stop() {
  state.running?.abort();
}

function regenerate() {
  const { messages } = state.conversation;
  if (state.running || messages[messages.length - 1]?.role !== "assistant") return;
  messages.pop();
  readSettings();
  generate();
}

// The last user message goes back into the composer, and it and what followed leave the conversation.
function editLast() {
  const { messages } = state.conversation;
  const index = messages.findLastIndex((m) => m.role === "user");
  if (state.running || index < 0) return;
  $("prompt").value = messages[index].content;
  messages.length = index;
  saveConversation();
  renderAll();
  $("prompt").focus();
}

// ---- import, export, theme ---------------------------------------------------------------------

function exportConversations() {
  const blob = new Blob([store.exportJSON()], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `slim-conversations-${new Date().toISOString().slice(0, 10)}.json`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

async function importConversations(file) {
  try {
    const count = store.importJSON(await file.text());
    notice("");
    renderSidebar();
    $("search").placeholder = `Search conversations (${count} imported)`;
  } catch (error) {
    notice(`Import failed: ${error.message}`);
  }
}

function applyTheme(theme) {
  if (theme === "auto") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  $("theme").textContent = `Theme: ${theme}`;
}

// ---- wiring ------------------------------------------------------------------------------------

$("composer").onsubmit = (event) => {
  event.preventDefault();
  send();
};
$("prompt").onkeydown = (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
};
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && state.running) stop();
});
$("stop").onclick = stop;
$("new-chat").onclick = newConversation;
$("search").oninput = renderSidebar;
$("export").onclick = exportConversations;
$("import-button").onclick = () => $("import").click();
$("import").onchange = () => {
  const [file] = $("import").files;
  if (file) importConversations(file);
  $("import").value = "";
};
$("theme").onclick = () => {
  const next = THEMES[(THEMES.indexOf(localStorage.getItem(THEME_ITEM) ?? "auto") + 1) % THEMES.length];
  localStorage.setItem(THEME_ITEM, next);
  applyTheme(next);
};
$("settings-toggle").onclick = () => {
  const hidden = !$("settings").hidden;
  $("settings").hidden = hidden;
  $("settings-toggle").setAttribute("aria-expanded", String(!hidden));
};
$("toggle-sidebar").onclick = () => document.body.classList.toggle("sidebar-open");
for (const id of ["system", "temperature", "max-tokens"]) {
  $(id).onchange = () => {
    readSettings();
    if (state.conversation.messages.length) saveConversation();
  };
}
$("model").onchange = () => {
  state.conversation.model = $("model").value;
  if (state.conversation.messages.length) saveConversation();
  renderModels();
};
$("messages").addEventListener("click", async (event) => {
  const button = event.target.closest("button.copy");
  if (!button) return;
  const code = button.parentElement.querySelector("code").textContent;
  try {
    await navigator.clipboard.writeText(code);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Select and copy";
  }
  setTimeout(() => (button.textContent = "Copy"), 1500);
});

applyTheme(localStorage.getItem(THEME_ITEM) ?? "auto");
renderAll();
loadModels();
$("prompt").focus();
