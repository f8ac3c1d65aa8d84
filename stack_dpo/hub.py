"""Hub ids and what they resolve to: a record for the metrics and the card, never required."""

from __future__ import annotations

import logging
import re
from pathlib import Path

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
log = logging.getLogger("stack_dpo.hub")


def hub_revision(name_or_path: str, repo_type: str) -> str | None:
    """The commit sha a Hub id resolves to now, or None for a local path or when the Hub does
    not answer (offline, no access): recorded in the metrics and the card, never required."""
    if Path(name_or_path).exists() or not HUB_ID.match(name_or_path):
        return None
    from huggingface_hub import HfApi

    try:
        return HfApi().repo_info(name_or_path, repo_type=repo_type, timeout=10).sha
    except Exception as exc:  # a record only: offline, a timeout, no access must not fail the stage
        log.info("no Hub revision for %s (%s)", name_or_path, type(exc).__name__)
        return None
