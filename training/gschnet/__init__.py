"""cG-SchNet training: data and conditions, partial-molecule sequences, the Lightning task, ``gschnet_train``.

The network and sampling live in the runtime (:mod:`spkserve.nn.gschnet`,
:mod:`spkserve.nn.gschnet_sampling`); this package only trains and exports them.
"""
