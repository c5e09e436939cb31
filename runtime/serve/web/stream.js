// Server-sent events out of a streamed fetch answer, as OpenAI's streams send them: events are
// separated by a blank line, each line "field: value"; "data" lines join with "\n"; lines that
// start with ":" are comments; the stream ends with "data: [DONE]". Chunks may cut an event, a
// line or a CRLF anywhere, so the parser keeps what it has not finished.

export class EventParser {
  constructor() {
    this.pending = "";
    this.data = [];
  }

  // Feed the next piece of text; returns the data of every event it completed.
  push(text) {
    this.pending += text;
    const done = [];
    let end;
    // a trailing "\r" may be the first half of "\r\n": leave it for the next piece
    while ((end = this.#lineEnd()) >= 0) {
      const line = this.pending.slice(0, end);
      const width = this.pending.startsWith("\r\n", end) ? 2 : 1;
      this.pending = this.pending.slice(end + width);
      if (line === "") {
        if (this.data.length) done.push(this.data.join("\n"));
        this.data = [];
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") this.data.push(value);
      }
    }
    return done;
  }

  #lineEnd() {
    for (let i = 0; i < this.pending.length; i++) {
      const c = this.pending[i];
      if (c === "\n") return i;
      if (c === "\r") return i + 1 < this.pending.length ? i : -1;
    }
    return -1;
  }
}

// The JSON objects of a chat completion stream, one per event, until [DONE]. An error the server
// sends inside the stream ({"error": ...}) is thrown as an Error with its message.
export async function* chatChunks(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const parser = new EventParser();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      const text = done ? decoder.decode() : decoder.decode(value, { stream: true });
      for (const data of parser.push(done ? text + "\n\n" : text)) {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || String(chunk.error));
        yield chunk;
      }
      if (done) return;
    }
  } finally {
    reader.releaseLock();
  }
}

// Tokens per second of a reply: its completion tokens over the time from its first token to its last.
export function tokensPerSecond(tokens, firstAt, lastAt) {
  const seconds = (lastAt - firstAt) / 1000;
  return tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : null;
}
