"""story.html as a browser shows it: headless Chromium (Debian's `chromium` package) renders the page
the demo wrote; the DOM must hold every frame's text and image, and the screenshot must show a
picture (not blank page) wherever the layout put a frame, matching that frame's PNG.

Slow: it runs the shrunk demo first. Chromium is required, not optional: install it with
`apt-get update && apt-get install -y chromium` (the test fails, with that advice, without it)."""

import html as htmllib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--force-device-scale-factor=1", "--hide-scrollbars"]
WIDTH = 1280
# Appended to a copy of the page: records where the layout put each image (for the screenshot check),
# whether it decoded, and the page height, in a hidden element that --dump-dom serialises.
PROBE = """<script>window.addEventListener("load", () => {
  const rects = [...document.images].map(i => { const r = i.getBoundingClientRect();
    return {src: i.getAttribute("src"), x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,
            complete: i.complete, natural: i.naturalWidth}; });
  const pre = document.createElement("pre"); pre.id = "probe"; pre.style.display = "none";
  pre.textContent = JSON.stringify({rects, height: document.documentElement.scrollHeight});
  document.body.appendChild(pre); });</script>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("headless Chromium is required for this test and is not installed: "
                    "run `apt-get update && apt-get install -y chromium` (Debian's package)")
    return exe


def run_chromium(exe: str, page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [exe, *FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
    out = subprocess.run(cmd, capture_output=True, timeout=120)
    assert out.returncode == 0, f"chromium failed ({out.returncode}): {out.stderr.decode()[-2000:]}"
    return out


def check_story_html(story_dir: Path, tmp: Path) -> dict:
    """Render story_dir/story.html; assert frames and text appear. Returns what it measured."""
    exe = chromium()
    story = json.loads((story_dir / "story.json").read_text())
    frames = story["frames"]
    assert frames, "story.json lists no frames"
    page = story_dir / "_probe_story.html"  # beside the original, so relative image paths resolve
    html = (story_dir / "story.html").read_text()
    assert "</body>" in html, "story.html has no </body>"
    page.write_text(html.replace("</body>", PROBE + "</body>"))
    try:
        dom = run_chromium(exe, page, tmp / "profile", f"--window-size={WIDTH},900", "--dump-dom").stdout.decode()
        found = re.search(r'<pre id="probe"[^>]*>(.*?)</pre>', dom, re.S)
        assert found, "the page did not finish loading in chromium (no layout probe in the DOM)"
        probe = json.loads(htmllib.unescape(found.group(1)))
        height = int(min(max(probe["height"], 300), 16000))
        shot = tmp / "shot.png"
        run_chromium(exe, page, tmp / "profile", f"--window-size={WIDTH},{height}", f"--screenshot={shot}")
    finally:
        page.unlink(missing_ok=True)

    # DOM: every frame's text, every frame's image, each decoded by the browser
    text = htmllib.unescape(dom)
    for i, f in enumerate(frames):
        snippet = " ".join(f["text"].split())[:40]
        assert snippet in " ".join(text.split()), f"frame {i}: text {snippet!r} not in the rendered DOM"
    rects = {r["src"]: r for r in probe["rects"]}
    img = np.asarray(Image.open(shot).convert("RGB"), np.float64)
    checked = 0
    for i, f in enumerate(frames):
        r = rects.get(f["image"])
        assert r is not None, f"frame {i}: no <img src={f['image']!r}> in the page (have {sorted(rects)[:5]}...)"
        assert r["complete"] and r["natural"] > 0, f"frame {i}: {f['image']} did not load in the browser"
        assert r["w"] >= 16 and r["h"] >= 16, f"frame {i}: shown at {r['w']}×{r['h']} px"
        x0, y0 = int(round(r["x"])), int(round(r["y"]))
        x1, y1 = int(round(r["x"] + r["w"])), int(round(r["y"] + r["h"]))
        if y1 > img.shape[0] or x1 > img.shape[1]:
            continue  # beyond the (capped) screenshot
        region = img[y0 + 1:y1 - 1, x0 + 1:x1 - 1]
        # not the page: some structure inside, and not one flat colour
        assert region.std() > 2.0, f"frame {i}: the screenshot is flat where the frame should be"
        # and it is this frame: the region, shrunk to the PNG's size, correlates with the PNG
        png = Image.open(story_dir / f["image"]).convert("RGB")
        small = np.asarray(Image.fromarray(region.astype(np.uint8)).resize(png.size, Image.BILINEAR), np.float64)
        ref = np.asarray(png, np.float64)
        err = np.abs(small - ref).mean()
        assert err < 40.0, f"frame {i}: the screenshot region differs from {f['image']} (mean abs {err:.1f})"
        checked += 1
    assert checked >= min(len(frames), 4), f"only {checked} frames could be checked in the screenshot"
    return {"frames": len(frames), "checked_in_screenshot": checked, "page_height": probe["height"]}


def test_story_html_renders_in_chromium(tmp_path):
    import tempfile

    from tests.test_demo import small_demo

    # A fixed directory: a later run reuses the shrunk demo's trained model (the story is told anew).
    out = small_demo(Path(tempfile.gettempdir()) / "seed-story-test-small-demo", ["--no-eval"])
    got = check_story_html(out, tmp_path)
    assert got["checked_in_screenshot"] >= 4
