"""twistd plugin: C{twistd -n cloudconsole --pty PATH --port ENDPOINT}."""

from twisted.application.service import ServiceMaker

cloudconsole = ServiceMaker(
    "cloud-console",
    "cloud_console.tap",
    "Serve a pty (a VM's serial console) as a shared web terminal.",
    "cloudconsole",
)
