#!/bin/sh
# redis-server as the redis user, in /data, with the arguments it was given; anything else
# runs as given.
set -eu
if [ "${1:-}" = redis-server ]; then
  chown -R redis:redis /data
  exec setpriv --reuid=redis --regid=redis --init-groups -- "$@"
fi
exec "$@"
