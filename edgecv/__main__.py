from edgecv.cli import entry

entry()
