// Live updates: the websocket brings hints (event ids); a gap or a reconnect means a page
// re-fetches its fragments, so a lost message never leaves a stale screen.
(function () {
  var lastEventId = null;
  function setStatus(ok) {
    var el = document.getElementById("live-status");
    if (el) { el.classList.toggle("on", ok); el.title = ok ? "live updates on" : "live updates off"; }
  }
  document.addEventListener("htmx:wsOpen", function () {
    setStatus(true);
    if (lastEventId !== null) { document.body.dispatchEvent(new CustomEvent("live:resync")); }
  });
  document.addEventListener("htmx:wsClose", function () { setStatus(false); });
  document.addEventListener("htmx:oobAfterSwap", function (e) {
    var el = e.detail && e.detail.target;
    if (!el || el.id !== "live-last-event") { return; }
    var id = parseInt(el.dataset.eventId, 10);
    if (lastEventId !== null && id > lastEventId + 1) {
      document.body.dispatchEvent(new CustomEvent("live:resync"));
    }
    lastEventId = Math.max(lastEventId || 0, id);
    document.body.dispatchEvent(new CustomEvent("live:event", { detail: el.dataset }));
  });
})();
