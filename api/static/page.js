// The broker's live page: topics, a live tail, a publish form.
// Plain script, no framework, no build step. Every URL is relative, so the page
// works wherever the broker is mounted (behind a load balancer, under a path),
// and every request is same-origin, so the broker_token cookie goes along.
(function () {
  "use strict";

  var REFRESH_MS = 2000;
  var MAX_TOPICS = 50;
  var MAX_UNLISTED = 50;  // rows of topics streamed here that no listing has
  var MAX_ROWS = 500;
  var MAX_DELAY_MS = 5000;
  var tail = null;

  function $(id) { return document.getElementById(id); }

  function say(id, text, bad) {
    var element = $(id);
    element.textContent = text;
    element.classList.toggle("bad", Boolean(bad));
  }

  function sleep(ms) { return new Promise(function (resolve) { setTimeout(resolve, ms); }); }

  function topicPath(topic) { return "topics/" + encodeURIComponent(topic); }

  async function problemText(response) {
    try {
      var problem = await response.json();
      return response.status + " " + (problem.detail || problem.title || "");
    } catch (error) {
      return response.status + " " + response.statusText;
    }
  }

  // What a refusal says; a 401's says what the page lacks: its requests carry the
  // broker_token cookie, if the broker's site set one (a status alone told nobody).
  async function refusalText(response) {
    var text = await problemText(response);
    if (response.status !== 401) { return text; }
    return "this needs a valid token, in the broker_token cookie (" + text + ")";
  }

  function refusal(text) {
    var error = new Error(text);
    error.refusal = true;
    return error;
  }

  // Whether the broker wants a token this page did not send: a listing needs none, and
  // shows only what its token may read (without one, nothing), so ask for a topic's info.
  async function tokenNeeded() {
    try {
      return (await fetch(topicPath("_"), { headers: { Accept: "application/json" } })).status === 401;
    } catch (error) {
      return false;
    }
  }

  // -- topics -------------------------------------------------------------------

  async function listTopics() {
    var query = new URLSearchParams({ prefix: $("topics-prefix").value.trim(), limit: String(MAX_TOPICS) });
    var response = await fetch("topics?" + query, { headers: { Accept: "application/json" } });
    if (response.status === 404 || response.status === 405) {
      say("topics-note", "This broker does not list topics (GET /topics answered " + response.status +
        "): shown are the topics streamed by this instance; type any topic's name to tail it.");
      return null;
    }
    if (response.status === 401) { throw refusal(await refusalText(response)); }
    if (!response.ok) { throw new Error(await problemText(response)); }
    var page = await response.json();
    var note = page.topics.length ? "" : "No topics listed yet: publish an event below.";
    if (page.next) {  // (a page of a SCAN: the listing goes on; the rest is not read here)
      note = "Showing " + page.topics.length + " of more topics: narrow them with the prefix.";
    }
    if (!page.topics.length && await tokenNeeded()) {
      note = "No topics shown: this broker lists only the topics a token may read, and this " +
        "page sent none (the broker_token cookie).";
    }
    say("topics-note", note);
    return page.topics.sort(function (a, b) { return a.topic < b.topic ? -1 : a.topic > b.topic ? 1 : 0; });
  }

  async function topicStats(topics) {
    var query = (topics || []).map(function (t) { return "topic=" + encodeURIComponent(t.topic); }).join("&");
    var response = await fetch("stats" + (query ? "?" + query : ""), { headers: { Accept: "application/json" } });
    if (response.status === 401) { throw refusal(await refusalText(response)); }
    if (!response.ok) { throw new Error(await problemText(response)); }
    return response.json();
  }

  function cell(row, text, className) {
    var td = row.insertCell();
    td.textContent = text;
    if (className) { td.className = className; }
  }

  function renderTopics(topics, stats) {
    var byName = {};
    stats.topics.forEach(function (s) { byName[s.topic] = s; });
    // Listed topics, then those this instance streams that no listing has (no event yet).
    var rows = (topics || []).slice();
    var listed = {};
    rows.forEach(function (t) { listed[t.topic] = true; });
    var prefix = $("topics-prefix").value.trim();
    var unlisted = stats.topics.filter(function (s) { return !listed[s.topic] && s.topic.indexOf(prefix) === 0; });
    // (an instance may stream thousands of topics with no event yet: a page of them at most)
    unlisted.slice(0, MAX_UNLISTED).forEach(function (s) { rows.push({ topic: s.topic }); });
    var body = $("topics").tBodies[0];
    body.replaceChildren();
    rows.forEach(function (topic) {
      var s = byName[topic.topic] || {};
      var row = body.insertRow();
      row.dataset.topic = topic.topic;
      row.classList.toggle("chosen", Boolean(tail && tail.topic === topic.topic));
      cell(row, topic.topic);
      cell(row, topic.length === undefined ? "–" : String(topic.length), "num");
      cell(row, s.events_per_second === undefined ? "–" : s.events_per_second.toFixed(1), "num");
      cell(row, s.subscribers === undefined ? "–" : String(s.subscribers), "num");
      cell(row, topic.closed === undefined ? "" : (topic.closed ? "closed" : "open"));
    });
    var more = unlisted.length > MAX_UNLISTED ? "Showing " + MAX_UNLISTED + " of more topics streamed" +
      " here with no event yet: narrow them with the prefix. " : "";
    say("stats-note", more + (stats.instance ? "Subscribers: streams on instance " + stats.instance +
      " (each instance counts its own). Events/s: from the topic's log, all instances." : ""));
  }

  async function refreshTopics() {
    try {
      var topics = await listTopics();
      renderTopics(topics, await topicStats(topics));
    } catch (error) {
      say("topics-note", (error.refusal ? "Refused: " : "The broker did not answer: ") + error.message, true);
    }
    setTimeout(refreshTopics, REFRESH_MS);
  }

  // -- live tail ------------------------------------------------------------------

  function addRow(kind, id, type, data) {
    var log = $("tail-log");
    var item = document.createElement("li");
    item.className = kind;
    [["id", id || ""], ["type", type], ["data", data]].forEach(function (part) {
      var span = document.createElement("span");
      span.className = part[0];
      span.textContent = part[1];
      item.appendChild(span);
    });
    var atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.appendChild(item);
    while (log.children.length > MAX_ROWS) { log.removeChild(log.firstChild); }
    if (atBottom) { log.scrollTop = log.scrollHeight; }
  }

  function show(state, event) {
    if (event.type === "broker.gap") {
      addRow("gap", event.id, event.type, "gap: " + event.data);
    } else if (event.type === "broker.end") {
      addRow("end", event.id, event.type, "the topic was closed: no more events");
    } else {
      addRow("event", event.id, event.type, event.data);
    }
  }

  // A text/event-stream parser (HTML standard, "interpreting an event stream").
  function SseParser(onEvent, onPlace) {
    this.pending = "";
    this.lastId = null;
    this.type = "";
    this.data = [];
    this.onEvent = onEvent;
    this.onPlace = onPlace;
  }
  SseParser.prototype.feed = function (text) {
    this.pending += text;
    var lines = this.pending.split(/\r\n|\n|\r(?!$)/);
    this.pending = lines.pop();
    for (var i = 0; i < lines.length; i++) {
      if (this.line(lines[i])) { return true; }
    }
    return false;
  };
  SseParser.prototype.line = function (line) {
    if (line === "") { return this.dispatch(); }
    if (line[0] === ":") { return false; }
    var colon = line.indexOf(":");
    var name = colon < 0 ? line : line.slice(0, colon);
    var value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (name === "data") { this.data.push(value); }
    else if (name === "event") { this.type = value; }
    else if (name === "id" && value.indexOf("\0") < 0) { this.lastId = value; }
    return false;
  };
  // As the standard dispatches: the id of a block with no data (the broker's cursor once
  // a stream "from now" is live) is the place a reconnect resumes from all the same.
  SseParser.prototype.dispatch = function () {
    var hasData = this.data.length > 0;
    var event = { id: this.lastId, type: this.type || "message", data: this.data.join("\n") };
    this.type = "";
    this.data = [];
    this.onPlace(this.lastId);
    return hasData ? this.onEvent(event) : false;
  };

  // fetch, not EventSource: an EventSource can only listen to event types it is told of.
  // True once the topic is over: its broker.end, or a gap saying it was deleted.
  // placed(): once, at the stream's first place (its cursor) or event.
  async function readStream(response, state, placed) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var parser = new SseParser(function (event) {
      placed();
      show(state, event);
      if (event.type === "broker.gap" && gapReason(event) === "deleted") { state.deleted = true; }
      return event.type === "broker.end" || state.deleted;
    }, function (place) { state.lastId = place; if (place) { placed(); } });
    parser.lastId = state.lastId;
    for (;;) {
      var chunk = await reader.read();
      if (chunk.done) { return false; }
      if (parser.feed(decoder.decode(chunk.value, { stream: true }))) {
        reader.cancel();
        return true;
      }
    }
  }

  function gapReason(event) {
    try { return JSON.parse(event.data).reason; } catch (error) { return null; }
  }

  // "closed" once the topic is over (or was already), "" when the stream ended and
  // should be resumed, else what refused it.
  async function connect(state) {
    var headers = { Accept: "text/event-stream" };
    var url = topicPath(state.topic) + "/events";
    if (state.lastId) { headers["Last-Event-ID"] = state.lastId; }
    else if (state.earliest) { url += "?from=earliest"; }
    var response = await fetch(url, { headers: headers, signal: state.controller.signal, cache: "no-store" });
    if (response.status === 204) { return "closed"; }
    if (response.status >= 500) { throw new Error(await problemText(response)); }
    if (!response.ok) { return "Refused: " + (await refusalText(response)); }
    var live = "Live: " + state.topic + (state.lastId ? " (resumed after " + state.lastId + ")" : "");
    var told = false;
    function placed() { if (!told) { told = true; say("tail-status", live); } }
    // A stream with a cursor is placed already. One from now is placed by the broker's
    // cursor, not by its 200: a 200 may be a come-back-later (the broker could not read
    // its store) that ends at once, and its reconnect starts from a later now.
    if (state.lastId) { placed(); }
    return (await readStream(response, state, placed)) ? "closed" : "";
  }

  async function follow(state) {
    var failures = 0;
    while (tail === state) {
      try {
        var outcome = await connect(state);
        if (outcome === "closed") {
          finishTail(state, state.deleted ? "The topic was deleted." : "The topic was closed.", false);
          return;
        }
        if (outcome) { finishTail(state, outcome, true); return; }
        failures = 0;
      } catch (error) {
        if (state.controller.signal.aborted) { return; }
        failures += 1;
        say("tail-status", "Connection lost (" + error.message + "); reconnecting…", true);
      }
      await sleep(Math.min(250 * Math.pow(2, failures), MAX_DELAY_MS));
    }
  }

  function finishTail(state, text, bad) {
    if (tail !== state) { return; }
    say("tail-status", text, bad);
    stopTail(false);
  }

  function startTail(topic, earliest) {
    stopTail(true);
    $("tail-log").replaceChildren();
    $("tail-topic").value = topic;
    tail = {
      topic: topic, earliest: earliest, lastId: null, deleted: false, controller: new AbortController(),
    };
    $("tail-stop").disabled = false;
    say("tail-status", "Connecting to " + topic + "…");
    follow(tail);
  }

  function stopTail(quietly) {
    if (tail) { tail.controller.abort(); }
    if (quietly && tail) { say("tail-status", "Stopped."); }
    tail = null;
    $("tail-stop").disabled = true;
  }

  // -- publish --------------------------------------------------------------------

  function publishRequest(topic) {
    var kind = document.querySelector("input[name=publish-kind]:checked").value;
    var type = $("publish-event").value.trim();
    var text = $("publish-data").value;
    var url = topicPath(topic) + "/events";
    if (kind === "text") {
      if (type) { url += "?event=" + encodeURIComponent(type); }
      return { url: url, type: "text/plain; charset=utf-8", body: text };
    }
    var event = { data: JSON.parse(text) };  // throws on bad JSON: said to the user
    if (type) { event.event = type; }
    return { url: url, type: "application/json", body: JSON.stringify(event) };
  }

  async function publish(submit) {
    submit.preventDefault();
    var topic = $("publish-topic").value.trim();
    var request;
    try { request = publishRequest(topic); }
    catch (error) { say("publish-result", "Not JSON: " + error.message + " (choose Text to send it as text)", true); return; }
    try {
      var response = await fetch(request.url, { method: "POST", headers: { "Content-Type": request.type }, body: request.body });
      if (!response.ok) { say("publish-result", await refusalText(response), true); return; }
      var answer = await response.json();
      say("publish-result", "Stored: " + (answer.id || (answer.ids || []).join(", ")));
    } catch (error) {
      say("publish-result", "The broker did not answer: " + error.message, true);
    }
  }

  // -- wiring ---------------------------------------------------------------------

  $("topics").tBodies[0].addEventListener("click", function (click) {
    var row = click.target.closest("tr");
    if (row) { $("publish-topic").value = row.dataset.topic; startTail(row.dataset.topic, $("tail-earliest").checked); }
  });
  $("topics-filter").addEventListener("submit", function (e) { e.preventDefault(); });
  $("tail-form").addEventListener("submit", function (e) {
    e.preventDefault();
    startTail($("tail-topic").value.trim(), $("tail-earliest").checked);
  });
  $("tail-stop").addEventListener("click", function () { stopTail(true); });
  $("publish-form").addEventListener("submit", publish);
  refreshTopics();
})();
