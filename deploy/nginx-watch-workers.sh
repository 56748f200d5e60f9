#!/bin/sh
# Reloads nginx whenever the set of worker addresses behind a name changes.
#
# Why: the open-source nginx this config is tested with (1.22 up to 1.27.2) resolves an
# upstream's `server worker:8000` once, when it loads its config. After
# `docker compose up --scale worker=5` it would keep sending every client to the first
# three replicas, and after a scale-down it would keep trying the gone ones. A reload
# makes it resolve the name again.
#
# docker-compose.yml mounts this file into the nginx image's /docker-entrypoint.d/,
# whose entrypoint runs it just before it starts nginx: it forks the watch loop into
# the background and returns at once. tests/e2e/test_nginx.py runs it the same way.
#
# What a reload costs: nginx's new processes take every new connection at once; the old
# ones keep their WebSockets until worker_shutdown_timeout (deploy/nginx.conf), then
# close them, and clients reconnect (resuming with `since`, losing nothing) and spread
# over all the workers. So it reloads only when the addresses really change.
#
# Settings, from the environment:
#   UPSTREAM_HOST            the name to watch (default: worker, the compose service)
#   UPSTREAM_WATCH_INTERVAL  seconds between look-ups (default: 5)
#   NGINX_CONF               the config to reload (default: /etc/nginx/nginx.conf)
set -eu

host=${UPSTREAM_HOST:-worker}
interval=${UPSTREAM_WATCH_INTERVAL:-5}
conf=${NGINX_CONF:-/etc/nginx/nginx.conf}

# The addresses the name resolves to now, sorted, on one line; empty if it resolves to
# none. Docker's DNS answers with every running replica, in a rotating order.
addresses() {
    getent hosts "$host" | awk '{ print $1 }' | sort -u | paste -sd ' ' -
}

log() {
    echo "$0: $*" >&2
}

watch() {
    # What nginx resolved when it started a moment from now.
    last=$(addresses || true)
    log "watching $host every ${interval}s: ${last:-no addresses yet}"
    while sleep "$interval"; do
        now=$(addresses || true)
        # No address at all is a DNS hiccup or every replica down: keep what nginx has
        # rather than reload into a config that cannot load.
        if [ -z "$now" ] || [ "$now" = "$last" ]; then
            continue
        fi
        log "$host is now at ${now} (was ${last:-none}): reloading nginx"
        if nginx -c "$conf" -s reload; then
            last=$now
        else
            log "reload failed; trying again in ${interval}s"
        fi
    done
}

# Detached from the entrypoint's stdin (the list of scripts it is reading).
watch </dev/null &
