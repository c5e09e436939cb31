// Markdown into HTML for replies, safe by construction: every character of the text is escaped
// before any markup is added, and the only markup is made here (no raw HTML passes through, links
// keep only http(s) and mailto addresses). Covers what models write: fenced code (with a copy
// button), headings, lists (nested by indentation), tables, block quotes, rules, paragraphs, and
// inline code, bold, italics, strikethrough and links. A fence still open (a reply streaming in)
// renders as code up to where the text ends.

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/;

export function renderMarkdown(text) {
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i++; // the closing fence, or past the end
      out.push(codeBlock(body.join("\n"), fence[2]));
    } else if (HEADING.test(line)) {
      const [, marks, title] = line.match(HEADING);
      out.push(`<h${marks.length}>${inline(title)}</h${marks.length}>`);
      i++;
    } else if (RULE.test(line)) {
      out.push("<hr>");
      i++;
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      const rows = [line];
      i += 2;
      while (i < lines.length && lines[i].includes("|") && lines[i].trim()) rows.push(lines[i++]);
      out.push(table(rows));
    } else if (ITEM.test(line)) {
      const items = [];
      while (i < lines.length && (ITEM.test(lines[i]) || (lines[i].startsWith("  ") && lines[i].trim() && items.length))) {
        items.push(lines[i++]);
      }
      out.push(list(items));
    } else if (/^ {0,3}>/.test(line)) {
      const quoted = [];
      while (i < lines.length && /^ {0,3}>/.test(lines[i])) quoted.push(lines[i++].replace(/^ {0,3}> ?/, ""));
      out.push(`<blockquote>${renderMarkdown(quoted.join("\n"))}</blockquote>`);
    } else if (!line.trim()) {
      i++;
    } else {
      const para = [];
      while (i < lines.length && lines[i].trim() && !startsBlock(lines, i)) para.push(lines[i++]);
      if (!para.length) para.push(lines[i++]);
      out.push(`<p>${para.map(inline).join("<br>")}</p>`);
    }
  }
  return out.join("\n");
}

function startsBlock(lines, i) {
  const line = lines[i];
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || ITEM.test(line) || /^ {0,3}>/.test(line) ||
    (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) && lines[i + 1].includes("-"));
}

function codeBlock(code, language) {
  const label = language ? `<span class="lang">${escapeHtml(language)}</span>` : "";
  return `<div class="code">${label}<button type="button" class="copy" title="Copy the code">Copy</button>` +
    `<pre><code>${escapeHtml(code)}</code></pre></div>`;
}

function cells(row) {
  let text = row.trim();
  if (text.startsWith("|")) text = text.slice(1);
  if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
  return text.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function table(rows) {
  const [head, ...body] = rows;
  const columns = cells(head);
  const header = columns.map((cell) => `<th>${inline(cell)}</th>`).join("");
  const bodyRows = body.map((row) => {
    const values = cells(row);
    return `<tr>${columns.map((_, c) => `<td>${inline(values[c] ?? "")}</td>`).join("")}</tr>`;
  });
  return `<div class="table"><table><thead><tr>${header}</tr></thead><tbody>${bodyRows.join("")}</tbody></table></div>`;
}

// Items at the list's own indentation; deeper lines (sub-items, continuations) belong to the item above.
function list(lines) {
  const indent = lines[0].match(/^\s*/)[0].length;
  const ordered = /^\s*\d/.test(lines[0]);
  const items = [];
  for (const line of lines) {
    const item = line.match(ITEM);
    const depth = line.match(/^\s*/)[0].length;
    if (item && depth <= indent) items.push({ text: item[3], rest: [] });
    else if (items.length) items[items.length - 1].rest.push(line.slice(Math.min(depth, indent + 2)));
    else items.push({ text: line.trim(), rest: [] });
  }
  const start = ordered ? parseInt(lines[0].trim(), 10) : 1;
  const tag = ordered ? "ol" : "ul";
  const open = ordered && start !== 1 ? `<ol start="${start}">` : `<${tag}>`;
  const body = items.map(({ text, rest }) => {
    const nested = rest.length ? renderMarkdown(rest.join("\n")) : "";
    return `<li>${inline(text)}${nested}</li>`;
  });
  return `${open}${body.join("")}</${tag}>`;
}

// Inline markup on escaped text; code spans are cut out first so nothing inside them is touched.
export function inline(text) {
  const parts = text.split(/(`+[^`]*?`+)/);
  return parts.map((part, index) => {
    if (index % 2 === 1) {
      const ticks = part.match(/^`+/)[0].length;
      return `<code>${escapeHtml(part.slice(ticks, part.length - ticks))}</code>`;
    }
    let html = escapeHtml(part);
    html = html.replace(/\[([^\]]+)\]\(([^)\s]+)\)/g, (whole, label, href) => {
      const url = href.replace(/&amp;/g, "&");
      if (!/^(https?:\/\/|mailto:)/i.test(url)) return label;
      return `<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer">${label}</a>`;
    });
    html = html.replace(/\*\*(?=\S)(.+?)(?<=\S)\*\*/g, "<strong>$1</strong>");
    html = html.replace(/__(?=\S)(.+?)(?<=\S)__/g, "<strong>$1</strong>");
    html = html.replace(/(^|[^*\w])\*(?=\S)(.+?)(?<=\S)\*(?!\*)/g, "$1<em>$2</em>");
    html = html.replace(/(^|[^_\w])_(?=\S)(.+?)(?<=\S)_(?![_\w])/g, "$1<em>$2</em>");
    html = html.replace(/~~(?=\S)(.+?)(?<=\S)~~/g, "<del>$1</del>");
    return html;
  }).join("");
}
