"""Entry point: flags → load_settings() → serve."""

from __future__ import annotations

import argparse
import sys

from gateway import __version__
from gateway.config import ConfigError, export_sdk_environment, load_settings
from gateway.reload import load as load_files
from gateway.server import StartupError, configure_logging, run


def main() -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="secure-llm-gateway")
    parser.add_argument("--check-config", action="store_true", help="validate and print the configuration")
    parser.add_argument("--version", action="version", version=f"secure-llm-gateway {__version__}")
    args = parser.parse_args()
    try:
        settings = load_settings()
        load_files(settings)  # the policy and key files parse (each worker reads them again)
    except ConfigError as error:
        for line in error.lines:
            print(f"config error: {line}", file=sys.stderr)
        return 2
    if args.check_config:
        print("\n".join(f"{name}={value}" for name, value in settings.describe()))
        return 0
    export_sdk_environment(settings)
    configure_logging()
    try:
        return run(settings)
    except StartupError as error:  # the same one line whether one process or WORKERS of them
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
