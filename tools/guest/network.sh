# Sourced by the test guest's init when the guest has a NIC (eth0), before boot-done:
# configure eth0, start the servers the flags ask for (HTTP, stream receiver) and define
# after_boot_done, which starts the clients (reach probes, stream sender). Uses init's
# arg and say. Names here start with net_ so that init's own variables stay untouched.
mkdir -p /run/vmcloud
echo "$(arg id)" > /run/vmcloud/id

net_address() {
    ip -4 addr show dev eth0 | sed -n 's/.*inet \([0-9.]*\/[0-9]*\).*/\1/p' | head -n 1
}

# :returns: non-zero after printing VMCLOUD-NET-FAILED
net_configure() {
    ip link set lo up
    net_mtu=$(arg mtu)
    if [ -n "$net_mtu" ] && ! ip link set eth0 mtu "$net_mtu"; then
        say "VMCLOUD-NET-FAILED cannot set mtu $net_mtu on eth0"
        return 1
    fi
    ip link set eth0 up || { say "VMCLOUD-NET-FAILED cannot bring eth0 up"; return 1; }
    net_static=$(arg ip)
    if [ -n "$net_static" ]; then
        ip addr add "$net_static" dev eth0 \
            || { say "VMCLOUD-NET-FAILED cannot add $net_static to eth0"; return 1; }
    else
        # -n: give up after the discover packets (15 s at most) instead of holding the
        # boot; once bound, udhcpc forks and keeps renewing the lease in the background.
        udhcpc -i eth0 -s /lib/vmcloud/udhcpc.script -n -t 15 -T 1 -O mtu >/dev/null 2>&1 \
            || { say "VMCLOUD-NET-FAILED no DHCP lease on eth0"; return 1; }
    fi
    say "VMCLOUD-NET eth0 $(net_address)"
}

# busybox httpd answers GET / with cgi-bin/index.cgi when there is no index.html.
net_http() {
    mkdir -p /run/vmcloud/www/cgi-bin
    cp /lib/vmcloud/http-count.cgi /run/vmcloud/www/cgi-bin/index.cgi
    httpd -p "${1:-80}" -h /run/vmcloud/www \
        || say "VMCLOUD-HTTP-FAILED cannot listen on port ${1:-80}"
}

# One stream, then its verdict: line K must read K.
net_stream_server() {
    printf '#!/bin/sh\nexec cat > /run/vmcloud/stream\n' > /run/vmcloud/stream-receive
    chmod +x /run/vmcloud/stream-receive
    (
        if nc -l -p "$1" -e /run/vmcloud/stream-receive; then
            say "$(awk '$0 != NR && !gap { gap = NR }
                        END { print "VMCLOUD-STREAM-RECEIVED", NR, (gap ? "gap at " gap : "ok") }' \
                   /run/vmcloud/stream)"
        else
            say "VMCLOUD-STREAM-FAILED cannot listen on port $1"
        fi
    ) &
}

# Every connection answered at once with one line "ID N" (ID as the HTTP server's, N
# counting this guest's connections from 1, under the CGI's mkdir lock), then with the
# same line again for every line the client sends, until it closes: a long-lived
# connection whose instance and liveness a client can check at any time. nc -ll forks
# one handler per connection, so they are served concurrently.
net_tcp_hold() {
    cat > /run/vmcloud/tcp-hold <<'HOLD'
#!/bin/sh
exec 2>/dev/null
state=/run/vmcloud
until mkdir "$state/hold.lock"; do usleep 5000; done
n=$(($(cat "$state/hold-count" || echo 0) + 1))
echo "$n" > "$state/hold-count"
rmdir "$state/hold.lock"
line="$(cat "$state/id") $n"
echo "$line"
while read -r _; do echo "$line"; done
HOLD
    chmod +x /run/vmcloud/tcp-hold
    (
        nc -ll -p "$1" -e /run/vmcloud/tcp-hold \
            || say "VMCLOUD-TCP-HOLD-FAILED cannot listen on port $1"
    ) &
}

net_stream_to() {
    net_count=${1##*:}
    net_target=${1%:*}
    (
        net_deadline=$(($(date +%s) + 30))
        until seq 1 "$net_count" | nc -w 2 "${net_target%:*}" "${net_target##*:}" 2>/dev/null; do
            if [ "$(date +%s)" -ge "$net_deadline" ]; then
                say "VMCLOUD-STREAM-FAILED cannot connect to $net_target"
                exit 1
            fi
            sleep 1
        done
        say "VMCLOUD-STREAM-SENT $net_count"
    ) &
}

net_reach() {
    net_tries=$(arg reach_tries)
    (
        net_round=0
        while [ "$net_round" -lt "${net_tries:-30}" ]; do
            net_round=$((net_round + 1))
            for net_target in $(echo "$1" | tr ',' ' '); do
                case "$net_target" in *:*) ;; *) net_target=$net_target:80 ;; esac
                # timeout, not wget -T: this busybox's wget crashes on -T.
                if net_body=$(timeout 2 wget -q -O - "http://$net_target/" 2>/dev/null); then
                    say "VMCLOUD-REACH $net_target yes $(echo "$net_body" | head -n 1)"
                else
                    say "VMCLOUD-REACH $net_target no"
                fi
            done
            sleep 1
        done
    ) &
}

# The default route via the first address of eth0's subnet: where a gateway host joins
# a deployment network (vmcloud's IPAM keeps it free), as a real image would route.
net_gateway_route() {
    net_cidr=$(net_address)
    [ -n "$net_cidr" ] || { say "VMCLOUD-ROUTE-FAILED eth0 has no address"; return 1; }
    eval "$(ipcalc -n "$net_cidr")"
    set -- $(echo "$NETWORK" | tr . ' ')
    net_router=$1.$2.$3.$(($4 + 1))
    if ip route replace default via "$net_router" dev eth0; then
        say "VMCLOUD-ROUTE default via $net_router"
    else
        say "VMCLOUD-ROUTE-FAILED cannot route via $net_router"
    fi
}

after_boot_done() {
    [ -n "$(arg reach)" ] && net_reach "$(arg reach)"
    [ -n "$(arg stream_to)" ] && net_stream_to "$(arg stream_to)"
    return 0
}

# The servers run even when the address could not be set: lo still reaches them.
net_configure
[ "$(arg http)" = 0 ] || net_http "$(arg http_port)"
[ -n "$(arg stream_server)" ] && net_stream_server "$(arg stream_server)"
[ -n "$(arg tcp_hold)" ] && net_tcp_hold "$(arg tcp_hold)"
[ "$(arg gateway_route)" = 1 ] && net_gateway_route
:
