#!/bin/sh
# Chat with elmd using nothing but curl, streaming server-sent events.
#
#   sh clients/curl.sh "Why is the sky blue?"
#
# ELMD_URL (default http://127.0.0.1:8356), ELMD_API_KEY (if the daemon needs one) and
# ELMD_MODEL (default: the first model the daemon lists) configure it. The answer arrives
# as lines `data: {...chat.completion.chunk...}`, each with a piece of text in
# choices[0].delta.content, and ends with `data: [DONE]`.
set -eu

url="${ELMD_URL:-http://127.0.0.1:8356}"
auth="Authorization: Bearer ${ELMD_API_KEY:-elmd}"
model="${ELMD_MODEL:-$(curl --silent --show-error --fail -H "$auth" "$url/v1/models" |
  grep -o '"id": *"[^"]*"' | head -n 1 | sed 's/.*"\([^"]*\)"$/\1/')}"
question="${1:-Say hello in one sentence.}"
# The question as a JSON string: escape backslashes, quotes and tabs; join lines with \n.
escaped=$(printf '%s' "$question" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/\t/\\t/g' |
  awk 'NR > 1 { printf "\\n" } { printf "%s", $0 }')

curl --silent --show-error --fail-with-body --no-buffer "$url/v1/chat/completions" \
  -H "Content-Type: application/json" \
  -H "$auth" \
  -d "{\"model\": \"$model\", \"stream\": true, \"max_tokens\": ${ELMD_MAX_TOKENS:-256},
       \"messages\": [{\"role\": \"user\", \"content\": \"$escaped\"}]}"
