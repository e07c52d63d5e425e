#!/bin/sh
# A fork-mode function: the request body arrives on stdin, stdout is the response,
# request headers are in the environment as Http_* (like OpenFaaS's classic watchdog).
body=$(cat)
echo "Hello from a shell function (call ${Http_X_Call_Id:-?}, ${Http_Method:-?} ${Http_Path:-/})"
if [ -n "$body" ]; then
  printf 'You sent %s bytes: %s\n' "${#body}" "$body"
fi
