// Copy buttons: <button data-copy="element-id">.
document.querySelectorAll("[data-copy]").forEach((button) => {
  button.addEventListener("click", async () => {
    const text = document.getElementById(button.dataset.copy).textContent.trim();
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch (e) {
      const range = document.createRange();
      range.selectNodeContents(document.getElementById(button.dataset.copy));
      const sel = window.getSelection(); sel.removeAllRanges(); sel.addRange(range);
      button.textContent = "Selected: press Ctrl+C";
    }
  });
});
