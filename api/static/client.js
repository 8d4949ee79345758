/*
 * BrokerClient: a small helper around EventSource for the event broker.
 *
 *   var stream = BrokerClient.subscribe("topics/orders/events", {
 *     onEvent: function (e) { ... e.id, e.type, e.data (the raw string) ... },
 *     onGap: function (gap) { ... gap.reason, gap.requested, gap.resumed_after ... },
 *     onEnd: function (e) { ... the topic was closed ... },
 *     withCredentials: false,          // true for a broker on another origin of the same site, with cookies
 *     onError: function (e) { ... e.fatal, e.status, e.problem ... },
 *     onOpen: function () { ... the broker placed the stream: start the producer here ... },
 *     types: ["order.created"],        // event types to listen to besides "message"
 *     retries: 8,                      // reopenings after a passing refusal (502...), in a row
 *     connectFloorMs: 21000,           // a stream connecting is given this long at least
 *     heartbeatMs: 15000,              // the broker's heartbeat, until its first beat says it
 *   });
 *   stream.close();
 *
 * What it adds to EventSource:
 * - The id of the last event of each stream URL (an access_token in it aside; a
 *   caller's own last_event_id is part of it) is
 *   kept in sessionStorage, and a fresh page (a reload, or the same stream opened
 *   again with a new token) resumes after it with ?last_event_id=: a new
 *   EventSource sends no Last-Event-ID. (When the browser reconnects by itself it sends the
 *   header, which the broker prefers to the query parameter, so that stays exact.)
 *   Only the places of the 200 streams used most recently are kept; a place that
 *   sessionStorage refuses (full, or off) is warned of on the console, once.
 * - A stream "from now" (no from=earliest, no place kept) first asks where each of
 *   its topics ends (GET /topics/{t}) and keeps that as its place, as if it had
 *   received those events: a reload before the first event loses nothing published
 *   meanwhile (a topic with no event yet is then read from its beginning). Until
 *   those answers, `source` is null. The stream is opened only at that place: an
 *   answer that failed in passing (no answer within 10 s, 502, 503, 504) is asked
 *   again after 1 s, 2 s, 4 s... as a refused stream is reopened (below), each told
 *   onError({fatal: false}); a refusal for good (401, 403, an answer not the
 *   broker's), or `retries` passing ones in a row, is told onError({fatal: true}).
 *   Once placed, the stream's reopenings (below) count from none again.
 *   (It started from now on any failure, and missed in silence what was published
 *   between subscribe() and the stream's start.)
 * - The stream is opened with ?positions=true: where it stands with no event to
 *   deliver (its start, a later origin of a topic with no log) comes as a
 *   broker.position event, kept as the place like an event's id (and told to no
 *   callback). A page at a topic with no log keeps the broker's time then, and
 *   is told (onGap, "unknown") if it comes back after a log came and expired
 *   (and, Redis keeping nothing of an expired key, if it comes back a TTL or more
 *   later with nothing published: the broker cannot tell the two apart).
 * - onOpen is told once, when the broker has placed the stream: its first
 *   broker.position or delivered event. Not on EventSource's "open": a broker that
 *   could not read its store in time answers a 200 with only a retry: hint and a body
 *   that ends at once, EventSource fires "open" for it, and its reconnect starts from
 *   a later "now" (a stream with no place yet): a producer started there lost its first
 *   events untold. Reconnects (the browser's, the helper's) do not tell it again.
 * - broker.gap and broker.end are surfaced (onGap, onEnd); the stream stops at
 *   broker.end (a multi-topic stream, /events?topic=a&topic=b, at the end of each
 *   of its topics; a topic's "deleted" gap ends it too), and a later page that
 *   resumes past the end is answered 204, on which EventSource stops for good
 *   instead of reconnecting. Such a page gets onEnd again (with the end's id), not
 *   onError: the helper remembers which of its places is an end (and, across pages,
 *   which topics of a multi-topic stream have ended).
 * - An EventSource only hears the event types it listens to: "message" (events
 *   published without a type), the broker's own, and those named in `types`.
 * - An EventSource stops for good on any answer but a 200 to a reconnect: a proxy's
 *   502 in a rolling redeploy, a draining instance's 503. The helper asks again why;
 *   a passing refusal (502, 503, 504, no answer, or a 200: served again) opens the
 *   stream again from its place, after 1 s, 2 s, 4 s... (at most 30 s), each told
 *   onError({fatal: false}); a refusal for good (401, 403, 404...), or `retries`
 *   passing ones in a row, is told onError({fatal: true}).
 * - A stream that died with no FIN or RST (a phone's NAT mapping dropped, a laptop
 *   that slept, a middlebox that timed the flow out) is noticed: the browser sends
 *   nothing on it, so neither it nor EventSource would ever know. The stream is
 *   opened with ?heartbeat=event, on which the broker sends its heartbeat as a
 *   broker.beat event (data: the interval in seconds; no id, so the place is not
 *   moved; told to no callback), one first. Silent for two intervals and a second
 *   (no event, no beat), the stream is closed and opened again from its place, as
 *   after a passing refusal: onError({fatal: false, status: 0}), after 1 s, 2 s...
 *   Watched only once a beat told the interval (a broker older than the parameter
 *   sends none: its streams wait as they did).
 * - A stream being opened is bounded too: a reconnect (the browser's own, or the
 *   helper's) whose request a proxy or a half-dead path took and never answered, or
 *   a SYN into a dropped route, left the EventSource CONNECTING for minutes, or for
 *   ever. Connecting (no answer's head yet) for two intervals and a second (of the
 *   last beat heard; before any, of `heartbeatMs`: the broker's default 15 s, 31 s), but
 *   never less than 21 s (a live broker's head may take 20 s while its store is
 *   slow: with a short heartbeat, a store stall it rode out ended the page's stream
 *   for good; `connectFloorMs` sets it, for a broker whose store answers sooner, or
 *   a test), and the browser's own reconnect for its 2 s retry: wait more, the
 *   EventSource is closed and the stream opened again as after silence: one
 *   EventSource at a time, reopenings spaced 1 s, 2 s, 4 s... (each connection it
 *   refuses or drops at once is the browser's progress, and starts the bound again).
 * - broker.beat and broker.position are the helper's own: named in `types` or not,
 *   they are told to no callback.
 */
(function (global) {
  "use strict";

  var STORAGE_PREFIX = "broker-client:last-event-id:";
  var ENDED_PREFIX = "broker-client:ended-at:";
  var ENDED_TOPICS_PREFIX = "broker-client:ended-topics:";
  var EARLIEST = "earliest";
  var GAP = "broker.gap";
  var END = "broker.end";
  var POSITION = "broker.position";  // where the stream stands, with no event (asked for)
  var BEAT = "broker.beat";  // the broker's heartbeat, as an event a script sees (asked for)
  var ORIGIN = "0.0-0";  // a topic's place before anything of its log

  // Where a stream's place is kept: its URL without a fresh access token. A caller's
  // own ?last_event_id= stays in it: a place kept from another one must not win over it
  // (it did: asked to resume after an earlier id, the helper resumed after its later
  // place, and the events between were skipped). The same URL again (a reload) resumes.
  function storageKey(url) {
    var stream = new URL(url, global.location.href);
    stream.searchParams.delete("access_token");
    return STORAGE_PREFIX + stream.href;
  }

  function load(key) {
    try { return global.sessionStorage.getItem(key); } catch (error) { return null; }
  }

  // A JSON list kept under key ([] if none, or unreadable).
  function loadList(key) {
    try {
      var list = JSON.parse(load(key) || "[]");
      return Array.isArray(list) ? list : [];
    } catch (error) { return []; }
  }

  var warned = false;  // of a refused save, once a page: each event would say it again

  function save(key, value) {
    try {
      global.sessionStorage.setItem(key, value);
    } catch (error) {  // (storage off, or full: a reload will not resume)
      if (!warned && global.console) {
        warned = true;
        global.console.warn("BrokerClient: sessionStorage refused a stream's place (" +
          error.name + "): a reload of this page will not resume where it was", error);
      }
    }
  }

  function forget(key) {
    try { global.sessionStorage.removeItem(key); } catch (error) { /* storage off */ }
  }

  // The streams whose place is kept, least recently used first, at most MAX_PLACES:
  // sessionStorage is the host page's too, and a page that opens a stream per item
  // (a URL each) filled it (~44,000 places), after which nothing resumed and the
  // page's own setItem threw. The oldest are forgotten, their ends with them.
  var INDEX_KEY = "broker-client:places";
  var MAX_PLACES = 200;

  function placesIndex() {
    if (load(INDEX_KEY) !== null) { return loadList(INDEX_KEY); }
    // None yet: adopt the places an older helper kept with no index (in no known order).
    var found = [];
    try {
      for (var n = 0; n < global.sessionStorage.length; n++) {
        var key = global.sessionStorage.key(n);
        if (key && key.indexOf(STORAGE_PREFIX) === 0) { found.push(key); }
      }
    } catch (error) { /* storage off */ }
    return found;
  }

  function keepPlace(key) {
    var places = placesIndex().filter(function (kept) { return kept !== key; });
    places.push(key);
    places.splice(0, Math.max(places.length - MAX_PLACES, 0)).forEach(function (old) {
      [old, ENDED_PREFIX + old, ENDED_TOPICS_PREFIX + old].forEach(forget);
    });
    save(INDEX_KEY, JSON.stringify(places));
  }

  // The URL with ?last_event_id=<id>, replacing any the caller put there; the place
  // EARLIEST (a topic that had no event when the stream began) is ?from=earliest.
  // The query is kept as written and the id added unencoded ("~", "!" and ":" are legal
  // in a query): URLSearchParams encoded all three, in the topics too, and a stream of
  // long topic names outgrew the broker's head limit on resuming (431, for good).
  // A query pair's name as the broker reads it (last%5Fevent%5Fid is last_event_id).
  function paramName(pair) {
    var name = pair.split("=")[0].replace(/\+/g, " ");
    try { return decodeURIComponent(name); } catch (malformed) { return name; }
  }

  function resumeUrl(url, id) {
    var absolute = new URL(url, global.location.href);
    var replaced = id === EARLIEST ? ["last_event_id", "from"] : ["last_event_id"];
    var kept = absolute.search.slice(1).split("&").filter(function (pair) {
      return pair && replaced.indexOf(paramName(pair)) < 0;
    });
    kept.push(id === EARLIEST ? "from=earliest"
                              : "last_event_id=" + encodeURIComponent(id).replace(/%3A/gi, ":"));
    absolute.search = "?" + kept.join("&");
    return absolute.href;
  }

  // The URL the EventSource opens: the broker is asked (?positions=true) to send where the
  // stream stands as broker.position events. An id: line with no data (its start from
  // now, a later origin of a topic with no log) is kept by EventSource for its own
  // reconnects but fires nothing: the place kept for a reload missed it, and a page at
  // a topic with no log came back ?from=earliest, never told of a log that came and
  // expired meanwhile, or told of one for nothing after staying open a TTL.
  // It is asked (?heartbeat=event) for its heartbeats as broker.beat events too: an
  // EventSource hands a script no comment, and the page could not tell a stream that
  // died in silence from an idle one (see watchSilence).
  function streamUrl(url, place) {
    var stream = new URL(place ? resumeUrl(url, place) : url, global.location.href);
    var kept = stream.search.slice(1).split("&").filter(function (pair) {
      var name = paramName(pair);
      return pair && name !== "positions" && name !== "heartbeat";
    });
    kept.push("positions=true", "heartbeat=event");
    stream.search = "?" + kept.join("&");
    return stream.href;
  }

  // The stream's URL says where it starts (?from=earliest, ?last_event_id=): opened
  // again as it is, it misses nothing; else it starts from now.
  function namesItsStart(url) {
    var stream = new URL(url, global.location.href);
    return stream.searchParams.has("from") || stream.searchParams.has("last_event_id");
  }

  function decodedName(segment) {
    try { return decodeURIComponent(segment); } catch (malformed) { return segment; }
  }

  // GET /topics/{t} of each topic of a stream that starts from now, by topic (a
  // single-topic stream's under SINGLE), with the name its answer must carry; else null.
  var SINGLE = "";
  function topicInfoUrls(url) {
    if (namesItsStart(url)) { return null; }
    var stream = new URL(url, global.location.href);
    var single = /^(.*\/topics\/[^/]+)\/events$/.exec(stream.pathname);
    var multi = /^(.*\/)events$/.exec(stream.pathname);
    var paths = {};
    var names = {};
    if (single) {
      paths[SINGLE] = single[1];
      names[SINGLE] = decodedName(single[1].split("/").pop());
    } else if (multi) {
      stream.searchParams.getAll("topic").forEach(function (topic) {
        paths[topic] = multi[1] + "topics/" + encodeURIComponent(topic);
        names[topic] = topic;
      });
    }
    var token = stream.searchParams.get("access_token");
    var urls = {};
    Object.keys(paths).forEach(function (topic) {
      var info = new URL(paths[topic], stream.href);
      if (token) { info.searchParams.set("access_token", token); }
      urls[topic] = { url: info.href, name: names[topic] };
    });
    return Object.keys(urls).length ? urls : null;
  }

  // What coming back may mend: no answer, a proxy with no broker up (502, 504), a broker
  // that cannot serve for a moment (503: its Redis, or draining). (As the Python client's
  // RETRY_STATUSES: it asks a topic's end again on these, and raises on any other.)
  function passingStatus(status) {
    return status === 0 || status === 502 || status === 503 || status === 504;
  }

  // Where the topic ends now, {end, closed}: end is its newest id, EARLIEST if it has
  // none; closed, whether that is its broker.end (the stream is over). Or, if that could
  // not be learnt, {failure: {status, problem}} (status 0: no answer within
  // ASK_AGAIN_TIMEOUT_MS). Only the broker's own answers count: its 404 problem, and this
  // topic's info (a proxy's 404 page, or a topic named "." or ".." whose URL the browser
  // took for the listing's or the page's, was taken for "no event yet", and the history
  // replayed).
  function topicEnd(infoUrl, name, withCredentials) {
    var init = {
      headers: { Accept: "application/json" },
      credentials: withCredentials ? "include" : "same-origin",
    };
    var timer = null;
    if (global.AbortController) {  // (bounded, as a refused stream's question)
      var abort = new global.AbortController();
      init.signal = abort.signal;
      timer = global.setTimeout(function () { abort.abort(); }, ASK_AGAIN_TIMEOUT_MS);
    }
    function failure(status, problem) { return { failure: { status: status, problem: problem || null } }; }
    function answered() { if (timer !== null) { global.clearTimeout(timer); } }
    return global.fetch(infoUrl, init).then(function (response) {
      answered();
      var type = response.headers.get("content-type") || "";
      var problem = type.indexOf("application/problem+json") === 0;
      if (response.status === 404 && problem) {
        return { end: EARLIEST, closed: false };
      }
      if (!response.ok) {
        if (!problem) { return failure(response.status); }
        return response.json().then(function (body) { return failure(response.status, body); },
                                    function () { return failure(response.status); });
      }
      return response.json().then(function (topic) {
        if (!topic || topic.topic !== name) { return failure(response.status); }
        return { end: topic.last_id || EARLIEST, closed: Boolean(topic.closed && topic.last_id) };
      }, function () { return failure(response.status); });  // (a proxy's page: no topic)
    }, function () { answered(); return failure(0); });
  }

  // The place of a stream that starts from now: {place, closed}. place is where its
  // topics end (a multi-topic stream's cursor, "a~<id>!b~<id>", a topic with no event
  // at the origin "0.0-0"); closed, the topics whose end is their broker.end. Or
  // {failure} if one answer failed: one that coming back will not mend first.
  function startOf(infoUrls, withCredentials) {
    var topics = Object.keys(infoUrls).sort();
    var asked = topics.map(function (topic) {
      return topicEnd(infoUrls[topic].url, infoUrls[topic].name, withCredentials);
    });
    return Promise.all(asked).then(function (ends) {
      var failures = ends.filter(function (found) { return found.failure; }).map(function (found) {
        return found.failure;
      }).sort(function (a, b) { return passingStatus(a.status) - passingStatus(b.status); });
      if (failures.length) { return { failure: failures[0] }; }
      var closed = topics.filter(function (topic, n) { return ends[n].closed; });
      if (topics[0] === SINGLE) { return { place: ends[0].end, closed: closed }; }
      var parts = topics.map(function (topic, n) {
        return topic + "~" + (ends[n].end === EARLIEST ? ORIGIN : ends[n].end);
      });
      return { place: parts.join("!"), closed: closed };
    });
  }

  // Set while the page may be leaving (a reload, a navigation): see the error handler.
  var unloading = false;
  var UNLOAD_GRACE_MS = 1000;
  var ASK_AGAIN_TIMEOUT_MS = 10000;  // (what a refused stream's broker answers, asked again)
  // Reopening after a passing refusal: 1 s, doubled each time in a row, at most 30 s, and
  // RETRIES times before the page is told for good (1+2+4+8+16+30+30+30 s: two minutes,
  // longer than a rolling redeploy). A stream that stayed open STEADY_MS (or delivered an
  // event) counts from 0 again: its next refusal is a new outage, not this one going on.
  var FIRST_RETRY_MS = 1000;
  var MAX_RETRY_MS = 30000;
  var RETRIES = 8;
  var STEADY_MS = 10000;
  // A stream silent for two of its broker's heartbeat intervals and this is dead (as the
  // Python client takes it): beats come at least an interval apart, and a second more
  // outlasts a busy event loop (the broker's, or this page's).
  var SILENCE_MARGIN_MS = 1000;
  // How long a stream may stay connecting (its request sent, no head answered) is
  // judged as its silence is, by an interval: before any beat told it, by the broker's
  // default (BROKER_HEARTBEAT_SECONDS, 15 s): 31 s, but far short of how long Chromium
  // waits on a request taken and never answered (without end) or a SYN dropped (~2 min).
  // subscribe's heartbeatMs replaces it: a page whose broker beats more often is bounded
  // sooner (an open stream with no beat heard is still not watched: see connectLimitMs).
  var DEFAULT_BEAT_MS = 15000;
  // And never less than a live broker may take to answer a head while its store is
  // slow: it writes the head once the stream's subscription opened, which, on an
  // instance that follows none of its topics yet (its only page reconnecting, say),
  // reads the topic's state twice in turn (the live feed's start, then the stream's
  // own), each waiting up to 5 s for a free connection (REDIS_POOL_WAIT_SECONDS) and
  // 5 s for the reply (REDIS_REPLY_TIMEOUT_SECONDS): 20 s, and a second. (A short
  // heartbeat bounded it at 3 s: a store stall the broker rode out was given up on
  // again and again, each a retry, until the page was told its stream ended for good.)
  // The default of subscribe's connectFloorMs: a broker whose store answers sooner (or a
  // test that would not wait 21 s) may give it less.
  var CONNECT_FLOOR_MS = 21000;
  // The browser waits the broker's retry: hint (BROKER_RETRY_MS, 2 s by default; a
  // script cannot read it) before its own reconnect even asks: its bound is that longer.
  var RECONNECT_DELAY_MS = 2000;
  // The longest delay a browser's setTimeout holds (a signed 32-bit count of ms, 24.8
  // days): past it, the timer fires at once, and a bound meant as "very long" (a large
  // connectFloorMs or heartbeatMs) closed every stream before its head could come.
  var LONGEST_TIMER_MS = 2147483647;
  global.addEventListener("beforeunload", function () {
    unloading = true;
    global.setTimeout(function () { unloading = false; }, UNLOAD_GRACE_MS);  // it stayed
  });

  // A topic's part of a cursor, the start of a log as ORIGIN whatever its epoch: a topic
  // with no log yet (0.0-0, or 0.<ms>-<n>: the broker's time then) comes back with its
  // new log's epoch before its first event.
  function placeOf(id) { return id && /^0\.[0-9]+-[0-9]+$|\.0-0$/.test(id) ? ORIGIN : id; }

  // A multi-topic stream's id, each topic's part ({} for none, or a single-topic id).
  function cursorParts(id) {
    var parts = {};
    if (!id || id.indexOf("~") < 0) { return parts; }
    id.split("!").forEach(function (entry) {
      var at = entry.indexOf("~");
      parts[entry.slice(0, at)] = entry.slice(at + 1);
    });
    return parts;
  }

  // A duration option in ms, or its default for anything but a finite number of 0 or more.
  function msOption(value, fallback) {
    return typeof value === "number" && value >= 0 && isFinite(value) ? value : fallback;
  }

  function subscribe(url, options) {
    options = options || {};
    var key = storageKey(url);
    var stored = load(key);
    // The stream ended at this place on an earlier page: the broker answers 204.
    var endedBefore = stored !== null && load(ENDED_PREFIX + key) === stored;
    var delivered = false;
    var placed = false;  // the broker placed the stream, and onOpen was told so
    var closed = false;
    var closedByPage = false;  // (close() by the page: told nothing after it)
    var handle = {
      close: function () { closedByPage = true; close(); },
      source: null,
    };
    // A multi-topic stream (/events?topic=a&topic=b) goes on past one topic's end;
    // it is over once each of its topics has ended (a broker.end, or a deleted gap),
    // counted once per topic: a reconnect may be told of a deletion again.
    var named = new Set(new URL(url, global.location.href).searchParams.getAll("topic"));
    // Kept with the place: a page reloaded between two topics' ends must count the first
    // at the second, or it keeps no end, and the next page takes the 204 for a refusal.
    var endedTopics = new Set(stored !== null ? loadList(ENDED_TOPICS_PREFIX + key) : []);
    var lastId = stored;  // the place before the event being delivered
    var lastWasEnd = false;  // the last thing delivered was a topic's end
    var indexed = false;  // this stream is the most recently used of the kept places
    var maxRetries = typeof options.retries === "number" && options.retries >= 0
      ? options.retries : RETRIES;
    var connectFloorMs = msOption(options.connectFloorMs, CONNECT_FLOOR_MS);
    var assumedBeatMs = msOption(options.heartbeatMs, DEFAULT_BEAT_MS);  // (until a beat)
    var retries = 0;  // reopenings after passing refusals, in a row
    var openedAt = null;  // when the stream last opened (Date.now()), for STEADY_MS
    var reopening = null;  // the timer of the next reopening
    var beatMs = null;  // the broker's heartbeat interval, as its broker.beat says (ms)
    var heardAt = 0;  // when the stream last gave a sign of life (Date.now())
    var watchdog = null;  // the timer that looks for a stream gone silent

    function savePlace(id) {
      save(key, id);
      if (!indexed) { indexed = true; keepPlace(key); }
    }
    if (stored !== null) { indexed = true; keepPlace(key); }

    function ended(topic, id) {
      lastWasEnd = true;
      if (topic !== null) { topicEnded(topic); }  // (null: it cannot be told)
      if (named.size <= 1 || endedTopics.size >= named.size) {
        if (id) { save(ENDED_PREFIX + key, id); }
        close();
      }
    }

    function topicEnded(topic) {
      endedTopics.add(topic);
      if (named.size > 1) { save(ENDED_TOPICS_PREFIX + key, JSON.stringify(Array.from(endedTopics))); }
    }

    // The topic of an event on a multi-topic stream: a gap names it; any other event
    // is told by its id, the cursor ("a~<id>!b~<id>") in which only its topic moved.
    function topicOf(message, gap) {
      if (named.size <= 1) { return "the topic"; }
      if (gap) { return gap.topic; }
      var before = cursorParts(lastId);
      var after = cursorParts(message.id);
      var moved = Object.keys(after).filter(function (topic) {
        return (lastId ? placeOf(before[topic]) : ORIGIN) !== placeOf(after[topic]);
      });
      return moved.length === 1 ? moved[0] : null;
    }

    function close() {
      closed = true;
      stopWatching();
      if (reopening !== null) { global.clearTimeout(reopening); reopening = null; }
      if (handle.source) { handle.source.close(); }
    }

    function deliver(event) {
      if (closed) { return; }
      heardAt = Date.now();
      delivered = true;
      lastWasEnd = false;
      retries = 0;
      // Saved before the callbacks run: a reload from inside one resumes after this event.
      if (event.lastEventId) { savePlace(event.lastEventId); }
      tellPlaced();  // (before the event: the stream stood somewhere first)
      var message = { id: event.lastEventId || null, type: event.type, data: event.data };
      if (event.type === GAP) {
        var gap;
        try { gap = JSON.parse(event.data); } catch (error) { gap = {}; }
        gap.id = message.id;
        // A deleted topic is over: coming back would be told again, then wait for ever.
        // (Its id is kept as an end: a reload comes back with it, is answered 204, and
        // the page is told onEnd, as after a broker.end.)
        if (gap.reason === "deleted") { ended(topicOf(message, gap), message.id); }
        if (options.onGap) { options.onGap(gap); }
      } else if (event.type === END) {
        ended(topicOf(message, null), message.id);
        if (options.onEnd) { options.onEnd(message); }
      } else if (options.onEvent) {
        options.onEvent(message);
      }
      if (message.id) { lastId = message.id; }
    }

    // Where the stream stands with no event to deliver: kept as the place (a reload
    // resumes there), and as what the next event's cursor is told against. No callback.
    function keepPosition(event) {
      heardAt = Date.now();
      if (closed || !event.lastEventId) { return; }
      savePlace(event.lastEventId);
      lastId = event.lastEventId;
      tellPlaced();
    }

    // The broker placed the stream (what it sends from here on follows "now"): onOpen,
    // once. EventSource's "open" is no sign of it: a come-back-later 200 fires it too.
    function tellPlaced() {
      if (placed) { return; }
      placed = true;
      if (options.onOpen) { options.onOpen(); }
    }

    // The broker's beat (?heartbeat=event): a sign of life, and its interval, by which
    // silence is judged. Told to no callback, and no place: it has no id.
    function beaten(event) {
      heardAt = Date.now();
      var ms = Number(event.data) * 1000;
      if (!(ms > 0 && isFinite(ms))) { return; }  // (not the broker's: no interval learnt)
      var learnt = ms !== beatMs;
      beatMs = ms;
      if (learnt || watchdog === null) { watchSilence(event.target); }
    }

    function silenceLimitMs() { return 2 * beatMs + SILENCE_MARGIN_MS; }

    // How long the stream may stay connecting: as long as it may stay silent (the
    // broker's default interval before a beat told its own), but no less than a live
    // broker's head may take (connectFloorMs), and the browser's own reconnect its
    // retry: wait more. A broker that sends no beat answers a head as
    // soon as one that does: bounded the same, it is not reopened (once open, a stream
    // with no interval learnt is not watched: a beating broker sends its first beat
    // in the head's write, so an open with no beat is an older broker's).
    function connectLimitMs(ownReconnect) {
      var interval = beatMs === null ? assumedBeatMs : beatMs;
      var limit = Math.max(2 * interval + SILENCE_MARGIN_MS, connectFloorMs);
      return limit + (ownReconnect ? RECONNECT_DELAY_MS : 0);
    }

    // Look at the stream once it would have been connecting too long: still CONNECTING
    // (no "open", no "error" since: each restarts this), it is closed and opened again
    // by the helper, as a silent one is. Its "open" hands the stream to watchSilence.
    function watchConnecting(source, ownReconnect) {
      stopWatching();
      watchdog = global.setTimeout(function () {
        watchdog = null;
        if (closed || source !== handle.source) { return; }
        if (source.readyState !== global.EventSource.CONNECTING) { return; }  // (see "open")
        silent(source);
      }, Math.min(connectLimitMs(ownReconnect), LONGEST_TIMER_MS));
    }

    // Look at the open stream when it would have been silent too long, and again then
    // if it was not: one timer for the stream, not one set again for each event.
    function watchSilence(source) {
      stopWatching();
      if (beatMs === null) { return; }  // (no beat heard yet: an older broker sends none)
      var left = silenceLimitMs() - (Date.now() - heardAt);
      watchdog = global.setTimeout(function () {
        watchdog = null;
        if (closed || source !== handle.source) { return; }
        if (source.readyState !== global.EventSource.OPEN) { return; }  // ("error" watches)
        if (Date.now() - heardAt < silenceLimitMs()) {
          watchSilence(source);
        } else {
          silent(source);
        }
      }, Math.min(Math.max(left, 0), LONGEST_TIMER_MS));
    }

    function stopWatching() {
      if (watchdog !== null) { global.clearTimeout(watchdog); watchdog = null; }
    }

    // Nothing came for too long: the connection died where no one saw (the broker is
    // still writing to it, or gave it up), or the one being opened was never answered.
    // Let it go, and open the stream again from its place as after a passing refusal
    // with no answer (status 0): nothing missed, and nothing twice, since the old
    // source, closed, delivers nothing more (and asks nothing more: one at a time).
    function silent(source) {
      source.close();
      closed = true;
      failed(0, "");
    }

    function open(place) {
      if (closed) { return; }
      var source = new global.EventSource(streamUrl(url, place), {
        withCredentials: Boolean(options.withCredentials),
      });
      handle.source = source;
      // The helper's own control events are its to handle, never the page's: named in
      // `types`, a beat or a position was handed to onEvent (and a beat, with no id,
      // counted as an event delivered).
      var types = ["message", GAP, END].concat((options.types || []).filter(function (type) {
        return type !== BEAT && type !== POSITION;
      }));
      types.forEach(function (type) { source.addEventListener(type, deliver); });
      source.addEventListener(POSITION, keepPosition);
      source.addEventListener(BEAT, beaten);
      watchConnecting(source, false);
      source.addEventListener("open", function () {
        openedAt = Date.now();
        heardAt = openedAt;
        watchSilence(source);  // (by the interval a beat told, if any: connecting is over)
      });
      source.addEventListener("error", function () {
        // Reconnecting by itself: bounded from now (this attempt's error was progress).
        if (source.readyState === global.EventSource.CONNECTING && !closed) {
          watchConnecting(source, true);
        } else {
          stopWatching();
        }
        // CLOSED: the broker refused (401, 403, 400...), a proxy answered 502 (no broker
        // up), or the broker answered 204 (a closed topic); EventSource will not try
        // again. Otherwise it reconnects by itself.
        if (source.readyState === global.EventSource.CLOSED && !closed) {
          closed = true;
          if (endedBefore && !delivered) {
            // Resumed at an end kept by an earlier page: answered 204, if over indeed.
            whenOver(stored, function () {
              if (options.onEnd) { options.onEnd({ id: stored, type: END, data: "{}" }); }
            });
          } else if (lastWasEnd) {
            // The stream's last topic ended (told onEnd already), some of them before
            // this page subscribed (it never saw their end): the reconnect was 204.
            var at = lastId;
            whenOver(at, function () { if (at) { save(ENDED_PREFIX + key, at); } });
          } else if (unloading) {
            // Chromium closes a page's EventSources, with this event, before it leaves
            // it (a reload): that is no refusal. Told only if the page stays after all.
            global.setTimeout(tellRefused, UNLOAD_GRACE_MS);
          } else {
            tellRefused();
          }
        }
      });
    }

    // onError({fatal: true, status, problem}): the broker's answer (0: none came) and its
    // problem+json, if any, so that a page tells an expired token (401: refresh the
    // cookie, subscribe again) from a refusal for good (403).
    function refused(status, problem) {
      if (options.onError && !closedByPage) {
        options.onError({ fatal: true, status: status || 0, problem: problem || null });
      }
    }

    // Refused: ask again, to tell the page why (a 401, a 403), or to come back (a 502).
    function tellRefused() {
      whenOver(lastId, function () { refused(204); });
    }

    // What coming back may mend (passingStatus), or the stream served again (a 200 of
    // text/event-stream: the refusal passed while we asked; a 200 of anything else is a
    // page, which EventSource will refuse again).
    function passing(status, type) {
      if (status === 200) { return type.indexOf("text/event-stream") === 0; }
      return passingStatus(status);
    }

    // The answer asked again was no 204: reopen the stream from its place after a
    // while if that may mend it, else (or after `retries` in a row) tell the page.
    function failed(status, type, problem) {
      if (closedByPage) { return; }
      if (openedAt !== null && Date.now() - openedAt >= STEADY_MS) { retries = 0; }
      // With no place (a stream from now whose topics' end could not be learnt when it
      // opened, and no event since), a new EventSource would start from a new "now":
      // what was published meanwhile would be missed untold. The page is told instead.
      var placeless = !lastId && !namesItsStart(url);
      if (placeless || !passing(status, type)) {
        refused(status, problem);
        return;
      }
      tryAgain(status, problem, reopen);
    }

    // After a passing failure: `again` after 1 s, 2 s, 4 s... (at most 30 s), each told
    // onError({fatal: false}), or, after `retries` in a row, the page told for good.
    // close() cancels the wait (reopening).
    function tryAgain(status, problem, again) {
      if (retries >= maxRetries) {
        closed = true;
        refused(status, problem);
        return;
      }
      retries += 1;
      var delay = Math.min(FIRST_RETRY_MS * Math.pow(2, retries - 1), MAX_RETRY_MS);
      if (options.onError) {
        options.onError({
          fatal: false, status: status, problem: problem || null, attempt: retries, retryInMs: delay,
        });
      }
      reopening = global.setTimeout(again, delay);
    }

    function reopen() {
      reopening = null;
      if (closedByPage) { return; }
      closed = false;
      openedAt = null;
      open(lastId);  // (the place a reload would resume from: nothing missed or repeated)
    }

    // EventSource tells a 204 (the stream is over) from a refusal (401, 403, a proxy's
    // 502) in no way: ask again with the same place, and call over() on a 204, else
    // failed() with the status and problem+json.
    function whenOver(place, over) {
      var init = {
        headers: { Accept: "text/event-stream" },
        credentials: options.withCredentials ? "include" : "same-origin",
      };
      var target = streamUrl(url, place);
      // Bounded: a proxy that takes the request and never answers must not leave the
      // page told nothing (it was told at once before it asked why).
      var timer = null;
      if (global.AbortController) {
        var abort = new global.AbortController();
        init.signal = abort.signal;
        timer = global.setTimeout(function () { abort.abort(); }, ASK_AGAIN_TIMEOUT_MS);
      }
      global.fetch(target, init).then(function (response) {
        if (timer !== null) { global.clearTimeout(timer); }
        if (closedByPage) { if (response.body) { response.body.cancel(); } return; }
        if (response.status === 204) { over(); return; }
        var type = response.headers.get("content-type") || "";
        if (type.indexOf("application/problem+json") === 0) {
          response.json().then(function (problem) { failed(response.status, type, problem); },
                               function () { failed(response.status, type); });
          return;
        }
        if (response.body) { response.body.cancel(); }  // (a stream still open: let go)
        failed(response.status, type);
      }, function () { failed(0, ""); });
    }

    // A stream from now is opened at where its topics end, once that is known: opened
    // "from now" when an answer failed (as it was), it missed in silence what was
    // published between subscribe() and the broker placing it.
    function placeThenOpen(infoUrls) {
      reopening = null;
      if (closed) { return; }
      startOf(infoUrls, options.withCredentials).then(function (start) {
        if (closed) { return; }  // (closed by the page meanwhile)
        if (start.failure) {
          var failure = start.failure;
          if (!passingStatus(failure.status)) {
            closed = true;
            refused(failure.status, failure.problem);
            return;
          }
          tryAgain(failure.status, failure.problem, function () { placeThenOpen(infoUrls); });
          return;
        }
        var place = start.place;
        // The broker answered: the stream's own failures in a row start from none (the
        // placing ones left a stream refused on opening fewer reopenings than `retries`).
        retries = 0;
        savePlace(place);
        lastId = place;
        start.closed.forEach(topicEnded);
        if (start.closed.length >= Math.max(named.size, 1)) {
          // Over already: the broker answers 204, and the page is told onEnd, not onError.
          save(ENDED_PREFIX + key, place);
          stored = place;
          endedBefore = true;
        }
        open(place);
      });
    }

    var infoUrls = stored ? null : topicInfoUrls(url);
    if (infoUrls) {
      placeThenOpen(infoUrls);
    } else {
      open(stored);
    }
    return handle;
  }

  global.BrokerClient = { subscribe: subscribe };
})(window);
