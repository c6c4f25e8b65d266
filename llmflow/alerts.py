"""Failure alerts: a Prefect automation that posts to a webhook when an llmflow run fails.

    llmflow alerts --webhook https://hooks.slack.com/services/...   (create or update)
    llmflow alerts --off                                            (remove)

The automation lives on the Prefect server (its triggers and actions services evaluate it),
so it fires for every run of llmflow's flows however it was started: UI, schedule, CLI.
"""

from __future__ import annotations

AUTOMATION = "llmflow-failed-runs"
BLOCK = "llmflow-failure-webhook"
FLOW_NAMES = ("pipeline", "prepare", "finetune", "evaluate", "promote", "check")
FAILED_EVENTS = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut")

# Jinja over the event, rendered by the server when the automation fires.
SUBJECT = "llmflow: flow run {{ flow_run.name }} of {{ flow.name }} ended {{ flow_run.state.name }}"
BODY = (
    "Flow run {{ flow_run.name }} ({{ flow.name }}) ended {{ flow_run.state.name }}: "
    "{{ flow_run.state.message }}\n{{ flow_run|ui_url }}"
)


def trigger():
    """The trigger: any failed, crashed or timed-out run of one of llmflow's flows."""
    from prefect.events.schemas.automations import EventTrigger, Posture

    return EventTrigger(
        expect=set(FAILED_EVENTS),
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(FLOW_NAMES)},
        posture=Posture.Reactive,
        threshold=1,
        within=0,
    )


def enable(webhook_url: str) -> str:
    """Create or update the webhook block and the automation; returns the automation's id."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.events.actions import SendNotification

    block = CustomWebhookNotificationBlock(
        name="llmflow failure alerts",
        url=webhook_url,
        method="POST",
        json_data={"subject": "{{subject}}", "text": "{{body}}"},
    )
    block_id = block.save(BLOCK, overwrite=True)
    disable()
    automation = Automation(
        name=AUTOMATION,
        description="Posts to the llmflow failure webhook when an llmflow flow run fails.",
        trigger=trigger(),
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    ).create()
    return str(automation.id)


def disable() -> int:
    """Remove the automation (every one of that name); returns how many were removed."""
    from prefect.automations import Automation

    removed = 0
    while True:
        try:
            automation = Automation.read(name=AUTOMATION)
        except ValueError:  # Automation.read raises ValueError when none has that name
            return removed
        automation.delete()
        removed += 1
