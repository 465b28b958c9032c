"""
One console, whole: its source and device, following it across reboots, the history, the
fan-out to viewers with their pacing, the input path and the log file.

Imports nothing above it: it knows nothing of HTTP, SSH, credentials or the fleet; the doors
attach their clients through L{cloud_console.console.multiplexer.IConsoleClient}.
"""
