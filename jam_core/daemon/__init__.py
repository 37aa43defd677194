"""On-access hydration (``jam daemon``): a stub fills in the moment any program opens it.

* ``fanotify``: ctypes bindings (pre-content events, Linux >= 6.14);
* ``marks``: which inodes are marked (every stub of a root), and the pid rule for jam itself;
* ``supervisor``: the small process that holds the fanotify descriptor and answers the kernel;
* ``worker``: the process that fetches, verifies and fills stubs through the event's descriptor,
  and records opens of local files as use;
* ``client``: the root's ``.jam/daemon.sock`` (stash asks the daemon to mark a new stub) and the
  status doctor reports.
"""
