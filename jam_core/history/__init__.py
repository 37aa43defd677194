"""Versions of a root: snapshots (``jam commit``), their history (``jam log``, ``jam diff``),
bringing an earlier version back (``jam restore``), and thinning them (``jam gc --keep``).

The pieces, lowest first:

* ``snapshot.py``: the format. A snapshot is an immutable object like any other: its stored
  bytes are zlib-compressed canonical text, its id is the hash of the stored bytes (``b3:``), so
  a backend verifies it as it verifies file content. ``encode``/``parse`` (parse validates:
  invariant 7), ``Snapshot``/``Item``, ``changes`` (what differs between two snapshots),
  ``machine_id``/``tree_name``.
* ``index.py``: ROOT/.jam/history/: ``history.db`` (the ids cache, the snapshots this root
  keeps, the union of their objects that ``ops.refs.referenced`` publishes, what each remote
  holds), the local cache of snapshot bytes (``objects/``, verified on every read) and ``HEAD``.
* ``prune.py``: borg prune's rules (``daily 7, weekly 4, monthly 12``).
* ``store.py``: ``commit`` (scan, upload what no remote holds, record, push, heads).
* ``restore.py``: ``log``, ``diff``, ``restore``.

Remote layout, for the readers to come (clone, sync): snapshot objects are ordinary objects
under ``objects/``; each machine writes only its own head, ``meta/history/<tree name>/<machine
id>`` = ``jam-head 1\\n<snapshot id>\\n<its stored size>\\n``, replaced atomically
(``write_meta``). One file per machine means two machines committing at once never write the
same file, so neither can lose the other's snapshot and no compare-and-swap is needed for
commits; ``sync`` reads every machine's head (``store.read_heads``) and merges (a merge
snapshot names several parents). A compare-and-swap on one shared head would need a
conditional write every backend can do (sftp and rclone have none without a lock file), and
would make a commit fail whenever another machine won the race.
"""
