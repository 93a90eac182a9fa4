"""Serve the deployments of prefect.yaml, with their schedules, without a work pool or a worker.

``flow.serve`` (here ``prefect.serve``) is Prefect's no-work-pool way to run deployments. This
process polls the Prefect API and runs scheduled and triggered runs of the flows
(``parallel-requests``, and ``parallel-requests-shards`` for distributed runs) itself. It reads the deployments (names, parameters, cron schedules, tags, descriptions)
from ``prefect.yaml``, so the two ways of deploying never drift apart.

Usage (from the repository root):
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python deployments/serve.py                  # every deployment of prefect.yaml
    python deployments/serve.py --only adhoc     # just some of them
    prefect deployment run 'parallel-requests/adhoc' --param requests_filepath=...

Pitfalls:
    - Prefect pauses served deployments' schedules when the process stops; they resume when it
      serves again.
"""

# Standard library imports
import argparse
import os
import sys
from typing import Any, Dict, List, Optional

# Third-party imports
import yaml
from prefect import serve
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron

# Local application imports
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def served_deployments(config_path: str, only: Optional[List[str]] = None) -> List[Any]:
    """Build the deployments of ``prefect.yaml`` for serving.

    Args:
        config_path: the prefect.yaml to read.
        only: deployment names to keep (default: all).

    Returns:
        RunnerDeployments ready for ``serve``.
    """
    with open(config_path, encoding="utf-8") as handle:
        config: Dict[str, Any] = yaml.safe_load(handle)
    deployments = []
    for spec in config.get("deployments", []):
        if only and spec["name"] not in only:
            continue
        schedules = [Cron(schedule["cron"], timezone=schedule.get("timezone"))
                     for schedule in spec.get("schedules") or [] if schedule.get("active", True)]
        flow = load_flow_from_entrypoint(os.path.join(ROOT, spec["entrypoint"]))
        deployments.append(flow.to_deployment(
            name=spec["name"],
            description=spec.get("description"),
            tags=spec.get("tags"),
            parameters=spec.get("parameters") or {},
            schedules=schedules or None,
        ))
    return deployments


def parse_arguments() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="Serve the deployments of prefect.yaml without a work pool.")
    parser.add_argument("--config", default=os.path.join(ROOT, "prefect.yaml"), help="the prefect.yaml to read")
    parser.add_argument("--only", nargs="*", default=None, help="deployment names to serve (default: all)")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_arguments()
    os.chdir(ROOT)  # relative input paths in parameters are relative to the repository
    serve(*served_deployments(arguments.config, arguments.only))
