// The stream parser: events cut anywhere by the network still come out whole.
import assert from "node:assert/strict";
import { test } from "node:test";

import { chatChunks, EventParser, tokensPerSecond } from "../../runtime/serve/web/stream.js";

const STREAM = 'data: {"a":1}\n\n: a comment\n\ndata: {"b":"x\\ny"}\r\n\r\nevent: ping\ndata: one\ndata: two\n\ndata: [DONE]\n\n';

test("every split of a stream gives the same events", () => {
  const whole = new EventParser().push(STREAM);
  assert.deepEqual(whole, ['{"a":1}', '{"b":"x\\ny"}', "one\ntwo", "[DONE]"]);
  for (let cut = 0; cut <= STREAM.length; cut++) {
    const parser = new EventParser();
    const events = [...parser.push(STREAM.slice(0, cut)), ...parser.push(STREAM.slice(cut))];
    assert.deepEqual(events, whole, `cut at ${cut}`);
  }
});

test("one character at a time, CRLF split between pieces", () => {
  const parser = new EventParser();
  const events = [];
  for (const c of "data: x\r\n\r\ndata: y\r\r\n") events.push(...parser.push(c));
  assert.deepEqual(events, ["x", "y"]);
});

function response(pieces) {
  const encoder = new TextEncoder();
  const body = new ReadableStream({
    start(controller) {
      for (const piece of pieces) controller.enqueue(encoder.encode(piece));
      controller.close();
    },
  });
  return new Response(body);
}

test("chatChunks yields the JSON chunks and stops at [DONE]", async () => {
  // a multi-byte character cut between two network reads
  const text = 'data: {"choices":[{"delta":{"content":"é"}}]}\n\ndata: [DONE]\n\ndata: {"late":1}\n\n';
  const bytes = new TextEncoder().encode(text);
  const cut = text.indexOf("é") + 1;
  const decoder = new TextDecoder();
  const pieces = [decoder.decode(bytes.slice(0, cut)), decoder.decode(bytes.slice(cut))];
  assert.equal(pieces.join("").includes("é"), false); // the cut really splits the character
  const body = new ReadableStream({
    start(controller) {
      controller.enqueue(bytes.slice(0, cut));
      controller.enqueue(bytes.slice(cut));
      controller.close();
    },
  });
  const chunks = [];
  for await (const chunk of chatChunks(new Response(body))) chunks.push(chunk);
  assert.deepEqual(chunks, [{ choices: [{ delta: { content: "é" } }] }]);
});

test("an error inside the stream is thrown with its message", async () => {
  const stream = response(['data: {"error":{"message":"the model failed"}}\n\n']);
  await assert.rejects(async () => {
    for await (const _ of chatChunks(stream));
  }, /the model failed/);
});

test("a stream cut off without a blank line still gives its last event", async () => {
  const chunks = [];
  for await (const chunk of chatChunks(response(['data: {"n":1}']))) chunks.push(chunk);
  assert.deepEqual(chunks, [{ n: 1 }]);
});

test("tokens per second counts the gaps between tokens", () => {
  assert.equal(tokensPerSecond(11, 1000, 2000), 10);
  assert.equal(tokensPerSecond(1, 1000, 1000), null);
});
