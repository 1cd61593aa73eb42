"""``python -m contlearn``: the command-line interface."""

from contlearn.cli import main

raise SystemExit(main())
