"""Take docs/screenshots/*.jpg again: what a newcomer sees after `dvc repro` and a sweep, in a
real headless Chromium (Debian package `chromium`) driven over the DevTools protocol.

    dvc repro && artmaster train -m train.adalora.target_r=4,8 train.optim.lr=1e-3,1e-2
    python scripts/screenshots.py            # from the repo root; needs mlflow.db, data/, dvc

Shots: the MLflow runs table (with the headline columns), a training run's description, charts
and sample images, the sweep (parent and points), `dvc plots show`'s page and
data/evaluate/report/report.html. Chromium runs with a fresh profile and no network beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.time() > deadline:
                raise SystemExit(f"{url} did not answer within {seconds:.0f} s")
            time.sleep(0.5)


class Browser:
    """One Chromium tab over the DevTools protocol (websocket-client)."""

    def __init__(self, width: int, height: int):
        import websocket

        self.port = free_port()
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
        self.process = subprocess.Popen(
            [shutil.which("chromium") or "chromium", *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
             f"--remote-debugging-port={self.port}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(f"http://127.0.0.1:{self.port}/json/version", 30)
        tab = next(t for t in json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json").read())
                   if t["type"] == "page")
        self.socket = websocket.create_connection(tab["webSocketDebuggerUrl"], timeout=60)
        self.ids = 0
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params):
        self.ids += 1
        self.socket.send(json.dumps({"id": self.ids, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.ids:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def open(self, url: str, settle: float = 4.0) -> None:
        self.call("Page.navigate", url=url)
        time.sleep(settle)

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        return result.get("result", {}).get("value")

    def wait_text(self, text: str, seconds: float = 60) -> bool:
        """Wait until the page shows `text` somewhere (the UI loads its data after the page)."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.js(f"document.body && document.body.innerText.includes({json.dumps(text)})"):
                time.sleep(1)
                return True
            time.sleep(0.5)
        print(f"  (waited {seconds:.0f} s for {text!r} in vain)")
        return False

    def click_text(self, text: str, selector: str = "button, [role=button], [role=tab], a, span, label") -> bool:
        """Click the innermost visible element whose text is `text` (exactly); False when none."""
        return bool(self.js(f"""(() => {{
            const all = [...document.querySelectorAll({json.dumps(selector)})]
                .filter(e => e.offsetParent !== null && e.innerText && e.innerText.trim() === {json.dumps(text)});
            const target = all.find(e => ![...e.querySelectorAll('*')].some(c => all.includes(c))) || all[0];
            if (!target) return false;
            target.scrollIntoView({{block: 'center'}}); target.click(); return true; }})()"""))

    def scroll_to_text(self, text: str, steps: int = 40) -> bool:
        """Scroll the page's scrolling panes down until an element reading `text` shows (MLflow
        draws chart sections as they come into view), then bring it to the top."""
        find = (f"[...document.querySelectorAll('*')].find(n => n.childElementCount === 0 && "
                f"(n.innerText || '').trim() === {json.dumps(text)})")
        for _ in range(steps):
            if self.js(f"(() => {{ const e = {find}; if (!e) return false; e.scrollIntoView({{block: 'start'}}); "
                       "return true; })()"):
                time.sleep(3)
                return True
            self.js("[...document.querySelectorAll('*')].filter(e => e.scrollHeight > e.clientHeight + 50 && "
                    "['auto', 'scroll'].includes(getComputedStyle(e).overflowY)).forEach(e => e.scrollBy(0, 700))")
            time.sleep(0.8)
        print(f"  ({text!r} not found on the page)")
        return False

    def key(self, name: str) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=name, code=name, windowsVirtualKeyCode=27)

    def shot(self, path: Path, quality: int = 55, full_height: int | None = None) -> None:
        params = {"format": "jpeg", "quality": quality}
        if full_height:
            width = self.js("document.documentElement.clientWidth")
            params.update(clip={"x": 0, "y": 0, "width": width, "height": full_height, "scale": 1},
                          captureBeyondViewport=True)
        data = base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])
        path.write_bytes(data)
        print(f"{path.relative_to(ROOT)}: {len(data) / 1e3:.0f} kB")

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)


def mlflow_server(port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{ROOT / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(f"http://127.0.0.1:{port}/health", 120)
    return server


class Store:
    """The `artmaster` experiment through MLflow's REST API."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"
        query = urllib.parse.urlencode({"experiment_name": "artmaster"})
        found = urllib.request.urlopen(f"{self.base}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=30)
        self.id = json.loads(found.read())["experiment"]["experiment_id"]

    def post(self, path: str, **body) -> dict:
        request = urllib.request.Request(f"{self.base}/api/2.0/mlflow/{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=30).read())

    def newest(self, filter_string: str, top_level: bool = False) -> dict:
        """The newest run matching `filter_string` (with `top_level`, not a sweep's point)."""
        found = self.post("runs/search", experiment_ids=[self.id], filter=filter_string,
                          order_by=["attributes.start_time DESC"], max_results=100).get("runs", [])
        tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in found]
        found = [run for run, tag in zip(found, tags) if not (top_level and "mlflow.parentRunId" in tag)]
        if not found:
            raise SystemExit(f"no run matches {filter_string!r}: run `dvc repro` and a sweep first (see --help)")
        return found[0]

    def url(self, suffix: str = "") -> str:
        return f"{self.base}/#/experiments/{self.id}{suffix}"


def take_mlflow(browser: Browser, store: Store, out: Path) -> None:
    train = store.newest("tags.`artmaster.stage` = 'train'", top_level=True)
    sweep = store.newest("tags.`artmaster.sweep` = 'parent'")
    train_id, sweep_id = train["info"]["run_id"], sweep["info"]["run_id"]
    # "Model training" (workflowType) opens the runs table; MLflow keeps the choice afterwards
    browser.open(store.url("/runs?workflowType=machine_learning"), settle=2)
    browser.wait_text(train["info"]["run_name"], 120)
    browser.js("[...document.querySelectorAll('button')].filter(b => b.getAttribute('data-component-id') === "
               "'mlflow.assistant.chat_panel.close').forEach(b => b.click())")
    time.sleep(1)
    if browser.click_text("Columns"):
        time.sleep(1.5)
        # hide the empty attribute columns, show each stage's headline numbers
        for column in ("Dataset", "Source", "Models", "result/loss", "result/val_loss", "result/ranks",
                       "result/refined_images", "result/adapter_gain", "result/augmented_vs_adapter", "result/crops",
                       "result/accepted"):
            browser.click_text(column, "span.du-bois-light-tree-title")
            time.sleep(0.5)
        browser.key("Escape")
        time.sleep(1)
    browser.js("(() => { const row = [...document.querySelectorAll('[role=row]')].find(r => "
               "r.innerText.includes('sweep train')); const toggle = row && row.querySelector('button, [role=button]');"
               " if (toggle) toggle.click(); })()")  # the sweep's points under their parent
    time.sleep(2)
    browser.shot(out / "mlflow_runs.jpg")

    browser.open(store.url(f"/runs/{train_id}?workflowType=machine_learning"), settle=2)
    browser.wait_text("Results", 90)
    browser.click_text("Show more")  # the description's results table
    time.sleep(1)
    browser.shot(out / "mlflow_train_overview.jpg")
    browser.open(store.url(f"/runs/{train_id}/model-metrics?workflowType=machine_learning"), settle=2)
    browser.wait_text("loss/train", 90)
    time.sleep(4)
    browser.shot(out / "mlflow_train_charts.jpg")
    browser.scroll_to_text("prompt 0 seed 0")
    # the cards list the run's params above each picture: bring the pictures themselves into view
    browser.js("(() => { const img = [...document.querySelectorAll('img')].find(i => "
               "i.src.includes('prompt%200%20seed%200')); if (img) img.scrollIntoView({block: 'center'}); })()")
    time.sleep(4)
    browser.shot(out / "mlflow_train_images.jpg")
    browser.open(store.url(f"/runs/{sweep_id}?workflowType=machine_learning"), settle=2)
    browser.wait_text("Points", 90)
    browser.click_text("Show more")  # the description's table of points
    time.sleep(1)
    browser.shot(out / "mlflow_sweep.jpg")


def take_files(browser: Browser, out: Path) -> None:
    done = subprocess.run(["dvc", "plots", "show", "-o", str(ROOT / "dvc_plots")], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"dvc plots show failed:\n{done.stderr}")
    browser.open((ROOT / "dvc_plots" / "index.html").as_uri(), settle=6)
    browser.shot(out / "dvc_plots.jpg", full_height=min(2600, browser.js("document.body.scrollHeight")))
    report = ROOT / "data" / "evaluate" / "report" / "report.html"
    if report.is_file():
        browser.open(report.as_uri(), settle=3)
        browser.shot(out / "evaluate_report.jpg", quality=45, full_height=min(1500, browser.js("document.body.scrollHeight")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = mlflow_server(port)
    browser = Browser(args.width, args.height)
    try:
        take_mlflow(browser, Store(port), args.out)
        take_files(browser, args.out)
    finally:
        browser.close()
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
