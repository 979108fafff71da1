// The frame both pages share: one self-contained HTML file. Nothing is
// fetched: the charting library (uPlot) and its stylesheet are read from
// node_modules when the page is generated and inlined, the data travel in a
// JSON island, and a Content-Security-Policy meta tag forbids every fetch
// (default-src 'none'), so a page that tried one would show it as a console
// error rather than quietly phone out.
//
// Image names and error messages are untrusted text (a name comes from a
// file name or a peer). Everything placed in markup goes through escapeHtml;
// everything placed in the JSON island through jsonForScript, which escapes
// '<' so that no string can close the <script> element; the page's own
// script puts them into the DOM with textContent only.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { writeFileAtomic } from '../io/atomic.js';

const require = createRequire(import.meta.url);

/** The policy every page carries: inline script and style, data: images, nothing else. */
export const PAGE_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:";

const HTML_ESCAPES: Record<string, string> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };

/** Text safe inside an element or a quoted attribute. */
export function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => HTML_ESCAPES[c]!);
}

/** JSON that can sit inside <script type="application/json">: no '<' (so no "</script>"), no line separators. */
export function jsonForScript(value: unknown): string {
  return JSON.stringify(value).replace(/</g, '\\u003c').replace(/\u2028/g, '\\u2028').replace(/\u2029/g, '\\u2029');
}

/** Library code inlined as a script: a "</script" inside it (there is none today) must not end the element. */
function inlineScript(code: string): string {
  return code.replace(/<\/(script)/gi, '<\\/$1').replace(/<!--/g, '<\\!--');
}

let uplot: { js: string; css: string } | undefined;

/** uPlot's minified IIFE build (defines the global uPlot) and its stylesheet, read once. */
export function uplotAssets(): { js: string; css: string } {
  uplot ??= {
    js: inlineScript(readFileSync(require.resolve('uplot/dist/uPlot.iife.min.js'), 'utf8')),
    css: readFileSync(require.resolve('uplot/dist/uPlot.min.css'), 'utf8'),
  };
  return uplot;
}

/** Bytes with binary units, as the CLI prints them. */
export function humanBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes, u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return `${u === 0 ? v : v.toFixed(v >= 100 ? 0 : 1)} ${units[u]}`;
}

/** The same formatter, for the page's own script. */
export const HUMAN_BYTES_JS = `function humanBytes(b){var u=['B','KiB','MiB','GiB','TiB'],v=b,i=0;while(v>=1024&&i<u.length-1){v/=1024;i++;}return i===0?v+' '+u[i]:v.toFixed(v>=100?0:1)+' '+u[i];}`;

const BASE_CSS = `
:root{--fg:#1d2330;--muted:#5b6475;--line:#d9dee7;--bg:#fff;--accent:#2f6fde}
*{box-sizing:border-box}
body{margin:0;padding:24px 32px;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);background:var(--bg)}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}h3{font-size:14px;margin:0 0 6px;color:var(--muted);font-weight:600}
.meta{color:var(--muted);margin:0 0 16px}
table.facts{border-collapse:collapse;margin:8px 0}
table.facts th,table.facts td{border-bottom:1px solid var(--line);padding:3px 12px 3px 0;text-align:left;font-weight:normal;vertical-align:top}
table.facts th{color:var(--muted)}
table.facts td.num{text-align:right;font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:32px;align-items:flex-start}
#tip{position:fixed;pointer-events:none;background:#1d2330;color:#fff;padding:6px 9px;border-radius:4px;font-size:12px;max-width:420px;display:none;z-index:10;white-space:pre-line}
.banner{padding:10px 14px;border-radius:4px;margin:8px 0 16px;font-weight:600}
.banner.ok{background:#e5f4ea;color:#17602f}.banner.failed{background:#fde8e8;color:#9b1c1c}
.uplot{font-family:inherit}
`;

/**
 * A whole page: title (escaped here), body markup (already escaped by the
 * caller), the data island, and the page's own script, which runs after
 * uPlot is defined and reads the island with JSON.parse.
 */
export function page(o: { title: string; body: string; css?: string; data: unknown; script: string }): string {
  const { js, css } = uplotAssets();
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="${PAGE_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="blockferry">
<title>${escapeHtml(o.title)}</title>
<link rel="icon" href="data:,">
<style>${css}</style>
<style>${BASE_CSS}${o.css ?? ''}</style>
</head>
<body>
${o.body}
<div id="tip" role="tooltip"></div>
<script type="application/json" id="report-data">${jsonForScript(o.data)}</script>
<script>${js}</script>
<script>
"use strict";
(function(){
var DATA = JSON.parse(document.getElementById('report-data').textContent);
${HUMAN_BYTES_JS}
var tip = document.getElementById('tip');
function showTip(text, x, y){ tip.textContent = text; tip.style.display = 'block';
  var w = tip.offsetWidth, h = tip.offsetHeight;
  tip.style.left = Math.min(x + 14, window.innerWidth - w - 4) + 'px'; tip.style.top = Math.min(y + 14, window.innerHeight - h - 4) + 'px'; }
function hideTip(){ tip.style.display = 'none'; }
${o.script}
})();
</script>
</body>
</html>
`;
}

/** Writes a page atomically (a reader sees the old page or the new one, never half). */
export function writePage(file: string, html: string, what = 'HTML page'): void {
  writeFileAtomic(file, [Buffer.from(html, 'utf8')], what);
}
