// Admin traffic dashboard: requests per bucket by status class, from rollups.
(function () {
  const data = JSON.parse(document.getElementById("traffic-data").textContent);
  const colors = { "2xx": "#2e7d32", "3xx": "#1565c0", "4xx": "#ef6c00", "5xx": "#c62828" };
  window.trafficChart = new Chart(document.getElementById("traffic-chart"), {
    type: "bar",
    data: { labels: data.labels, datasets: Object.entries(data.series).map(([label, values]) => ({ label, data: values, backgroundColor: colors[label], stack: "s" })) },
    options: { animation: false, maintainAspectRatio: false, scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, ticks: { precision: 0 } } } },
  });
})();
