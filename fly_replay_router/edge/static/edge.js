// The live edge page: one EventSource on /_edge/events, a status document a few times a second.
// The DOM stays bounded: one row per machine, at most MAX_ROUTES routing rows, MAX_EVENTS events.
"use strict";

const MAX_ROUTES = 60;
const MAX_EVENTS = 12;
const VERBS = ["stop", "suspend", "start", "kill"];
// Which verbs make sense in which state (the edge would answer the others with 409 or do nothing).
const ALLOWED = {
  started: ["stop", "suspend", "kill"],
  unreachable: ["stop", "kill"],
  suspended: ["start", "stop", "kill"],
  stopped: ["start"],
  starting: ["kill"],
  stopping: ["kill"],
};

const $ = (selector) => document.querySelector(selector);
let lastEventAt = 0;

function text(element, value) {
  const next = String(value);
  if (element.textContent !== next) element.textContent = next;
}

function short(id) {
  return id || "—";
}

function machineRow(machine) {
  const body = $("#machines tbody");
  let row = body.querySelector(`tr[data-machine="${machine.id}"]`);
  if (row) return row;
  row = document.createElement("tr");
  row.dataset.machine = machine.id;
  row.innerHTML =
    '<td class="id"></td><td><span class="state"></span></td><td class="num sessions"></td>' +
    '<td class="num rps"></td><td class="num"><span class="in-flight"></span> <span class="load"></span></td><td class="num requests"></td>' +
    '<td class="num replays"></td><td class="pid mono"></td><td class="workers"></td><td class="actions"></td>';
  row.querySelector(".id").textContent = machine.id;
  const actions = row.querySelector(".actions");
  for (const verb of VERBS) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.verb = verb;
    button.textContent = verb;
    if (verb === "kill") button.className = "kill";
    button.addEventListener("click", () => control(machine.id, verb, button));
    actions.appendChild(button);
  }
  body.appendChild(row);
  return row;
}

async function control(machineId, verb, button, path = verb) {
  button.disabled = true;
  try {
    const response = await fetch(`/_edge/machines/${machineId}/${path}`, { method: "POST" });
    const document_ = await response.json();
    if (!response.ok) alert(`${verb} ${machineId}: ${document_.error || response.status}`);
    else showMachine(document_);
  } catch (error) {
    alert(`${verb} ${machineId}: ${error}`);
  }
}

function showMachine(machine) {
  const row = machineRow(machine);
  const state = row.querySelector(".state");
  text(state, machine.state);
  state.className = `state ${machine.state}`;
  row.dataset.state = machine.state;
  if (machine.sessions !== undefined) text(row.querySelector(".sessions"), machine.sessions);
  if (machine.requests_per_second !== undefined) text(row.querySelector(".rps"), machine.requests_per_second.toFixed(1));
  text(row.querySelector(".in-flight"), machine.in_flight);
  const load = row.querySelector(".load");
  const level = machine.load || "ok";
  text(load, level === "ok" ? "" : level.replaceAll("_", " "));
  load.className = `load ${level}`;
  load.title = `soft limit ${machine.soft_limit ?? "?"}, hard limit ${machine.hard_limit ?? "none"} (fly.toml)`;
  text(row.querySelector(".requests"), machine.requests);
  text(row.querySelector(".replays"), machine.replays_answered);
  text(row.querySelector(".pid"), machine.pid ?? "—");
  showWorkers(row, machine);
  const allowed = ALLOWED[machine.state] || [];
  for (const button of row.querySelectorAll(".actions button")) {
    const verb = button.dataset.verb;
    button.disabled = !allowed.includes(verb) || (!machine.managed && verb === "kill");
  }
}

// The worker processes of a machine: how many it runs, and a kill button per live worker (one worker's
// crash: its sessions end, its siblings' go on, and the supervisor starts another).
function showWorkers(row, machine) {
  const cell = row.querySelector(".workers");
  const pids = machine.worker_pids || [];
  const running = machine.state === "started" || machine.state === "unreachable";
  const shown = `${machine.workers ?? ""}|${pids.join(",")}|${running}`;
  if (cell.dataset.shown === shown) return;
  cell.dataset.shown = shown;
  cell.dataset.count = pids.length;
  if (machine.workers === null || machine.workers === undefined) {
    cell.replaceChildren("—");
    return;
  }
  const count = document.createElement("span");
  count.className = "worker-count";
  count.textContent = `${pids.length}/${machine.workers}`;
  count.title = `${pids.length} live of the ${machine.workers} worker processes its command runs`;
  const buttons = pids.map((pid) => {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.pid = pid;
    button.textContent = `kill ${pid}`;
    button.title = `SIGKILL worker ${pid} only: its sessions end, the other workers' go on`;
    button.disabled = !running;
    button.addEventListener("click", () => control(machine.id, `kill worker ${pid}`, button, `workers/${pid}/kill`));
    return button;
  });
  cell.replaceChildren(count, ...buttons);
}

function statusClass(route) {
  if (route.error || route.status >= 500) return "status-bad";
  if (route.status >= 400) return "status-warn";
  return "status-ok";
}

function addRoutes(routes, skipped) {
  const body = $("#routes tbody");
  const fragment = document.createDocumentFragment();
  for (const route of routes.slice().reverse()) {
    const row = document.createElement("tr");
    row.className = "fresh";
    row.dataset.seq = route.seq;
    if (route.replayed_to.length) row.dataset.replayed = "yes";
    const time = new Date(route.at * 1000).toLocaleTimeString([], { hour12: false });
    const cells = [
      time,
      `${route.method} ${route.path}`,
      short(route.landed) + (route.cache_hit ? " (cache hit)" : ""),
      route.replayed_to.length ? route.replayed_to.join(" → ") : "—",
      route.served_by ? route.served_by : `edge (${route.error})`,
      route.status,
    ];
    cells.forEach((value, index) => {
      const cell = document.createElement("td");
      cell.textContent = value;
      if (index >= 2 && index <= 4) cell.className = "mono";
      if (index === 3 && route.replayed_to.length) cell.className = "mono replayed";
      if (index === 5) cell.className = statusClass(route);
      row.appendChild(cell);
    });
    fragment.appendChild(row);
  }
  body.insertBefore(fragment, body.firstChild);
  while (body.rows.length > MAX_ROUTES) body.deleteRow(body.rows.length - 1);
  text($("#routes-note"), skipped ? `(newest shown; ${skipped} more in the last update)` : "");
}

function showEvents(events) {
  if (!events.length || events[events.length - 1].at === lastEventAt) return;
  lastEventAt = events[events.length - 1].at;
  const list = $("#events");
  list.replaceChildren(
    ...events
      .slice(-MAX_EVENTS)
      .reverse()
      .map((event) => {
        const item = document.createElement("li");
        const time = new Date(event.at * 1000).toLocaleTimeString([], { hour12: false });
        item.textContent = `${time}  ${event.kind}: ${event.detail}`;
        return item;
      }),
  );
}

function showTotals(status) {
  text($("#app"), `${status.app} · region ${status.region}`);
  text($("#total-requests"), status.requests);
  text($("#total-replays"), status.replays);
  text($("#total-cache-hits"), status.replay_cache_hits);
  text($("#total-fallbacks"), status.fallbacks);
  text($("#total-autostarts"), status.autostarts);
  text($("#total-autostops"), status.autostops);
  text($("#total-queued"), status.queued);
  const errors = Object.entries(status.errors).map(([code, count]) => `${code} ×${count}`);
  text($("#total-errors"), errors.length ? errors.join(", ") : "none");
  const config = status.config;
  if (config) {
    const hard = config.hard_limit === null ? "none" : config.hard_limit;
    const autostop =
      config.auto_stop === "off"
        ? "autostop off"
        : `autostop: ${config.auto_stop} idle machines every ${config.autostop_interval}s, ` +
          `keep ${config.min_machines_running} running`;
    text($("#config"), `${autostop} · concurrency soft ${config.soft_limit} / hard ${hard}`);
  }
}

function connect() {
  const source = new EventSource("/_edge/events");
  source.onopen = () => {
    text($("#connection"), "live");
    $("#connection").className = "connection online";
  };
  source.onerror = () => {
    text($("#connection"), "reconnecting…");
    $("#connection").className = "connection offline";
  };
  source.onmessage = (message) => {
    const status = JSON.parse(message.data);
    showTotals(status);
    for (const machine of status.machines) showMachine(machine);
    if (status.routes.length) addRoutes(status.routes, status.routes_skipped);
    showEvents(status.recent_events);
    updateCharts(status); // charts.js
  };
}

connect();
