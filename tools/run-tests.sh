#!/usr/bin/env bash
# The whole test suite: installs what is missing, starts the services the functional
# tests use (libvirtd, RabbitMQ, PostgreSQL, a single-node Ceph cluster), builds the test
# guests (the test guest, the systemd one), checks style, then runs every test and checks
# that nothing was left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install.sh
tools/start-libvirtd.sh
tools/start-services.sh
tools/ceph/start.sh
# The cluster is this checkout's own (its state under .cache/ceph): stop it when the
# tests end, so another checkout's run can take the port.
trap 'tools/ceph/stop.sh >/dev/null 2>&1 || true' EXIT
tools/guest/build-test-guest.sh
# The systemd guest the network tests boot as an image that knows nothing of vmcloud
# (debootstrap from Debian's mirror, a few minutes; cached in .cache/guest/realistic).
tools/guest/build-realistic-guest.sh
.venv/bin/flake8 vmcloud tests benchmarks tools
status=0
.venv/bin/stestr run --concurrency "${VMCLOUD_TEST_CONCURRENCY:-2}" "$@" || status=$?
# Every test removes what it made; the suite as a whole must leave nothing either.
tools/check-leftovers.sh || status=1
exit $status
