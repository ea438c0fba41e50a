"""The `dmae` command (console script) and `python -m dmae_cli`.

The CPU thread settings (`dmae_cli.runtime.cpus`) go into the environment first, before
anything imports torch: OpenMP reads them once, when it starts.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    from dmae_cli.runtime.cpus import thread_settings

    applied = thread_settings()
    if os.environ.get("DMAE_DEBUG") == "1" and applied:
        print(f"dmae: set {applied}", file=sys.stderr)  # not ui.info: ui loads torch
    from dmae_cli.cli.app import main as app_main

    app_main()


if __name__ == "__main__":
    main()
