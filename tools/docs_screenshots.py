"""Take the README's screenshots of the Prefect UI: a run's page, its timeline and summary, the run form.

It starts a real ``prefect server start`` (UI on) in a temporary home, the test API server limiting
600 requests a minute in 1-second slices with no rate-limit headers at all (so the run finds the
limit from its 429s, and the timeline shows the rate climbing, the 429s and the limit found), deploys ``prefect.yaml`` to a process work pool,
runs one job from the command line against that API, then has headless Chromium screenshot the
pages into ``docs/``. Needs Debian's Chromium (``apt-get install -y chromium``).

Usage (from the repository root):
    .venv/bin/python -m tools.docs_screenshots                 # writes docs/*.png
    .venv/bin/python -m tools.docs_screenshots --rows 900 --out /tmp/shots
"""

# Standard library imports
import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=20000"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Take the screenshots."""
    parser = argparse.ArgumentParser(description="Screenshot the Prefect UI pages of a parallel-requests run.")
    parser.add_argument("--rows", type=int, default=500, help="rows of the job (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs"), help="folder of the PNGs (default: docs/)")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("docs_screenshots: Chromium is not installed (apt-get install -y chromium)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="pr-shots-")
    port, api_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "OPENAI_API_KEY"}
    env.update(PREFECT_HOME=os.path.join(work, "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api")
    processes: List[subprocess.Popen] = []
    try:
        processes.append(subprocess.Popen([f"{BIN}/prefect", "server", "start", "--host", "127.0.0.1", "--port",
                                           str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        processes.append(subprocess.Popen([sys.executable, "-m", "tools.openai_test_server", "--port", str(api_port),
                                           "--dialect", "none", "--rpm", "600",
                                           "--slice-seconds", "1", "--latency", "0.05", "--latency-jitter", "0.3"],
                                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for(f"http://127.0.0.1:{port}/api/health", 120)
        _wait_for(f"http://127.0.0.1:{api_port}/_stats", 30)
        subprocess.run([f"{BIN}/prefect", "work-pool", "create", "local", "--type", "process"], env=env, cwd=ROOT,
                       check=True, capture_output=True)
        subprocess.run([f"{BIN}/prefect", "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT, check=True,
                       capture_output=True)
        source = os.path.join(work, "requests.jsonl")
        with open(source, "w", encoding="utf-8") as handle:
            for i in range(args.rows):
                model = "unknown-model" if i % 150 == 7 else "gpt-4o-mini"
                handle.write(json.dumps({"model": model, "messages": [{"role": "user", "content": f"row {i}"}],
                                         "max_tokens": 30, "metadata": {"row": i}}) + "\n")
        subprocess.run([f"{BIN}/parallel-requests", "--requests_filepath", source, "--request_url",
                        f"http://127.0.0.1:{api_port}/v1/chat/completions", "--api_key", "sk-docs-screenshots",
                        "--progress", "off"], env=env, cwd=ROOT, check=True)
        os.environ.update(PREFECT_API_URL=env["PREFECT_API_URL"], PREFECT_HOME=env["PREFECT_HOME"])
        pages = asyncio.run(_pages(f"http://127.0.0.1:{port}"))
        for name, url in pages.items():
            target = os.path.join(args.out, f"{name}.png")
            size = "1600,1500" if name != "run-form" else "1600,2000"
            subprocess.run([chromium, *CHROMIUM_FLAGS, f"--window-size={size}", f"--user-data-dir={work}/chromium",
                            f"--screenshot={target}", url], check=True, capture_output=True, timeout=120)
            print(f"{target}: {url}")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


async def _pages(ui: str) -> Dict[str, str]:
    """The pages to screenshot: the run, its artifacts, the deployment's run form."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        run = (await client.read_flow_runs(limit=1))[0]
        artifacts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        deployment = await client.read_deployment_by_name("parallel-requests/adhoc")
    by_key = {artifact.key: artifact.id for artifact in sorted(artifacts, key=lambda artifact: artifact.created)}  # the latest version
    return {"flow-run": f"{ui}/runs/flow-run/{run.id}",
            "timeline-artifact": f"{ui}/artifacts/artifact/{by_key['parallel-requests-timeline']}",
            "summary-artifact": f"{ui}/artifacts/artifact/{by_key['parallel-requests-summary']}",
            "run-form": f"{ui}/deployments/deployment/{deployment.id}/run"}


def _free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(url: str, seconds: float) -> None:
    """Wait until ``url`` answers."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer in {seconds:.0f} s") from None
            time.sleep(0.3)


if __name__ == "__main__":
    sys.exit(main())
