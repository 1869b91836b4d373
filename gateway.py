"""Entry point: flags → load_settings() → serve."""

from __future__ import annotations

import os
import signal

# First thing, before the imports below take their second or so: SIGHUP's default ends the
# process, and a reload asked for while the gateway starts must not. It is held back, not
# ignored: the files are read before the loop can handle it, and a reload asked for after that
# read is pending until server.serve installs its handler (or the WORKERS parent its own).
# And a stop asked for meanwhile (`systemctl stop` right after a start, Ctrl-C) is held back, not
# taken by the default actions (SIGTERM kills: status 143, a failure to systemd; SIGINT raises
# KeyboardInterrupt mid-import): server.serve sees it pending and stops cleanly, serving nothing.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def _fill_standard_descriptors() -> None:
    """Started with stdin, stdout or stderr closed (`gateway >&-`), the first socket opened took
    the free number, and at SIGTERM libuv (uvloop), which never closes descriptors 0-2, aborted
    the process closing it (rc 134). They are /dev/null instead: the lines meant for them go nowhere."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)  # the lowest free number: `fd`, as 0..fd-1 are open
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)


_fill_standard_descriptors()

import argparse  # noqa: E402
import sys  # noqa: E402

from gateway import __version__  # noqa: E402
from gateway.config import ConfigError, export_sdk_environment, load_settings  # noqa: E402
from gateway.policies import load as load_policies  # noqa: E402
from gateway.reload import load as load_files  # noqa: E402
from gateway.server import StartupError, configure_logging, run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="secure-llm-gateway")
    parser.add_argument("--check-config", action="store_true", help="validate and print the configuration")
    parser.add_argument("--version", action="version", version=f"secure-llm-gateway {__version__}")
    args = parser.parse_args()
    try:
        settings = load_settings(check_policies=load_policies)  # reported with every other bad variable
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
