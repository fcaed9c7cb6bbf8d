// fitcli report page: embed each chart when it scrolls into view (all at once with #all), and make
// the ranked table sortable and filterable. Errors are collected in window.__fitcli.errors and
// mirrored on <html data-errors> (with data-rendered, the count of charts drawn) for headless checks.
// The address can carry a view: #all&sort=-unit&filter=conv2&dead (draw every chart; sort the
// table by a column, '-' for descending; filter its rows; dead units only).
(function () {
  "use strict";
  var root = document.documentElement;
  var state = window.__fitcli;
  var specs = JSON.parse(document.getElementById("fitcli-charts").textContent);
  var charts = Array.prototype.slice.call(document.querySelectorAll(".chart[data-chart]"));
  var rendered = 0;
  var params = {};
  location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
    if (!kv) { return; }
    var i = kv.indexOf("=");
    params[decodeURIComponent(i < 0 ? kv : kv.slice(0, i))] = i < 0 ? "" : decodeURIComponent(kv.slice(i + 1));
  });

  function publish() {
    root.setAttribute("data-rendered", String(rendered));
    root.setAttribute("data-charts", String(charts.length));
    root.setAttribute("data-errors", JSON.stringify(state.errors));
    root.setAttribute("data-warnings", JSON.stringify(state.warnings));
  }

  function embed(el) {
    if (el.getAttribute("data-state")) { return; }
    el.setAttribute("data-state", "pending");
    var spec = specs[el.getAttribute("data-chart")];
    if (typeof window.vegaEmbed !== "function") {
      state.errors.push("the chart runtime did not load");
      el.setAttribute("data-state", "error");
      publish();
      return;
    }
    window.vegaEmbed(el, spec, {actions: false, renderer: "canvas"}).then(function () {
      el.setAttribute("data-state", "done");
      rendered += 1;
      publish();
    }).catch(function (e) {
      el.setAttribute("data-state", "error");
      el.classList.add("error");
      el.textContent = "chart failed: " + e;
      state.errors.push("chart " + el.getAttribute("data-chart") + ": " + e);
      publish();
    });
  }

  if ("all" in params || !("IntersectionObserver" in window)) {
    charts.forEach(embed);
  } else {
    var io = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) {
        if (e.isIntersecting) { io.unobserve(e.target); embed(e.target); }
      });
    }, {rootMargin: "600px 0px"});
    charts.forEach(function (el) { io.observe(el); });
  }

  // ---- the ranked table ----
  var table = document.getElementById("ranked-table");
  if (table) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
    var filter = document.getElementById("filter");
    var deadOnly = document.getElementById("dead-only");
    var count = document.getElementById("row-count");

    var key = function (row, col, numeric) {
      var cell = row.cells[col];
      if (!numeric) { return cell.textContent; }
      var v = cell.getAttribute("data-v");
      return v === null || v === "" ? NaN : parseFloat(v);
    };

    heads.forEach(function (th, col) {
      th.addEventListener("click", function () {
        var numeric = th.getAttribute("data-type") === "num";
        var asc = !th.classList.contains("asc");
        heads.forEach(function (h) { h.classList.remove("asc", "desc"); });
        th.classList.add(asc ? "asc" : "desc");
        rows.sort(function (a, b) {
          var x = key(a, col, numeric), y = key(b, col, numeric);
          if (numeric) {  // non-finite values last, whatever the direction
            if (isNaN(x) || isNaN(y)) { return isNaN(x) - isNaN(y); }
            return asc ? x - y : y - x;
          }
          return asc ? x.localeCompare(y) : y.localeCompare(x);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });

    var apply = function () {
      var q = filter.value.trim().toLowerCase();
      var shown = 0;
      rows.forEach(function (r) {
        var ok = (!deadOnly || !deadOnly.checked || r.classList.contains("dead")) &&
                 (!q || r.textContent.toLowerCase().indexOf(q) >= 0);
        r.style.display = ok ? "" : "none";
        shown += ok ? 1 : 0;
      });
      count.textContent = shown + " of " + rows.length + " rows";
    };
    filter.addEventListener("input", apply);
    if (deadOnly) { deadOnly.addEventListener("change", apply); }
    if (params.sort) {
      var desc = params.sort.charAt(0) === "-", name = desc ? params.sort.slice(1) : params.sort;
      heads.forEach(function (th) {
        if (th.textContent.trim() === name) { th.click(); if (desc) { th.click(); } }
      });
    }
    if (params.filter) { filter.value = params.filter; }
    if ("dead" in params && deadOnly) { deadOnly.checked = true; }
    apply();
  }
  publish();
})();
