"""Run `python -m dist_signmaml.train ARGS` with every socket connection the Python code makes written down
(`sys.addaudithook`'s socket.connect event), so a test can show that a tracked run contacts nothing.

    python tests/dist_scripts/audited_train.py CONNECTIONS.jsonl --ways 5 ...

CONNECTIONS.jsonl gets one line per connect: the socket family and the address.
"""

import json
import runpy
import sys


def main():
    record = open(sys.argv[1], "a")

    def audit(event, args):
        if event == "socket.connect":
            sock, address = args
            record.write(json.dumps({"family": sock.family.name, "address": repr(address)}) + "\n")
            record.flush()

    sys.addaudithook(audit)
    sys.argv = ["dist_signmaml.train"] + sys.argv[2:]
    runpy.run_module("dist_signmaml.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
