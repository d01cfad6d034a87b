#!/bin/bash
# The offline mailpit stand-in's /mailpit: what Mailpit's own binary does for compose.yaml, and
# no more. `/mailpit readyz` (compose.yaml's healthcheck) exits 0 when the HTTP API on 8025
# answers, as Mailpit's `readyz` does; anything else runs keel-smtp-sink as PID 1's exec (so
# SIGTERM reaches it) with Mailpit's container defaults: SMTP on 0.0.0.0:1025, web API on
# 0.0.0.0:8025, at most 500 messages kept (compose.yaml's MP_MAX_MESSAGES, which the sink does
# not read). Mailpit's own flags and MP_* variables are ignored.
set -euo pipefail
if [[ ${1:-} == readyz ]]; then
    # The runtime image has no curl: one HTTP/1.0 request over bash's /dev/tcp, bounded.
    exec 3<>/dev/tcp/127.0.0.1/8025
    printf 'GET /livez HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    IFS= read -r -t 2 status <&3
    [[ $status == HTTP/1.[01]\ 200* ]]
    exit
fi
exec /usr/local/bin/keel-smtp-sink --smtp 0.0.0.0:1025 --http 0.0.0.0:8025 --max-messages 500
