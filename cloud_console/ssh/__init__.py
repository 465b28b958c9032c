"""
The SSH door: the consoles for operators' terminals, through Twisted Conch.

The same sessions as the web door (an SSH user and a page on one console see each
other's typing), the same limits, and the same access policy: an C{authorized_keys} line
or a user certificate says which consoles a key may open and whether it may type. Built on
the console core and L{cloud_console.access}; the web door is not imported.
"""

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

#: The logger of the door's Conch classes (transport, authentication, connection,
#: channel, avatar). Conch logs each packet, channel and key exchange at debug and info;
#: through this logger only its warnings and errors reach the server's log, under
#: C{cloud-console} and C{twistd} alike. One line per session attach and detach, and per
#: refused login, says what an operator needs (L{cloud_console.ssh.session}).
CONCH_LOG = Logger(
    observer=FilteringLogObserver(
        globalLogPublisher, [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)]
    )
)
