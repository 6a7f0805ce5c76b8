// saekit's feature browser: draws the pages from the data scripts in data/ (see saekit/viz/browser.py).
// The pages open from file://, where browsers refuse to fetch local files: data arrive as <script> files that assign to
// globals (SAEKIT_META, SAEKIT_VOCAB, SAEKIT_INDEX, SAEKIT_SHARDS[n]). No network, no libraries.
"use strict";

var SAEKIT_SHARDS = {};

var SAEKIT = (function () {
  var PAGE_SIZE = 100;

  function esc(text) {
    return String(text).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
    });
  }

  function num(v) {
    if (v === null || v === undefined) return "–";
    if (v === 0) return "0";
    return Number(v.toPrecision(3)).toString();
  }

  function percent(v) {
    return v === 0 ? "0%" : Number((100 * v).toPrecision(3)) + "%";
  }

  function token(id) {
    var text = SAEKIT_VOCAB[id];
    if (text === undefined) text = "#" + id;
    return text.replace(/\n/g, "↵").replace(/\t/g, "⇥");
  }

  // A histogram as inline SVG: counts in equal bins over (0, max].
  function histogram(counts, width, height, max) {
    var top = Math.max.apply(null, counts.concat([1]));
    var w = width / counts.length, bars = "";
    counts.forEach(function (c, i) {
      var h = c ? Math.max(1, (height - 1) * c / top) : 0;
      bars += '<rect data-count="' + c + '" x="' + (i * w).toFixed(1) + '" y="' + (height - h).toFixed(1) + '" width="' +
        Math.max(w - 1, 1).toFixed(1) + '" height="' + h.toFixed(1) + '"><title>' +
        (max ? num(max * i / counts.length) + "–" + num(max * (i + 1) / counts.length) + ": " : "") + c +
        "</title></rect>";
    });
    return '<svg class="hist" width="' + width + '" height="' + height + '" viewBox="0 0 ' + width + " " + height +
      '">' + bars + "</svg>";
  }

  // One context: its tokens tinted by the feature's code (alpha = code / the feature's max), the code on hover.
  function context(ctx, max) {
    if (!ctx.t) return '<div class="context" data-row="' + ctx.r + '" data-value="' + ctx.v + '">row ' + ctx.r +
      ": " + num(ctx.v) + "</div>";
    var spans = "";
    ctx.t.forEach(function (id, i) {
      if (id < 0) return;
      var a = ctx.a[i], centre = i === SAEKIT_META.before ? " centre" : "";
      if (a === null) {
        spans += '<span class="tok none' + centre + '" title="not in the harvest">' + esc(token(id)) + "</span>";
        return;
      }
      var alpha = max > 0 ? Math.min(1, a / max) : 0;
      spans += '<span class="tok' + centre + '" data-act="' + a + '" title="' + esc(num(a)) + " · " +
        esc(JSON.stringify(token(id))) + '" style="background:rgba(255,112,0,' + alpha.toFixed(3) + ')">' +
        esc(token(id)) + "</span>";
    });
    return '<div class="context" data-row="' + ctx.r + '" data-value="' + ctx.v + '"><span class="value">' +
      num(ctx.v) + "</span>" + spans + "</div>";
  }

  function parseHash() {
    var state = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var kv = part.split("=");
      if (kv[0]) state[decodeURIComponent(kv[0])] = decodeURIComponent(kv.slice(1).join("="));
    });
    return state;
  }

  // --- the index

  function index() {
    var data = SAEKIT_INDEX, n = data.density.length;
    var columns = {
      feature: function (f) { return f; },
      density: function (f) { return data.density[f]; },
      mean: function (f) { return data.mean[f]; },
      max: function (f) { return data.max[f]; }
    };

    function matches(query) {
      var q = query.trim().toLowerCase(), all = [];
      for (var f = 0; f < n; f++) all.push(f);
      if (!q) return all;
      if (/^\d+$/.test(q)) return all.filter(function (f) { return String(f).indexOf(q) === 0; });
      return all.filter(function (f) {
        return data.tokens[f].some(function (id) { return token(id).trim().toLowerCase().indexOf(q) >= 0; });
      });
    }

    function draw() {
      var state = parseHash();
      var sort = columns[state.sort] ? state.sort : "density";
      var desc = state.desc !== undefined ? state.desc === "1" : sort !== "feature";
      var query = state.q || "";
      var page = Math.max(0, parseInt(state.page || "0", 10) || 0);
      document.getElementById("search").value = query;
      var rows = matches(query);
      rows.sort(function (a, b) {
        var d = columns[sort](a) - columns[sort](b);
        return (desc ? -d : d) || a - b;
      });
      var pages = Math.max(1, Math.ceil(rows.length / PAGE_SIZE));
      page = Math.min(page, pages - 1);
      var html = "";
      rows.slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE).forEach(function (f) {
        html += '<tr data-feature="' + f + '"><td><a href="feature.html#' + f + '">' + f + "</a></td>" +
          '<td class="n" data-value="' + data.density[f] + '">' + percent(data.density[f]) + "</td>" +
          '<td class="n" data-value="' + data.mean[f] + '">' + num(data.mean[f]) + "</td>" +
          '<td class="n" data-value="' + data.max[f] + '">' + num(data.max[f]) + "</td>" +
          "<td>" + histogram(data.hist[f], 96, 20, data.max[f]) + "</td>" +
          '<td class="tokens">' + data.tokens[f].map(function (id) {
            return '<span class="chip">' + esc(token(id)) + "</span>";
          }).join(" ") + "</td></tr>";
      });
      document.querySelector("#features tbody").innerHTML = html;
      document.getElementById("count").textContent = rows.length + " of " + n + " features";
      document.getElementById("page").textContent = "page " + (page + 1) + " of " + pages;
      document.querySelectorAll("th[data-sort]").forEach(function (th) {
        th.className = th.dataset.sort === sort ? (desc ? "sorted desc" : "sorted asc") : "";
      });
      go = function (changes) {
        var next = {q: query, sort: sort, desc: desc ? "1" : "0", page: String(page)};
        Object.keys(changes).forEach(function (k) { next[k] = changes[k]; });
        location.hash = Object.keys(next).filter(function (k) { return next[k] !== ""; }).map(function (k) {
          return k + "=" + encodeURIComponent(next[k]);
        }).join("&");
      };
      document.getElementById("prev").disabled = page === 0;
      document.getElementById("next").disabled = page >= pages - 1;
      document.getElementById("prev").onclick = function () { go({page: String(page - 1)}); };
      document.getElementById("next").onclick = function () { go({page: String(page + 1)}); };
    }

    var go = function () {};
    document.querySelectorAll("th[data-sort]").forEach(function (th) {
      th.onclick = function () {
        var state = parseHash(), same = (state.sort || "density") === th.dataset.sort;
        go({sort: th.dataset.sort, desc: same && state.desc === "1" ? "0" : "1", page: "0"});
      };
    });
    var timer = null;
    document.getElementById("search").oninput = function (e) {
      clearTimeout(timer);
      timer = setTimeout(function () { go({q: e.target.value, page: "0"}); }, 150);
    };
    window.onhashchange = draw;
    draw();
  }

  // --- a feature's page

  function load(shard, then) {
    if (SAEKIT_SHARDS[shard]) return then();
    var script = document.createElement("script");
    script.src = "data/features/" + String(shard).padStart(5, "0") + ".js";
    script.onload = then;
    script.onerror = function () {
      document.getElementById("feature").innerHTML = '<p class="missing">cannot read ' + esc(script.src) +
        ": the site is incomplete; run saekit browse again.</p>";
    };
    document.head.appendChild(script);
  }

  function section(title, body) {
    return '<section><h2>' + esc(title) + "</h2>" + body + "</section>";
  }

  function drawFeature(r) {
    var max = r.max, html = '<div id="stats" data-feature="' + r.f + '"><h1>Feature ' + r.f + "</h1>" +
      '<span>density <b id="density" data-value="' + r.density + '">' + percent(r.density) + "</b> (" + r.n +
      " of " + SAEKIT_META.n_rows + " tokens)</span>" +
      '<span>mean when active <b id="mean" data-value="' + r.mean + '">' + num(r.mean) + "</b></span>" +
      '<span>max <b id="max" data-value="' + r.max + '">' + num(r.max) + "</b></span></div>";
    html += section("Activations (non-zero), " + r.hist.length + " bins over (0, " + num(max) + "]",
      histogram(r.hist, 560, 90, max) + '<div class="axis"><span>0</span><span>' + num(max) + "</span></div>");
    var top = r.top.map(function (c) { return context(c, max); }).join("");
    html += '<section id="top"><h2>Top ' + r.top.length + " activations</h2>" +
      (top || "<p>This feature never fires on the harvest.</p>") + "</section>";
    var bands = r.bands.filter(function (b) { return b.contexts.length; }).map(function (b) {
      return '<div class="band"><h3>quantile ' + esc(b.label) + " of its non-zero activations</h3>" +
        b.contexts.map(function (c) { return context(c, max); }).join("") + "</div>";
    }).join("");
    if (bands) html += '<section id="bands"><h2>Sampled from quantiles</h2>' + bands + "</section>";
    var near = r.near.map(function (p) {
      return '<a class="near" href="#' + p[0] + '" data-cos="' + p[1] + '">' + p[0] + " <small>" + num(p[1]) +
        "</small></a>";
    }).join(" ");
    html += '<div class="columns">' + section("Nearest features (decoder cosine)", '<div id="near">' + near +
      "</div>");
    if (r.up) {
      var list = function (pairs) {
        return "<ol>" + pairs.map(function (p) {
          return '<li><span class="chip">' + esc(token(p[0])) + "</span> " + num(p[1]) + "</li>";
        }).join("") + "</ol>";
      };
      html += section("Logits it raises", '<div id="up">' + list(r.up) + "</div>") +
        section("Logits it lowers", '<div id="down">' + list(r.down) + "</div>");
    }
    html += "</div>";
    document.getElementById("feature").innerHTML = html;
    document.title = "feature " + r.f + " · saekit";
  }

  function feature() {
    var n = SAEKIT_META.n_features, size = SAEKIT_META.shard_features;

    function show() {
      var f = parseInt(location.hash.replace(/^#/, ""), 10);
      if (!(f >= 0 && f < n)) f = 0;
      document.getElementById("prev").href = "#" + Math.max(0, f - 1);
      document.getElementById("next").href = "#" + Math.min(n - 1, f + 1);
      var shard = Math.floor(f / size);
      load(shard, function () { drawFeature(SAEKIT_SHARDS[shard][f - shard * size]); });
    }

    document.getElementById("jump").onchange = function (e) { location.hash = "#" + e.target.value; };
    window.onhashchange = function () { show(); window.scrollTo(0, 0); };
    show();
  }

  return {index: index, feature: feature};
})();
