"""The report's HTML shell: one self-contained page (inline CSS, inline script, inline SVG,
nothing fetched), its tables, and the script that draws and zooms the pipeline timeline."""
from __future__ import annotations

from html import escape

CSS = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #dde1e8; --bg: #f6f7f9; --ok: #2e7d4f; --bad: #b3261e;
        --warn: #9a5b00; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink); font: 14px/1.45 system-ui, -apple-system,
       "Segoe UI", "DejaVu Sans", sans-serif; }
header { background: #1d2330; color: white; padding: 18px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header .sub { color: #c8cedb; font-size: 13px; }
header code { color: #e8ecf3; }
main { padding: 8px 28px 40px; max-width: 1280px; }
section { background: white; border: 1px solid var(--line); border-radius: 8px; padding: 14px 18px;
          margin: 16px 0; }
h2 { font-size: 17px; margin: 0 0 10px; }
p.note, .note { color: var(--muted); font-size: 12.5px; margin: 6px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: white; border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 150px; }
.card .v { font-size: 22px; font-weight: 600; }
.card .k { color: var(--muted); font-size: 12px; }
.fits { color: var(--ok); } .nofit { color: var(--bad); } .transferred { color: var(--warn); }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 8px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: #eef1f5; font-weight: 600; font-size: 12.5px; }
td.l, th.l { text-align: left; white-space: normal; }
tr.best td { background: #eef7f0; font-weight: 600; }
.scroll { overflow-x: auto; }
ul.why { margin: 6px 0; padding-left: 20px; } ul.why li { margin: 3px 0; }
.legend { display: flex; flex-wrap: wrap; gap: 14px; font-size: 12.5px; margin: 8px 0; }
.legend span::before { content: ""; display: inline-block; width: 11px; height: 11px; margin-right: 5px;
                       vertical-align: -1px; background: var(--c); border-radius: 2px; }
.tl { display: flex; border: 1px solid var(--line); border-radius: 6px; }
.tl .names { flex: none; width: 74px; border-right: 1px solid var(--line); font-size: 12px; }
.tl .names div { text-align: right; padding-right: 6px; }
.tl .plot { flex: auto; overflow-x: auto; }
.controls { display: flex; gap: 8px; align-items: center; margin: 6px 0 10px; font-size: 13px; }
.controls button { font: inherit; padding: 2px 10px; border: 1px solid var(--line); background: white;
                   border-radius: 5px; cursor: pointer; }
footer { color: var(--muted); font-size: 12px; padding: 0 28px 30px; }
"""

# Draws the timeline from its JSON (one rect per forward, backward and blocking send, then the
# data-parallel tail and the optimizer step per rank) at the chosen zoom; micro-batch numbers
# appear where a rect is wide enough to hold them.
SCRIPT = """
(function () {
  var NS = "http://www.w3.org/2000/svg";
  var COLORS = {F: "#4C72B0", B: "#DD8452", send: "#8172B3", dp: "#55A868", opt: "#CCB974", idle: "#E4E4E4"};
  var NAMES = {F: "forward", B: "backward", send: "blocking send"};
  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    for (var k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }
  function tip(node, text) { el("title", {}, node).textContent = text; }
  function fmt(s) { return s === 0 ? "0" : s >= 1 ? s.toFixed(3) + " s" : (s * 1000).toFixed(2) + " ms"; }
  function draw(box, data, zoom) {
    var plot = box.querySelector(".plot");
    var row = data.ranks > 24 ? Math.max(8, Math.floor(520 / data.ranks)) : 24;
    var width = Math.max(plot.clientWidth - 2, 300) * zoom;
    var height = row * data.ranks + 26;
    plot.innerHTML = "";
    var svg = el("svg", {width: width, height: height, "font-size": 10, "font-family": "system-ui, sans-serif"}, plot);
    var x = function (s) { return s / data.step_s * (width - 4); };
    for (var r = 0; r < data.ranks; r++) {
      var bg = el("rect", {x: 0, y: r * row + 1, width: x(data.step_s), height: row - 2, fill: COLORS.idle}, svg);
      tip(bg, "stage " + r + ": idle (pipeline bubble)");
      var t = data.tails[r];
      var dp = el("rect", {x: x(t[0]), y: r * row + 2, width: x(t[1]), height: row - 4, fill: COLORS.dp,
                           "class": "tail"}, svg);
      tip(dp, "stage " + r + ": exposed data-parallel communication " + fmt(t[1]));
      var opt = el("rect", {x: x(t[0] + t[1]), y: r * row + 2, width: x(t[2]), height: row - 4, fill: COLORS.opt,
                            "class": "tail"}, svg);
      tip(opt, "stage " + r + ": optimizer step " + fmt(t[2]));
    }
    var labels = row >= 14;
    data.events.forEach(function (e) {
      var kind = data.kinds[e[1]], x0 = x(e[4]), w = Math.max(x(e[5]) - x0, 0.5);
      // a binned row (e[6]: share of the bin, e[7]: share stacked below it) is a band of the row
      var share = e.length > 6 ? e[6] : 1, below = e.length > 6 ? e[7] : 0;
      var rect = el("rect", {x: x0, y: e[0] * row + 2 + (row - 4) * (1 - below - share), width: w,
                             height: (row - 4) * share, fill: COLORS[kind],
                             stroke: "white", "stroke-width": w > 3 && share === 1 ? 0.5 : 0, "class": "ev"}, svg);
      tip(rect, (e[2] < 0 ? NAMES[kind] + " " + Math.round(100 * share) + "% of the time" : NAMES[kind] +
                 " micro-batch " + e[2] +
                 (data.chunks > 1 ? " chunk " + e[3] : "")) + ", stage " + e[0] + ", " + fmt(e[4]) +
                 " to " + fmt(e[5]));
      if (labels && e[2] >= 0 && w >= 7 * String(e[2]).length + 4) {
        var text = el("text", {x: x0 + w / 2, y: e[0] * row + row / 2 + 4, "text-anchor": "middle",
                               fill: "white", "pointer-events": "none"}, svg);
        text.textContent = e[2];
      }
    });
    var ticks = 10 * zoom, step = niceStep(data.step_s / ticks);
    for (var s = 0; s <= data.step_s + 1e-12; s += step) {
      el("line", {x1: x(s), x2: x(s), y1: row * data.ranks, y2: row * data.ranks + 5, stroke: "#666"}, svg);
      var label = el("text", {x: Math.min(x(s) + 2, width - 58), y: row * data.ranks + 18}, svg);
      label.textContent = fmt(s);
    }
    box.querySelector(".zoomv").textContent = zoom + "x";
  }
  function niceStep(raw) {
    var m = Math.pow(10, Math.floor(Math.log10(raw)));
    var options = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < options.length; i++) if (options[i] * m >= raw) return options[i] * m;
    return raw;
  }
  document.querySelectorAll(".tl-box").forEach(function (box) {
    var data = JSON.parse(box.querySelector("script.tl-data").textContent);
    data.chunks = 1;
    data.events.forEach(function (e) { if (e[3] + 1 > data.chunks) data.chunks = e[3] + 1; });
    var zoom = 1, range = box.querySelector("input.zoom");
    var set = function (z) {
      zoom = Math.min(Math.max(z, 1), 256);
      range.value = Math.log2(zoom);
      draw(box, data, zoom);
    };
    box.querySelector("button.in").addEventListener("click", function () { set(zoom * 2); });
    box.querySelector("button.out").addEventListener("click", function () { set(zoom / 2); });
    box.querySelector("button.fit").addEventListener("click", function () { set(1); });
    range.addEventListener("input", function () { set(Math.pow(2, +range.value)); });
    set(data.start_zoom || 1);
  });
})();
"""


def page(title: str, subtitle: str, sections: list[str], footer: str) -> str:
    """The whole document: `sections` are HTML fragments, each already escaped."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{escape(title)}</h1><div class=\"sub\">{subtitle}</div></header>"
            f"<main>{''.join(sections)}</main><footer>{footer}</footer>"
            f"<script>{SCRIPT}</script></body></html>\n")


def section(title: str, body: str, sid: str = "") -> str:
    anchor = f' id="{escape(sid)}"' if sid else ""
    return f"<section{anchor}><h2>{escape(title)}</h2>{body}</section>"


def table(headers: list[str], rows: list[list], left: tuple[int, ...] = (), best: int | None = None,
          raw: tuple[int, ...] = ()) -> str:
    """An HTML table; columns in `left` align left, row `best` is highlighted, cells in
    columns `raw` are HTML already (every other cell is escaped)."""
    head = "".join(f'<th class="l">{escape(h)}</th>' if i in left else f"<th>{escape(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    for n, row in enumerate(rows):
        cells = "".join(('<td class="l">' if i in left else "<td>") + (c if i in raw else escape(str(c))) + "</td>"
                        for i, c in enumerate(row))
        body.append(('<tr class="best">' if n == best else "<tr>") + cells + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def cards(items: list[tuple[str, str, str]]) -> str:
    """Big-number cards: (value, label, css class)."""
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v {cls}">{escape(v)}</div><div class="k">{escape(k)}</div></div>'
        for v, k, cls in items) + "</div>"


def legend(items: list[tuple[str, str]]) -> str:
    return '<div class="legend">' + "".join(f'<span style="--c:{c}">{escape(t)}</span>' for t, c in items) + "</div>"
