// kakuremichi admin UI: live status (Server-Sent Events) and copy buttons. Everything works
// without it; it only saves reloads and typing.
"use strict";
(function () {
  function live() {
    var ids = document.body.dataset.live;
    if (!ids || !window.EventSource) return;
    var es = new EventSource("/ui/events?nodes=" + encodeURIComponent(ids));
    es.addEventListener("nodes", function (e) {
      var changes;
      try { changes = JSON.parse(e.data); } catch (_) { return; }
      changes.forEach(function (c) {
        document.querySelectorAll('[data-node="' + c.id + '"]').forEach(function (el) {
          el.textContent = c.online ? "online" : "offline";
          el.classList.toggle("online", c.online);
          el.classList.toggle("offline", !c.online);
        });
        if (c.online) {
          document.querySelectorAll('[data-installed="' + c.id + '"]').forEach(function (el) { el.textContent = "yes"; });
        }
      });
    });
  }
  // Agent sessions: the API's status stream (one JSON object per event).
  function sessions() {
    if (document.body.dataset.sessions !== "live" || !window.EventSource) return;
    var es = new EventSource("/ui/sessions/events");
    es.onmessage = function (e) {
      var c;
      try { c = JSON.parse(e.data); } catch (_) { return; }
      document.querySelectorAll('[data-session="' + c.session_id + '"]').forEach(function (el) {
        el.textContent = c.status;
        el.classList.toggle("online", c.status === "active" || c.status === "running");
        el.classList.toggle("offline", c.status === "stopped" || c.status === "failed");
      });
    };
  }
  // The resource form: only the fields of the chosen kind (HTTP, TCP, UDP) are shown.
  function protocolForm() {
    document.querySelectorAll("form[data-protocol-form]").forEach(function (f) {
      function show() {
        var chosen = f.querySelector("input[name=protocol]:checked");
        var p = chosen ? chosen.value : "http";
        f.querySelectorAll("[data-for]").forEach(function (el) {
          el.hidden = el.dataset.for.split(" ").indexOf(p) < 0;
        });
      }
      f.querySelectorAll("input[name=protocol]").forEach(function (r) { r.addEventListener("change", show); });
      show();
    });
  }
  function copy() {
    document.querySelectorAll("button[data-copy]").forEach(function (b) {
      b.addEventListener("click", function () {
        var el = document.getElementById(b.dataset.copy);
        if (!el || !navigator.clipboard) return;
        navigator.clipboard.writeText(el.textContent).then(function () {
          b.textContent = "Copied";
          setTimeout(function () { b.textContent = "Copy"; }, 1500);
        }, function () {});
      });
    });
  }
  document.addEventListener("DOMContentLoaded", function () { live(); sessions(); protocolForm(); copy(); });
})();
