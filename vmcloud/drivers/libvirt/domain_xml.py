"""libvirt domain XML for an instance."""
import xml.etree.ElementTree as ET
from typing import Sequence

from vmcloud.drivers import base
from vmcloud.drivers import nbd_uri


def _disk(devices: ET.Element, spec: base.InstanceSpec) -> None:
    if nbd_uri.is_nbd(spec.disk):
        uri = nbd_uri.parse(spec.disk)
        disk = ET.SubElement(devices, 'disk', type='network', device='disk')
        ET.SubElement(disk, 'driver', name='qemu', type='raw', cache='none')
        source = ET.SubElement(disk, 'source', protocol='nbd', name=uri.export)
        if uri.socket is not None:
            ET.SubElement(source, 'host', transport='unix', socket=uri.socket)
        else:
            ET.SubElement(source, 'host', name=uri.host, port=str(uri.port))
    else:
        disk = ET.SubElement(devices, 'disk', type='file', device='disk')
        ET.SubElement(disk, 'driver', name='qemu', type=spec.disk_format, cache='writeback')
        ET.SubElement(disk, 'source', file=spec.disk)
    ET.SubElement(disk, 'target', dev='vda', bus='virtio')


def _interface(devices: ET.Element, spec: base.InstanceSpec, index: int, mtu: int) -> None:
    # libvirt makes the tap (named by <target>), enslaves it and removes it when the
    # domain ends; <mtu> sets the tap's and tells the guest (virtio host_mtu), whose
    # larger frames the bridge would otherwise drop.
    nic = spec.nics[index]
    interface = ET.SubElement(devices, 'interface', type='bridge')
    ET.SubElement(interface, 'mac', address=nic.mac)
    ET.SubElement(interface, 'source', bridge=nic.bridge)
    ET.SubElement(interface, 'target', dev=base.tap_name(spec.name, index))
    ET.SubElement(interface, 'model', type='virtio')
    ET.SubElement(interface, 'mtu', size=str(mtu))


def build(spec: base.InstanceSpec, domain_type: str, console_log: str,
          dac_label: str, mtus: Sequence[int] = ()) -> str:
    """``mtus``: the MTU of each of ``spec.nics``'s bridges, in order."""
    domain = ET.Element('domain', type=domain_type)
    ET.SubElement(domain, 'name').text = spec.name
    ET.SubElement(domain, 'memory', unit='MiB').text = str(spec.memory_mib)
    ET.SubElement(domain, 'vcpu').text = str(spec.vcpus)
    os_element = ET.SubElement(domain, 'os')
    ET.SubElement(os_element, 'type', arch='x86_64', machine='pc').text = 'hvm'
    if spec.kernel:
        ET.SubElement(os_element, 'kernel').text = spec.kernel
        if spec.initrd:
            ET.SubElement(os_element, 'initrd').text = spec.initrd
        ET.SubElement(os_element, 'cmdline').text = spec.cmdline
    # Without ACPI the guest never sees the power button and shutdown() does nothing.
    features = ET.SubElement(domain, 'features')
    ET.SubElement(features, 'acpi')
    if domain_type == 'kvm':
        ET.SubElement(domain, 'cpu', mode='host-passthrough')
    ET.SubElement(domain, 'on_poweroff').text = 'destroy'
    ET.SubElement(domain, 'on_crash').text = 'destroy'
    devices = ET.SubElement(domain, 'devices')
    _disk(devices, spec)
    for index, (_, mtu) in enumerate(zip(spec.nics, mtus, strict=True)):
        _interface(devices, spec, index, mtu)
    serial = ET.SubElement(devices, 'serial', type='file')
    ET.SubElement(serial, 'source', path=console_log)
    ET.SubElement(serial, 'target', port='0')
    ET.SubElement(devices, 'memballoon', model='none')
    if dac_label:
        seclabel = ET.SubElement(domain, 'seclabel', type='static', model='dac', relabel='no')
        ET.SubElement(seclabel, 'label').text = dac_label
    return ET.tostring(domain, encoding='unicode')
