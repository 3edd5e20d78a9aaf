"""Models and what runs them: loading and resolving model folders and Hub names (``loading``),
loading weights without unpickling (``safe_load``), the one log-prob code path (``logps``) over
padding-free packed rows (``packing``), and the ZeRO-3 partitioned reference (``sharded_reference``).
May use: the base layer and the maths layer."""
