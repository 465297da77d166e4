"""A screenshot of the MLflow UI on a run: its metric charts, or its samples table.

    python scripts/mlflow_screenshot.py                       # the demo's last run -> docs/mlflow-*.png
    python scripts/mlflow_screenshot.py --store runs/mlflow.db --run RUN_ID

Serves the store with ``mlflow server`` on 127.0.0.1 and opens the run's pages in headless Chromium
(Debian's ``chromium``: scripts/system-deps.sh installs it). Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.mlflow_server import MlflowServer  # noqa: E402

PAGES = {"metrics": "model-metrics", "samples": "artifacts/samples.json"}
"""Which page of a run each screenshot shows (the UI's routes under #/experiments/E/runs/R/)."""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("no chromium: install Debian's chromium (scripts/system-deps.sh does)")


def page_url(server: MlflowServer, experiment_id: str, run_id: str, page: str) -> str:
    return f"{server.uri}/#/experiments/{experiment_id}/runs/{run_id}/{PAGES[page]}"


def browse(url: str, *, png: Path | None = None, size: str = "1400,1000", wait_ms: int = 20_000) -> str:
    """Open ``url`` headless: its rendered DOM, and a screenshot into ``png`` when given."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={wait_ms}",
           "--hide-scrollbars"]  # fmt: skip
    try:
        if png is not None:
            subprocess.run([*cmd, f"--screenshot={png}", url], check=True, capture_output=True, timeout=180)
        done = subprocess.run([*cmd, "--dump-dom", url], check=True, capture_output=True, timeout=180)
        return done.stdout.decode()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def last_run(store: Path) -> tuple[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
    if not runs:
        raise SystemExit(f"{store}: holds no run (run `make demo` first)")
    return runs[0].info.experiment_id, runs[0].info.run_id


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", type=Path, default=ROOT / "runs" / "mlflow.db")
    parser.add_argument("--run", help="run id (default: the store's newest run)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    experiment_id, run_id = last_run(args.store)
    if args.run:
        from mlflow.tracking import MlflowClient

        run_id, experiment_id = (
            args.run,
            MlflowClient(f"sqlite:///{args.store}").get_run(args.run).info.experiment_id,
        )
    with tempfile.TemporaryDirectory() as tmp, MlflowServer(Path(tmp), store=args.store.resolve()) as server:
        for page in PAGES:
            png = args.out / f"mlflow-{page}.png"
            browse(page_url(server, experiment_id, run_id, page), png=png)
            print(f"wrote {png}")


if __name__ == "__main__":
    main()
