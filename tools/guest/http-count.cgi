#!/bin/sh
# GET / of the test guest: "ID N", N counting this guest's requests from 1. busybox httpd
# forks one CGI per request and requests may overlap, so the count is read and written
# under a lock: mkdir is atomic, and busybox has no flock applet.
state=/run/vmcloud
until mkdir "$state/count.lock" 2>/dev/null; do usleep 5000; done
n=$(($(cat "$state/count" 2>/dev/null || echo 0) + 1))
echo "$n" > "$state/count"
rmdir "$state/count.lock"
body="$(cat "$state/id") $n"
# With its length, a proxy in front (the gateway's HAProxy) keeps its client's connection
# open for the next request; a body that ends when httpd closes would end that too.
printf 'Content-Type: text/plain\r\nContent-Length: %s\r\n\r\n%s\n' "$((${#body} + 1))" "$body"
