// The similarity page: for each block size, the similarity matrix of paper
// 001 (Table 3) and the bytes still to send as heatmaps, each cell coloured
// by its value, the value on hover; with several block sizes, the sweep of
// paper 001's Fig. 6 (similarity against block size) as a uPlot chart.
//
// The heatmaps are HTML tables built here, not a chart: a table's rows and
// columns carry the labels, every cell its exact value in data-value (what a
// test or a screen reader reads), and the colour is one inline background.
import { basename } from 'node:path';
import type { SimilarityMatrix } from '../similarity/similarity.js';
import { escapeHtml, humanBytes, page } from './html.js';

/** Viridis, 9 stops: perceptually even, readable in grey, safe for colour-blind readers. */
const VIRIDIS = ['#440154', '#472d7b', '#3b528b', '#2c728e', '#21918c', '#28ae80', '#5ec962', '#addc30', '#fde725'];
/** Light to dark orange: bytes still to send (more is worse, darker). */
const ORANGES = ['#fff5eb', '#fee6ce', '#fdd0a2', '#fdae6b', '#fd8d3c', '#f16913', '#d94801', '#a63603', '#7f2704'];

/** The colour of x in [0, 1] on a scale of evenly spaced stops (linear in RGB between stops). */
export function colourAt(stops: string[], x: number): string {
  const v = Math.min(1, Math.max(0, Number.isFinite(x) ? x : 0)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(v));
  const f = v - i;
  const rgb = (h: string) => [1, 3, 5].map((k) => parseInt(h.slice(k, k + 2), 16));
  const a = rgb(stops[i]!), b = rgb(stops[i + 1]!);
  return '#' + a.map((c, k) => Math.round(c + (b[k]! - c) * f).toString(16).padStart(2, '0')).join('');
}

/** Black or white text, whichever reads better on the background. */
function inkOn(hex: string): string {
  const [r, g, b] = [1, 3, 5].map((k) => parseInt(hex.slice(k, k + 2), 16) / 255);
  return 0.2126 * r! + 0.7152 * g! + 0.0722 * b! > 0.5 ? '#111' : '#fff';
}

export interface SimilarityPageOptions {
  /** Page title (default: "blockferry similarity"). */
  title?: string;
  /** When the page was made (default: now); shown, and fixed in tests and screenshots. */
  generatedAt?: Date;
}

function gradient(stops: string[]): string {
  return `linear-gradient(to right, ${stops.join(', ')})`;
}

function heatmap(kind: 'similarity' | 'bytes', m: SimilarityMatrix, names: string[], k: number): string {
  const values = kind === 'similarity' ? m.similarity : m.bytesToSend;
  const max = kind === 'bytes' ? Math.max(1, ...values.flat()) : 100;
  const stops = kind === 'similarity' ? VIRIDIS : ORANGES;
  const head = names.map((n, t) => `<th scope="col" title="${escapeHtml(m.images[t]!.path)}"><span>${escapeHtml(n)}</span></th>`).join('');
  const rows = values.map((row, b) => {
    const cells = row.map((v, t) => {
      const bg = colourAt(stops, v / max);
      const shown = kind === 'similarity' ? v.toFixed(1) : humanBytes(v);
      return `<td class="cell" data-base="${b}" data-target="${t}" data-value="${v}" style="background:${bg};color:${inkOn(bg)}">${escapeHtml(shown)}</td>`;
    }).join('');
    return `<tr><th scope="row" title="${escapeHtml(m.images[b]!.path)}">${escapeHtml(names[b]!)}</th>${cells}</tr>`;
  }).join('\n');
  const legend = kind === 'similarity'
    ? `<div class="legend"><span>0 %</span><i style="background:${gradient(stops)}"></i><span>100 %</span></div>`
    : `<div class="legend"><span>0 B</span><i style="background:${gradient(stops)}"></i><span>${escapeHtml(humanBytes(max))}</span></div>`;
  const caption = kind === 'similarity'
    ? 'similarity: % of the target\'s non-zero blocks found in the base'
    : 'still to send: the target\'s blocks the base lacks';
  return `<figure class="heatmap" data-kind="${kind}" data-block-size="${m.blockSize}" data-matrix="${k}">
<h3>${escapeHtml(caption)}</h3>
<table class="heat"><thead><tr><th class="corner">base \\ target</th>${head}</tr></thead>
<tbody>
${rows}
</tbody></table>
${legend}
</figure>`;
}

const CSS = `
table.heat{border-collapse:separate;border-spacing:2px}
table.heat th{font-weight:normal;color:var(--muted);font-size:12px;max-width:160px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
table.heat thead th{vertical-align:bottom;text-align:left;height:90px}
table.heat thead th span{display:inline-block;transform:rotate(-40deg);transform-origin:left bottom;margin-left:24px;white-space:nowrap}
table.heat thead th:not(.corner){width:64px;min-width:64px;max-width:64px;overflow:visible}
table.heat thead th.corner{transform:none;text-align:right;vertical-align:bottom}
table.heat tbody th{text-align:right;padding-right:6px}
table.heat td.cell{width:64px;height:40px;text-align:center;font-size:12px;font-variant-numeric:tabular-nums;border-radius:2px;cursor:default}
table.heat td.cell:hover{outline:2px solid #1d2330}
figure{margin:0;max-width:470px}
figure h3{white-space:normal}
.legend{display:flex;align-items:center;gap:8px;font-size:12px;color:var(--muted);margin-top:6px}
.legend i{display:inline-block;width:180px;height:10px;border-radius:2px}
#sweep{margin:8px 0}
`;

/** The similarity page for one or several block sizes of the same images (matrices in block-size order). */
export function similarityPage(matrices: SimilarityMatrix[], options: SimilarityPageOptions = {}): string {
  if (matrices.length === 0) throw new RangeError('similarityPage needs at least one matrix');
  const first = matrices[0]!;
  const names = first.images.map((i) => basename(i.path));
  const when = (options.generatedAt ?? new Date()).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
  const sizes = matrices.map((m) => m.blockSize);
  // The images, with their counts at the smallest block size (the heatmaps have the rest).
  const images = first.images.map((im, i) =>
    `<tr><td class="num">${i + 1}</td><td title="${escapeHtml(im.path)}">${escapeHtml(names[i]!)}</td><td class="num">${escapeHtml(humanBytes(im.size))}</td>` +
    `<td class="num">${im.nonZeroBlocks}</td><td class="num">${im.distinctBlocks}</td></tr>`).join('\n');
  const imageHead = `<th>non-zero blocks (${first.blockSize} B)</th><th>distinct</th>`;
  const sweep = matrices.length > 1
    ? `<section id="sweep-section"><h2>Similarity against block size (paper 001, Fig. 6)</h2>
<p class="meta">Each line is one base → target pair${first.images.length * (first.images.length - 1) > 12 ? ' (here each base\'s average over its targets: there are too many pairs to draw)' : ''}: the share of the target's non-zero blocks found in the base, at each block size.</p>
<div id="sweep"></div></section>`
    : '';
  const sections = matrices.map((m, k) =>
    `<section class="matrix" data-block-size="${m.blockSize}"><h2>${m.blockSize} B blocks</h2>
<div class="row">${heatmap('similarity', m, names, k)}${heatmap('bytes', m, names, k)}</div></section>`).join('\n');
  const body = `<h1>${escapeHtml(options.title ?? 'blockferry similarity')}</h1>
<p class="meta">${first.images.length} images, block size${sizes.length > 1 ? 's' : ''} ${sizes.join(', ')} B; made ${escapeHtml(when)}</p>
<table class="facts images"><thead><tr><th>#</th><th>image</th><th>size</th>${imageHead}</tr></thead><tbody>
${images}
</tbody></table>
${sweep}
${sections}`;
  const data = {
    names,
    paths: first.images.map((i) => i.path),
    blockSizes: sizes,
    similarity: matrices.map((m) => m.similarity),
    bytesToSend: matrices.map((m) => m.bytesToSend),
    average: matrices.map((m) => m.average),
  };
  return page({ title: options.title ?? 'blockferry similarity', body, css: CSS, data, script: SCRIPT });
}

// The page's script: tooltips on the cells, and the sweep chart.
const SCRIPT = `
document.querySelectorAll('td.cell').forEach(function(td){
  td.addEventListener('mousemove', function(ev){
    var k = +td.closest('figure').dataset.matrix, b = +td.dataset.base, t = +td.dataset.target;
    var bs = DATA.blockSizes[k], base = DATA.names[b], target = DATA.names[t];
    var sim = DATA.similarity[k][b][t], bytes = DATA.bytesToSend[k][b][t];
    showTip('base ' + base + ' \\u2192 target ' + target + ' (' + bs + ' B blocks)\\n' +
      'base: ' + DATA.paths[b] + '\\ntarget: ' + DATA.paths[t] + '\\n' +
      sim.toFixed(2) + ' % of the target\\'s non-zero blocks are in the base\\n' +
      humanBytes(bytes) + ' (' + bytes + ' bytes) still to send', ev.clientX, ev.clientY);
  });
  td.addEventListener('mouseleave', hideTip);
});
var el = document.getElementById('sweep');
if (el && DATA.blockSizes.length > 1) {
  var n = DATA.names.length, pairs = n * (n - 1) <= 12;
  var palette = ['#2f6fde','#e8590c','#2b8a3e','#c2255c','#6741d9','#0b7285','#a61e4d','#5c940d','#d9480f','#364fc7','#087f5b','#862e9c'];
  var data = [DATA.blockSizes.slice()], series = [{ label: 'block size', value: function(u, v){ return v == null ? '' : v + ' B'; } }];
  for (var b = 0; b < n; b++) {
    if (pairs) {
      for (var t = 0; t < n; t++) if (t !== b) {
        data.push(DATA.similarity.map(function(m){ return m[b][t]; }));
        series.push({ label: DATA.names[b] + ' \\u2192 ' + DATA.names[t], stroke: palette[(series.length - 1) % palette.length], width: 2, points: { size: 6 }, value: function(u, v){ return v == null ? '' : v.toFixed(2) + ' %'; } });
      }
    } else {
      data.push(DATA.average.map(function(a){ return a[b]; }));
      series.push({ label: DATA.names[b] + ' (average)', stroke: palette[(series.length - 1) % palette.length], width: 2, points: { size: 6 }, value: function(u, v){ return v == null ? '' : v.toFixed(2) + ' %'; } });
    }
  }
  new uPlot({
    width: Math.min(900, document.body.clientWidth - 64), height: 320,
    scales: { x: { time: false, distr: 3, log: 2 }, y: { range: [0, 100] } },
    axes: [
      { label: 'block size', values: function(u, vals){ return vals.map(function(v){ return v >= 1024 ? (v / 1024) + ' KiB' : v + ' B'; }); }, splits: function(){ return DATA.blockSizes; } },
      { label: 'similarity (%)', values: function(u, vals){ return vals.map(function(v){ return v + ' %'; }); } },
    ],
    series: series,
  }, data, el);
}
`;
