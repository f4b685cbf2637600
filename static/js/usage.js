// Usage chart: requests per minute by status class, refreshed from the rollup endpoint.
(function () {
  "use strict";
  const canvas = document.getElementById("usage-chart");
  if (!canvas || typeof Chart === "undefined") return;
  const colors = { "2xx": "#2e7d32", "3xx": "#1565c0", "4xx": "#ef6c00", "5xx": "#c62828" };
  const initial = JSON.parse(document.getElementById("usage-data").textContent);
  const datasets = (data) =>
    Object.entries(data.series).map(([label, values]) => ({
      label, data: values, backgroundColor: colors[label], stack: "s",
    }));
  const chart = new Chart(canvas, {
    type: "bar",
    data: { labels: initial.labels, datasets: datasets(initial) },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false,
      scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, ticks: { precision: 0 } } },
    },
  });
  window.usageChart = chart;
  async function refresh() {
    try {
      const resp = await fetch(canvas.dataset.source, { credentials: "same-origin" });
      if (!resp.ok) return;
      const data = await resp.json();
      chart.data.labels = data.labels;
      chart.data.datasets = datasets(data);
      chart.update();
      document.getElementById("usage-total").textContent = data.total;
      const fmt = (v) => (v === null || v === undefined ? "–" : v);
      document.getElementById("latency-p50").textContent = fmt(data.latency_ms.p50);
      document.getElementById("latency-p95").textContent = fmt(data.latency_ms.p95);
      document.getElementById("usage-empty").hidden = data.total > 0;
      if (data.quota) {
        document.getElementById("quota-used").textContent = data.quota.used;
        document.getElementById("quota-remaining").textContent = data.quota.remaining;
      }
    } catch (e) { /* keep the last chart; try again on the next tick */ }
  }
  setInterval(refresh, 5000);
})();
