#!/bin/sh
# A maintctl hook of the test guest (/etc/maintctl/hooks.d/10-clock): appends its phase
# (freeze or thaw), the EventId and the guest's own clock, in microseconds, to a log in RAM.
t=$(adjtimex | awk '/tv_sec/ {s = $2} /tv_usec/ {u = $2} END {printf "%d.%06d", s, u}')
echo "$1 $2 $t" >> /run/maintctl-hooks.log
