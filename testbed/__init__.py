"""SpecFed testbed: the Mininet side (link emulation, nets, processes in hosts, runs).

Modules that need Mininet import it themselves; ``testbed.linkparams`` and
``testbed.state`` work without root or Mininet.
"""
