#!/bin/sh
# Entry point of the MPI node pods: a host key of this pod's own (none is baked into the image, so
# no two pods or clusters share one), then sshd in the foreground, logging to stderr.
set -eu
mkdir -p /tmp/ssh
ssh-keygen -q -t ed25519 -N "" -f /tmp/ssh/ssh_host_ed25519_key
exec /usr/sbin/sshd -De -f /home/app/.sshd_config
