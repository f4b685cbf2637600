// Breakdown charts: requests per member and per key of an organization, as horizontal bars.
// Data comes from <script type="application/json" id="…"> blocks ({labels, values}).
(function () {
  "use strict";
  if (typeof Chart === "undefined") return;
  window.breakdownCharts = {};
  document.querySelectorAll("canvas[data-breakdown]").forEach((canvas) => {
    const data = JSON.parse(document.getElementById(canvas.dataset.breakdown).textContent);
    window.breakdownCharts[canvas.id] = new Chart(canvas, {
      type: "bar",
      data: {
        labels: data.labels,
        datasets: [{ label: "requests", data: data.values, backgroundColor: "#3b5bdb" }],
      },
      options: {
        indexAxis: "y", animation: false, responsive: true, maintainAspectRatio: false,
        plugins: { legend: { display: false } },
        scales: { x: { beginAtZero: true, ticks: { precision: 0 } } },
      },
    });
  });
})();
