"""
Who may do what: the credential files and their checkers, signed links, and the one policy
(L{cloud_console.access.policy.Access}) every door asks: may this credential see this
console, may it type. Knows no door and no console internals.
"""
