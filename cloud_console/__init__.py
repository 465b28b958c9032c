"""
cloud-console: a web terminal for a virtual machine's serial console.

A VM monitor exposes the guest's console as a pty slave; cloud-console opens it once,
keeps a history of what the guest wrote, and shares the session with every browser that
connects over WebSocket.
"""

__version__ = "0.1.0"
