#!/usr/bin/env bash
# The bank example, end to end on 127.0.0.1: a mock legacy bank API, an agent
# that verifies every webhook, and pollhook between them with its embedded
# store in ./state. Ctrl-C stops all three (pollhook drains first).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --bin pollhook --example mock-bank --example receiver
bin=${CARGO_TARGET_DIR:-target}/release

BANK_LISTEN=${BANK_LISTEN:-127.0.0.1:8081}
AGENT_LISTEN=${AGENT_LISTEN:-127.0.0.1:8082}
export BANK_URL=${BANK_URL:-http://$BANK_LISTEN}
export AGENT_URL=${AGENT_URL:-http://$AGENT_LISTEN/webhook}
export AGENT_SECRET=${AGENT_SECRET:-$("$bin/pollhook" secret generate)}
export POLLHOOK_STATE_DIR=${POLLHOOK_STATE_DIR:-./state}

"$bin"/examples/mock-bank --listen "$BANK_LISTEN" --accounts 3 --every 3s &
"$bin"/examples/receiver --listen "$AGENT_LISTEN" &
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT

"$bin/pollhook" validate --config bridge.yaml
"$bin/pollhook" run --config bridge.yaml
