#!/bin/busybox sh
# /init of the maintctl test guest: a RAM-only Linux that runs the real QEMU guest agent.
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /run /tmp /var/run /var/lib
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console; do
    insmod /lib/modules/$m.ko
done
port=""
i=0
while [ -z "$port" ] && [ $i -lt 200 ]; do
    port=$(ls /dev/vport*p1 2>/dev/null | head -n 1)
    [ -z "$port" ] && sleep 0.05
    i=$((i + 1))
done
# A counter kept only in RAM: it continues across a pause and restarts on a reboot.
( n=0; while true; do n=$((n + 1)); echo $n > /run/counter; sleep 1; done ) &
qemu-ga -m virtio-serial -p "$port" -t /run &
echo "MAINTCTL_GUEST_READY port=$port" > /dev/ttyS0
while true; do sleep 3600; done
