from edgecv.cli import _entry

_entry()
