"""What `elmd serve` sets before anything else runs, so that no library it loads reaches
the network: the Hugging Face hub's offline mode (no metadata requests, no downloads),
no hub telemetry, no implicit token, and the common opt-outs of usage reporting. Only
`elmd pull` talks to the network, and never from the daemon."""

from __future__ import annotations

import os

OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
}


def go_offline() -> None:
    os.environ.update(OFFLINE_ENVIRONMENT)
