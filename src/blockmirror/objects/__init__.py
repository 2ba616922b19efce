"""User-creatable objects (cf. QEMU's QOM ``-object``/``object-add``): secrets, TLS credentials,
authorization lists and throttle groups.

A layer of its own, below ``nbd/`` and ``block/``: ``registry.py`` holds the daemon's objects by
id with a typed lookup, ``factory.py`` builds them from validated ``object-add`` options, and one
module per family holds the objects themselves. Users (the NBD server, the nbd and throttle
drivers) receive the registry through their constructors and ask it for an object of the type
they need; nothing here knows about the daemon.
"""
