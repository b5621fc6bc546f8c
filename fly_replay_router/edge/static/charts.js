// Small live charts of the last minutes, drawn by the page itself as inline SVG (no library, no build).
// One sample a second from the status feed, kept for CHART_WINDOW_SECONDS; one line per machine.
// Each line says what it shows in data attributes (data-last, data-points), for people and for tests.
"use strict";

const CHART_WINDOW_SECONDS = 300;
const CHART_SAMPLE_SECONDS = 1;
const CHART_MIN_SPAN = 30;
const CHART_WIDTH = 300;
const CHART_HEIGHT = 80;
const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#1f5fbf", "#167a3e", "#b3261e", "#7a3fb0", "#8a5a00", "#00838f", "#c2185b", "#5d4037"];
const CHARTS = [
  { id: "chart-requests", key: "requests_per_second", unit: "req/s" },
  { id: "chart-replays", key: "replays_per_second", unit: "replays/s" },
  { id: "chart-sessions", key: "sessions", unit: "sessions" },
];

const chartHistory = []; // {at, values: {machineId: {requests_per_second, replays_per_second, sessions}}}
const machineColors = new Map();
let lastChartSample = 0;

function machineColor(machineId) {
  if (!machineColors.has(machineId)) machineColors.set(machineId, PALETTE[machineColors.size % PALETTE.length]);
  return machineColors.get(machineId);
}

// Keep one sample a second of each machine's figures; true when a new one was kept.
function recordChartSample(status, now = Date.now() / 1000) {
  if (now - lastChartSample < CHART_SAMPLE_SECONDS) return false;
  lastChartSample = now;
  const values = {};
  for (const machine of status.machines) {
    values[machine.id] = {
      requests_per_second: machine.requests_per_second ?? 0,
      replays_per_second: machine.replays_per_second ?? 0,
      sessions: machine.sessions ?? 0,
    };
  }
  chartHistory.push({ at: now, values });
  while (chartHistory.length && now - chartHistory[0].at > CHART_WINDOW_SECONDS) chartHistory.shift();
  return true;
}

// The smallest of 1, 2, 5 x 10^n at or above value (at least 1): the chart's top.
function niceCeiling(value) {
  if (value <= 1) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

function svgElement(name, attributes) {
  const element = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  return element;
}

function drawChart(chart, machineIds) {
  const svg = document.getElementById(chart.id);
  if (!svg) return;
  const newest = chartHistory.length ? chartHistory[chartHistory.length - 1].at : 0;
  // The time axis grows with the history (at least CHART_MIN_SPAN seconds) until it spans the window.
  const oldest = chartHistory.length ? chartHistory[0].at : 0;
  const span = Math.max(CHART_MIN_SPAN, Math.min(CHART_WINDOW_SECONDS, newest - oldest));
  let max = 0;
  for (const sample of chartHistory) {
    for (const id of machineIds) max = Math.max(max, sample.values[id]?.[chart.key] ?? 0);
  }
  const top = niceCeiling(max);
  svg.dataset.top = top;
  const scale = svg.parentElement.querySelector(".chart-top");
  if (scale) scale.textContent = `0–${top} ${chart.unit}, last ${Math.round(span)} s`;
  for (const id of machineIds) {
    let line = svg.querySelector(`polyline[data-machine="${id}"]`);
    if (!line) {
      line = svgElement("polyline", { fill: "none", stroke: machineColor(id), "stroke-width": "1.5" });
      line.dataset.machine = id;
      line.setAttribute("vector-effect", "non-scaling-stroke");
      svg.appendChild(line);
    }
    const points = [];
    let last = 0;
    for (const sample of chartHistory) {
      if (!(id in sample.values)) continue;
      last = sample.values[id][chart.key];
      const x = CHART_WIDTH - ((newest - sample.at) / span) * CHART_WIDTH;
      const y = CHART_HEIGHT - (last / top) * (CHART_HEIGHT - 2) - 1;
      points.push(`${x.toFixed(1)},${y.toFixed(1)}`);
    }
    line.setAttribute("points", points.join(" "));
    line.dataset.points = points.length;
    line.dataset.last = last;
    let title = line.querySelector("title");
    if (!title) title = line.appendChild(svgElement("title", {}));
    title.textContent = `${id}: ${last} ${chart.unit}`;
  }
  for (const line of svg.querySelectorAll("polyline[data-machine]")) {
    if (!machineIds.includes(line.dataset.machine)) line.remove();
  }
}

function drawLegend(machineIds) {
  const legend = document.getElementById("chart-legend");
  if (!legend || legend.dataset.shown === machineIds.join(",")) return;
  legend.dataset.shown = machineIds.join(",");
  legend.replaceChildren(
    ...machineIds.map((id) => {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = machineColor(id);
      item.append(swatch, id);
      item.dataset.machine = id;
      return item;
    }),
  );
}

// Called with each status document of the feed: a new sample each second, and the charts redrawn.
function updateCharts(status) {
  if (!recordChartSample(status)) return;
  const machineIds = status.machines.map((machine) => machine.id);
  for (const id of machineIds) machineColor(id);
  drawLegend(machineIds);
  for (const chart of CHARTS) drawChart(chart, machineIds);
}
