"""Ground-truth rewards: scorers named by a spec string (``scorers``: VADER, a local classifier, a
``module:function``) and the sampling and scoring behind the ``reward_pairs`` preprocessor (``sampling``).
May use: base, maths, runtime (model/)."""
