/* reid-prompt gallery: a static page read from file://, no server, no network.
 *
 * Data arrives as scripts (fetch() of local files is blocked under file://): data/catalog.js calls
 * galleryCatalog({...}) once; data/chunk_NNNNN.js calls galleryChunk(k, {...}) and is added only when the
 * page being shown needs one of its images. Filters work on the catalog alone (sparse lists of image
 * positions per flag and prompt), so 100,000 images filter without loading their captions.
 *
 * Review marks live in localStorage (per output folder: catalog.gallery_id) and leave as review.csv:
 * image_id,prompt_name,caption_index,verdict. Every text from the data goes in through textContent.
 */
(function () {
  "use strict";

  var catalog = null;
  var chunks = {};        // k -> chunk record
  var loading = {};       // k -> Promise
  var personRow = {};     // person label -> [label, start, count, cameras]
  var view = new Int32Array(0);
  var state = { prompt: -1, flags: {}, errors: false, person: "", review: "", page: 0, size: 50 };
  var ids = null;         // image ids in gallery order (data/ids.js), loaded by the review-mark filter only
  var notPersons = {};    // labels of the junk/distractor groups (Market -1 and 0): not a person
  var caps = [];          // the captions on screen, in order: {key, el}
  var cursor = -1;
  var renderToken = 0;
  var marks = {};
  var storageKey = null;
  var storageOk = true;

  function $(id) { return document.getElementById(id); }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function fmt(n) { return Number(n).toLocaleString("en-US"); }

  function showMessage(text, kind) {
    var m = $("message");
    m.textContent = text;
    m.dataset.kind = kind || "";
    m.hidden = !text;
  }

  function loadScript(src) {
    return new Promise(function (resolve, reject) {
      var s = document.createElement("script");
      s.src = src;
      s.charset = "utf-8";
      s.onload = function () { resolve(); };
      s.onerror = function () { reject(new Error("cannot load " + src)); };
      document.body.appendChild(s);
    });
  }

  /* ---- data arriving ---------------------------------------------------------------------------- */

  window.galleryCatalog = function (c) { catalog = c; };

  window.galleryChunk = function (k, data) { chunks[k] = data; };

  window.galleryIds = function (list) { ids = list; };

  function loadIds() {
    if (ids) return Promise.resolve();
    return loadScript("data/ids.js").then(function () {
      if (!ids) throw new Error("data/ids.js holds no ids");
    });
  }

  function chunkName(k) { return "data/chunk_" + String(k).padStart(5, "0") + ".js"; }

  function loadChunk(k) {
    if (chunks[k]) return Promise.resolve();
    if (!loading[k]) {
      loading[k] = loadScript(chunkName(k)).then(function () {
        if (!chunks[k]) throw new Error(chunkName(k) + " holds no data");
      }, function (err) { delete loading[k]; throw err; });
    }
    return loading[k];
  }

  function imageAt(pos) {
    var c = chunks[Math.floor(pos / catalog.chunk_images)];
    return c.images[pos - c.start];
  }

  /* ---- review marks ------------------------------------------------------------------------------ */

  function markKey(imageId, prompt, index) { return JSON.stringify([imageId, prompt, index]); }

  function loadMarks() {
    storageKey = "reid-prompt-gallery:" + catalog.gallery_id + ":marks";
    try {
      var raw = window.localStorage.getItem(storageKey);
      marks = raw ? JSON.parse(raw) : {};
      if (!marks || typeof marks !== "object") marks = {};
    } catch (e) {
      storageOk = false;
      marks = {};
    }
  }

  function saveMarks() {
    if (!storageOk) return;
    try {
      window.localStorage.setItem(storageKey, JSON.stringify(marks));
    } catch (e) {
      storageOk = false;
      showMessage("This browser does not keep the marks (storage refused): download review.csv before closing the page.");
    }
  }

  function setMark(key, verdict) {
    if (verdict) marks[key] = verdict; else delete marks[key];
    saveMarks();
    showMarks();
  }

  function showMarks() {
    var acc = 0, rej = 0;
    Object.keys(marks).forEach(function (k) { if (marks[k] === "accept") acc++; else if (marks[k] === "reject") rej++; });
    $("marks").textContent = fmt(acc) + " accepted \u00b7 " + fmt(rej) + " rejected" + (storageOk ? "" : " (not stored)");
    caps.forEach(function (c) { paintMark(c); });
  }

  function paintMark(c) {
    var v = marks[c.key] || "";
    c.el.classList.toggle("accepted", v === "accept");
    c.el.classList.toggle("rejected", v === "reject");
    c.el.querySelector(".verdict").textContent = v === "accept" ? "accepted" : v === "reject" ? "rejected" : "";
  }

  function csvField(value) {
    var s = String(value);
    return /[",\r\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }

  function reviewCsv() {
    var rows = [];
    Object.keys(marks).forEach(function (k) {
      var v = marks[k];
      if (v !== "accept" && v !== "reject") return;
      var parts;
      try { parts = JSON.parse(k); } catch (e) { return; }
      rows.push([parts[0], parts[1], parts[2], v]);
    });
    rows.sort(function (a, b) {
      return a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : a[2] - b[2];
    });
    var lines = ["image_id,prompt_name,caption_index,verdict"];
    rows.forEach(function (r) { lines.push(r.map(csvField).join(",")); });
    return lines.join("\r\n") + "\r\n";
  }

  function download() {
    var blob = new Blob([reviewCsv()], { type: "text/csv;charset=utf-8" });
    var a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "review.csv";
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 2000);
  }

  /* ---- filtering (catalog only) ----------------------------------------------------------------- */

  function selectedPrompts() {
    if (state.prompt >= 0) return [String(state.prompt)];
    return catalog.prompts.map(function (_, i) { return String(i); });
  }

  function personMatches(label, terms) {
    if (label === null) return false;
    var lower = label.toLowerCase();
    for (var i = 0; i < terms.length; i++) {
      var t = terms[i];
      if (/^-?\d+$/.test(t) && /^-?\d+$/.test(label)) {
        if (parseInt(t, 10) === parseInt(label, 10)) return true;
      } else if (lower.indexOf(t.toLowerCase()) >= 0) {
        return true;
      }
    }
    return false;
  }

  function computeView() {
    var n = catalog.n_images;
    var keep = new Uint8Array(n);
    var terms = state.person.split(/[,\s]+/).filter(function (t) { return t.length > 0; });
    if (terms.length) {
      catalog.persons.forEach(function (row) {
        if (personMatches(row[0], terms)) keep.fill(1, row[1], row[1] + row[2]);
      });
    } else {
      keep.fill(1);
    }
    var prompts = selectedPrompts();
    if (state.prompt >= 0) {
      var has = catalog.prompt_images[String(state.prompt)];
      if (has) {
        var present = new Uint8Array(n);
        has.forEach(function (p) { present[p] = 1; });
        for (var i = 0; i < n; i++) keep[i] &= present[i];
      }
    }
    var names = Object.keys(state.flags).filter(function (f) { return state.flags[f]; });
    if (names.length || state.errors) {
      var hit = new Uint8Array(n);
      names.forEach(function (f) {
        var byPrompt = catalog.flagged[f] || {};
        prompts.forEach(function (p) { (byPrompt[p] || []).forEach(function (pos) { hit[pos] = 1; }); });
      });
      if (state.errors) {
        prompts.concat(["*"]).forEach(function (p) {
          (catalog.errored[p] || []).forEach(function (pos) { hit[pos] = 1; });
        });
      }
      for (var j = 0; j < n; j++) keep[j] &= hit[j];
    }
    if (state.review && ids) reviewFilter(keep, prompts);
    var count = 0;
    for (var k = 0; k < n; k++) count += keep[k];
    view = new Int32Array(count);
    var w = 0;
    for (var m = 0; m < n; m++) if (keep[m]) view[w++] = m;
  }

  /* Images by their captions' marks (of the prompt shown): "rejected"/"accepted" keep the images with
   * such a mark, "unmarked" those with none. Marks are keyed by image id; ids.js gives the positions. */
  function reviewFilter(keep, prompts) {
    var n = catalog.n_images;
    var names = {};
    prompts.forEach(function (p) { names[catalog.prompts[Number(p)]] = true; });
    var posOf = {};
    for (var i = 0; i < ids.length; i++) posOf[ids[i]] = i;
    var hit = new Uint8Array(n);
    Object.keys(marks).forEach(function (k) {
      var parts;
      try { parts = JSON.parse(k); } catch (e) { return; }
      if (!names[parts[1]]) return;
      var pos = posOf[parts[0]];
      if (pos === undefined) return;
      if (state.review === "unmarked" ? (marks[k] === "accept" || marks[k] === "reject") : marks[k] === state.review) {
        hit[pos] = 1;
      }
    });
    for (var j = 0; j < n; j++) keep[j] &= state.review === "unmarked" ? 1 - hit[j] : hit[j];
  }

  function pages() { return Math.max(1, Math.ceil(view.length / state.size)); }

  /* ---- rendering (the visible page only) -------------------------------------------------------- */

  function render(focusLast) {
    var token = ++renderToken;
    document.body.dataset.state = "loading";
    state.page = Math.min(Math.max(0, state.page), pages() - 1);
    var first = state.page * state.size;
    var positions = Array.prototype.slice.call(view.subarray(first, first + state.size));
    var needed = {};
    positions.forEach(function (p) { needed[Math.floor(p / catalog.chunk_images)] = true; });
    pageControls(first, positions.length);
    Promise.all(Object.keys(needed).map(function (k) { return loadChunk(Number(k)); })).then(function () {
      if (token !== renderToken) return;
      if ($("message").dataset.kind === "data") showMessage("");
      draw(positions);
      setCursor(caps.length ? (focusLast ? caps.length - 1 : 0) : -1, false);
      document.body.dataset.state = "ready";
    }, function (err) {
      if (token !== renderToken) return;
      $("view").textContent = "";
      caps = [];
      cursor = -1;
      showMessage("Part of the gallery's data is missing (" + err.message + "): build it again with " +
        "`python -m pipeline gallery`.", "data");
      document.body.dataset.state = "error";
    });
  }

  function pageControls(first, count) {
    var total = view.length;
    $("pageinfo").textContent = total
      ? "page " + fmt(state.page + 1) + " of " + fmt(pages()) + " \u00b7 images " + fmt(first + 1) + "\u2013" +
        fmt(first + count) + " of " + fmt(total) + (total < catalog.n_images ? " shown by the filters" : "")
      : "no image matches the filters";
    $("prev").disabled = state.page === 0;
    $("next").disabled = state.page >= pages() - 1;
    document.body.dataset.page = String(state.page);
  }

  function draw(positions) {
    var main = $("view");
    var before = state.page * state.size - 1;  // the image shown just before this page, if any
    var prev = before >= 0 ? view[before] : -1;
    main.textContent = "";
    caps = [];
    var section = null, cards = null, person, camera;
    positions.forEach(function (pos) {
      var im = imageAt(pos);
      if (section === null || im.person !== person) {
        person = im.person;
        camera = undefined;
        section = personSection(im.person, section === null && prev >= 0 && samePerson(prev, im.person));
        main.appendChild(section);
        cards = null;
      }
      if (cards === null || im.camera !== camera) {
        camera = im.camera;
        var cam = el("div", "camera");
        cam.dataset.camera = String(im.camera);
        cam.appendChild(el("h3", null, im.camera === null ? "camera unknown" : "camera " + im.camera));
        cards = el("div", "cards");
        cam.appendChild(cards);
        section.appendChild(cam);
      }
      cards.appendChild(card(im, pos));
    });
  }

  /* Whether the image at `pos` belongs to the person labelled `label` (their images are contiguous). */
  function samePerson(pos, label) {
    var row = personRow[label];
    return !!row && pos >= row[1] && pos < row[1] + row[2];
  }

  function personTitle(label) {
    if (label === null) return "no person id";
    if (notPersons[label]) {
      return (label === "0" ? "distractors (id 0)" : "junk (id " + label + ")") + ": not a person";
    }
    return "person " + label;
  }

  function personSection(label, continued) {
    var s = el("section", "person" + (label !== null && notPersons[label] ? " junk" : ""));
    s.dataset.person = label === null ? "" : label;
    var row = personRow[label];
    var h = el("h2", null, personTitle(label));
    if (row) {
      h.appendChild(el("span", "muted", " \u00b7 " + fmt(row[2]) + (row[2] === 1 ? " image" : " images") +
        " \u00b7 " + fmt(row[3]) + (row[3] === 1 ? " camera" : " cameras") + (continued ? " (continued)" : "")));
    }
    s.appendChild(h);
    return s;
  }

  function card(im, pos) {
    var c = el("article", "card");
    c.dataset.imageId = im.id;
    c.dataset.position = String(pos);
    var t = el("div", "thumb");
    if (im.thumb) {
      var img = el("img");
      img.src = im.thumb;
      img.alt = im.id;
      img.loading = "lazy";
      img.onerror = function () { t.textContent = ""; t.appendChild(el("div", "placeholder", "no image")); };
      t.appendChild(img);
    } else {
      t.appendChild(el("div", "placeholder", "no image"));
    }
    c.appendChild(t);
    var body = el("div", "body");
    var id = el("div", "id");
    if (im.src) {
      var a = el("a", null, im.id);
      a.href = im.src;
      a.target = "_blank";
      a.rel = "noopener";
      id.appendChild(a);
    } else {
      id.textContent = im.id;
    }
    body.appendChild(id);
    if (im.note) body.appendChild(el("div", "note", im.note));
    var list = el("ul", "answers");
    im.items.forEach(function (it) {
      if (state.prompt >= 0 && it.p !== state.prompt) return;
      list.appendChild(answer(im, it));
    });
    body.appendChild(list);
    var errs = im.errors.filter(function (e) { return state.prompt < 0 || e.p === state.prompt || e.p < 0; });
    if (errs.length) {
      var ul = el("ul", "errors");
      errs.forEach(function (e) {
        var li = el("li", "error");
        li.dataset.reason = e.r;
        li.appendChild(el("span", "reason", e.r));
        if (e.p >= 0) li.appendChild(el("span", "prompt", catalog.prompts[e.p] + " #" + e.i));
        if (e.d) li.appendChild(el("span", "detail", e.d));
        ul.appendChild(li);
      });
      body.appendChild(ul);
    }
    c.appendChild(body);
    return c;
  }

  function answer(im, it) {
    var prompt = catalog.prompts[it.p];
    var li = el("li", "cap" + (it.k === "attributes" ? " attrs" : "") + (it.fl && it.fl.length ? " flagged" : ""));
    li.dataset.prompt = prompt;
    li.dataset.index = String(it.i);
    li.dataset.kind = it.k;
    var head = el("div", "head");
    head.appendChild(el("span", "prompt", prompt + " #" + it.i));
    if (it.m) head.appendChild(el("span", "model muted", it.m));
    var chips = {};  // one chip per flag; its several findings in its tooltip, one a line
    (it.fl || []).forEach(function (f) {
      var known = catalog.flags[f[0]];
      var name = known ? known.name : String(f[0]);
      var detail = f[1] || (known ? known.label : name);
      if (chips[name]) { chips[name].title += "\n" + detail; return; }
      var chip = el("span", "flag", name.replace(/_/g, " "));
      chip.dataset.flag = name;
      chip.title = detail;
      chips[name] = chip;
      head.appendChild(chip);
    });
    var tools = el("span", "tools");
    tools.appendChild(el("span", "verdict"));
    var ok = el("button", "acc", "\u2713");
    ok.type = "button";
    ok.title = "accept (a)";
    var no = el("button", "rej", "\u2717");
    no.type = "button";
    no.title = "reject (r)";
    tools.appendChild(ok);
    tools.appendChild(no);
    head.appendChild(tools);
    li.appendChild(head);
    var names = Object.keys(chips);
    if (names.length) {  // what each flag found: shown under the current caption
      var why = el("div", "why");
      names.forEach(function (name) {
        chips[name].title.split("\n").forEach(function (line) {
          var row = el("div", null);
          row.appendChild(el("b", null, name.replace(/_/g, " ") + ": "));
          row.appendChild(document.createTextNode(line));
          why.appendChild(row);
        });
      });
      li.appendChild(why);
    }
    if (it.f) {
      var table = el("table", "fields");
      Object.keys(it.f).forEach(function (name) {
        var tr = el("tr");
        tr.appendChild(el("th", null, name));
        tr.appendChild(el("td", null, it.f[name]));
        table.appendChild(tr);
      });
      li.appendChild(table);
    } else {
      li.appendChild(el("div", "text", it.t));
    }
    var entry = { key: markKey(im.id, prompt, it.i), el: li };
    var n = caps.length;
    caps.push(entry);
    li.addEventListener("click", function () { setCursor(n, false); });
    ok.addEventListener("click", function (ev) { ev.stopPropagation(); setCursor(n, false); mark("accept", false); });
    no.addEventListener("click", function (ev) { ev.stopPropagation(); setCursor(n, false); mark("reject", false); });
    paintMark(entry);
    return li;
  }

  /* ---- keyboard review -------------------------------------------------------------------------- */

  function setCursor(n, scroll) {
    if (cursor >= 0 && caps[cursor]) caps[cursor].el.classList.remove("current");
    cursor = n;
    if (cursor >= 0 && caps[cursor]) {
      caps[cursor].el.classList.add("current");
      if (scroll) caps[cursor].el.scrollIntoView({ block: "nearest" });
    }
  }

  function move(step) {
    if (!caps.length) return;
    var n = cursor + step;
    if (n >= caps.length) {
      if (state.page < pages() - 1) { state.page++; render(false); window.scrollTo(0, 0); }
      return;
    }
    if (n < 0) {
      if (state.page > 0) { state.page--; render(true); }
      return;
    }
    setCursor(n, true);
  }

  function mark(verdict, advance) {
    if (cursor < 0 || !caps[cursor]) return;
    var c = caps[cursor];
    setMark(c.key, verdict);
    if (advance) move(1);
  }

  function onKey(ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    var t = ev.target || {};
    var typing = t.tagName === "TEXTAREA" || t.tagName === "SELECT" ||
      (t.tagName === "INPUT" && t.type !== "checkbox" && t.type !== "button");
    if (typing) {
      if (ev.key === "Escape") ev.target.blur();
      return;
    }
    if (document.body.dataset.state === "loading") return;
    switch (ev.key) {
      case "j": case "ArrowDown": move(1); break;
      case "k": case "ArrowUp": move(-1); break;
      case "a": mark("accept", true); break;
      case "r": mark("reject", true); break;
      case "u": if (cursor >= 0 && caps[cursor]) setMark(caps[cursor].key, null); break;
      case "ArrowRight": case "n": if (state.page < pages() - 1) { state.page++; render(false); } break;
      case "ArrowLeft": case "p": if (state.page > 0) { state.page--; render(false); } break;
      default: return;
    }
    ev.preventDefault();
  }

  /* ---- start ------------------------------------------------------------------------------------ */

  function refilter() {
    computeView();
    state.page = 0;
    render(false);
  }

  function controls() {
    var title = catalog.title || "gallery";
    document.title = title + " \u2014 reid-prompt gallery";
    $("title").textContent = title;
    var persons = catalog.n_persons !== undefined ? catalog.n_persons : catalog.persons.length;
    $("summary").textContent = fmt(catalog.n_images) + " images \u00b7 " + fmt(persons) +
      (persons === 1 ? " person" : " persons") + " \u00b7 " + fmt(catalog.counts.captions) + " captions" +
      (catalog.counts.attributes ? " \u00b7 " + fmt(catalog.counts.attributes) + " structured answers" : "") +
      " \u00b7 " + fmt(catalog.counts.errors) + " errors";
    var sel = $("prompt");
    catalog.prompts.forEach(function (p, i) {
      var o = el("option", null, p);
      o.value = String(i);
      sel.appendChild(o);
    });
    sel.addEventListener("change", function () { state.prompt = Number(sel.value); sel.blur(); refilter(); });
    var box = $("flags");
    catalog.flags.forEach(function (f) {
      var lab = el("label", "flagbox");
      lab.title = f.label;
      var cb = el("input");
      cb.type = "checkbox";
      cb.dataset.flag = f.name;
      cb.addEventListener("change", function () { state.flags[f.name] = cb.checked; refilter(); });
      lab.appendChild(cb);
      var off = f.computed === false;  // not looked for by this build (labels_disagree needs --attributes)
      if (off) {
        cb.disabled = true;
        lab.classList.add("off");
        lab.title = f.label + ": not looked for; build the gallery with --attributes market_attribute.mat " +
          "(or duke_attribute.mat)";
      }
      lab.appendChild(document.createTextNode(" " + f.name.replace(/_/g, " ") +
        (off ? " (needs --attributes)" : " (" + fmt(f.count) + ")")));
      box.appendChild(lab);
    });
    var elab = el("label", "flagbox");
    var ecb = el("input");
    ecb.type = "checkbox";
    ecb.id = "errors";
    ecb.addEventListener("change", function () { state.errors = ecb.checked; refilter(); });
    elab.appendChild(ecb);
    elab.appendChild(document.createTextNode(" has errors (" + fmt(catalog.counts.errors) + ")"));
    box.appendChild(elab);
    var review = $("review");
    review.addEventListener("change", function () {
      state.review = review.value;
      review.blur();
      if (!state.review) { refilter(); return; }
      document.body.dataset.state = "loading";  // until the ids are here and the page drawn
      loadIds().then(refilter, function (err) {
        document.body.dataset.state = "error";
        showMessage("Part of the gallery's data is missing (" + err.message + "): build it again with " +
          "`python -m pipeline gallery`.", "data");
      });
    });
    var person = $("person");
    var timer = null;
    person.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () { state.person = person.value.trim(); refilter(); }, 150);
    });
    person.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter") { clearTimeout(timer); state.person = person.value.trim(); refilter(); }
    });
    var size = $("pagesize");
    state.size = Number(size.value);
    size.addEventListener("change", function () {
      var first = state.page * state.size;
      state.size = Number(size.value);
      state.page = Math.floor(first / state.size);
      size.blur();
      render(false);
    });
    $("prev").addEventListener("click", function () { state.page--; render(false); });
    $("next").addEventListener("click", function () { state.page++; render(false); });
    $("download").addEventListener("click", download);
    $("clear").addEventListener("click", function () {
      if (window.confirm("Forget every accept/reject mark of this gallery?")) { marks = {}; saveMarks(); showMarks(); }
    });
    document.addEventListener("keydown", onKey);
  }

  function start() {
    catalog.persons.forEach(function (row) { personRow[row[0]] = row; });
    (catalog.not_persons || []).forEach(function (label) { notPersons[label] = true; });
    loadMarks();
    controls();
    showMarks();
    computeView();
    render(false);
  }

  loadScript("data/catalog.js").then(function () {
    if (!catalog) throw new Error("data/catalog.js holds no catalog");
    start();
  }).catch(function (err) {
    showMessage("The gallery's data is missing (" + err.message + "): build it with `python -m pipeline gallery --out DIR`.");
    document.body.dataset.state = "error";
  });
}());
