"""Create the Automation "notify me when a run ends with failed rows": a webhook notification, no code in the flow.

Every run emits ``parallel-requests.run.finished`` or ``parallel-requests.run.stopped`` when it
ends (``tasks.reporting.run_events``), with the label ``parallel-requests.failed-rows`` (``yes``
when a row failed or was not sent) and its figures in the payload. This script saves a Prefect
``CustomWebhookNotificationBlock`` that POSTs JSON to your URL (Slack, Teams, or any HTTP endpoint)
and an Automation that sends it on those events when rows failed. Run it once per Prefect server;
running it again updates the block and replaces the automation of the same name.

Usage (from the repository root):
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python deployments/notify_on_failed_rows.py --webhook-url https://hooks.example.com/T000/B000
    python deployments/notify_on_failed_rows.py --webhook-url http://127.0.0.1:9000/hook --all-runs

The webhook receives (Jinja filled by Prefect from the event):
    {"text": "parallel-requests: requests.jsonl ended (parallel-requests.run.finished): 3 of 299 rows failed, ..."}
"""

# Standard library imports
import argparse
import asyncio
import sys
from typing import Optional, Sequence
from uuid import UUID

# Third-party imports
from prefect.automations import Automation, EventTrigger, SendNotification
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client

BODY = ("parallel-requests: {{ event.resource.name }} ended ({{ event.event }}): {{ event.payload.failed }} of "
        "{{ event.payload.rows }} rows failed, {{ event.payload.not_sent }} not sent, "
        "{{ event.payload.rate_limited_429 }} answers 429, cost ${{ event.payload.cost_usd }}; "
        "stop reason: {{ event.payload.stop_reason }}; output {{ event.payload.output }}")
EVENTS = ["parallel-requests.run.finished", "parallel-requests.run.stopped"]


async def create_notification(webhook_url: str, name: str = "parallel-requests-failed-rows",
                              all_runs: bool = False) -> UUID:
    """Save the webhook block and (re)create the automation; return the automation's id."""
    block = CustomWebhookNotificationBlock(name=name, url=webhook_url, method="POST",
                                           json_data={"text": "{{subject}}: {{body}}"})
    block_id = await block.asave(name, overwrite=True)
    async with get_client() as client:
        for existing in await client.read_automations_by_name(name):
            await client.delete_automation(existing.id)
    match = {"prefect.resource.id": "parallel-requests.job.*"}
    if not all_runs:
        match["parallel-requests.failed-rows"] = "yes"
    automation = Automation(
        name=name,
        description="Notify a webhook when a parallel-requests run ends" + ("" if all_runs else " with failed rows"),
        trigger=EventTrigger(expect=set(EVENTS), match=match, posture="Reactive", threshold=1, within=0),
        actions=[SendNotification(block_document_id=block_id, subject="parallel-requests", body=BODY)],
    )
    created = await automation.acreate()
    return created.id


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Create the automation from the command line."""
    parser = argparse.ArgumentParser(description="Create the Automation that notifies a webhook when a "
                                                 "parallel-requests run ends with failed rows.")
    parser.add_argument("--webhook-url", required=True, help="the URL the notification is POSTed to (JSON)")
    parser.add_argument("--name", default="parallel-requests-failed-rows",
                        help="the automation's and the webhook block's name (default: %(default)s)")
    parser.add_argument("--all-runs", action="store_true", help="notify at the end of every run, not only "
                                                                 "runs with failed rows")
    args = parser.parse_args(argv)
    automation_id = asyncio.run(create_notification(args.webhook_url, args.name, args.all_runs))
    print(f"automation {args.name} ({automation_id}) notifies {args.webhook_url.split('?')[0]} when "
          + ("a run ends" if args.all_runs else "a run ends with failed rows"))
    return 0


if __name__ == "__main__":
    sys.exit(main())


