"""The i-PI socket protocol in both roles.

* :mod:`spkserve.ipi.protocol` - headers, framing, message bodies (atomic units)
* :mod:`spkserve.ipi.evaluate` - a bundle evaluated on i-PI structures (Bohr in, Hartree out)
* :mod:`spkserve.ipi.client` - client role (``spkserve ipi``): answer i-PI or ASE's SocketIOCalculator
* :mod:`spkserve.ipi.server` - server role: i-PI drivers (py_driver, ASE SocketClient, LAMMPS fix ipi)
  as a :class:`~spkserve.provider.ForceProvider`
* :mod:`spkserve.ipi.pes` - i-PI PES module (``<ffdirect>``, ``i-pi-py_driver -m custom``)
"""
