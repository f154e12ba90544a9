(() => {
  "use strict";
  const page = document.body.dataset;
  const storageKey = "attnsae-labels:L" + page.layer + ":" + page.contentHash;
  const cards = Array.from(document.querySelectorAll("section.card"));
  const $ = (id) => document.getElementById(id);

  function load() {
    const fresh = {rating: false, blind: false, rater: "", cards: {}};
    try {
      const saved = JSON.parse(localStorage.getItem(storageKey) || "null");
      if (saved && typeof saved.cards === "object" && saved.cards !== null) return Object.assign(fresh, saved);
    } catch (err) { /* unreadable: start afresh */ }
    return fresh;
  }
  const state = load();

  function save() {
    try { localStorage.setItem(storageKey, JSON.stringify(state)); }
    catch (err) { say("answers are not being kept in this browser: " + err.message); }
  }
  function say(text) { $("status").textContent = text; }
  function today() {
    const d = new Date();
    const two = (n) => String(n).padStart(2, "0");
    return d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate());
  }
  const answerOf = (card) => (state.cards[card.dataset.feature] || {}).answer || "";

  function showModes() {
    document.body.classList.toggle("rating", state.rating);
    document.body.classList.toggle("blind", state.blind);
    const rated = cards.filter(answerOf).length;
    cards.forEach((card) => card.classList.toggle("rated", answerOf(card) !== ""));
    $("rated-count").textContent = rated + " of " + cards.length + " cards rated";
  }

  function restore() {
    $("rate-mode").checked = state.rating;
    $("blind").checked = state.blind;
    $("rater").value = state.rater;
    cards.forEach((card) => {
      const saved = state.cards[card.dataset.feature];
      if (!saved) return;
      card.querySelectorAll(".rate input[type=radio]").forEach((radio) => { radio.checked = radio.value === saved.answer; });
      card.querySelector(".rate select.family").value = saved.family;
      card.querySelector(".rate input.note").value = saved.note;
    });
    showModes();
  }

  function recordCard(event) {
    const card = event.target.closest("section.card");
    if (!card || !event.target.closest(".rate")) return;
    const chosen = card.querySelector(".rate input[type=radio]:checked");
    state.cards[card.dataset.feature] = {
      answer: chosen ? chosen.value : "",
      family: card.querySelector(".rate select.family").value,
      note: card.querySelector(".rate input.note").value,
      date: today(),
    };
    save();
    showModes();
  }

  function exportLabels() {
    const rater = state.rater.trim();
    if (!rater) { say("enter your name as rater first"); $("rater").focus(); return; }
    const ratings = cards.filter(answerOf).map((card) => {
      const saved = state.cards[card.dataset.feature];
      return {feature: Number(card.dataset.feature), answer: saved.answer, family: saved.family,
              note: saved.note, date: saved.date};
    });
    if (!ratings.length) { say("rate at least one card first"); return; }
    const labels = {format: page.labelsFormat, version: Number(page.labelsVersion), layer: Number(page.layer),
                    content_hash: page.contentHash, rater: rater, ratings: ratings};
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([JSON.stringify(labels, null, 2) + "\n"], {type: "application/json"}));
    link.download = "labels-L" + page.layer + ".json";
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    say("exported " + ratings.length + " ratings: import with `attnsae labels import " + link.download + "`");
  }

  $("rate-mode").addEventListener("change", (e) => { state.rating = e.target.checked; save(); showModes(); });
  $("blind").addEventListener("change", (e) => { state.blind = e.target.checked; save(); showModes(); });
  $("rater").addEventListener("input", (e) => { state.rater = e.target.value; save(); });
  $("export").addEventListener("click", exportLabels);
  document.addEventListener("input", recordCard);
  restore();
})();
