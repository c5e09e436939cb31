// The Markdown renderer: what models write comes out as markup, and nothing in the text becomes markup.
import assert from "node:assert/strict";
import { test } from "node:test";

import { renderMarkdown } from "../../runtime/serve/web/markdown.js";

test("code blocks are escaped, labelled, and get a copy button", () => {
  const html = renderMarkdown("Here:\n```python\nif a < b and c > d:\n    print('<b>')\n```\nDone.");
  assert.match(html, /<p>Here:<\/p>/);
  assert.match(html, /<span class="lang">python<\/span><button type="button" class="copy"/);
  assert.match(html, /<pre><code>if a &lt; b and c &gt; d:\n    print\(&#39;&lt;b&gt;&#39;\)<\/code><\/pre>/);
  assert.match(html, /<p>Done.<\/p>$/);
});

test("a fence still open while streaming renders as code", () => {
  assert.match(renderMarkdown("```\nx = 1"), /<pre><code>x = 1<\/code><\/pre>/);
});

test("tables, with alignment rows and escaped pipes", () => {
  const html = renderMarkdown("| Name | Size |\n|:-----|-----:|\n| Q4_K | 4.5 \\| bits |\n| Q8_0 |\n");
  assert.match(html, /<thead><tr><th>Name<\/th><th>Size<\/th><\/tr><\/thead>/);
  assert.match(html, /<tr><td>Q4_K<\/td><td>4.5 \| bits<\/td><\/tr>/);
  assert.match(html, /<tr><td>Q8_0<\/td><td><\/td><\/tr>/);
});

test("lists, ordered from their first number, and nested", () => {
  assert.equal(renderMarkdown("- a\n- b"), "<ul><li>a</li><li>b</li></ul>");
  assert.equal(renderMarkdown("3. c\n4. d"), '<ol start="3"><li>c</li><li>d</li></ol>');
  assert.equal(renderMarkdown("- a\n  - a1\n- b"), "<ul><li>a<ul><li>a1</li></ul></li><li>b</li></ul>");
});

test("headings, quotes, rules and inline marks", () => {
  assert.equal(renderMarkdown("## Title ##"), "<h2>Title</h2>");
  assert.equal(renderMarkdown("> quoted"), "<blockquote><p>quoted</p></blockquote>");
  assert.equal(renderMarkdown("---"), "<hr>");
  assert.equal(
    renderMarkdown("**bold**, *it*, ~~gone~~, `a*b*c` and snake_case_name"),
    "<p><strong>bold</strong>, <em>it</em>, <del>gone</del>, <code>a*b*c</code> and snake_case_name</p>",
  );
});

test("raw HTML and script links stay text", () => {
  const html = renderMarkdown('<img src=x onerror=alert(1)> [click](javascript:alert(1)) [ok](https://example.org/?a=1&b="2")');
  assert.ok(!html.includes("<img"));
  assert.ok(html.includes("&lt;img src=x onerror=alert(1)&gt;"));
  assert.ok(!html.includes("javascript:"));
  assert.match(html, /<a href="https:\/\/example.org\/\?a=1&amp;b=&amp;quot;2&amp;quot;" target="_blank" rel="noopener noreferrer">ok<\/a>/);
});

test("every tag in the output is one the renderer makes", () => {
  const allowed = new Set(["p", "br", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "ul", "ol", "li", "blockquote", "div", "span",
    "button", "pre", "code", "table", "thead", "tbody", "tr", "th", "td", "strong", "em", "del", "a"]);
  const nasty = ["<script>x</script>", "`<b>`", "**<i>**", "| <x> |\n|---|\n| <y> |", "- <svg onload=1>", "> <iframe>",
    "```\n</code></pre><script>\n```", "[<b>](https://a)", "# <h1>", "_<u>_"];
  for (const text of nasty) {
    for (const [, tag] of renderMarkdown(text).matchAll(/<\/?([a-z0-9]+)/g)) assert.ok(allowed.has(tag), `${tag} from ${text}`);
  }
});
