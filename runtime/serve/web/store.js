// Conversations, kept in the browser's localStorage (nothing leaves the machine): one entry per
// conversation under "slim.conversation.<id>", so saving one reply rewrites that conversation only.
// A conversation: {id, title, created, updated, model, system, temperature, maxTokens,
// messages: [{role: "user" | "assistant", content, thinking?, stats?}]}.

const PREFIX = "slim.conversation.";
export const EXPORT_FORMAT = "slim-conversations";

export function newId() {
  const bytes = new Uint8Array(9);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export class ConversationStore {
  // storage: anything with the Web Storage interface (the page gives localStorage)
  constructor(storage) {
    this.storage = storage;
  }

  create(settings = {}) {
    const now = Date.now();
    return {
      id: newId(), title: "New chat", created: now, updated: now, messages: [],
      model: settings.model ?? null, system: settings.system ?? "",
      temperature: settings.temperature ?? 0.8, maxTokens: settings.maxTokens ?? null, // null: what fits
    };
  }

  // Newest first.
  list() {
    const found = [];
    for (let i = 0; i < this.storage.length; i++) {
      const key = this.storage.key(i);
      if (key && key.startsWith(PREFIX)) {
        const conversation = this.get(key.slice(PREFIX.length));
        if (conversation) found.push(conversation);
      }
    }
    return found.sort((a, b) => b.updated - a.updated);
  }

  get(id) {
    const text = this.storage.getItem(PREFIX + id);
    if (text === null) return null;
    try {
      const conversation = JSON.parse(text);
      return valid(conversation) ? conversation : null;
    } catch {
      return null; // an entry something else wrote: not ours to show
    }
  }

  // Throws when the browser's storage is full (QuotaExceededError), so the page can say so.
  save(conversation) {
    conversation.updated = Date.now();
    this.storage.setItem(PREFIX + conversation.id, JSON.stringify(conversation));
    return conversation;
  }

  rename(id, title) {
    const conversation = this.get(id);
    if (!conversation) return null;
    conversation.title = title.trim() || conversation.title;
    return this.save(conversation);
  }

  remove(id) {
    this.storage.removeItem(PREFIX + id);
  }

  // Those whose title or any message holds every word of the query (case ignored).
  search(query) {
    const words = query.toLowerCase().split(/\s+/).filter(Boolean);
    if (!words.length) return this.list();
    return this.list().filter((c) => {
      const text = [c.title, c.system, ...c.messages.map((m) => m.content)].join("\n").toLowerCase();
      return words.every((word) => text.includes(word));
    });
  }

  exportJSON() {
    return JSON.stringify({ format: EXPORT_FORMAT, version: 1, conversations: this.list() }, null, 2);
  }

  // Adds the conversations of an export; one whose id is taken gets a new id, so nothing is
  // overwritten. Returns how many were added; throws an Error that says what is wrong otherwise.
  importJSON(text) {
    let data;
    try {
      data = JSON.parse(text);
    } catch {
      throw new Error("the file is not JSON; choose a file that slim's Export wrote");
    }
    if (!data || data.format !== EXPORT_FORMAT || !Array.isArray(data.conversations)) {
      throw new Error("the file is not a slim conversations export; choose a file that slim's Export wrote");
    }
    const bad = data.conversations.findIndex((c) => !valid(c));
    if (bad >= 0) throw new Error(`conversation ${bad + 1} in the file is damaged; nothing was imported`);
    for (const conversation of data.conversations) {
      const copy = { ...conversation };
      if (this.storage.getItem(PREFIX + copy.id) !== null) copy.id = newId();
      this.storage.setItem(PREFIX + copy.id, JSON.stringify(copy));
    }
    return data.conversations.length;
  }
}

function valid(c) {
  return Boolean(c) && typeof c.id === "string" && /^[\w-]{1,64}$/.test(c.id) && typeof c.title === "string" &&
    typeof c.updated === "number" && Array.isArray(c.messages) &&
    c.messages.every((m) => m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string");
}

// The messages a request sends: the system prompt, then the turns (thinking stays in the page).
export function requestMessages(conversation) {
  const messages = conversation.system.trim() ? [{ role: "system", content: conversation.system }] : [];
  return messages.concat(conversation.messages.map(({ role, content }) => ({ role, content })));
}

// A title from the first user message: its first line, cut at a word near 40 characters.
export function titleFrom(text) {
  const line = text.trim().split("\n")[0];
  if (line.length <= 40) return line || "New chat";
  const cut = line.slice(0, 40);
  return (cut.includes(" ") ? cut.slice(0, cut.lastIndexOf(" ")) : cut) + "…";
}
