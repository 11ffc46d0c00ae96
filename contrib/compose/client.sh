#!/bin/sh
# alice, for each service named: opens a session through the main relay (following a redirect
# if the relay gives one), buys the item its page sells (the page is the URL the session gives),
# and closes the session after a few seconds. Fails when a step does not happen.
set -eu
out=$(mktemp -d)
for service in "$@"; do
    client-agent --json open "$service" --for 4s > "$out/$service.json" &
    pid=$!
    url=""
    for _ in $(seq 1 100); do
        url=$(sed -n 's/.*"event":"session".*"url":"\([^"]*\)".*/\1/p' "$out/$service.json" | head -n 1)
        [ -n "$url" ] && break
        sleep 0.1
    done
    if [ -z "$url" ]; then
        echo "no session of $service:" >&2
        cat "$out/$service.json" >&2
        kill "$pid" 2>/dev/null || true
        exit 1
    fi
    echo "$service: session open, page $url"
    curl -fsS "$url"
    wait "$pid"
    grep '"event":"closed"' "$out/$service.json"
done
rm -rf "$out"
