#!/bin/sh
# The official image's conventions that docker-compose.rabbitmq.yml uses, and no others:
# RABBITMQ_DEFAULT_USER and RABBITMQ_DEFAULT_PASS are the first user (an administrator, who
# may connect from anywhere); the node is rabbit@<hostname>, its data under
# /var/lib/rabbitmq; RabbitMQ's own variables (RABBITMQ_NODE_PORT, ERL_EPMD_PORT, ...) apply.
set -eu
if [ "${1:-}" = rabbitmq-server ]; then
  {
    echo "loopback_users = none"
    [ -n "${RABBITMQ_DEFAULT_USER:-}" ] && echo "default_user = $RABBITMQ_DEFAULT_USER"
    [ -n "${RABBITMQ_DEFAULT_PASS:-}" ] && echo "default_pass = $RABBITMQ_DEFAULT_PASS"
    echo "default_user_tags.administrator = true"
  } > /etc/rabbitmq/rabbitmq.conf
  chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /etc/rabbitmq
  export HOME=/var/lib/rabbitmq
  exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups -- "$@"
fi
exec "$@"
