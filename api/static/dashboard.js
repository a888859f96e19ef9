// Follows the event stream: each event is added to the list, and the panels are fetched again
// (server-rendered, at most every 300 ms). EventSource reconnects by itself with Last-Event-ID.
(function () {
  "use strict";
  var root = document.getElementById("dashboard");
  var panels = document.getElementById("panels");
  var list = document.getElementById("events");
  var live = document.getElementById("live");
  var KEEP = 200;
  var pending = null;

  function refresh() {
    pending = null;
    fetch("/dashboard/panels", { credentials: "same-origin" })
      .then(function (r) {
        if (r.status === 401) { window.location.reload(); }  // the session ended: the login form
        return r.ok ? r.text() : Promise.reject(new Error("HTTP " + r.status));
      })
      .then(function (html) { panels.innerHTML = html; })
      .catch(function () { live.textContent = "refresh failed"; });
  }

  function cell(tag, cls, text) {
    var el = document.createElement(tag);
    if (cls) { el.className = cls; }
    el.textContent = text;
    return el;
  }

  function show(e) {
    if (list.querySelector('[data-event-id="' + e.id + '"]')) { return; }
    var li = document.createElement("li");
    li.dataset.eventId = e.id;
    li.className = "fresh kind-" + e.kind;
    li.appendChild(cell("time", "", e.at.substring(11, 19)));
    li.appendChild(cell("span", "kind", e.kind));
    li.appendChild(cell("span", "msg", e.message));
    list.insertBefore(li, list.firstChild);
    while (list.children.length > KEEP) { list.removeChild(list.lastChild); }
  }

  var source = new EventSource(
    "/api/v1/events/stream?typed=false&after=" + encodeURIComponent(root.dataset.lastEventId)
  );
  source.onopen = function () { live.textContent = "live"; live.className = "live on"; };
  source.onerror = function () {
    live.className = "live off";
    if (source.readyState !== EventSource.CLOSED) { live.textContent = "reconnecting…"; return; }
    // Refused (the session ended, or the server is gone): load the page again in a while,
    // which shows the login form or opens a new stream.
    live.textContent = "disconnected";
    window.setTimeout(function () { window.location.reload(); }, 5000);
  };
  source.onmessage = function (message) {
    show(JSON.parse(message.data));
    if (pending === null) { pending = window.setTimeout(refresh, 300); }
  };
})();
