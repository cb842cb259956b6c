#!/bin/sh
# Entrypoint of coral's Bottlerocket bootstrap container: mounts the seed
# volume over the host's /var/lib/containerd before containerd starts.
# NOT YET TRIED ON REAL NODES. See deploy/node/user-data/bottlerocket.toml.
#
# Bottlerocket runs bootstrap containers before configured.target, and
# starts containerd after it, so containerd opens the volume as its root.
# host-ctr shares the host's /var/lib/containerd into bootstrap containers
# at /.bottlerocket/rootfs/var/lib/containerd with rshared propagation, so
# a mount made there is the host's mount too.
#
# The image needs: coral-node-mounter on PATH, a POSIX sh, timeout, blkid,
# resize2fs and xfs_growfs (the mounter calls the last three).
#
# Always exits 0. Boot waits for bootstrap containers with no time limit of
# its own, so the mounter runs under `timeout`.

HOST=/.bottlerocket/rootfs
SETTINGS=/.bottlerocket/bootstrap-containers/current/user-data
TARGET=$HOST/var/lib/containerd
# The mounter waits up to 60 s for the device; the rest is for growing the
# filesystem. Same budget as coral-mount.service's TimeoutStartSec.
LIMIT=300

log() { echo "coral-bootstrap: $*" >&2; }

# The setting's user-data holds KEY=value lines, as /etc/coral/node.env.
# Only the keys the mount uses are read; the file is not run as a script.
if [ -r "$SETTINGS" ]; then
    while IFS= read -r line || [ -n "$line" ]; do
        case "$line" in
            CORAL_DEVICE=* | CORAL_EXPECT=* | CORAL_MODE=* | CORAL_LOG=*)
                key=${line%%=*}
                value=${line#*=}
                value=${value#\"}
                value=${value%\"}
                export "$key=$value"
                ;;
        esac
    done < "$SETTINGS"
fi

if [ "${CORAL_MODE:-adopt}" != adopt ]; then
    log "CORAL_MODE=${CORAL_MODE}: nothing to mount at boot (copy mode imports from a running node)"
    exit 0
fi

# This container's /dev holds none of the host's disks: name the device by
# its path in the host's /dev, which is under $HOST.
device=${CORAL_DEVICE:-auto}
case "$device" in
    auto) device=$HOST/dev/disk/by-label/coral-seed ;;
    label:*) device=$HOST/dev/disk/by-label/${device#label:} ;;
    ebs:vol-* | vol-*)
        vol=${device#ebs:}
        device=$HOST/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol${vol#vol-}
        ;;
    /dev/*) device=$HOST$device ;;
esac

set -- --device "$device" --target "$TARGET" --grow --wait 60s
if [ -n "${CORAL_EXPECT:-}" ]; then
    set -- "$@" --expect "$CORAL_EXPECT"
fi
export CORAL_LOG="${CORAL_LOG:-info}"
timeout -k 15 "$LIMIT" coral-node-mounter mount "$@"
code=$?
case "$code" in
    0) log "the seed volume is mounted at /var/lib/containerd" ;;
    124 | 137) log "the mount took longer than ${LIMIT}s; containerd starts without the volume" ;;
    *) log "coral-node-mounter mount exited $code; containerd starts without the volume" ;;
esac
exit 0
