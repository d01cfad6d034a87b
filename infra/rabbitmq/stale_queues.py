"""Names the queues of a running vhost whose arguments differ from a definitions file's.

RabbitMQ's definitions import skips a queue that exists with other arguments (it says so only
in the broker's log), and a service declaring it then fails with 406 PRECONDITION_FAILED. The
dev stack (infra/dev/stack.sh) runs this after the import: a stale queue left by an older Keel
is then recreated instead of failing a service's start-up.

Usage: stale_queues.py DEFINITIONS_FILE QUEUES_JSON  (QUEUES_JSON: GET /api/queues/<vhost>)
Prints one stale queue name per line; exits 0.
"""

import json
import sys


def stale(definitions: dict, running: list) -> list:
    wanted = {q["name"]: q.get("arguments", {}) for q in definitions.get("queues", [])}
    return sorted(
        q["name"]
        for q in running
        if q["name"] in wanted and q.get("arguments", {}) != wanted[q["name"]]
    )


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        definitions = json.load(f)
    with open(sys.argv[2], encoding="utf-8") as f:
        running = json.load(f)
    for name in stale(definitions, running):
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
