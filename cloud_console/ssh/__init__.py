"""
The SSH door: the consoles for operators' terminals, through Twisted Conch.

The same sessions as the web door (an SSH user and a page on one console see each
other's typing), the same limits, and the same access policy: an C{authorized_keys} line
or a user certificate says which consoles a key may open and whether it may type. Built on
the console core and L{cloud_console.access}; the web door is not imported.
"""

#: Where Conch logs each packet, channel and key exchange (at debug and info): quieted
#: to warnings in the server's log, where one line per session attach and detach, and
#: per refused login, says what an operator needs (L{cloud_console.ssh.session}).
CONCH_NAMESPACES = (
    "twisted.conch",
    "cloud_console.ssh.factory.ConsoleSSHTransport",
    "cloud_console.ssh.factory.ConsoleSSHFactory",
    "cloud_console.ssh.auth.ConsoleUserAuth",
    "cloud_console.ssh.session.ConsoleChannel",
    "cloud_console.ssh.session.ConsoleUser",
)
