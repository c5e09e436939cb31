// The conversation store, over an in-memory object with the Web Storage interface.
import assert from "node:assert/strict";
import { test } from "node:test";

import { ConversationStore, requestMessages, titleFrom } from "../../runtime/serve/web/store.js";

class MemoryStorage {
  #items = new Map();
  get length() { return this.#items.size; }
  key(i) { return [...this.#items.keys()][i] ?? null; }
  getItem(k) { return this.#items.has(k) ? this.#items.get(k) : null; }
  setItem(k, v) { this.#items.set(k, String(v)); }
  removeItem(k) { this.#items.delete(k); }
}

function conversation(store, title, ...contents) {
  const c = store.create({ model: "smollm2-135m" });
  c.title = title;
  c.messages = contents.map((content, i) => ({ role: i % 2 ? "assistant" : "user", content }));
  return store.save(c);
}

test("saved conversations come back newest first, renamed and deleted", async () => {
  const store = new ConversationStore(new MemoryStorage());
  const first = conversation(store, "first", "hello");
  await new Promise((r) => setTimeout(r, 5));
  const second = conversation(store, "second", "bye");
  assert.deepEqual(store.list().map((c) => c.title), ["second", "first"]);
  store.rename(first.id, "  renamed ");
  assert.equal(store.get(first.id).title, "renamed");
  assert.equal(store.list()[0].id, first.id); // renaming touches it
  store.rename(first.id, "   ");
  assert.equal(store.get(first.id).title, "renamed");
  store.remove(second.id);
  assert.deepEqual(store.list().map((c) => c.id), [first.id]);
});

test("search matches every word, in titles and messages, case ignored", () => {
  const store = new ConversationStore(new MemoryStorage());
  conversation(store, "Quantization", "what is Q4_K?", "a 4-bit type");
  conversation(store, "Cooking", "pasta tonight", "boil water");
  assert.deepEqual(store.search("q4_k").map((c) => c.title), ["Quantization"]);
  assert.deepEqual(store.search("BOIL pasta").map((c) => c.title), ["Cooking"]);
  assert.deepEqual(store.search("pasta q4_k"), []);
  assert.equal(store.search("  ").length, 2);
});

test("export and import round-trip; taken ids get new ones; nothing is overwritten", () => {
  const store = new ConversationStore(new MemoryStorage());
  const c = conversation(store, "kept", "one", "two");
  const exported = store.exportJSON();
  assert.equal(store.importJSON(exported), 1);
  const all = store.list();
  assert.equal(all.length, 2);
  assert.equal(new Set(all.map((x) => x.id)).size, 2);
  assert.ok(all.every((x) => x.title === "kept" && x.messages.length === 2));
  const other = new ConversationStore(new MemoryStorage());
  other.importJSON(exported);
  assert.deepEqual(other.list()[0], JSON.parse(exported).conversations[0]);
  assert.equal(store.get(c.id).messages[1].content, "two");
});

test("a bad import says what is wrong and adds nothing", () => {
  const store = new ConversationStore(new MemoryStorage());
  assert.throws(() => store.importJSON("not json"), /not JSON/);
  assert.throws(() => store.importJSON('{"conversations": []}'), /not a slim conversations export/);
  const damaged = { format: "slim-conversations", version: 1, conversations: [
    { id: "a", title: "ok", updated: 1, messages: [] },
    { id: "b", title: "bad", updated: 1, messages: [{ role: "system", content: 1 }] },
  ] };
  assert.throws(() => store.importJSON(JSON.stringify(damaged)), /conversation 2 .* damaged; nothing was imported/);
  assert.equal(store.list().length, 0);
});

test("entries that are not conversations are passed over", () => {
  const storage = new MemoryStorage();
  storage.setItem("slim.conversation.x", "{broken");
  storage.setItem("slim.conversation.y", '{"id": "y"}');
  storage.setItem("other", "1");
  assert.deepEqual(new ConversationStore(storage).list(), []);
});

test("request messages and titles", () => {
  const store = new ConversationStore(new MemoryStorage());
  const c = store.create({ system: "Be brief." });
  c.messages = [{ role: "user", content: "hi" }, { role: "assistant", content: "hello", thinking: "greet", stats: {} }];
  assert.deepEqual(requestMessages(c), [
    { role: "system", content: "Be brief." }, { role: "user", content: "hi" }, { role: "assistant", content: "hello" },
  ]);
  assert.equal(titleFrom("  short question\nmore"), "short question");
  assert.equal(titleFrom("a".repeat(50)), "a".repeat(40) + "…");
  assert.equal(titleFrom("how do I convert a model to four bits without losing quality"), "how do I convert a model to four bits…");
});
