"""
The SSH door: the consoles for operators' terminals, through Twisted Conch.

The same sessions as the web door (an SSH user and a page on one console see each
other's typing), the same limits, and the same access policy: an C{authorized_keys} line
or a user certificate says which consoles a key may open and whether it may type. Built on
the console core and L{cloud_console.access}; the web door is not imported.
"""
