"""Processes working together: the process group of a launcher or of a plain run, prep's workers
(``process_group``), and the peers of a multi-node run (``peers``).
May use: the base layer only."""
