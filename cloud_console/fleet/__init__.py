"""
A host's consoles: the config file, the console directory, and the registry that builds,
reloads and removes consoles by name. Built on L{cloud_console.console}; knows no door.
"""
