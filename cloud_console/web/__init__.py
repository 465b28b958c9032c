"""
The web door: the site (page, index, API, health), the WebSocket protocol and its two
dialects, the origin check, the authenticating gate, and the metrics resource. Built on the
console core, the fleet's registry and the access policy.
"""
