"""The I/O layer: the reverse proxy (``app``, one ``request`` at a time), its state, the control
loop and the cluster that drive the caps, the admin API, and the wire (``transport``). The
command line that starts it lives in :mod:`thinkcap.cli`."""
