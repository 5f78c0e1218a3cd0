"""Run a Python script and record every network operation it attempts.

    python tests/egress_guard.py LOGFILE SCRIPT [ARGS...]

An audit hook (PEP 578) appends one JSON line to LOGFILE per socket connect,
DNS lookup or datagram send, then the script runs as ``__main__``. Nothing is
patched: the hook only watches. Used by test_egress.py to prove that llmgw
contacts nothing but its configured providers.
"""

import json
import os
import runpy
import sys

WATCHED = {
    "socket.connect": lambda args: {"address": repr(args[1])},
    "socket.getaddrinfo": lambda args: {"host": repr(args[0]), "port": repr(args[1])},
    "socket.gethostbyname": lambda args: {"host": repr(args[0])},
    "socket.gethostbyname_ex": lambda args: {"host": repr(args[0])},
    "socket.gethostbyaddr": lambda args: {"host": repr(args[0])},
    "socket.sendto": lambda args: {"address": repr(args[1])},
}


def main():
    log_path, script = sys.argv[1], sys.argv[2]
    log = open(log_path, "a", buffering=1, encoding="utf-8")

    def watch(event, args):
        describe = WATCHED.get(event)
        if describe is not None:
            log.write(json.dumps(dict(describe(args), event=event)) + "\n")
    sys.addaudithook(watch)
    sys.argv = sys.argv[2:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
